//! `key_exchange`, end to end: a TLS listener offers X25519MLKEM768 (hybrid post-quantum) first,
//! then X25519, then secp256r1, and its order wins over the client's; `key_exchange` changes
//! the order or leaves the hybrid out, and a client with no group in common is refused before
//! any backend is dialed. To backends, fulcrum offers the upstream's `key_exchange` in its order.
//!
//! Clients are real rustls clients offering chosen groups in a chosen order (the hybrid from
//! `rustls::crypto::aws_lc_rs`, so those tests need the default `aws-lc-rs` build), and the
//! installed `openssl s_client` (with `-groups X25519MLKEM768` when that OpenSSL has ML-KEM,
//! else `-groups X25519`). "Refused" is a failed handshake and a backend that accepted nothing.
//! Certificates are generated at run time; everything binds 127.0.0.1 port 0.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use common::tls::{assert_echoes, assert_refused, connect_tls, Pki};
use common::{backend_list, connect, toml_path, within, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, NamedGroup, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[cfg(feature = "aws-lc-rs")]
use rustls::crypto::aws_lc_rs as crypto;
#[cfg(not(feature = "aws-lc-rs"))]
use rustls::crypto::ring as crypto;

#[cfg(feature = "aws-lc-rs")]
use crypto::kx_group::X25519MLKEM768;
use crypto::kx_group::{SECP256R1, X25519};

/// One TLS listener `tls` (`Pki`'s server certificate, `tls_keys` added to its table) in front
/// of upstream `web` with `backend`.
fn listener_config(pki: &Pki, tls_keys: &str, backend: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [listener.tls]\ncert = {}\nkey = {}\n{tls_keys}\n\
         [[upstream]]\nname = \"web\"\nbackends = [{}]\n",
        toml_path(&pki.server_cert),
        toml_path(&pki.server_key),
        backend_list(&[backend]),
    )
}

/// The provider of this build offering exactly `groups`, in that order.
fn offering(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: groups.to_vec(),
        ..crypto::default_provider()
    })
}

