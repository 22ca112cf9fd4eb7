//! `sink` and `echo`: backends for the bulk, handshake and hold scenarios. One process serves
//! every `--listen` address; with `--cert` it terminates mTLS itself (the `direct` target).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Clone, Copy)]
pub enum Mode {
    Sink,
    Echo,
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Server certificate (PEM): terminate mTLS (needs --key and --client-ca).
    #[arg(long, requires_all = ["key", "client_ca"])]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA that client certificates must chain to.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Exit after this many seconds even without a signal.
    #[arg(long, default_value_t = 3600.0)]
    max_time: f64,
}

pub async fn run(args: ServerArgs, mode: Mode) -> anyhow::Result<()> {
    let acceptor = match (&args.cert, &args.key, &args.client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsAcceptor::from(crate::tls::server(cert, key, ca)?)),
        _ => None,
    };
    for addr in &args.listen {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket
            .bind(*addr)
            .with_context(|| format!("cannot bind {addr}"))?;
        let listener = socket.listen(4096)?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let _ = serve(stream, acceptor, mode).await;
                        });
                    }
                    // Out of fds or memory: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    println!("listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(crate::secs(args.max_time)) => {}
    }
    Ok(())
}

async fn serve(stream: TcpStream, acceptor: Option<TlsAcceptor>, mode: Mode) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    match acceptor {
        None => relay(stream, mode).await,
        Some(acceptor) => {
            let accept = acceptor.accept(stream);
            let tls = tokio::time::timeout(Duration::from_secs(10), accept)
                .await
                .map_err(|_| std::io::Error::other("handshake timeout"))??;
            relay(tls, mode).await
        }
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, mode: Mode) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        if let Mode::Echo = mode {
            stream.write_all(&buf[..n]).await?;
        }
    }
}
