//! Every connection ends and every resource is bounded, end to end: idle, half-closed and
//! lifetime timeouts, TCP keepalive on both legs, connection caps (the default one under
//! `prlimit`), the per-source handshake limit, IPv6 clients keyed by their /64 (in a network
//! namespace of the test's own), limits carried over reloads, and PROXY protocol hardening.
//!
//! Everything on loopback, port 0 (but in the namespace), certificates generated at run time,
//! every wait under a deadline.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::process::Fulcrum;
use common::tls::{assert_echoes, connect_from, connect_tls, Pki};
use common::{
    access_log, backend_list, connect, round_trip, toml_path, wait_for_outcomes, wait_until, within,
    Behavior, TempDir, TestBackend, TestServer,
};
use fulcrum::metrics::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain listener `main` (with `listener_keys`) in front of `backend`, an access log in `dir`,
/// then `extra`.
fn plain(dir: &TempDir, backend: SocketAddr, listener_keys: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n{listener_keys}\n\
         [[upstream]]\nname = \"pool\"\nbackends = [{}]\n\n[access_log]\npath = {}\n\n{extra}\n",
        backend_list(&[backend]),
        toml_path(&log(dir)),
    )
}

fn log(dir: &TempDir) -> PathBuf {
    dir.path().join("access.log")
}

fn rejected(lb: &TestServer, reason: Reason) -> u64 {
    lb.current()
        .listener("main")
        .expect("listener main")
        .rejected
        .get(reason)
}

