//! The identity boundary over time, end to end: CRLs at the handshake and against open
//! connections, resumption checked like a full handshake, no access straddling a reload,
//! connections closed when their certificate expires, certificate files picked up when they
//! change (`[reload] watch`), and why each handshake failed.
//!
//! Real rustls clients, certificates and CRLs generated at run time, everything on 127.0.0.1
//! port 0; every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::tls::{assert_echoes, assert_refused, client_config, connect_tls, Pki};
use common::{toml_path, wait_until, within, TestBackend, TestServer};
use fulcrum::metrics::{HandshakeFailure, Reason};
use fulcrum::pki::{Ca, Eku, LeafSpec, Pem};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, HandshakeKind};
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// `[listener.tls]` keys added to the mTLS listener, and what else the config holds.
struct Setup<'a> {
    tls_keys: &'a str,
    authorization: &'a str,
    extra: &'a str,
}

/// No extra keys; alice may reach `web`.
const ALICE: Setup<'static> = Setup {
    tls_keys: "",
    authorization: "alice = [\"web\"]",
    extra: "",
};

/// One mTLS listener `tls` in front of upstream `web` (`backend`), an access log in the PKI's
/// directory, and `setup`.
fn config(pki: &Pki, backend: SocketAddr, setup: &Setup<'_>) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nhandshake_timeout = \"5s\"\n\
         {tls}{tls_keys}\n\n[[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n\
         [authorization]\n{authorization}\n\n[access_log]\npath = {log}\n\n{extra}\n",
        tls = pki.tls_table(&pki.ca_file, "1.2"),
        tls_keys = setup.tls_keys,
        authorization = setup.authorization,
        log = toml_path(&access_log(pki)),
        extra = setup.extra,
    )
}

fn access_log(pki: &Pki) -> PathBuf {
    pki.dir.path().join("access.log")
}