/// A client trusting `pki`'s CA that offers `groups` in that order (TLS 1.3 and 1.2).
fn client_offering(pki: &Pki, groups: &[&'static dyn SupportedKxGroup]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).expect("CA PEM");
    roots.add(ca).expect("CA usable as a trust anchor");
    let config = ClientConfig::builder_with_provider(offering(groups))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Connects to the listener `tls` of `lb` with `client` (SNI `server_name`), checks that the
/// bytes reach the echo backend and come back, and returns the group negotiated.
async fn negotiated(lb: &TestServer, client: &Arc<ClientConfig>, server_name: &str) -> NamedGroup {
    let mut stream = connect_tls(lb.addr("tls"), client, server_name)
        .await
        .expect("the handshake succeeds");
    let group = stream
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .expect("a TLS 1.3 handshake negotiated a group")
        .name();
    assert_echoes(&mut stream, b"key exchange probe").await;
    group
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn a_client_offering_only_the_hybrid_negotiates_x25519mlkem768_and_its_bytes_reach_the_backend() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&pki, "", backend.addr)).await;
    let hybrid_only = client_offering(&pki, &[X25519MLKEM768]);
    assert_eq!(
        negotiated(&lb, &hybrid_only, "localhost").await,
        NamedGroup::X25519MLKEM768
    );
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_classical_only_client_still_connects_with_x25519() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&pki, "", backend.addr)).await;
    let classical = client_offering(&pki, &[X25519]);
    assert_eq!(negotiated(&lb, &classical, "localhost").await, NamedGroup::X25519);
    let p256_only = client_offering(&pki, &[SECP256R1]);
    assert_eq!(
        negotiated(&lb, &p256_only, "localhost").await,
        NamedGroup::secp256r1
    );
    assert_eq!(backend.accepted(), 2);
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn a_client_offering_both_gets_the_hybrid_even_when_it_prefers_x25519() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(&pki, "", backend.addr)).await;
    let hybrid_first = client_offering(&pki, &[X25519MLKEM768, X25519]);
    assert_eq!(
        negotiated(&lb, &hybrid_first, "localhost").await,
        NamedGroup::X25519MLKEM768
    );
    // Its key share is for X25519 only: the listener asks for the hybrid's (HelloRetryRequest).
    let x25519_first = client_offering(&pki, &[X25519, X25519MLKEM768, SECP256R1]);
    assert_eq!(
        negotiated(&lb, &x25519_first, "localhost").await,
        NamedGroup::X25519MLKEM768
    );
    assert_eq!(backend.accepted(), 2);
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn the_listeners_order_wins_over_a_client_that_prefers_the_hybrid() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let keys = "key_exchange = [\"secp256r1\", \"X25519\", \"X25519MLKEM768\"]";
    let lb = TestServer::start(&listener_config(&pki, keys, backend.addr)).await;
    let hybrid_first = client_offering(&pki, &[X25519MLKEM768, X25519, SECP256R1]);
    assert_eq!(
        negotiated(&lb, &hybrid_first, "localhost").await,
        NamedGroup::secp256r1
    );
    let no_p256 = client_offering(&pki, &[X25519MLKEM768, X25519]);
    assert_eq!(negotiated(&lb, &no_p256, "localhost").await, NamedGroup::X25519);
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_client_with_no_group_of_the_listeners_key_exchange_is_refused_before_any_backend() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = TestServer::start(&listener_config(
        &pki,
        "key_exchange = [\"x25519\"]",
        backend.addr,
    ))
    .await;
    let p256_only = client_offering(&pki, &[SECP256R1]);
    assert_refused(connect_tls(lb.addr("tls"), &p256_only, "localhost").await).await;
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(backend.accepted(), 0, "a refused client reached the backend");

    let both = client_offering(&pki, &[SECP256R1, X25519]);
    assert_eq!(negotiated(&lb, &both, "localhost").await, NamedGroup::X25519);
    assert_eq!(backend.accepted(), 1);
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn a_classical_key_exchange_refuses_a_hybrid_only_client_before_any_backend_and_serves_a_classical_one()
{
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let keys = "key_exchange = [\"X25519\", \"P-256\"]";
    let lb = TestServer::start(&listener_config(&pki, keys, backend.addr)).await;

    let hybrid_only = client_offering(&pki, &[X25519MLKEM768]);
    assert_refused(connect_tls(lb.addr("tls"), &hybrid_only, "localhost").await).await;
    lb.wait_for_rejections("tls", &[(Reason::TlsHandshake, 1)]).await;
    assert_eq!(backend.accepted(), 0, "a refused client reached the backend");

    // Beside it, the acceptance: a client offering both gets X25519 here.
    let both = client_offering(&pki, &[X25519MLKEM768, X25519]);
    assert_eq!(negotiated(&lb, &both, "localhost").await, NamedGroup::X25519);
    assert_eq!(backend.accepted(), 1);
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn a_certificate_entry_chosen_by_sni_uses_the_listeners_key_exchange_order() {
    let pki = Pki::new(&["b.example"]);
    let backend = TestBackend::echo().await;
    let entry = format!(
        "key_exchange = [\"X25519MLKEM768\", \"X25519\"]\n\
         [[listener.tls.certificate]]\ncert = {}\nkey = {}\nserver_names = [\"b.example\"]\n",
        toml_path(&pki.server_cert),
        toml_path(&pki.server_key),
    );
    let lb = TestServer::start(&listener_config(&pki, &entry, backend.addr)).await;
    let x25519_first = client_offering(&pki, &[X25519, X25519MLKEM768]);
    for server_name in ["b.example", "localhost"] {
        assert_eq!(
            negotiated(&lb, &x25519_first, server_name).await,
            NamedGroup::X25519MLKEM768,
            "{server_name}"
        );
    }
    let p256_only = client_offering(&pki, &[SECP256R1]);
    assert_refused(connect_tls(lb.addr("tls"), &p256_only, "b.example").await).await;
    assert_eq!(backend.accepted(), 2);
}

#[cfg(not(feature = "aws-lc-rs"))]
#[tokio::test]
async fn a_ring_build_refuses_a_key_exchange_naming_the_hybrid_and_leaves_it_out_of_the_default() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let keys = "key_exchange = [\"X25519MLKEM768\", \"X25519\"]";
    let refused = TestServer::try_start(&listener_config(&pki, keys, backend.addr)).await;
    let e = refused
        .err()
        .expect("the hybrid is refused by a ring build")
        .to_string();
    assert!(e.contains("crypto provider (ring) has no X25519MLKEM768"), "{e}");
    let lb = TestServer::start(&listener_config(&pki, "", backend.addr)).await;
    let classical = client_offering(&pki, &[X25519]);
    assert_eq!(negotiated(&lb, &classical, "localhost").await, NamedGroup::X25519);
}

