//! Shutdown: after cancellation (in-process) or SIGTERM (the real binary) the listeners close at
//! once, in-flight transfers finish intact, and the server returns / the process exits 0.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::{
    connect, payload, round_trip, start, strip_ansi, wait_until_refused, within, within_for, TempConfig,
    TestBackend, DEADLINE, TRANSFER_DEADLINE,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A config with one listener `main` -> upstream `pool` -> `backend`, and a drain timeout.
fn config(backend: SocketAddr, drain_timeout: &str) -> String {
    format!(
        r#"
drain_timeout = "{drain_timeout}"

[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
backends = ["{backend}"]
"#
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
    let server = start(&config(echo.addr, "60s")).await;
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
    let server = start(&config(echo.addr, "200ms")).await;

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

/// Reads the child's stderr lines into a channel until it closes.
fn forward_lines(stderr: tokio::process::ChildStderr) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// The `addr=` field of a listener's `listening` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains(" listening ") || !line.contains("listener=main") {
        return None;
    }
    let value = line.split_whitespace().find_map(|f| f.strip_prefix("addr="))?;
    value.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_on_sigterm_and_exits_zero() {
    let echo = TestBackend::echo().await;
    let config = TempConfig::new(&config(echo.addr, "60s"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "--config"])
        .arg(&config.path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn fulcrum run");
    let mut lines = forward_lines(child.stderr.take().expect("piped stderr"));

    let mut seen = Vec::new();
    let addr = within("the `listening` log line", async {
        loop {
            let Some(line) = lines.recv().await else {
                panic!("fulcrum exited before listening; stderr: {seen:#?}");
            };
            if let Some(addr) = listening_addr(&line) {
                return addr;
            }
            seen.push(line);
        }
    })
    .await;

    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"start").await, b"start");

    let pid = child.id().expect("child is running");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid} failed: {kill}");

    wait_until_refused(addr).await;
    assert_refused(addr).await;
    finish_echo_transfer(client, &payload(6, 8 * 1024 * 1024)).await;

    let status = within_for(DEADLINE, "fulcrum to exit after SIGTERM", child.wait())
        .await
        .expect("wait for fulcrum");
    assert!(status.success(), "fulcrum exited with {status}");
    // The shutdown was the graceful one, not the second-signal exit.
    let mut rest = Vec::new();
    while let Some(line) = within("the rest of stderr", lines.recv()).await {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no `stopped` line in stderr: {rest:#?}"
    );
}
