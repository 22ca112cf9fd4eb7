//! ALPN end to end: real gRPC clients (Python grpcio, installed by scripts/test) through an mTLS
//! listener that offers `h2`, curl and openssl s_client negotiating (or failing to), the
//! negotiated protocol carried to backends (PROXY v2 TLV, upstream TLS), routing by ALPN with
//! authorization per upstream, and `alpn_required`.
//!
//! Everything on 127.0.0.1 port 0; certificates generated at run time; every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::tls::{assert_echoes, assert_refused, connect_tls, Pki};
use common::{toml_path, wait_until, within, TestBackend, TestServer};
use fulcrum::metrics::{HandshakeFailure, Reason};
use rustls::ClientConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// The Python with grpcio that scripts/test installs (`FULCRUM_TEST_PYTHON` overrides).
fn python() -> PathBuf {
    let python = std::env::var_os("FULCRUM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with grpcio at {}: run the tests with scripts/test, which installs it",
        python.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/grpc")
        .join(name)
}

/// A TCP relay to `target` that counts the connections it is given.
struct CountingRelay {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl CountingRelay {
    async fn start(target: SocketAddr) -> CountingRelay {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = socket.local_addr().expect("relay address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = socket.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        CountingRelay { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// One mTLS listener `tls` (`tls_keys` added to its `[listener.tls]`, `listener_tables` after
/// it) in front of upstream `web` (`backend`), then `rest`.
fn config(pki: &Pki, tls_keys: &str, listener_tables: &str, backend: SocketAddr, rest: &str) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{}{tls_keys}\n{listener_tables}\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n{rest}\n",
        pki.tls_table(&pki.ca_file, "1.2"),
    )
}

/// [`config`] with no listener tables and alice authorized for `web`.
fn alice_config(pki: &Pki, tls_keys: &str, backend: SocketAddr) -> String {
    config(pki, tls_keys, "", backend, "[authorization]\nalice = [\"web\"]\n")
}

/// Connections listener `tls` refused as unauthorized so far.
fn unauthorized(lb: &TestServer) -> u64 {
    lb.current()
        .listener("tls")
        .expect("tls")
        .rejected
        .get(Reason::Unauthorized)
}

fn with_alpn(config: Arc<ClientConfig>, protocols: &[&str]) -> Arc<ClientConfig> {
    let mut config = (*config).clone();
    config.alpn_protocols = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

fn negotiated(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<String> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

fn handshake_failures(lb: &TestServer, failure: HandshakeFailure) -> u64 {
    lb.current()
        .listener("tls")
        .expect("tls")
        .handshake_failures
        .get(failure)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_grpc_client_makes_unary_and_streaming_calls_through_an_mtls_listener_offering_h2() {
    let pki = Pki::new(&[]);
    let mut server = Command::new(python())
        .arg(script("server.py"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gRPC backend");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let port: u16 = within("the gRPC backend's port", lines.next_line())
        .await
        .expect("read")
        .and_then(|l| l.strip_prefix("PORT ")?.parse().ok())
        .expect("PORT line");
    let relay = CountingRelay::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let text = alice_config(&pki, "alpn = [\"h2\"]\n", relay.addr);
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");

    let client = |name: &str| {
        let (cert, key) = pki.write_pem(name, &pki.client(name));
        let mut command = Command::new(python());
        command
            .arg(script("client.py"))
            .arg(addr.to_string())
            .arg("localhost")
            .arg(&pki.ca_file)
            .arg(cert)
            .arg(key);
        command
    };
    let alice = within("alice's gRPC calls", client("alice").output())
        .await
        .expect("run the client");
    let said = String::from_utf8_lossy(&alice.stdout);
    assert!(
        alice.status.success(),
        "alice: {said} {}",
        String::from_utf8_lossy(&alice.stderr)
    );
    assert_eq!(said.trim(), "ok 28", "8 unary calls and 4 streams of 5 messages");
    assert_eq!(relay.connections(), 1, "the calls shared one connection");

    let bob = within("bob's gRPC calls", client("bob").output())
        .await
        .expect("run the client");
    assert!(
        !bob.status.success(),
        "bob got a call through: {}",
        String::from_utf8_lossy(&bob.stdout)
    );
    assert!(
        String::from_utf8_lossy(&bob.stdout).contains("rpc failed"),
        "{bob:?}"
    );
    assert_eq!(relay.connections(), 1, "the backend saw a connection for bob");
    assert!(unauthorized(&lb) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_negotiates_h2_or_http1_1_as_it_asks() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = alice_config(&pki, "alpn = [\"h2\", \"http/1.1\"]\n", echo.addr);
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");
    let (cert, key) = pki.write_pem("alice", &pki.client("alice"));
    for (flag, protocol) in [("--http2", "h2"), ("--http1.1", "http/1.1")] {
        let output = within(
            "curl",
            Command::new("curl")
                .args(["-sv", "--max-time", "5", flag, "--cacert"])
                .arg(&pki.ca_file)
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg(format!("https://localhost:{}/", addr.port()))
                .output(),
        )
        .await
        .expect("run curl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("ALPN: server accepted {protocol}")),
            "{flag}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_only_other_protocols_is_refused_with_no_application_protocol() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = alice_config(&pki, "alpn = [\"h2\"]\n", echo.addr);
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");
    let (cert, key) = pki.write_pem("alice", &pki.client("alice"));
    let output = within(
        "openssl s_client",
        Command::new("openssl")
            .args([
                "s_client",
                "-alpn",
                "foo",
                "-connect",
                &addr.to_string(),
                "-CAfile",
            ])
            .arg(&pki.ca_file)
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("run openssl");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("no application protocol"), "{said}");
    wait_until("the refusal counted by its reason", || {
        handshake_failures(&lb, HandshakeFailure::NoApplicationProtocol) == 1
    })
    .await;
    assert_eq!(echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_v2_header_to_the_backend_carries_the_alpn_tlv() {
    let pki = Pki::new(&[]);
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = backend.local_addr().expect("address");
    let text = alice_config(&pki, "alpn = [\"h2\", \"http/1.1\"]\n", backend_addr)
        .replace("backends = [", "proxy_protocol = \"v2\"\nbackends = [");
    let lb = TestServer::start(&text).await;
    let client = with_alpn(pki.client_config(Some(&pki.client("alice"))), &["http/1.1"]);
    let stream = connect_tls(lb.addr("tls"), &client, "localhost")
        .await
        .expect("handshake");
    assert_eq!(negotiated(&stream).as_deref(), Some("http/1.1"));
    let (mut accepted, _) = within("the backend's connection", backend.accept())
        .await
        .expect("accept");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let header = fulcrum::proxy_protocol::reader::read_header(&mut accepted, deadline)
        .await
        .expect("a PROXY v2 header");
    assert_eq!(header.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(header.ssl.and_then(|s| s.cn).as_deref(), Some("alice"));
}

/// A TLS backend offering `protocols`; each handshake's negotiated protocol goes to the channel.
async fn tls_backend(
    pki: &Pki,
    protocols: &[&str],
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Option<String>>) {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = backend.local_addr().expect("address");
    let tls = fulcrum::config::TlsConfig {
        alpn: protocols.iter().map(|p| p.to_string()).collect(),
        ..fulcrum::config::TlsConfig::new(&pki.server_cert, &pki.server_key)
    };
    let acceptor =
        tokio_rustls::TlsAcceptor::from(fulcrum::tls::server_config(&tls).expect("backend TLS").config);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = backend.accept().await {
            if let Ok(mut tls) = acceptor.accept(stream).await {
                let _ = tx.send(
                    tls.get_ref()
                        .1
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned()),
                );
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_offers_the_clients_protocol_with_alpn_client_or_a_fixed_list() {
    let pki = Pki::new(&[]);
    for (upstream_alpn, client_protocol, backend_sees) in [
        ("\"client\"", "h2", Some("h2")),
        ("\"client\"", "http/1.1", Some("http/1.1")),
        ("[\"http/1.1\"]", "h2", Some("http/1.1")),
    ] {
        let (backend, mut seen) = tls_backend(&pki, &["h2", "http/1.1"]).await;
        let text = format!(
            "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{}alpn = [\"h2\", \"http/1.1\"]\n\n\
             [[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n[upstream.tls]\nca = {}\nalpn = {upstream_alpn}\n\n\
             [authorization]\nalice = [\"web\"]\n",
            pki.tls_table(&pki.ca_file, "1.2"),
            toml_path(&pki.ca_file),
        );
        let lb = TestServer::start(&text).await;
        let client = with_alpn(pki.client_config(Some(&pki.client("alice"))), &[client_protocol]);
        let mut stream = connect_tls(lb.addr("tls"), &client, "localhost")
            .await
            .expect("handshake");
        assert_echoes(&mut stream, b"through TLS to the backend").await;
        let got = within("the backend's handshake", seen.recv())
            .await
            .expect("a handshake");
        assert_eq!(
            got.as_deref(),
            backend_sees,
            "upstream alpn {upstream_alpn}, client {client_protocol}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_routes_send_h2_and_http1_1_to_different_upstreams_each_authorized_on_its_own() {
    let pki = Pki::new(&[]);
    let web = TestBackend::echo().await;
    let grpc = TestBackend::echo().await;
    let text = config(
        &pki,
        "alpn = [\"h2\", \"http/1.1\"]\n",
        "[listener.alpn]\n\"h2\" = \"grpc\"\n",
        web.addr,
        &format!(
            "[[upstream]]\nname = \"grpc\"\nbackends = [\"{}\"]\n\n[authorization]\nalice = [\"web\", \"grpc\"]\ncarol = [\"grpc\"]\n",
            grpc.addr
        ),
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let carol = pki.client_config(Some(&pki.client("carol")));
    for (client, protocol) in [(&alice, "h2"), (&alice, "http/1.1"), (&carol, "h2")] {
        let mut stream = connect_tls(addr, &with_alpn(Arc::clone(client), &[protocol]), "localhost")
            .await
            .expect("handshake");
        assert_eq!(negotiated(&stream).as_deref(), Some(protocol));
        assert_echoes(&mut stream, protocol.as_bytes()).await;
    }
    assert_eq!((grpc.accepted(), web.accepted()), (2, 1));
    // carol may reach grpc only: her http/1.1 connection goes to web, and is refused.
    assert_refused(connect_tls(addr, &with_alpn(carol, &["http/1.1"]), "localhost").await).await;
    wait_until("carol refused", || unauthorized(&lb) == 1).await;
    assert_eq!((grpc.accepted(), web.accepted()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_required_refuses_a_client_that_offers_no_alpn_before_any_dial() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let text = alice_config(&pki, "alpn = [\"h2\"]\nalpn_required = true\n", echo.addr);
    let lb = TestServer::start(&text).await;
    let alice = pki.client_config(Some(&pki.client("alice")));
    assert_refused(connect_tls(lb.addr("tls"), &alice, "localhost").await).await;
    wait_until("no_alpn counted", || {
        handshake_failures(&lb, HandshakeFailure::NoAlpn) == 1
    })
    .await;
    assert_eq!(echo.accepted(), 0);
    let mut h2 = connect_tls(lb.addr("tls"), &with_alpn(alice, &["h2"]), "localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut h2, b"with h2").await;
}

#[test]
fn the_grpc_example_config_is_valid() {
    let text = include_str!("../examples/grpc.toml");
    let config = fulcrum::Config::from_toml(text, "examples/grpc.toml").expect("examples/grpc.toml is valid");
    let tls = config.listeners[0].tls.as_ref().expect("TLS");
    assert_eq!(
        (tls.alpn.as_slice(), tls.alpn_required),
        (&["h2".to_string()][..], true)
    );
}
