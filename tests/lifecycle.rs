//! Shutdown: after cancellation (in-process) or SIGTERM (the real binary) the listeners close at
//! once, in-flight transfers finish intact, and the server returns / the process exits 0.

mod common;

use std::net::SocketAddr;

use common::process::Fulcrum;
use common::{
    connect, one_pool, payload, read_to_end, round_trip, wait_until_refused, within, within_for, TempDir,
    TestBackend, TestServer, TRANSFER_DEADLINE,
};
use fulcrum::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A config with one listener `main` -> upstream `pool` -> `backend`, and a drain timeout.
fn config(backend: SocketAddr, drain_timeout: &str) -> String {
    // Top-level keys come before the tables.
    format!(
        "drain_timeout = \"{drain_timeout}\"\n{}",
        one_pool(&[backend], "")
    )
}

/// Sends `data`, half-closes, and reads the echo to the end, all at once; checks it is `data`.
async fn finish_echo_transfer(stream: TcpStream, data: &[u8]) {
    let (mut read, mut write) = stream.into_split();
    let send = async {
        write.write_all(data).await?;
        write.shutdown().await
    };
    let mut echoed = Vec::with_capacity(data.len());
    let (sent, received) = within_for(TRANSFER_DEADLINE, "the in-flight transfer", async {
        tokio::join!(send, read.read_to_end(&mut echoed))
    })
    .await;
    sent.expect("the rest of the transfer is sent after shutdown began");
    received.expect("the echo ends cleanly");
    assert!(
        echoed == data,
        "echo differs: {} bytes back, {} sent",
        echoed.len(),
        data.len()
    );
}

/// Connecting is refused, not accepted and not hanging.
async fn assert_refused(addr: SocketAddr) {
    let err = within("connect after shutdown", TcpStream::connect(addr))
        .await
        .expect_err("a new connection after shutdown is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_during_a_transfer_lets_it_finish_and_run_returns() {
    let echo = TestBackend::echo().await;
    let server = TestServer::start(&config(echo.addr, "60s")).await;
    let addr = server.addr("main");

    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"start").await, b"start");

    server.cancel();
    wait_until_refused(addr).await;
    assert_refused(addr).await;

    // The connection opened before shutdown still carries a large transfer, both ways.
    finish_echo_transfer(client, &payload(5, 8 * 1024 * 1024)).await;

    let state = std::sync::Arc::clone(&server.state);
    server.stopped().await;
    assert_eq!(state.total_active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_open_at_the_drain_deadline_are_closed_and_run_returns() {
    let echo = TestBackend::echo().await;
    let server = TestServer::start(&config(echo.addr, "200ms")).await;

    let mut client = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut client, b"idle").await, b"idle");

    // The client never closes: only the drain deadline can end this connection.
    let state = std::sync::Arc::clone(&server.state);
    server.stopped().await;
    assert_eq!(state.total_active(), 0);
    // Ended either way (end of stream or reset), with no stray bytes; a hang fails `within`.
    let mut rest = Vec::new();
    let _ = within(
        "the client to see its connection end",
        client.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty(), "unexpected bytes after the deadline: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_queued_on_the_socket_when_the_drain_starts_are_served_not_reset() {
    let echo = TestBackend::echo().await;
    let config = Config::from_toml(&config(echo.addr, "60s"), "<test>").expect("valid config");
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("bound address");
    // The kernel completes these handshakes and queues them: nothing has accepted them yet.
    let mut queued = Vec::new();
    for n in 0..5u8 {
        let mut client = connect(addr).await;
        within("send", client.write_all(&[n; 100])).await.expect("send");
        within("half-close", client.shutdown()).await.expect("half-close");
        queued.push(client);
    }
    // Shutdown already requested: the accept loop stops before its first accept, as when a
    // drain starts with connections still in the queue (an upgrade via SO_REUSEPORT).
    let server = Server::from_listeners(config, vec![("main".into(), socket)], None).expect("server");
    let server = TestServer::draining(server);

    for (n, mut client) in (0u8..).zip(queued) {
        let echoed = read_to_end(&mut client)
            .await
            .expect("queued connection served, not reset");
        assert_eq!(echoed, [n; 100], "queued connection {n}");
    }
    server.stopped().await;
    assert_eq!(echo.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_on_sigterm_and_exits_zero() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("sigterm");
    let config = dir.write("fulcrum.toml", &config(echo.addr, "60s"));
    let mut fulcrum = Fulcrum::run(&config);
    let addr = fulcrum.listening("main").await;

    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"start").await, b"start");

    fulcrum.signal("TERM");
    wait_until_refused(addr).await;
    assert_refused(addr).await;
    finish_echo_transfer(client, &payload(6, 8 * 1024 * 1024)).await;

    let (status, rest) = fulcrum.exit().await;
    assert!(status.success(), "fulcrum exited with {status}");
    // The shutdown was the graceful one, not the second-signal exit.
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no `stopped` line in stderr: {rest:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_stops_on_sigterm_after_the_reader_of_its_stderr_is_gone() {
    let echo = TestBackend::echo().await;
    // No `listening` line can be read here: bind a known free port instead of port 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let text = config(echo.addr, "60s").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = TempDir::new("sigterm-no-reader");
    let config = dir.write("fulcrum.toml", &text);
    let mut child = common::process::async_command(&[])
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fulcrum run");
    drop(child.stderr.take()); // every log line from now on fails with EPIPE
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut client = within("fulcrum to listen", async {
        loop {
            if let Ok(stream) = TcpStream::connect(addr).await {
                return stream;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        round_trip(&mut client, b"logged nowhere").await,
        b"logged nowhere"
    );
    drop(client);

    let pid = child.id().expect("fulcrum is running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid} failed: {kill}");
    let status = within("fulcrum to exit after SIGTERM", child.wait())
        .await
        .expect("wait for fulcrum");
    assert_eq!(status.code(), Some(0), "fulcrum exited with {status}");
}
