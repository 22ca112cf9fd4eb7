//! End-to-end health checking: real echo backends on 127.0.0.1, the real server, real probes.
//!
//! Covers active probes (refused and black-holed backends), recovery, the all-down refusal,
//! `on_down`, and passive detection from real traffic. Every wait is a poll for a condition under
//! a generous deadline; nothing asserts on elapsed time. The server, the backends and the waits
//! are the shared harness's (`tests/common`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{backend_list, refused_addr, wait_until, Behavior, TestBackend, TestServer, DEADLINE};
use fulcrum::config::BackendAddr;
use fulcrum::health::Failure;
use fulcrum::metrics::Reason;
use fulcrum::state::{Backend, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fast probes: fine, since tests wait for conditions rather than for time.
const FAST: &str = "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";

/// The real server with listener `l` (at `addr`) in front of upstream `u` over `backends`.
struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    server: TestServer,
}

impl Proxy {
    async fn start(backends: &[SocketAddr], health_check: Option<&str>) -> Proxy {
        let mut text = format!(
            "drain_timeout = \"1s\"\n\
             [[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nbackends = [{}]\nconnect_timeout = \"2s\"\n",
            backend_list(backends)
        );
        if let Some(body) = health_check {
            text.push_str("[upstream.health_check]\n");
            text.push_str(body);
        }
        let server = TestServer::start(&text).await;
        Proxy {
            addr: server.addr("l"),
            state: Arc::clone(&server.state),
            server,
        }
    }

    fn backend(&self, index: usize) -> &Backend {
        &self.state.upstream("u").expect("upstream u").backends[index]
    }

    fn metrics(&self) -> String {
        fulcrum::admin::prometheus::render(&self.state)
    }

    fn no_healthy_backend_rejections(&self) -> u64 {
        self.state
            .listener("l")
            .expect("listener l")
            .rejected
            .get(Reason::NoHealthyBackend)
    }

    async fn stop(self) {
        self.server.stopped().await;
    }
}

/// Sends a line through an open connection and expects it echoed.
async fn echo(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(b"ping").await?;
    let mut reply = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut reply))
        .await
        .map_err(|_| io::Error::other("no echo before the deadline"))??;
    assert_eq!(&reply, b"ping");
    Ok(())
}

/// One short connection through the proxy that must be echoed.
async fn echo_once(proxy: SocketAddr) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    echo(&mut stream).await.expect("echo through proxy");
}

