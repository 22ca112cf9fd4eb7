//! Hostile and broken peers, end to end: silent and slowloris TLS clients, malformed handshakes,
//! resets on either side under concurrency, a backend that stops reading, descriptor exhaustion,
//! a black-holed backend, and a replayable random mix of faults. Every test ends with every
//! backend's active count back to 0 and the descriptors it opened closed again.
//!
//! Isolation. Tests in one binary run on parallel threads of one process, so a descriptor count
//! of this process would see the other tests' sockets. Every test here therefore takes
//! [`SERIAL`] (a process-wide mutex) and runs on a runtime of its own, dropped at its end, so
//! no task of one test outlives it. Descriptors are counted as *sockets* in `/proc/PID/fd`:
//! the relay keeps up to 64 idle pipes in a process-wide pool by design (a later connection
//! reuses them), so counting every descriptor would blame that cache, while a leaked connection
//! always leaks a socket. Tests that need a process of their own (memory, descriptor limit) run
//! the real binary and read the child's `/proc/PID/...` files instead.

mod common;

use common::cpu_time;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls::{assert_echoes, connect_tls, Pki};
use common::{
    connect, payload, refused_addr, reset, round_trip, sha256, toml_path, wait_until, within, within_for,
    BlackHole, TempDir, TestBackend, TestServer, DEADLINE,
};
use fulcrum::metrics::Reason;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// One test at a time in this binary (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` alone, on a fresh two-worker runtime that is dropped (with every task it still
/// holds) before the next test starts.
fn serially<F, Fut>(test: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let _alone = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(test());
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: 1 000 clients and their 1 000 server sides
/// live in this one process.
#[allow(unsafe_code)] // getrlimit/setrlimit through libc
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// Open sockets of process `pid` ("self" for this one).
fn sockets(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Waits until process `pid` holds exactly `baseline` sockets again.
async fn wait_for_sockets(pid: &str, baseline: usize) {
    let start = Instant::now();
    loop {
        let now = sockets(pid);
        if now == baseline {
            return;
        }
        if start.elapsed() > DEADLINE {
            panic!("process {pid} holds {now} sockets {DEADLINE:?} after the test, {baseline} before");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CPU used and wall time elapsed since a [`CpuWindow::open`], for a spin detector.
struct CpuWindow {
    pid: String,
    cpu: Duration,
    wall: Instant,
}

impl CpuWindow {
    fn open(pid: &str) -> CpuWindow {
        CpuWindow {
            pid: pid.to_string(),
            cpu: cpu_time(pid),
            wall: Instant::now(),
        }
    }

    /// Asserts the process used less than half of one core over a window of at least `least`.
    /// Generous on purpose: a spinning loop burns a whole core, a debug build handling a few
    /// hostile connections a small fraction of one.
    fn assert_no_spin(&self, least: Duration, what: &str) {
        let wall = self.wall.elapsed();
        let cpu = cpu_time(&self.pid).saturating_sub(self.cpu);
        assert!(
            wall >= least,
            "the window closed after {wall:?}, before {least:?}"
        );
        assert!(
            cpu.as_secs_f64() < 0.5 * wall.as_secs_f64(),
            "{what}: process {} used {cpu:?} of CPU in {wall:?} of wall time (a spin?)",
            self.pid
        );
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// The value of one line of Prometheus text, by its name and labels.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a numeric sample")
}

// ---------------------------------------------------------------------------------------------
// Peers

/// The bytes of a real ClientHello (TLS 1.3 and 1.2 offered), as a rustls client first sends.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = rustls::ClientConnection::new(pki.client_config(None), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("serialize the ClientHello");
    }
    out
}

/// Reads until the peer closes: `Ok(bytes)` on a clean end, the error on an abort.
async fn read_until_closed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    within("the peer to close", stream.read_to_end(&mut out)).await?;
    Ok(out)
}

/// Asserts `stream` is aborted: the next read fails with a reset instead of ending cleanly.
async fn assert_reset(stream: &mut TcpStream, side: &str) {
    let mut buf = [0u8; 64];
    match within("the abort to arrive", stream.read(&mut buf)).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{side}: expected a reset, got error {e}"),
        Ok(0) => panic!("{side}: expected a reset, got a clean end of stream"),
        Ok(n) => panic!("{side}: expected a reset, got {n} more bytes"),
    }
}

/// A mTLS listener `main` (handshake deadline `handshake_timeout`) in front of `backend`, with
/// `alice` authorized.
/// Every client of these tests comes from 127.0.0.1: the per-source handshake limit (tested in
/// tests/limits.rs) is lifted so that the deadlines are what ends the silent ones.
fn mtls_config(pki: &Pki, backend: SocketAddr, handshake_timeout: &str) -> String {
    format!(
        r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"
handshake_timeout = "{handshake_timeout}"
max_handshakes_per_source = 100000
{tls}
[[upstream]]
name = "pool"
backends = ["{backend}"]

[authorization]
alice = ["pool"]
"#,
        tls = pki.tls_table(&pki.ca_file, "1.2"),
    )
}

// ---------------------------------------------------------------------------------------------
// Handshake abuse

#[test]
fn silent_clients_and_a_slowloris_hello_are_closed_at_the_total_handshake_deadline_while_a_good_client_is_served(
) {
    serially(|| async {
        const SILENT: usize = 1000;
        let pki = Pki::new(&[]);
        let backend = TestBackend::echo().await;
        let server = TestServer::start(&mtls_config(&pki, backend.addr, "1s")).await;
        let addr = server.addr("main");
        let listener = server.state.listener("main").expect("listener main").clone();
        let baseline = sockets("self");

        // The slowloris: a real ClientHello, one byte every 100 ms, so ~25 s to send it all. A
        // per-byte deadline would never fire; the total one must, long before the end.
        let hello = client_hello(&pki);
        let hello_len = hello.len();
        let slowloris = tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("slowloris connects");
            let (mut read, mut write) = stream.into_split();
            let closed = tokio::spawn(async move {
                let mut buf = [0u8; 64];
                read.read(&mut buf).await
            });
            for (sent, byte) in hello.iter().enumerate() {
                if closed.is_finished() || write.write_all(&[*byte]).await.is_err() {
                    return Some(sent);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        });

        let mut silent = Vec::with_capacity(SILENT);
        for _ in 0..SILENT {
            silent.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("silent client connects");
                let mut buf = [0u8; 64];
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => {}
                    Ok(n) => panic!("a silent client was sent {n} bytes before any ClientHello"),
                }
            }));
        }
        wait_until(
            "the balancer accepted every silent client and the slowloris",
            || listener.accepted.get() == SILENT as u64 + 1,
        )
        .await;

        let alice = pki.client("alice");
        let mut good = connect_tls(addr, &pki.client_config(Some(&alice)), "localhost")
            .await
            .expect("the good client's handshake completes among 1 000 silent ones");
        assert_echoes(&mut good, b"served meanwhile").await;
        within("the good client's close", good.shutdown())
            .await
            .expect("close");
        drop(good);

        within_for(
            Duration::from_secs(30),
            "every silent client to be closed",
            async {
                for client in silent {
                    client.await.expect("silent client task");
                }
            },
        )
        .await;
        let sent = within_for(Duration::from_secs(60), "the slowloris to be closed", slowloris)
            .await
            .expect("slowloris task");
        match sent {
            Some(sent) => assert!(sent < hello_len, "closed after {sent} of {hello_len} bytes"),
            None => panic!("the slowloris sent its whole {hello_len}-byte ClientHello unhindered"),
        }

        wait_until("1 001 handshake refusals are counted", || {
            listener.rejected.get(Reason::TlsHandshake) == SILENT as u64 + 1
        })
        .await;
        assert_eq!(backend.accepted(), 1, "only the good client reaches the backend");
        server.wait_idle().await;
        wait_for_sockets("self", baseline).await;
    });
}

