//! `source = "spiffe"`, end to end against a Workload API server speaking the public SPIFFE proto
//! (tests/common/workload_api.rs, standing in for the SPIRE agent): the listener serves the
//! Workload API's X509-SVID and trusts its bundles per trust domain; a rotated SVID is served
//! without a reload while open connections go on; a bundle that drops a CA closes that CA's
//! clients; a federated domain's CA vouches for its own domain only; the upstream side presents
//! the SVID and verifies backends against their trust domain's bundle; a lost agent leaves the
//! last material in use; no agent at startup fails within `startup_timeout`.
//!
//! "Refused" is proved by a backend that saw no connection. Real rustls clients and servers;
//! every certificate made at run time (tests/common/pki.rs); 127.0.0.1 port 0.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::pki::{issue, root, svid_params, Cert};
use common::tls::{assert_echoes, assert_refused};
use common::workload_api::{Svid, Workload, WorkloadApi};
use common::TestBackend;
use common::{poll_for, toml_path, wait_until, within, TempDir, TestServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const FULCRUM_ID: &str = "spiffe://a.test/fulcrum";
const CLIENT_ID: &str = "spiffe://a.test/client";
const PARTNER_ID: &str = "spiffe://b.test/partner";

/// fulcrum's SVID: its SPIFFE ID, and `localhost` for the test clients' name check.
fn fulcrum_svid(ca: &Cert) -> Svid {
    Svid::new(
        FULCRUM_ID,
        &issue(svid_params(&[FULCRUM_ID, "localhost"]), Some(ca)),
        &[],
        &[ca],
    )
}

/// A workload whose SVID is fulcrum's, issued by `ca`, with `bundle` as its trust domain's CAs.
fn workload(ca: &Cert, bundle: &[&Cert]) -> Workload {
    let leaf = issue(svid_params(&[FULCRUM_ID, "localhost"]), Some(ca));
    Workload::new(Svid::new(FULCRUM_ID, &leaf, &[], bundle))
}

/// A listener `tls` with `source = "spiffe"` in front of `backend`, granting `grants` the
/// upstream `app`.
fn listener_config(api: &WorkloadApi, backend: SocketAddr, grants: &[&str]) -> String {
    let grants: String = grants
        .iter()
        .map(|id| format!("\"{id}\" = [\"app\"]\n"))
        .collect();
    format!(
        "[spiffe]\nsocket = \"{}\"\n\n\
         [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [listener.tls]\nsource = \"spiffe\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{backend}\"]\n\n\
         [authorization]\n{grants}",
        api.endpoint()
    )
}

/// A client presenting `cert` (its leaf only), trusting `server_ca` for the server.
fn client(server_ca: &Cert, cert: &Cert) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der()).expect("CA usable as an anchor");
    let config = rustls::ClientConfig::builder_with_provider(fulcrum::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der()],
            PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key PEM"),
        )
        .expect("client certificate and key match");
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("TCP connect");
    let name = ServerName::try_from("localhost").expect("server name");
    within(
        "the handshake",
        TlsConnector::from(Arc::clone(config)).connect(name, tcp),
    )
    .await
}

/// The leaf the server presented.
fn served_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server's certificate");
    chain[0].clone().into_owned()
}

/// Connects (presenting `cert`), proves the connection reaches the echo backend, and returns
/// it with the leaf the server presented.
async fn served(
    addr: SocketAddr,
    server_ca: &Cert,
    cert: &Cert,
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let mut stream = connect(addr, &client(server_ca, cert)).await.expect("handshake");
    assert_echoes(&mut stream, b"ping").await;
    let leaf = served_leaf(&stream);
    (stream, leaf)
}

#[tokio::test]
async fn the_listener_serves_the_svid_and_a_rotated_one_without_a_reload_while_open_connections_go_on() {
    let dir = TempDir::new("spiffe-rotation");
    let ca = root("a.test CA");
    let first = fulcrum_svid(&ca);
    let first_leaf = first.chain[0].clone();
    let api = WorkloadApi::start(dir.path(), Workload::new(first)).await;
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&api, backend.addr, &[CLIENT_ID])).await;
    let addr = lb.addr("tls");
    let caller = issue(svid_params(&[CLIENT_ID]), Some(&ca));

    let (mut open, leaf) = served(addr, &ca, &caller).await;
    assert_eq!(leaf, first_leaf, "the Workload API's SVID is served");

    let second = fulcrum_svid(&ca);
    let second_leaf = second.chain[0].clone();
    api.update(Workload::new(second));
    let rotated = poll_for(async || {
        let (_, leaf) = served(addr, &ca, &caller).await;
        (leaf == second_leaf).then_some(())
    })
    .await;
    assert!(rotated.is_some(), "new handshakes get the rotated SVID");
    assert_eq!(
        lb.current().generation,
        2,
        "applied once, by a rebuild, without a reload"
    );
    assert_echoes(&mut open, b"still open").await;
}

