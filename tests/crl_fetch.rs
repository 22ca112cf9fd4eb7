//! CRLs fetched from their distribution points (`[listener.tls] crl_urls`), end to end: a CRL
//! served by a local HTTP server revokes open connections and new handshakes within one
//! `crl_refresh`; a failed, oversized or older answer keeps the last good CRL; `crl_cache_dir`
//! carries the last good CRL over a restart without the network; and the settings are checked.
//!
//! The CRL server is a plain TCP server on 127.0.0.1 port 0 answering every request with what
//! the test set; real rustls clients, certificates and CRLs generated at run time; every wait has
//! a deadline.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::tls::{assert_echoes, assert_refused, connect_tls, Pki};
use common::{toml_path, wait_until, TestBackend, TestServer};
use fulcrum::metrics::HandshakeFailure;
use fulcrum::pki::{serial_of, Pem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the CRL server answers.
#[derive(Clone)]
enum Answer {
    /// 200 with this body (and its Content-Length).
    Body(Vec<u8>),
    /// This status, empty body.
    Status(u16),
    /// 200, no Content-Length: this body, then the connection closes.
    Unsized(Vec<u8>),
    /// Reads the request and never answers.
    Silence,
}

/// A CRL distribution point under the test's control.
struct CrlServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CrlServer {
    async fn start(answer: Answer) -> CrlServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the CRL server");
        let addr = listener.local_addr().expect("CRL server address");
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let (shared, count) = (Arc::clone(&answer), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = shared.lock().expect("answer").clone();
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = match answer {
                        Answer::Body(body) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            stream.write_all(&[head.as_bytes(), &body].concat()).await
                        }
                        Answer::Status(code) => {
                            let head = format!(
                                "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                            stream.write_all(head.as_bytes()).await
                        }
                        Answer::Unsized(body) => {
                            let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
                            stream.write_all(&[head.as_bytes(), &body].concat()).await
                        }
                        Answer::Silence => {
                            let _ = stream.read(&mut buf).await;
                            Ok(())
                        }
                    };
                });
            }
        });
        CrlServer {
            addr,
            answer,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/ca.crl", self.addr)
    }

    fn serve(&self, answer: Answer) {
        *self.answer.lock().expect("answer") = answer;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for CrlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CRL of the test CA numbered `number`, revoking `revoked`, as PEM bytes.
fn crl(pki: &Pki, revoked: &[&Pem], number: u64) -> Answer {
    let serials: Vec<Vec<u8>> = revoked
        .iter()
        .map(|p| serial_of(&p.cert).expect("serial"))
        .collect();
    let next_update = SystemTime::now() + Duration::from_secs(3600);
    let pem = pki
        .ca
        .numbered_crl(&serials, next_update, number)
        .expect("sign a CRL");
    Answer::Body(pem.into_bytes())
}

/// One mTLS listener `tls` in front of `backend`, alice and bob authorized, with `crl_keys`; an
/// access log in the PKI's directory.
fn config(pki: &Pki, backend: SocketAddr, crl_keys: &str) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nhandshake_timeout = \"5s\"\n\
         {tls}{crl_keys}\n\n[[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n\
         [authorization]\nalice = [\"web\"]\nbob = [\"web\"]\n\n[access_log]\npath = {log}\n",
        tls = pki.tls_table(&pki.ca_file, "1.3"),
        log = toml_path(&pki.dir.path().join("access.log")),
    )
}

/// `crl_urls` naming `server`, fetched at least every second, with `more` keys.
fn fetching(server: &CrlServer, more: &str) -> String {
    format!("crl_urls = [\"{}\"]\ncrl_refresh = \"1s\"\n{more}", server.url())
}

