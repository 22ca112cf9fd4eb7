//! End-to-end tests of `[rate_limit.shared]`: two fulcrum servers in-process counting one client
//! in a real `redis-server` that each test starts (and kills) itself, on a free loopback port.
//!
//! Windows are an hour long so that none rolls over during a test. Redis being stopped and
//! restarted is real: the process is killed and started again on the same port. The `rediss://`
//! tests run Redis TLS-only with a CA generated per test, and check each rule both ways: what
//! is right is served, what is wrong (CA, password, client certificate) makes Redis unavailable,
//! so `on_unavailable = "deny"` refuses and the error is counted.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, TlsRedis};
use common::tls::{connect_from, Pki};
use common::{toml_path, within, TestBackend, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// A plaintext listener `main` in front of `backend`, limited to `capacity` per hour counted in
/// the Redis at `url`.
fn config(backend: SocketAddr, capacity: u32, url: &str, shared_extra: &str) -> String {
    let limit = format!(
        "[rate_limit]\ncapacity = {capacity}\nwindow = \"1h\"\n\n\
         [rate_limit.shared]\nredis = \"{url}\"\nkey_prefix = \"fulcrum-test:\"\n{shared_extra}\n"
    );
    common::one_pool(&[backend], &limit)
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

/// Sends 60 connections of one client to `a` and `b` (two of every three to `a`) and checks
/// that exactly 20 were served in total, some by each instance: the capacity is shared.
async fn assert_twenty_served_in_total(a: &TestServer, b: &TestServer, backend: &TestBackend) {
    let mut admitted = [0, 0];
    for i in 0..60 {
        let which = usize::from(i % 3 == 2);
        admitted[which] += usize::from(served([a, b][which]).await);
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
    assert_eq!(b.state.ratelimit_backend_errors.get(), 0);
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
    let (a, b) = (TestServer::start(&toml).await, TestServer::start(&toml).await);
    assert_twenty_served_in_total(&a, &b, &backend).await;
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
    let server = TestServer::start(&toml).await;
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
    let server = TestServer::start(&toml).await;
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
    let server = TestServer::start(&toml).await;
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
    let server = TestServer::start(&toml).await;
    for _ in 0..5 {
        assert!(served(&server).await);
    }
    assert!(server.state.ratelimit_backend_errors.get() >= 1);
    let metrics = fulcrum::admin::prometheus::render(&server.state);
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
        let server = TestServer::start(&toml).await;
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
    let first = TestServer::start(&one_worker).await;
    let addr = first.addr("main");
    let second = TestServer::start(&one_worker.replace("127.0.0.1:0", &addr.to_string())).await;
    assert_eq!(second.addr("main"), addr);
    let mut stream = common::connect(addr).await;
    assert_eq!(common::round_trip(&mut stream, b"hi").await, b"hi");
}

const REDIS_PASSWORD: &str = "correct horse battery staple";

/// `[rate_limit.shared]` keys for a TLS Redis: a 2s timeout, `on_unavailable = "deny"`, the
/// `password_file` if given, then a `[rate_limit.shared.tls]` table trusting `ca` and
/// presenting `client` (cert, key), if either is given.
fn tls_keys(password_file: Option<&Path>, ca: Option<&Path>, client: Option<&(PathBuf, PathBuf)>) -> String {
    let mut keys = String::from("timeout = \"2s\"\non_unavailable = \"deny\"\n");
    if let Some(file) = password_file {
        keys += &format!("password_file = {}\n", toml_path(file));
    }
    if ca.is_some() || client.is_some() {
        keys += "[rate_limit.shared.tls]\n";
    }
    if let Some(ca) = ca {
        keys += &format!("ca = {}\n", toml_path(ca));
    }
    if let Some((cert, key)) = client {
        keys += &format!("cert = {}\nkey = {}\n", toml_path(cert), toml_path(key));
    }
    keys
}

/// Redis could not be used: the connection was refused (`on_unavailable = "deny"`), never
/// reached the backend, and the failure shows in `fulcrum_ratelimit_backend_errors_total`.
async fn assert_refused_as_unavailable(server: &TestServer, backend: &TestBackend) {
    assert!(!served(server).await, "served although Redis could not be used");
    assert_eq!(backend.accepted(), 0);
    let errors = server.state.ratelimit_backend_errors.get();
    assert!(errors >= 1, "no backend error counted");
    let metrics = fulcrum::admin::prometheus::render(&server.state);
    assert!(
        metrics.contains(&format!("fulcrum_ratelimit_backend_errors_total {errors}\n")),
        "{metrics}"
    );
}

/// A TLS-only Redis with a CA of its own, and an echo backend for fulcrum instances to serve.
struct TlsCase {
    redis: RedisServer,
    pki: Pki,
    backend: TestBackend,
}

impl TlsCase {
    /// `auth_clients`: Redis requires a client certificate from the CA; `password`: it requires
    /// [`REDIS_PASSWORD`].
    async fn start(auth_clients: bool, password: bool) -> TlsCase {
        let pki = Pki::new(&[]);
        let redis = RedisServer::start_tls(TlsRedis {
            pki: &pki,
            auth_clients,
            password: password.then_some(REDIS_PASSWORD),
        })
        .await;
        let backend = TestBackend::echo().await;
        TlsCase { redis, pki, backend }
    }

    /// A password file holding `text`.
    fn password_file(&self, text: &str) -> PathBuf {
        self.pki.dir.write_secret("redis.pass", text)
    }

    /// A fulcrum instance with capacity 20 counted in this Redis, `[rate_limit.shared]`
    /// completed by `keys` (see [`tls_keys`]).
    async fn fulcrum(&self, keys: &str) -> TestServer {
        TestServer::start(&self.toml(keys)).await
    }

    fn toml(&self, keys: &str) -> String {
        config(self.backend.addr, 20, &self.redis.url(), keys)
    }
}

#[tokio::test]
async fn two_instances_over_rediss_with_a_password_file_and_a_private_ca_serve_exactly_capacity_in_total() {
    let case = TlsCase::start(false, true).await;
    // As an operator's editor would save it: with a final newline.
    let password_file = case.password_file(&format!("{REDIS_PASSWORD}\n"));
    let keys = tls_keys(Some(&password_file), Some(&case.pki.ca_file), None);
    let (a, b) = (case.fulcrum(&keys).await, case.fulcrum(&keys).await);
    assert_twenty_served_in_total(&a, &b, &case.backend).await;
}

#[tokio::test]
async fn over_rediss_a_redis_certificate_from_another_ca_makes_redis_unavailable_and_deny_applies() {
    let case = TlsCase::start(false, false).await;
    let other = Pki::new(&[]);
    let server = case.fulcrum(&tls_keys(None, Some(&other.ca_file), None)).await;
    assert_refused_as_unavailable(&server, &case.backend).await;
}

#[tokio::test]
async fn over_rediss_without_a_ca_only_the_system_roots_are_trusted_so_a_private_ca_is_refused() {
    let case = TlsCase::start(false, false).await;
    let server = case.fulcrum(&tls_keys(None, None, None)).await;
    assert_refused_as_unavailable(&server, &case.backend).await;
}

#[tokio::test]
async fn over_rediss_a_wrong_password_makes_redis_unavailable_and_deny_applies() {
    let case = TlsCase::start(false, true).await;
    let password_file = case.password_file("not the password\n");
    let server = case
        .fulcrum(&tls_keys(Some(&password_file), Some(&case.pki.ca_file), None))
        .await;
    assert_refused_as_unavailable(&server, &case.backend).await;
}

#[tokio::test]
async fn a_reload_after_the_password_file_is_corrected_brings_shared_limiting_back() {
    let case = TlsCase::start(false, true).await;
    let password_file = case.password_file("an old password\n");
    let keys = tls_keys(Some(&password_file), Some(&case.pki.ca_file), None);
    let server = case.fulcrum(&keys).await;
    assert_refused_as_unavailable(&server, &case.backend).await;

    case.password_file(REDIS_PASSWORD);
    let reloaded = fulcrum::Config::from_toml(&case.toml(&keys), "<test>").expect("valid config");
    within("the reload", server.handle.reload_with(reloaded))
        .await
        .expect("the reload is applied");
    // The new generation dials Redis with the new password: served, and no new error.
    let errors = server.state.ratelimit_backend_errors.get();
    assert!(
        served(&server).await,
        "not served after the password was corrected"
    );
    assert_eq!(server.state.ratelimit_backend_errors.get(), errors);
}

#[tokio::test]
async fn a_redis_requiring_client_certificates_serves_an_instance_presenting_one() {
    let case = TlsCase::start(true, false).await;
    let client = case.pki.write_pem("fulcrum-client", &case.pki.client("fulcrum"));
    let server = case
        .fulcrum(&tls_keys(None, Some(&case.pki.ca_file), Some(&client)))
        .await;
    for _ in 0..3 {
        assert!(served(&server).await);
    }
    assert_eq!(server.state.ratelimit_backend_errors.get(), 0);
}

#[tokio::test]
async fn a_redis_requiring_client_certificates_is_unavailable_to_an_instance_presenting_none() {
    let case = TlsCase::start(true, false).await;
    let server = case.fulcrum(&tls_keys(None, Some(&case.pki.ca_file), None)).await;
    assert_refused_as_unavailable(&server, &case.backend).await;
}

#[test]
fn fulcrum_check_refuses_redis_tls_files_that_cannot_be_used_naming_them() {
    let pki = Pki::new(&[]);
    let missing = pki.dir.path().join("missing-ca.pem");
    let backend = SocketAddr::from((CLIENT, 1));
    let check = |ca: &Path| {
        let toml = config(
            backend,
            20,
            "rediss://127.0.0.1:1/0",
            &tls_keys(None, Some(ca), None),
        );
        let config = fulcrum::Config::from_toml(&toml, "<test>").expect("the config itself is valid");
        fulcrum::validate(&config).map_err(|e| e.to_string())
    };
    check(&pki.ca_file).expect("a readable CA passes the check");
    let e = check(&missing).expect_err("an unreadable CA fails the check");
    assert!(
        e.contains("rate_limit.shared") && e.contains("Redis CA") && e.contains("missing-ca.pem"),
        "{e}"
    );
    let e = check(&pki.server_key).expect_err("a CA file without certificates fails the check");
    assert!(e.contains("no PEM certificate"), "{e}");
}