#[tokio::test]
async fn a_bundle_that_drops_a_ca_closes_that_cas_clients_and_keeps_the_others() {
    let dir = TempDir::new("spiffe-bundle");
    let (old_ca, new_ca) = (root("a.test CA 1"), root("a.test CA 2"));
    let api = WorkloadApi::start(dir.path(), workload(&new_ca, &[&old_ca, &new_ca])).await;
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&api, backend.addr, &[CLIENT_ID])).await;
    let addr = lb.addr("tls");
    let old_client = issue(svid_params(&[CLIENT_ID]), Some(&old_ca));
    let new_client = issue(svid_params(&[CLIENT_ID]), Some(&new_ca));
    let (mut old_open, _) = served(addr, &new_ca, &old_client).await;
    let (mut new_open, _) = served(addr, &new_ca, &new_client).await;

    api.update(workload(&new_ca, &[&new_ca]));
    common::assert_ends(&mut old_open, "the dropped CA's client").await;
    assert_echoes(&mut new_open, b"kept").await;
    let seen = backend.accepted();
    assert_refused(connect(addr, &client(&new_ca, &old_client)).await).await;
    assert_eq!(
        backend.accepted(),
        seen,
        "the refused client never reached the backend"
    );
}

#[tokio::test]
async fn a_federated_bundle_vouches_for_its_own_trust_domain_and_not_for_another() {
    let dir = TempDir::new("spiffe-federation");
    let (ca, partner_ca) = (root("a.test CA"), root("b.test CA"));
    let api = WorkloadApi::start(
        dir.path(),
        Workload::new(fulcrum_svid(&ca)).federate("spiffe://b.test", &[&partner_ca]),
    )
    .await;
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&api, backend.addr, &[CLIENT_ID, PARTNER_ID])).await;
    let addr = lb.addr("tls");

    let partner = issue(svid_params(&[PARTNER_ID]), Some(&partner_ca));
    served(addr, &ca, &partner).await;
    let seen = backend.accepted();
    // b.test's CA issuing an a.test identity: the chain leads to the wrong domain's bundle.
    let impostor = issue(svid_params(&[CLIENT_ID]), Some(&partner_ca));
    assert_refused(connect(addr, &client(&ca, &impostor)).await).await;
    assert_eq!(backend.accepted(), seen, "the impostor never reached the backend");
}

#[tokio::test]
async fn a_lost_workload_api_leaves_the_last_svid_in_use_and_counts_the_reconnects() {
    let dir = TempDir::new("spiffe-lost");
    let ca = root("a.test CA");
    let svid = fulcrum_svid(&ca);
    let leaf = svid.chain[0].clone();
    let api = WorkloadApi::start(dir.path(), Workload::new(svid)).await;
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&api, backend.addr, &[CLIENT_ID])).await;
    let caller = issue(svid_params(&[CLIENT_ID]), Some(&ca));
    api.stop().await;

    let reconnects = poll_for(async || {
        let metrics = fulcrum::admin::prometheus::render(&lb.current());
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("fulcrum_workload_api_reconnects_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n > 0)
    })
    .await;
    assert!(reconnects.is_some(), "the lost socket is counted");
    let (_, served_leaf) = served(lb.addr("tls"), &ca, &caller).await;
    assert_eq!(served_leaf, leaf, "the last SVID is still served");
}

#[tokio::test]
async fn a_reload_that_leaves_no_spiffe_source_stops_watching_the_workload_api_and_serves_from_files() {
    let dir = TempDir::new("spiffe-unused");
    let ca = root("a.test CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(fulcrum_svid(&ca))).await;
    let backend = TestBackend::echo().await;
    let path = dir.write("fulcrum.toml", &listener_config(&api, backend.addr, &[CLIENT_ID]));
    let lb = TestServer::start_file(&path).await;
    wait_until("fulcrum's stream to the Workload API", || api.open_streams() > 0).await;

    // The same client CA, now from a file, and a server certificate from files.
    let files_root = root("files root");
    let server = issue(svid_params(&["localhost"]), Some(&files_root));
    let text = format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [listener.tls]\ncert = {}\nkey = {}\nclient_ca = {}\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n\n\
         [authorization]\n\"{CLIENT_ID}\" = [\"app\"]\n",
        toml_path(&dir.write("server.pem", &server.pem)),
        toml_path(&dir.write("server.key", &server.key_pem)),
        toml_path(&dir.write("clients.pem", &ca.pem)),
        backend.addr
    );
    lb.reload_file(&path, &text).await.expect("reload to files");
    wait_until("no stream to the Workload API", || api.open_streams() == 0).await;
    let caller = issue(svid_params(&[CLIENT_ID]), Some(&ca));
    let mut stream = connect(lb.addr("tls"), &client(&files_root, &caller))
        .await
        .expect("handshake with the certificate from files");
    assert_echoes(&mut stream, b"from files").await;
    api.stop().await;
}

