//! A stream's end tells the truth, over real sockets: a stream fulcrum cuts while bytes are in
//! flight ends with a reset on both legs, never a clean FIN; a stream cut with nothing in flight
//! ends with a FIN; a peer's reset reaches the other peer as a reset, plain or TLS; and a reset
//! that comes after both FINs is logged as such, the bytes the peer refused not counted.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use common::tls::{connect_tls, Pki};
use common::{
    access_log, connect, reset, toml_path, wait_for_outcomes, within, Behavior, TempDir, TestBackend,
    TestServer,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Listener `main` in front of `backend`, with `listener_keys` and an access log in `dir`.
fn config(dir: &TempDir, backend: SocketAddr, listener_keys: &str) -> String {
    format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n{listener_keys}\n\
         [[upstream]]\nname = \"pool\"\nbackends = [\"{backend}\"]\n\n[access_log]\npath = {}\n",
        toml_path(&log(dir))
    )
}

fn log(dir: &TempDir) -> PathBuf {
    dir.path().join("access.log")
}

/// Reads `stream` until it ends: the bytes read and how it ended.
async fn drain<S: AsyncRead + Unpin>(stream: &mut S) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match within("the stream to end", stream.read(&mut buf)).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Err(e)),
        }
    }
}

/// An mTLS listener `tls` (with `listener_keys`) in front of `backend`, and alice's TLS stream
/// through it, handshake done.
async fn alice_through_mtls(
    backend: SocketAddr,
    listener_keys: &str,
) -> (TestServer, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let pki = Pki::new(&[]);
    let authorized = "[authorization]\nalice = [\"web\"]\n";
    let text = pki.one_pool_config(&pki.ca_file, "1.2", listener_keys, &[backend], authorized);
    let lb = TestServer::start(&text).await;
    let alice = pki.client_config(Some(&pki.client("alice")));
    let tls = connect_tls(lb.addr("tls"), &alice, "localhost")
        .await
        .expect("handshake");
    (lb, tls)
}

/// One connection through listener `main` (with `listener_keys`) to a backend the test holds:
/// the access log's directory, the server, the client's stream and the backend's.
async fn through(label: &str, listener_keys: &str) -> (TempDir, TestServer, TcpStream, TcpStream) {
    let dir = TempDir::new(label);
    let backends = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let lb = TestServer::start(&config(&dir, backends.local_addr().expect("addr"), listener_keys)).await;
    let client = connect(lb.addr("main")).await;
    let (backend, _) = within("fulcrum's dial", backends.accept()).await.expect("accept");
    (dir, lb, client, backend)
}

