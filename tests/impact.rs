//! The reload preview end to end: `fulcrum ctl impact` against the real binary names the open
//! mTLS connections a candidate config would close (per identity, listener and reason) and
//! closes none of them; the reload that applies the candidate then closes exactly those. The
//! preview needs the admin token, and a candidate that does not load is refused with its error,
//! closing nothing.
//!
//! Real rustls clients, certificates and CRLs generated at run time, everything on 127.0.0.1
//! port 0; every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use common::process::{output, Fulcrum};
use common::tls::{assert_echoes, client_config, connect_tls, Pki};
use common::{http, toml_path, TestBackend, DEADLINE};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const TOKEN: &str = "impact-preview-token";
const EVERYONE: &str =
    "alice = [\"web\"]\nbob = [\"web\"]\ncarol = [\"web\"]\ndave = [\"web\"]\nerin = [\"web\"]";

/// One mTLS listener `tls` (client certificates from `client_ca`, revoked ones in `crl`) in front
/// of upstream `web` (`backend`), `[authorization]` with `authorization`, and an admin listener
/// that needs the token in `admin.token` beside the config.
fn config(
    pki: &Pki,
    client_ca: &Path,
    crl: Option<&Path>,
    backend: SocketAddr,
    authorization: &str,
) -> String {
    let crl = crl.map_or(String::new(), |path| format!("crl = {}\n", toml_path(path)));
    format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\nhandshake_timeout = \"5s\"\n\
         {tls}{crl}\n[[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\n\
         [authorization]\n{authorization}\n\n[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n",
        tls = pki.tls_table(client_ca, "1.2"),
    )
}

/// The binary serving `config` (written to `fulcrum.toml` in the PKI's directory), its mTLS
/// listener's address and its admin address.
async fn run(pki: &Pki, config: &str) -> (Fulcrum, SocketAddr, SocketAddr) {
    pki.dir.write_secret("admin.token", TOKEN);
    let mut fulcrum = Fulcrum::run(&pki.dir.write("fulcrum.toml", config));
    let addr = fulcrum.listening("tls").await;
    let admin = fulcrum.admin_addr().await;
    (fulcrum, addr, admin)
}