#[test]
fn malformed_hellos_are_closed_as_handshake_failures_without_a_dial_or_a_spin() {
    serially(|| async {
        let pki = Pki::new(&[]);
        let backend = TestBackend::echo().await;
        let server = TestServer::start(&mtls_config(&pki, backend.addr, "2s")).await;
        let addr = server.addr("main");
        let listener = server.state.listener("main").expect("listener main").clone();
        let baseline = sockets("self");
        let hello = client_hello(&pki);

        let mut junk = vec![0x16, 0x03, 0x01, 0xff, 0xff]; // a handshake record claiming 64 KiB
        junk.extend(payload(7, 20_000));
        let mut huge_message = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff]; // 16 MiB ClientHello
        huge_message.extend(payload(8, 4_000));
        let mut garbage = payload(9, 3_000);
        garbage[0] = 0x99; // not a TLS content type
                           // (name, bytes sent, whether the client then half-closes)
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("garbage", garbage, true),
            (
                "plaintext HTTP",
                b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
                false,
            ),
            (
                "truncated ClientHello then EOF",
                hello[..hello.len() / 2].to_vec(),
                true,
            ),
            ("record header over 16 KiB then junk", junk, false),
            ("16 MiB handshake message", huge_message, false),
            // Stays open until the 2 s deadline: the spin window below lasts at least that long.
            (
                "truncated ClientHello left open",
                hello[..hello.len() / 2].to_vec(),
                false,
            ),
        ];
        let window = CpuWindow::open("self");
        let mut clients = Vec::new();
        for (name, bytes, half_close) in cases.clone() {
            clients.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                // The server may close while we still write: the read below decides.
                let _ = stream.write_all(&bytes).await;
                if half_close {
                    let _ = stream.shutdown().await;
                }
                let mut out = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if out.len() + n <= 64 => out.extend_from_slice(&buf[..n]),
                        Ok(_) => panic!("{name}: the server sent more than an alert"),
                    }
                }
                // At most a TLS alert record (7 bytes) comes back.
                assert!(
                    out.is_empty() || (out[0] == 0x15 && out.len() <= 7),
                    "{name}: unexpected reply {out:?}"
                );
            }));
        }
        for client in clients {
            within("a malformed client to be closed", client)
                .await
                .expect("client task");
        }
        server_counts_only_handshake_failures(&listener, cases.len() as u64).await;
        window.assert_no_spin(Duration::from_secs(2), "hostile handshakes");
        assert_eq!(
            backend.accepted(),
            0,
            "a backend was dialed for a failed handshake"
        );
        server.wait_idle().await;
        wait_for_sockets("self", baseline).await;
    });
}

