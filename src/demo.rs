//! `fulcrum demo`: three demo backends and a balancer on localhost, for a newcomer's first minute.
//!
//! It builds its config as TOML text and loads it through [`Config::from_toml`], so the demo runs
//! exactly the code path a real deployment does. It prints what to run to try it and stops when
//! its token is cancelled. It must never bind anything but loopback.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{self, Mode};
use crate::config::{Config, ConfigError};
use crate::server::{Server, ServerError};

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
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} (is another program using the port? pick one with --listen/--admin)")]
    Server(#[from] ServerError),
}

/// Runs the demo until `stop` is cancelled.
pub async fn run(options: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    let tracker = TaskTracker::new();
    let mut backends = Vec::new();
    for n in 1..=3 {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Backend)?;
        let addr = socket.local_addr().map_err(DemoError::Backend)?;
        backends.push(format!("\"{addr}\""));
        tracker.spawn(backend::serve(
            socket,
            n.to_string(),
            Mode::Hello,
            stop.clone(),
        ));
    }
    let toml = format!(
        "[[listener]]\nname = \"demo\"\nbind = \"{listen}\"\nupstream = \"demo\"\n\n\
         [[upstream]]\nname = \"demo\"\nbackends = [{backends}]\nconnect_timeout = \"1s\"\n\n\
         [admin]\nbind = \"{admin}\"\n",
        listen = options.listen,
        admin = options.admin,
        backends = backends.join(", "),
    );
    let config = Config::from_toml(&toml, "<demo>")?;
    let server = Server::bind(config).await?;
    let listen = server.local_addr("demo").unwrap_or(options.listen);
    let admin = server.admin_addr().unwrap_or(options.admin);
    println!(
        "fulcrum demo: 3 backends ({}) behind {listen}",
        backends.join(", ").replace('"', "")
    );
    println!();
    println!("Try it (run it a few times to see the backends take turns):");
    println!("  curl http://{listen}/");
    println!("Metrics:");
    println!("  curl http://{admin}/metrics");
    println!();
    println!("Config used:\n{toml}");
    println!("Press Ctrl-C to stop.");
    server.run(stop.clone()).await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}