/// The one access log entry whose outcome is `outcome`, once written.
async fn entry(dir: &TempDir, outcome: &str) -> serde_json::Value {
    wait_for_outcomes(&log(dir), outcome, 1).await;
    access_log(&log(dir))
        .into_iter()
        .find(|e| e["outcome"] == outcome)
        .expect("the entry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_reading_is_cut_at_idle_timeout_with_a_reset_and_fewer_bytes_than_were_sent() {
    let (dir, _lb, client, mut backend) = through("stalled", "idle_timeout = \"1s\"").await;
    // The backend reads nothing while the client writes until fulcrum cuts the connection.
    let (_, mut write) = client.into_split();
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < 1 << 30 {
        match within("a write, or the cut", write.write(&chunk)).await {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    let (received, end) = drain(&mut backend).await;
    assert!(received < sent, "received {received} of {sent} bytes");
    let e = end.expect_err("the backend's stream ended with a FIN, as if complete");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    let logged = entry(&dir, "idle_timeout").await;
    assert_eq!(logged["aborted"], true, "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_with_nothing_in_flight_ends_with_a_fin_on_both_sides() {
    let (dir, _lb, mut client, mut backend) = through("idle", "idle_timeout = \"1s\"").await;
    client.write_all(b"hello").await.expect("write");
    let mut got = [0u8; 5];
    within("the bytes", backend.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(
        drain(&mut backend).await.1.ok(),
        Some(()),
        "the backend saw a reset"
    );
    assert_eq!(
        drain(&mut client).await.1.ok(),
        Some(()),
        "the client saw a reset"
    );
    let logged = entry(&dir, "idle_timeout").await;
    assert_eq!(logged["aborted"], false, "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_reset_reaches_a_plain_client_and_a_tls_client_as_an_abrupt_end() {
    let backend = TestBackend::start(Behavior::ResetAfterFirstRead).await;
    let dir = TempDir::new("backend-reset");
    let lb = TestServer::start(&config(&dir, backend.addr, "")).await;
    let mut client = connect(lb.addr("main")).await;
    client.write_all(b"hello").await.expect("write");
    let (_, end) = drain(&mut client).await;
    assert_eq!(
        end.expect_err("a clean end").kind(),
        io::ErrorKind::ConnectionReset
    );

    let (_lb, mut tls) = alice_through_mtls(backend.addr, "").await;
    tls.write_all(b"hello").await.expect("write");
    let (_, end) = drain(&mut tls).await;
    // No close_notify and no FIN: rustls reports the abrupt end as an error, never as Ok(0).
    assert!(end.is_err(), "the TLS client saw a clean end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_reset_reaches_the_backend_as_a_reset() {
    let (dir, _lb, mut client, mut backend) = through("client-reset", "").await;
    client.write_all(b"hello").await.expect("write");
    let mut got = [0u8; 5];
    within("the bytes", backend.read_exact(&mut got))
        .await
        .expect("read");
    reset(client);
    let (_, end) = drain(&mut backend).await;
    assert_eq!(
        end.expect_err("a clean end").kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(entry(&dir, "client_reset").await["aborted"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_and_resets_on_late_bytes_is_logged_as_a_reset_without_counting_them() {
    let (dir, lb, mut client, mut backend) = through("late", "").await;
    within("the answer", backend.write_all(b"answer"))
        .await
        .expect("write");
    // Closed both ways: bytes that arrive now are answered with a reset.
    drop(backend);
    let (answer, end) = drain(&mut client).await;
    assert_eq!((answer, end.ok()), (6, Some(())));
    let late = [b'x'; 39];
    client.write_all(&late).await.expect("write the late bytes");
    let _ = client.shutdown().await;
    let logged = entry(&dir, "backend_reset").await;
    assert_eq!(logged["bytes_up"], 0, "the refused bytes were counted: {logged}");
    assert_eq!(logged["bytes_down"], 6, "{logged}");
    let metrics = fulcrum::admin::prometheus::render(&lb.current());
    assert!(
        metrics.contains("fulcrum_bytes_total{listener=\"main\",direction=\"up\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_half_closed_backend_still_reads_are_counted_as_delivered() {
    let backend = TestBackend::echo().await;
    let dir = TempDir::new("half");
    let lb = TestServer::start(&config(&dir, backend.addr, "")).await;
    let mut client = connect(lb.addr("main")).await;
    client.write_all(b"ping").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let (echoed, end) = drain(&mut client).await;
    assert_eq!((echoed, end.ok()), (4, Some(())));
    let logged = entry(&dir, "closed").await;
    assert_eq!(
        (logged["bytes_up"].as_u64(), logged["aborted"].as_bool()),
        (Some(4), Some(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_cut_at_idle_timeout_with_nothing_in_flight_gets_close_notify_not_an_abrupt_end() {
    let backend = TestBackend::echo().await;
    let (_lb, mut tls) = alice_through_mtls(backend.addr, "idle_timeout = \"1s\"").await;
    tls.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 4];
    within("the echo", tls.read_exact(&mut got)).await.expect("echo");
    let (_, end) = drain(&mut tls).await;
    assert!(end.is_ok(), "an abrupt end: {end:?}");
}
