//! `[upstream.tls] server_identity`, end to end: backends whose certificates carry only a SPIFFE
//! ID are verified by that identity (exact, a pattern, a list) instead of by the name dialed, the
//! chain still verified against `ca`, and a backend with another identity is never used: its
//! handshake fails, it is counted as a connect failure, the log line names the identity found
//! and the one expected, and the client goes to a backend that matches if there is one.
//!
//! "Used" is an echo round trip through a TLS backend that completed the handshake; "refused" is
//! the client closed without a byte and the backend completing no handshake. Real rustls on both
//! sides; every certificate generated at run time (tests/common/pki.rs); 127.0.0.1 port 0.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::pki::{issue, leaf_params, root, Cert};
use common::process::Fulcrum;
use common::{backend_list, connect, toml_path, within, TempDir, TestServer};
use fulcrum::metrics::Reason;
use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const POSTGRES: &str = "spiffe://prod.example/ns/db/sa/postgres";
const OTHER: &str = "spiffe://prod.example/ns/db/sa/other";

/// A backend leaf for `names` (`spiffe://...` a URI SAN, anything else a DNS SAN) issued by
/// `issuer`, for server authentication.
fn server_leaf(issuer: &Cert, names: &[&str]) -> Cert {
    let mut params = leaf_params(names);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(params, Some(issuer))
}

/// A TLS echo backend presenting one certificate; it counts the handshakes it completed and
/// records the SNI each one asked for.
struct TlsBackend {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    sni: Arc<Mutex<Vec<Option<String>>>>,
}

impl TlsBackend {
    async fn start(cert: &Cert) -> TlsBackend {
        let config = rustls::ServerConfig::builder_with_provider(fulcrum::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.pem.as_bytes()).expect("cert PEM")],
                PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key PEM"),
            )
            .expect("backend server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TLS backend");
        let addr = listener.local_addr().expect("TLS backend address");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let (count, names) = (Arc::clone(&handshakes), Arc::clone(&sni));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count, names) = (acceptor.clone(), Arc::clone(&count), Arc::clone(&names));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let name = tls.get_ref().1.server_name().map(str::to_owned);
                    names.lock().expect("SNI list").push(name);
                    count.fetch_add(1, Ordering::SeqCst);
                    let (mut read, mut write) = tokio::io::split(&mut tls);
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        TlsBackend {
            addr,
            handshakes,
            sni,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

/// The backends' CA file, in `dir`.
fn ca_file(dir: &TempDir, ca: &Cert) -> PathBuf {
    dir.write("backend-ca.pem", &ca.pem)
}

/// A plain listener `name` in front of upstream `name` with `backends` over TLS verified
/// against `ca` with `tls_keys` (e.g. `server_identity = ...`).
fn pair(name: &str, backends: &[SocketAddr], ca: &Path, tls_keys: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{name}\"\n\
         [[upstream]]\nname = \"{name}\"\nbackends = [{}]\n[upstream.tls]\nca = {}\n{tls_keys}\n\n",
        backend_list(backends),
        toml_path(ca),
    )
}

/// Sends a probe through `listener` and returns what came back before the end of the stream:
/// the probe itself when a backend served it, nothing when the client was refused.
async fn through(lb: &TestServer, listener: &str) -> Vec<u8> {
    let mut client = connect(lb.addr(listener)).await;
    // A refused client may already be closed, or reset, when it writes: the reply decides.
    let _ = within("the probe", client.write_all(b"probe")).await;
    let _ = within("the half-close", client.shutdown()).await;
    let mut reply = Vec::new();
    let _ = within("the end of the reply", client.read_to_end(&mut reply)).await;
    reply
}

/// The sample `name{upstream="u",backend="addr"}` of the server's current metrics.
fn backend_metric(lb: &TestServer, name: &str, upstream: &str, backend: SocketAddr) -> Option<u64> {
    let metrics = fulcrum::admin::prometheus::render(&lb.current());
    let key = format!("{name}{{upstream=\"{upstream}\",backend=\"{backend}\"}}");
    metrics.lines().find_map(|line| {
        let (k, v) = line.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok())?
    })
}

#[tokio::test]
async fn a_backend_known_only_by_its_spiffe_id_is_used_when_server_identity_names_it() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let backend = TlsBackend::start(&server_leaf(&ca, &[POSTGRES])).await;
    let lb = TestServer::start(&pair(
        "db",
        &[backend.addr],
        &ca_file(&dir, &ca),
        &format!("server_identity = \"{POSTGRES}\"\nserver_name = \"postgres.db.internal\""),
    ))
    .await;
    assert_eq!(through(&lb, "db").await, b"probe");
    assert_eq!(backend.handshakes(), 1);
    assert_eq!(
        *backend.sni.lock().unwrap(),
        [Some("postgres.db.internal".to_owned())],
        "server_name is still what is sent as SNI"
    );
}

#[tokio::test]
async fn without_server_identity_a_backend_known_only_by_its_spiffe_id_is_refused_as_before() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let backend = TlsBackend::start(&server_leaf(&ca, &[POSTGRES])).await;
    let lb = TestServer::start(&pair(
        "db",
        &[backend.addr],
        &ca_file(&dir, &ca),
        "server_name = \"postgres.db.internal\"",
    ))
    .await;
    assert_eq!(through(&lb, "db").await, b"");
    assert_eq!(backend.handshakes(), 0);
}

