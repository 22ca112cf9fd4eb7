//! End-to-end tests of mTLS listeners: client certificate verification, identity
//! authorization, SNI routing, the handshake deadline, and real command-line clients.
//!
//! Every refusal test asserts three things: the client got no data, the right rejection counter
//! moved, and the backend never accepted a connection.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::tls::{assert_echoes, assert_refused, client_config, connect_tls, read_to_end_bounded, Pki};
use common::{within, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use fulcrum::pki::{Ca, Eku, LeafSpec, Pem};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// One mTLS listener `tls` in front of one echo backend (upstream `web`).
struct Fixture {
    lb: TestServer,
    backend: TestBackend,
    pki: Pki,
}

impl Fixture {
    async fn start(min_version: &str, authorization: &str) -> Fixture {
        let pki = Pki::new(&[]);
        let backend = TestBackend::echo().await;
        let toml = pki.one_pool_config(
            &pki.ca_file,
            min_version,
            "handshake_timeout = \"5s\"",
            &[backend.addr],
            &format!("[authorization]\n{authorization}"),
        );
        let lb = TestServer::start(&toml).await;
        Fixture { lb, backend, pki }
    }

    /// Asserts that a client with `config` is refused for `reason` and no backend was dialed.
    async fn assert_refuses(&self, config: Arc<ClientConfig>, reason: Reason) {
        let connected = connect_tls(self.lb.addr("tls"), &config, "localhost").await;
        assert_refused(connected).await;
        self.lb.wait_for_rejections("tls", &[(reason, 1)]).await;
        assert_eq!(self.backend.accepted(), 0, "a refused client reached the backend");
        assert_eq!(
            self.lb.state.total_active(),
            0,
            "a refused client holds a backend lease"
        );
    }

    /// A client certificate for `alice` with one field of its spec changed.
    fn alice_with(&self, change: impl FnOnce(&mut LeafSpec)) -> Pem {
        let mut spec = LeafSpec::client("alice");
        change(&mut spec);
        self.pki.ca.leaf(&spec).expect("issue client certificate")
    }
}

const ALICE_MAY_REACH_WEB: &str = r#"alice = ["web"]"#;

/// Deterministic, non-repeating-looking bytes, so a shifted or dropped chunk cannot compare equal.
fn pattern(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_client_gets_a_mebibyte_echoed_back_intact() {
    let f = Fixture::start("1.2", ALICE_MAY_REACH_WEB).await;
    let config = f.pki.client_config(Some(&f.pki.client("alice")));
    let stream = connect_tls(f.lb.addr("tls"), &config, "localhost")
        .await
        .expect("handshake of an authorized client");
    let sent = pattern(1024 * 1024);
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            write.write_all(&sent).await.expect("send 1 MiB");
            write.flush().await.expect("flush");
            write
        })
    };
    let mut received = vec![0u8; sent.len()];
    within("1 MiB echoed back", read.read_exact(&mut received))
        .await
        .expect("read 1 MiB back");
    let _write = within("the writer task", writer).await.expect("writer task");
    assert!(received == sent, "the echoed mebibyte differs from what was sent");
    assert_eq!(f.backend.accepted(), 1);
    assert_eq!(f.lb.rejections("tls"), []);
}

/// The identity refusals: one row per client certificate an mTLS listener must refuse before
/// any backend is dialed, with the reason it must count it under.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// No client certificate at all.
    NoCertificate,
    /// alice, issued by a CA the listener does not trust.
    AnotherCa,
    /// alice, expired yesterday.
    Expired,
    /// alice, valid from tomorrow.
    NotYetValid,
    /// alice, for server authentication only.
    ServerAuthOnly,
    /// bob: a valid identity that `[authorization]` does not grant `web`.
    NotAuthorized,
}