// A real OpenSSL client.

/// Whether the installed OpenSSL has ML-KEM (3.5 and later): its hybrid group then too.
fn openssl_has_ml_kem() -> bool {
    let listed = Command::new("openssl")
        .args(["list", "-kem-algorithms"])
        .output()
        .expect("openssl is installed (CI installs it)");
    String::from_utf8_lossy(&listed.stdout)
        .to_ascii_uppercase()
        .contains("X25519MLKEM768")
}

/// Runs `openssl args` under `timeout 20` with `stdin`, off the async runtime.
async fn openssl(args: Vec<String>, stdin: &'static [u8]) -> Output {
    let task = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("timeout")
            .arg("20")
            .arg("openssl")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn timeout(1)");
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write as _;
            let _ = input.write_all(stdin);
        }
        child.wait_with_output().expect("wait for openssl")
    });
    within("openssl s_client (under timeout 20)", task)
        .await
        .expect("blocking task")
}

/// A backend that reads what the client sent, answers `served: ` and those bytes, then closes
/// (so that `s_client -ign_eof` ends); it counts the connections it accepted.
async fn answering_backend() -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    let accepted = Arc::new(Mutex::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            *count.lock().expect("count") += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let _ = stream.write_all(b"served: ").await;
                let _ = stream.write_all(&buf[..n]).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_connects_with_the_hybrid_if_it_has_ml_kem_else_with_x25519() {
    let pki = Pki::new(&[]);
    let (backend, accepted) = answering_backend().await;
    let lb = TestServer::start(&listener_config(&pki, "", backend)).await;
    let group = if openssl_has_ml_kem() && cfg!(feature = "aws-lc-rs") {
        "X25519MLKEM768"
    } else {
        "X25519"
    };
    let args = [
        "s_client",
        "-connect",
        &lb.addr("tls").to_string(),
        "-servername",
        "localhost",
        "-verify_return_error",
        "-CAfile",
        pki.ca_file.to_str().expect("UTF-8 path"),
        "-groups",
        group,
        "-ign_eof",
    ];
    let output = openssl(args.iter().map(ToString::to_string).collect(), b"openssl probe\n").await;
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The client offers `group` alone: served means `group` was negotiated (OpenSSL 3.0 also
    // prints it as "Server Temp Key: X25519", later versions as "Negotiated TLS1.3 group").
    assert!(said.contains("served: openssl probe"), "{group}: {said}");
    assert_eq!(*accepted.lock().expect("count"), 1);
}

// To backends.

/// What a TLS backend saw of one handshake: the groups the client offered, in its order, and
/// the group negotiated.
type Seen = (Vec<NamedGroup>, Option<NamedGroup>);

/// A TLS echo backend with `pki`'s server certificate, offering every group of this build with
/// X25519 first (so the client's preference decides), recording each handshake.
async fn recording_backend(pki: &Pki) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let chain = vec![CertificateDer::from_pem_file(&pki.server_cert).expect("server cert PEM")];
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("server key PEM");
    #[cfg(feature = "aws-lc-rs")]
    let groups = [X25519, SECP256R1, X25519MLKEM768];
    #[cfg(not(feature = "aws-lc-rs"))]
    let groups = [X25519, SECP256R1];
    let config = rustls::ServerConfig::builder_with_provider(offering(&groups))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("backend server config");
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TLS backend");
    let addr = listener.local_addr().expect("TLS backend address");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, record) = (Arc::clone(&config), Arc::clone(&record));
            tokio::spawn(serve_recorded(tcp, config, record));
        }
    });
    (addr, seen)
}

