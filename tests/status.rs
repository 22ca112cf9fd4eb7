//! The admin listener's operator views: `/status` (JSON) against what is really open, the status
//! page at `/`, and `/status` during the drain.
//!
//! The raw HTTP GET and the `/status` poll live here; the server, the backends and the waits are
//! the shared harness's (`tests/common`). Everything binds 127.0.0.1 port 0.

use std::net::SocketAddr;

mod common;

use common::{poll_for, refused_addr, within, TestBackend, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One GET over a fresh TCP connection: (status line, headers, body).
async fn get(admin: SocketAddr, path: &str) -> (String, String, String) {
    within(&format!("GET {path}"), async {
        let mut stream = TcpStream::connect(admin).await.expect("connect admin");
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read response");
        let response = String::from_utf8(response).expect("response is UTF-8");
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
    })
    .await
}

async fn status(admin: SocketAddr) -> Value {
    let (line, headers, body) = get(admin, "/status").await;
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(headers.contains("content-type: application/json"), "{headers}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// Polls `/status` until `condition` holds on it, and returns that snapshot.
async fn status_when(admin: SocketAddr, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let shown = poll_for(async || {
        let snapshot = status(admin).await;
        if condition(&snapshot) {
            return Some(snapshot);
        }
        last = snapshot;
        None
    })
    .await;
    shown.unwrap_or_else(|| panic!("/status never showed {what}; last: {last:#}"))
}

/// A connection through the balancer whose echo came back, so it is known to be proxied.
async fn proxied(addr: SocketAddr) -> TcpStream {
    within("an echo through the balancer", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect balancer");
        stream.write_all(b"ping").await.expect("send");
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).await.expect("echo");
        assert_eq!(&reply, b"ping");
        stream
    })
    .await
}

fn config(backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"
drain_timeout = "10s"
[runtime]
workers = 1

[[listener]]
name = "web"
bind = "127.0.0.1:0"
upstream = "web"

[[upstream]]
name = "web"
backends = [{}]
connect_attempts = 1

[admin]
bind = "127.0.0.1:0"
"#,
        list.join(", ")
    )
}

fn backend<'a>(snapshot: &'a Value, address: &SocketAddr) -> &'a Value {
    snapshot["upstreams"][0]["backends"]
        .as_array()
        .expect("backends array")
        .iter()
        .find(|b| b["address"] == address.to_string())
        .unwrap_or_else(|| panic!("no backend {address} in {snapshot:#}"))
}

#[tokio::test]
async fn status_reports_the_connections_held_open_per_backend_with_totals() {
    let echoes = [
        TestBackend::echo().await,
        TestBackend::echo().await,
        TestBackend::echo().await,
    ];
    let backends = echoes.each_ref().map(|b| b.addr);
    let server = TestServer::start(&config(&backends)).await;
    let admin = server.admin.expect("admin listener");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(proxied(server.addr("web")).await);
    }

    let snapshot = status_when(admin, "5 active connections", |s| s["active_connections"] == 5).await;
    assert_eq!(snapshot["generation"], 1);
    assert_eq!(snapshot["draining"], false);
    assert!(snapshot["remaining_connections"].is_null());
    assert!(snapshot["uptime_seconds"].as_u64().is_some());
    let listener = &snapshot["listeners"][0];
    assert_eq!(listener["name"], "web");
    assert_eq!(
        listener["bind"],
        serde_json::json!([server.addr("web").to_string()])
    );
    assert_eq!(listener["upstream"], "web");
    assert_eq!(listener["tls"], false);
    assert_eq!(listener["mtls"], false);
    assert_eq!(listener["accepted"], 5);
    assert!(listener["rejected"]
        .as_object()
        .expect("rejections by reason")
        .values()
        .all(|v| v == 0));
    let upstream = &snapshot["upstreams"][0];
    assert_eq!(upstream["name"], "web");
    assert_eq!(upstream["active"], 5);
    // Least connections over 3 backends: 5 connections are spread 2, 2, 1.
    let mut active: Vec<u64> = backends
        .iter()
        .map(|b| backend(&snapshot, b)["active"].as_u64().expect("active count"))
        .collect();
    active.sort_unstable();
    assert_eq!(active, [1, 2, 2]);
    for b in &backends {
        let b = backend(&snapshot, b);
        assert_eq!(b["health"], "up");
        assert_eq!(b["connections_total"], b["active"]);
        assert_eq!(b["connect_failures_total"], 0);
    }

    // Closing two connections shows up as two fewer active, the totals unchanged.
    held.truncate(3);
    let snapshot = status_when(admin, "3 active connections", |s| s["active_connections"] == 3).await;
    let totals: u64 = backends
        .iter()
        .map(|b| {
            backend(&snapshot, b)["connections_total"]
                .as_u64()
                .expect("total")
        })
        .sum();
    assert_eq!(totals, 5);
    server.cancel();
    drop(held);
    server.stopped().await;
}

#[tokio::test]
async fn status_counts_refused_connections_by_reason_and_connect_failures_per_backend() {
    let dead = refused_addr();
    let server = TestServer::start(&config(&[dead])).await;
    let admin = server.admin.expect("admin listener");
    let mut client = TcpStream::connect(server.addr("web"))
        .await
        .expect("connect balancer");
    let mut rest = Vec::new();
    within("the refused client to be closed", client.read_to_end(&mut rest))
        .await
        .expect("clean close");

    let snapshot = status_when(admin, "one connect_failed refusal", |s| {
        s["listeners"][0]["rejected"]["connect_failed"] == 1
    })
    .await;
    assert_eq!(snapshot["listeners"][0]["rejected"]["rate_limited"], 0);
    assert_eq!(snapshot["listeners"][0]["accepted"], 1);
    let b = backend(&snapshot, &dead);
    assert_eq!(b["connect_failures_total"], 1);
    assert_eq!(b["connections_total"], 0);
    assert_eq!(b["active"], 0);
    server.stopped().await;
}

#[tokio::test]
async fn the_status_page_is_self_contained_html_that_polls_status() {
    let echo = TestBackend::echo().await;
    let backends = [echo.addr];
    let server = TestServer::start(&config(&backends)).await;
    let admin = server.admin.expect("admin listener");
    let (line, headers, body) = get(admin, "/").await;
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/html; charset=utf-8"),
        "{headers}"
    );
    assert!(
        body.starts_with("<!doctype html>"),
        "{}",
        &body[..body.len().min(80)]
    );
    assert!(body.contains("fetch(\"/status\""));
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets"
    );

    let (line, _, _) = get(admin, "/nothing-here").await;
    assert_eq!(line, "HTTP/1.1 404 Not Found");
    server.stopped().await;
}

#[tokio::test]
async fn status_shows_draining_and_the_remaining_connections_while_the_server_drains() {
    let echoes = [TestBackend::echo().await, TestBackend::echo().await];
    let backends = echoes.each_ref().map(|b| b.addr);
    let server = TestServer::start(&config(&backends)).await;
    let admin = server.admin.expect("admin listener");
    let first = proxied(server.addr("web")).await;
    let second = proxied(server.addr("web")).await;
    server.cancel();

    // The admin listener keeps answering during the drain.
    let snapshot = status_when(admin, "draining", |s| s["draining"] == true).await;
    assert_eq!(snapshot["remaining_connections"], 2);
    drop(first);
    let snapshot = status_when(admin, "1 remaining connection", |s| {
        s["remaining_connections"] == 1
    })
    .await;
    assert_eq!(snapshot["draining"], true);
    assert!(!server.has_returned(), "run waits for the last connection");
    drop(second);
    server.stopped().await;
}
