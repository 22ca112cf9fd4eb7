//! Real fleets end to end: weighted least connections, per-backend caps with the upstream's
//! queue, backup backends, a weight set at runtime through the admin API, and backends
//! discovered from a real DNS server (Debian's dnsmasq, in a network namespace of the test's
//! own).
//!
//! Everything on loopback with port 0 (the DNS test binds port 53 inside its own namespace);
//! every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{
    assert_ends, connect, http, round_trip, toml_path, wait_until, within, Behavior, TempDir, TestBackend,
    TestServer,
};
use fulcrum::metrics::Reason;
use fulcrum::state::Upstream;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One listener `main` in front of upstream `pool` with these backends (TOML array items) and
/// extra upstream keys.
fn pool(backends: &[String], extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n\n\
         [[upstream]]\nname = \"pool\"\nbackends = [{}]\n{extra}\n",
        backends.join(", ")
    )
}

fn table(addr: SocketAddr, keys: &str) -> String {
    format!("{{ addr = \"{addr}\", {keys} }}")
}

fn upstream(server: &TestServer) -> Arc<Upstream> {
    Arc::clone(server.current().upstream("pool").expect("upstream pool"))
}

fn rejected(server: &TestServer, reason: Reason) -> u64 {
    server
        .current()
        .listener("main")
        .expect("listener main")
        .rejected
        .get(reason)
}

