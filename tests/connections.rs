//! The table of open connections end to end, against the real binary: `GET /connections` and
//! `fulcrum ctl connections` list every open connection with what it is (listener, client,
//! identity, certificate serial, upstream, backend, phase, bytes), a page at a time;
//! `POST /connections/close` and `fulcrum ctl close` close exactly the ones a filter matches with
//! a reset (`end="closed_by_operator"` in the access log), in whatever phase they are, and leave
//! the others alone. Both need the admin token; closing needs a filter.
//!
//! Real rustls clients and certificates generated at run time, everything on 127.0.0.1 port 0;
//! every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use common::process::{output, Fulcrum};
use common::tls::{assert_echoes, connect_tls, Pki};
use common::{access_log, connect, http, poll_for, round_trip, wait_until, TestBackend, DEADLINE};
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const TOKEN: &str = "connections-token";

/// An mTLS listener `tls` (alice and bob may reach `web`, the echo backend `echo`), plain
/// listeners `plain` and `queue` in front of `capped` (`held` at most one connection at a time,
/// the next ones queued), the access log and an admin listener that needs the token.
fn config(pki: &Pki, echo: SocketAddr, held: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nhandshake_timeout = \"60s\"\n{tls}\n\
         [[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"capped\"\n\
         [[listener]]\nname = \"queue\"\nbind = \"127.0.0.1:0\"\nupstream = \"capped\"\n\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{echo}\"]\n\n\
         [[upstream]]\nname = \"capped\"\nbackends = [{{ addr = \"{held}\", max_connections = 1 }}]\n\
         queue_size = 4\nqueue_timeout = \"60s\"\n\n\
         [authorization]\nalice = [\"web\"]\nbob = [\"web\"]\n\n\
         [access_log]\npath = \"access.log\"\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n",
        tls = pki.tls_table(&pki.ca_file, "1.2"),
    )
}

/// The binary on [`config`], started in the PKI's directory (the relative paths resolve there).
struct Running {
    fulcrum: Fulcrum,
    tls: SocketAddr,
    plain: SocketAddr,
    queue: SocketAddr,
    admin: SocketAddr,
}

async fn run(pki: &Pki, echo: SocketAddr, held: SocketAddr) -> Running {
    pki.dir.write_secret("admin.token", TOKEN);
    let mut fulcrum = Fulcrum::run(&pki.dir.write("fulcrum.toml", &config(pki, echo, held)));
    let tls = fulcrum.listening("tls").await;
    let plain = fulcrum.listening("plain").await;
    let queue = fulcrum.listening("queue").await;
    let admin = fulcrum.admin_addr().await;
    Running {
        fulcrum,
        tls,
        plain,
        queue,
        admin,
    }
}

fn log_path(pki: &Pki) -> PathBuf {
    pki.dir.path().join("access.log")
}

