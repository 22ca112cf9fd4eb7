//! End-to-end tests of `[rate_limit.shared]`: two fulcrum servers in-process counting one client
//! in a real `redis-server` that each test starts (and kills) itself, on a free loopback port.
//!
//! Windows are an hour long so that none rolls over during a test. Redis being stopped and
//! restarted is real: the process is killed and started again on the same port.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::connect_from;
use common::{start, within, TestBackend, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// A `redis-server` child process on `port`, killed on drop.
struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    async fn start() -> RedisServer {
        // redis-server cannot pick a port itself (--port 0 disables TCP): take a free one.
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        RedisServer::on(port).await
    }

    async fn on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it (.ci/run installs the Debian package redis-server)")
            });
        let server = RedisServer { port, child };
        let start = Instant::now();
        while !server.pings().await {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server on port {port} never answered PING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn pings(&self) -> bool {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(b"PING\r\n").await?;
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(&reply == b"+PONG\r\n")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), attempt).await,
            Ok(Ok(true))
        )
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and waits for the process to end.
    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plaintext listener `main` in front of `backend`, limited to `capacity` per hour counted in
/// the Redis at `url`.
fn config(backend: SocketAddr, capacity: u32, url: &str, shared_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
backends = ["{backend}"]

[rate_limit]
capacity = {capacity}
window = "1h"

[rate_limit.shared]
redis = "{url}"
key_prefix = "fulcrum-test:"
{shared_extra}
"#
    )
}

/// One connection from `source`: true if it reached the echo backend, false if it was closed
/// without an answer. Either way it ends within the deadline (the hang guard).
async fn served_from(source: IpAddr, server: &TestServer) -> bool {
    let mut stream = connect_from(source, server.addr("main")).await;
    let attempt = async {
        stream.write_all(b"ping").await?;
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    match within("an answer or a close", attempt).await {
        Ok(reply) => {
            assert_eq!(&reply, b"ping");
            true
        }
        Err(_) => false,
    }
}

async fn served(server: &TestServer) -> bool {
    served_from(CLIENT, server).await
}

#[tokio::test]
async fn two_instances_sharing_redis_serve_exactly_capacity_in_total() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let toml = config(
        backend.addr,
        20,
        &redis.url(),
        "timeout = \"2s\"\non_unavailable = \"deny\"",
    );
    let (a, b) = (start(&toml).await, start(&toml).await);
    let mut admitted = [0, 0];
    for i in 0..60 {
        // Uneven: two of every three connections go to the first instance.
        let which = usize::from(i % 3 == 2);
        let server = [&a, &b][which];
        admitted[which] += usize::from(served(server).await);
    }
    assert_eq!(
        admitted[0] + admitted[1],
        20,
        "admitted per instance: {admitted:?}"
    );
    assert!(
        admitted[0] > 0 && admitted[1] > 0,
        "admitted per instance: {admitted:?}"
    );
    assert_eq!(backend.accepted(), 20);
    assert_eq!(a.state.ratelimit_backend_errors.get(), 0);
    drop(redis);
}

#[tokio::test]
async fn with_deny_a_dead_redis_refuses_and_a_restarted_one_brings_shared_limiting_back() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let toml = config(
        backend.addr,
        20,
        &redis.url(),
        "timeout = \"200ms\"\non_unavailable = \"deny\"",
    );
    let server = start(&toml).await;
    // Two connections use up exactly one claimed share (20 / 10).
    assert!(served(&server).await);
    assert!(served(&server).await);

    let port = redis.stop();
    assert!(
        !served(&server).await,
        "a connection was served while Redis was down"
    );
    assert!(server.state.ratelimit_backend_errors.get() >= 1);
    // While Redis is left alone after the failure, refusals need no round trip at all.
    assert!(!served(&server).await);

    let redis = RedisServer::on(port).await;
    let start = Instant::now();
    while !served(&server).await {
        assert!(
            start.elapsed() < DEADLINE,
            "shared limiting never resumed after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The restarted Redis is empty: the window starts over there, and is enforced again.
    let mut more = 1;
    while served(&server).await {
        more += 1;
        assert!(more <= 20, "more than capacity admitted after Redis came back");
    }
    assert_eq!(more, 20);
    drop(redis);
}

#[tokio::test]
async fn with_local_a_dead_redis_falls_back_to_the_per_instance_limit() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let toml = config(
        backend.addr,
        5,
        &redis.url(),
        "timeout = \"200ms\"\non_unavailable = \"local\"",
    );
    let server = start(&toml).await;
    assert!(served(&server).await);
    redis.stop();
    // The local limiter counts on its own from here: capacity 5 more, then refusals.
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(served(&server).await);
    }
    assert_eq!(admitted, 5);
    assert!(server.state.ratelimit_backend_errors.get() >= 1);
}

