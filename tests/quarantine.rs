//! Quarantine end to end with the real binary: `fulcrum ctl quarantine` refuses an identity (or a
//! certificate serial) at admission and cuts its open connections, on every instance sharing the
//! cluster's real `redis-server` (instances started later included), over reloads, until its end
//! or `fulcrum ctl release`; with Redis stopped the local quarantine still holds and the error is
//! shown.
//!
//! Real rustls clients, certificates generated at run time, everything on 127.0.0.1 port 0;
//! every wait has a deadline. A refusal is proven by a backend that saw no new connection.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Instant;

use common::process::{output, Fulcrum};
use common::redis::RedisServer;
use common::tls::{assert_echoes, assert_refused, connect_tls, Pki};
use common::{poll_for, TestBackend, DEADLINE};
use rustls::ClientConfig;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const TOKEN: &str = "quarantine-test-token";

/// An mTLS listener `tls` in front of `backend` for alice, bob and carol, an admin listener
/// needing the token, and with `redis` the cluster's Redis (`[rate_limit.shared]`).
fn config(pki: &Pki, backend: SocketAddr, redis: Option<&str>) -> String {
    let shared = redis.map_or(String::new(), |url| {
        format!(
            "[rate_limit]\ncapacity = 100000\nwindow = \"1h\"\n[rate_limit.shared]\nredis = \"{url}\"\n\
             key_prefix = \"fulcrum-quarantine-test:\"\n"
        )
    });
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{tls}\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n\
         [authorization]\nalice = [\"web\"]\nbob = [\"web\"]\ncarol = [\"web\"]\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n{shared}",
        tls = pki.tls_table(&pki.ca_file, "1.2"),
    )
}

/// One running instance: its listener's and admin API's addresses.
struct Instance {
    process: Fulcrum,
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn start(pki: &Pki, name: &str, config: &str) -> Instance {
    pki.dir.write_secret("admin.token", TOKEN);
    let mut process = Fulcrum::run(&pki.dir.write(&format!("{name}.toml"), config));
    let addr = process.listening("tls").await;
    let admin = process.admin_addr().await;
    Instance { process, addr, admin }
}

impl Instance {
    /// `fulcrum ctl --admin ... --token-file ... ARGS`.
    async fn ctl(&self, pki: &Pki, args: &[&str]) -> Output {
        common::process::ctl(self.admin, &pki.dir.path().join("admin.token"), args).await
    }