#[tokio::test]
async fn an_upstream_presents_the_svid_and_verifies_backends_against_their_trust_domains_bundle() {
    let dir = TempDir::new("spiffe-upstream");
    let (ca, partner_ca) = (root("a.test CA"), root("b.test CA"));
    let api = WorkloadApi::start(
        dir.path(),
        Workload::new(fulcrum_svid(&ca)).federate("spiffe://b.test", &[&partner_ca]),
    )
    .await;
    let backend_id = "spiffe://a.test/backend";
    let good = tls_backend::start(&issue(svid_params(&[backend_id]), Some(&ca)), &ca).await;
    // Another domain's CA issuing the expected identity.
    let forged = tls_backend::start(&issue(svid_params(&[backend_id]), Some(&partner_ca)), &ca).await;
    let config = |backend: SocketAddr| {
        format!(
            "[spiffe]\nsocket = \"{}\"\n\n\
             [[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"app\"\nbackends = [\"{backend}\"]\n\
             [upstream.tls]\nsource = \"spiffe\"\nserver_identity = \"{backend_id}\"\n",
            api.endpoint()
        )
    };
    let lb = TestServer::start(&config(good.addr)).await;
    let mut stream = common::connect(lb.addr("plain")).await;
    assert_echoes(&mut stream, b"through mTLS").await;
    assert_eq!(
        good.client_ids(),
        vec![FULCRUM_ID.to_string()],
        "the backend saw fulcrum's SVID"
    );

    let lb = TestServer::start(&config(forged.addr)).await;
    let stream = common::connect(lb.addr("plain")).await;
    assert_refused(Ok::<_, std::io::Error>(stream)).await;
    assert!(
        forged.client_ids().is_empty(),
        "no handshake completed with the forged backend"
    );
}

#[tokio::test]
async fn startup_fails_within_startup_timeout_when_the_workload_api_is_not_there() {
    let dir = TempDir::new("spiffe-dead");
    let socket = dir.path().join("nobody.sock");
    let backend = TestBackend::echo().await;
    let config = dir.write(
        "fulcrum.toml",
        &format!(
            "[spiffe]\nsocket = \"unix://{}\"\nstartup_timeout = \"1s\"\n\n\
             [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n\
             [listener.tls]\nsource = \"spiffe\"\n\n\
             [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
            socket.display(),
            backend.addr
        ),
    );
    let path = config.to_str().expect("a UTF-8 path");
    let run = common::process::output(&["run", "--config", path]).await;
    assert!(!run.status.success(), "fulcrum must not start without its SVID");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("no X509-SVID from the SPIFFE Workload API") && stderr.contains("within 1s"),
        "the error names the Workload API and the timeout: {stderr}"
    );
}

/// A TLS echo backend requiring a client certificate from `client_ca`, which records the SPIFFE
/// ID of each client that completed a handshake.
mod tls_backend {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    pub(super) struct TlsBackend {
        pub(super) addr: SocketAddr,
        ids: Arc<Mutex<Vec<String>>>,
    }

    impl TlsBackend {
        pub(super) fn client_ids(&self) -> Vec<String> {
            self.ids.lock().expect("ids").clone()
        }
    }

    pub(super) async fn start(cert: &Cert, client_ca: &Cert) -> TlsBackend {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.der()).expect("client CA");
        let provider = fulcrum::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der()],
                PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key PEM"),
            )
            .expect("backend config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let ids = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&ids);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let id = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| spiffe_id(chain.first()?))
                        .unwrap_or_default();
                    seen.lock().expect("ids").push(id);
                    let (mut read, mut write) = tokio::io::split(&mut tls);
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        TlsBackend { addr, ids }
    }

    fn spiffe_id(der: &CertificateDer<'_>) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
    }
}
