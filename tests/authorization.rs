//! End-to-end tests of the authorization rules at fleet scale, through real rustls clients and
//! an mTLS listener: identity patterns (one segment, trailing `**`, DNS suffixes), exact entries
//! beating patterns, the most specific pattern winning alone, deny entries, source networks on
//! grants and on listeners (refused before any handshake), and shadow tables that only count.
//!
//! Each rule has its acceptance beside its rejection; a refusal is proven by the reason counted
//! and by a backend that saw no connection.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::tls::{assert_echoes, assert_refused, connect_from, Pki};
use common::{within, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

const TD: &str = "spiffe://prod.example";

/// An mTLS listener `tls` (upstream `web` by default, SNI `db.localhost` -> `db`) in front of
/// two echo backends, with `listener_keys` and `rest` added.
struct Fixture {
    lb: TestServer,
    web: TestBackend,
    db: TestBackend,
    pki: Pki,
}

impl Fixture {
    async fn start(listener_keys: &str, rest: &str) -> Fixture {
        let pki = Pki::new(&["db.localhost"]);
        let (web, db) = (TestBackend::echo().await, TestBackend::echo().await);
        let toml = pki.one_pool_config(
            &pki.ca_file,
            "1.2",
            listener_keys,
            &[web.addr],
            &format!(
                "[[upstream]]\nname = \"db\"\nbackends = [\"{}\"]\n\n[listener.sni]\n\"db.localhost\" = \"db\"\n\n{rest}",
                db.addr
            ),
        );
        let lb = TestServer::start(&toml).await;
        Fixture { lb, web, db, pki }
    }

    /// Connects as `identity` from `source` to the server name `name` (`localhost`: `web`,
    /// `db.localhost`: `db`).
    async fn connect(
        &self,
        identity: &str,
        source: IpAddr,
        name: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = self.pki.client_config(Some(&self.pki.client(identity)));
        let tcp = connect_from(source, self.lb.addr("tls")).await;
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        within(
            "the client's handshake",
            TlsConnector::from(Arc::clone(&config)).connect(name, tcp),
        )
        .await
    }

    /// Asserts `identity` reaches the upstream behind `name` (its bytes echo).
    async fn assert_served(&self, identity: &str, name: &str) {
        self.assert_served_from(identity, LOCAL, name).await;
    }

    async fn assert_served_from(&self, identity: &str, source: IpAddr, name: &str) {
        let mut stream = self.connect(identity, source, name).await.expect("handshake");
        assert_echoes(&mut stream, identity.as_bytes()).await;
    }

    /// Asserts `identity` is refused on `name`, counted as `reason` (the `n`th refusal), and no
    /// backend saw a connection since `seen` accepted ones.
    async fn assert_refused(&self, identity: &str, source: IpAddr, name: &str, expected: &[(Reason, u64)]) {
        let seen = self.web.accepted() + self.db.accepted();
        assert_refused(self.connect(identity, source, name).await).await;
        self.lb.wait_for_rejections("tls", expected).await;
        assert_eq!(
            self.web.accepted() + self.db.accepted(),
            seen,
            "a refused client reached a backend"
        );
    }
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn id(path: &str) -> String {
    format!("{TD}/{path}")
}

#[tokio::test]
async fn a_one_segment_pattern_serves_one_segment_and_refuses_two() {
    let f = Fixture::start(
        "",
        &format!("[authorization]\n\"{TD}/ns/*/sa/api\" = [\"web\"]\n"),
    )
    .await;
    f.assert_served(&id("ns/payments/sa/api"), "localhost").await;
    f.assert_refused(
        &id("ns/payments/x/sa/api"),
        LOCAL,
        "localhost",
        &[(Reason::Unauthorized, 1)],
    )
    .await;
}

#[tokio::test]
async fn a_double_star_serves_trailing_segments_but_not_the_bare_prefix() {
    let f = Fixture::start(
        "",
        &format!("[authorization]\n\"{TD}/ns/payments/**\" = [\"web\"]\n"),
    )
    .await;
    f.assert_served(&id("ns/payments/sa/api"), "localhost").await;
    f.assert_served(&id("ns/payments/sa/api/v2"), "localhost").await;
    f.assert_refused(
        &id("ns/payments"),
        LOCAL,
        "localhost",
        &[(Reason::Unauthorized, 1)],
    )
    .await;
}

#[tokio::test]
async fn a_dns_suffix_pattern_serves_names_below_it_and_refuses_the_suffix_itself() {
    let f = Fixture::start("", "[authorization]\n\"*.batch.internal\" = [\"web\"]\n").await;
    f.assert_served("worker.batch.internal", "localhost").await;
    f.assert_refused("batch.internal", LOCAL, "localhost", &[(Reason::Unauthorized, 1)])
        .await;
}

#[tokio::test]
async fn an_exact_entry_beats_a_pattern_and_its_grants_alone_apply() {
    let api = id("ns/payments/sa/api");
    let rest = format!("[authorization]\n\"{TD}/ns/payments/**\" = [\"web\"]\n\"{api}\" = [\"db\"]\n");
    let f = Fixture::start("", &rest).await;
    f.assert_served(&api, "db.localhost").await;
    f.assert_refused(&api, LOCAL, "localhost", &[(Reason::Unauthorized, 1)])
        .await;
    f.assert_served(&id("ns/payments/sa/batch"), "localhost").await;
}

#[tokio::test]
async fn the_most_specific_pattern_wins_and_grants_are_not_unioned() {
    let rest =
        format!("[authorization]\n\"{TD}/ns/*/sa/api\" = [\"web\"]\n\"{TD}/ns/payments/**\" = [\"db\"]\n");
    let f = Fixture::start("", &rest).await;
    let api = id("ns/payments/sa/api");
    f.assert_served(&api, "db.localhost").await;
    f.assert_refused(&api, LOCAL, "localhost", &[(Reason::Unauthorized, 1)])
        .await;
    f.assert_served(&id("ns/shop/sa/api"), "localhost").await;
}

#[tokio::test]
async fn a_deny_entry_beats_an_exact_grant_and_is_counted_as_denied() {
    let rest =
        "[authorization]\nalice = [\"web\"]\nbob = [\"web\"]\n[authorization.deny]\nalice = \"key leaked\"\n";
    let f = Fixture::start("", rest).await;
    f.assert_served("bob", "localhost").await;
    f.assert_refused("alice", LOCAL, "localhost", &[(Reason::Denied, 1)])
        .await;
}

#[tokio::test]
async fn a_global_deny_applies_on_a_listener_with_its_own_table() {
    let rest = "[listener.authorization]\nalice = [\"web\"]\nbob = [\"web\"]\n\n[authorization]\ndeny = [\"alice\"]\n";
    // The listener's own table is written right after its [listener.tls]; the global one after.
    let f = Fixture::start("", rest).await;
    f.assert_served("bob", "localhost").await;
    f.assert_refused("alice", LOCAL, "localhost", &[(Reason::Denied, 1)])
        .await;
}

#[tokio::test]
async fn a_grant_from_networks_serves_its_source_and_refuses_another() {
    let rest = "[authorization]\nalice = [{ upstream = \"web\", from = [\"127.0.0.2\"] }]\n";
    let f = Fixture::start("", rest).await;
    let (allowed, other) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());
    f.assert_served_from("alice", allowed, "localhost").await;
    f.assert_refused("alice", other, "localhost", &[(Reason::SourceDenied, 1)])
        .await;
}

#[tokio::test]
async fn deny_from_refuses_a_source_before_any_handshake_and_allow_from_admits_its_networks() {
    let keys = "allow_from = [\"127.0.0.0/8\"]\ndeny_from = [\"127.0.0.3\"]";
    let f = Fixture::start(keys, "[authorization]\nalice = [\"web\"]\n").await;
    f.assert_served_from("alice", [127, 0, 0, 2].into(), "localhost")
        .await;
    let listener = Arc::clone(f.lb.current().listener("tls").expect("listener"));
    let handshakes = listener.figures.handshake.count();
    f.assert_refused(
        "alice",
        [127, 0, 0, 3].into(),
        "localhost",
        &[(Reason::SourceDenied, 1)],
    )
    .await;
    assert_eq!(
        listener.figures.handshake.count(),
        handshakes,
        "a handshake ran for a denied source"
    );
    assert!(
        fulcrum::metrics::HandshakeFailure::ALL
            .iter()
            .all(|failure| listener.handshake_failures.get(*failure) == 0),
        "a handshake was attempted for a denied source"
    );
}

#[tokio::test]
async fn allow_from_refuses_a_plain_listeners_client_from_elsewhere() {
    let backend = TestBackend::echo().await;
    let toml = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nallow_from = [\"127.0.0.2\"]\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let lb = TestServer::start(&toml).await;
    let mut served = connect_from([127, 0, 0, 2].into(), lb.addr("plain")).await;
    assert_echoes(&mut served, b"hello").await;
    let refused = connect_from([127, 0, 0, 4].into(), lb.addr("plain")).await;
    assert_refused(Ok::<_, std::io::Error>(refused)).await;
    lb.wait_for_rejections("plain", &[(Reason::SourceDenied, 1)])
        .await;
    assert_eq!(backend.accepted(), 1, "a refused source reached the backend");
}

#[tokio::test]
async fn a_shadow_table_counts_its_verdicts_and_changes_nothing_served() {
    let logs = common::TempDir::new("shadow");
    let log = logs.path().join("access.log");
    let rest = format!(
        "[authorization]\nalice = [\"web\"]\nbob = [\"web\"]\n\
         [authorization.shadow]\nalice = [\"web\"]\ncarol = [\"web\"]\n\
         [access_log]\npath = {}\n",
        common::toml_path(&log)
    );
    let f = Fixture::start("", &rest).await;
    f.assert_served("alice", "localhost").await;
    f.assert_served("bob", "localhost").await;
    f.assert_refused("carol", LOCAL, "localhost", &[(Reason::Unauthorized, 1)])
        .await;
    let listener = Arc::clone(f.lb.current().listener("tls").expect("listener"));
    assert_eq!(
        listener.shadow.counts(),
        [("web".to_string(), false, 1), ("web".to_string(), true, 2)],
        "shadow verdicts: bob would be denied, alice and carol allowed"
    );
    // Only the disagreements are marked, in the access log as in the log lines.
    common::wait_until("three access log entries", || common::access_log(&log).len() == 3).await;
    let shadow_of = |key: &str, value: &str| {
        let entries = common::access_log(&log);
        let entry = entries.iter().find(|e| e[key] == value).cloned();
        entry.map(|e| e["shadow"].clone())
    };
    assert_eq!(shadow_of("identity", "alice"), Some(serde_json::Value::Null));
    assert_eq!(shadow_of("identity", "bob"), Some("would_deny".into()));
    // carol was refused: her entry carries no identity.
    assert_eq!(shadow_of("outcome", "refused"), Some("would_allow".into()));
}

/// `fulcrum verify` of `identity`'s certificate against `config`, with `extra` arguments: its
/// exit code and stdout.
async fn verify(
    pki: &Pki,
    config: &std::path::Path,
    identity: &str,
    extra: &[&str],
) -> (Option<i32>, String) {
    let chain = pki.dir.write("chain.pem", &pki.client(identity).cert);
    let mut args = vec![
        "verify",
        "--config",
        config.to_str().expect("UTF-8"),
        "--listener",
        "tls",
    ];
    args.extend_from_slice(extra);
    args.push(chain.to_str().expect("UTF-8"));
    let output = common::process::output(&args).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn fulcrum_verify_names_the_deciding_entry_the_networks_needed_and_the_shadow_verdict() {
    let pki = Pki::new(&["db.localhost"]);
    let rest = format!(
        "[[upstream]]\nname = \"db\"\nbackends = [\"127.0.0.1:9\"]\n[listener.sni]\n\"db.localhost\" = \"db\"\n\
         [authorization]\n\"{TD}/ns/payments/**\" = [\"web\"]\n\
         \"{TD}/ns/payments/sa/api\" = [{{ upstream = \"web\", from = [\"10.0.0.0/8\"] }}]\n\
         deny = [\"{TD}/ns/payments/sa/legacy\"]\n\
         [authorization.shadow]\n\"{TD}/ns/payments/**\" = [\"web\", \"db\"]\n"
    );
    let toml = pki.one_pool_config(&pki.ca_file, "1.2", "", &[common::refused_addr()], &rest);
    let config = pki.dir.write("fulcrum.toml", &toml);

    let (code, out) = verify(&pki, &config, &id("ns/payments/sa/batch"), &[]).await;
    assert_eq!(code, Some(0), "{out}");
    let pattern = format!("may reach: web (pattern \"{TD}/ns/payments/**\")");
    assert!(out.contains(&pattern), "{out}");
    assert!(out.contains("shadow would allow: db, web"), "{out}");

    let (code, out) = verify(&pki, &config, &id("ns/payments/sa/api"), &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("only from listed networks: web"), "{out}");
    let (_, out) = verify(&pki, &config, &id("ns/payments/sa/api"), &["--from", "10.1.2.3"]).await;
    let exact = format!("may reach: web (exact entry \"{TD}/ns/payments/sa/api\")");
    assert!(out.contains(&exact), "{out}");

    let (code, out) = verify(&pki, &config, &id("ns/payments/sa/legacy"), &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("refused: denied: ") && out.contains("deny entry"),
        "{out}"
    );
}

#[tokio::test]
async fn fulcrum_check_prints_the_effective_policy_and_the_overlapping_patterns() {
    let pki = Pki::new(&[]);
    let rest = format!(
        "[authorization]\nalice = [\"web\"]\n\"{TD}/ns/*/sa/api\" = [\"web\"]\n\"{TD}/ns/payments/**\" = [\"web\"]\n\
         \"{TD}/ns/shop/sa/*\" = [\"web\"]\ndeny = [\"bob\"]\n[authorization.shadow]\nalice = [\"web\"]\n"
    );
    let toml = pki.one_pool_config(&pki.ca_file, "1.2", "", &[common::refused_addr()], &rest);
    let config = pki.dir.write("fulcrum.toml", &toml);
    let output = common::process::output(&["check", "--config", config.to_str().expect("UTF-8")]).await;
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary =
        "listener \"tls\" authorization: 1 exact, 3 patterns, 1 deny; shadow: 1 exact, 0 patterns, 0 deny";
    assert!(out.contains(summary), "{out}");
    let overlap =
        |wins: &str, loses: &str| format!("patterns overlap: \"{TD}/{wins}\" wins over \"{TD}/{loses}\"");
    assert!(out.contains(&overlap("ns/payments/**", "ns/*/sa/api")), "{out}");
    assert!(out.contains(&overlap("ns/shop/sa/*", "ns/*/sa/api")), "{out}");
    assert_eq!(out.matches("patterns overlap").count(), 2, "{out}");
}
