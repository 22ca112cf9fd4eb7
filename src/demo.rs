//! `fulcrum demo`: three demo backends behind an mTLS listener on localhost, for a newcomer's
//! first minute.
//!
//! It writes a throwaway development PKI (CA, server, clients `alice` and `bob`) to a fresh
//! temporary directory, authorizes `alice` (not `bob`) for the demo upstream, builds its config as
//! TOML text and loads it through [`Config::load`], so the demo runs exactly the code path a real
//! deployment does. It prints what to run to try it, and removes its directory when stopped. It
//! never binds anything but the addresses it is given (loopback by default).

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{self, Mode};
use crate::config::{Config, ConfigError};
use crate::pki::PkiError;
use crate::server::Server;
use crate::state::ServerError;

/// Where the demo listens.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start demo backend: {0}")]
    Backend(std::io::Error),
    #[error("cannot write the demo PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("cannot write the demo config {path}: {source}")]
    WriteConfig { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} (is another program using the port? pick one with --listen/--admin)")]
    Server(#[from] ServerError),
}

/// Runs the demo until `stop` is cancelled.
pub async fn run(options: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    let dir = std::env::temp_dir().join(format!("fulcrum-demo-{}", std::process::id()));
    let result = run_in(&dir, options, stop).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &std::path::Path,
    options: DemoOptions,
    stop: CancellationToken,
) -> Result<(), DemoError> {
    let pki = crate::pki::generate(&["alice".into(), "bob".into()], &[])?;
    crate::pki::write(dir, &pki, true)?;

    let tracker = TaskTracker::new();
    let mut backends = Vec::new();
    for n in 1..=3 {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Backend)?;
        let addr = socket.local_addr().map_err(DemoError::Backend)?;
        backends.push(format!("\"{addr}\""));
        tracker.spawn(backend::serve(socket, n.to_string(), Mode::Hello, stop.clone()));
    }
    let toml = format!(
        r#"# fulcrum demo config (generated)
[[listener]]
name = "demo"
bind = "{listen}"
upstream = "demo"

[listener.tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"          # clients must present a certificate from this CA

[[upstream]]
name = "demo"
backends = [{backends}]
connect_timeout = "1s"

[authorization]
alice = ["demo"]              # bob has a valid certificate but no entry: refused

[admin]
bind = "{admin}"
"#,
        listen = options.listen,
        admin = options.admin,
        backends = backends.join(", "),
    );
    let path = dir.join("fulcrum.toml");
    std::fs::write(&path, &toml).map_err(|source| DemoError::WriteConfig {
        path: path.clone(),
        source,
    })?;
    let config = Config::load(&path)?;
    let server = Server::bind(config).await?;
    let listen = server.local_addr("demo").unwrap_or(options.listen);
    let admin = server.admin_addr().unwrap_or(options.admin);
    let d = dir.display();
    let host = if listen.ip().is_loopback() {
        format!("localhost:{}", listen.port())
    } else {
        listen.to_string()
    };
    println!("fulcrum demo: 3 backends behind an mTLS listener on {listen}");
    println!("certificates and config in {d} (removed on exit)\n");
    println!("alice is authorized; run this a few times to see the backends take turns:");
    println!("  curl --cacert {d}/ca.pem --cert {d}/alice.pem --key {d}/alice.key https://{host}/\n");
    println!("the same with openssl (type a request, e.g. GET / HTTP/1.1 + Host + empty line):");
    println!("  openssl s_client -connect {listen} -CAfile {d}/ca.pem -cert {d}/alice.pem -key {d}/alice.key -quiet\n");
    println!("bob has a valid certificate but no authorization: refused before any backend is dialed:");
    println!("  curl --cacert {d}/ca.pem --cert {d}/bob.pem --key {d}/bob.key https://{host}/\n");
    println!("metrics:\n  curl http://{admin}/metrics\n");
    println!("Press Ctrl-C to stop.");
    server.run(stop.clone()).await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}
