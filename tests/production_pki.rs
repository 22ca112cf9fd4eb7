//! How an mTLS listener judges production-shaped chains, end to end: a root and an intermediate
//! both in `client_ca` with CRLs of each, an expired intermediate, name-constrained sub-CAs (DNS
//! and SPIFFE URI), two roots of one name (a key rollover), SPIFFE trust domains with a bundle
//! each, per-listener authorization, and `fulcrum verify` giving the same verdicts offline.
//!
//! "Refused" is: the handshake or the first read fails, the backend saw no connection, and the
//! listener counted the handshake failure under its reason. "Admitted" is an echo round trip.
//! Real rustls clients; every certificate and CRL generated at run time (tests/common/pki.rs);
//! everything on 127.0.0.1 port 0; every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use common::process::output as fulcrum;
use std::sync::Arc;
use std::time::SystemTime;

use common::pki::{
    chain_client_config, client, crl, days, dns_constrained_ca, expired_intermediate, intermediate, issue,
    leaf_params, pem_bundle, root, uri_constrained_ca, valid, Cert, ServerCert,
};
use common::tls::{assert_echoes, assert_refused, connect_tls};
use common::{poll_for, toml_path, wait_until, within, TempDir, TestBackend, TestServer};
use fulcrum::metrics::{HandshakeFailure, Reason};
use rustls::{ClientConfig, HandshakeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------------
// Cases: a listener's trust, and the clients tried against it

/// What must happen to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Served: an echo round trip through the backend.
    Admitted,
    /// Refused before any dial, counted under this handshake failure reason (`None`: any).
    Refused(Option<&'static str>),
}

use Expect::{Admitted, Refused};

/// One client: the chain it sends (PEM, leaf first), its key, the identity its leaf names.
struct Attempt {
    chain: String,
    key: String,
    identity: String,
    expect: Expect,
}

/// One mTLS listener `tls`'s trust (`client_ca`, `crl`, `trust_domains`) and its clients.
struct Case {
    what: &'static str,
    dir: TempDir,
    server: ServerCert,
    client_ca: Option<PathBuf>,
    crl: Option<PathBuf>,
    trust_domains: Vec<(String, PathBuf)>,
    attempts: Vec<Attempt>,
}

impl Case {
    fn new(what: &'static str) -> Case {
        let dir = TempDir::new("production-pki");
        let server = ServerCert::new(&dir);
        Case {
            what,
            dir,
            server,
            client_ca: None,
            crl: None,
            trust_domains: Vec::new(),
            attempts: Vec::new(),
        }
    }

    /// `client_ca` = these certificates, one PEM file, in this order.
    fn client_ca(mut self, cas: &[&Cert]) -> Case {
        self.client_ca = Some(self.dir.write("client_ca.pem", &pem_bundle(cas)));
        self
    }

    /// `crl` = these CRLs, one PEM file, in this order.
    fn crl(mut self, crls: &[String]) -> Case {
        self.crl = Some(self.dir.write("crl.pem", &crls.concat()));
        self
    }

    /// `[listener.tls.trust_domains] domain = bundle`, the bundle being `root`'s PEM.
    fn trust_domain(mut self, domain: &str, root: &Cert) -> Case {
        let bundle = self.dir.write(&format!("{domain}.bundle.pem"), &root.pem);
        self.trust_domains.push((domain.to_owned(), bundle));
        self
    }

    /// A client presenting `leaf` then `sent`, named `identity`.
    fn attempt(mut self, leaf: &Cert, sent: &[&Cert], identity: &str, expect: Expect) -> Case {
        let chain: Vec<&Cert> = std::iter::once(leaf).chain(sent.iter().copied()).collect();
        self.attempts.push(Attempt {
            chain: pem_bundle(&chain),
            key: leaf.key_pem.clone(),
            identity: identity.to_owned(),
            expect,
        });
        self
    }

    /// A `[[listener]]` named `name` in front of upstream `web` with this case's TLS table, then
    /// `extra` (e.g. its `[listener.authorization]`).
    fn listener(&self, name: &str, extra: &str) -> String {
        let mut text = format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\n[listener.tls]\n{}",
            self.server.tls_keys()
        );
        for (key, path) in [("client_ca", &self.client_ca), ("crl", &self.crl)] {
            if let Some(path) = path {
                text.push_str(&format!("{key} = {}\n", toml_path(path)));
            }
        }
        if !self.trust_domains.is_empty() {
            text.push_str("\n[listener.tls.trust_domains]\n");
            for (domain, bundle) in &self.trust_domains {
                text.push_str(&format!("{domain:?} = {}\n", toml_path(bundle)));
            }
        }
        format!("{text}\n{extra}\n")
    }

    /// Listener `tls`, upstream `web` on `backend`, and every identity tried granted `web` (so
    /// only the chain decides).
    fn config(&self, backend: SocketAddr) -> String {
        let grants: String = self
            .attempts
            .iter()
            .map(|a| format!("{:?} = [\"web\"]\n", a.identity))
            .collect();
        format!(
            "{}[[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n[authorization]\n{grants}",
            self.listener("tls", "")
        )
    }
}

