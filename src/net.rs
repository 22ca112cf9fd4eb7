//! Dialing backends: the one place a socket to a backend is opened.
//!
//! [`dial`] connects under a deadline (names resolved inside it) with TCP_NODELAY; [`open`] turns
//! a dial into a ready [`BackendStream`] for a client connection: the PROXY header first (before
//! any client byte, and before TLS), then the TLS handshake when the upstream asks for one, all
//! within the upstream's `connect_timeout`. Health probes dial through [`dial`] too, so a probe
//! and a client reach a backend the same way. [`is_resource_exhaustion`] tells this process's own
//! lack of descriptors or memory from a backend's fault. This module picks no backend (balancer)
//! and records no outcome (health).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{BackendAddr, Keepalive};
use crate::proxy_protocol::SslInfo;
use crate::state::{Backend, Upstream};

/// Dials `addr` under `timeout`, with TCP_NODELAY set on success.
pub(crate) async fn dial(addr: &BackendAddr, timeout: Duration) -> io::Result<TcpStream> {
    let connect = async {
        match addr {
            BackendAddr::Ip(ip) => TcpStream::connect(ip).await,
            BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The client as a PROXY protocol header describes it to the backend.
pub(crate) struct Origin<'a> {
    /// The client's address (from the PROXY header when the listener accepts one).
    pub(crate) addr: SocketAddr,
    /// The address the client connected to.
    pub(crate) local: SocketAddr,
    /// The client's TLS session, for a PROXY v2 header.
    pub(crate) ssl: Option<&'a SslInfo>,
    /// The server name the client asked for (SNI).
    pub(crate) authority: Option<&'a str>,
}

/// Dials a backend of `upstream`, sends the PROXY header (before any client byte, and before
/// TLS), and runs the TLS handshake to it when the upstream asks for one: all within
/// `connect_timeout`.
pub(crate) async fn open(
    upstream: &Upstream,
    backend: &Backend,
    origin: &Origin<'_>,
) -> Result<BackendStream, DialError> {
    let timeout = upstream.connect_timeout;
    let open = async {
        let mut stream = dial(&backend.addr, timeout)
            .await
            .map_err(|e| DialError::from_connect(e, timeout))?;
        if let Some(settings) = &upstream.tcp_keepalive {
            keepalive(socket2::SockRef::from(&stream), settings).map_err(DialError::Io)?;
        }
        if let Some(version) = upstream.proxy_protocol {
            let header = crate::proxy_protocol::encode(
                version,
                origin.addr,
                origin.local,
                origin.ssl,
                origin.authority,
            );
            stream.write_all(&header).await.map_err(DialError::Io)?;
        }
        let Some(tls) = &upstream.tls else {
            return Ok(BackendStream::Plain(stream));
        };
        let config = tls.config_for(origin.ssl.and_then(|s| s.alpn.as_deref()));
        let name = match (&tls.server_name, &backend.addr) {
            (Some(name), _) => name.clone(),
            (None, BackendAddr::Name { host, .. }) => host.clone(),
            (None, BackendAddr::Ip(ip)) => ip.ip().to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| DialError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // The name is sent as SNI (not for an IP) and, without `server_identity`, verified.
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| DialError::Tls(tls.handshake_error(e)))?;
        Ok(BackendStream::Tls(Box::new(tls)))
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| DialError::TimedOut(timeout))?
}

/// The backend side of a connection: plain TCP, or TLS to the backend (`[upstream.tls]`).
pub(crate) enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    /// The socket underneath (to reset it).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Turns on TCP keepalive on `socket` as `settings` say, with `TCP_USER_TIMEOUT` to match, so a
/// peer that vanished is noticed whether the connection is idle or has data in flight.
pub(crate) fn keepalive(socket: socket2::SockRef<'_>, settings: &Keepalive) -> io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(settings.idle)
        .with_interval(settings.interval)
        .with_retries(settings.count);
    socket.set_tcp_keepalive(&probes)?;
    socket.set_tcp_user_timeout(Some(settings.user_timeout()))
}

/// Why opening a connection to a backend (the dial, the PROXY header, the TLS handshake)
/// failed. `health` judges it as `health::Failure` (the `probe` room maps one to the other).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("connect refused")]
    Refused,
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("i/o failed: {0}")]
    Io(io::Error),
    /// The TLS handshake to the backend failed, its certificate refused included (the message
    /// then says why: for `server_identity`, the identity found and the one expected).
    #[error("tls handshake failed: {0}")]
    Tls(io::Error),
}

impl DialError {
    /// Classifies a failed connect made under `timeout`.
    fn from_connect(e: io::Error, timeout: Duration) -> DialError {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => DialError::Refused,
            io::ErrorKind::TimedOut => DialError::TimedOut(timeout),
            _ => DialError::Connect(e),
        }
    }
}