async fn server_counts_only_handshake_failures(listener: &fulcrum::state::Listener, n: u64) {
    wait_until("every malformed client is counted as tls_handshake", || {
        listener.rejected.get(Reason::TlsHandshake) == n
    })
    .await;
    for reason in Reason::ALL {
        if reason != Reason::TlsHandshake {
            assert_eq!(listener.rejected.get(reason), 0, "counted as {}", reason.label());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resets under concurrency

#[test]
fn fifty_concurrent_resets_on_either_side_reach_the_other_side_as_aborts_with_exact_counts() {
    serially(|| async {
        const PAIRS: usize = 50;
        let backend = Arc::new(TcpListener::bind("127.0.0.1:0").await.expect("bind backend"));
        let backend_addr = backend.local_addr().expect("backend address");
        let server = TestServer::start(&common::one_pool(&[backend_addr], "")).await;
        let accepting_backend = Arc::clone(&backend);
        let addr = server.addr("main");
        let baseline = sockets("self");

        // Backend side: reads the mode byte ('C': the client will reset, 'B': we reset), sends
        // "data", then either waits for the client's "go" and resets, or expects the abort.
        let (results, mut backend_results) = mpsc::unbounded_channel::<Result<(), String>>();
        let accepting = tokio::spawn(async move {
            for _ in 0..PAIRS {
                let (mut stream, _) = accepting_backend.accept().await.expect("backend accepts");
                let results = results.clone();
                tokio::spawn(async move {
                    let mut mode = [0u8; 1];
                    stream.read_exact(&mut mode).await.expect("mode byte");
                    stream.write_all(b"data").await.expect("backend writes");
                    if mode[0] == b'B' {
                        let mut go = [0u8; 2];
                        stream.read_exact(&mut go).await.expect("go");
                        reset(stream);
                        return;
                    }
                    let mut buf = [0u8; 16];
                    let outcome = match stream.read(&mut buf).await {
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
                        other => Err(format!("backend side of a client reset read {other:?}")),
                    };
                    results.send(outcome).expect("report");
                });
            }
        });

        let mut clients = Vec::new();
        for i in 0..PAIRS {
            clients.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let mode = if i % 2 == 0 { b'C' } else { b'B' };
                stream.write_all(&[mode]).await.expect("mode");
                let mut data = [0u8; 4];
                stream
                    .read_exact(&mut data)
                    .await
                    .expect("data through the balancer");
                assert_eq!(&data, b"data");
                if mode == b'C' {
                    reset(stream);
                } else {
                    stream.write_all(b"go").await.expect("go");
                    assert_reset(&mut stream, "client of a backend reset").await;
                }
            }));
        }
        for client in clients {
            within("a client to finish", client).await.expect("client task");
        }
        within("the backend to accept all", accepting)
            .await
            .expect("accept task");
        for _ in 0..PAIRS / 2 {
            let outcome = within("a backend-side result", backend_results.recv())
                .await
                .expect("a result");
            outcome.unwrap_or_else(|e| panic!("{e}"));
        }

        server.wait_idle().await;
        let text = fulcrum::admin::prometheus::render(&server.state);
        let backend_labels = format!("{{upstream=\"pool\",backend=\"{backend_addr}\"}}");
        assert_eq!(
            metric(&text, "fulcrum_connections_total{listener=\"main\"}"),
            PAIRS as u64
        );
        assert_eq!(
            metric(
                &text,
                &format!("fulcrum_backend_connections_total{backend_labels}")
            ),
            PAIRS as u64
        );
        assert_eq!(
            metric(
                &text,
                &format!("fulcrum_backend_active_connections{backend_labels}")
            ),
            0
        );
        wait_for_sockets("self", baseline).await;
    });
}