/// Whether the peer closed `stream` (EOF or reset) before the deadline.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_is_taken_out_of_rotation_and_served_again_after_it_restarts() {
    let a = TestBackend::echo().await;
    let b = TestBackend::echo().await;
    let proxy = Proxy::start(&[a.addr, b.addr], Some(FAST)).await;
    let a_label = a.addr.to_string();

    let a_addr = a.stop_listening().await;
    wait_until("a is marked down", || !proxy.backend(0).is_up()).await;
    assert!(proxy.backend(1).is_up());
    let metrics = proxy.metrics();
    assert!(
        metrics.contains(&format!(
            "fulcrum_backend_up{{upstream=\"u\",backend=\"{a_label}\"}} 0"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fulcrum_backend_health_transitions_total{{upstream=\"u\",backend=\"{a_label}\",to=\"down\"}} 1"
        )),
        "{metrics}"
    );

    let (served, dialed) = (
        proxy.backend(0).connections.get(),
        proxy.backend(0).connect_failures.get(),
    );
    for _ in 0..10 {
        echo_once(proxy.addr).await;
    }
    assert_eq!(
        proxy.backend(0).connections.get(),
        served,
        "a down backend is handed nothing"
    );
    assert_eq!(
        proxy.backend(0).connect_failures.get(),
        dialed,
        "a down backend is not even dialed"
    );

    let a = TestBackend::start_at(a_addr, Behavior::Echo).await;
    wait_until("a is marked up again", || proxy.backend(0).is_up()).await;
    assert!(proxy.metrics().contains(&format!(
        "fulcrum_backend_health_transitions_total{{upstream=\"u\",backend=\"{a_label}\",to=\"up\"}} 1"
    )));
    for _ in 0..4 {
        echo_once(proxy.addr).await;
    }
    assert!(proxy.backend(0).connections.get() > served, "a is served again");
    assert!(a.accepted() > 0);
    proxy.stop().await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_backend_is_marked_down_by_the_probe_timeout() {
    // Backlog 0 and never accepting: once the queue is full, SYNs are dropped and connects hang.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    hole.listen(0).expect("listen");
    let hole_addr = hole.local_addr().expect("addr").as_socket().expect("inet");
    let mut queued = Vec::new();
    let mut full = false;
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(hole_addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(e)) => panic!("filling the backlog: {e}"),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(full, "the black hole never stopped completing connects");
    let check = fulcrum::config::HealthCheckConfig {
        timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let outcome = fulcrum::probe::once(&BackendAddr::Ip(hole_addr), &check).await;
    assert!(matches!(outcome, Err(Failure::TimedOut(_))), "{outcome:?}");
    assert_eq!(
        outcome.expect_err("timed out").to_string(),
        "timed out after 100ms"
    );

    let live = TestBackend::echo().await;
    let proxy = Proxy::start(&[hole_addr, live.addr], Some(FAST)).await;
    wait_until("the black hole is marked down", || !proxy.backend(0).is_up()).await;
    assert!(
        proxy.backend(1).is_up(),
        "the live backend's probes were not held up"
    );
    echo_once(proxy.addr).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_is_down_clients_are_closed_at_once_without_a_dial() {
    let a = TestBackend::echo().await;
    let proxy = Proxy::start(&[a.addr], Some(FAST)).await;
    echo_once(proxy.addr).await;
    a.stop_listening().await;
    wait_until("the only backend is marked down", || !proxy.backend(0).is_up()).await;

    let dialed = proxy.backend(0).connect_failures.get();
    let rejected = proxy.no_healthy_backend_rejections();
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect to proxy");
    assert!(closed_by_peer(&mut client).await, "client was not closed");
    assert_eq!(proxy.no_healthy_backend_rejections(), rejected + 1);
    assert_eq!(
        proxy.backend(0).connect_failures.get(),
        dialed,
        "no dial happened"
    );
    assert!(proxy
        .metrics()
        .contains("fulcrum_connections_rejected_total{listener=\"l\",reason=\"no_healthy_backend\"} 1"));
    proxy.stop().await;
}

/// Opens a connection through the proxy, stops the backend's listener (the connection's own
/// socket stays open), waits for the backend to be marked down and hands back the connection.
async fn connection_open_while_its_backend_goes_down(on_down: &str) -> (Proxy, TcpStream) {
    let a = TestBackend::echo().await;
    let proxy = Proxy::start(&[a.addr], Some(&format!("{FAST}{on_down}"))).await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect to proxy");
    echo(&mut client).await.expect("echo before");
    a.stop_listening().await;
    wait_until("the backend is marked down", || !proxy.backend(0).is_up()).await;
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_down_close_open_connections_are_closed_when_their_backend_goes_down() {
    let (proxy, mut client) = connection_open_while_its_backend_goes_down("on_down = \"close\"\n").await;
    assert!(closed_by_peer(&mut client).await, "connection was kept");
    wait_until("the lease is released", || proxy.state.total_active() == 0).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_open_connections_outlive_their_backend_going_down() {
    let (proxy, mut client) = connection_open_while_its_backend_goes_down("").await;
    echo(&mut client).await.expect("the open connection still works");
    assert_eq!(proxy.state.total_active(), 1);
    drop(client);
    proxy.stop().await;
}

/// Sends clients through a dead and a live backend until the dead one is marked down; it must
/// take exactly `fall` failed real connects, and no dial afterwards.
async fn passive_detection_takes_out_a_dead_backend(health_check: Option<&str>) {
    let live = TestBackend::echo().await;
    let proxy = Proxy::start(&[refused_addr(), live.addr], health_check).await;
    for _ in 0..50 {
        if !proxy.backend(0).is_up() {
            break;
        }
        echo_once(proxy.addr).await;
    }
    assert!(
        !proxy.backend(0).is_up(),
        "the dead backend was never marked down"
    );
    assert_eq!(
        proxy.backend(0).connect_failures.get(),
        3,
        "fall = 3 real connect failures"
    );
    for _ in 0..5 {
        echo_once(proxy.addr).await;
    }
    assert_eq!(
        proxy.backend(0).connect_failures.get(),
        3,
        "no dial after it is down"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_real_connects_alone_mark_a_backend_down_between_probes() {
    passive_detection_takes_out_a_dead_backend(Some("interval = \"1h\"\nfall = 3\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_health_check_table_passive_detection_is_still_on() {
    passive_detection_takes_out_a_dead_backend(None).await;
}
