//! End-to-end tests of what operators see: `/metrics` (both formats, histograms, bytes counted
//! while they move, certificate expiry), `fulcrum check`'s expiry warning, `/status`'s top
//! identities, and the access log (reopened on SIGUSR1, interim entries, TLS fields).

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::tls::{connect_tls, Pki};
use common::{
    access_log, connect, http, round_trip, toml_path, wait_until, within, TempDir, TestBackend, TestServer,
};
use fulcrum::admin::prometheus::{render, render_as, Format};
use fulcrum::pki::LeafSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DAY: Duration = Duration::from_secs(86_400);

/// The value of the sample `name{labels}` (labels exactly as rendered) in classic text.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as f64
}

/// The DER of the first certificate in a PEM text.
fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("one certificate")
        .expect("PEM")
        .to_vec()
}

/// The `notAfter` of the first certificate in a PEM text, read with x509-parser.
fn not_after_of(pem: &str) -> SystemTime {
    let der = first_der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse certificate");
    UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64)
}

/// `/status` of `state`, parsed.
fn status_of(state: &fulcrum::state::State) -> serde_json::Value {
    let text = fulcrum::admin::status::render(state, std::time::Instant::now());
    serde_json::from_str(&text).expect("status JSON")
}

/// An mTLS listener `tls` in front of an echo backend, alice and bob authorized for `web`.
async fn mtls(pki: &Pki, backend: &TestBackend, rest: &str) -> TestServer {
    let toml = pki.one_pool_config(
        &pki.ca_file,
        "1.2",
        "",
        &[backend.addr],
        &format!("[authorization]\nalice = [\"web\"]\nbob = [\"web\"]\ncarol = [\"web\"]\n{rest}"),
    );
    TestServer::start(&toml).await
}

#[tokio::test]
async fn after_n_handshakes_the_handshake_connect_and_duration_histograms_count_n() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = mtls(&pki, &backend, "").await;
    let alice = pki.client_config(Some(&pki.client("alice")));
    const N: usize = 5;
    for _ in 0..N {
        let mut stream = connect_tls(lb.addr("tls"), &alice, "localhost")
            .await
            .expect("handshake");
        common::tls::assert_echoes(&mut stream, b"ping").await;
        within("close", stream.shutdown()).await.expect("close");
        let mut rest = Vec::new();
        let _ = within("end of stream", stream.read_to_end(&mut rest)).await;
    }
    let listener = lb.state.listener("tls").expect("listener");
    wait_until("every connection's duration is observed", || {
        listener.figures.duration.count() == N as u64
    })
    .await;
    let metrics = render(&lb.state);
    let n = N as f64;
    for name in [
        "fulcrum_tls_handshake_duration_seconds_count{listener=\"tls\"}",
        "fulcrum_tls_handshake_duration_seconds_bucket{listener=\"tls\",le=\"+Inf\"}",
        "fulcrum_backend_connect_duration_seconds_count{upstream=\"web\"}",
        "fulcrum_connection_duration_seconds_count{listener=\"tls\"}",
    ] {
        assert_eq!(sample(&metrics, name), Some(n), "{name} in\n{metrics}");
    }
    let handshake_sum = sample(
        &metrics,
        "fulcrum_tls_handshake_duration_seconds_sum{listener=\"tls\"}",
    )
    .expect("a sum");
    assert!(handshake_sum > 0.0, "handshakes took no time? {handshake_sum}");
    assert_eq!(
        sample(&metrics, "fulcrum_queue_wait_seconds_count{upstream=\"web\"}"),
        Some(0.0),
        "nobody queued"
    );
}

#[tokio::test]
async fn metrics_are_openmetrics_when_asked_and_the_classic_text_otherwise() {
    let backend = TestBackend::echo().await;
    let server = TestServer::start(&format!(
        "{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
        common::one_pool(&[backend.addr], "")
    ))
    .await;
    let admin = server.admin.expect("admin address");
    let (status, classic) = http(admin, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        classic.contains("# TYPE fulcrum_connections_total counter\n"),
        "{classic}"
    );
    assert!(classic.contains("# TYPE fulcrum_backend_up gauge\n"), "{classic}");
    assert!(!classic.contains("# EOF"), "{classic}");
    let accept = [(
        "Accept",
        "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
    )];
    let (status, open) = http(admin, "GET", "/metrics", &accept, "").await;
    assert_eq!(status, 200);
    assert!(open.contains("# TYPE fulcrum_connections counter\n"), "{open}");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(
        render_as(&server.current(), Format::OpenMetrics).lines().last(),
        Some("# EOF")
    );
}