/// One connection of [`recording_backend`].
async fn serve_recorded(tcp: TcpStream, config: Arc<rustls::ServerConfig>, record: Arc<Mutex<Vec<Seen>>>) {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(start) = acceptor.await else {
        return;
    };
    let offered = start.client_hello().named_groups().unwrap_or_default().to_vec();
    let Ok(mut tls) = start.into_stream(config).await else {
        return;
    };
    let negotiated = tls.get_ref().1.negotiated_key_exchange_group().map(|g| g.name());
    record.lock().expect("record").push((offered, negotiated));
    let (mut read, mut write) = tokio::io::split(&mut tls);
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// A plain listener `plain` in front of upstream `tls` whose one backend, `backend`, is reached
/// over TLS verified against `pki`'s CA, with `tls_keys` in `[upstream.tls]`.
fn upstream_config(pki: &Pki, backend: SocketAddr, tls_keys: &str) -> String {
    format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"tls\"\n\
         [[upstream]]\nname = \"tls\"\nbackends = [{}]\n\
         [upstream.tls]\nca = {}\nserver_name = \"localhost\"\n{tls_keys}\n",
        backend_list(&[backend]),
        toml_path(&pki.ca_file),
    )
}

/// Sends a probe through the listener `plain` and checks it came back from the TLS backend.
async fn through_backend(lb: &TestServer) {
    let mut client = connect(lb.addr("plain")).await;
    within("the probe", client.write_all(b"to the backend"))
        .await
        .expect("write");
    let mut back = [0u8; 14];
    within("the echo", client.read_exact(&mut back))
        .await
        .expect("the echo");
    assert_eq!(&back, b"to the backend");
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn fulcrum_offers_backends_the_hybrid_first_by_default_and_it_is_negotiated() {
    let pki = Pki::new(&[]);
    let (backend, seen) = recording_backend(&pki).await;
    let lb = TestServer::start(&upstream_config(&pki, backend, "")).await;
    through_backend(&lb).await;
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(
        seen,
        [(
            vec![
                NamedGroup::X25519MLKEM768,
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ],
            Some(NamedGroup::X25519MLKEM768)
        )]
    );
}

#[tokio::test]
async fn an_upstream_key_exchange_of_x25519_is_all_fulcrum_offers_backends() {
    let pki = Pki::new(&[]);
    let (backend, seen) = recording_backend(&pki).await;
    let keys = "key_exchange = [\"X25519\"]";
    let lb = TestServer::start(&upstream_config(&pki, backend, keys)).await;
    through_backend(&lb).await;
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen, [(vec![NamedGroup::X25519], Some(NamedGroup::X25519))]);
}

#[tokio::test]
async fn a_backend_with_no_group_of_the_upstreams_key_exchange_is_never_used() {
    let pki = Pki::new(&[]);
    let (backend, seen) = recording_backend(&pki).await;
    let lb = TestServer::start(&upstream_config(&pki, backend, "key_exchange = [\"P-384\"]")).await;
    let mut client = connect(lb.addr("plain")).await;
    let _ = within("the probe", client.write_all(b"probe")).await;
    let mut reply = Vec::new();
    let _ = within(
        "the end of the refused connection",
        client.read_to_end(&mut reply),
    )
    .await;
    assert!(reply.is_empty(), "{reply:?}");
    assert!(
        seen.lock().expect("seen").is_empty(),
        "a handshake with the backend completed"
    );
}