/// `head` (top-level tables), then a plain listener `main` and a TLS listener `hold` with a
/// one-minute handshake deadline, both in front of `backend`. A `hold` client that never
/// finishes its handshake costs the child exactly one descriptor. The connection caps that
/// refuse clients before the descriptor table is full (tested in tests/limits.rs) are lifted:
/// these tests are about what happens when it is.
fn hold_config(head: &str, pki: &Pki, backend: SocketAddr) -> String {
    format!(
        r#"max_connections = 1000000
{head}
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[listener]]
name = "hold"
bind = "127.0.0.1:0"
upstream = "pool"
handshake_timeout = "1m"
max_handshakes_per_source = 100000
[listener.tls]
cert = {cert}
key = {key}

[[upstream]]
name = "pool"
backends = ["{backend}"]
"#,
        cert = toml_path(&pki.server_cert),
        key = toml_path(&pki.server_key),
    )
}

// ---------------------------------------------------------------------------------------------
// The real binary: memory and descriptors

/// `fulcrum run` as a child process (optionally under a wrapper such as `prlimit`) with the
/// addresses it logged. Killed on drop.
struct Fulcrum {
    process: common::process::Fulcrum,
    pid: String,
    addrs: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
}

impl Fulcrum {
    /// Starts the binary on `config` and waits for the `listening` line of every listener in
    /// `listeners` (and of the admin listener if `admin`).
    async fn spawn(wrapper: &[&str], config: &Path, listeners: &[&str], admin: bool) -> Fulcrum {
        let mut process = common::process::Fulcrum::run_under(wrapper, config);
        let pid = process.pid();
        let mut addrs: Vec<(String, SocketAddr)> = Vec::new();
        let mut admin_addr = None;
        while addrs.len() < listeners.len() || (admin && admin_addr.is_none()) {
            let (line, addr) = process
                .wait_for_line("fulcrum to log its listening addresses", |line| {
                    let addr = line.split_whitespace().find_map(|f| f.strip_prefix("addr="))?;
                    Some((line.to_string(), addr.parse::<SocketAddr>().ok()?))
                })
                .await;
            if line.contains("admin listening") {
                admin_addr = Some(addr);
            } else if let Some(name) = listeners.iter().find(|n| {
                // One line per worker socket (SO_REUSEPORT): keep the first.
                line.contains(" listening ")
                    && line.contains(&format!("listener={n} "))
                    && !addrs.iter().any(|(known, _)| known == *n)
            }) {
                addrs.push((name.to_string(), addr));
            }
        }
        Fulcrum {
            process,
            pid,
            addrs,
            admin: admin_addr,
        }
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {listener:?}"))
    }