#[tokio::test]
async fn a_ten_mebibyte_stream_held_open_shows_in_the_byte_counters_before_it_closes() {
    const SIZE: usize = 10 * 1024 * 1024;
    let backend = TestBackend::echo().await;
    let server = TestServer::start(&common::one_pool(&[backend.addr], "")).await;
    let mut stream = connect(server.addr("main")).await;
    let data = common::payload(7, SIZE);
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&data).await.expect("send 10 MiB");
    };
    let receive = async {
        let mut back = vec![0u8; SIZE];
        read.read_exact(&mut back).await.expect("read 10 MiB back");
        back
    };
    let (_, back) = common::within_for(common::TRANSFER_DEADLINE, "10 MiB each way", async {
        tokio::join!(send, receive)
    })
    .await;
    assert!(back == data, "the echo came back different");
    // Still open: the counters already hold every byte.
    let backend_label = backend.addr.to_string();
    let want = SIZE as f64;
    wait_until("the counters catch up with the bytes delivered", || {
        let metrics = render(&server.current());
        [
            "fulcrum_bytes_total{listener=\"main\",direction=\"up\"}".to_string(),
            "fulcrum_bytes_total{listener=\"main\",direction=\"down\"}".to_string(),
            format!("fulcrum_backend_bytes_total{{upstream=\"pool\",backend=\"{backend_label}\",direction=\"up\"}}"),
            format!("fulcrum_backend_bytes_total{{upstream=\"pool\",backend=\"{backend_label}\",direction=\"down\"}}"),
        ]
        .iter()
        .all(|name| sample(&metrics, name).is_some_and(|v| v >= want))
    })
    .await;
    let listener = server.current().listener("main").cloned().expect("listener");
    assert_eq!(
        listener.figures.duration.count(),
        0,
        "the connection has not closed"
    );
    drop(stream);
}

#[tokio::test]
async fn expiry_gauges_equal_the_certificates_not_after_and_the_crls_next_update() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let next_update = UNIX_EPOCH + Duration::from_secs((unix_seconds(SystemTime::now() + 7 * DAY)) as u64);
    let crl = pki
        .dir
        .write("ca.crl", &pki.ca.crl(&[], next_update).expect("CRL"));
    let toml = pki.one_pool_config(
        &pki.ca_file,
        "1.2",
        "",
        &[backend.addr],
        "[authorization]\nalice = [\"web\"]\n",
    );
    let toml = toml.replace(
        "min_version = \"1.2\"\n",
        &format!("min_version = \"1.2\"\ncrl = {}\n", toml_path(&crl)),
    );
    let lb = TestServer::start(&toml).await;
    let metrics = render(&lb.state);
    let gauge = |kind: &str| {
        sample(
            &metrics,
            &format!("fulcrum_certificate_not_after_timestamp_seconds{{listener=\"tls\",kind=\"{kind}\"}}"),
        )
    };
    let server_pem = std::fs::read_to_string(&pki.server_cert).expect("server certificate");
    assert_eq!(
        gauge("server"),
        Some(unix_seconds(not_after_of(&server_pem))),
        "{metrics}"
    );
    assert_eq!(
        gauge("client_ca"),
        Some(unix_seconds(not_after_of(&pki.ca.cert_pem())))
    );
    assert_eq!(gauge("crl_next_update"), Some(unix_seconds(next_update)));
    let status = status_of(&lb.state);
    let kinds: Vec<(&str, bool)> = status["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().expect("kind"),
                c["expiring"].as_bool().expect("expiring"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("crl_next_update", true), ("server", false), ("client_ca", false)],
        "earliest first; a CRL due in a week is within 14 days"
    );
}