/// Connects and reads the one-byte banner of the backend it reached.
async fn banner(addr: SocketAddr) -> (u8, TcpStream) {
    let mut stream = connect(addr).await;
    let mut banner = [0u8; 1];
    within("the backend's banner", stream.read_exact(&mut banner))
        .await
        .expect("read the banner");
    (banner[0], stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_1_and_3_spread_8_held_connections_2_and_6() {
    let light = TestBackend::banner(b"L").await;
    let heavy = TestBackend::banner(b"H").await;
    let config = pool(
        &[table(light.addr, "weight = 1"), table(heavy.addr, "weight = 3")],
        "",
    );
    let server = TestServer::start(&config).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(banner(server.addr("main")).await);
    }
    let on = |b: u8| held.iter().filter(|(got, _)| *got == b).count();
    assert_eq!((on(b'L'), on(b'H')), (2, 6));
    assert_eq!(server.active("pool"), [2, 6]);
    drop(held);
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_their_caps_clients_queue_in_order_and_past_the_queue_are_refused() {
    let a = TestBackend::echo().await;
    let b = TestBackend::echo().await;
    let config = pool(
        &[
            table(a.addr, "max_connections = 1"),
            table(b.addr, "max_connections = 1"),
        ],
        "queue_size = 2\nqueue_timeout = \"60s\"",
    );
    let server = TestServer::start(&config).await;
    let addr = server.addr("main");
    let queue = upstream(&server);
    let mut first = connect(addr).await;
    assert_eq!(round_trip(&mut first, b"1").await, b"1");
    let mut second = connect(addr).await;
    assert_eq!(round_trip(&mut second, b"2").await, b"2");

    let mut third = connect(addr).await;
    wait_until("the third client to queue", || queue.pool.waiting() == 1).await;
    let mut fourth = connect(addr).await;
    wait_until("the fourth client to queue", || queue.pool.waiting() == 2).await;
    let mut fifth = connect(addr).await;
    assert_ends(&mut fifth, "the fifth client, past the queue").await;
    assert_eq!(rejected(&server, Reason::QueueFull), 1);
    assert_eq!(server.active("pool"), [1, 1], "a queued client holds no backend");

    // A freed slot goes to the head of the queue: the third, while the fourth keeps waiting.
    drop(first);
    assert_eq!(round_trip(&mut third, b"3").await, b"3");
    assert_eq!(queue.pool.waiting(), 1, "the fourth was served before the third");
    drop(second);
    assert_eq!(round_trip(&mut fourth, b"4").await, b"4");
    assert_eq!(queue.pool.waiting(), 0);
    assert_eq!(queue.figures.queue.count(), 2);

    drop((third, fourth));
    server.wait_idle().await;
    assert_eq!(server.active("pool"), [0, 0]);
    assert_eq!(rejected(&server, Reason::QueueTimeout), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_queued_past_queue_timeout_is_refused_and_leaks_nothing() {
    let a = TestBackend::echo().await;
    let config = pool(
        &[table(a.addr, "max_connections = 1")],
        "queue_size = 4\nqueue_timeout = \"200ms\"",
    );
    let server = TestServer::start(&config).await;
    let mut held = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut held, b"held").await, b"held");
    let mut waiting = connect(server.addr("main")).await;
    assert_ends(&mut waiting, "the queued client").await;
    assert_eq!(rejected(&server, Reason::QueueTimeout), 1);
    let queue = upstream(&server);
    assert_eq!((queue.pool.waiting(), queue.figures.queue.count()), (0, 1));
    assert_eq!(server.active("pool"), [1]);
    drop(held);
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_queue_a_client_finding_every_backend_full_is_refused_at_once() {
    let a = TestBackend::echo().await;
    let server = TestServer::start(&pool(&[table(a.addr, "max_connections = 1")], "")).await;
    let mut held = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut held, b"held").await, b"held");
    let mut refused = connect(server.addr("main")).await;
    assert_ends(&mut refused, "a client over the cap").await;
    assert_eq!(rejected(&server, Reason::QueueFull), 1);
    assert_eq!(a.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_serves_while_both_primaries_are_down_and_a_returning_primary_takes_over() {
    let first = TestBackend::banner(b"1").await;
    let second = TestBackend::banner(b"2").await;
    let standby = TestBackend::banner(b"B").await;
    let (first_addr, second_addr) = (first.addr, second.addr);
    let health = "[upstream.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1";
    let config = pool(
        &[
            format!("\"{first_addr}\""),
            format!("\"{second_addr}\""),
            table(standby.addr, "backup = true"),
        ],
        health,
    );
    let server = TestServer::start(&config).await;
    let addr = server.addr("main");
    for _ in 0..4 {
        let (got, _) = banner(addr).await;
        assert_ne!(got, b'B', "the backup served while the primaries were up");
    }
    drop((first, second));
    let state = server.current();
    wait_until("both primaries to be marked down", || {
        let up = state.upstream("pool").expect("pool");
        !up.backends[0].is_up() && !up.backends[1].is_up()
    })
    .await;
    for _ in 0..3 {
        let (got, _) = banner(addr).await;
        assert_eq!(got, b'B');
    }
    let back = TestBackend::start_at(second_addr, Behavior::BannerThenEcho(b"2".to_vec())).await;
    wait_until("the second primary to be back up", || {
        state.upstream("pool").expect("pool").backends[1].is_up()
    })
    .await;
    for _ in 0..3 {
        let (got, _) = banner(addr).await;
        assert_eq!(
            got, b'2',
            "a new connection went elsewhere than the returned primary"
        );
    }
    drop(back);
}

/// `POST /upstreams/pool/backends/{backend}/state` with a JSON body.
async fn set(admin: SocketAddr, backend: SocketAddr, body: &str) -> (u16, String) {
    let path = format!("/upstreams/pool/backends/{backend}/state");
    http(
        admin,
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_set_through_the_admin_api_stands_until_a_reload_changes_the_configured_weight() {
    let a = TestBackend::echo().await;
    let b = TestBackend::echo().await;
    let dir = TempDir::new("fleet-weight");
    let admin = "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let config = |b_keys: &str| {
        format!(
            "{}{admin}",
            pool(&[format!("\"{}\"", a.addr), table(b.addr, b_keys)], "")
        )
    };
    let path = dir.write("fulcrum.toml", &config("weight = 1"));
    let server = TestServer::start_file(&path).await;
    let admin_addr = server.admin.expect("admin listener");
    let slot = |s: &TestServer| upstream(s).backends[1].slot;

    for refused in [r#"{"weight": 0}"#, r#"{"weight": 257}"#, r#"{"weigth": 2}"#, "{}"] {
        let (status, body) = set(admin_addr, b.addr, refused).await;
        assert_eq!(status, 400, "{refused}: {body}");
    }
    let (status, body) = set(admin_addr, b.addr, r#"{"weight": 3}"#).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (answer["weight"].as_u64(), answer["previous_weight"].as_u64()),
        (Some(3), Some(1))
    );

    let mut held = Vec::new();
    for i in 0..8u8 {
        let mut stream = connect(server.addr("main")).await;
        assert_eq!(round_trip(&mut stream, &[i]).await, [i]);
        held.push(stream);
    }
    assert_eq!(server.active("pool"), [2, 6]);
    drop(held);
    server.wait_idle().await;

    // A reload that leaves the configured weight alone keeps the runtime one.
    within("a reload", server.handle.reload()).await.expect("reload");
    assert_eq!(upstream(&server).pool.weight(slot(&server)), 3);
    // One that changes it applies the new configured weight.
    std::fs::write(&path, config("weight = 2")).expect("rewrite the config");
    within("a reload", server.handle.reload()).await.expect("reload");
    assert_eq!(upstream(&server).pool.weight(slot(&server)), 2);
    let status: serde_json::Value =
        serde_json::from_str(&http(admin_addr, "GET", "/status", &[], "").await.1).expect("status JSON");
    assert_eq!(status["upstreams"][0]["backends"][1]["weight"], 2);
}

// ---------------------------------------------------------------------------------------------
// Backends from DNS

/// dnsmasq answering from `hosts` on 127.0.0.1:53 of this namespace; killed on drop.
struct Dnsmasq {
    child: std::process::Child,
}

impl Dnsmasq {
    fn start(hosts: &std::path::Path) -> Dnsmasq {
        // Debian installs it in /usr/sbin, which a non-root PATH may lack.
        let program = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let child = std::process::Command::new(program)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
                "--local-ttl=1",
                "--pid-file=",
                // Stay the namespace's root: a user namespace cannot change groups.
                "--user=",
                "--group=",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run dnsmasq (Debian package dnsmasq): {e}"));
        Dnsmasq { child }
    }

    /// SIGHUP: dnsmasq re-reads its hosts files and clears its cache.
    fn reload(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP dnsmasq: {status}");
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hosts(addrs: &[&str]) -> String {
    addrs.iter().map(|a| format!("{a} app.internal\n")).collect()
}

fn discovered(server: &TestServer) -> Vec<String> {
    upstream(server)
        .backends
        .iter()
        .map(|b| b.label.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_discovered_from_dns_follow_the_records_and_a_retired_one_keeps_its_connection() {
    if !common::in_own_network_namespace(
        "backends_discovered_from_dns_follow_the_records_and_a_retired_one_keeps_its_connection",
    ) {
        return;
    }
    common::ip(&["link", "set", "lo", "up"]);
    // Three backends on one port of 127.0.0.11-13, each telling who it is.
    let first = TestBackend::start_at(
        "127.0.0.11:0".parse().unwrap(),
        Behavior::BannerThenEcho(b"1".to_vec()),
    )
    .await;
    let port = first.addr.port();
    let at = |host: u8, banner: &[u8]| {
        let addr: SocketAddr = format!("127.0.0.{host}:{port}").parse().unwrap();
        TestBackend::start_at(addr, Behavior::BannerThenEcho(banner.to_vec()))
    };
    let (second, third) = (at(12, b"2").await, at(13, b"3").await);
    let dir = TempDir::new("fleet-dns");
    let hosts_file = dir.write("hosts", &hosts(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]));
    let dns = Dnsmasq::start(&hosts_file);
    let config = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n\n\
         [[upstream]]\nname = \"pool\"\ndiscover = \"app.internal:{port}\"\ndiscover_interval = \"200ms\"\n\n\
         [dns]\nservers = [\"127.0.0.1:53\"]\n\n[access_log]\npath = {}\n",
        toml_path(&dir.path().join("access.log"))
    );
    let server = TestServer::start(&config).await;
    let addr = server.addr("main");
    let all: Vec<String> = [11, 12, 13]
        .iter()
        .map(|h| format!("127.0.0.{h}:{port}"))
        .collect();
    wait_until("the three addresses to be backends", || {
        discovered(&server) == all
    })
    .await;

    // Least connections spreads three held connections over the three.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(banner(addr).await);
    }
    let mut seen: Vec<u8> = held.iter().map(|(b, _)| *b).collect();
    seen.sort_unstable();
    assert_eq!(seen, b"123");

    // The name loses 127.0.0.13: that backend is retired, its open connection keeps flowing.
    std::fs::write(&hosts_file, hosts(&["127.0.0.11", "127.0.0.12"])).expect("rewrite hosts");
    dns.reload();
    wait_until("127.0.0.13 to be retired", || discovered(&server) == all[..2]).await;
    let (_, on_third) = held
        .iter_mut()
        .find(|(b, _)| *b == b'3')
        .expect("a connection on 3");
    assert_eq!(round_trip(on_third, b"still here").await, b"still here");
    for _ in 0..4 {
        let (got, _) = banner(addr).await;
        assert!(
            got == b'1' || got == b'2',
            "a new connection reached the retired backend"
        );
    }

    // With the DNS server gone, resolutions fail and the last good set stays.
    let outcomes = server.current().discovered.outcomes("pool");
    let failed = outcomes.failed.get();
    dns.stop();
    wait_until("a failed resolution", || outcomes.failed.get() > failed).await;
    assert_eq!(discovered(&server), all[..2]);
    let (got, _) = banner(addr).await;
    assert!(got == b'1' || got == b'2');
    drop(held);
    drop((first, second, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_answering_1000_addresses_makes_256_backends_the_first_in_address_order() {
    if !common::in_own_network_namespace(
        "a_name_answering_1000_addresses_makes_256_backends_the_first_in_address_order",
    ) {
        return;
    }
    common::ip(&["link", "set", "lo", "up"]);
    // 1 000 loopback addresses, listed in no particular order; nothing needs to listen on them.
    let mut answer: Vec<SocketAddr> = (0..1_000u32)
        .map(|i| (i * 7_919) % 1_000)
        .map(|i| SocketAddr::from(([127, 1, (i / 200) as u8, (i % 200 + 1) as u8], 8080)))
        .collect();
    let listed: Vec<String> = answer.iter().map(|a| a.ip().to_string()).collect();
    let listed: Vec<&str> = listed.iter().map(String::as_str).collect();
    let dir = TempDir::new("fleet-dns-many");
    let hosts_file = dir.write("hosts", &hosts(&listed));
    let _dns = Dnsmasq::start(&hosts_file);
    let config = "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n\n\
         [[upstream]]\nname = \"pool\"\ndiscover = \"app.internal:8080\"\ndiscover_interval = \"200ms\"\n\n\
         [dns]\nservers = [\"127.0.0.1:53\"]\n";
    let server = TestServer::start(config).await;
    answer.sort_unstable();
    let first: Vec<String> = answer[..256].iter().map(|a| a.to_string()).collect();
    wait_until("the name to be resolved", || !discovered(&server).is_empty()).await;
    assert_eq!(discovered(&server).len(), 256);
    assert_eq!(discovered(&server), first);
    let current = server.current();
    assert_eq!(current.discovered.ignored("pool"), 744);
    assert_eq!(upstream(&server).pool.len(), 256);
    // The same answer again changes nothing: the set, and so the generation, stay.
    let outcomes = current.discovered.outcomes("pool");
    let resolved = outcomes.ok.get();
    wait_until("two more resolutions", || outcomes.ok.get() >= resolved + 2).await;
    assert_eq!(server.current().generation, current.generation);
    assert_eq!(discovered(&server), first);
}