// ---------------------------------------------------------------------------------------------
// Timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_both_ways_is_closed_at_idle_timeout_while_an_active_one_keeps_flowing() {
    let dir = TempDir::new("idle");
    let echo = TestBackend::echo().await;
    let lb = TestServer::start(&plain(&dir, echo.addr, "idle_timeout = \"600ms\"", "")).await;
    let addr = lb.addr("main");
    let mut silent = connect(addr).await;
    assert_eq!(round_trip(&mut silent, b"once").await, b"once");
    let mut active = connect(addr).await;
    let opened = Instant::now();

    // The active one sends something every 100 ms, until the silent one has been closed.
    let mut closed = Box::pin(common::assert_ends(&mut silent, "the silent connection"));
    let mut i = 0u8;
    loop {
        tokio::select! {
            _ = &mut closed => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                assert_eq!(round_trip(&mut active, &[i; 4]).await, [i; 4]);
                i = i.wrapping_add(1);
            }
        }
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(500),
        "closed before it was idle"
    );
    for probe in [b"still", b"alive"] {
        assert_eq!(round_trip(&mut active, probe).await, probe);
    }
    wait_for_outcomes(&log(&dir), "idle_timeout", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_is_closed_at_half_closed_timeout() {
    let dir = TempDir::new("half");
    let silent = TestBackend::start(Behavior::Silent).await;
    let keys = "idle_timeout = \"1h\"\nhalf_closed_timeout = \"300ms\"";
    let lb = TestServer::start(&plain(&dir, silent.addr, keys, "")).await;
    let mut client = connect(lb.addr("main")).await;
    within("the request", client.write_all(b"request, then FIN"))
        .await
        .expect("write");
    within("the half-close", client.shutdown())
        .await
        .expect("shutdown");
    // The backend neither answers nor closes: the other direction stays silent.
    common::assert_ends(&mut client, "the half-closed connection").await;
    wait_for_outcomes(&log(&dir), "half_closed_timeout", 1).await;
    lb.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_together_are_closed_over_the_jitter_span_by_max_lifetime() {
    const CONNECTIONS: usize = 8;
    let dir = TempDir::new("lifetime");
    let echo = TestBackend::echo().await;
    let keys = "max_lifetime = \"2s\"\nmax_lifetime_jitter = \"1s\"";
    let lb = TestServer::start(&plain(&dir, echo.addr, keys, "")).await;
    let addr = lb.addr("main");
    let opened = Instant::now();
    let mut ends = Vec::new();
    for i in 0..CONNECTIONS {
        let mut stream = connect(addr).await;
        assert_eq!(round_trip(&mut stream, &[i as u8]).await, [i as u8]);
        ends.push(tokio::spawn(async move {
            // Busy until the end: a lifetime is not an idle timeout.
            let mut buf = [0u8; 1];
            loop {
                if stream.write_all(b"x").await.is_err() {
                    break;
                }
                let read = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    break;
                }
            }
            opened.elapsed()
        }));
    }
    let mut ages = Vec::new();
    for end in ends {
        ages.push(
            within("a connection to reach its lifetime", end)
                .await
                .expect("task"),
        );
    }
    ages.sort();
    assert!(
        ages[0] >= Duration::from_millis(900),
        "closed before max_lifetime - jitter: {ages:?}"
    );
    assert!(
        ages[CONNECTIONS - 1] <= Duration::from_millis(3000),
        "closed long after max_lifetime: {ages:?}"
    );
    assert!(
        ages[CONNECTIONS - 1] - ages[0] >= Duration::from_millis(100),
        "connections opened together closed together: {ages:?}"
    );
    wait_for_outcomes(&log(&dir), "max_lifetime", CONNECTIONS).await;
}

// ---------------------------------------------------------------------------------------------
// TCP keepalive

/// `ss -tnoi` lines of established sockets matching `filter` (an `ss` expression).
fn sockets(filter: &str) -> Vec<String> {
    let output = std::process::Command::new("ss")
        .args(["-tnoiH", "state", "established"])
        .arg(filter)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ss` (iproute2): {e}"));
    assert!(output.status.success(), "ss failed: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether fulcrum's socket to the client (local port `listener`) and to the backend (remote
/// port `backend`) each show a keepalive timer.
fn keepalive_timers(listener: u16, backend: u16) -> (bool, bool) {
    let client_leg = sockets(&format!("( sport = :{listener} )"));
    let backend_leg = sockets(&format!("( dport = :{backend} )"));
    assert_eq!(
        (client_leg.len(), backend_leg.len()),
        (1, 1),
        "{client_leg:?} {backend_leg:?}"
    );
    let timer = |lines: &[String]| lines.iter().any(|l| l.contains("timer:(keepalive"));
    (timer(&client_leg), timer(&backend_leg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_is_on_for_both_legs_by_default_and_off_when_turned_off() {
    for (keys, upstream_keys, expected) in [
        ("", "", (true, true)),
        ("tcp_keepalive = false", "tcp_keepalive = false", (false, false)),
        (
            "tcp_keepalive = { idle = \"30s\", interval = \"5s\", count = 3 }",
            "",
            (true, true),
        ),
    ] {
        let dir = TempDir::new("keepalive");
        let echo = TestBackend::echo().await;
        let text = plain(&dir, echo.addr, keys, "").replace(
            "[[upstream]]\nname = \"pool\"\n",
            &format!("[[upstream]]\nname = \"pool\"\n{upstream_keys}\n"),
        );
        let lb = TestServer::start(&text).await;
        let addr = lb.addr("main");
        let mut client = connect(addr).await;
        assert_eq!(round_trip(&mut client, b"up").await, b"up");
        assert_eq!(
            keepalive_timers(addr.port(), echo.addr.port()),
            expected,
            "{keys}"
        );
    }
}

/// The keepalive timer, in whole seconds, on fulcrum's socket to the client whose own port is
/// `client` (listener port `listener`); `None` without one. `ss` prints it as `119min`,
/// `1min5sec` or `19sec` (fractions dropped here).
fn client_leg_keepalive(listener: u16, client: u16) -> Option<u64> {
    let lines = sockets(&format!("( sport = :{listener} and dport = :{client} )"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let timer = lines[0].split("timer:(keepalive,").nth(1)?.split(',').next()?;
    let (minutes, rest) = timer.split_once("min").unwrap_or(("0", timer));
    let seconds = rest
        .trim_end_matches("sec")
        .split('.')
        .next()
        .filter(|s| !s.is_empty());
    let number = |s: &str| s.parse::<u64>().unwrap_or_else(|e| panic!("{timer:?}: {e}"));
    Some(number(minutes) * 60 + seconds.map_or(0, number))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_tcp_keepalive_applies_to_the_next_connections_and_not_to_open_ones() {
    let dir = TempDir::new("keepalive-reload");
    let echo = TestBackend::echo().await;
    let path = dir.path().join("fulcrum.toml");
    let config = |keys: &str| plain(&dir, echo.addr, keys, "");
    std::fs::write(&path, config("tcp_keepalive = { idle = \"2h\" }")).expect("write config");
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("main");
    let open = |keys: &'static str| {
        let (lb, path, config) = (&lb, &path, &config);
        async move {
            lb.reload_file(path, &config(keys)).await.expect("reload");
            assert_eq!(lb.addr("main"), addr, "the socket is kept");
            let mut client = connect(addr).await;
            assert_eq!(round_trip(&mut client, b"up").await, b"up");
            let port = client.local_addr().expect("client port").port();
            (client, port)
        }
    };
    let (_first, first) = open("tcp_keepalive = { idle = \"2h\" }").await;
    let (_off, off) = open("tcp_keepalive = false").await;
    let (_short, short) = open("tcp_keepalive = { idle = \"20s\" }").await;
    let timer = |client| client_leg_keepalive(addr.port(), client);
    assert!(timer(first).is_some_and(|s| s > 3600), "{:?}", timer(first));
    assert_eq!(timer(off), None, "turned off by the reload");
    assert!(timer(short).is_some_and(|s| s <= 20), "{:?}", timer(short));
    // A second connection after the change: the listening socket hands the new timer down.
    let (_again, again) = open("tcp_keepalive = { idle = \"20s\" }").await;
    assert!(timer(again).is_some_and(|s| s <= 20), "{:?}", timer(again));
    assert!(
        timer(first).is_some_and(|s| s > 3600),
        "an open connection keeps its own"
    );
}

// ---------------------------------------------------------------------------------------------
// Connection caps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_a_connection_is_refused_before_any_handshake_and_admin_still_answers() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\nmax_connections = 5\n{}\n\
         [[upstream]]\nname = \"pool\"\nbackends = [\"{}\"]\n[authorization]\nalice = [\"pool\"]\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        pki.tls_table(&pki.ca_file, "1.2"),
        echo.addr
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("main");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let mut open = Vec::new();
    for i in 0..5u8 {
        let mut stream = connect_tls(addr, &alice, "localhost").await.expect("handshake");
        assert_echoes(&mut stream, &[i; 8]).await;
        open.push(stream);
    }
    // The sixth: not a byte of a ServerHello, the connection simply ends.
    let mut sixth = connect(addr).await;
    let _ = sixth.write_all(b"\x16\x03\x01").await;
    common::assert_ends(&mut sixth, "the sixth connection").await;
    assert_eq!(rejected(&lb, Reason::MaxConnections), 1);
    assert_eq!(rejected(&lb, Reason::TlsHandshake), 0, "a handshake was started");
    assert_eq!(echo.accepted(), 5);

    let admin = lb.admin.expect("admin listener");
    let mut http = connect(admin).await;
    within(
        "GET /healthz",
        http.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )
    .await
    .expect("write");
    let reply = common::read_to_end(&mut http).await.expect("admin reply");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    drop(open.pop());
    wait_until("a place is free again", || {
        lb.current().listener("main").expect("main").open_connections() == 4
    })
    .await;
    let mut again = connect_tls(addr, &alice, "localhost").await.expect("handshake");
    assert_echoes(&mut again, b"a place again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_cap_counts_every_listener_together() {
    let dir = TempDir::new("process-cap");
    let echo = TestBackend::echo().await;
    let text = format!(
        "max_connections = 3\n{}[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n",
        plain(&dir, echo.addr, "", "")
    );
    let lb = TestServer::start(&text).await;
    let mut open = Vec::new();
    for listener in ["main", "second", "main"] {
        let mut stream = connect(lb.addr(listener)).await;
        assert_eq!(round_trip(&mut stream, b"in").await, b"in");
        open.push(stream);
    }
    let mut fourth = connect(lb.addr("second")).await;
    common::assert_ends(&mut fourth, "the fourth connection").await;
    let second = lb
        .current()
        .listener("second")
        .expect("second")
        .rejected
        .get(Reason::MaxConnections);
    assert_eq!(second, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_prlimit_the_default_cap_refuses_cleanly_before_the_descriptor_table_is_full() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("default-cap");
    let config = dir.write("fulcrum.toml", &plain(&dir, echo.addr, "", ""));
    // 128 descriptors: the default cap is (128 - 32) / 2 = 48 proxied connections.
    let mut fulcrum = Fulcrum::run_under(&["prlimit", "--nofile=128:128"], &config);
    let addr = fulcrum.listening("main").await;
    let mut served = Vec::new();
    let mut refused = 0;
    for i in 0..60u32 {
        let mut stream = connect(addr).await;
        let probe = i.to_be_bytes();
        let _ = stream.write_all(&probe).await;
        let mut back = [0u8; 4];
        match within("an echo or the end", stream.read_exact(&mut back)).await {
            Ok(_) if back == probe => served.push(stream),
            _ => refused += 1,
        }
    }
    assert_eq!((served.len(), refused), (48, 12));
    fulcrum.assert_alive();
    drop(served);
    // Once fulcrum has seen those close, its places are free again.
    within("a connection served again", async {
        loop {
            let mut again = connect(addr).await;
            let _ = again.write_all(b"again").await;
            let mut back = [0u8; 5];
            if again.read_exact(&mut back).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    fulcrum.signal("TERM");
    let (status, lines) = fulcrum.exit().await;
    assert!(status.success(), "{status}");
    assert!(
        !lines.iter().any(|l| l.contains("out of resources")),
        "fulcrum ran out of descriptors: {lines:?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("reason=\"max_connections\"") || l.contains("reason=max_connections")));
}

// ---------------------------------------------------------------------------------------------
// Handshakes in progress per source

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_max_handshakes_per_source_silent_tls_clients_are_held_and_a_good_client_elsewhere_is_served() {
    const SILENT: usize = 100;
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\nhandshake_timeout = \"1m\"\n{}\n\
         [[upstream]]\nname = \"pool\"\nbackends = [\"{}\"]\n[authorization]\nalice = [\"pool\"]\n",
        pki.tls_table(&pki.ca_file, "1.2"),
        echo.addr
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("main");
    let source: IpAddr = "127.0.0.1".parse().expect("address");
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(connect_from(source, addr).await);
    }
    wait_until("32 held, 68 refused", || {
        rejected(&lb, Reason::HandshakeLimit) == (SILENT - 32) as u64
            && lb
                .current()
                .listener("main")
                .expect("main")
                .handshakes_from(source)
                == 32
    })
    .await;
    let mut ended = 0;
    for stream in &mut silent {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
        {
            ended += 1;
        }
    }
    assert_eq!(
        ended,
        SILENT - 32,
        "the refused ones were closed at once, the others held"
    );

    let other: IpAddr = "127.0.0.2".parse().expect("address");
    let tcp = connect_from(other, addr).await;
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(Some(&pki.client("alice"))));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut good = within("a handshake from another source", connector.connect(name, tcp))
        .await
        .expect("handshake");
    assert_echoes(&mut good, b"served meanwhile").await;
}

// ---------------------------------------------------------------------------------------------
// IPv6 prefixes

/// In a network namespace of the test's own: loopback up, `2001:db8:1::/64` and
/// `2001:db8:2::/64` routed to it as local addresses that clients may bind.
fn prepare_ipv6_namespace() {
    common::ip(&["link", "set", "lo", "up"]);
    common::ip(&["-6", "route", "add", "local", "2001:db8:1::/64", "dev", "lo"]);
    common::ip(&["-6", "route", "add", "local", "2001:db8:2::/64", "dev", "lo"]);
    std::fs::write("/proc/sys/net/ipv6/ip_nonlocal_bind", "1").expect("ip_nonlocal_bind in the namespace");
}

#[test]
fn clients_of_one_ipv6_64_count_as_one_client_and_another_64_is_separate() {
    if !common::in_own_network_namespace(
        "clients_of_one_ipv6_64_count_as_one_client_and_another_64_is_separate",
    ) {
        return;
    }
    prepare_ipv6_namespace();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let dir = TempDir::new("ipv6");
            let echo = TestBackend::echo().await;
            let text = plain(
                &dir,
                echo.addr,
                "",
                "[rate_limit]\ncapacity = 5\nwindow = \"1h\"\n",
            )
            .replace("bind = \"127.0.0.1:0\"", "bind = \"[::1]:0\"");
            let lb = TestServer::start(&text).await;
            let addr = lb.addr("main");
            let mut served = 0;
            for i in 1..=100u16 {
                let source: IpAddr = format!("2001:db8:1::{i:x}").parse().expect("address");
                let socket = tokio::net::TcpSocket::new_v6().expect("socket");
                socket
                    .bind(SocketAddr::new(source, 0))
                    .expect("bind a source of the /64");
                let mut stream = within("connect", socket.connect(addr)).await.expect("connect");
                let _ = stream.write_all(b"hi").await;
                let mut back = [0u8; 2];
                if within("an echo or the end", stream.read_exact(&mut back))
                    .await
                    .is_ok()
                    && &back == b"hi"
                {
                    served += 1;
                }
            }
            assert_eq!(served, 5, "one /64 is one client with capacity 5");
            assert_eq!(rejected(&lb, Reason::RateLimited), 95);
            let socket = tokio::net::TcpSocket::new_v6().expect("socket");
            socket
                .bind(SocketAddr::new("2001:db8:2::1".parse().expect("address"), 0))
                .expect("bind");
            let mut other = within("connect", socket.connect(addr)).await.expect("connect");
            assert_eq!(round_trip(&mut other, b"another /64").await, b"another /64");
        });
}

// ---------------------------------------------------------------------------------------------
// Limits across reloads

/// Whether a new connection to `addr` is closed without an answer.
async fn refused(addr: SocketAddr) -> bool {
    let mut stream: TcpStream = connect(addr).await;
    let _ = stream.write_all(b"?").await;
    let mut buf = [0u8; 1];
    matches!(within("the answer", stream.read(&mut buf)).await, Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_and_the_window_count_survive_reloads() {
    let dir = TempDir::new("reload-limits");
    let echo = TestBackend::echo().await;
    let limit =
        |capacity: u32| format!("[rate_limit]\ncapacity = {capacity}\nwindow = \"1h\"\nmax_concurrent = 2\n");
    let path = dir.write("fulcrum.toml", &plain(&dir, echo.addr, "", &limit(10)));
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("main");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(addr).await;
        assert_eq!(round_trip(&mut stream, b"in").await, b"in");
        held.push(stream);
    }
    assert!(refused(addr).await, "a third before any reload");
    for _ in 0..5 {
        within("a reload", lb.handle.reload()).await.expect("reload");
        assert!(refused(addr).await, "a third after a reload");
    }
    // Another policy: the window restarts, the open connections still count.
    std::fs::write(&path, plain(&dir, echo.addr, "", &limit(4))).expect("write");
    within("a reload", lb.handle.reload()).await.expect("reload");
    assert!(refused(addr).await, "a third after the policy changed");
    assert_eq!(rejected(&lb, Reason::RateLimited), 7);

    // Now the window: 4 per hour in the window that started with the change; unchanged reloads
    // carry its count, so four are admitted over four reloads and then none.
    drop(held);
    lb.wait_idle().await;
    for _ in 0..4 {
        within("a reload", lb.handle.reload()).await.expect("reload");
        let mut stream = connect(addr).await;
        assert_eq!(round_trip(&mut stream, b"ok").await, b"ok");
        // Closed and counted out before the next: else two still closing would hit max_concurrent.
        common::close(stream).await;
        lb.wait_idle().await;
    }
    within("a reload", lb.handle.reload()).await.expect("reload");
    assert!(refused(addr).await, "the window's capacity was used up");
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

fn proxy_config(dir: &TempDir, backend: SocketAddr, keys: &str) -> String {
    plain(dir, backend, &format!("accept_proxy_protocol = true\n{keys}"), "")
}

const HEADER: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n";

#[test]
fn check_warns_when_trusted_proxies_trusts_any_peer() {
    let dir = TempDir::new("trust-any");
    let backend = common::refused_addr();
    let warnings = |keys: &str| {
        let config = fulcrum::Config::from_toml(&proxy_config(&dir, backend, keys), "t").expect("valid");
        fulcrum::validate(&config).expect("loads")
    };
    let any = warnings("trusted_proxies = [\"0.0.0.0/0\", \"::/0\"]");
    assert!(
        any.iter()
            .any(|w| w.contains("trusted_proxies includes a /0 network")),
        "{any:?}"
    );
    assert!(warnings("trusted_proxies = [\"10.0.0.0/8\"]").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_trusted_proxies_is_refused_before_its_header_is_read() {
    let dir = TempDir::new("trusted");
    let echo = TestBackend::echo().await;
    let keys = "trusted_proxies = [\"127.0.0.2/32\", \"::1/128\"]";
    let lb = TestServer::start(&proxy_config(&dir, echo.addr, keys)).await;
    let addr = lb.addr("main");
    let mut untrusted = connect_from("127.0.0.1".parse().expect("address"), addr).await;
    let _ = untrusted.write_all(HEADER).await;
    common::assert_ends(&mut untrusted, "the untrusted peer").await;
    assert_eq!(rejected(&lb, Reason::UntrustedProxy), 1);
    assert_eq!(echo.accepted(), 0, "the backend was dialed");

    let mut trusted = connect_from("127.0.0.2".parse().expect("address"), addr).await;
    within("the header", trusted.write_all(HEADER))
        .await
        .expect("write");
    assert_eq!(round_trip(&mut trusted, b"payload").await, b"payload");
    assert_eq!(echo.accepted(), 1);
    drop(trusted);
    wait_for_outcomes(&log(&dir), "closed", 1).await;
    let clients: Vec<String> = access_log(&log(&dir))
        .iter()
        .map(|e| e["client"].to_string())
        .collect();
    assert!(
        clients.iter().any(|c| c.contains("192.0.2.7")),
        "the header's client: {clients:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickling_in_ends_at_the_one_deadline_it_shares_with_the_tls_handshake() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\naccept_proxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.0/8\"]\n\
         handshake_timeout = \"1s\"\n{}\n[[upstream]]\nname = \"pool\"\nbackends = [\"{}\"]\n",
        pki.tls_table(&pki.ca_file, "1.2"),
        echo.addr
    );
    let config = pki.dir.write("fulcrum.toml", &text);
    let mut fulcrum = Fulcrum::run(&config);
    let addr = fulcrum.listening("main").await;
    let pid = fulcrum.pid();

    // One byte every 100 ms: the header alone would take 4.5 s.
    let cpu = common::cpu_time(&pid);
    let started = Instant::now();
    let stream = connect(addr).await;
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for byte in HEADER {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    common::assert_ends(&mut read, "the trickling header").await;
    let elapsed = started.elapsed();
    trickle.abort();
    let used = common::cpu_time(&pid) - cpu;
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed before the deadline: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1800),
        "not closed at the deadline: {elapsed:?}"
    );
    assert!(
        used < Duration::from_millis(100),
        "fulcrum used {used:?} of CPU waiting for the header"
    );

    // The whole header at 600 ms, then a silent TLS client: the same deadline ends it at 1 s,
    // not 600 ms + 1 s.
    let started = Instant::now();
    let mut stream = connect(addr).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    within("the header", stream.write_all(HEADER))
        .await
        .expect("write");
    common::assert_ends(&mut stream, "the silent TLS client").await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1500),
        "the header and the handshake had a deadline each: {elapsed:?}"
    );
    fulcrum.assert_alive();
}