/// A config whose listener serves a certificate valid until `not_after`.
fn config_with_server_certificate(dir: &TempDir, pki: &Pki, not_after: SystemTime) -> std::path::PathBuf {
    let mut spec = LeafSpec::server(&[]);
    spec.not_after = not_after;
    let leaf = pki.ca.leaf(&spec).expect("server certificate");
    let cert = dir.write("short.pem", &leaf.cert);
    let key = dir.write("short.key", &leaf.key);
    dir.write(
        "fulcrum.toml",
        &format!(
            "[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
             [listener.tls]\ncert = {}\nkey = {}\n\
             [[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:9\"]\n",
            toml_path(&cert),
            toml_path(&key)
        ),
    )
}

/// `fulcrum check` on a config whose server certificate has `left` to live: success, stdout,
/// stderr.
fn check_with_certificate_valid_for(left: Duration) -> (bool, String, String) {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("check-expiry");
    let config = config_with_server_certificate(&dir, &pki, SystemTime::now() + left);
    let out = common::process::command(&[])
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run fulcrum check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_warns_for_a_certificate_expiring_in_three_days() {
    let (ok, stdout, stderr) = check_with_certificate_valid_for(3 * DAY + Duration::from_secs(3600));
    assert!(ok, "a short-lived certificate still loads: {stderr}");
    assert!(
        stderr.contains("warning: listener \"edge\" server certificate expires in 3 day(s)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("earliest certificate expiry: listener \"edge\" server certificate"),
        "{stdout}"
    );
}

#[test]
fn check_does_not_warn_for_a_certificate_with_a_month_left_but_names_its_expiry() {
    let (ok, stdout, stderr) = check_with_certificate_valid_for(30 * DAY + Duration::from_secs(3600));
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(stdout.contains("(30 days left)"), "{stdout}");
}

#[tokio::test]
async fn status_lists_the_top_identities_by_open_connections_and_by_refusals() {
    let pki = Pki::new(&[]);
    let backend = TestBackend::echo().await;
    let lb = mtls(&pki, &backend, "").await;
    let mut held = Vec::new();
    for (name, count) in [("alice", 3), ("bob", 2), ("carol", 1)] {
        let config = pki.client_config(Some(&pki.client(name)));
        for _ in 0..count {
            let mut stream = connect_tls(lb.addr("tls"), &config, "localhost")
                .await
                .expect("handshake");
            common::tls::assert_echoes(&mut stream, b"hi").await;
            held.push(stream);
        }
    }
    let mallory = pki.client_config(Some(&pki.client("mallory")));
    for _ in 0..2 {
        let connected = connect_tls(lb.addr("tls"), &mallory, "localhost").await;
        common::tls::assert_refused(connected).await;
    }
    lb.wait_for_rejections("tls", &[(fulcrum::metrics::Reason::Unauthorized, 2)])
        .await;
    let status = status_of(&lb.state);
    let ids = &status["identities"];
    let open: Vec<(&str, u64)> = ids["by_open"]
        .as_array()
        .expect("by_open")
        .iter()
        .map(|e| {
            (
                e["identity"].as_str().expect("name"),
                e["open"].as_u64().expect("open"),
            )
        })
        .collect();
    assert_eq!(open, [("alice", 3), ("bob", 2), ("carol", 1)], "{ids}");
    assert_eq!(ids["by_refusals"][0]["identity"], "mallory", "{ids}");
    assert_eq!(ids["by_refusals"][0]["unauthorized"], 2, "{ids}");
    assert_eq!(ids["others_open"], 0);
    let capped = lb.state.identities.top(2);
    assert_eq!(capped.by_open.len(), 2, "the list is capped");
    assert_eq!(capped.others_open, 1, "carol's connection is in the rest");
    drop(held);
    wait_until("the identities' connections close", || {
        lb.state.identities.top(50).by_open.is_empty()
    })
    .await;
    let metrics = render(&lb.state);
    assert!(
        !metrics.contains("alice") && !metrics.contains("mallory"),
        "no identity labels: {metrics}"
    );
}

/// An echo backend behind a server with an access log (`interim` as given), and one connection
/// through it that has echoed "hello".
async fn logged_echo(
    interim: &str,
) -> (
    TestBackend,
    TestServer,
    TempDir,
    std::path::PathBuf,
    tokio::net::TcpStream,
) {
    let backend = TestBackend::echo().await;
    let dir = TempDir::new("interim");
    let log = dir.path().join("access.jsonl");
    let server = TestServer::start(&format!(
        "{}\n[access_log]\npath = {}\ninterim = \"{interim}\"\n",
        common::one_pool(&[backend.addr], ""),
        toml_path(&log)
    ))
    .await;
    let mut stream = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut stream, b"hello").await, b"hello");
    (backend, server, dir, log, stream)
}

#[tokio::test]
async fn an_interim_entry_appears_for_a_connection_held_longer_than_interim() {
    let (backend, _server, _dir, log, stream) = logged_echo("1s").await;
    wait_until("an interim entry", || {
        access_log(&log).iter().any(|e| e["outcome"] == "interim")
    })
    .await;
    let interim = access_log(&log)
        .into_iter()
        .find(|e| e["outcome"] == "interim")
        .expect("interim entry");
    assert_eq!(interim["bytes_up"], 5, "{interim}");
    assert_eq!(interim["bytes_down"], 5, "{interim}");
    assert!(
        interim["duration_ms"].as_u64().expect("duration") >= 1000,
        "{interim}"
    );
    assert_eq!(interim["backend"], backend.addr.to_string());
    common::close(stream).await;
    common::wait_for_outcomes(&log, "closed", 1).await;
}

#[tokio::test]
async fn a_connection_shorter_than_interim_gets_only_its_closing_entry() {
    let (_backend, _server, _dir, log, stream) = logged_echo("1h").await;
    common::close(stream).await;
    common::wait_for_outcomes(&log, "closed", 1).await;
    assert_eq!(access_log(&log).len(), 1, "{:?}", access_log(&log));
}

#[tokio::test]
async fn mtls_access_log_entries_carry_sni_the_tls_version_and_the_client_certificate() {
    let pki = Pki::new(&["api.example"]);
    let backend = TestBackend::echo().await;
    let dir = TempDir::new("tls-fields");
    let log = dir.path().join("access.jsonl");
    let lb = mtls(
        &pki,
        &backend,
        &format!("[access_log]\npath = {}\n", toml_path(&log)),
    )
    .await;
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let mut stream = connect_tls(lb.addr("tls"), &config, "api.example")
        .await
        .expect("handshake");
    common::tls::assert_echoes(&mut stream, b"hi").await;
    within("close", stream.shutdown()).await.expect("close");
    let mut rest = Vec::new();
    let _ = within("end of stream", stream.read_to_end(&mut rest)).await;
    common::wait_for_outcomes(&log, "closed", 1).await;
    let entry = &access_log(&log)[0];
    assert_eq!(entry["sni"], "api.example", "{entry}");
    assert!(entry["tls_version"] == "TLSv1.3", "{entry}");
    let der = first_der(&alice.cert);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    assert_eq!(entry["client_serial"], cert.raw_serial_as_string(), "{entry}");
    let not_after = humantime::format_rfc3339_seconds(not_after_of(&alice.cert)).to_string();
    assert_eq!(entry["client_not_after"], not_after, "{entry}");
}

#[tokio::test]
async fn sigusr1_after_renaming_the_log_file_sends_new_lines_to_a_new_file_and_loses_none() {
    let backend = TestBackend::echo().await;
    let dir = TempDir::new("logrotate");
    let log = dir.path().join("access.jsonl");
    let rotated = dir.path().join("access.jsonl.1");
    let config = dir.write(
        "fulcrum.toml",
        &format!(
            "{}\n[access_log]\npath = {}\n",
            common::one_pool(&[backend.addr], ""),
            toml_path(&log)
        ),
    );
    let mut fulcrum = common::process::Fulcrum::run(&config);
    let addr = fulcrum.listening("main").await;
    let serve = |n: usize| async move {
        for _ in 0..n {
            let mut stream = connect(addr).await;
            assert_eq!(round_trip(&mut stream, b"x").await, b"x");
            common::close(stream).await;
        }
    };
    let count = |path: &Path| access_log(path).len();
    serve(20).await;
    wait_until("20 lines in the log", || count(&log) == 20).await;
    std::fs::rename(&log, &rotated).expect("rotate");
    // The writer still holds the renamed file: these go there, as with logrotate before postrotate.
    serve(20).await;
    wait_until("40 lines in the rotated file", || count(&rotated) == 40).await;
    fulcrum.signal("USR1");
    wait_until("a new log file", || log.exists()).await;
    serve(20).await;
    wait_until("20 lines in the new file", || count(&log) == 20).await;
    fulcrum.signal("TERM");
    let (status, _) = fulcrum.exit().await;
    assert!(status.success(), "{status}");
    assert_eq!(
        (count(&rotated), count(&log)),
        (40, 20),
        "every line in one file or the other"
    );
}