#[tokio::test]
async fn with_deny_a_redis_that_never_answers_refuses_within_the_timeout() {
    let hole = common::BlackHole::start().await;
    let backend = TestBackend::echo().await;
    let url = format!("redis://{}/0", hole.addr);
    let toml = config(
        backend.addr,
        20,
        &url,
        "timeout = \"100ms\"\non_unavailable = \"deny\"",
    );
    let server = start(&toml).await;
    // `served` fails the test if the refusal does not come within the hang guard.
    assert!(!served(&server).await);
    assert!(!served(&server).await);
    assert_eq!(backend.accepted(), 0);
    assert!(server.state.ratelimit_backend_errors.get() >= 1);
}

#[tokio::test]
async fn with_allow_an_unreachable_redis_admits_and_counts_the_errors() {
    let backend = TestBackend::echo().await;
    let url = format!("redis://{}/0", common::refused_addr());
    let toml = config(
        backend.addr,
        2,
        &url,
        "timeout = \"200ms\"\non_unavailable = \"allow\"",
    );
    let server = start(&toml).await;
    for _ in 0..5 {
        assert!(served(&server).await);
    }
    assert!(server.state.ratelimit_backend_errors.get() >= 1);
    let metrics = fulcrum::metrics::render(&server.state);
    assert!(
        metrics.contains("fulcrum_ratelimit_backend_errors_total "),
        "{metrics}"
    );
}

/// Connection setup (connect -> first echoed byte), with and without the shared limiter.
/// `cargo test --release --test shared_ratelimit -- --ignored --nocapture` prints the numbers
/// (docs/BENCHMARKS.md).
#[tokio::test]
#[ignore = "measurement; run explicitly"]
async fn measure_connection_setup_with_and_without_the_shared_limiter() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let shared = config(backend.addr, 1_000_000, &redis.url(), "");
    let local = shared
        .split("[rate_limit.shared]")
        .next()
        .expect("the config has a local part")
        .to_owned();
    for (name, toml) in [("local limiter", local), ("shared limiter", shared)] {
        let server = start(&toml).await;
        let clients: Vec<IpAddr> = (1..=4).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
        // Warm-up: the first connection of each client claims its share.
        for client in &clients {
            assert!(served_from(*client, &server).await);
        }
        let n = 2000;
        let mut times = Vec::with_capacity(n);
        let all = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            assert!(served_from(clients[i % clients.len()], &server).await);
            times.push(t.elapsed());
        }
        let total = all.elapsed();
        times.sort();
        let p50 = times[n / 2];
        let p99 = times[n * 99 / 100];
        println!(
            "{name}: {n} sequential connections in {total:?} ({:.0}/s), p50 {p50:?}, p99 {p99:?}",
            n as f64 / total.as_secs_f64()
        );
        if name == "shared limiter" {
            // Each client's first connection on an instance waits for one claim from Redis.
            let mut times = Vec::with_capacity(n);
            for i in 0..n {
                let client = IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1));
                let t = Instant::now();
                assert!(served_from(client, &server).await);
                times.push(t.elapsed());
            }
            times.sort();
            println!(
                "shared limiter, a new client each time (one Redis claim per connection): p50 {:?}, p99 {:?}",
                times[n / 2],
                times[n * 99 / 100]
            );
        }
        server.stopped().await;
    }
    drop(redis);
}

#[tokio::test]
async fn a_second_instance_can_bind_the_same_address_with_one_worker() {
    let backend = TestBackend::echo().await;
    let one_worker = format!(
        "{}\n[runtime]\nworkers = 1\n",
        common::one_pool(&[backend.addr], "")
    );
    let first = start(&one_worker).await;
    let addr = first.addr("main");
    let second = start(&one_worker.replace("127.0.0.1:0", &addr.to_string())).await;
    assert_eq!(second.addr("main"), addr);
    let mut stream = common::connect(addr).await;
    assert_eq!(common::round_trip(&mut stream, b"hi").await, b"hi");
}
