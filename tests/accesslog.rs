//! The access log end to end: a proxied and a refused connection each leave one JSON line in the
//! configured file, written out by the time `Server::run` returns.
//!
//! Everything binds 127.0.0.1 port 0; the log goes into a [`TempDir`].

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

mod common;

use common::{within, TempDir, TestBackend, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn proxied_and_refused_connections_are_each_one_json_line_flushed_by_shutdown() {
    let dir = TempDir::new("access");
    let log = dir.path().join("access.jsonl");
    let echo = TestBackend::echo().await;
    let backend = echo.addr;
    let toml = format!(
        r#"
[[listener]]
name = "web"
bind = "127.0.0.1:0"
upstream = "web"

[[listener]]
name = "limited"
bind = "127.0.0.1:0"
upstream = "web"
[listener.rate_limit]
capacity = 1
window = "1h"

[[upstream]]
name = "web"
backends = ["{backend}"]

[access_log]
path = "{}"
"#,
        log.display()
    );
    let server = TestServer::start(&toml).await;
    let web = server.addr("web");
    let limited = server.addr("limited");

    // One proxied connection: 5 bytes up, 5 echoed down, then a clean close.
    let mut client = within("connect web", TcpStream::connect(web))
        .await
        .expect("connect");
    let client_addr = client.local_addr().expect("client address");
    within("an echo", async {
        client.write_all(b"hello").await.expect("send");
        client.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("echo");
        assert_eq!(reply, b"hello");
    })
    .await;

    // The limited listener admits one connection per hour: the second is refused.
    let mut first = within("connect limited", TcpStream::connect(limited))
        .await
        .expect("connect");
    within("an echo on the admitted connection", async {
        first.write_all(b"x").await.expect("send");
        let mut reply = [0u8; 1];
        first.read_exact(&mut reply).await.expect("echo");
    })
    .await;
    let mut second = within("connect limited", TcpStream::connect(limited))
        .await
        .expect("connect");
    let refused_addr = second.local_addr().expect("client address");
    let mut rest = Vec::new();
    let _ = within("the refused client to be closed", second.read_to_end(&mut rest)).await;
    drop(first);

    server.stopped().await;

    let text = std::fs::read_to_string(&log).expect("access log file exists");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let line_of = |client: SocketAddr| {
        lines
            .iter()
            .find(|l| l["client"] == client.to_string())
            .unwrap_or_else(|| panic!("no line for {client} in {text}"))
    };

    let proxied = line_of(client_addr);
    assert_eq!(proxied["listener"], "web");
    assert_eq!(proxied["upstream"], "web");
    assert_eq!(proxied["backend"], backend.to_string());
    assert!(proxied["identity"].is_null());
    assert_eq!(proxied["bytes_up"], 5);
    assert_eq!(proxied["bytes_down"], 5);
    assert_eq!(proxied["outcome"], "closed");
    assert!(proxied["reason"].is_null());
    assert!(proxied["duration_ms"].as_u64().is_some());
    let time = proxied["time"].as_str().expect("time is a string");
    let parsed = humantime::parse_rfc3339(time).expect("time is RFC 3339");
    let age = SystemTime::now()
        .duration_since(parsed)
        .expect("time is in the past");
    assert!(age < Duration::from_secs(60), "{time}");
    assert!(time.ends_with('Z'), "UTC: {time}");

    let refused = line_of(refused_addr);
    assert_eq!(refused["listener"], "limited");
    assert_eq!(refused["outcome"], "refused");
    assert_eq!(refused["reason"], "rate_limited");
    assert!(refused["backend"].is_null());
    assert_eq!(refused["bytes_up"], 0);
}

#[tokio::test]
async fn an_access_log_path_that_cannot_be_opened_stops_the_server_at_startup() {
    let toml = r#"
[[listener]]
name = "web"
bind = "127.0.0.1:0"
upstream = "web"

[[upstream]]
name = "web"
backends = ["127.0.0.1:9"]

[access_log]
path = "/nonexistent-directory-for-fulcrum-tests/access.jsonl"
"#;
    let error = match TestServer::try_start(toml).await {
        Ok(_) => panic!("the server started with an unopenable access log"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("access log") && error.contains("nonexistent-directory"),
        "{error}"
    );
}
