//! The admin side: the HTTP listener serving `/` (the status page), `/status` (JSON),
//! `/metrics` (Prometheus text), `/healthz` and `POST /reload`, and the two read-only views of the
//! live state it serves: [`status`] (the snapshot and the page) and [`prometheus`] (the metrics
//! text).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, a bounded request head
//! (8 KiB) read under a deadline, `Connection: close` on every answer. It reads the current
//! generation's state per request; its only write is asking the server to reload, which the run
//! loop applies. It never runs on a client connection's path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::reload::Handle;

pub mod prometheus;
pub mod status;

const MAX_HEAD: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Serves admin requests until `stop` is cancelled.
pub(crate) async fn serve(socket: TcpListener, handle: Handle, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tracker.spawn(async move {
                    if tokio::time::timeout(REQUEST_DEADLINE, answer(stream, &handle))
                        .await
                        .is_err()
                    {
                        debug!("admin request timed out");
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                // Back off so a full descriptor table cannot make this loop spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn answer(mut stream: TcpStream, handle: &Handle) {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus::render(&handle.state()),
        ),
        ("POST", "/reload") => match handle.reload().await {
            Ok(generation) => (
                "200 OK",
                "application/json",
                format!("{{\"result\":\"ok\",\"generation\":{generation}}}\n"),
            ),
            Err(e) => (
                "422 Unprocessable Entity",
                "application/json",
                format!(
                    "{{\"result\":\"error\",\"error\":{}}}\n",
                    json_string(&e.to_string())
                ),
            ),
        },
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/status") => (
            "200 OK",
            "application/json",
            status::render(&handle.state(), std::time::Instant::now()),
        ),
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", status::PAGE.to_string()),
        (_, "/" | "/status" | "/metrics" | "/healthz" | "/reload") => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    let _ = respond(&mut stream, status, kind, &body).await;
}

/// A JSON string literal for `text`.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