impl Refusal {
    /// The certificate the client presents (if any) and the reason the refusal is counted under.
    fn client(self, f: &Fixture) -> (Option<Pem>, Reason) {
        let now = SystemTime::now();
        match self {
            Refusal::NoCertificate => (None, Reason::TlsHandshake),
            Refusal::AnotherCa => {
                let stranger = Ca::new("some other CA").expect("generate CA");
                let cert = stranger.client("alice").expect("issue client certificate");
                (Some(cert), Reason::TlsHandshake)
            }
            Refusal::Expired => {
                let cert = f.alice_with(|spec| {
                    spec.not_before = now - 10 * DAY;
                    spec.not_after = now - DAY;
                });
                (Some(cert), Reason::TlsHandshake)
            }
            Refusal::NotYetValid => {
                let cert = f.alice_with(|spec| {
                    spec.not_before = now + DAY;
                    spec.not_after = now + 10 * DAY;
                });
                (Some(cert), Reason::TlsHandshake)
            }
            Refusal::ServerAuthOnly => {
                let cert = f.alice_with(|spec| spec.eku = Eku::ServerAuth);
                (Some(cert), Reason::TlsHandshake)
            }
            Refusal::NotAuthorized => (Some(f.pki.client("bob")), Reason::Unauthorized),
        }
    }
}

/// A listener where only alice may reach `web` refuses `refusal`'s client, counted under its
/// reason, and no backend is dialed ([`Fixture::assert_refuses`]).
async fn refuses_before_any_dial(refusal: Refusal) {
    let f = Fixture::start("1.2", ALICE_MAY_REACH_WEB).await;
    let (cert, reason) = refusal.client(&f);
    f.assert_refuses(f.pki.client_config(cert.as_ref()), reason).await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused_in_the_handshake_before_any_backend_is_dialed() {
    refuses_before_any_dial(Refusal::NoCertificate).await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_in_the_handshake_before_any_backend_is_dialed() {
    refuses_before_any_dial(Refusal::AnotherCa).await;
}

#[tokio::test]
async fn expired_client_certificate_is_refused_in_the_handshake_before_any_backend_is_dialed() {
    refuses_before_any_dial(Refusal::Expired).await;
}

#[tokio::test]
async fn not_yet_valid_client_certificate_is_refused_in_the_handshake_before_any_backend_is_dialed() {
    refuses_before_any_dial(Refusal::NotYetValid).await;
}

#[tokio::test]
async fn server_auth_only_certificate_is_refused_as_a_client_certificate_before_any_backend_is_dialed() {
    refuses_before_any_dial(Refusal::ServerAuthOnly).await;
}

#[tokio::test]
async fn valid_identity_not_authorized_for_the_upstream_is_refused_as_unauthorized_before_any_backend_is_dialed(
) {
    refuses_before_any_dial(Refusal::NotAuthorized).await;
}

#[tokio::test]
async fn plaintext_request_on_the_tls_port_gets_no_data_and_reaches_no_backend() {
    let f = Fixture::start("1.2", ALICE_MAY_REACH_WEB).await;
    let mut tcp = within("TCP connect", TcpStream::connect(f.lb.addr("tls")))
        .await
        .expect("TCP connect");
    within("sending plaintext", tcp.write_all(b"GET / HTTP/1.1\r\n\r\n"))
        .await
        .expect("send plaintext");
    // Anything that comes back must be a TLS alert record (content type 21), never data.
    if let Ok(reply) = read_to_end_bounded(&mut tcp, 1024).await {
        assert!(
            reply.is_empty() || reply[0] == 0x15,
            "plaintext client got something other than a TLS alert: {reply:?}"
        );
    }
    f.lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)])
        .await;
    assert_eq!(f.backend.accepted(), 0, "a plaintext client reached the backend");
}