#[tokio::test]
async fn with_a_right_and_a_wrong_backend_every_connection_goes_to_the_right_one() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let wrong = TlsBackend::start(&server_leaf(&ca, &[OTHER])).await;
    let right = TlsBackend::start(&server_leaf(&ca, &[POSTGRES])).await;
    let lb = TestServer::start(&pair(
        "db",
        &[wrong.addr, right.addr],
        &ca_file(&dir, &ca),
        &format!("server_identity = \"{POSTGRES}\""),
    ))
    .await;
    for _ in 0..6 {
        assert_eq!(through(&lb, "db").await, b"probe");
    }
    assert_eq!(right.handshakes(), 6);
    assert_eq!(wrong.handshakes(), 0, "the wrong backend completed a handshake");
    let failures = backend_metric(&lb, "fulcrum_backend_connect_failures_total", "db", wrong.addr);
    assert!(
        failures.is_some_and(|n| n >= 1),
        "the wrong backend was tried and counted: {failures:?}"
    );
    assert!(lb.rejections("db").is_empty(), "{:?}", lb.rejections("db"));
}

#[tokio::test]
async fn with_only_a_wrong_backend_the_client_is_closed_and_the_connect_failure_counted() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let wrong = TlsBackend::start(&server_leaf(&ca, &[OTHER])).await;
    let lb = TestServer::start(&pair(
        "db",
        &[wrong.addr],
        &ca_file(&dir, &ca),
        &format!("server_identity = \"{POSTGRES}\""),
    ))
    .await;
    assert_eq!(through(&lb, "db").await, b"");
    lb.wait_for_rejections("db", &[(Reason::ConnectFailed, 1)]).await;
    assert_eq!(wrong.handshakes(), 0);
    assert_eq!(
        backend_metric(&lb, "fulcrum_backend_connect_failures_total", "db", wrong.addr),
        Some(1)
    );
}

/// The binary's log names the identity the backend presented and the one expected.
#[tokio::test]
async fn a_refused_backend_identity_is_logged_naming_the_identity_found_and_expected() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let wrong = TlsBackend::start(&server_leaf(&ca, &[OTHER])).await;
    let config = dir.write(
        "fulcrum.toml",
        &pair(
            "db",
            &[wrong.addr],
            &ca_file(&dir, &ca),
            &format!("server_identity = \"{POSTGRES}\""),
        ),
    );
    let mut fulcrum = Fulcrum::run(&config);
    let addr = fulcrum.listening("db").await;
    // `fall` (3 by default) failed dials take the backend out, and that line says why.
    for _ in 0..3 {
        let mut client = connect(addr).await;
        let mut reply = Vec::new();
        let _ = within("the refused client's end", client.read_to_end(&mut reply)).await;
        assert!(reply.is_empty(), "a refused client got {reply:?}");
    }
    let expected = format!("backend certificate identity {OTHER} is not server_identity {POSTGRES}");
    let line = fulcrum
        .wait_for_line("the log line naming both identities", |line| {
            line.contains(&expected).then(|| line.to_owned())
        })
        .await;
    assert!(line.contains("backend marked down"), "{line}");
    assert_eq!(wrong.handshakes(), 0);
}

#[tokio::test]
async fn a_pattern_entry_matches_one_segment_but_not_two() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let one = TlsBackend::start(&server_leaf(&ca, &["spiffe://prod.example/ns/db/sa/postgres"])).await;
    let two = TlsBackend::start(&server_leaf(&ca, &["spiffe://prod.example/ns/db/x/sa/postgres"])).await;
    let ca_path = ca_file(&dir, &ca);
    let pattern = "server_identity = \"spiffe://prod.example/ns/*/sa/postgres\"";
    let lb = TestServer::start(&format!(
        "{}{}",
        pair("one", &[one.addr], &ca_path, pattern),
        pair("two", &[two.addr], &ca_path, pattern)
    ))
    .await;
    assert_eq!(through(&lb, "one").await, b"probe");
    assert_eq!(through(&lb, "two").await, b"");
    assert_eq!((one.handshakes(), two.handshakes()), (1, 0));
}

#[tokio::test]
async fn a_list_of_two_entries_takes_a_backend_matching_either_and_refuses_one_matching_neither() {
    let dir = TempDir::new("backend-identity");
    let ca = root("backend CA");
    let spiffe = TlsBackend::start(&server_leaf(&ca, &[POSTGRES])).await;
    let dns = TlsBackend::start(&server_leaf(&ca, &["pg.db.internal"])).await;
    let neither = TlsBackend::start(&server_leaf(&ca, &[OTHER, "db.internal"])).await;
    let ca_path = ca_file(&dir, &ca);
    let list = format!("server_identity = [\"{POSTGRES}\", \"*.db.internal\"]");
    let lb = TestServer::start(&format!(
        "{}{}{}",
        pair("spiffe", &[spiffe.addr], &ca_path, &list),
        pair("dns", &[dns.addr], &ca_path, &list),
        pair("neither", &[neither.addr], &ca_path, &list)
    ))
    .await;
    assert_eq!(through(&lb, "spiffe").await, b"probe");
    assert_eq!(through(&lb, "dns").await, b"probe");
    assert_eq!(through(&lb, "neither").await, b"");
    assert_eq!(
        (spiffe.handshakes(), dns.handshakes(), neither.handshakes()),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn a_backend_certificate_from_another_ca_is_refused_even_if_its_spiffe_id_matches() {
    let dir = TempDir::new("backend-identity");
    let trusted = root("backend CA");
    let impostor_ca = root("backend CA");
    let impostor = TlsBackend::start(&server_leaf(&impostor_ca, &[POSTGRES])).await;
    let lb = TestServer::start(&pair(
        "db",
        &[impostor.addr],
        &ca_file(&dir, &trusted),
        &format!("server_identity = \"{POSTGRES}\""),
    ))
    .await;
    assert_eq!(through(&lb, "db").await, b"");
    lb.wait_for_rejections("db", &[(Reason::ConnectFailed, 1)]).await;
    assert_eq!(impostor.handshakes(), 0);
}
