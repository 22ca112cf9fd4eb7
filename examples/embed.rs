//! Runs fulcrum inside your own program: build a config in code, hand it a listener you bound
//! yourself, and stop it with your own shutdown signal.
//!
//! `cargo run --example embed` starts an echo backend, a balancer in front of it, sends one
//! message through, and shuts down.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stop = fulcrum::CancellationToken::new();

    // A backend to balance to: fulcrum's demo backend in echo mode.
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(fulcrum::backend::serve(
        backend,
        "1".into(),
        fulcrum::backend::Mode::Echo,
        stop.clone(),
    ));

    // The config: the listener's `bind` is ignored because we pass our own socket below.
    let config = fulcrum::Config::from_toml(
        &format!(
            "[[listener]]\nname = \"app\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n\
             [[upstream]]\nname = \"app\"\nbackends = [\"{backend_addr}\"]\n"
        ),
        "<embedded>",
    )?;
    let socket = TcpListener::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let server = fulcrum::Server::from_listeners(config, vec![("app".into(), socket)], None)?;
    let running = tokio::spawn(server.run(stop.clone()));

    let mut client = TcpStream::connect(addr).await?;
    client.write_all(b"hello through fulcrum").await?;
    client.shutdown().await?;
    let mut reply = String::new();
    client.read_to_string(&mut reply).await?;
    println!("echoed: {reply}");

    stop.cancel();
    running.await?;
    Ok(())
}