    /// `ctl` that must succeed; its stdout.
    async fn ok(&self, pki: &Pki, args: &[&str]) -> String {
        let out = self.ctl(pki, args).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl {args:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The quarantine table as `ctl quarantine --json` lists it.
    async fn listed(&self, pki: &Pki) -> Value {
        let out = self.ok(pki, &["--json", "quarantine"]).await;
        serde_json::from_str(out.trim()).expect("JSON")
    }

    /// Whether `client` is served now (its probe echoes) rather than refused.
    async fn serves(&self, client: &Arc<ClientConfig>) -> bool {
        let Ok(mut stream) = connect_tls(self.addr, client, "localhost").await else {
            return false;
        };
        let probe = async {
            use tokio::io::AsyncWriteExt;
            stream.write_all(b"probe").await?;
            let mut back = [0u8; 5];
            stream.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        matches!(common::within("a probe or a close", probe).await, Ok(back) if &back == b"probe")
    }
}

/// An open connection that echoed once.
async fn open(addr: SocketAddr, client: &Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let mut stream = connect_tls(addr, client, "localhost").await.expect("handshake");
    assert_echoes(&mut stream, b"hello").await;
    stream
}

/// Waits until the server ends `stream` (end of stream or reset), without data.
async fn closed_by_server(stream: &mut TlsStream<TcpStream>) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
        Err(_) => panic!("the connection was still open {DEADLINE:?} later"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("data instead of a close: {:?}", &buf[..n]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_on_one_instance_refuses_and_cuts_on_another_survives_a_reload_and_ends_at_release() {
    let redis = RedisServer::start().await;
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let text = config(&pki, backend.addr, Some(&redis.url()));
    let a = start(&pki, "a", &text).await;
    let b = start(&pki, "b", &text).await;
    let (alice, bob) = (
        pki.client_config(Some(&pki.client("alice"))),
        pki.client_config(Some(&pki.client("bob"))),
    );
    let mut alices = open(b.addr, &alice).await;
    let mut bobs = open(b.addr, &bob).await;

    let started = Instant::now();
    let out = a
        .ok(
            &pki,
            &["quarantine", "bob", "--for", "1h", "--reason", "key leaked"],
        )
        .await;
    assert!(out.contains("bob"), "{out}");
    closed_by_server(&mut bobs).await;
    let cut_after = started.elapsed();
    let accepted = backend.accepted();
    assert!(!b.serves(&bob).await, "bob served on B after the quarantine");
    eprintln!("quarantine on A -> bob's connection on B cut after {cut_after:?}");
    assert_eq!(
        backend.accepted(),
        accepted,
        "a quarantined client reached the backend"
    );
    assert_echoes(&mut alices, b"alice still").await;

    let listed = b.listed(&pki).await;
    let entry = &listed["entries"][0];
    assert_eq!(
        (entry["identity"].as_str(), entry["reason"].as_str()),
        (Some("bob"), Some("key leaked"))
    );
    assert_eq!(entry["cluster"], true, "{listed}");

    b.process.signal("HUP");
    b.ok(&pki, &["reload"]).await;
    assert!(!b.serves(&bob).await, "the quarantine did not survive a reload");

    b.ok(&pki, &["release", "bob"]).await;
    let back = poll_for(async || a.serves(&bob).await.then_some(())).await;
    assert!(back.is_some(), "bob still refused on A after the release on B");
    assert!(b.serves(&bob).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_later_applies_the_quarantines_in_force() {
    let redis = RedisServer::start().await;
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let text = config(&pki, backend.addr, Some(&redis.url()));
    let a = start(&pki, "a", &text).await;
    let carol = pki.client("carol");
    let serial = fulcrum::identity::inspect(&pem_der(&carol.cert), fulcrum::identity::Rule::default())
        .expect("carol's certificate")
        .serial;
    a.ok(&pki, &["quarantine", "--serial", &serial.to_uppercase()])
        .await;
    let b = start(&pki, "b", &text).await;
    let carol = pki.client_config(Some(&carol));
    let refused = poll_for(async || (!b.serves(&carol).await).then_some(())).await;
    assert!(
        refused.is_some(),
        "carol's serial is not quarantined on the later instance"
    );
    let alice = pki.client_config(Some(&pki.client("alice")));
    assert!(b.serves(&alice).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_a_quarantine_holds_locally_and_the_error_is_shown() {
    let redis = RedisServer::start().await;
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let a = start(&pki, "a", &config(&pki, backend.addr, Some(&redis.url()))).await;
    redis.stop();
    let bob = pki.client_config(Some(&pki.client("bob")));
    let mut open_bob = open(a.addr, &bob).await;
    a.ok(&pki, &["quarantine", "bob"]).await;
    closed_by_server(&mut open_bob).await;
    assert_refused(connect_tls(a.addr, &bob, "localhost").await).await;
    let shown = poll_for(async || {
        let listed = a.listed(&pki).await;
        listed["last_error"].is_string().then_some(listed)
    })
    .await
    .expect("the sync error is shown");
    assert!(shown["sync_errors"].as_u64() > Some(0), "{shown}");
    assert_eq!(shown["entries"][0]["pending"], true, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_ends_at_its_duration() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let a = start(&pki, "a", &config(&pki, backend.addr, None)).await;
    let bob = pki.client_config(Some(&pki.client("bob")));
    a.ok(&pki, &["quarantine", "bob", "--for", "2s"]).await;
    assert!(!a.serves(&bob).await, "bob served while quarantined");
    let served = poll_for(async || a.serves(&bob).await.then_some(())).await;
    assert!(served.is_some(), "bob still refused after the quarantine's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_needs_the_token_and_a_well_formed_subject() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let a = start(&pki, "a", &config(&pki, backend.addr, None)).await;
    let admin = a.admin.to_string();
    let without = output(&["ctl", "--admin", &admin, "quarantine", "bob"]).await;
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    for args in [
        &["quarantine", "--serial", "xyz"][..],
        &["quarantine", "bob", "--for", "90d"],
        &["quarantine", "bob", "--serial", "01"],
    ] {
        let out = a.ctl(&pki, args).await;
        assert_ne!(out.status.code(), Some(0), "{args:?} was accepted");
    }
    let bob = pki.client_config(Some(&pki.client("bob")));
    assert!(
        a.serves(&bob).await,
        "a refused quarantine request quarantined bob"
    );
    let out = a.ok(&pki, &["--json", "release", "bob"]).await;
    assert!(out.contains("\"released\":false"), "{out}");
}

/// The DER of the first certificate in `pem`.
fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}