/// `fulcrum ctl --admin ADMIN --token-file ... ARGS`.
async fn ctl(pki: &Pki, admin: SocketAddr, args: &[&str]) -> Output {
    common::process::ctl(admin, &pki.dir.path().join("admin.token"), args).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A CRL in the PKI's directory, by its CA, revoking `revoked` (PEM certificates).
fn write_crl(pki: &Pki, revoked: &[&str]) -> PathBuf {
    let crl = pki
        .ca
        .crl(revoked, SystemTime::now() + Duration::from_secs(3600))
        .expect("sign a CRL");
    pki.dir.write("ca.crl", &crl)
}

/// An open mTLS connection that has echoed once (so it was admitted and registered).
async fn open(
    addr: SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
    who: &str,
) -> TlsStream<TcpStream> {
    let mut stream = connect_tls(addr, client, "localhost")
        .await
        .unwrap_or_else(|e| panic!("{who}'s handshake: {e}"));
    assert_echoes(&mut stream, format!("{who} connects").as_bytes()).await;
    stream
}

/// Asserts the server ended `stream` (end of stream or reset) without sending data.
async fn assert_closed_by_server(stream: &mut TlsStream<TcpStream>, whose: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_names_exactly_the_connections_the_reload_then_closes() {
    let pki = Pki::new(&[]);
    let other = fulcrum::pki::Ca::new("another client CA").expect("generate CA");
    let both = pki
        .dir
        .write("both.pem", &format!("{}{}", pki.ca.cert_pem(), other.cert_pem()));
    let echo = TestBackend::echo().await;
    let (fulcrum, addr, admin) = run(&pki, &config(&pki, &both, None, echo.addr, EVERYONE)).await;
    let carol = pki.client("carol");
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let dave = other.client("dave").expect("issue dave's certificate");
    let clients = [
        ("alice", pki.client_config(Some(&pki.client("alice")))),
        ("bob", pki.client_config(Some(&pki.client("bob")))),
        ("bob", pki.client_config(Some(&pki.client("bob")))),
        ("carol", pki.client_config(Some(&carol))),
        ("dave", client_config(&pki.ca.cert_pem(), Some(&dave), &versions)),
        ("erin", pki.client_config(Some(&pki.client("erin")))),
    ];
    let mut streams = Vec::new();
    for (who, client) in &clients {
        streams.push((*who, open(addr, client, who).await));
    }

    // Bob loses his entry, carol's certificate is revoked, dave's CA is no longer trusted, a
    // deny entry shuts erin out.
    let crl = write_crl(&pki, &[carol.cert.as_str()]);
    let authorization = "alice = [\"web\"]\ncarol = [\"web\"]\ndave = [\"web\"]\nerin = [\"web\"]\n\
                         [authorization.deny]\nerin = \"offboarded\"";
    let candidate_text = config(&pki, &pki.ca_file, Some(&crl), echo.addr, authorization);
    let candidate = pki.dir.write("candidate.toml", &candidate_text);
    let previewed = ctl(
        &pki,
        admin,
        &["impact", "--config", path_arg(&candidate), "--json"],
    )
    .await;
    assert!(previewed.status.success(), "{previewed:?}");
    let impact: Value = serde_json::from_str(&stdout(&previewed)).expect("JSON");
    assert_eq!(impact["would_close"], 5, "{impact}");
    assert_eq!(
        impact["groups"],
        json!([
            {"identity": "bob", "listener": "tls", "reason": "unauthorized", "count": 2},
            {"identity": "carol", "listener": "tls", "reason": "revoked", "count": 1},
            {"identity": "dave", "listener": "tls", "reason": "trust", "count": 1},
            {"identity": "erin", "listener": "tls", "reason": "denied", "count": 1},
        ])
    );
    let listed: Vec<&str> = impact["connections"]
        .as_array()
        .expect("a list of connections")
        .iter()
        .map(|c| {
            assert_eq!(
                (&c["listener"], &c["upstream"]),
                (&json!("tls"), &json!("web")),
                "{c}"
            );
            assert_eq!(
                (&c["client"], &c["server_name"]),
                (&json!("127.0.0.1"), &json!("localhost"))
            );
            c["identity"].as_str().expect("an identity")
        })
        .collect();
    assert_eq!(listed, ["bob", "bob", "carol", "dave", "erin"]);
    assert_eq!(
        impact["connections"][4]["detail"],
        "erin matches deny entry \"erin\" (offboarded)"
    );

    let table = ctl(&pki, admin, &["impact", "--config", path_arg(&candidate)]).await;
    let text = stdout(&table);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["IDENTITY", "LISTENER", "REASON", "CONNECTIONS"],
            vec!["bob", "tls", "unauthorized", "2"],
            vec!["carol", "tls", "revoked", "1"],
            vec!["dave", "tls", "trust", "1"],
            vec!["erin", "tls", "denied", "1"],
            vec!["5", "connections", "would", "be", "closed"],
        ],
        "{text}"
    );
    for (who, stream) in &mut streams {
        assert_echoes(stream, format!("{who} after the preview").as_bytes()).await;
    }

    std::fs::write(pki.dir.path().join("fulcrum.toml"), &candidate_text).expect("apply the candidate");
    let reloaded = ctl(&pki, admin, &["reload"]).await;
    assert_eq!(stdout(&reloaded).trim(), "reloaded: generation 2", "{reloaded:?}");
    let mut to_close = listed.clone();
    for (who, stream) in &mut streams {
        match to_close.iter().position(|l| l == who) {
            Some(at) => {
                to_close.remove(at);
                assert_closed_by_server(stream, &format!("{who}'s")).await;
            }
            None => assert_echoes(stream, format!("{who} after the reload").as_bytes()).await,
        }
    }
    let again = ctl(&pki, admin, &["impact", "--config", path_arg(&candidate)]).await;
    assert_eq!(
        stdout(&again).trim(),
        "0 connections would be closed",
        "{again:?}"
    );
    drop(streams);
    fulcrum.signal("TERM");
    fulcrum.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_needs_the_token_and_a_candidate_that_does_not_load_is_refused_closing_nothing() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let (fulcrum, addr, admin) = run(&pki, &config(&pki, &pki.ca_file, None, echo.addr, EVERYONE)).await;
    let mut alice = open(addr, &pki.client_config(Some(&pki.client("alice"))), "alice").await;
    let nobody = pki
        .dir
        .write("nobody.toml", &config(&pki, &pki.ca_file, None, echo.addr, ""));
    let judged = ctl(&pki, admin, &["impact", "--config", path_arg(&nobody)]).await;
    assert_eq!(
        stdout(&judged).lines().last(),
        Some("1 connection would be closed"),
        "{judged:?}"
    );

    let admin_arg = admin.to_string();
    let untokened = output(&[
        "ctl",
        "--admin",
        &admin_arg,
        "impact",
        "--config",
        path_arg(&nobody),
    ])
    .await;
    assert_eq!(untokened.status.code(), Some(1), "{untokened:?}");
    assert!(stderr(&untokened).contains("401"), "{}", stderr(&untokened));
    let bearer = format!("Bearer {TOKEN}");
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", bearer.as_str()),
    ];
    let (status, body) = http(admin, "POST", "/impact", &headers, "nobody.toml").await;
    assert_eq!(status, 400, "a relative path: {body}");
    let (status, body) = http(admin, "POST", "/impact", &headers[..1], path_arg(&nobody)).await;
    assert_eq!(status, 401, "no token: {body}");

    let missing = pki.dir.path().join("missing.crl");
    let broken = pki.dir.write(
        "broken.toml",
        &config(&pki, &pki.ca_file, Some(&missing), echo.addr, ""),
    );
    let refused = ctl(&pki, admin, &["impact", "--config", path_arg(&broken)]).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        stderr(&refused).contains("422") && stderr(&refused).contains("missing.crl"),
        "{refused:?}"
    );
    // A file that is no config at all: the answer quotes none of its lines.
    let secret = pki.dir.write("secret.txt", "root:s3cr3t-hash:0:0\n");
    let refused = ctl(&pki, admin, &["impact", "--config", path_arg(&secret)]).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(stderr(&refused).contains("not a TOML config file"), "{refused:?}");
    assert!(!stderr(&refused).contains("s3cr3t"), "{refused:?}");

    assert_echoes(&mut alice, b"alice after every preview").await;
    let status = ctl(&pki, admin, &["--json", "status"]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).expect("JSON");
    assert_eq!(status["generation"], 1);
    drop(alice);
    fulcrum.signal("TERM");
    fulcrum.exit().await;
}