/// The handshake failures `listener` counted so far, `(label, count)` per reason. By label, so
/// that this file compiles whichever reasons fulcrum has.
fn handshake_failures(lb: &TestServer, listener: &str) -> Vec<(&'static str, u64)> {
    let state = lb.current();
    let counts = &state
        .listener(listener)
        .unwrap_or_else(|| panic!("no listener {listener:?}"))
        .handshake_failures;
    HandshakeFailure::ALL
        .iter()
        .map(|f| (f.label(), counts.get(*f)))
        .collect()
}

/// The reasons counted since `before`, once at least one was (`None` after the deadline).
async fn counted_since(
    lb: &TestServer,
    listener: &str,
    before: &[(&'static str, u64)],
) -> Option<Vec<&'static str>> {
    let grown = || -> Vec<&'static str> {
        handshake_failures(lb, listener)
            .iter()
            .zip(before)
            .filter(|((_, now), (_, then))| now > then)
            .map(|((label, _), _)| *label)
            .collect()
    };
    poll_for(async || {
        let reasons = grown();
        (!reasons.is_empty()).then_some(reasons)
    })
    .await
}

/// Whether a client gets through: its handshake, then `probe` echoed back by the backend; or
/// how it was refused (the handshake failed, or the first read ended without data).
async fn outcome(addr: SocketAddr, client: &Arc<ClientConfig>, probe: &[u8]) -> Result<(), String> {
    let mut stream = connect_tls(addr, client, "localhost")
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    // The write may fail if the server already closed; the read decides.
    let _ = within("sending the probe", async {
        stream.write_all(probe).await?;
        stream.flush().await
    })
    .await;
    let mut back = vec![0u8; probe.len()];
    match within(
        "the echo or the end of the connection",
        stream.read_exact(&mut back),
    )
    .await
    {
        Ok(_) if back == probe => Ok(()),
        Ok(_) => panic!("the connection returned other bytes than the probe: {back:?}"),
        Err(e) => Err(format!("first read failed: {e}")),
    }
}