/// `fulcrum ctl --admin ADMIN --token-file ... ARGS`.
async fn ctl(pki: &Pki, admin: SocketAddr, args: &[&str]) -> Output {
    common::process::ctl(admin, &pki.dir.path().join("admin.token"), args).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ctl ARGS --json`, parsed, after asserting it succeeded.
async fn ctl_json(pki: &Pki, admin: SocketAddr, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let answer = ctl(pki, admin, &all).await;
    assert!(answer.status.success(), "ctl {args:?}: {answer:?}");
    serde_json::from_str(&stdout(&answer)).expect("JSON")
}

/// `GET /connections?QUERY` with the token: the status and the parsed answer.
async fn list(admin: SocketAddr, query: &str) -> (u16, Value) {
    let bearer = format!("Bearer {TOKEN}");
    let path = format!("/connections?{query}");
    let (status, body) = http(admin, "GET", &path, &[("Authorization", &bearer)], "").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The open connections' field `key`, in id order, once `ready` holds of the listing.
async fn listed_when(admin: SocketAddr, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = poll_for(async || {
        let (_, answer) = list(admin, "").await;
        last = answer.clone();
        ready(&answer).then_some(answer)
    })
    .await;
    found.unwrap_or_else(|| panic!("the listing never showed {what}; the last one: {last}"))
}

fn column<'a>(listing: &'a Value, key: &str) -> Vec<&'a Value> {
    listing["connections"]
        .as_array()
        .expect("a list of connections")
        .iter()
        .map(|c| &c[key])
        .collect()
}

/// The serial of a PEM certificate as the access log writes it (lowercase hex with colons).
fn serial_of(pem: &str) -> String {
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("one certificate")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse certificate");
    cert.raw_serial_as_string()
}

/// An mTLS connection of `who` that has echoed `probe` (so it was admitted and proxied).
async fn open(addr: SocketAddr, pki: &Pki, cert: &fulcrum::pki::Pem, probe: &[u8]) -> TlsStream<TcpStream> {
    let client = pki.client_config(Some(cert));
    let mut stream = connect_tls(addr, &client, "localhost").await.expect("handshake");
    assert_echoes(&mut stream, probe).await;
    stream
}

/// Asserts the server ended `stream` (a reset or an end of stream) without sending data.
async fn assert_closed_by_server<S: AsyncRead + Unpin>(stream: &mut S, whose: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
        Err(_) => panic!("{whose} connection was still open {DEADLINE:?} after the close"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{whose} connection returned data: {:?}", &buf[..n]),
    }
}

/// Access log entries closed by an operator: `(listener, identity, aborted)`, sorted.
fn closed_by_operator(pki: &Pki) -> Vec<(String, Value, Value)> {
    let mut closed: Vec<(String, Value, Value)> = access_log(&log_path(pki))
        .into_iter()
        .filter(|e| e["outcome"] == "closed_by_operator")
        .map(|e| {
            (
                e["listener"].as_str().unwrap_or("?").to_string(),
                e["identity"].clone(),
                e["aborted"].clone(),
            )
        })
        .collect();
    closed.sort_by_key(|(listener, identity, _)| (listener.clone(), identity.to_string()));
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_listed_and_closing_bobs_resets_exactly_his_two_while_alice_echoes() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let held = TestBackend::echo().await;
    let running = run(&pki, echo.addr, held.addr).await;
    let (tls, admin) = (running.tls, running.admin);
    let (alice, bob) = (pki.client("alice"), pki.client("bob"));
    let mut streams = vec![
        ("alice", open(tls, &pki, &alice, b"alice says hi").await),
        ("bob", open(tls, &pki, &bob, b"bob says hi!!").await),
        ("bob", open(tls, &pki, &bob, b"bob again hi!").await),
    ];

    let listing = ctl_json(&pki, admin, &["connections"]).await;
    assert_eq!(
        (&listing["total"], &listing["next"]),
        (&json!(3), &Value::Null),
        "{listing}"
    );
    assert_eq!(
        column(&listing, "identity"),
        [&json!("alice"), &json!("bob"), &json!("bob")]
    );
    let serials: Vec<&str> = column(&listing, "serial")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(
        serials,
        [serial_of(&alice.cert), serial_of(&bob.cert), serial_of(&bob.cert)]
    );
    for (c, (_, stream)) in listing["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .zip(&streams)
    {
        let local = stream.get_ref().0.local_addr().expect("client address");
        assert_eq!(
            (
                &c["listener"],
                &c["upstream"],
                &c["backend"],
                &c["phase"],
                &c["sni"]
            ),
            (
                &json!("tls"),
                &json!("web"),
                &json!(echo.addr.to_string()),
                &json!("proxied"),
                &json!("localhost")
            ),
            "{c}"
        );
        assert_eq!(
            (&c["client"], &c["bytes_up"], &c["bytes_down"]),
            (&json!(local.to_string()), &json!(13), &json!(13))
        );
        assert!(c["not_after"].as_str().is_some_and(|at| at.ends_with('Z')), "{c}");
    }
    let ids: Vec<u64> = column(&listing, "id")
        .iter()
        .filter_map(|id| id.as_u64())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {ids:?}");

    // One page at a time, each with the total, the cursor leading through all three.
    let mut walked = Vec::new();
    let mut query = "limit=1".to_string();
    loop {
        let (status, page) = list(admin, &query).await;
        assert_eq!((status, &page["total"]), (200, &json!(3)), "{page}");
        walked.extend(column(&page, "id").iter().filter_map(|id| id.as_u64()));
        match page["next"].as_u64() {
            Some(next) => query = format!("limit=1&after={next}"),
            None => break,
        }
    }
    assert_eq!(walked, ids);

    let table = stdout(&ctl(&pki, admin, &["connections", "--identity", "bob"]).await);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows[0],
        [
            "ID", "LISTENER", "CLIENT", "IDENTITY", "UPSTREAM", "BACKEND", "PHASE", "AGE", "IDLE", "UP",
            "DOWN", "SERIAL"
        ]
    );
    assert_eq!(rows.len(), 4, "{table}");
    for row in &rows[1..3] {
        assert_eq!(
            (row[1], row[3], row[4], row[6], row[9], row[10]),
            ("tls", "bob", "web", "proxied", "13", "13"),
            "{table}"
        );
    }
    assert_eq!(rows[3], ["2", "open", "connections"]);
    let by_serial = serial_of(&alice.cert).replace(':', "").to_uppercase();
    let alices = ctl_json(&pki, admin, &["connections", "--serial", &by_serial]).await;
    assert_eq!(column(&alices, "identity"), [&json!("alice")], "{alices}");

    let dry = ctl(&pki, admin, &["close", "--identity", "bob", "--dry-run"]).await;
    assert_eq!(stdout(&dry).trim(), "would close 2 connections", "{dry:?}");
    for (who, stream) in &mut streams {
        assert_echoes(stream, format!("{who} after the dry run").as_bytes()).await;
    }

    let closed = ctl(&pki, admin, &["close", "--identity", "bob"]).await;
    assert_eq!(stdout(&closed).trim(), "closed 2 connections", "{closed:?}");
    for (who, stream) in &mut streams[1..] {
        assert_closed_by_server(stream, &format!("{who}'s")).await;
    }
    assert_echoes(&mut streams[0].1, b"alice still here").await;
    wait_until("bob's two connections logged as closed by the operator", || {
        closed_by_operator(&pki).len() == 2
    })
    .await;
    let bob_closed = ("tls".to_string(), json!("bob"), json!(true));
    assert_eq!(closed_by_operator(&pki), [bob_closed.clone(), bob_closed]);
    // Gone from the table, and their backend counts given back.
    listed_when(admin, "alice's connection alone", |l| {
        column(l, "identity") == [&json!("alice")]
    })
    .await;
    let again = ctl(&pki, admin, &["close", "--identity", "bob"]).await;
    assert_eq!(stdout(&again).trim(), "closed 0 connections", "{again:?}");
    let bearer = format!("Bearer {TOKEN}");
    let (_, status) = http(admin, "GET", "/status", &[("Authorization", &bearer)], "").await;
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["active_connections"], 1, "{status}");

    drop(streams);
    running.fulcrum.signal("TERM");
    running.fulcrum.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_their_handshake_or_queued_are_listed_and_closed_with_a_reset() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let held = TestBackend::echo().await;
    let running = run(&pki, echo.addr, held.addr).await;
    let admin = running.admin;
    // Says nothing: its TLS handshake never starts.
    let mut silent = connect(running.tls).await;
    // Listed first: its id is below those of the connections to come.
    listed_when(admin, "the silent client", |l| l["total"] == 1).await;
    // The first holds the capped backend's one place; the second, through another listener,
    // waits in the queue for it.
    let mut first = connect(running.plain).await;
    assert_eq!(round_trip(&mut first, b"first").await, b"first");
    let mut waiting = connect(running.queue).await;
    let listing = listed_when(admin, "one connection in each phase", |l| {
        column(l, "phase") == [&json!("handshake"), &json!("proxied"), &json!("queued")]
    })
    .await;
    assert_eq!(
        column(&listing, "listener"),
        [&json!("tls"), &json!("plain"), &json!("queue")]
    );
    assert_eq!(
        column(&listing, "upstream"),
        [&Value::Null, &json!("capped"), &json!("capped")]
    );
    assert_eq!(
        column(&listing, "backend"),
        [&Value::Null, &json!(held.addr.to_string()), &Value::Null]
    );
    assert_eq!(
        column(&listing, "client")[0],
        &json!(silent.local_addr().expect("address").to_string())
    );

    let closed = ctl_json(&pki, admin, &["close", "--listener", "tls"]).await;
    assert_eq!(closed, json!({"closed": 1}));
    assert_closed_by_server(&mut silent, "the silent client's").await;
    let closed = ctl_json(&pki, admin, &["close", "--listener", "queue"]).await;
    assert_eq!(closed, json!({"closed": 1}));
    assert_closed_by_server(&mut waiting, "the queued client's").await;
    let closed = ctl_json(&pki, admin, &["close", "--listener", "plain"]).await;
    assert_eq!(closed, json!({"closed": 1}));
    assert_closed_by_server(&mut first, "the proxied client's").await;
    wait_until("three connections logged as closed by the operator", || {
        closed_by_operator(&pki).len() == 3
    })
    .await;
    let closed = |listener: &str| (listener.to_string(), Value::Null, json!(true));
    assert_eq!(
        closed_by_operator(&pki),
        [closed("plain"), closed("queue"), closed("tls")]
    );
    listed_when(admin, "no connection", |l| l["total"] == 0).await;
    assert_eq!(echo.accepted(), 0, "the handshaking client reached no backend");
    assert_eq!(held.accepted(), 1, "the queued client reached no backend");

    running.fulcrum.signal("TERM");
    running.fulcrum.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_needs_a_filter_and_the_token_and_a_refused_request_closes_nothing() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let held = TestBackend::echo().await;
    let running = run(&pki, echo.addr, held.addr).await;
    let admin = running.admin;
    let mut alice = open(running.tls, &pki, &pki.client("alice"), b"alice says hi").await;

    let bearer = format!("Bearer {TOKEN}");
    let json_type = ("Content-Type", "application/json");
    let token = ("Authorization", bearer.as_str());
    let (status, body) = http(admin, "POST", "/connections/close", &[json_type, token], "{}").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(
        admin,
        "POST",
        "/connections/close",
        &[json_type, token],
        r#"{"dry_run": true}"#,
    )
    .await;
    assert_eq!(status, 400);
    let unfiltered = ctl(&pki, admin, &["close"]).await;
    assert_eq!(unfiltered.status.code(), Some(2), "{unfiltered:?}");
    let (status, _) = http(
        admin,
        "POST",
        "/connections/close",
        &[json_type],
        r#"{"identity": "alice"}"#,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(admin, "GET", "/connections", &[], "").await;
    assert_eq!(status, 401);
    let admin_arg = admin.to_string();
    let untokened = output(&["ctl", "--admin", &admin_arg, "close", "--identity", "alice"]).await;
    assert_eq!(untokened.status.code(), Some(1), "{untokened:?}");
    let (status, body) = list(admin, "identiy=alice").await;
    assert_eq!(status, 400, "a misspelt filter lists nothing: {body}");

    assert_echoes(&mut alice, b"alice is still here").await;
    let (status, listing) = list(admin, "identity=alice").await;
    assert_eq!((status, &listing["total"]), (200, &json!(1)), "{listing}");
    assert!(closed_by_operator(&pki).is_empty());

    drop(alice);
    running.fulcrum.signal("TERM");
    running.fulcrum.exit().await;
}