/// rustls cannot speak TLS 1.1, so this covers "older than the minimum" with a TLS 1.2 client
/// against `min_version = "1.3"`; TLS 1.1 itself is covered with `openssl s_client -tls1_1`
/// in `openssl_tls11_client_cannot_connect_and_reaches_no_backend` below.
#[tokio::test]
async fn tls12_only_client_is_refused_where_min_version_is_1_3_while_a_tls13_client_is_served() {
    let f = Fixture::start("1.3", ALICE_MAY_REACH_WEB).await;
    let alice = f.pki.client("alice");
    let roots = f.pki.ca.cert_pem();
    let tls12 = client_config(&roots, Some(&alice), &[&rustls::version::TLS12]);
    f.assert_refuses(tls12, Reason::TlsHandshake).await;

    let tls13 = client_config(&roots, Some(&alice), &[&rustls::version::TLS13]);
    let mut stream = connect_tls(f.lb.addr("tls"), &tls13, "localhost")
        .await
        .expect("TLS 1.3 handshake");
    assert_echoes(&mut stream, b"hello over 1.3").await;
    assert_eq!(f.backend.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_name_picks_the_upstream_and_authorization_applies_to_the_upstream_it_picks() {
    let pki = Pki::new(&["reports.localhost", "unknown.localhost"]);
    let web = TestBackend::echo().await;
    let reports = TestBackend::echo().await;
    let toml = format!(
        r#"
[[listener]]
name = "tls"
bind = "127.0.0.1:0"
upstream = "web"
{tls}
[listener.sni]
"reports.localhost" = "reports"

[[upstream]]
name = "web"
backends = ["{web}"]

[[upstream]]
name = "reports"
backends = ["{reports}"]

[authorization]
alice = ["web", "reports"]
bob = ["web"]
"#,
        tls = pki.tls_table(&pki.ca_file, "1.2"),
        web = web.addr,
        reports = reports.addr,
    );
    let lb = TestServer::start(&toml).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let bob = pki.client_config(Some(&pki.client("bob")));

    let mut via_reports = connect_tls(addr, &alice, "reports.localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut via_reports, b"to reports").await;
    assert_eq!(
        (web.accepted(), reports.accepted()),
        (0, 1),
        "reports.localhost must reach reports"
    );

    let mut via_default = connect_tls(addr, &alice, "localhost").await.expect("handshake");
    assert_echoes(&mut via_default, b"to web").await;
    assert_eq!(
        (web.accepted(), reports.accepted()),
        (1, 1),
        "localhost must reach web"
    );

    let mut via_unknown = connect_tls(addr, &alice, "unknown.localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut via_unknown, b"to web again").await;
    assert_eq!(
        (web.accepted(), reports.accepted()),
        (2, 1),
        "an unknown name must reach web"
    );

    assert_refused(connect_tls(addr, &bob, "reports.localhost").await).await;
    lb.wait_for_rejections("tls", &[(Reason::Unauthorized, 1)]).await;
    assert_eq!(
        reports.accepted(),
        1,
        "bob reached reports, which he is not authorized for"
    );

    let mut bob_default = connect_tls(addr, &bob, "localhost").await.expect("handshake");
    assert_echoes(&mut bob_default, b"bob to web").await;
    assert_eq!((web.accepted(), reports.accepted()), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumed_from_one_listener_does_not_authenticate_on_a_listener_with_another_client_ca() {
    let pki = Pki::new(&[]);
    let other_ca = Ca::new("second client CA").expect("generate CA");
    let other_ca_file = pki.dir.write("other-ca.pem", &other_ca.cert_pem());
    let backend_a = TestBackend::echo().await;
    let backend_b = TestBackend::echo().await;
    let toml = format!(
        r#"
[[listener]]
name = "a"
bind = "127.0.0.1:0"
upstream = "a"
{tls_a}
[[listener]]
name = "b"
bind = "127.0.0.1:0"
upstream = "b"
{tls_b}
[[upstream]]
name = "a"
backends = ["{a}"]

[[upstream]]
name = "b"
backends = ["{b}"]

[authorization]
alice = ["a", "b"]
"#,
        tls_a = pki.tls_table(&pki.ca_file, "1.2"),
        tls_b = pki.tls_table(&other_ca_file, "1.2"),
        a = backend_a.addr,
        b = backend_b.addr,
    );
    let lb = TestServer::start(&toml).await;
    let config = pki.client_config(Some(&pki.client("alice")));

    let mut first = connect_tls(lb.addr("a"), &config, "localhost")
        .await
        .expect("handshake on a");
    assert_echoes(&mut first, b"first").await;
    within("closing", first.shutdown()).await.expect("close");
    // The client really holds a resumable session for "localhost": a second visit to A resumes.
    let mut second = connect_tls(lb.addr("a"), &config, "localhost")
        .await
        .expect("handshake on a");
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "precondition: the client resumes its session on listener a"
    );
    assert_echoes(&mut second, b"second").await;

    assert_refused(connect_tls(lb.addr("b"), &config, "localhost").await).await;
    lb.wait_for_rejections("b", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(backend_b.accepted(), 0, "a CA1 client reached B's backend");
    assert_eq!(backend_a.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_at_the_handshake_deadline_while_a_good_client_is_served() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let toml = format!(
        r#"
[[listener]]
name = "tls"
bind = "127.0.0.1:0"
upstream = "web"
handshake_timeout = "1s"
{tls}
[[upstream]]
name = "web"
backends = ["{backend}"]

[authorization]
alice = ["web"]
"#,
        tls = pki.tls_table(&pki.ca_file, "1.2"),
        backend = backend.addr,
    );
    let lb = TestServer::start(&toml).await;
    let mut silent = within("TCP connect", TcpStream::connect(lb.addr("tls")))
        .await
        .expect("TCP connect");

    let config = pki.client_config(Some(&pki.client("alice")));
    let mut good = connect_tls(lb.addr("tls"), &config, "localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut good, b"served meanwhile").await;

    // The bound is a hang guard; the server's 1 s deadline is what closes the socket.
    let mut buf = [0u8; 64];
    match within("the server to close the silent client", silent.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("silent client got {n} bytes"),
    }
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(backend.accepted(), 1, "only the good client reaches the backend");
}

#[tokio::test]
async fn spiffe_uri_identity_is_authorized_and_dns_identity_must_match_exactly() {
    let f = Fixture::start(
        "1.2",
        r#""spiffe://example.org/web" = ["web"]
Alice = ["web"]"#,
    )
    .await;
    let spiffe = f
        .pki
        .client_config(Some(&f.pki.client("spiffe://example.org/web")));
    let mut stream = connect_tls(f.lb.addr("tls"), &spiffe, "localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut stream, b"spiffe").await;
    assert_eq!(f.backend.accepted(), 1);

    let alice = f.pki.client_config(Some(&f.pki.client("alice")));
    assert_refused(connect_tls(f.lb.addr("tls"), &alice, "localhost").await).await;
    f.lb.wait_for_rejections("tls", &[(Reason::Unauthorized, 1)])
        .await;
    assert_eq!(f.backend.accepted(), 1, "\"alice\" matched the \"Alice\" entry");
}

// Real command-line clients.

/// Panics unless `tool` is on PATH: CI installs it, so a missing tool is a broken setup.
fn require(tool: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        panic!("`{tool}` is not on PATH: .ci/run must install it (CI installs openssl and curl)");
    }
}

/// Runs `tool args` under `timeout 20`, feeding `stdin`, off the async runtime.
async fn run(tool: &str, args: &[&str], stdin: &[u8]) -> Output {
    require(tool);
    let mut command = Command::new("timeout");
    command
        .arg("20")
        .arg(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.to_vec();
    let described = format!("{tool} {}", args.join(" "));
    let task = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn timeout(1)");
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write as _;
            let _ = input.write_all(&stdin);
        }
        child.wait_with_output().expect("wait for the child")
    });
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(output) => output.expect("blocking task"),
        Err(_) => panic!("`{described}` did not finish although it runs under `timeout 20`"),
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The demo backend (`Mode::Hello`, "Hello world from server 1") behind an mTLS listener.
struct HelloFixture {
    lb: TestServer,
    pki: Pki,
    _backend: tokio_util::sync::DropGuard,
}

async fn hello_fixture() -> HelloFixture {
    let pki = Pki::new(&[]);
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind demo backend");
    let backend_addr = socket.local_addr().expect("demo backend address");
    let stop = fulcrum::CancellationToken::new();
    tokio::spawn(fulcrum::backend::serve(
        socket,
        "1".into(),
        fulcrum::backend::Mode::Hello,
        stop.clone(),
    ));
    let toml = format!(
        r#"
[[listener]]
name = "tls"
bind = "127.0.0.1:0"
upstream = "web"
{tls}
[[upstream]]
name = "web"
backends = ["{backend_addr}"]

[authorization]
alice = ["web"]
"#,
        tls = pki.tls_table(&pki.ca_file, "1.2"),
    );
    let lb = TestServer::start(&toml).await;
    HelloFixture {
        lb,
        pki,
        _backend: stop.drop_guard(),
    }
}

const GREETING: &str = "Hello world from server 1";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_a_client_certificate_gets_the_demo_backend_greeting() {
    let f = hello_fixture().await;
    let (cert, key) = f.pki.write_pem("alice", &f.pki.client("alice"));
    let connect = f.lb.addr("tls").to_string();
    let args = [
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-CAfile",
        path(&f.pki.ca_file),
        "-cert",
        path(&cert),
        "-key",
        path(&key),
        "-quiet",
    ];
    let served = run("openssl", &args, REQUEST).await;
    assert!(
        String::from_utf8_lossy(&served.stdout).contains(GREETING),
        "openssl s_client did not get the greeting:\n{}",
        text(&served)
    );

    // Beside it, the rejection: the same command without a client certificate.
    let no_cert: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !["-cert", "-key", path(&cert), path(&key)].contains(a))
        .collect();
    let refused = run("openssl", &no_cert, REQUEST).await;
    assert!(
        !String::from_utf8_lossy(&refused.stdout).contains(GREETING),
        "openssl s_client without a certificate got the greeting:\n{}",
        text(&refused)
    );
    f.lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_client_certificate_gets_the_demo_backend_greeting_and_without_one_is_refused() {
    let f = hello_fixture().await;
    let (cert, key) = f.pki.write_pem("alice", &f.pki.client("alice"));
    let port = f.lb.addr("tls").port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/");
    let common = [
        "--silent",
        "--show-error",
        "--max-time",
        "15",
        "--resolve",
        &resolve,
        "--cacert",
        path(&f.pki.ca_file),
    ];

    let mut with_cert = common.to_vec();
    with_cert.extend(["--cert", path(&cert), "--key", path(&key), &url]);
    let served = run("curl", &with_cert, b"").await;
    assert!(served.status.success(), "curl failed:\n{}", text(&served));
    assert_eq!(String::from_utf8_lossy(&served.stdout), format!("{GREETING}\n"));

    let mut without_cert = common.to_vec();
    without_cert.push(&url);
    let refused = run("curl", &without_cert, b"").await;
    assert!(
        !refused.status.success(),
        "curl without a certificate succeeded:\n{}",
        text(&refused)
    );
    assert!(!String::from_utf8_lossy(&refused.stdout).contains(GREETING));
    f.lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_tls11_client_cannot_connect_and_reaches_no_backend() {
    let f = Fixture::start("1.2", ALICE_MAY_REACH_WEB).await;
    let (cert, key) = f.pki.write_pem("alice", &f.pki.client("alice"));
    let connect = f.lb.addr("tls").to_string();
    let args = [
        "s_client",
        "-tls1_1",
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-CAfile",
        path(&f.pki.ca_file),
        "-cert",
        path(&cert),
        "-key",
        path(&key),
    ];
    let output = run("openssl", &args, b"ping\n").await;
    let all = text(&output);
    assert!(!output.status.success(), "openssl -tls1_1 connected:\n{all}");
    assert!(!all.contains("ping"), "the probe came back:\n{all}");
    // Some openssl builds refuse TLS 1.1 themselves ("no protocols available") and may never
    // send a ClientHello; otherwise the balancer must have refused the handshake.
    if !all.contains("no protocols available") {
        f.lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)])
            .await;
    }
    assert_eq!(f.backend.accepted(), 0, "a TLS 1.1 client reached the backend");
}