/// Runs `case` against a balancer: each client in turn must be admitted (echo) or refused (no
/// data, no dial, the handshake failure counted under its reason) as it expects. Every client is
/// tried; the test fails at the end listing each one that was judged otherwise.
async fn judge(case: Case) {
    let echo = TestBackend::echo().await;
    let lb = TestServer::start(&case.config(echo.addr)).await;
    let addr = lb.addr("tls");
    let mut served = 0;
    let mut mismatches = Vec::new();
    for attempt in &case.attempts {
        let client = chain_client_config(&case.server.ca_pem, &attempt.chain, &attempt.key);
        let before = handshake_failures(&lb, "tls");
        let got = outcome(addr, &client, attempt.identity.as_bytes()).await;
        served += usize::from(got.is_ok());
        let counted = match &got {
            Err(_) => counted_since(&lb, "tls", &before).await,
            Ok(()) => None,
        };
        let mismatch = match (attempt.expect, &got) {
            (Admitted, Ok(())) | (Refused(None), Err(_)) => None,
            (Admitted, Err(e)) => Some(format!("refused ({e}), counted as {counted:?}")),
            (Refused(_), Ok(())) => Some("admitted: an echo round trip through the backend".to_owned()),
            (Refused(Some(label)), Err(e)) => (counted.as_deref() != Some(&[label][..]))
                .then(|| format!("refused ({e}) but counted as {counted:?}, not [{label:?}]")),
        };
        if let Some(mismatch) = mismatch {
            mismatches.push(format!(
                "{} expected {:?}: {mismatch}",
                attempt.identity, attempt.expect
            ));
        }
        if echo.accepted() != served {
            mismatches.push(format!(
                "{}: the backend accepted {} connections, {served} clients were served",
                attempt.identity,
                echo.accepted()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}:\n{}", case.what, mismatches.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The table: each row a case, judged by a listener and by `fulcrum verify`

const PAYMENTS: &str = "payments.internal";

/// R -> I -> leaf; `client_ca` = R + I; R's CRL (revoking I or not) and I's empty CRL. The
/// client sends its leaf, plus I if `sends_i`.
fn intermediate_under_crls(what: &'static str, revoke_i: bool, sends_i: bool, expect: Expect) -> Case {
    let r = root("Example Root R");
    let i = intermediate("Example Intermediate I", &r);
    let leaf = client(&i, &[PAYMENTS]);
    let revoked: &[&Cert] = if revoke_i { &[&i] } else { &[] };
    let sent: &[&Cert] = if sends_i { &[&i] } else { &[] };
    Case::new(what)
        .client_ca(&[&r, &i])
        .crl(&[crl(&r, revoked), crl(&i, &[])])
        .attempt(&leaf, sent, PAYMENTS, expect)
}

fn row_1() -> Case {
    intermediate_under_crls(
        "row 1 (I revoked, leaf only)",
        true,
        false,
        Refused(Some("revoked")),
    )
}

fn row_2() -> Case {
    intermediate_under_crls(
        "row 2 (I revoked, leaf + I)",
        true,
        true,
        Refused(Some("revoked")),
    )
}

fn row_3() -> Case {
    intermediate_under_crls("row 3 (I not revoked, leaf only)", false, false, Admitted)
}

/// R -> I (expired yesterday, valid from 30 days ago) -> leaf valid from 20 days ago to 30 days
/// from now: at any instant between, the whole chain was valid.
fn row_4() -> Case {
    let r = root("Example Root R");
    let i = expired_intermediate("Expired Intermediate I", &r);
    let leaf = issue(valid(leaf_params(&[PAYMENTS]), days(-20), days(30)), Some(&i));
    Case::new("row 4 (I expired, leaf only)")
        .client_ca(&[&r, &i])
        .attempt(&leaf, &[], PAYMENTS, Refused(Some("expired")))
}

fn row_5() -> Case {
    let r = root("Example Root R");
    let team_a = dns_constrained_ca("Team A CA", "team-a.example", &r);
    let leaf = client(&team_a, &["svc.team-a.example", "spiffe://prod/admin"]);
    Case::new("row 5 (DNS-constrained sub-CA issues a SPIFFE ID)")
        .client_ca(&[&r, &team_a])
        .attempt(
            &leaf,
            &[&team_a],
            "spiffe://prod/admin",
            Refused(Some("name_constraints")),
        )
}

fn row_6() -> Case {
    let r = root("Example Root R");
    let prod = uri_constrained_ca("Prod SPIFFE CA", "prod", &r);
    let inside = client(&prod, &["spiffe://prod/svc"]);
    let outside = client(&prod, &["spiffe://other/svc"]);
    Case::new("row 6 (URI-constrained sub-CA)")
        .client_ca(&[&r, &prod])
        .attempt(&inside, &[], "spiffe://prod/svc", Admitted)
        .attempt(
            &outside,
            &[],
            "spiffe://other/svc",
            Refused(Some("name_constraints")),
        )
}

fn row_7() -> Case {
    let r1 = root("Example Rollover Root");
    let r2 = root("Example Rollover Root");
    let leaf = client(&r2, &["batch.internal"]);
    Case::new("row 7 (two roots of one name, only R1's CRL, leaf of R2)")
        .client_ca(&[&r1, &r2])
        .crl(&[crl(&r1, &[])])
        .attempt(&leaf, &[], "batch.internal", Refused(Some("revocation_unknown")))
}

fn table() -> Vec<Case> {
    vec![row_1(), row_2(), row_3(), row_4(), row_5(), row_6(), row_7()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_alone_is_refused_when_the_roots_crl_revokes_its_intermediate() {
    judge(row_1()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_sent_with_its_intermediate_is_refused_when_the_roots_crl_revokes_that_intermediate() {
    judge(row_2()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_alone_is_admitted_when_neither_crl_revokes_anything_on_its_path() {
    judge(row_3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_of_an_expired_intermediate_is_refused_as_expired_even_if_the_intermediate_is_in_client_ca() {
    judge(row_4()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ca_constrained_to_a_dns_subtree_cannot_vouch_for_a_spiffe_id() {
    judge(row_5()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ca_constrained_to_uri_host_prod_vouches_for_spiffe_prod_and_not_for_another_host() {
    judge(row_6()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_of_one_root_does_not_cover_a_leaf_of_another_root_with_the_same_name() {
    judge(row_7()).await;
}

// ---------------------------------------------------------------------------------------------
// SPIFFE trust domains: `[listener.tls.trust_domains]`, a bundle per domain, no `client_ca`

/// Which trust domain's root issues a leaf.
enum By {
    Prod,
    Staging,
}

/// A listener trusting `prod.example` and `staging.example` (a root each) and one client whose
/// leaf, for `names`, is issued by the root `by`.
fn trust_domains(what: &'static str, by: By, names: &[&str], expect: Expect) -> Case {
    let prod = root("prod.example SPIFFE root");
    let staging = root("staging.example SPIFFE root");
    let issuer = match by {
        By::Prod => &prod,
        By::Staging => &staging,
    };
    let leaf = client(issuer, names);
    Case::new(what)
        .trust_domain("prod.example", &prod)
        .trust_domain("staging.example", &staging)
        .attempt(&leaf, &[], names[0], expect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prod_workload_certified_by_the_prod_bundle_is_admitted() {
    judge(trust_domains(
        "prod web",
        By::Prod,
        &["spiffe://prod.example/web"],
        Admitted,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_workload_certified_by_the_staging_bundle_is_admitted() {
    judge(trust_domains(
        "staging web",
        By::Staging,
        &["spiffe://staging.example/web"],
        Admitted,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prod_spiffe_id_issued_by_the_staging_root_is_refused_as_unknown_ca() {
    judge(trust_domains(
        "forged prod admin",
        By::Staging,
        &["spiffe://prod.example/admin"],
        Refused(Some("unknown_ca")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_id_of_an_unconfigured_trust_domain_is_refused_as_trust_domain() {
    judge(trust_domains(
        "other.example",
        By::Prod,
        &["spiffe://other.example/x"],
        Refused(Some("trust_domain")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_only_certificate_is_refused_by_a_listener_with_trust_domains_and_no_client_ca() {
    judge(trust_domains(
        "DNS only",
        By::Prod,
        &["web.prod.example"],
        Refused(None),
    ))
    .await;
}

// ---------------------------------------------------------------------------------------------
// Per-listener authorization: `[listener.authorization]` replaces `[authorization]` there

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listeners_own_authorization_replaces_the_global_table_for_that_listener_only() {
    let ca_a = root("Listener A client CA");
    let ca_b = root("Listener B client CA");
    let a = Case::new("listener a").client_ca(&[&ca_a]).attempt(
        &client(&ca_a, &["alice"]),
        &[],
        "alice",
        Admitted,
    );
    let b = Case::new("listener b").client_ca(&[&ca_b]).attempt(
        &client(&ca_b, &["alice"]),
        &[],
        "alice",
        Refused(None),
    );
    let echo = TestBackend::echo().await;
    let text = format!(
        "{}{}[[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n\n[authorization]\nalice = [\"web\"]\n",
        a.listener("a", ""),
        b.listener("b", "[listener.authorization]\nbob = [\"web\"]\n"),
        echo.addr
    );
    let lb = TestServer::start(&text).await;
    let client_of = |case: &Case| {
        chain_client_config(
            &case.server.ca_pem,
            &case.attempts[0].chain,
            &case.attempts[0].key,
        )
    };

    assert_refused(connect_tls(lb.addr("b"), &client_of(&b), "localhost").await).await;
    wait_until("alice counted as unauthorized on listener b", || {
        lb.current()
            .listener("b")
            .expect("listener b")
            .rejected
            .get(Reason::Unauthorized)
            == 1
    })
    .await;
    assert_eq!(
        echo.accepted(),
        0,
        "alice of B's CA reached the backend through listener b"
    );

    let mut served = connect_tls(lb.addr("a"), &client_of(&a), "localhost")
        .await
        .expect("alice's handshake on listener a");
    assert_echoes(&mut served, b"the global table still grants alice on a").await;
    assert_eq!(echo.accepted(), 1);
}

// ---------------------------------------------------------------------------------------------
// `fulcrum verify --config FILE [--listener NAME] [--at RFC3339] [--json] CHAIN.pem`

/// `fulcrum verify` of attempt `n` of `case` against its config (listener `tls`), with `extra`
/// arguments before the chain file.
async fn verify(case: &Case, n: usize, extra: &[&str]) -> Output {
    let config = case
        .dir
        .write("fulcrum.toml", &case.config(common::refused_addr()));
    let chain = case.dir.write(&format!("chain-{n}.pem"), &case.attempts[n].chain);
    let config = config.to_str().expect("UTF-8 path");
    let mut args = vec!["verify", "--config", config, "--listener", "tls"];
    args.extend_from_slice(extra);
    args.push(chain.to_str().expect("UTF-8 path"));
    fulcrum(&args).await
}

/// What is wrong with `fulcrum verify`'s text verdict, expected to be `expect` for `identity`.
fn text_mismatch(identity: &str, expect: Expect, output: &Output) -> Option<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (code, line) = match expect {
        Admitted => (0, format!("accepted: {identity}")),
        Refused(Some(reason)) => (1, format!("refused: {reason}: ")),
        Refused(None) => (1, "refused: ".to_owned()),
    };
    let ok = output.status.code() == Some(code) && stdout.lines().any(|l| l.starts_with(&line));
    (!ok).then(|| {
        format!(
            "expected exit {code} and a line `{line}...`; got {:?}, stdout {stdout:?}, stderr {:?}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// What is wrong with `fulcrum verify --json`'s verdict on `attempt`, if anything.
fn json_mismatch(attempt: &Attempt, output: &Output) -> Option<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let got: serde_json::Value = match serde_json::from_str(stdout.trim()) {
        Ok(value) => value,
        Err(e) => return Some(format!("--json printed no JSON object ({e}): {stdout:?}")),
    };
    let ok = match attempt.expect {
        Admitted => {
            output.status.code() == Some(0)
                && got["verdict"] == "accepted"
                && got["identity"] == attempt.identity.as_str()
                && got["upstreams"] == serde_json::json!(["web"])
        }
        Refused(reason) => {
            output.status.code() == Some(1)
                && got["verdict"] == "refused"
                && got["detail"].is_string()
                && reason.is_none_or(|reason| got["reason"] == reason)
        }
    };
    (!ok).then(|| {
        format!(
            "--json: expected {:?}; got {:?}, {got}",
            attempt.expect,
            output.status.code()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_verify_gives_every_row_of_the_table_the_listeners_verdict() {
    let mut mismatches = Vec::new();
    for case in table() {
        for (n, attempt) in case.attempts.iter().enumerate() {
            let text = text_mismatch(&attempt.identity, attempt.expect, &verify(&case, n, &[]).await);
            let json = json_mismatch(attempt, &verify(&case, n, &["--json"]).await);
            for mismatch in [text, json].into_iter().flatten() {
                mismatches.push(format!("{} / {}: {mismatch}", case.what, attempt.identity));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// `at` as RFC 3339 in UTC, whole seconds.
fn rfc3339(at: SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let t = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_verify_at_an_instant_before_the_intermediate_expired_accepts_its_leaf() {
    let case = row_4();
    let at = rfc3339(days(-10));
    let output = verify(&case, 0, &["--at", &at]).await;
    if let Some(mismatch) = text_mismatch(PAYMENTS, Admitted, &output) {
        panic!("--at {at}: {mismatch}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_verify_exits_2_naming_the_problem_for_an_unknown_listener_or_a_missing_config() {
    let case = row_3();
    let config = case
        .dir
        .write("fulcrum.toml", &case.config(common::refused_addr()));
    let chain = case.dir.write("chain.pem", &case.attempts[0].chain);
    let missing = case.dir.path().join("missing.toml");
    let (config, chain, missing) = (
        config.to_str().expect("UTF-8"),
        chain.to_str().expect("UTF-8"),
        missing.to_str().expect("UTF-8"),
    );
    for (args, named) in [
        (
            vec!["verify", "--config", config, "--listener", "nosuch", chain],
            "nosuch",
        ),
        (vec!["verify", "--config", missing, chain], missing),
    ] {
        let output = fulcrum(&args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?}: the error does not name {named:?}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Revoking an intermediate at a reload: the open connections of its leaves, and their sessions

/// R and I, both in `client_ca`; `crl` = R's CRL then I's, revoking nothing yet; the leaves
/// (each named by its one name, sending itself only) granted `web`.
fn before_the_revocation(what: &'static str, r: &Cert, i: &Cert, leaves: &[(&Cert, &str)]) -> Case {
    leaves.iter().fold(
        Case::new(what)
            .client_ca(&[r, i])
            .crl(&[crl(r, &[]), crl(i, &[])]),
        |case, (leaf, name)| case.attempt(leaf, &[], name, Admitted),
    )
}

fn access_log(case: &Case) -> PathBuf {
    case.dir.path().join("access.log")
}

/// `case`'s config ([`Case::config`]) with an access log in its directory, written to a file
/// there so that the balancer can be reloaded from it.
fn config_file(case: &Case, backend: SocketAddr) -> PathBuf {
    let text = format!(
        "{}\n[access_log]\npath = {}\n",
        case.config(backend),
        toml_path(&access_log(case))
    );
    case.dir.write("fulcrum.toml", &text)
}

/// `(identity, outcome)` of every access log entry written so far.
fn outcomes(case: &Case) -> Vec<(String, String)> {
    common::access_log(&access_log(case))
        .iter()
        .map(|v| {
            (
                v["identity"].as_str().unwrap_or_default().to_owned(),
                v["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A fresh client (no session yet) presenting attempt `n` of `case`.
fn client_of(case: &Case, n: usize) -> Arc<ClientConfig> {
    chain_client_config(
        &case.server.ca_pem,
        &case.attempts[n].chain,
        &case.attempts[n].key,
    )
}

fn kind(stream: &TlsStream<TcpStream>) -> Option<HandshakeKind> {
    stream.get_ref().1.handshake_kind()
}

/// A connection of attempt `n` of `case` (a fresh client), served: one echo round trip.
async fn open(addr: SocketAddr, case: &Case, n: usize) -> TlsStream<TcpStream> {
    let mut stream = connect_tls(addr, &client_of(case, n), "localhost")
        .await
        .unwrap_or_else(|e| panic!("{}'s handshake: {e}", case.attempts[n].identity));
    assert_echoes(&mut stream, b"before I is revoked").await;
    stream
}

/// Rewrites `case`'s CRL file with R's CRL now revoking I (I's still revoking nothing), then
/// reloads the balancer (from its unchanged config file).
async fn revoke_intermediate(lb: &TestServer, case: &Case, r: &Cert, i: &Cert) {
    case.dir.write("crl.pem", &[crl(r, &[i]), crl(i, &[])].concat());
    within("the reload", lb.handle.reload())
        .await
        .expect("reload with R's CRL revoking I");
    assert_eq!(lb.current().generation, 2, "one reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_revokes_an_intermediate_closes_the_open_connections_of_its_leaves() {
    let r = root("Example Root R");
    let i = intermediate("Example Intermediate I", &r);
    let alice = client(&i, &["alice"]);
    let bob = client(&i, &["bob"]);
    let carol = client(&r, &["carol"]);
    let case = before_the_revocation(
        "I revoked at a reload",
        &r,
        &i,
        &[(&alice, "alice"), (&bob, "bob"), (&carol, "carol")],
    );
    let echo = TestBackend::echo().await;
    let path = config_file(&case, echo.addr);
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    let mut a = open(addr, &case, 0).await;
    let mut b = open(addr, &case, 1).await;
    let mut c = open(addr, &case, 2).await;

    revoke_intermediate(&lb, &case, &r, &i).await;

    common::assert_ends(&mut a, "alice's connection (a leaf of I)").await;
    common::assert_ends(&mut b, "bob's connection (a leaf of I)").await;
    assert_echoes(&mut c, b"carol, a leaf of R itself, keeps flowing").await;
    wait_until("alice's and bob's connections logged as access_revoked", || {
        let logged = outcomes(&case);
        ["alice", "bob"].iter().all(|who| {
            logged
                .iter()
                .filter(|(i, o)| i == who && o == "access_revoked")
                .count()
                == 1
        })
    })
    .await;
    let carols: Vec<_> = outcomes(&case)
        .into_iter()
        .filter(|(i, _)| i == "carol")
        .collect();
    assert!(carols.is_empty(), "carol's connection ended: {carols:?}");

    let before = handshake_failures(&lb, "tls");
    assert_refused(connect_tls(addr, &client_of(&case, 0), "localhost").await).await;
    assert_eq!(
        counted_since(&lb, "tls", &before).await,
        Some(vec!["revoked"]),
        "alice's new connection after the reload"
    );
    assert_eq!(echo.accepted(), 3, "alice's new connection reached the backend");
    assert_echoes(&mut c, b"carol still flows").await;
}

/// A reload starts every listener's session cache afresh, so a session from before it resumes
/// only on a connection accepted before it: that connection handshakes with the old generation
/// (its cache, no certificate check) and is then judged against the new trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_after_its_intermediate_was_revoked_is_refused() {
    let r = root("Example Root R");
    let i = intermediate("Example Intermediate I", &r);
    let alice = client(&i, &["alice"]);
    let case = before_the_revocation("a session of I's leaf", &r, &i, &[(&alice, "alice")]);
    let echo = TestBackend::echo().await;
    let path = config_file(&case, echo.addr);
    let lb = TestServer::start_file(&path).await;
    let addr = lb.addr("tls");
    // One client throughout: it keeps the session (a TLS 1.3 ticket) of its full handshake.
    let alice_client = client_of(&case, 0);
    let mut first = connect_tls(addr, &alice_client, "localhost")
        .await
        .expect("alice's handshake");
    assert_echoes(&mut first, b"alice before I is revoked").await;
    assert_eq!(kind(&first), Some(HandshakeKind::Full));
    drop(first);
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    wait_until("the balancer accepted the connection", || {
        lb.current().listener("tls").expect("listener tls").accepted.get() == 2
    })
    .await;

    revoke_intermediate(&lb, &case, &r, &i).await;

    let before = handshake_failures(&lb, "tls");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&alice_client));
    let resumed = within("alice's handshake", connector.connect(name, tcp)).await;
    if let Ok(stream) = &resumed {
        assert_eq!(
            kind(stream),
            Some(HandshakeKind::Resumed),
            "alice resumed her session"
        );
    }
    assert_refused(resumed).await;
    assert_eq!(
        counted_since(&lb, "tls", &before).await,
        Some(vec!["revoked"]),
        "alice's session resumed after the reload"
    );
    assert_eq!(
        echo.accepted(),
        1,
        "alice's session resumed after I's revocation reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_check_lists_the_anchors_and_intermediates_of_client_ca_and_names_a_bad_anchor() {
    let case = row_3();
    let config = case
        .dir
        .write("fulcrum.toml", &case.config(common::refused_addr()));
    let output = fulcrum(&["check", "--config", config.to_str().expect("UTF-8 path")]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "listener \"tls\" client_ca: anchors: CN=Example Root R; intermediates: CN=Example Intermediate I"
        ),
        "{stdout}"
    );
    // A client certificate pasted into client_ca is not used as an anchor, and check says so.
    let stray = client(&root("Elsewhere"), &["stray.example"]);
    let mut bundle = std::fs::read_to_string(case.client_ca.as_ref().expect("client_ca")).expect("read");
    bundle.push_str(&stray.pem);
    case.dir.write("client_ca.pem", &bundle);
    let output = fulcrum(&["check", "--config", config.to_str().expect("UTF-8 path")]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not used as a trust anchor: not a CA certificate"),
        "{stderr}"
    );
}
