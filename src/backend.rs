//! The demo backend behind `fulcrum backend`: a tiny HTTP/1.1 server answering every request with
//! `Hello world from server N` (keep-alive), or a byte echo with `--echo`. A connection that
//! starts with a PROXY protocol header (an upstream with `proxy_protocol`) has it consumed, and the
//! greeting adds the client address and identity it announced.
//!
//! It exists so a newcomer can see which backend served them, and so tests have a real peer. It
//! is not a general HTTP server: it reads request heads up to 16 KiB, skips `Content-Length`
//! bodies, and closes idle connections after a minute. It never touches the balancer's state.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

const MAX_HEAD: usize = 16 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new connection may take to show whether it starts with a PROXY header.
const PROXY_HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// What the demo backend does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer HTTP requests with the greeting.
    Hello,
    /// Send every byte back; half-close when the client does.
    Echo,
}

/// Serves connections on `socket` until `stop` is cancelled.
pub async fn serve(socket: TcpListener, name: String, mode: Mode, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    let greeting: std::sync::Arc<str> = format!("Hello world from server {name}\n").into();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let greeting = std::sync::Arc::clone(&greeting);
                let stop = stop.clone();
                tracker.spawn(async move {
                    let served = async {
                        // A balancer in front may announce the real client with a PROXY header.
                        let via = crate::proxy_protocol::reader::read_header(&mut stream, tokio::time::Instant::now() + PROXY_HEADER_DEADLINE)
                            .await
                            .ok();
                        let (mut read, mut write) = stream.into_split();
                        match mode {
                            Mode::Hello => {
                                let greeting = match via.as_ref().and_then(|h| h.source.map(|s| (s, h))) {
                                    Some((source, header)) => {
                                        let identity = header.ssl.as_ref().and_then(|s| s.cn.as_deref());
                                        format!(
                                            "{greeting}via PROXY protocol: client {source}{}\n",
                                            identity.map(|id| format!(", identity {id}")).unwrap_or_default()
                                        )
                                    }
                                    None => greeting.to_string(),
                                };
                                hello(&mut read, &mut write, &greeting).await
                            }
                            Mode::Echo => echo(&mut read, &mut write).await,
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        result = served => if let Err(e) = result { debug!(error = %e, "demo backend connection ended") },
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "demo backend accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn echo<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: &mut R,
    write: &mut W,
) -> std::io::Result<()> {
    tokio::io::copy(read, write).await?;
    write.shutdown().await
}

async fn hello<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: &mut R,
    write: &mut W,
    greeting: &str,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Read one request head.
        let end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if buf.len() > MAX_HEAD {
                write.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                return write.shutdown().await;
            }
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout(IDLE_TIMEOUT, read.read(&mut chunk)).await {
                Ok(n) => n?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return write.shutdown().await;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let http10 = head.lines().next().is_some_and(|l| l.ends_with("http/1.0"));
        let close = head.contains("\r\nconnection: close")
            || (http10 && !head.contains("\r\nconnection: keep-alive"));
        let body_len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        buf.drain(..end);
        // Skip the request body.
        let mut remaining = body_len;
        let buffered = remaining.min(buf.len());
        buf.drain(..buffered);
        remaining -= buffered;
        while remaining > 0 {
            let mut chunk = [0u8; 4096];
            let want = remaining.min(chunk.len());
            let n = read.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            remaining -= n;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{greeting}",
            greeting.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        write.write_all(response.as_bytes()).await?;
        if close {
            return write.shutdown().await;
        }
    }
}
