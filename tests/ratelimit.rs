//! End-to-end tests of per-client rate limits: by identity on mTLS listeners, by source IP on
//! plaintext ones, the concurrency cap, and per-identity capacity overrides.
//!
//! Windows are a minute long so none can roll over during a test; every refusal is checked
//! against the backend's own accept counter.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::tls::{assert_echoes, assert_refused, connect_from, connect_tls, read_to_end_bounded, Pki};
use common::{wait_until, within, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;

const FIRST_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const SECOND_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Opens an mTLS connection, checks it reaches the echo backend, and closes it.
async fn assert_served(addr: SocketAddr, config: &Arc<ClientConfig>, what: &str) {
    let mut stream = connect_tls(addr, config, "localhost")
        .await
        .unwrap_or_else(|e| panic!("{what}: handshake failed: {e}"));
    assert_echoes(&mut stream, what.as_bytes()).await;
    let _ = within("closing", stream.shutdown()).await;
}

/// Opens a plaintext connection from `source`, checks it reaches the echo backend, and closes it.
async fn assert_served_from(source: IpAddr, addr: SocketAddr, what: &str) {
    let mut stream = connect_from(source, addr).await;
    assert_echoes(&mut stream, what.as_bytes()).await;
    let _ = within("closing", stream.shutdown()).await;
}

/// An mTLS listener `tls` in front of one echo backend, with `extra` appended to the config.
async fn mtls_balancer(pki: &Pki, backend: &TestBackend, listener_keys: &str, extra: &str) -> TestServer {
    let toml = pki.one_pool_config(&pki.ca_file, "1.2", listener_keys, &[backend.addr], extra);
    TestServer::start(&toml).await
}

/// A plaintext listener `plain` in front of one echo backend, with `extra` appended.
async fn plain_balancer(backend: &TestBackend, extra: &str) -> TestServer {
    let toml = format!(
        r#"
[[listener]]
name = "plain"
bind = "127.0.0.1:0"
upstream = "web"
{extra}
[[upstream]]
name = "web"
backends = ["{backend}"]
"#,
        backend = backend.addr,
    );
    TestServer::start(&toml).await
}

const REJECT_RESPONSE: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_mtls_connection_in_a_window_gets_the_reject_response_while_another_identity_is_served() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = mtls_balancer(
        &pki,
        &backend,
        r#"reject_response = "HTTP/1.1 429 Too Many Requests\r\n\r\n""#,
        r#"
[authorization]
alice = ["web"]
bob = ["web"]

[rate_limit]
capacity = 5
window = "1m"
"#,
    )
    .await;
    let addr = lb.addr("tls");
    let alice = pki.client_config(Some(&pki.client("alice")));
    for i in 1..=5 {
        assert_served(addr, &alice, &format!("alice connection {i}")).await;
    }
    assert_eq!(backend.accepted(), 5);

    let mut sixth = connect_tls(addr, &alice, "localhost")
        .await
        .expect("the handshake precedes the rate limit");
    let reply = read_to_end_bounded(&mut sixth, 4096)
        .await
        .expect("the refusal ends cleanly");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        String::from_utf8_lossy(REJECT_RESPONSE),
        "the refused client must read exactly the reject response, then EOF"
    );
    lb.wait_for_rejections("tls", &[(Reason::RateLimited, 1)]).await;
    assert_eq!(
        backend.accepted(),
        5,
        "the refused connection reached the backend"
    );

    let bob = pki.client_config(Some(&pki.client("bob")));
    assert_served(addr, &bob, "bob is counted separately").await;
    assert_eq!(backend.accepted(), 6);
    assert_eq!(lb.rejections("tls"), [("rate_limited", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_plaintext_connection_from_one_source_ip_is_refused_while_another_ip_is_served() {
    let backend = TestBackend::echo().await;
    let lb = plain_balancer(
        &backend,
        r#"
[listener.rate_limit]
capacity = 5
window = "1m"
"#,
    )
    .await;
    let addr = lb.addr("plain");
    for i in 1..=5 {
        assert_served_from(FIRST_SOURCE, addr, &format!("127.0.0.1 connection {i}")).await;
    }
    assert_eq!(backend.accepted(), 5);

    assert_refused(Ok(connect_from(FIRST_SOURCE, addr).await)).await;
    lb.wait_for_rejections("plain", &[(Reason::RateLimited, 1)]).await;
    assert_eq!(
        backend.accepted(),
        5,
        "the refused connection reached the backend"
    );

    assert_served_from(SECOND_SOURCE, addr, "127.0.0.2 is counted separately").await;
    assert_eq!(backend.accepted(), 6);
    assert_eq!(lb.rejections("plain"), [("rate_limited", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_simultaneous_connection_is_refused_and_a_new_one_is_served_after_one_closes() {
    let backend = TestBackend::echo().await;
    let lb = plain_balancer(
        &backend,
        r#"
[rate_limit]
capacity = 100
window = "1m"
max_concurrent = 2
"#,
    )
    .await;
    let addr = lb.addr("plain");
    let mut first = connect_from(FIRST_SOURCE, addr).await;
    assert_echoes(&mut first, b"first").await;
    let mut second = connect_from(FIRST_SOURCE, addr).await;
    assert_echoes(&mut second, b"second").await;

    assert_refused(Ok(connect_from(FIRST_SOURCE, addr).await)).await;
    lb.wait_for_rejections("plain", &[(Reason::RateLimited, 1)]).await;
    assert_eq!(backend.accepted(), 2, "the third connection reached the backend");

    drop(first);
    let state = Arc::clone(&lb.state);
    wait_until("the closed connection is no longer active", || {
        state.total_active() == 1
    })
    .await;
    let mut fourth = connect_from(FIRST_SOURCE, addr).await;
    assert_echoes(&mut fourth, b"fourth").await;
    assert_echoes(&mut second, b"second is still served").await;
    assert_eq!(backend.accepted(), 3);
    assert_eq!(lb.rejections("plain"), [("rate_limited", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_override_lets_batch_open_eight_while_alice_is_held_to_the_global_capacity() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = mtls_balancer(
        &pki,
        &backend,
        "",
        r#"
[authorization]
alice = ["web"]
batch = ["web"]

[rate_limit]
capacity = 3
window = "1m"

[rate_limit.clients]
batch = 8
"#,
    )
    .await;
    let addr = lb.addr("tls");
    let batch = pki.client_config(Some(&pki.client("batch")));
    for i in 1..=8 {
        assert_served(addr, &batch, &format!("batch connection {i}")).await;
    }
    assert_refused(connect_tls(addr, &batch, "localhost").await).await;
    lb.wait_for_rejections("tls", &[(Reason::RateLimited, 1)]).await;
    assert_eq!(backend.accepted(), 8);

    let alice = pki.client_config(Some(&pki.client("alice")));
    for i in 1..=3 {
        assert_served(addr, &alice, &format!("alice connection {i}")).await;
    }
    assert_refused(connect_tls(addr, &alice, "localhost").await).await;
    lb.wait_for_rejections("tls", &[(Reason::RateLimited, 2)]).await;
    assert_eq!(backend.accepted(), 11, "a refused connection reached the backend");
}
