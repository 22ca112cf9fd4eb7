//! End-to-end tests of `[[listener.tls.certificate]]`: several certificates on one TLS listener,
//! chosen by the client's SNI, each with its own client trust and authorization.
//!
//! Real rustls clients against the server in process; every refusal is proved by a backend that
//! saw no connection, and every choice by the server certificate the client received.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::tls::{assert_echoes, assert_refused, connect_tls, Pki};
use common::{backend_list, toml_path, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use fulcrum::pki::{Ca, Pem};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, NamedGroup};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A server certificate issued by the test CA, written to its directory.
struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

/// Issues a server certificate for `names` (plus `localhost`) from `pki`'s CA, as `<stem>.pem`.
fn server_cert(pki: &Pki, stem: &str, names: &[&str]) -> ServerCert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let pem = pki.ca.server(&names).expect("issue server certificate");
    ServerCert {
        cert: pki.dir.write(&format!("{stem}.pem"), &pem.cert),
        key: pki.dir.write(&format!("{stem}.key"), &pem.key),
        der: CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("server cert PEM"),
    }
}

/// `pki`'s listener-level certificate, as a [`ServerCert`].
fn listener_cert(pki: &Pki) -> ServerCert {
    let pem = std::fs::read(&pki.server_cert).expect("read server.pem");
    ServerCert {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        der: CertificateDer::from_pem_slice(&pem).expect("server cert PEM"),
    }
}

/// `cert = ...` and `key = ...` lines for `c`.
fn cert_keys(c: &ServerCert) -> String {
    format!("cert = {}\nkey = {}\n", toml_path(&c.cert), toml_path(&c.key))
}

/// A `[[listener.tls.certificate]]` entry for `names` serving `c`, with `extra` keys.
fn entry(names: &[&str], c: &ServerCert, extra: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "[[listener.tls.certificate]]\nserver_names = [{}]\n{}{extra}\n",
        names.join(", "),
        cert_keys(c)
    )
}

/// A CA for clients, its file written to `pki`'s directory.
fn client_ca(pki: &Pki, stem: &str) -> (Ca, PathBuf) {
    let ca = Ca::new(&format!("{stem} client CA")).expect("generate CA");
    let file = pki.dir.write(&format!("{stem}.pem"), &ca.cert_pem());
    (ca, file)
}

/// One TLS listener `tls` (its `[listener.tls]` keys `tls`, then `entries`, routes `sni`) to
/// upstream `fallback`, and an upstream per `(name, backend)`; then `rest`.
fn config(tls: &str, entries: &str, sni: &str, upstreams: &[(&str, SocketAddr)], rest: &str) -> String {
    let upstreams: String = upstreams
        .iter()
        .map(|(name, addr)| {
            format!(
                "[[upstream]]\nname = {name:?}\nbackends = [{}]\n",
                backend_list(&[*addr])
            )
        })
        .collect();
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"fallback\"\n[listener.sni]\n{sni}\n\
         [listener.tls]\n{tls}\n{entries}\n{upstreams}\n{rest}\n"
    )
}

/// A client trusting `pki`'s CA, presenting `cert`.
fn client(pki: &Pki, cert: Option<&Pem>) -> Arc<ClientConfig> {
    pki.client_config(cert)
}

/// The server certificate the client received (the leaf).
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate");
    chain[0].clone().into_owned()
}