/// `fulcrum_crl_fetches_total{listener="tls",outcome=...}` as `/metrics` shows it now.
fn fetches(lb: &TestServer, outcome: &str) -> u64 {
    let metrics = fulcrum::admin::prometheus::render(&lb.current());
    let prefix = format!("fulcrum_crl_fetches_total{{listener=\"tls\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_for_fetches(lb: &TestServer, outcome: &str, at_least: u64) {
    wait_until(&format!("{at_least} CRL fetch(es) counted {outcome}"), || {
        fetches(lb, outcome) >= at_least
    })
    .await;
}

fn revoked_handshakes(lb: &TestServer) -> u64 {
    lb.current()
        .listener("tls")
        .expect("listener tls")
        .handshake_failures
        .get(HandshakeFailure::Revoked)
}

/// Asserts `who` is refused at the handshake, counted as revoked, before any backend is dialed.
async fn assert_revoked(lb: &TestServer, pki: &Pki, echo: &TestBackend, who: &Pem) {
    let (before, dialed) = (revoked_handshakes(lb), echo.accepted());
    assert_refused(connect_tls(lb.addr("tls"), &pki.client_config(Some(who)), "localhost").await).await;
    wait_until("the handshake counted as revoked", || {
        revoked_handshakes(lb) > before
    })
    .await;
    assert_eq!(echo.accepted(), dialed, "a revoked client reached the backend");
}

/// Asserts `who` is served (its bytes come back from the echo backend).
async fn assert_served(lb: &TestServer, pki: &Pki, who: &Pem) {
    let mut stream = connect_tls(lb.addr("tls"), &pki.client_config(Some(who)), "localhost")
        .await
        .expect("handshake");
    assert_echoes(&mut stream, b"served").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_crl_closes_the_open_connection_it_revokes_and_refuses_it_afterwards() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (alice, bob) = (pki.client("alice"), pki.client("bob"));
    let server = CrlServer::start(crl(&pki, &[], 1)).await;
    let lb = TestServer::start(&config(&pki, echo.addr, &fetching(&server, ""))).await;
    wait_for_fetches(&lb, "updated", 1).await;
    let mut open = connect_tls(lb.addr("tls"), &pki.client_config(Some(&bob)), "localhost")
        .await
        .expect("bob's handshake");
    assert_echoes(&mut open, b"bob before the revocation").await;

    server.serve(crl(&pki, &[&bob], 2));
    wait_for_fetches(&lb, "updated", 2).await;

    common::assert_ends(&mut open, "bob's open connection").await;
    wait_until("bob's open connection logged as access_revoked", || {
        common::access_log(&pki.dir.path().join("access.log"))
            .iter()
            .any(|e| e["identity"] == "bob" && e["outcome"] == "access_revoked")
    })
    .await;
    assert_revoked(&lb, &pki, &echo, &bob).await;
    assert_served(&lb, &pki, &alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_and_a_timeout_keep_the_last_crl_through_a_reload_and_count_as_failed() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (alice, bob) = (pki.client("alice"), pki.client("bob"));
    let server = CrlServer::start(crl(&pki, &[&bob], 1)).await;
    let text = config(&pki, echo.addr, &fetching(&server, "crl_timeout = \"300ms\"\n"));
    let lb = TestServer::start(&text).await;
    wait_for_fetches(&lb, "updated", 1).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;

    let config = fulcrum::Config::from_toml(&text, "t").expect("config");
    lb.handle.reload_with(config).await.expect("reload");
    assert_revoked(&lb, &pki, &echo, &bob).await;

    server.serve(Answer::Status(404));
    wait_for_fetches(&lb, "failed", 1).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;
    server.serve(Answer::Silence);
    let asked = server.requests();
    wait_until("a fetch that gets no answer", || server.requests() > asked).await;
    wait_for_fetches(&lb, "failed", 2).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;
    assert_served(&lb, &pki, &alice).await;
    assert_eq!(fetches(&lb, "updated"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_crl_max_size_is_refused_and_the_last_crl_kept() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let bob = pki.client("bob");
    let server = CrlServer::start(crl(&pki, &[&bob], 1)).await;
    let keys = fetching(&server, "crl_max_size = 4096\n");
    let lb = TestServer::start(&config(&pki, echo.addr, &keys)).await;
    wait_for_fetches(&lb, "updated", 1).await;

    // A newer CRL that no longer revokes bob, but too big: taken, it would let him in.
    let others: Vec<Vec<u8>> = (1..=200u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let next_update = SystemTime::now() + Duration::from_secs(3600);
    let big = pki
        .ca
        .numbered_crl(&others, next_update, 2)
        .expect("sign a CRL")
        .into_bytes();
    assert!(big.len() > 4096);
    server.serve(Answer::Unsized(big.clone()));
    wait_for_fetches(&lb, "refused", 1).await;
    server.serve(Answer::Body(big));
    wait_for_fetches(&lb, "refused", 2).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;
    assert_eq!(fetches(&lb, "failed"), 0, "too big is refused, not failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_crl_is_refused_while_a_newer_one_lifts_the_revocation() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let bob = pki.client("bob");
    let server = CrlServer::start(crl(&pki, &[&bob], 5)).await;
    let lb = TestServer::start(&config(&pki, echo.addr, &fetching(&server, ""))).await;
    wait_for_fetches(&lb, "updated", 1).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;

    server.serve(crl(&pki, &[], 4));
    wait_for_fetches(&lb, "refused", 1).await;
    assert_revoked(&lb, &pki, &echo, &bob).await;

    server.serve(crl(&pki, &[], 6));
    wait_for_fetches(&lb, "updated", 2).await;
    assert_served(&lb, &pki, &bob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_crl_server_starts_with_the_cached_crl() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (alice, bob) = (pki.client("alice"), pki.client("bob"));
    let cache = pki.dir.path().join("crl-cache");
    let server = CrlServer::start(crl(&pki, &[&bob], 1)).await;
    let text = config(
        &pki,
        echo.addr,
        &fetching(&server, &format!("crl_cache_dir = {}\n", toml_path(&cache))),
    );
    let first = TestServer::start(&text).await;
    wait_for_fetches(&first, "updated", 1).await;
    let files = cached(&cache);
    assert_eq!(files.len(), 1, "one cache file per URL: {files:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&files[0])
        .expect("cache file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(first);
    drop(server);

    let second = TestServer::start(&text).await;
    assert_revoked(&second, &pki, &echo, &bob).await;
    assert_served(&second, &pki, &alice).await;
    assert_eq!(
        fetches(&second, "updated"),
        0,
        "nothing was fetched: the CRL came from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_crl_yet_every_client_is_refused_as_revocation_unknown() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let alice = pki.client("alice");
    let server = CrlServer::start(Answer::Status(503)).await;
    let lb = TestServer::start(&config(&pki, echo.addr, &fetching(&server, ""))).await;
    wait_for_fetches(&lb, "failed", 1).await;
    assert_refused(connect_tls(lb.addr("tls"), &pki.client_config(Some(&alice)), "localhost").await).await;
    wait_until("alice's handshake counted as revocation_unknown", || {
        lb.current()
            .listener("tls")
            .is_some_and(|l| l.handshake_failures.get(HandshakeFailure::RevocationUnknown) >= 1)
    })
    .await;
    assert_eq!(echo.accepted(), 0);

    server.serve(crl(&pki, &[], 1));
    wait_for_fetches(&lb, "updated", 1).await;
    assert_served(&lb, &pki, &alice).await;
}

/// The files in the cache directory.
fn cached(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

#[test]
fn crl_fetch_settings_out_of_bounds_are_refused_naming_the_key() {
    let pki = Pki::new(&[]);
    let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let refused = |keys: &str| {
        fulcrum::Config::from_toml(&config(&pki, backend, keys), "t")
            .expect_err(keys)
            .to_string()
    };
    for (keys, key, why) in [
        (
            "crl_urls = [\"https://pki.example/ca.crl\"]",
            "crl_urls",
            "https is not supported",
        ),
        ("crl_urls = [\"ftp://pki.example/ca.crl\"]", "crl_urls", "http://"),
        (
            "crl_urls = [\"http://user@pki.example/ca.crl\"]",
            "crl_urls",
            "user information",
        ),
        (
            "crl_urls = [\"http://a/x\", \"http://a/x\"]",
            "crl_urls",
            "listed twice",
        ),
        (
            "crl_urls = [\"http://a/x\"]\ncrl_max_size = 0",
            "crl_max_size",
            "at least 1",
        ),
        (
            "crl_urls = [\"http://a/x\"]\ncrl_timeout = \"0s\"",
            "crl_timeout",
            "greater than zero",
        ),
        (
            "crl_urls = [\"http://a/x\"]\ncrl_refresh = \"500ms\"",
            "crl_refresh",
            "at least 1s",
        ),
        ("crl_refresh = \"1h\"", "crl_refresh", "needs crl_urls"),
        ("crl_urls = []", "crl_urls", "needs crl_urls"),
    ] {
        let error = refused(keys);
        assert!(error.contains(key) && error.contains(why), "{keys}: {error}");
    }
    let many: Vec<String> = (0..17).map(|i| format!("\"http://a/{i}\"")).collect();
    let error = refused(&format!("crl_urls = [{}]", many.join(", ")));
    assert!(error.contains("at most 16"), "{error}");

    let plain = format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n[listener.tls]\ncert = {}\nkey = {}\n\
         crl_urls = [\"http://a/x\"]\n\n[[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n",
        toml_path(&pki.server_cert),
        toml_path(&pki.server_key),
    );
    let error = fulcrum::Config::from_toml(&plain, "t")
        .expect_err("no mTLS")
        .to_string();
    assert!(
        error.contains("crl_urls") && error.contains("client_ca"),
        "{error}"
    );
}

#[test]
fn crl_fetch_settings_in_bounds_load_and_check_lists_each_listeners_urls() {
    let pki = Pki::new(&[]);
    let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let keys = "crl_urls = [\"http://pki.example/ca.crl\", \"http://[::1]:8080/b.crl\"]\n\
                crl_from_certificates = true\ncrl_refresh = \"1s\"\ncrl_max_size = 1\ncrl_timeout = \"1ms\"\n";
    let config = fulcrum::Config::from_toml(&config(&pki, backend, keys), "t").expect("valid");
    let fetch = config.listeners[0]
        .tls
        .as_ref()
        .and_then(|t| t.crl_fetch.clone())
        .expect("CRL fetching");
    assert_eq!(fetch.urls.len(), 2);
    assert_eq!(fetch.refresh, Duration::from_secs(1));
    let checked = fulcrum::check(&config).expect("check");
    let line = checked
        .trust
        .iter()
        .find(|l| l.contains("CRL URLs"))
        .expect("a CRL URL line");
    assert!(
        line.contains("http://pki.example/ca.crl | http://[::1]:8080/b.crl"),
        "{line}"
    );

    let defaults = fulcrum::Config::from_toml(&config_text_defaults(&pki, backend), "t").expect("valid");
    let fetch = defaults.listeners[0]
        .tls
        .as_ref()
        .and_then(|t| t.crl_fetch.clone());
    let fetch = fetch.expect("CRL fetching");
    assert_eq!(
        (fetch.refresh, fetch.max_size, fetch.timeout, fetch.cache_dir),
        (
            fulcrum::config::DEFAULT_CRL_REFRESH,
            fulcrum::config::DEFAULT_CRL_MAX_SIZE,
            fulcrum::config::DEFAULT_CRL_TIMEOUT,
            None
        )
    );
}

fn config_text_defaults(pki: &Pki, backend: SocketAddr) -> String {
    config(pki, backend, "crl_urls = [\"http://pki.example/ca.crl\"]\n")
}

/// A client leaf `name` issued by `issuer`, naming `point` as its CRL distribution point.
fn leaf_naming(issuer: &common::pki::Cert, name: &str, point: &str) -> common::pki::Cert {
    let mut params = common::pki::leaf_params(&[name]);
    params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
        uris: vec![point.to_string()],
    }];
    common::pki::issue(params, Some(issuer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_from_certificates_fetches_the_point_a_verified_client_names_and_never_an_untrusted_ones() {
    let dir = common::TempDir::new("crl-seen");
    let server_cert = common::pki::ServerCert::new(&dir);
    let ca = common::pki::root("client CA without a distribution point");
    let points = CrlServer::start(Answer::Body(common::pki::crl(&ca, &[]).into_bytes())).await;
    let elsewhere = CrlServer::start(Answer::Status(404)).await;
    let alice = leaf_naming(&ca, "alice", &points.url());
    let stranger = leaf_naming(
        &common::pki::root("a CA the listener does not trust"),
        "alice",
        &elsewhere.url(),
    );
    let echo = TestBackend::echo().await;
    let text = format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [listener.tls]\n{}client_ca = {}\ncrl_from_certificates = true\ncrl_refresh = \"1s\"\n\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n\n[authorization]\nalice = [\"web\"]\n",
        server_cert.tls_keys(),
        toml_path(&dir.write("client-ca.pem", &ca.pem)),
        echo.addr,
    );
    let lb = TestServer::start(&text).await;
    let addr = lb.addr("tls");
    let connect = async |who: &common::pki::Cert| {
        let config = common::pki::chain_client_config(&server_cert.ca_pem, &who.pem, &who.key_pem);
        connect_tls(addr, &config, "localhost").await
    };

    // Its chain fails before revocation is looked at: its point is not recorded.
    assert_refused(connect(&stranger).await).await;
    // No CRL of the CA yet: refused for that alone, and its point is recorded and fetched.
    assert_refused(connect(&alice).await).await;
    wait_for_fetches(&lb, "updated", 1).await;
    let mut served = connect(&alice)
        .await
        .expect("alice's handshake with the CRL held");
    assert_echoes(&mut served, b"with the CRL of her distribution point").await;
    assert!(points.requests() >= 1, "the point alice names was fetched");
    assert_eq!(
        elsewhere.requests(),
        0,
        "a point named by an untrusted certificate was fetched"
    );
    assert_eq!(
        echo.accepted(),
        1,
        "only the served connection reached the backend"
    );
}
