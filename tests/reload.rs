//! Hot reload end to end: a running balancer re-reads its config file (`Handle::reload`,
//! `POST /reload`, SIGHUP to the real binary) and swaps in the next generation while connections
//! opened before keep the one they started with.
//!
//! Each test rewrites a config file in a temporary directory and reloads it; certificates are
//! generated at run time, everything binds 127.0.0.1 port 0, and every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::process::Fulcrum;
use common::tls::{assert_echoes, assert_refused, client_config, connect_tls, Pki};
use common::{
    backend_list, connect, payload, read_to_end, round_trip, sha256, toml_path, wait_until,
    wait_until_refused, within, TempDir, TestBackend, TestServer, DEADLINE,
};
use fulcrum::metrics::Reason;
use fulcrum::pki::Ca;
use fulcrum::reload::ReloadError;
use fulcrum::state::{Backend, ServerError, State};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes sent through a long-lived stream after each reload.
const CHUNK: usize = 64 * 1024;

const ALICE: &str = r#"alice = ["web"]"#;
const ALICE_AND_BOB: &str = "alice = [\"web\"]\nbob = [\"web\"]";

/// One mTLS listener `tls` (client certificates from `client_ca`) in front of upstream `web`.
fn mtls_config(pki: &Pki, client_ca: &Path, backends: &[SocketAddr], authorization: &str) -> String {
    let authorization = format!("[authorization]\n{authorization}");
    pki.one_pool_config(
        client_ca,
        "1.2",
        "handshake_timeout = \"5s\"",
        backends,
        &authorization,
    )
}

/// Plaintext listeners, one per name, all in front of upstream `web`; `extra` is appended.
fn plain_config(listeners: &[(&str, &str)], backends: &[SocketAddr], extra: &str) -> String {
    let mut text = String::new();
    for (name, bind) in listeners {
        text.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nupstream = \"web\"\n\n"
        ));
    }
    text.push_str(&format!(
        "[[upstream]]\nname = \"web\"\nbackends = [{}]\n\n{extra}",
        backend_list(backends)
    ));
    text
}

/// The backend of upstream `web` configured as `addr`, in `state`'s generation.
fn backend(state: &State, addr: SocketAddr) -> Option<Arc<Backend>> {
    let label = addr.to_string();
    state
        .upstream("web")
        .expect("upstream web")
        .backends
        .iter()
        .find(|b| b.label == label)
        .cloned()
}

/// Sends [`CHUNK`] bytes derived from `seed` and checks the echo has the same digest.
async fn echo_chunk<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, seed: u64) {
    let sent = payload(seed, CHUNK);
    let mut back = vec![0u8; CHUNK];
    let (mut read, mut write) = tokio::io::split(&mut *stream);
    let (written, received) = within("a chunk echoed through the long-lived stream", async {
        tokio::join!(
            async {
                write.write_all(&sent).await?;
                write.flush().await
            },
            read.read_exact(&mut back)
        )
    })
    .await;
    written.unwrap_or_else(|e| panic!("send chunk {seed}: {e}"));
    received.unwrap_or_else(|e| panic!("receive chunk {seed}: {e}"));
    assert!(sha256(&back) == sha256(&sent), "chunk {seed} came back altered");
}