/// `(identity, outcome)` of every access log entry written so far.
fn outcomes(pki: &Pki) -> Vec<(String, String)> {
    common::access_log(&access_log(pki))
        .iter()
        .map(|v| {
            (
                v["identity"].as_str().unwrap_or_default().to_string(),
                v["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until the access log holds an entry for `identity` that ended with `outcome`.
async fn wait_for_outcome(pki: &Pki, identity: &str, outcome: &str) {
    wait_until(
        &format!("an access log entry for {identity} ending {outcome}"),
        || outcomes(pki).iter().any(|(i, o)| i == identity && o == outcome),
    )
    .await;
}

/// A CRL file in the PKI's directory revoking `revoked` (certificates of `ca`).
fn write_crl(pki: &Pki, ca: &Ca, name: &str, revoked: &[&Pem]) -> PathBuf {
    let certs: Vec<&str> = revoked.iter().map(|p| p.cert.as_str()).collect();
    let next_update = SystemTime::now() + Duration::from_secs(3600);
    let crl = ca.crl(&certs, next_update).expect("sign a CRL");
    pki.dir.write(name, &crl)
}

fn crl_key(path: &Path) -> String {
    format!("crl = {}\n", toml_path(path))
}

fn handshake_failures(lb: &TestServer, failure: HandshakeFailure) -> u64 {
    lb.current()
        .listener("tls")
        .expect("listener tls")
        .handshake_failures
        .get(failure)
}

/// A client certificate for `name` valid from a minute ago until `lifetime` from now.
fn short_lived(pki: &Pki, name: &str, lifetime: Duration) -> Pem {
    let spec = LeafSpec {
        not_before: SystemTime::now() - Duration::from_secs(60),
        not_after: SystemTime::now() + lifetime,
        ..LeafSpec::client(name)
    };
    pki.ca.leaf(&spec).expect("issue a short-lived certificate")
}

/// The `notAfter` of a PEM certificate, as an instant.
fn not_after(pem: &Pem) -> SystemTime {
    let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("certificate PEM");
    fulcrum::identity::not_after(&der).expect("certificate parses")
}

/// Waits until `pem` has expired: `notAfter` is the last second of its validity (RFC 5280).
async fn wait_until_expired(pem: &Pem) {
    let at = not_after(pem) + Duration::from_secs(1);
    within("the certificate to expire", async {
        while SystemTime::now() <= at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];

fn kind(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<HandshakeKind> {
    stream.get_ref().1.handshake_kind()
}

/// A full connection that echoes once (which also takes in a TLS 1.3 session ticket), closed.
async fn served(addr: SocketAddr, client: &Arc<ClientConfig>, probe: &[u8]) -> Option<HandshakeKind> {
    let mut stream = connect_tls(addr, client, "localhost").await.expect("handshake");
    assert_echoes(&mut stream, probe).await;
    kind(&stream)
}

// ---------------------------------------------------------------------------------------------
// CRLs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_at_the_handshake_while_its_sibling_is_served() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let alice = pki.client("alice");
    let bob = pki.client("bob");
    let crl = write_crl(&pki, &pki.ca, "ca.crl", &[&alice]);
    let text = config(
        &pki,
        echo.addr,
        &Setup {
            tls_keys: &crl_key(&crl),
            authorization: "alice = [\"web\"]\nbob = [\"web\"]",
            extra: "",
        },
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");

    assert_refused(connect_tls(addr, &pki.client_config(Some(&alice)), "localhost").await).await;
    wait_until("alice's handshake counted as revoked", || {
        handshake_failures(&lb, HandshakeFailure::Revoked) == 1
    })
    .await;
    assert_eq!(echo.accepted(), 0, "a revoked client reached the backend");
    served(addr, &pki.client_config(Some(&bob)), b"bob is not revoked").await;
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_of_another_ca_corrupt_or_missing_are_refused_by_check_and_by_reload() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let other = Ca::new("another CA").expect("generate CA");
    let foreign = write_crl(&pki, &other, "other.crl", &[]);
    let corrupt = pki.dir.write(
        "corrupt.crl",
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    );
    let missing = pki.dir.path().join("missing.crl");
    let setup = |tls_keys: &str| {
        config(
            &pki,
            echo.addr,
            &Setup {
                tls_keys,
                authorization: "alice = [\"web\"]",
                extra: "",
            },
        )
    };
    let path = pki.dir.write("fulcrum.toml", &setup(""));
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));

    for (crl, expected) in [
        (&foreign, "not signed by a CA certificate of client_ca"),
        (&corrupt, "corrupt.crl"),
        (&missing, "missing.crl"),
    ] {
        let text = setup(&crl_key(crl));
        let checked = fulcrum::Config::from_toml(&text, "t").expect("the TOML is valid");
        let error = fulcrum::validate(&checked)
            .expect_err("check refuses the CRL")
            .to_string();
        assert!(error.contains(expected), "{error}");
        let refused = lb
            .reload_file(&path, &text)
            .await
            .expect_err("reload refuses the CRL");
        assert!(refused.to_string().contains(expected), "{refused}");
        served(addr, &alice, b"the old configuration serves").await;
    }
    assert_eq!(lb.current().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_with_open_connections_closes_exactly_its_connections_on_reload() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let alice = pki.client("alice");
    let bob = pki.client("bob");
    let authorization = "alice = [\"web\"]\nbob = [\"web\"]";
    let empty = write_crl(&pki, &pki.ca, "ca.crl", &[]);
    let setup = Setup {
        tls_keys: &crl_key(&empty),
        authorization,
        extra: "",
    };
    let path = pki.dir.write("fulcrum.toml", &config(&pki, echo.addr, &setup));
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice_client = pki.client_config(Some(&alice));
    let mut a1 = connect_tls(addr, &alice_client, "localhost")
        .await
        .expect("alice 1");
    let mut a2 = connect_tls(addr, &alice_client, "localhost")
        .await
        .expect("alice 2");
    let mut b = connect_tls(addr, &pki.client_config(Some(&bob)), "localhost")
        .await
        .expect("bob");
    for stream in [&mut a1, &mut a2, &mut b] {
        assert_echoes(stream, b"before the revocation").await;
    }

    write_crl(&pki, &pki.ca, "ca.crl", &[&alice]);
    lb.reload_file(&path, &config(&pki, echo.addr, &setup))
        .await
        .expect("reload with the new CRL");

    common::assert_ends(&mut a1, "alice's first connection").await;
    common::assert_ends(&mut a2, "alice's second connection").await;
    assert_echoes(&mut b, b"bob keeps flowing").await;
    wait_until("both of alice's connections logged as access_revoked", || {
        outcomes(&pki)
            .iter()
            .filter(|(i, o)| i == "alice" && o == "access_revoked")
            .count()
            == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_a_new_crl_closes_the_revoked_clients_connections_without_a_signal() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let alice = pki.client("alice");
    let bob = pki.client("bob");
    let crl = write_crl(&pki, &pki.ca, "ca.crl", &[]);
    let setup = Setup {
        tls_keys: &crl_key(&crl),
        authorization: "alice = [\"web\"]\nbob = [\"web\"]",
        extra: "[reload]\nwatch = true\ndebounce = \"200ms\"\n",
    };
    let path = pki.dir.write("fulcrum.toml", &config(&pki, echo.addr, &setup));
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let mut a = connect_tls(addr, &pki.client_config(Some(&alice)), "localhost")
        .await
        .expect("alice");
    let mut b = connect_tls(addr, &pki.client_config(Some(&bob)), "localhost")
        .await
        .expect("bob");
    assert_echoes(&mut a, b"alice").await;
    assert_echoes(&mut b, b"bob").await;

    // A new CRL, written next to the old one and renamed over it, as a CRL updater would.
    let next = write_crl(&pki, &pki.ca, "ca.crl.new", &[&alice]);
    std::fs::rename(&next, &crl).expect("rename the new CRL into place");
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0) | Err(_))),
        "alice's connection was not closed within 5 s of the CRL change: {ended:?}"
    );
    assert_echoes(&mut b, b"bob keeps flowing").await;
    assert_eq!(lb.current().generation, 2, "one reload, by the watch");
    wait_for_outcome(&pki, "alice", "access_revoked").await;
}

// ---------------------------------------------------------------------------------------------
// Resumption

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_and_tls12_sessions_resume_while_the_certificate_is_valid() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let lb = TestServer::start(&config(&pki, echo.addr, &ALICE)).await;
    let addr = lb.addr("tls");
    let alice = pki.client("alice");
    for versions in [&TLS13[..], &TLS12[..]] {
        let client = client_config(&pki.ca.cert_pem(), Some(&alice), versions);
        assert_eq!(served(addr, &client, b"first").await, Some(HandshakeKind::Full));
        assert_eq!(
            served(addr, &client, b"resumed").await,
            Some(HandshakeKind::Resumed)
        );
    }
    assert_eq!(echo.accepted(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumption_after_the_client_certificate_expired_is_refused() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let lb = TestServer::start(&config(&pki, echo.addr, &ALICE)).await;
    let addr = lb.addr("tls");
    let alice = short_lived(&pki, "alice", Duration::from_secs(4));
    let clients = [
        client_config(&pki.ca.cert_pem(), Some(&alice), &TLS13),
        client_config(&pki.ca.cert_pem(), Some(&alice), &TLS12),
    ];
    for client in &clients {
        assert_eq!(
            served(addr, client, b"while valid").await,
            Some(HandshakeKind::Full)
        );
    }
    wait_until_expired(&alice).await;

    for client in &clients {
        let resumed = connect_tls(addr, client, "localhost").await;
        if let Ok(stream) = &resumed {
            assert_eq!(
                kind(stream),
                Some(HandshakeKind::Resumed),
                "the client resumed its session"
            );
        }
        assert_refused(resumed).await;
    }
    wait_until("both resumptions counted as expired", || {
        handshake_failures(&lb, HandshakeFailure::Expired) == 2
    })
    .await;
    assert_eq!(echo.accepted(), 2, "an expired resumption reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumptions_after_a_revocation_or_a_lost_authorization_are_refused() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let alice = pki.client("alice");
    let bob = pki.client("bob");
    let crl = write_crl(&pki, &pki.ca, "ca.crl", &[]);
    let both = "alice = [\"web\"]\nbob = [\"web\"]";
    let text = |authorization: &str| {
        config(
            &pki,
            echo.addr,
            &Setup {
                tls_keys: &crl_key(&crl),
                authorization,
                extra: "",
            },
        )
    };
    let path = pki.dir.write("fulcrum.toml", &text(both));
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice_client = client_config(&pki.ca.cert_pem(), Some(&alice), &TLS13);
    let bob_client = client_config(&pki.ca.cert_pem(), Some(&bob), &TLS12);
    served(addr, &alice_client, b"alice").await;
    served(addr, &bob_client, b"bob").await;

    // Alice is revoked; bob loses his authorization.
    write_crl(&pki, &pki.ca, "ca.crl", &[&alice]);
    lb.reload_file(&path, &text("alice = [\"web\"]"))
        .await
        .expect("reload");
    assert_refused(connect_tls(addr, &alice_client, "localhost").await).await;
    assert_refused(connect_tls(addr, &bob_client, "localhost").await).await;
    wait_until("alice revoked and bob unauthorized", || {
        let state = lb.current();
        let listener = state.listener("tls").expect("listener tls");
        listener.handshake_failures.get(HandshakeFailure::Revoked) == 1
            && listener.rejected.get(Reason::Unauthorized) == 1
    })
    .await;
    assert_eq!(echo.accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// Reloads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_before_a_reload_that_removes_its_identity_and_handshaking_after_it_is_refused() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let setup = |authorization| Setup {
        tls_keys: "",
        authorization,
        extra: "",
    };
    let path = pki.dir.write(
        "fulcrum.toml",
        &config(&pki, echo.addr, &setup("alice = [\"web\"]")),
    );
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    wait_until("the balancer accepted the connection", || {
        lb.current().listener("tls").expect("tls").accepted.get() == 1
    })
    .await;

    lb.reload_file(&path, &config(&pki, echo.addr, &setup("bob = [\"web\"]")))
        .await
        .expect("reload");
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(Some(&pki.client("alice"))));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    assert_refused(within("alice's handshake", connector.connect(name, tcp)).await).await;
    wait_until("alice refused as unauthorized", || {
        lb.current()
            .listener("tls")
            .expect("tls")
            .rejected
            .get(Reason::Unauthorized)
            == 1
    })
    .await;
    assert_eq!(echo.accepted(), 0, "the backend was dialed");
}

// ---------------------------------------------------------------------------------------------
// Expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_when_its_certificate_expires_unless_close_on_expiry_is_off() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let keep = format!(
        "[[listener]]\nname = \"keep\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{}close_on_expiry = false\n",
        pki.tls_table(&pki.ca_file, "1.2")
    );
    let setup = Setup {
        tls_keys: "",
        authorization: "alice = [\"web\"]",
        extra: &keep,
    };
    let lb = TestServer::start(&config(&pki, echo.addr, &setup)).await;
    let alice = short_lived(&pki, "alice", Duration::from_secs(3));
    let client = pki.client_config(Some(&alice));
    let mut closing = connect_tls(lb.addr("tls"), &client, "localhost")
        .await
        .expect("tls");
    let mut kept = connect_tls(lb.addr("keep"), &client, "localhost")
        .await
        .expect("keep");
    assert_echoes(&mut closing, b"before expiry").await;
    assert_echoes(&mut kept, b"before expiry").await;

    common::assert_ends(&mut closing, "the expiring connection").await;
    assert!(
        SystemTime::now() >= not_after(&alice),
        "closed before the certificate expired"
    );
    wait_for_outcome(&pki, "alice", "cert_expired").await;
    assert_echoes(&mut kept, b"close_on_expiry = false keeps it open").await;
}

// ---------------------------------------------------------------------------------------------
// Watching files

/// Waits until a new client is served the certificate `pem`.
async fn wait_until_served(addr: SocketAddr, client: &Arc<ClientConfig>, pem: &str) {
    let want = CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM");
    within("the new server certificate to be served", async {
        loop {
            if let Ok(stream) = connect_tls(addr, client, "localhost").await {
                let served = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                if served.as_ref() == Some(&want) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

fn watched(echo: SocketAddr, cert: &Path, key: &Path) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [listener.tls]\ncert = {}\nkey = {}\n\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{echo}\"]\n\n[reload]\nwatch = true\ndebounce = \"200ms\"\n",
        toml_path(cert),
        toml_path(key),
    )
}

/// A balancer watching the PKI's server certificate; a client trusting it; the certificate now.
async fn start_watched(pki: &Pki, echo: &TestBackend) -> (TestServer, Arc<ClientConfig>, String) {
    let path = pki.dir.write(
        "fulcrum.toml",
        &watched(echo.addr, &pki.server_cert, &pki.server_key),
    );
    let lb = TestServer::start_file(&path).await;
    let old = std::fs::read_to_string(&pki.server_cert).expect("server cert");
    (lb, pki.client_config(None), old)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_an_atomically_renamed_server_certificate_is_served_to_the_next_client() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (lb, client, old) = start_watched(&pki, &echo).await;
    wait_until_served(lb.addr("tls"), &client, &old).await;

    let renewed = pki.ca.server(&[]).expect("renew the server certificate");
    let key = pki.dir.write("server.key.tmp", &renewed.key);
    let cert = pki.dir.write("server.pem.tmp", &renewed.cert);
    std::fs::rename(key, &pki.server_key).expect("rename the key into place");
    std::fs::rename(cert, &pki.server_cert).expect("rename the certificate into place");
    wait_until_served(lb.addr("tls"), &client, &renewed.cert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_a_kubernetes_data_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let secret = pki.dir.path().join("secret");
    let version = |name: &str, pem: &Pem| {
        let dir = secret.join(name);
        std::fs::create_dir_all(&dir).expect("version directory");
        std::fs::write(dir.join("tls.crt"), &pem.cert).expect("tls.crt");
        std::fs::write(dir.join("tls.key"), &pem.key).expect("tls.key");
    };
    let first = pki.ca.server(&[]).expect("server certificate");
    version("..2026_12_01_first", &first);
    symlink("..2026_12_01_first", secret.join("..data")).expect("..data");
    symlink("..data/tls.crt", secret.join("tls.crt")).expect("tls.crt link");
    symlink("..data/tls.key", secret.join("tls.key")).expect("tls.key link");
    let path = pki.dir.write(
        "fulcrum.toml",
        &watched(echo.addr, &secret.join("tls.crt"), &secret.join("tls.key")),
    );
    let lb = TestServer::start_file(&path).await;
    let client = pki.client_config(None);
    wait_until_served(lb.addr("tls"), &client, &first.cert).await;

    // What the kubelet does: a new version directory, a temporary link to it, renamed over ..data.
    let second = pki.ca.server(&[]).expect("renewed server certificate");
    version("..2026_12_02_second", &second);
    symlink("..2026_12_02_second", secret.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).expect("swap ..data");
    wait_until_served(lb.addr("tls"), &client, &second.cert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_a_bad_new_certificate_leaves_the_old_one_in_force() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (lb, client, old) = start_watched(&pki, &echo).await;

    std::fs::write(&pki.server_cert, "not a certificate\n").expect("break the certificate");
    wait_until("the watch tried a reload and it was refused", || {
        lb.current().reloads.failed.get() == 1
    })
    .await;
    assert_eq!(lb.current().generation, 1);
    wait_until_served(lb.addr("tls"), &client, &old).await;

    // Fixed, it is picked up on the next change.
    let renewed = pki.ca.server(&[]).expect("server certificate");
    std::fs::write(&pki.server_key, &renewed.key).expect("key");
    std::fs::write(&pki.server_cert, &renewed.cert).expect("cert");
    wait_until_served(lb.addr("tls"), &client, &renewed.cert).await;
}

// ---------------------------------------------------------------------------------------------
// Why handshakes fail

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handshake_failure_is_counted_by_its_reason() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let other = Ca::new("a CA without a CRL").expect("generate CA");
    let bundle = pki.dir.write(
        "bundle.pem",
        &format!("{}{}", pki.ca.cert_pem(), other.cert_pem()),
    );
    let revoked = pki.client("mallory");
    let crl = write_crl(&pki, &pki.ca, "ca.crl", &[&revoked]);
    let text = format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nhandshake_timeout = \"500ms\"\n\
         {}{}\n[[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n[authorization]\nalice = [\"web\"]\n",
        pki.tls_table(&bundle, "1.2"),
        crl_key(&crl),
        echo.addr
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");
    let now = SystemTime::now();
    let leaf = |spec: LeafSpec| pki.ca.leaf(&spec).expect("issue a certificate");
    let expired = leaf(LeafSpec {
        not_before: now - Duration::from_secs(7200),
        not_after: now - Duration::from_secs(3600),
        ..LeafSpec::client("alice")
    });
    let early = leaf(LeafSpec {
        not_before: now + Duration::from_secs(3600),
        not_after: now + Duration::from_secs(7200),
        ..LeafSpec::client("alice")
    });
    let server_only = leaf(LeafSpec {
        eku: Eku::ServerAuth,
        ..LeafSpec::client("alice")
    });
    let stranger = Ca::new("an unknown CA")
        .expect("CA")
        .client("alice")
        .expect("cert");
    let uncovered = other.client("alice").expect("cert from the CA without a CRL");
    let trusting = |pem: Option<&Pem>| pki.client_config(pem);
    let cases: Vec<(HandshakeFailure, Option<Pem>)> = vec![
        (HandshakeFailure::NoCertificate, None),
        (HandshakeFailure::UnknownCa, Some(stranger)),
        (HandshakeFailure::Expired, Some(expired)),
        (HandshakeFailure::NotYetValid, Some(early)),
        (HandshakeFailure::Revoked, Some(revoked)),
        (HandshakeFailure::RevocationUnknown, Some(uncovered)),
        (HandshakeFailure::BadUsage, Some(server_only)),
    ];
    for (failure, pem) in &cases {
        assert_refused(connect_tls(addr, &trusting(pem.as_ref()), "localhost").await).await;
        wait_until(&format!("one {} counted", failure.label()), || {
            handshake_failures(&lb, *failure) == 1
        })
        .await;
    }
    // Protocol: plaintext where a ClientHello belongs.
    let mut plain = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // rustls answers with an alert (a few bytes), then closes.
    let _ = common::tls::read_to_end_bounded(&mut plain, 64).await;
    // Closed: the client goes away mid-handshake. Timeout: it says nothing.
    drop(
        within("connect", TcpStream::connect(addr))
            .await
            .expect("connect"),
    );
    let mut silent = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    common::assert_ends(&mut silent, "the silent connection").await;
    for failure in [
        HandshakeFailure::Protocol,
        HandshakeFailure::Closed,
        HandshakeFailure::Timeout,
    ] {
        wait_until(&format!("one {} counted", failure.label()), || {
            handshake_failures(&lb, failure) == 1
        })
        .await;
    }
    let metrics = fulcrum::admin::prometheus::render(&lb.current());
    for failure in HandshakeFailure::ALL {
        let line = format!(
            "fulcrum_tls_handshake_failures_total{{listener=\"tls\",reason=\"{}\"}} 1",
            failure.label()
        );
        // Malformed certificates rustls cannot even parse, the ALPN reasons (tests/alpn.rs) and
        // those of name constraints and trust domains (tests/production_pki.rs) are not
        // provoked here.
        let provoked = !matches!(
            failure,
            HandshakeFailure::BadCertificate
                | HandshakeFailure::NoApplicationProtocol
                | HandshakeFailure::NoAlpn
                | HandshakeFailure::NameConstraints
                | HandshakeFailure::TrustDomain
        );
        if provoked {
            assert!(metrics.contains(&line), "missing {line}");
        }
    }
    assert_eq!(echo.accepted(), 0, "a refused client reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_identity_from_cn_a_certificate_named_only_by_its_common_name_is_refused() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let setup = Setup {
        tls_keys: "identity_from_cn = false\n",
        authorization: "alice = [\"web\"]",
        extra: "",
    };
    let lb = TestServer::start(&config(&pki, echo.addr, &setup)).await;
    let addr = lb.addr("tls");
    let cn_only = pki
        .ca
        .leaf(&LeafSpec {
            dns_sans: Vec::new(),
            ..LeafSpec::client("alice")
        })
        .expect("certificate");
    assert_refused(connect_tls(addr, &pki.client_config(Some(&cn_only)), "localhost").await).await;
    served(
        addr,
        &pki.client_config(Some(&pki.client("alice"))),
        b"a DNS SAN still counts",
    )
    .await;
    assert_eq!(
        lb.current()
            .listener("tls")
            .expect("tls")
            .rejected
            .get(Reason::Unauthorized),
        1
    );
    assert_eq!(echo.accepted(), 1);
}