    /// The child's `/metrics` text.
    async fn metrics(&self) -> String {
        let admin = self.admin.expect("an admin listener");
        let mut stream = connect(admin).await;
        within(
            "the metrics request",
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await
        .expect("send the metrics request");
        let body = read_until_closed(&mut stream).await.expect("metrics response");
        String::from_utf8(body).expect("metrics are text")
    }

    /// Waits until a stderr line contains `needle`.
    async fn wait_for_line(&mut self, needle: &str) {
        self.next_line_with(needle).await;
    }

    /// The next stderr line containing `needle`.
    async fn next_line_with(&mut self, needle: &str) -> String {
        self.process
            .wait_for_line(needle, |line| line.contains(needle).then(|| line.to_string()))
            .await
    }

    /// Asserts the child is still running.
    fn assert_alive(&mut self) {
        self.process.assert_alive();
    }
}

#[test]
fn a_backend_that_stops_reading_holds_back_a_fast_client_without_growing_memory() {
    serially(|| async {
        let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let backend_addr = backend.local_addr().expect("backend address");
        let dir = TempDir::new("zero-window");
        let config = dir.write(
            "fulcrum.toml",
            &format!(
                "{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
                common::one_pool(&[backend_addr], "")
            ),
        );
        let fulcrum = Fulcrum::spawn(&[], &config, &["main"], true).await;
        let pid = fulcrum.pid.clone();
        let baseline_sockets = sockets(&pid);
        let baseline_rss = rss(&pid);
        let bound = baseline_rss + 32 * 1024 * 1024;

        let mut client = connect(fulcrum.addr("main")).await;
        // Accepted and never read: its receive window closes.
        let (silent_backend, _) = within("the backend accept", backend.accept())
            .await
            .expect("accept");
        let chunk = payload(3, 64 * 1024);
        let mut written: u64 = 0;
        let mut peak = baseline_rss;
        let mut stuck = false;
        // At most 1 GiB: far more than every socket and pipe buffer on the path can hold.
        while written < 1 << 30 {
            match tokio::time::timeout(Duration::from_secs(1), client.write_all(&chunk)).await {
                Ok(result) => result.expect("client write"),
                Err(_) => {
                    stuck = true;
                    break;
                }
            }
            written += chunk.len() as u64;
            peak = peak.max(rss(&pid));
            assert!(
                peak < bound,
                "fulcrum's RSS reached {peak} bytes (baseline {baseline_rss})"
            );
        }
        assert!(
            stuck,
            "the client wrote {written} bytes into a backend that reads nothing"
        );
        // Still stuck: memory stays bounded while the client's writes do not complete.
        let held = rss(&pid);
        assert!(
            held < bound,
            "fulcrum's RSS is {held} bytes while stuck (baseline {baseline_rss})"
        );
        eprintln!(
            "zero window: client stuck after {written} bytes; fulcrum RSS {baseline_rss} -> peak {} -> {held}",
            peak.max(held)
        );

        // The backend goes away with unread data (a reset); fulcrum resets the client.
        drop(silent_backend);
        let mut buf = [0u8; 16];
        match within("the client to see the end", client.read(&mut buf)).await {
            Err(_) | Ok(0) => {}
            Ok(n) => panic!("the client got {n} bytes from a backend that sent none"),
        }
        drop(client);
        let fulcrum_ref = &fulcrum;
        let mut text = String::new();
        within("the child's counts to return to 0", async {
            loop {
                text = fulcrum_ref.metrics().await;
                let label = format!("{{upstream=\"pool\",backend=\"{backend_addr}\"}}");
                if metric(&text, &format!("fulcrum_backend_active_connections{label}")) == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(metric(&text, "fulcrum_connections_total{listener=\"main\"}"), 1);
        wait_for_sockets(&pid, baseline_sockets).await;
    });
}

#[test]
fn out_of_descriptors_the_binary_backs_off_without_spinning_and_serves_again_afterwards() {
    serially(|| async {
        let backend = TestBackend::echo().await;
        let pki = Pki::new(&[]);
        let dir = TempDir::new("emfile");
        // `main` is the plain listener under test. `hold` (TLS, long handshake deadline) only
        // fills the table exactly: each of its clients costs the child one descriptor, so the
        // child reaches its limit with no descriptor to spare, whatever the parity of its base
        // count (a proxied connection costs two, and a single free descriptor would be taken by
        // accept and given back when the dial fails, never exhausting accept).
        let config = dir.write("fulcrum.toml", &hold_config("", &pki, backend.addr));
        let mut fulcrum =
            Fulcrum::spawn(&["prlimit", "--nofile=64:64"], &config, &["main", "hold"], false).await;
        let pid = fulcrum.pid.clone();
        let baseline = sockets(&pid);
        let main = fulcrum.addr("main");

        let mut proxied = Vec::new();
        for i in 0..8u8 {
            let mut client = connect(main).await;
            assert_eq!(round_trip(&mut client, &[i; 16]).await, vec![i; 16]);
            proxied.push(client);
        }
        // More than the 64 descriptors the child may have: the kernel completes the extra
        // connects into the listen backlog, where they wait.
        let mut held = Vec::new();
        for _ in 0..64 {
            held.push(connect(fulcrum.addr("hold")).await);
        }
        fulcrum.wait_for_line("accept failed: out of resources").await;
        let window = CpuWindow::open(&pid);
        // The backoff doubles from 5 ms; reaching 1 s takes ~1.3 s of repeated failures.
        fulcrum.wait_for_line("backoff=1s").await;
        window.assert_no_spin(Duration::from_secs(1), "accept loop out of descriptors");
        fulcrum.assert_alive();
        for (i, client) in proxied.iter_mut().enumerate() {
            let probe = [i as u8 + 100; 8];
            assert_eq!(
                round_trip(client, &probe).await,
                probe,
                "open connections are unaffected"
            );
        }

        drop(held);
        drop(proxied);
        // The backlog drains (each held client is accepted, then fails its handshake on EOF)
        // once the backoff ends, within 1 s.
        wait_for_sockets(&pid, baseline).await;
        let mut again = connect(main).await;
        assert_eq!(round_trip(&mut again, b"served again").await, b"served again");
        drop(again);
        wait_for_sockets(&pid, baseline).await;
        fulcrum.assert_alive();
    });
}

/// Descriptors process `pid` holds with numbers under 32: RLIMIT_NOFILE bounds the numbers a
/// new descriptor may get, and descriptors inherited above it do not count.
fn descriptors(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|fd| *fd < 32)
        .count()
}

#[test]
fn dials_failing_for_want_of_local_descriptors_do_not_mark_a_healthy_backend_down() {
    serially(|| async {
        let backend = TestBackend::echo().await;
        let pki = Pki::new(&[]);
        let dir = TempDir::new("emfile-dial");
        // `hold` clients cost the child one descriptor each (see the test above).
        let config = dir.write(
            "fulcrum.toml",
            &hold_config("[runtime]\nworkers = 1\n", &pki, backend.addr),
        );
        let mut fulcrum =
            Fulcrum::spawn(&["prlimit", "--nofile=32:32"], &config, &["main", "hold"], false).await;
        let pid = fulcrum.pid.clone();
        let baseline = sockets(&pid);

        // Fill the table to exactly one free descriptor, one held client at a time, so that
        // nothing waits in a backlog.
        let mut held = Vec::new();
        for _ in 0..32 {
            if descriptors(&pid) >= 31 {
                break;
            }
            let before = descriptors(&pid);
            held.push(connect(fulcrum.addr("hold")).await);
            wait_until("the child accepted the held client", || {
                descriptors(&pid) > before
            })
            .await;
        }
        assert_eq!(
            descriptors(&pid),
            31,
            "the child's table did not fill to one free slot"
        );

        // Each client is accepted into the last descriptor; its dial finds none left.
        for _ in 0..4 {
            let mut client = connect(fulcrum.addr("main")).await;
            let end = read_until_closed(&mut client).await;
            assert!(
                matches!(&end, Ok(b) if b.is_empty()) || end.is_err(),
                "served without a descriptor?"
            );
            let line = fulcrum.next_line_with("connection refused").await;
            assert!(
                line.contains("connect_failed"),
                "refused for another reason: {line}"
            );
        }
        drop(held);
        wait_for_sockets(&pid, baseline).await;

        // The backend never failed: the next client is served at once, not refused as
        // no_healthy_backend until probes bring the backend back.
        let mut again = connect(fulcrum.addr("main")).await;
        let mut reply = vec![0u8; 5];
        within("the write", again.write_all(b"again"))
            .await
            .expect("write");
        match within("the echo", again.read_exact(&mut reply)).await {
            Ok(_) => assert_eq!(reply, b"again"),
            Err(e) => panic!("refused after the descriptors came back ({e}): the backend was marked down"),
        }
        drop(again);
        wait_for_sockets(&pid, baseline).await;
        fulcrum.assert_alive();
    });
}

#[test]
fn probes_failing_for_want_of_local_descriptors_leave_a_healthy_backend_up() {
    serially(|| async {
        let backend = TestBackend::echo().await;
        let pki = Pki::new(&[]);
        let dir = TempDir::new("emfile-probe");
        // Fast probes, taken down by 2 failures; `rise` so high that a backend marked down
        // would still be down when the metrics are read.
        let config = dir.write(
            "fulcrum.toml",
            &format!(
                "{}[upstream.health_check]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 1000\n\n\
                 [admin]\nbind = \"127.0.0.1:0\"\n",
                hold_config("[runtime]\nworkers = 1\n", &pki, backend.addr)
            ),
        );
        let mut fulcrum =
            Fulcrum::spawn(&["prlimit", "--nofile=64:64"], &config, &["main", "hold"], true).await;
        let pid = fulcrum.pid.clone();
        let baseline = sockets(&pid);

        // More `hold` clients (one descriptor each) than the child may have: its table fills,
        // the rest wait in the backlog, and nothing frees a descriptor while they are held.
        let mut held = Vec::new();
        for _ in 0..64 {
            held.push(connect(fulcrum.addr("hold")).await);
        }
        fulcrum.wait_for_line("accept failed: out of resources").await;
        // Twice `fall` probes find no descriptor for their socket.
        for _ in 0..4 {
            let line = fulcrum
                .process
                .wait_for_line("a probe failing for want of descriptors", |line| {
                    (line.contains("probe could not run") || line.contains("backend marked down"))
                        .then(|| line.to_string())
                })
                .await;
            assert!(
                line.contains("probe could not run") && line.contains("Too many open files"),
                "{line}"
            );
        }
        fulcrum.assert_alive();

        drop(held);
        wait_for_sockets(&pid, baseline).await;
        let text = fulcrum.metrics().await;
        let labels = format!("upstream=\"pool\",backend=\"{}\"", backend.addr);
        assert_eq!(
            metric(
                &text,
                &format!("fulcrum_backend_health_transitions_total{{{labels},to=\"down\"}}")
            ),
            0,
            "the backend was marked down"
        );
        assert_eq!(metric(&text, &format!("fulcrum_backend_up{{{labels}}}")), 1);
        let mut client = connect(fulcrum.addr("main")).await;
        assert_eq!(round_trip(&mut client, b"still up").await, b"still up");
        drop(client);
        wait_for_sockets(&pid, baseline).await;
        fulcrum.assert_alive();
    });
}

// ---------------------------------------------------------------------------------------------
// A black-holed backend

#[test]
fn a_black_holed_backend_times_out_fails_over_and_delays_no_other_client() {
    serially(|| async {
        let hole = BlackHole::start().await;
        let good = TestBackend::echo().await;
        // The black hole is listed first, so the first pick (all tied at 0) takes it.
        let server = TestServer::start(&common::one_pool(
            &[hole.addr, good.addr],
            "connect_timeout = \"3s\"",
        ))
        .await;
        let addr = server.addr("main");
        let baseline = sockets("self");

        let stuck = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            round_trip(&mut client, b"after failover").await
        });
        let state = Arc::clone(&server.state);
        wait_until("the first client's lease is on the black hole", || {
            state
                .active_connections("pool")
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                == [1, 0]
        })
        .await;

        // Least connections: the black hole holds one lease, so this one goes to the good
        // backend, and completes while the first is still inside its connect timeout.
        let mut other = connect(addr).await;
        assert_eq!(round_trip(&mut other, b"not delayed").await, b"not delayed");
        assert!(
            !stuck.is_finished(),
            "the first client finished before the connect timeout"
        );
        assert_eq!(server.active("pool"), [1, 1]);
        drop(other);

        let reply = within("the stuck client to fail over", stuck)
            .await
            .expect("client task");
        assert_eq!(reply, b"after failover");
        let hole_backend = &server.state.upstream("pool").expect("pool").backends[0];
        assert_eq!(hole_backend.connect_failures.get(), 1);
        assert_eq!(good.accepted(), 2);
        server.wait_idle().await;
        wait_for_sockets("self", baseline).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Random fault mix

/// xorshift64: tiny, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    ClientReset,
    BackendReset,
    BackendRefuses,
    SlowReader,
}

/// The scripted backend: the first byte chooses what it does. `E`: echo until EOF. `R` + u32
/// n: echo n bytes, wait for one more byte, then reset.
async fn scripted_backend(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            stream.read_exact(&mut mode).await?;
            if mode[0] == b'R' {
                let mut n = [0u8; 4];
                stream.read_exact(&mut n).await?;
                let mut bytes = vec![0u8; u32::from_be_bytes(n) as usize];
                stream.read_exact(&mut bytes).await?;
                stream.write_all(&bytes).await?;
                // The client has everything: nothing is in flight when the reset goes out.
                let mut go = [0u8; 1];
                stream.read_exact(&mut go).await?;
                reset(stream);
                return Ok(());
            }
            let (mut read, mut write) = stream.into_split();
            tokio::io::copy(&mut read, &mut write).await?;
            write.shutdown().await
        });
    }
}