/// Asserts that the server ended `stream` (end of stream or reset) without sending data.
async fn assert_closed_by_server<S: AsyncRead + Unpin>(stream: &mut S, whose: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
        Err(_) => panic!("{whose} connection was still open {DEADLINE:?} after the reload"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "{whose} connection returned data instead of closing: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// The DER of the first certificate in a PEM text.
fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_stream_keeps_flowing_across_ten_reloads() {
    let pki = Pki::new(&[]);
    let kept = TestBackend::echo().await;
    let a = TestBackend::echo().await;
    let b = TestBackend::echo().await;
    let path = pki.dir.write(
        "fulcrum.toml",
        &mtls_config(&pki, &pki.ca_file, &[kept.addr], ALICE),
    );
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let bob = pki.client_config(Some(&pki.client("bob")));

    let mut stream = connect_tls(addr, &alice, "localhost")
        .await
        .expect("alice's handshake");
    echo_chunk(&mut stream, 0).await;
    assert_eq!(kept.accepted(), 1);
    let kept_slot = backend(&lb.current(), kept.addr).expect("kept backend").slot;
    let mut unauthorized = 0;

    for i in 1..=10u64 {
        // Odd reloads add `a`, drop `b` and bob; even ones add `b`, drop `a` and add bob back.
        let (added, removed) = if i % 2 == 1 { (&a, &b) } else { (&b, &a) };
        let bob_allowed = i % 2 == 0;
        let authorization = if bob_allowed { ALICE_AND_BOB } else { ALICE };
        let (added_before, removed_before) = (added.accepted(), removed.accepted());

        let text = mtls_config(&pki, &pki.ca_file, &[kept.addr, added.addr], authorization);
        let generation = lb.reload_file(&path, &text).await.expect("a valid reload");
        let state = lb.current();
        assert_eq!(generation, i + 1, "reload {i}");
        assert_eq!(state.generation, i + 1, "reload {i}");
        assert_eq!(state.reloads.ok.get(), i);
        assert_eq!(state.reloads.failed.get(), 0);
        assert_eq!(lb.addr("tls"), addr, "reload {i} moved the listener");

        // The stream opened before the first reload still flows, and still counts against the
        // kept backend, which kept its slot.
        echo_chunk(&mut stream, i).await;
        let kept_now = backend(&state, kept.addr).expect("the kept backend stays");
        assert_eq!(
            kept_now.slot, kept_slot,
            "reload {i} moved the kept backend's slot"
        );
        let pool = &state.upstream("web").expect("upstream web").pool;
        assert_eq!(
            pool.active(kept_slot),
            1,
            "reload {i}: the long-lived stream's count"
        );
        assert!(
            backend(&state, removed.addr).is_none(),
            "reload {i} kept a removed backend"
        );
        assert!(
            backend(&state, added.addr).is_some(),
            "reload {i} lost the added backend"
        );

        // New connections follow the new configuration: the kept backend is busier, so they go
        // to the added one; the removed one gets nothing.
        let mut probe = connect_tls(addr, &alice, "localhost")
            .await
            .expect("alice's new handshake");
        assert_echoes(&mut probe, format!("alice after reload {i}").as_bytes()).await;
        drop(probe);
        wait_until("alice's probe releases its backend", || {
            lb.current().total_active() == 1
        })
        .await;
        let bob_connected = connect_tls(addr, &bob, "localhost").await;
        let expected_added = if bob_allowed {
            let mut probe = bob_connected.expect("bob's handshake");
            assert_echoes(&mut probe, format!("bob after reload {i}").as_bytes()).await;
            drop(probe);
            wait_until("bob's probe releases its backend", || {
                lb.current().total_active() == 1
            })
            .await;
            2
        } else {
            assert_refused(bob_connected).await;
            unauthorized += 1;
            wait_until("bob's refusal is counted", || {
                lb.current()
                    .listener("tls")
                    .expect("listener tls")
                    .rejected
                    .get(Reason::Unauthorized)
                    == unauthorized
            })
            .await;
            1
        };
        assert_eq!(
            added.accepted(),
            added_before + expected_added,
            "reload {i}: connections reaching the added backend"
        );
        assert_eq!(
            removed.accepted(),
            removed_before,
            "reload {i}: a removed backend received a connection"
        );
        assert_eq!(
            kept.accepted(),
            1,
            "reload {i}: the kept backend received a new connection"
        );
    }
    echo_chunk(&mut stream, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let pki = Pki::new(&[]);
    let old = TestBackend::echo().await;
    let new = TestBackend::echo().await;
    let good = mtls_config(&pki, &pki.ca_file, &[old.addr], ALICE);
    let path = pki.dir.write("fulcrum.toml", &good);
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let mut held = connect_tls(addr, &alice, "localhost")
        .await
        .expect("alice's handshake");
    assert_echoes(&mut held, b"before").await;

    // An unknown key: the file does not parse.
    let unknown_key = format!(
        "no_such_key = 1\n{}",
        mtls_config(&pki, &pki.ca_file, &[new.addr], ALICE)
    );
    let refused = lb.reload_file(&path, &unknown_key).await;
    assert!(
        matches!(&refused, Err(ReloadError::Config(e)) if e.to_string().contains("no_such_key")),
        "{refused:?}"
    );
    // A certificate file that does not exist: the file parses, the TLS settings do not load.
    let missing = pki.dir.path().join("missing.pem");
    let missing_cert = mtls_config(&pki, &pki.ca_file, &[new.addr], ALICE)
        .replace(&toml_path(&pki.server_cert), &toml_path(&missing));
    assert!(missing_cert.contains("missing.pem"));
    let refused = lb.reload_file(&path, &missing_cert).await;
    assert!(
        matches!(&refused, Err(ReloadError::Server(ServerError::Tls { listener, .. })) if listener == "tls"),
        "{refused:?}"
    );

    let state = lb.current();
    assert_eq!(state.generation, 1);
    assert_eq!(state.reloads.failed.get(), 2);
    assert_eq!(state.reloads.ok.get(), 0);
    let metrics = fulcrum::admin::prometheus::render(&state);
    for line in [
        "fulcrum_config_reloads_total{result=\"error\"} 2",
        "fulcrum_config_reloads_total{result=\"ok\"} 0",
        "fulcrum_config_generation 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in\n{metrics}"
        );
    }

    // The old configuration serves: the held connection and new ones, on the old backend.
    assert_echoes(&mut held, b"after").await;
    let mut fresh = connect_tls(lb.addr("tls"), &alice, "localhost")
        .await
        .expect("a new handshake after the refused reloads");
    assert_echoes(&mut fresh, b"fresh").await;
    assert_eq!(old.accepted(), 2);
    assert_eq!(new.accepted(), 0, "a refused config routed a connection");

    // A valid file afterwards applies as the next generation.
    let text = mtls_config(&pki, &pki.ca_file, &[new.addr], ALICE);
    assert_eq!(lb.reload_file(&path, &text).await.expect("a valid reload"), 2);
    let mut moved = connect_tls(lb.addr("tls"), &alice, "localhost")
        .await
        .expect("a handshake after the valid reload");
    assert_echoes(&mut moved, b"moved").await;
    assert_eq!(new.accepted(), 1);
    assert_eq!(lb.current().reloads.failed.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_authorization_entry_closes_exactly_that_clients_connections() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let path = pki.dir.write(
        "fulcrum.toml",
        &mtls_config(&pki, &pki.ca_file, &[echo.addr], ALICE_AND_BOB),
    );
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    let bob = pki.client_config(Some(&pki.client("bob")));

    let mut alices = Vec::new();
    let mut bobs = Vec::new();
    for n in 0..2 {
        let mut a = connect_tls(addr, &alice, "localhost")
            .await
            .expect("alice's handshake");
        assert_echoes(&mut a, format!("alice {n}").as_bytes()).await;
        alices.push(a);
        let mut b = connect_tls(addr, &bob, "localhost")
            .await
            .expect("bob's handshake");
        assert_echoes(&mut b, format!("bob {n}").as_bytes()).await;
        bobs.push(b);
    }
    assert_eq!(lb.current().total_active(), 4);

    let text = mtls_config(&pki, &pki.ca_file, &[echo.addr], ALICE);
    assert_eq!(lb.reload_file(&path, &text).await.expect("a valid reload"), 2);

    for b in &mut bobs {
        assert_closed_by_server(b, "bob's").await;
    }
    wait_until("only alice's connections are counted", || {
        lb.current().total_active() == 2
    })
    .await;
    for (n, a) in alices.iter_mut().enumerate() {
        assert_echoes(a, format!("alice {n} after the reload").as_bytes()).await;
    }
    assert_refused(connect_tls(addr, &bob, "localhost").await).await;
    wait_until("bob's new connection is refused as unauthorized", || {
        lb.current()
            .listener("tls")
            .expect("listener tls")
            .rejected
            .get(Reason::Unauthorized)
            == 1
    })
    .await;
    let mut again = connect_tls(addr, &alice, "localhost")
        .await
        .expect("alice's new handshake");
    assert_echoes(&mut again, b"alice still welcome").await;
    assert_eq!(echo.accepted(), 5, "bob's refused connection reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_client_ca_closes_the_connections_it_no_longer_trusts() {
    let pki = Pki::new(&[]);
    let other = Ca::new("another client CA").expect("generate CA");
    let both = pki
        .dir
        .write("both.pem", &format!("{}{}", pki.ca.cert_pem(), other.cert_pem()));
    let echo = TestBackend::echo().await;
    let authorization = "alice = [\"web\"]\ncarol = [\"web\"]";
    let path = pki.dir.write(
        "fulcrum.toml",
        &mtls_config(&pki, &both, &[echo.addr], authorization),
    );
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let alice = pki.client_config(Some(&pki.client("alice")));
    let carol_pem = other.client("carol").expect("issue carol's certificate");
    let carol = client_config(&pki.ca.cert_pem(), Some(&carol_pem), &versions);

    let mut a = connect_tls(addr, &alice, "localhost")
        .await
        .expect("alice's handshake");
    assert_echoes(&mut a, b"alice").await;
    let mut c = connect_tls(addr, &carol, "localhost")
        .await
        .expect("carol's handshake");
    assert_echoes(&mut c, b"carol").await;

    // Only the CA that issued alice's certificate stays trusted.
    let text = mtls_config(&pki, &pki.ca_file, &[echo.addr], authorization);
    assert_eq!(lb.reload_file(&path, &text).await.expect("a valid reload"), 2);

    assert_closed_by_server(&mut c, "carol's").await;
    assert_echoes(&mut a, b"alice after the reload").await;
    wait_until("only alice's connection is counted", || {
        lb.current().total_active() == 1
    })
    .await;
    assert_refused(connect_tls(addr, &carol, "localhost").await).await;
    wait_until("carol's new connection fails the handshake", || {
        lb.current()
            .listener("tls")
            .expect("listener tls")
            .rejected
            .get(Reason::TlsHandshake)
            == 1
    })
    .await;
    assert_eq!(
        echo.accepted(),
        2,
        "carol's refused connection reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_after_reload() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let path = pki.dir.write(
        "fulcrum.toml",
        &mtls_config(&pki, &pki.ca_file, &[echo.addr], ALICE),
    );
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let old_der = der(&std::fs::read_to_string(&pki.server_cert).expect("read server cert"));

    let new_ca = Ca::new("rotated server CA").expect("generate CA");
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let alice_pem = pki.client("alice");
    let trusts_both = client_config(
        &format!("{}{}", pki.ca.cert_pem(), new_ca.cert_pem()),
        Some(&alice_pem),
        &versions,
    );
    let trusts_old_only = pki.client_config(Some(&alice_pem));

    let mut before = connect_tls(addr, &trusts_both, "localhost")
        .await
        .expect("handshake before the rotation");
    assert_echoes(&mut before, b"before").await;
    let seen = before
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .clone();
    assert_eq!(seen, old_der);

    let rotated = new_ca.server(&[]).expect("issue the new server certificate");
    std::fs::write(&pki.server_cert, &rotated.cert).expect("overwrite server cert");
    std::fs::write(&pki.server_key, &rotated.key).expect("overwrite server key");
    assert_eq!(
        within("the reload", lb.handle.reload())
            .await
            .expect("a valid reload"),
        2
    );

    let mut after = connect_tls(addr, &trusts_both, "localhost")
        .await
        .expect("handshake after the rotation");
    let seen = after.get_ref().1.peer_certificates().expect("server certificate")[0].clone();
    assert_eq!(
        seen,
        der(&rotated.cert),
        "the new connection saw another certificate"
    );
    assert_ne!(seen, old_der);
    assert_echoes(&mut after, b"after").await;
    // The connection from before keeps its session; a client trusting only the old CA is now
    // refused by its own verifier.
    assert_echoes(&mut before, b"still here").await;
    let stale = connect_tls(addr, &trusts_old_only, "localhost").await;
    assert!(
        stale.is_err(),
        "a client trusting only the old CA accepted the rotated certificate"
    );
    assert_eq!(echo.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_by_reload_accepts_and_a_removed_one_refuses() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("reload-listeners");
    let any = "127.0.0.1:0";
    let path = dir.write("fulcrum.toml", &plain_config(&[("a", any)], &[echo.addr], ""));
    let lb = TestServer::start_file(&path).await;
    let a_addr = lb.addr("a");
    assert!(lb.current().listener("b").is_none());
    let mut held = connect(a_addr).await;
    assert_eq!(round_trip(&mut held, b"on a").await, b"on a");

    let text = plain_config(&[("a", any), ("b", any)], &[echo.addr], "");
    assert_eq!(lb.reload_file(&path, &text).await.expect("adding b"), 2);
    assert_eq!(lb.addr("a"), a_addr, "an unchanged listener moved");
    let b_addr = lb.addr("b");
    assert_ne!(b_addr.port(), 0);
    let mut on_b = connect(b_addr).await;
    assert_eq!(round_trip(&mut on_b, b"on b").await, b"on b");
    let mut on_a = connect(a_addr).await;
    assert_eq!(round_trip(&mut on_a, b"a again").await, b"a again");

    let text = plain_config(&[("b", any)], &[echo.addr], "");
    assert_eq!(lb.reload_file(&path, &text).await.expect("removing a"), 3);
    assert!(lb.current().listener("a").is_none());
    wait_until_refused(a_addr).await;
    assert_eq!(lb.addr("b"), b_addr, "an unchanged listener moved");
    let mut on_b_again = connect(b_addr).await;
    assert_eq!(round_trip(&mut on_b_again, b"b again").await, b"b again");
    // Connections accepted by the removed listener drain instead of being cut.
    assert_eq!(round_trip(&mut held, b"still on a").await, b"still on a");
    assert_eq!(round_trip(&mut on_a, b"still on a").await, b"still on a");
    let state = lb.current();
    assert_eq!(state.listener("b").expect("listener b").accepted.get(), 2);
    assert_eq!(echo.accepted(), 4);
}

/// Sends one HTTP/1.1 request to the admin listener; returns the status line and the body.
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> (String, String) {
    let mut stream = connect(admin).await;
    // Mutating requests carry a JSON content type (the admin API's CSRF rule).
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    within("the admin request", stream.write_all(request.as_bytes()))
        .await
        .expect("send the admin request");
    let response = read_to_end(&mut stream).await.expect("read the admin response");
    let response = String::from_utf8(response).expect("the admin answers UTF-8");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_on_the_admin_listener_applies_the_file() {
    let first = TestBackend::echo().await;
    let second = TestBackend::echo().await;
    let dir = TempDir::new("reload-admin");
    let admin = "[admin]\nbind = \"127.0.0.1:0\"\n";
    let listeners = [("main", "127.0.0.1:0")];
    let path = dir.write("fulcrum.toml", &plain_config(&listeners, &[first.addr], admin));
    let lb = TestServer::start_file(&path).await;
    let admin_addr = lb.admin.expect("admin listener");
    let addr = lb.addr("main");

    std::fs::write(&path, plain_config(&listeners, &[second.addr], admin)).expect("rewrite config");
    let (status, body) = admin_request(admin_addr, "POST", "/reload").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert_eq!(body, "{\"result\":\"ok\",\"generation\":2}\n");
    assert_eq!(lb.current().generation, 2);
    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"hello").await, b"hello");
    assert_eq!((first.accepted(), second.accepted()), (0, 1));

    std::fs::write(
        &path,
        format!("bogus = true\n{}", plain_config(&listeners, &[first.addr], admin)),
    )
    .expect("rewrite config");
    let (status, body) = admin_request(admin_addr, "POST", "/reload").await;
    assert_eq!(status, "HTTP/1.1 422 Unprocessable Entity", "{body}");
    assert!(body.starts_with("{\"result\":\"error\",\"error\":\""), "{body}");
    assert!(
        body.contains("bogus"),
        "the error does not name the bad key: {body}"
    );
    assert_eq!(lb.current().generation, 2);

    let (status, metrics) = admin_request(admin_addr, "GET", "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    for line in [
        "fulcrum_config_reloads_total{result=\"ok\"} 1",
        "fulcrum_config_reloads_total{result=\"error\"} 1",
        "fulcrum_config_generation 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in\n{metrics}"
        );
    }
    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"still second").await, b"still second");
    assert_eq!((first.accepted(), second.accepted()), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    let first = TestBackend::echo().await;
    let second = TestBackend::echo().await;
    let dir = TempDir::new("reload-sighup");
    let listeners = [("main", "127.0.0.1:0")];
    let path: PathBuf = dir.write("fulcrum.toml", &plain_config(&listeners, &[first.addr], ""));
    let mut fulcrum = Fulcrum::run(&path);
    let addr = fulcrum.listening("main").await;

    let mut held = connect(addr).await;
    assert_eq!(round_trip(&mut held, b"first").await, b"first");
    assert_eq!(first.accepted(), 1);

    std::fs::write(&path, plain_config(&listeners, &[second.addr], "")).expect("rewrite config");
    fulcrum.signal("HUP");
    fulcrum
        .wait_for_line("the `configuration reloaded` log line", |l| {
            (l.contains("configuration reloaded") && l.contains("generation=2")).then_some(())
        })
        .await;

    let mut client = connect(addr).await;
    assert_eq!(round_trip(&mut client, b"second").await, b"second");
    wait_until("the second backend accepts the new connection", || {
        second.accepted() == 1
    })
    .await;
    assert_eq!(
        first.accepted(),
        1,
        "a new connection went to the backend the reload removed"
    );
    assert_eq!(round_trip(&mut held, b"held").await, b"held");
    drop((client, held));

    fulcrum.signal("TERM");
    let (status, _) = fulcrum.exit().await;
    assert!(status.success(), "fulcrum exited with {status}");
}
