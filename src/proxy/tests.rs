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
            Timeouts::default(),
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
        let result = relay(
            &mut client_far,
            &mut backend_far,
            &mut progress,
            async {
                let _ = rx.await;
            },
            Timeouts::default(),
        )
        .await;
        (result, progress)
    });
    let mut backend = _backend;
    let mut got = [0u8; 3];
    backend.read_exact(&mut got).await.unwrap();
    tx.send(()).unwrap();
    let (result, progress) = task.await.unwrap();
    assert!(matches!(result, Err(RelayError::Cancelled { in_flight: false })));
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
            Timeouts::default(),
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

/// Sends `data` from `writer` through one [`TcpDirection`] (reading `src`, writing `dst`) until
/// `sink` has it all; says whether the direction was spliced (bulk) after any poll on the way.
async fn pass(
    direction: &mut TcpDirection,
    (writer, src, dst, sink): (&mut TcpStream, &mut TcpStream, &mut TcpStream, &mut TcpStream),
    data: &[u8],
) -> bool {
    let mut spliced = false;
    let mut moved = 0;
    let pump = std::future::poll_fn(|cx| {
        let result = direction.poll(cx, src, dst, &mut moved);
        spliced |= matches!(direction, TcpDirection::Bulk(_));
        match result {
            Poll::Ready(Err(_)) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    });
    let mut got = vec![0; data.len()];
    let deliver = async {
        let (sent, received) = tokio::join!(writer.write_all(data), sink.read_exact(&mut got));
        sent.unwrap();
        received.unwrap();
    };
    tokio::select! {
        () = pump => panic!("the direction failed"),
        () = deliver => {}
    }
    assert_eq!(got, data);
    assert_eq!(moved, data.len() as u64);
    spliced
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_tcp_direction_splices_after_a_full_read_and_copies_again_after_four_small_ones() {
    let (mut client, mut from_client) = tcp_pair().await;
    let (mut to_backend, mut backend) = tcp_pair().await;
    let mut direction = TcpDirection::Small(Direction::default());
    let bulk: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let small = b"GET / HTTP/1.1\r\n\r\n";
    let sockets = (&mut client, &mut from_client, &mut to_backend, &mut backend);
    assert!(
        !pass(&mut direction, sockets, small).await,
        "a first small message is copied"
    );
    for round in 0..2 {
        let sockets = (&mut client, &mut from_client, &mut to_backend, &mut backend);
        assert!(
            pass(&mut direction, sockets, &bulk).await,
            "round {round}: bulk is spliced"
        );
        // Small messages after bulk are spliced; the fourth small read in a row sends the
        // direction back (one is not enough: several bulk streams on one core read short too).
        for small_read in 1..=4 {
            let sockets = (&mut client, &mut from_client, &mut to_backend, &mut backend);
            pass(&mut direction, sockets, small).await;
            assert_eq!(
                matches!(direction, TcpDirection::Small(_)),
                small_read == 4,
                "round {round}: copying again only after the fourth small read, not the {small_read}th"
            );
        }
    }
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
        Timeouts::default(),
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

#[test]
fn the_due_timeout_is_the_earliest_of_quiet_and_lifetime_and_half_closed_only_when_shorter() {
    let t0 = tokio::time::Instant::now();
    let s = Duration::from_secs;
    let timeouts = Timeouts {
        idle: Some(s(60)),
        half_closed: Some(s(10)),
        deadline: Some(t0 + s(30)),
    };
    assert_eq!(timeouts.due(t0, false), Some((t0 + s(30), Timeout::Lifetime)));
    assert_eq!(timeouts.due(t0, true), Some((t0 + s(10), Timeout::HalfClosed)));
    let no_lifetime = Timeouts {
        deadline: None,
        ..timeouts
    };
    assert_eq!(no_lifetime.due(t0, false), Some((t0 + s(60), Timeout::Idle)));
    let longer_half = Timeouts {
        half_closed: Some(s(600)),
        ..no_lifetime
    };
    assert_eq!(longer_half.due(t0, true), Some((t0 + s(60), Timeout::Idle)));
    assert_eq!(Timeouts::default().due(t0, true), None);
    let endless = Timeouts {
        idle: Some(Duration::MAX),
        ..Timeouts::default()
    };
    assert_eq!(
        endless.due(t0, false),
        Some((crate::clock::later(t0, Duration::MAX), Timeout::Idle)),
        "an idle timeout past the clock's range is due far ahead, not a panic"
    );
}

/// A relay between two duplex pipes with `timeouts`, on paused time; the test keeps both far
/// ends and gets the relay's result.
fn paused_relay(
    timeouts: Timeouts,
) -> (
    tokio::io::DuplexStream,
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), RelayError>>,
) {
    let (client, mut client_far) = tokio::io::duplex(64);
    let (backend, mut backend_far) = tokio::io::duplex(64);
    let task = tokio::spawn(async move {
        let mut progress = Progress::default();
        relay(
            &mut client_far,
            &mut backend_far,
            &mut progress,
            std::future::pending(),
            timeouts,
        )
        .await
    });
    (client, backend, task)
}

#[tokio::test(start_paused = true)]
async fn a_quiet_relay_ends_at_idle_and_traffic_pushes_the_deadline_back() {
    let idle = Duration::from_secs(60);
    let started = tokio::time::Instant::now();
    let (mut client, mut backend, task) = paused_relay(Timeouts {
        idle: Some(idle),
        ..Timeouts::default()
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(40)).await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        backend.read_exact(&mut got).await.unwrap();
    }
    let result = task.await.unwrap();
    assert!(
        matches!(
            result,
            Err(RelayError::TimedOut {
                timeout: Timeout::Idle,
                in_flight: false
            })
        ),
        "{result:?}"
    );
    // Last bytes at 120 s, so the end at 180 s.
    assert_eq!(started.elapsed().as_secs(), 180);
}

#[tokio::test(start_paused = true)]
async fn a_relay_cut_while_a_sink_does_not_drain_says_bytes_were_in_flight() {
    let (mut client, _backend, task) = paused_relay(Timeouts {
        idle: Some(Duration::from_secs(60)),
        ..Timeouts::default()
    });
    // The backend's far end never reads: the 64-byte pipe fills and the relay holds the rest.
    client.write_all(&[7; 128]).await.unwrap();
    let result = task.await.unwrap();
    assert!(
        matches!(
            result,
            Err(RelayError::TimedOut {
                timeout: Timeout::Idle,
                in_flight: true
            })
        ),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_half_closed_relay_ends_at_half_closed_and_a_lifetime_ends_a_busy_one() {
    let started = tokio::time::Instant::now();
    let (mut client, _backend, task) = paused_relay(Timeouts {
        idle: Some(Duration::from_secs(3600)),
        half_closed: Some(Duration::from_secs(5)),
        deadline: None,
    });
    client.shutdown().await.unwrap();
    let result = task.await.unwrap();
    assert!(
        matches!(
            result,
            Err(RelayError::TimedOut {
                timeout: Timeout::HalfClosed,
                in_flight: false
            })
        ),
        "{result:?}"
    );
    assert_eq!(started.elapsed().as_secs(), 5);

    let started = tokio::time::Instant::now();
    let (mut client, mut backend, task) = paused_relay(Timeouts {
        idle: Some(Duration::from_secs(10)),
        half_closed: None,
        deadline: Some(started + Duration::from_secs(25)),
    });
    let busy = tokio::spawn(async move {
        let mut got = [0u8; 1];
        while client.write_all(b"x").await.is_ok() && backend.read_exact(&mut got).await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let result = task.await.unwrap();
    assert!(
        matches!(
            result,
            Err(RelayError::TimedOut {
                timeout: Timeout::Lifetime,
                in_flight: false
            })
        ),
        "{result:?}"
    );
    assert_eq!(started.elapsed().as_secs(), 25);
    busy.abort();
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn with_the_pipe_budget_spent_a_bulk_direction_moves_every_byte_through_a_buffer() {
    static PIPES: splice::Pipes = splice::Pipes::new(2);
    let held: Vec<splice::Pipe> = (0..2)
        .map(|_| PIPES.take().expect("a pipe within the budget"))
        .collect();
    assert!(PIPES.take().is_err(), "a third pipe past a budget of two");
    assert_eq!(PIPES.live(), 2);
    let (mut client, mut from_client) = tcp_pair().await;
    let (mut to_backend, mut backend) = tcp_pair().await;
    let bulk: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();

    let mut direction = TcpDirection::Bulk(splice::Direction::within(&PIPES));
    let sockets = (&mut client, &mut from_client, &mut to_backend, &mut backend);
    assert!(
        !pass(&mut direction, sockets, &bulk).await,
        "spliced past the budget"
    );
    assert!(
        matches!(direction, TcpDirection::NoPipe(_)),
        "the direction copies through a buffer"
    );
    assert_eq!(PIPES.live(), 2, "no pipe was made past the budget");

    // Pipes closed make room again: a new bulk direction splices.
    drop(held);
    let mut direction = TcpDirection::Bulk(splice::Direction::within(&PIPES));
    let sockets = (&mut client, &mut from_client, &mut to_backend, &mut backend);
    assert!(
        pass(&mut direction, sockets, &bulk).await,
        "not spliced with the budget free"
    );
    drop(direction);
    assert_eq!(PIPES.live(), 1, "its pipe is pooled, still counted");
}
