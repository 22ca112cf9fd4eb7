//! What the relay does to bytes and endings: large transfers both ways at once arrive intact,
//! half-close travels in either direction, a backend may speak first, and a reset on one side
//! reaches the other side as a reset, never as a clean end of stream.

mod common;

use std::io;

use common::{
    connect, one_pool, payload, reset, round_trip, sha256, within, within_for, TestBackend, TestServer,
    TRANSFER_DEADLINE,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const SIZE: usize = 32 * 1024 * 1024;

/// A balancer in front of a backend socket the test accepts from itself.
async fn balancer_and_raw_backend() -> (TestServer, TcpListener) {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = backend.local_addr().expect("backend address");
    (TestServer::start(&one_pool(&[addr], "")).await, backend)
}

/// Opens a client connection through the balancer and accepts its backend side.
async fn proxied_pair(server: &TestServer, backend: &TcpListener) -> (TcpStream, TcpStream) {
    let client = connect(server.addr("main")).await;
    let (backend_side, _) = within("backend accept", backend.accept()).await.expect("accept");
    (client, backend_side)
}

/// Reads until end of stream, hashing as it goes: (bytes read, SHA-256).
async fn receive(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<(usize, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        total += n;
    }
}

/// `early` sends all of `early_data` and half-closes; meanwhile `late` sends half of
/// `late_data`, waits until it has read `early`'s end of stream, then sends the rest (so bytes
/// flow after the half-close) and closes. Both sides read everything; the digests must match.
async fn exchange(early: TcpStream, late: TcpStream, early_data: &[u8], late_data: &[u8]) {
    let (mut early_read, mut early_write) = early.into_split();
    let (mut late_read, mut late_write) = late.into_split();
    let (eof_tx, eof_rx) = oneshot::channel::<()>();

    let early_send = async {
        early_write.write_all(early_data).await?;
        early_write.shutdown().await
    };
    let late_receive = async {
        let received = receive(&mut late_read).await;
        let _ = eof_tx.send(());
        received
    };
    let late_send = async {
        let (first, second) = late_data.split_at(late_data.len() / 2);
        late_write.write_all(first).await?;
        eof_rx
            .await
            .expect("the late side saw the early side's end of stream");
        late_write.write_all(second).await?;
        late_write.shutdown().await
    };
    let early_receive = receive(&mut early_read);

    let (early_sent, late_received, late_sent, early_received) =
        within_for(TRANSFER_DEADLINE, "both transfers to finish", async {
            tokio::join!(early_send, late_receive, late_send, early_receive)
        })
        .await;
    early_sent.expect("early side sends and half-closes");
    late_sent.expect("late side keeps sending after the half-close");
    let late_received = late_received.expect("late side reads to a clean end of stream");
    let early_received = early_received.expect("early side reads to a clean end of stream");
    assert_eq!(late_received, (early_data.len(), sha256(early_data)));
    assert_eq!(early_received, (late_data.len(), sha256(late_data)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_arrive_intact_when_the_client_half_closes_first() {
    let (server, backend) = balancer_and_raw_backend().await;
    let (client, backend_side) = proxied_pair(&server, &backend).await;
    let up = payload(1, SIZE);
    let down = payload(2, SIZE);

    exchange(client, backend_side, &up, &down).await;

    server.wait_idle().await;
    let upstream = server.state.upstream("pool").expect("upstream pool");
    assert_eq!(upstream.backends[0].connections.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_arrive_intact_when_the_backend_half_closes_first() {
    let (server, backend) = balancer_and_raw_backend().await;
    let (client, backend_side) = proxied_pair(&server, &backend).await;
    let up = payload(3, SIZE);
    let down = payload(4, SIZE);

    exchange(backend_side, client, &down, &up).await;

    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_speaks_first_reaches_a_silent_client() {
    let backend = TestBackend::banner(b"220 fulcrum-test ready\r\n").await;
    let server = TestServer::start(&one_pool(&[backend.addr], "")).await;

    let mut client = connect(server.addr("main")).await;
    let mut banner = [0u8; 24];
    within("banner before the client sends", client.read_exact(&mut banner))
        .await
        .expect("read banner");
    assert_eq!(&banner, b"220 fulcrum-test ready\r\n");
    // The connection still works both ways after the banner.
    assert_eq!(round_trip(&mut client, b"EHLO").await, b"EHLO");
    common::close(client).await;
    server.wait_idle().await;
}

/// Reads until an error or end of stream; returns the error, panicking on a clean end.
async fn expect_reset(stream: &mut TcpStream, who: &str) {
    let mut buf = [0u8; 4096];
    // Bounded: the peer sends a few bytes at most before resetting.
    for _ in 0..1024 {
        match within("a reset", stream.read(&mut buf)).await {
            Ok(0) => panic!("{who} saw a clean end of stream, expected a reset"),
            Ok(_) => continue,
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset,
                    "{who} saw {e}, expected a reset"
                );
                return;
            }
        }
    }
    panic!("{who} kept receiving data, expected a reset");
}

/// Mid-stream: a request from the client reaches the backend, a partial answer comes back.
async fn exchange_both_ways(client: &mut TcpStream, backend_side: &mut TcpStream) {
    within("client write", client.write_all(b"request"))
        .await
        .expect("write");
    let mut request = [0u8; 7];
    within("backend read", backend_side.read_exact(&mut request))
        .await
        .expect("read");
    within("backend write", backend_side.write_all(b"partial"))
        .await
        .expect("write");
    let mut partial = [0u8; 7];
    within("client read", client.read_exact(&mut partial))
        .await
        .expect("read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_stream_reaches_the_backend_as_a_reset() {
    let (server, backend) = balancer_and_raw_backend().await;
    let (mut client, mut backend_side) = proxied_pair(&server, &backend).await;

    exchange_both_ways(&mut client, &mut backend_side).await;

    reset(client);

    expect_reset(&mut backend_side, "the backend").await;
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_mid_stream_reaches_the_client_as_a_reset() {
    let (server, backend) = balancer_and_raw_backend().await;
    let (mut client, mut backend_side) = proxied_pair(&server, &backend).await;

    exchange_both_ways(&mut client, &mut backend_side).await;

    reset(backend_side);

    expect_reset(&mut client, "the client").await;
    server.wait_idle().await;
}