/// Sends `data` (after `header`) and reads the echo at the same time; `slow` reads 1 KiB per
/// millisecond. Returns the SHA-256 of what came back once the backend ended the stream.
async fn echo_through(stream: TcpStream, header: &[u8], data: Vec<u8>, slow: bool) -> io::Result<[u8; 32]> {
    let (mut read, mut write) = stream.into_split();
    let header = header.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&header).await?;
        write.write_all(&data).await?;
        write.shutdown().await
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; if slow { 1024 } else { 64 * 1024 }];
    loop {
        let n = read.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if slow {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    writer.await.expect("writer task")?;
    Ok(hasher.finalize().into())
}

#[test]
fn a_random_mix_of_faults_from_a_logged_seed_leaves_every_normal_stream_intact_and_counts_at_zero() {
    serially(|| async {
        const CONNECTIONS: usize = 200;
        let seed = match std::env::var("FULCRUM_FAULT_SEED") {
            Ok(text) => text.parse().expect("FULCRUM_FAULT_SEED is a u64"),
            Err(_) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64;
                nanos ^ u64::from(std::process::id()) << 32
            }
        };
        eprintln!("fault mix: replay with FULCRUM_FAULT_SEED={seed}");
        let mut rng = Rng(seed | 1);

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind scripted backend");
        let backend_addr = listener.local_addr().expect("backend address");
        tokio::spawn(scripted_backend(listener));
        let stopped = refused_addr();
        let server = TestServer::start(&format!(
            r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[listener]]
name = "dead"
bind = "127.0.0.1:0"
upstream = "stopped"

[[upstream]]
name = "pool"
backends = ["{backend_addr}"]

[[upstream]]
name = "stopped"
backends = ["{stopped}"]
"#
        ))
        .await;
        let (main, dead) = (server.addr("main"), server.addr("dead"));
        let baseline = sockets("self");

        let limit = Arc::new(tokio::sync::Semaphore::new(20));
        let mut tasks = Vec::new();
        let mut totals = [0usize; 5];
        for i in 0..CONNECTIONS {
            let fault = match rng.below(100) {
                0..=39 => Fault::None,
                40..=54 => Fault::ClientReset,
                55..=69 => Fault::BackendReset,
                70..=84 => Fault::BackendRefuses,
                _ => Fault::SlowReader,
            };
            totals[fault as usize] += 1;
            let len = 1 + rng.below(256 * 1024) as usize;
            let data = payload(seed.wrapping_add(i as u64), len);
            let limit = Arc::clone(&limit);
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire_owned().await.expect("semaphore");
                let what = format!("connection {i} ({fault:?}, {len} bytes)");
                let outcome = within(&what, run_fault(fault, main, dead, data)).await;
                outcome.map_err(|e| format!("{what}: {e}"))
            }));
        }
        let mut failures = Vec::new();
        for task in tasks {
            if let Err(e) = within_for(Duration::from_secs(60), "the fault mix", task)
                .await
                .expect("connection task")
            {
                failures.push(e);
            }
        }
        eprintln!(
            "fault mix (seed {seed}): normal {}, client resets {}, backend resets {}, refused {}, slow readers {}",
            totals[0], totals[1], totals[2], totals[3], totals[4]
        );
        assert!(failures.is_empty(), "seed {seed}: {failures:#?}");

        server.wait_idle().await;
        let refused = totals[Fault::BackendRefuses as usize] as u64;
        let state = &server.state;
        let main_listener = state.listener("main").expect("main");
        let dead_listener = state.listener("dead").expect("dead");
        assert_eq!(main_listener.accepted.get(), CONNECTIONS as u64 - refused);
        assert_eq!(dead_listener.accepted.get(), refused);
        let dead_refusals = dead_listener.rejected.get(Reason::ConnectFailed)
            + dead_listener.rejected.get(Reason::NoHealthyBackend);
        assert_eq!(dead_refusals, refused, "seed {seed}");
        let pool = state.upstream("pool").expect("pool");
        assert_eq!(pool.backends[0].connections.get(), CONNECTIONS as u64 - refused);
        wait_for_sockets("self", baseline).await;
    });
}