/// Connects for `sni`, asserts the server certificate is `expected`'s and the connection echoes.
async fn assert_served(lb: &TestServer, config: &Arc<ClientConfig>, sni: &str, expected: &ServerCert) {
    let mut stream = connect_tls(lb.addr("tls"), config, sni).await.expect("handshake");
    assert!(
        served(&stream) == expected.der,
        "for {sni:?} the server sent another certificate"
    );
    assert_echoes(&mut stream, sni.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_entry_serves_its_clients_its_own_certificate_and_refuses_the_other_entrys_clients() {
    let pki = Pki::new(&[]);
    let (ca_a, ca_a_file) = client_ca(&pki, "a-ca");
    let (ca_b, ca_b_file) = client_ca(&pki, "b-ca");
    let (a_cert, b_cert) = (
        server_cert(&pki, "a", &["a.example"]),
        server_cert(&pki, "b", &["b.example"]),
    );
    let (fallback, a, b) = (
        TestBackend::echo().await,
        TestBackend::echo().await,
        TestBackend::echo().await,
    );
    let entries = format!(
        "{}{}",
        entry(
            &["a.example"],
            &a_cert,
            &format!("client_ca = {}", toml_path(&ca_a_file))
        ),
        entry(
            &["b.example"],
            &b_cert,
            &format!("client_ca = {}", toml_path(&ca_b_file))
        )
    );
    let toml = config(
        &format!(
            "{}client_ca = {}\n",
            cert_keys(&listener_cert(&pki)),
            toml_path(&pki.ca_file)
        ),
        &entries,
        "\"a.example\" = \"a\"\n\"b.example\" = \"b\"",
        &[("fallback", fallback.addr), ("a", a.addr), ("b", b.addr)],
        "[authorization]\nalice = [\"a\", \"b\", \"fallback\"]\nbob = [\"a\", \"b\", \"fallback\"]",
    );
    let lb = TestServer::start(&toml).await;
    let alice = client(&pki, Some(&ca_a.client("alice").expect("alice")));
    let bob = client(&pki, Some(&ca_b.client("bob").expect("bob")));

    assert_refused(connect_tls(lb.addr("tls"), &alice, "b.example").await).await;
    assert_refused(connect_tls(lb.addr("tls"), &bob, "a.example").await).await;
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 2)]).await;
    assert_eq!(
        (a.accepted(), b.accepted()),
        (0, 0),
        "a client of one entry reached a backend through the other"
    );

    assert_served(&lb, &alice, "a.example", &a_cert).await;
    assert_served(&lb, &bob, "b.example", &b_cert).await;
    assert_eq!((a.accepted(), b.accepted(), fallback.accepted()), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_sni_or_with_an_unknown_name_is_served_and_judged_by_the_listener_level_certificate()
{
    let pki = Pki::new(&["other.example"]);
    let (ca_a, ca_a_file) = client_ca(&pki, "a-ca");
    let a_cert = server_cert(&pki, "a", &["a.example"]);
    let (fallback, a) = (TestBackend::echo().await, TestBackend::echo().await);
    let toml = config(
        &format!(
            "{}client_ca = {}\n",
            cert_keys(&listener_cert(&pki)),
            toml_path(&pki.ca_file)
        ),
        &entry(
            &["a.example"],
            &a_cert,
            &format!("client_ca = {}", toml_path(&ca_a_file)),
        ),
        "",
        &[("fallback", fallback.addr), ("a", a.addr)],
        "[authorization]\nalice = [\"fallback\"]\ncarol = [\"fallback\"]",
    );
    let lb = TestServer::start(&toml).await;
    let carol = client(&pki, Some(&pki.client("carol")));
    let mut carol_no_sni = (*carol).clone();
    carol_no_sni.enable_sni = false;
    let carol_no_sni = Arc::new(carol_no_sni);

    // An entry's client is refused where the listener-level trust judges.
    let alice = client(&pki, Some(&ca_a.client("alice").expect("alice")));
    assert_refused(connect_tls(lb.addr("tls"), &alice, "other.example").await).await;
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(
        fallback.accepted(),
        0,
        "an entry's client reached the listener's upstream"
    );

    let listener = listener_cert(&pki);
    assert_served(&lb, &carol, "other.example", &listener).await;
    assert_served(&lb, &carol_no_sni, "localhost", &listener).await;
    assert_eq!((fallback.accepted(), a.accepted()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_sni_or_with_an_unknown_name_gets_the_default_entry() {
    let pki = Pki::new(&[]);
    let default_cert = server_cert(&pki, "default", &["other.example"]);
    let a_cert = server_cert(&pki, "a", &["a.example"]);
    let fallback = TestBackend::echo().await;
    let entries = format!(
        "{}{}",
        entry(&[], &default_cert, "default = true"),
        entry(&["a.example"], &a_cert, "")
    );
    let toml = config("", &entries, "", &[("fallback", fallback.addr)], "");
    let lb = TestServer::start(&toml).await;
    let plain = client(&pki, None);
    let mut no_sni = (*plain).clone();
    no_sni.enable_sni = false;

    assert_served(&lb, &plain, "other.example", &default_cert).await;
    assert_served(&lb, &Arc::new(no_sni), "localhost", &default_cert).await;
    assert_served(&lb, &plain, "a.example", &a_cert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_entry_serves_one_label_not_two_and_an_exact_entry_wins_over_it() {
    let pki = Pki::new(&["y.x.b.example"]);
    let wildcard = server_cert(&pki, "wildcard", &["*.b.example"]);
    let exact = server_cert(&pki, "exact", &["e.b.example"]);
    let fallback = TestBackend::echo().await;
    let entries = format!(
        "{}{}",
        entry(&["*.b.example"], &wildcard, ""),
        entry(&["e.b.example"], &exact, "")
    );
    let toml = config(
        &cert_keys(&listener_cert(&pki)),
        &entries,
        "",
        &[("fallback", fallback.addr)],
        "",
    );
    let lb = TestServer::start(&toml).await;
    let plain = client(&pki, None);

    assert_served(&lb, &plain, "x.b.example", &wildcard).await;
    assert_served(&lb, &plain, "X.B.Example", &wildcard).await;
    assert_served(&lb, &plain, "e.b.example", &exact).await;
    assert_served(&lb, &plain, "y.x.b.example", &listener_cert(&pki)).await;
}

/// A client session store that files every session under one name, so that a client offers a
/// session it got from one server name to another (as a hostile client could); it counts the
/// TLS 1.3 tickets it handed out to be offered.
#[derive(Debug)]
struct OneName(ClientSessionMemoryCache, AtomicUsize);

impl OneName {
    fn key() -> ServerName<'static> {
        ServerName::try_from("shared.example").expect("valid name")
    }
}

impl ClientSessionStore for OneName {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.0.set_kx_hint(OneName::key(), group);
    }
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.kx_hint(&OneName::key())
    }
    fn set_tls12_session(&self, _: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.0.set_tls12_session(OneName::key(), value);
    }
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.0.tls12_session(&OneName::key())
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {
        self.0.remove_tls12_session(&OneName::key());
    }
    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.0.insert_tls13_ticket(OneName::key(), value);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        let ticket = self.0.take_tls13_ticket(&OneName::key());
        self.1.fetch_add(usize::from(ticket.is_some()), Ordering::Relaxed);
        ticket
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_one_entry_offered_on_another_is_not_resumed_and_its_client_is_judged_there() {
    let pki = Pki::new(&[]);
    let (ca_a, ca_a_file) = client_ca(&pki, "a-ca");
    let (a_cert, b_cert) = (
        server_cert(&pki, "a", &["a.example"]),
        server_cert(&pki, "b", &["b.example"]),
    );
    let (fallback, a, b) = (
        TestBackend::echo().await,
        TestBackend::echo().await,
        TestBackend::echo().await,
    );
    let entries = format!(
        "{}{}",
        entry(
            &["a.example"],
            &a_cert,
            &format!("client_ca = {}", toml_path(&ca_a_file))
        ),
        entry(&["b.example"], &b_cert, "")
    );
    let toml = config(
        &format!(
            "{}client_ca = {}\n",
            cert_keys(&listener_cert(&pki)),
            toml_path(&pki.ca_file)
        ),
        &entries,
        "\"a.example\" = \"a\"\n\"b.example\" = \"b\"",
        &[("fallback", fallback.addr), ("a", a.addr), ("b", b.addr)],
        "[authorization]\nalice = [\"a\", \"b\"]",
    );
    let lb = TestServer::start(&toml).await;
    let mut alice = (*client(&pki, Some(&ca_a.client("alice").expect("alice")))).clone();
    let store = Arc::new(OneName(ClientSessionMemoryCache::new(8), AtomicUsize::new(0)));
    alice.resumption = Resumption::store(Arc::clone(&store) as Arc<dyn ClientSessionStore>);
    let alice = Arc::new(alice);

    let mut first = connect_tls(lb.addr("tls"), &alice, "a.example")
        .await
        .expect("handshake on a");
    assert_echoes(&mut first, b"first").await;
    common::within("closing", first.shutdown()).await.expect("close");
    // The store works: a second visit to a.example resumes.
    let mut second = connect_tls(lb.addr("tls"), &alice, "a.example")
        .await
        .expect("handshake on a");
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "precondition"
    );
    assert_echoes(&mut second, b"second").await;
    common::within("closing", second.shutdown()).await.expect("close");

    // The session (a's newest ticket) is offered for b.example: a full handshake, where b's
    // trust refuses alice.
    let offered = connect_tls(lb.addr("tls"), &alice, "b.example")
        .await
        .expect("client side of the handshake");
    assert_eq!(
        store.1.load(Ordering::Relaxed),
        2,
        "precondition: a's ticket was offered for b.example"
    );
    assert_eq!(
        offered.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full),
        "resumed across entries"
    );
    assert_refused(Ok(offered)).await;
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(
        (a.accepted(), b.accepted()),
        (2, 0),
        "a's client reached b's backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entrys_own_authorization_lets_an_identity_in_on_its_name_and_not_on_another() {
    let pki = Pki::new(&[]);
    let (a_cert, b_cert) = (
        server_cert(&pki, "a", &["a.example"]),
        server_cert(&pki, "b", &["b.example"]),
    );
    let web = TestBackend::echo().await;
    let entries = format!(
        "{}[listener.tls.certificate.authorization]\nalice = [\"fallback\"]\n{}",
        entry(&["a.example"], &a_cert, ""),
        entry(&["b.example"], &b_cert, "")
    );
    let toml = config(
        &format!(
            "{}client_ca = {}\n",
            cert_keys(&listener_cert(&pki)),
            toml_path(&pki.ca_file)
        ),
        &entries,
        "",
        &[("fallback", web.addr)],
        "[authorization]\nbob = [\"fallback\"]",
    );
    let lb = TestServer::start(&toml).await;
    let alice = client(&pki, Some(&pki.client("alice")));
    let bob = client(&pki, Some(&pki.client("bob")));

    assert_refused(connect_tls(lb.addr("tls"), &alice, "b.example").await).await;
    assert_refused(connect_tls(lb.addr("tls"), &bob, "a.example").await).await;
    lb.wait_for_rejections("tls", &[(Reason::Unauthorized, 2)]).await;
    assert_eq!(
        web.accepted(),
        0,
        "an identity reached the backend through an entry not granting it"
    );

    assert_served(&lb, &alice, "a.example", &a_cert).await;
    assert_served(&lb, &bob, "b.example", &b_cert).await;
    assert_eq!(web.accepted(), 2);
}

#[test]
fn check_reports_the_expiry_of_every_entrys_certificate_and_each_client_ca_once() {
    let pki = Pki::new(&[]);
    let (_, ca_a_file) = client_ca(&pki, "a-ca");
    let (a_cert, b_cert) = (
        server_cert(&pki, "a", &["a.example"]),
        server_cert(&pki, "b", &["b.example"]),
    );
    let entries = format!(
        "{}{}",
        entry(
            &["a.example"],
            &a_cert,
            &format!("client_ca = {}", toml_path(&ca_a_file))
        ),
        entry(&["b.example"], &b_cert, "")
    );
    let toml = config(
        &format!(
            "{}client_ca = {}\n",
            cert_keys(&listener_cert(&pki)),
            toml_path(&pki.ca_file)
        ),
        &entries,
        "",
        &[("fallback", "127.0.0.1:1".parse().expect("addr"))],
        "",
    );
    let config = fulcrum::Config::from_toml(&toml, "<test>").expect("valid config");
    let checked = fulcrum::check(&config).expect("loads");
    let mut found: Vec<(Option<&str>, &str)> = checked
        .certificates
        .iter()
        .map(|c| (c.certificate.as_deref(), c.kind))
        .collect();
    found.sort();
    let expected = [
        (None, "client_ca"),
        (None, "server"),
        (Some("a.example"), "client_ca"),
        (Some("a.example"), "server"),
        (Some("b.example"), "server"),
    ];
    assert_eq!(
        found, expected,
        "b.example inherits the listener's client CA, reported once"
    );
    assert!(
        checked
            .trust
            .iter()
            .any(|line| line.contains("certificate \"a.example\" client_ca")),
        "{:?}",
        checked.trust
    );
}

#[tokio::test]
async fn fulcrum_verify_judges_a_chain_by_the_entry_its_server_name_chooses() {
    let pki = Pki::new(&[]);
    let (ca_a, ca_a_file) = client_ca(&pki, "a-ca");
    let (_, ca_b_file) = client_ca(&pki, "b-ca");
    let (a_cert, b_cert) = (
        server_cert(&pki, "a", &["a.example"]),
        server_cert(&pki, "b", &["b.example"]),
    );
    let entries = format!(
        "{}{}",
        entry(
            &["a.example"],
            &a_cert,
            &format!("client_ca = {}", toml_path(&ca_a_file))
        ),
        entry(
            &["b.example"],
            &b_cert,
            &format!("client_ca = {}", toml_path(&ca_b_file))
        ),
    );
    let tls = format!(
        "{}client_ca = {}\n",
        cert_keys(&listener_cert(&pki)),
        toml_path(&ca_b_file)
    );
    let toml = config(
        &tls,
        &entries,
        "",
        &[("fallback", common::refused_addr())],
        "[authorization]\nalice = [\"fallback\"]\n",
    );
    let config = pki.dir.write("fulcrum.toml", &toml);
    let chain = pki
        .dir
        .write("alice.pem", &ca_a.client("alice").expect("client").cert);
    let verify = |name: &'static str| {
        let (config, chain) = (config.clone(), chain.clone());
        async move {
            let args = [
                "verify",
                "--config",
                config.to_str().expect("UTF-8"),
                "--server-name",
                name,
                chain.to_str().expect("UTF-8"),
            ];
            let output = common::process::output(&args).await;
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        }
    };
    let (code, out) = verify("a.example").await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("accepted: alice"), "{out}");
    let (code, out) = verify("b.example").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("refused: unknown_ca"), "{out}");
}
