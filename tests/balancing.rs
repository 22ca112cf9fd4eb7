//! Which backend gets a connection, and that every path gives its count back: least connections
//! with round-robin ties, failover past dead backends, and rejection when none answers.

mod common;

use common::{
    close, connect, one_pool, read_to_end, refused_addr, refused_addrs, reset, round_trip, within, BlackHole,
    TestBackend, TestServer,
};
use fulcrum::metrics::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads the one-byte banner a `TestBackend::banner` backend sends first.
async fn banner_of(stream: &mut TcpStream) -> u8 {
    let mut banner = [0u8; 1];
    within("backend banner", stream.read_exact(&mut banner))
        .await
        .expect("read banner");
    banner[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_of_three_spreads_sequential_connections_evenly() {
    let backends = [
        TestBackend::echo().await,
        TestBackend::echo().await,
        TestBackend::echo().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let server = TestServer::start(&one_pool(&addrs, "")).await;

    for i in 0..30u8 {
        let mut stream = connect(server.addr("main")).await;
        assert_eq!(round_trip(&mut stream, &[i]).await, [i]);
        close(stream).await;
        // The pool is idle again before the next connection: every pick is a three-way tie.
        server.wait_idle().await;
    }

    let accepted: Vec<usize> = backends.iter().map(|b| b.accepted()).collect();
    assert_eq!(accepted, [10, 10, 10]);
    let upstream = server.state.upstream("pool").expect("upstream pool");
    let proxied: Vec<u64> = upstream.backends.iter().map(|b| b.connections.get()).collect();
    assert_eq!(proxied, [10, 10, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_go_to_the_backend_with_fewer_active_connections() {
    let a = TestBackend::banner(b"A").await;
    let b = TestBackend::banner(b"B").await;
    let server = TestServer::start(&one_pool(&[a.addr, b.addr], "")).await;

    // Ten held connections: whatever the tie order, least connections puts five on each.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..10 {
        let mut stream = connect(server.addr("main")).await;
        match banner_of(&mut stream).await {
            b'A' => on_a.push(stream),
            b'B' => on_b.push(stream),
            other => panic!("unexpected banner {other}"),
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (5, 5));
    assert_eq!(server.active("pool"), [5, 5]);

    for stream in on_b {
        close(stream).await;
    }
    common::wait_until("B's active count to drop to 0", || {
        server.active("pool") == [5, 0]
    })
    .await;

    // A holds 5, B at most 1 at any time: every short connection goes to B.
    for i in 0..10 {
        let mut stream = connect(server.addr("main")).await;
        assert_eq!(
            banner_of(&mut stream).await,
            b'B',
            "short connection {i} went to A"
        );
        close(stream).await;
        common::wait_until("B's active count to return to 0", || {
            server.active("pool") == [5, 0]
        })
        .await;
    }
    assert_eq!((a.accepted(), b.accepted()), (5, 15));
    drop(on_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_return_to_zero_after_resets_refusals_and_timeouts() {
    let refused = refused_addr();
    let black_hole = BlackHole::start().await;
    let echo = TestBackend::echo().await;
    let resetting = TestBackend::start(common::Behavior::ResetAfterFirstRead).await;
    // The first connection on an idle pool tries the backends in configured order, so it meets
    // the refusal and the connect timeout before it reaches a live backend.
    let server = TestServer::start(&one_pool(
        &[refused, black_hole.addr, echo.addr, resetting.addr],
        "connect_timeout = \"300ms\"\nconnect_attempts = 4",
    ))
    .await;
    let addr = server.addr("main");

    // A mix of endings, all at once: normal closes, client resets, and whatever the backend does
    // (the resetting backend resets them).
    let mut clients = Vec::new();
    for i in 0..24u8 {
        clients.push(tokio::spawn(async move {
            let mut stream = connect(addr).await;
            let message = [b'm', i];
            let _ = within("write", stream.write_all(&message)).await;
            let mut reply = [0u8; 2];
            let read = within("reply or reset", stream.read_exact(&mut reply)).await;
            let echoed = read.is_ok() && reply == message;
            if i % 2 == 0 {
                reset(stream);
            } else {
                // A clean close, or the end of a connection the backend reset: either way, done.
                let _ = within("shutdown", stream.shutdown()).await;
                let _ = read_to_end(&mut stream).await;
            }
            echoed
        }));
    }
    let mut echoed = 0;
    for client in clients {
        if within("client task", client).await.expect("client task") {
            echoed += 1;
        }
    }

    server.wait_idle().await;
    assert_eq!(server.active("pool"), [0, 0, 0, 0]);
    assert_eq!(server.state.total_active(), 0);

    let upstream = server.state.upstream("pool").expect("upstream pool");
    let listener = server.state.listener("main").expect("listener main");
    assert_eq!(listener.accepted.get(), 24);
    assert!(upstream.backends[0].connect_failures.get() >= 1, "no refusal");
    assert!(upstream.backends[1].connect_failures.get() >= 1, "no timeout");
    assert!(echo.accepted() >= 1 && echoed >= 1, "no echoed connection");
    assert!(resetting.accepted() >= 1, "no backend reset");
    // Every client reached a live backend: the echo or the resetting one.
    assert_eq!(echo.accepted() + resetting.accepted(), 24);
    assert_eq!(listener.rejected.get(Reason::ConnectFailed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_served_past_a_refused_backend_and_the_refusal_is_counted() {
    let refused = refused_addr();
    let echo = TestBackend::echo().await;
    let server = TestServer::start(&one_pool(&[refused, echo.addr], "")).await;

    // On an idle pool the first pick is the first configured backend: the refused one.
    let mut stream = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut stream, b"hello").await, b"hello");
    close(stream).await;

    let upstream = server.state.upstream("pool").expect("upstream pool");
    assert_eq!(upstream.backends[0].connect_failures.get(), 1);
    assert_eq!(upstream.backends[0].connections.get(), 0);
    assert_eq!(upstream.backends[1].connect_failures.get(), 0);
    assert_eq!(upstream.backends[1].connections.get(), 1);
    assert_eq!(echo.accepted(), 1);
    let listener = server.state.listener("main").expect("listener main");
    assert_eq!(listener.rejected.get(Reason::ConnectFailed), 0);
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_refuses_the_client_is_closed_without_data() {
    let server = TestServer::start(&one_pool(&refused_addrs(2), "")).await;

    let mut stream = connect(server.addr("main")).await;
    let received = read_to_end(&mut stream)
        .await
        .expect("a clean end of stream, not a reset");
    assert!(received.is_empty(), "client got data: {received:?}");

    let listener = server.state.listener("main").expect("listener main");
    assert_eq!(listener.accepted.get(), 1);
    assert_eq!(listener.rejected.get(Reason::ConnectFailed), 1);
    assert_eq!(listener.rejected.get(Reason::NoHealthyBackend), 0);
    let upstream = server.state.upstream("pool").expect("upstream pool");
    let failures: Vec<u64> = upstream
        .backends
        .iter()
        .map(|b| b.connect_failures.get())
        .collect();
    assert_eq!(failures, [1, 1]);
    server.wait_idle().await;
}
