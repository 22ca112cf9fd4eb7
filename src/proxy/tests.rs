use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_propagates() {
    let (mut client, mut client_far) = tokio::io::duplex(64);
    let (mut backend, mut backend_far) = tokio::io::duplex(64);
    let relay_task = tokio::spawn(async move {
        let mut progress = Progress::default();
        let result = relay(
            &mut client_far,
            &mut backend_far,
            &mut progress,
            std::future::pending(),
        )
        .await;
        (result.is_ok(), progress)
    });
    client.write_all(b"hello backend").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    backend.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello backend");
    // The backend still talks after the client's half-close.
    backend.write_all(b"late reply").await.unwrap();
    backend.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"late reply");
    let (ok, progress) = relay_task.await.unwrap();
    assert!(ok);
    assert_eq!(
        progress,
        Progress {
            client_to_backend: 13,
            backend_to_client: 10
        }
    );
}

#[tokio::test]
async fn cancellation_ends_the_relay_and_keeps_the_counts() {
    let (mut client, mut client_far) = tokio::io::duplex(64);
    let (_backend, mut backend_far) = tokio::io::duplex(64);
    client.write_all(b"abc").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut progress = Progress::default();
        let result = relay(&mut client_far, &mut backend_far, &mut progress, async {
            let _ = rx.await;
        })
        .await;
        (result, progress)
    });
    let mut backend = _backend;
    let mut got = [0u8; 3];
    backend.read_exact(&mut got).await.unwrap();
    tx.send(()).unwrap();
    let (result, progress) = task.await.unwrap();
    assert!(matches!(result, Err(RelayError::Cancelled)));
    assert_eq!(progress.client_to_backend, 3);
}

/// A connected pair of loopback TCP sockets.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (far, _) = listener.accept().await.unwrap();
    (near, far)
}

#[tokio::test]
async fn spliced_tcp_relay_moves_a_mebibyte_each_way_with_half_close() {
    let (mut client, mut client_far) = tcp_pair().await;
    let (mut backend, mut backend_far) = tcp_pair().await;
    let relay_task = tokio::spawn(async move {
        let mut progress = Progress::default();
        let result = relay_tcp(
            &mut client_far,
            &mut backend_far,
            &mut progress,
            std::future::pending(),
        )
        .await;
        (result.is_ok(), progress)
    });
    let up: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..1 << 20).map(|i| (i % 241) as u8).collect();
    let (client_result, backend_result) = tokio::join!(
        async {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&up).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, read) = tokio::join!(send, r.read_to_end(&mut got));
            read.map(|_| got)
        },
        async {
            let (mut r, mut w) = backend.split();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            // The backend answers only after the client's half-close reached it.
            w.write_all(&down).await.unwrap();
            w.shutdown().await.unwrap();
            got
        }
    );
    assert_eq!(backend_result, up);
    assert_eq!(client_result.unwrap(), down);
    let (ok, progress) = relay_task.await.unwrap();
    assert!(ok);
    assert_eq!(
        progress,
        Progress {
            client_to_backend: 1 << 20,
            backend_to_client: 1 << 20
        }
    );
}

#[tokio::test]
async fn a_reset_on_one_tcp_side_is_reported_against_that_side() {
    let (client, mut client_far) = tcp_pair().await;
    let (_backend, mut backend_far) = tcp_pair().await;
    socket2::SockRef::from(&client)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(client);
    let mut progress = Progress::default();
    let result = relay_tcp(
        &mut client_far,
        &mut backend_far,
        &mut progress,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(
            result,
            Err(RelayError::Io {
                side: Side::Client,
                ..
            })
        ),
        "{result:?}"
    );
}
