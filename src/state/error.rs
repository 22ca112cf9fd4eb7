//! Why a generation cannot be brought up, at start or on reload ([`ServerError`]). It names the
//! failures; it must not decide what to do about them (the server and reload do).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a generation cannot be brought up, at start or on reload: a file it needs, a socket it
/// binds, or a client it builds. The running generation is untouched by every one of them.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("admin: cannot bind {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
    #[error("admin: cannot serve the Unix socket {}: {source}", path.display())]
    AdminSocket { path: PathBuf, source: io::Error },
    #[error("listener {0:?} has no socket: pass one for every configured listener")]
    MissingListener(String),
    #[error("upstream {upstream:?}: {source}")]
    UpstreamTls {
        upstream: String,
        source: crate::tls::TlsError,
    },
    #[error("listener {listener:?}: {source}")]
    Tls {
        listener: String,
        source: crate::tls::TlsError,
    },
    #[error(transparent)]
    SharedRateLimit(#[from] crate::ratelimit::cluster::RedisClientError),
    #[error(transparent)]
    Workload(#[from] super::workload::WorkloadError),
    #[error("access log: cannot open {path}: {source}")]
    AccessLog { path: String, source: io::Error },
    #[error("cannot start {workers} worker threads ([runtime] workers): {source}")]
    Workers { workers: usize, source: io::Error },
}
