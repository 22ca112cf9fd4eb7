//! The command line and the admin endpoint as an operator meets them: `fulcrum check` verdicts and
//! messages (file, key, bad value), `--version`, `--help`, and `/metrics` over real HTTP.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::process::output as fulcrum;

use common::{
    backend_list, connect, read_to_end, refused_addrs, round_trip, within, TempDir, TestBackend, TestServer,
};
use tokio::io::AsyncWriteExt;

/// Runs `fulcrum check` on a file holding `text`; returns the output and the file's path.
async fn check(text: &str) -> (Output, String) {
    let dir = TempDir::new("check");
    let config = dir.write("fulcrum.toml", text).display().to_string();
    let output = fulcrum(&["check", "--config", &config]).await;
    (output, config)
}

/// Asserts `check` rejected the file with a message naming the file, the key and the value.
async fn assert_rejected(text: &str, key: &str, value: &str) {
    let (output, path) = check(text).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "check accepted a bad file; stderr: {stderr}"
    );
    for needle in [path.as_str(), key, value] {
        assert!(
            stderr.contains(needle),
            "message does not name {needle:?}: {stderr}"
        );
    }
}

const VALID: &str = r#"
drain_timeout = "5s"

[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
backends = ["127.0.0.1:9001", "localhost:9002"]
connect_timeout = "250ms"
"#;

#[tokio::test]
async fn check_accepts_a_valid_file_and_exits_zero() {
    let (output, path) = check(VALID).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "check rejected a valid file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&path) && stdout.contains("ok"), "{stdout}");
}

#[tokio::test]
async fn check_rejects_an_unknown_key_naming_the_file_and_the_key() {
    let text = VALID.replace(
        "connect_timeout = \"250ms\"",
        "connect_timeout = \"250ms\"\ncolour = \"blue\"",
    );
    assert_rejected(&text, "colour", "\"blue\"").await;
}

#[tokio::test]
async fn check_rejects_a_listener_naming_a_missing_upstream() {
    let text = VALID.replace("upstream = \"pool\"", "upstream = \"nowhere\"");
    assert_rejected(&text, "listener[0] (\"main\").upstream", "\"nowhere\"").await;
}

#[tokio::test]
async fn check_rejects_an_empty_backend_list() {
    let text = VALID.replace(
        "backends = [\"127.0.0.1:9001\", \"localhost:9002\"]",
        "backends = []",
    );
    assert_rejected(&text, "upstream[0] (\"pool\").backends", "\"[]\"").await;
}

#[tokio::test]
async fn check_rejects_a_bad_listen_address() {
    let text = VALID.replace("127.0.0.1:0", "127.0.0.1:http");
    assert_rejected(&text, "listener[0] (\"main\").bind", "\"127.0.0.1:http\"").await;
}

#[tokio::test]
async fn check_rejects_a_bad_backend_address() {
    let text = VALID.replace("localhost:9002", "localhost:99999");
    assert_rejected(&text, "upstream[0] (\"pool\").backends", "\"localhost:99999\"").await;
}

#[tokio::test]
async fn check_rejects_a_bad_duration() {
    let text = VALID.replace("250ms", "3 parsecs");
    assert_rejected(&text, "upstream[0] (\"pool\").connect_timeout", "\"3 parsecs\"").await;
}

#[tokio::test]
async fn check_rejects_a_missing_file_naming_it() {
    let dir = TempDir::new("check-missing");
    let path = dir.path().join("does-not-exist.toml").display().to_string();
    let output = fulcrum(&["check", "--config", &path]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&path), "{stderr}");
}

#[tokio::test]
async fn version_prints_the_package_version() {
    let output = fulcrum(&["--version"]).await;
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), format!("fulcrum {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn help_lists_the_subcommands() {
    let output = fulcrum(&["--help"]).await;
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Usage: fulcrum"), "{stdout}");
    for command in ["run", "check", "certs", "backend", "demo"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(command)),
            "--help does not list {command}: {stdout}"
        );
    }
}

/// `GET /metrics` over a plain TCP connection; returns the body after checking the head.
async fn scrape(admin: SocketAddr) -> String {
    let mut stream = connect(admin).await;
    within(
        "request write",
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    )
    .await
    .expect("write request");
    let response = read_to_end(&mut stream).await.expect("read response");
    let response = String::from_utf8(response).expect("metrics are UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// One sample line of the Prometheus text format: `name{k="v",...} value`.
fn metric(name: &str, labels: &[(&str, &str)], value: u64) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}} {value}", labels.join(","))
}

/// The labels of a per-backend metric.
fn backend_labels<'a>(upstream: &'a str, backend: &'a str) -> [(&'a str, &'a str); 2] {
    [("upstream", upstream), ("backend", backend)]
}

