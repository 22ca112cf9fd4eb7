//! The binary's log lines where they usually go, a pipe (journald, a file, a collector): no colour
//! codes in text, and with `--log-format json` or `[log] format = "json"` one JSON object per
//! line carrying the connection span's fields as keys. Each test runs `fulcrum run`, proxies one
//! connection, stops it with SIGTERM and reads its stderr byte for byte (`process::Fulcrum`
//! removes colour codes, which is what is checked here, so these tests read stderr themselves).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use common::process::async_command;
use common::{connect, round_trip, strip_ansi, within, TempDir, TestBackend};

/// What one `fulcrum run` wrote to stderr while it proxied one connection, and the client's
/// address of that connection.
struct Logged {
    lines: Vec<Vec<u8>>,
    client: SocketAddr,
}

/// The address of the `listening` line of listener `main`, text or JSON.
fn listening_addr(line: &[u8]) -> Option<SocketAddr> {
    let line = strip_ansi(&String::from_utf8_lossy(line));
    if let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&line) {
        let is_main = object.get("message")? == "listening" && object.get("listener")? == "main";
        return is_main.then(|| object.get("addr")?.as_str()?.parse().ok())?;
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    if !fields.contains(&"listening") || !fields.contains(&"listener=main") {
        return None;
    }
    fields.iter().find_map(|f| f.strip_prefix("addr="))?.parse().ok()
}

/// Runs `fulcrum ARGS run` on a config with one listener (`main`) before an echo backend and
/// `log_section` appended, with `NO_COLOR` unset and stderr a pipe; proxies one round trip, waits
/// for its `connection closed` line, stops the process with SIGTERM and returns every line.
async fn log_of_one_connection(args: &[&str], log_section: &str) -> Logged {
    let dir = TempDir::new("logs");
    let echo = TestBackend::echo().await;
    let text = format!(
        "drain_timeout = \"1s\"\n\n[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\
         upstream = \"pool\"\n\n[[upstream]]\nname = \"pool\"\nbackends = [\"{}\"]\n\n{log_section}",
        echo.addr
    );
    // As `process::Fulcrum` does for the configs it starts.
    common::schema::assert_valid(&text);
    let config = dir.write("fulcrum.toml", &text);
    let mut child = async_command(&[])
        .env_remove("NO_COLOR")
        .args(args)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fulcrum run");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).split(b'\n');
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_segment().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut next_line = async || {
        let line = within("a stderr line", rx.recv()).await;
        let line = line.unwrap_or_else(|| panic!("stderr ended; it said: {lines:#?}"));
        lines.push(line);
        lines.last().cloned().expect("just pushed")
    };
    let addr = loop {
        if let Some(addr) = listening_addr(&next_line().await) {
            break addr;
        }
    };
    let mut stream = connect(addr).await;
    let client = stream.local_addr().expect("the client's address");
    assert_eq!(round_trip(&mut stream, b"hello").await, b"hello");
    drop(stream);
    while !String::from_utf8_lossy(&next_line().await).contains("connection closed") {}
    let pid = child.id().expect("fulcrum is running").to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.expect("run kill").success(), "kill -TERM {pid} failed");
    let status = within("fulcrum to exit", child.wait())
        .await
        .expect("wait for fulcrum");
    assert!(status.success(), "fulcrum exited with {status}");
    while let Some(line) = within("the rest of stderr", rx.recv()).await {
        lines.push(line);
    }
    Logged { lines, client }
}

/// Every line as a JSON object; panics naming the first that is not one.
fn json_objects(logged: &Logged) -> Vec<Map<String, Value>> {
    logged
        .lines
        .iter()
        .map(|line| match serde_json::from_slice(line) {
            Ok(Value::Object(object)) => object,
            _ => panic!("not a JSON object: {:?}", String::from_utf8_lossy(line)),
        })
        .collect()
}

/// Asserts the lines are JSON with the fixed keys, and the connection's summary line carries
/// the span's fields as top-level keys.
fn assert_json_with_span_fields(logged: &Logged) {
    let objects = json_objects(logged);
    for object in &objects {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(object.contains_key(key), "no {key} in {object:?}");
        }
    }
    let closed = objects
        .iter()
        .find(|o| o["message"] == "connection closed")
        .expect("a connection closed line");
    assert_eq!(closed["listener"], "main", "{closed:?}");
    assert_eq!(closed["client.addr"], logged.client.to_string(), "{closed:?}");
    assert_eq!(closed["upstream"], "pool", "{closed:?}");
    assert!(closed.contains_key("backend.addr"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let logged = log_of_one_connection(&[], "").await;
    let escapes: Vec<String> = logged
        .lines
        .iter()
        .filter(|line| line.contains(&0x1b))
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect();
    assert!(escapes.is_empty(), "lines with ESC: {escapes:#?}");
    let closed = logged
        .lines
        .iter()
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .find(|line| line.contains("connection closed"))
        .expect("a connection closed line");
    assert!(closed.contains("listener=main"), "{closed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line_with_the_span_fields_as_keys() {
    let logged = log_of_one_connection(&["--log-format", "json"], "").await;
    assert_json_with_span_fields(&logged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configs_log_format_json_writes_json_lines_too() {
    let logged = log_of_one_connection(&[], "[log]\nformat = \"json\"\n").await;
    assert_json_with_span_fields(&logged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_format_flag_wins_over_the_config() {
    let logged = log_of_one_connection(&["--log-format", "text"], "[log]\nformat = \"json\"\n").await;
    let first = String::from_utf8_lossy(&logged.lines[0]).into_owned();
    assert!(
        serde_json::from_str::<Value>(&first).is_err(),
        "a JSON line: {first}"
    );
    assert!(first.contains(" INFO "), "not a text line: {first}");
}
