//! End-to-end tests of `[rate_limit.shared] shared_concurrency`: `max_concurrent` held by the sum
//! of several real `fulcrum` processes counting one client in a real `redis-server` that each test
//! starts (and stops) itself, on a free loopback port.
//!
//! Each instance is the binary, so that one can be killed with SIGKILL as a crashed instance
//! would be; a refusal is read from its `/metrics` (`reason="rate_limited"`) and proven by the
//! echo backend's count of accepted connections. The lease is 2 s, so a killed instance's slots
//! come back well within the harness's deadline; nothing waits for time to pass but through
//! polls under that deadline.

mod common;

use std::net::SocketAddr;

use common::process::Fulcrum;
use common::redis::RedisServer;
use common::{http, one_pool, poll_for, within, TempDir, TestBackend, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The cap shared by every instance.
const MAX_CONCURRENT: usize = 4;

/// A plaintext listener `main` in front of `backend`, with an admin API, `max_concurrent = 4` per
/// client counted over the instances using the Redis at `url`, and `on_unavailable`.
fn config(backend: SocketAddr, url: &str, on_unavailable: &str) -> String {
    let limit = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [rate_limit]\ncapacity = 1000\nwindow = \"1h\"\nmax_concurrent = {MAX_CONCURRENT}\n\n\
         [rate_limit.shared]\nredis = \"{url}\"\ntimeout = \"200ms\"\n\
         on_unavailable = \"{on_unavailable}\"\nshared_concurrency = true\nconcurrency_lease = \"2s\"\n"
    );
    one_pool(&[backend], &limit)
}

/// One running instance: the process, its listener and its admin API.
struct Instance {
    process: Fulcrum,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

impl Instance {
    async fn start(config: &str) -> Instance {
        let dir = TempDir::new("shared-concurrency");
        let mut process = Fulcrum::run(&dir.write("fulcrum.toml", config));
        let addr = process.listening("main").await;
        let admin = process.admin_addr().await;
        Instance {
            process,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// A connection that reached the echo backend and is held open, or `None` if the instance
    /// closed it without an answer.
    async fn open(&self) -> Option<TcpStream> {
        let mut stream = within("connect", TcpStream::connect(self.addr))
            .await
            .expect("connect");
        let attempt = async {
            stream.write_all(b"ping").await?;
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        match within("an answer or a close", attempt).await {
            Ok(reply) => {
                assert_eq!(&reply, b"ping");
                Some(stream)
            }
            Err(_) => None,
        }
    }

    /// `n` connections, each of which must be served; held open.
    async fn hold(&self, n: usize) -> Vec<TcpStream> {
        let mut held = Vec::new();
        for i in 0..n {
            let stream = self.open().await;
            held.push(stream.unwrap_or_else(|| panic!("connection {i} of {n} was refused")));
        }
        held
    }

    /// The value of the `/metrics` sample named `name` whose labels contain `labels`.
    async fn metric(&self, name: &str, labels: &str) -> u64 {
        let (status, body) = http(self.admin, "GET", "/metrics", &[], "").await;
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|line| line.starts_with(name) && line.contains(labels))
            .find_map(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `/metrics` counts `n` connections refused as `rate_limited` (the count may
    /// trail the close the client saw).
    async fn wait_rate_limited(&self, n: u64) {
        let mut seen = 0;
        let counted = poll_for(async || {
            seen = self
                .metric("fulcrum_connections_rejected_total", "reason=\"rate_limited\"")
                .await;
            (seen == n).then_some(())
        })
        .await;
        assert!(
            counted.is_some(),
            "{seen} rate_limited refusals counted, expected {n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_admit_max_concurrent_in_total_and_refuse_the_next_connection_on_either() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let toml = config(backend.addr, &redis.url(), "deny");
    let (a, b) = (Instance::start(&toml).await, Instance::start(&toml).await);

    let mut in_a = a.hold(2).await;
    let in_b = b.hold(2).await;
    assert!(a.open().await.is_none(), "a fifth connection was served by a");
    assert!(b.open().await.is_none(), "a fifth connection was served by b");
    assert_eq!(backend.accepted(), MAX_CONCURRENT);
    a.wait_rate_limited(1).await;
    b.wait_rate_limited(1).await;

    // A closed connection gives its slot back: its instance serves the next one at once.
    drop(in_a.pop());
    let again = poll_for(async || a.open().await).await;
    assert!(
        again.is_some(),
        "a never served again after one of its connections closed"
    );
    assert!(b.open().await.is_none(), "b was served past the cap");
    assert_eq!(backend.accepted(), MAX_CONCURRENT + 1);
    drop((in_a, in_b, again, redis));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slots_of_an_instance_killed_with_sigkill_come_back_within_the_lease() {
    let redis = RedisServer::start().await;
    let backend = TestBackend::echo().await;
    let toml = config(backend.addr, &redis.url(), "deny");
    let (a, b) = (Instance::start(&toml).await, Instance::start(&toml).await);
    let in_a = a.hold(2).await;
    let in_b = b.hold(2).await;
    assert!(b.open().await.is_none(), "b was served past the cap");

    a.process.signal("KILL");
    let (status, _) = a.process.exit().await;
    assert!(!status.success(), "{status}");
    drop(in_a);
    // Nothing gave the dead instance's slots back: they come back when its lease ends.
    let served = poll_for(async || b.open().await).await;
    assert!(
        served.is_some(),
        "b never got a slot of the killed instance within {DEADLINE:?}"
    );
    assert_eq!(backend.accepted(), MAX_CONCURRENT + 1);
    drop((in_b, served, redis));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_local_falls_back_to_the_per_instance_cap_and_deny_refuses() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop();
    let backend = TestBackend::echo().await;
    let local = Instance::start(&config(backend.addr, &url, "local")).await;
    let deny = Instance::start(&config(backend.addr, &url, "deny")).await;

    // `local`: this instance's own cap of 4, as if it were alone; the fifth is refused.
    let held = local.hold(MAX_CONCURRENT).await;
    assert!(local.open().await.is_none(), "a fifth connection was served");
    // `deny`: nothing is served while Redis cannot answer.
    assert!(deny.open().await.is_none(), "deny served without Redis");
    assert_eq!(backend.accepted(), MAX_CONCURRENT);
    local.wait_rate_limited(1).await;
    deny.wait_rate_limited(1).await;
    for instance in [&local, &deny] {
        let errors = instance
            .metric("fulcrum_ratelimit_backend_errors_total", "")
            .await;
        assert!(errors >= 1, "no Redis error counted");
    }
    drop(held);
}