/// One connection of the mix. `Err` describes what went wrong.
async fn run_fault(fault: Fault, main: SocketAddr, dead: SocketAddr, data: Vec<u8>) -> Result<(), String> {
    let connect = |addr| async move { TcpStream::connect(addr).await.map_err(|e| e.to_string()) };
    match fault {
        Fault::None | Fault::SlowReader => {
            let want = sha256(&data);
            let stream = connect(main).await?;
            let got = echo_through(stream, b"E", data, fault == Fault::SlowReader)
                .await
                .map_err(|e| format!("echo failed: {e}"))?;
            if got != want {
                return Err("the echoed bytes differ from the sent ones".into());
            }
        }
        Fault::ClientReset => {
            let mut stream = connect(main).await?;
            let part = &data[..data.len().min(4096)];
            stream.write_all(b"E").await.map_err(|e| e.to_string())?;
            let back = round_trip(&mut stream, part).await;
            if back != part {
                return Err("echo before the reset differs".into());
            }
            reset(stream);
        }
        Fault::BackendReset => {
            let mut stream = connect(main).await?;
            let part = &data[..data.len().min(4096)];
            let mut header = vec![b'R'];
            header.extend((part.len() as u32).to_be_bytes());
            stream.write_all(&header).await.map_err(|e| e.to_string())?;
            let back = round_trip(&mut stream, part).await;
            if back != part {
                return Err("echo before the reset differs".into());
            }
            stream.write_all(b"!").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 16];
            match stream.read(&mut buf).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => return Err(format!("expected a reset after the backend's, read {other:?}")),
            }
        }
        Fault::BackendRefuses => {
            let mut stream = connect(dead).await?;
            let _ = stream.write_all(&data[..data.len().min(1024)]).await;
            let mut buf = [0u8; 64];
            if let Ok(n @ 1..) = stream.read(&mut buf).await {
                return Err(format!("a refused connection returned {n} bytes"));
            }
        }
    }
    Ok(())
}