fn assert_has_lines(body: &str, lines: &[String]) {
    for line in lines {
        assert!(
            body.lines().any(|l| l == line),
            "missing metric line {line:?} in:\n{body}"
        );
    }
}

/// Whether `program` is an executable file on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_connections_rejections_active_counts_and_connect_failures() {
    let echo = TestBackend::echo().await;
    let refused = refused_addrs(2);
    let (refused_pool, refused_gone) = (refused[0], refused[1]);
    let server = TestServer::start(&format!(
        r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[listener]]
name = "dead"
bind = "127.0.0.1:0"
upstream = "gone"

[[upstream]]
name = "pool"
backends = [{}]

[[upstream]]
name = "gone"
backends = [{}]

[admin]
bind = "127.0.0.1:0"
"#,
        backend_list(&[refused_pool, echo.addr]),
        backend_list(&[refused_gone]),
    ))
    .await;
    let admin = server.admin.expect("admin is configured");

    // One held connection on `main` (past the refused backend), one rejected on `dead`.
    let mut held = connect(server.addr("main")).await;
    assert_eq!(round_trip(&mut held, b"hi").await, b"hi");
    let mut rejected = connect(server.addr("dead")).await;
    let got = read_to_end(&mut rejected).await.expect("clean close");
    assert!(got.is_empty());

    let (echo_label, pool_refused, gone_refused) = (
        echo.addr.to_string(),
        refused_pool.to_string(),
        refused_gone.to_string(),
    );
    let expected = [
        metric("fulcrum_connections_total", &[("listener", "main")], 1),
        metric("fulcrum_connections_total", &[("listener", "dead")], 1),
        metric(
            "fulcrum_connections_rejected_total",
            &[("listener", "dead"), ("reason", "connect_failed")],
            1,
        ),
        metric(
            "fulcrum_connections_rejected_total",
            &[("listener", "main"), ("reason", "connect_failed")],
            0,
        ),
        metric(
            "fulcrum_backend_active_connections",
            &backend_labels("pool", &echo_label),
            1,
        ),
        metric(
            "fulcrum_backend_active_connections",
            &backend_labels("pool", &pool_refused),
            0,
        ),
        metric(
            "fulcrum_backend_connect_failures_total",
            &backend_labels("pool", &pool_refused),
            1,
        ),
        metric(
            "fulcrum_backend_connect_failures_total",
            &backend_labels("gone", &gone_refused),
            1,
        ),
        metric(
            "fulcrum_backend_connect_failures_total",
            &backend_labels("pool", &echo_label),
            0,
        ),
    ];
    assert_has_lines(&scrape(admin).await, &expected);

    if on_path("curl") {
        let output = within(
            "curl",
            tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "10", &format!("http://{admin}/metrics")])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("run curl");
        assert!(
            output.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_has_lines(&String::from_utf8_lossy(&output.stdout), &expected);
    } else {
        eprintln!("curl is not on PATH: skipped the curl scrape");
    }

    // The gauge follows the connection down.
    common::close(held).await;
    server.wait_idle().await;
    assert_has_lines(
        &scrape(admin).await,
        &[metric(
            "fulcrum_backend_active_connections",
            &backend_labels("pool", &echo_label),
            0,
        )],
    );
}

#[tokio::test]
async fn certs_writes_a_dev_pki_with_private_keys_and_refuses_to_overwrite_without_force() {
    use std::os::unix::fs::PermissionsExt;
    let temp = TempDir::new("cli-certs");
    let dir = temp.path().join("pki");
    let out = dir.display().to_string();
    let args = [
        "certs",
        "--out",
        &out,
        "--client",
        "alice",
        "--client",
        "bob",
        "--server-name",
        "lb.example",
    ];
    let first = fulcrum(&args).await;
    let files = [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "alice.pem",
        "alice.key",
        "bob.pem",
        "bob.key",
    ];
    let modes: Vec<(String, u32)> = files
        .iter()
        .map(|f| {
            let mode = std::fs::metadata(dir.join(f))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            (f.to_string(), mode)
        })
        .collect();
    let again = fulcrum(&args).await;
    let mut forced = args.to_vec();
    forced.push("--force");
    let force = fulcrum(&forced).await;
    drop(temp);

    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for (file, mode) in modes {
        let expected = if file.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode & expected, mode, "{file} has mode {mode:o}");
        if file.ends_with(".key") {
            assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
        }
    }
    assert!(!again.status.success(), "a second run overwrote the PKI");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("refusing to overwrite") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(
        force.status.success(),
        "{}",
        String::from_utf8_lossy(&force.stderr)
    );
}
