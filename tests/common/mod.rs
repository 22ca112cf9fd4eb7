//! The one test harness of the end-to-end tests. A new test file uses these, not its own:
//!
//! - fulcrum in process: [`TestServer`] (`start` from TOML text, `start_file` from a file it can
//!   reload, `try_start` when the bind error is the subject, `draining` for a server built by
//!   hand) — `server.rs`;
//! - the binary: [`process`] (`command` builds it; `output` runs a short command, `Fulcrum` runs
//!   `run`);
//! - backends: [`TestBackend`] (echo and a few misbehaviours), [`BlackHole`], [`refused_addr`] —
//!   `backend.rs`;
//! - clients: [`connect`], [`round_trip`], [`http`], [`assert_ends`] ... — `client.rs`; TLS
//!   clients and a test CA: [`tls`], [`pki`];
//! - files: [`TempDir`] and [`toml_path`] — `temp.rs`;
//! - a real `redis-server`: [`redis`];
//! - a SPIFFE Workload API server (standing in for the SPIRE agent's socket): [`workload_api`];
//! - the config's JSON Schema, which every config the starters accept is held against: [`schema`];
//! - waits: [`within`] (a future under a deadline), [`wait_until`] (a condition polled under a
//!   deadline) and [`poll_for`] beneath it — here.
//!
//! Everything binds 127.0.0.1 port 0. Every wait on a peer goes through [`within`] or
//! [`wait_until`], so a bug shows up as a failure naming what was awaited, never as a hung run.

// Each test binary uses a different subset of these helpers (and of the re-exports below, hence
// `unused_imports`). They are test code: `pub` only shares them between the test binaries, and a
// failed setup may panic.
#![allow(dead_code, unused_imports, unreachable_pub, clippy::unwrap_used)]

mod backend;
mod client;
pub mod help;
pub mod pki;
pub mod process;
pub mod redis;
pub mod schema;
mod server;
mod temp;
pub mod tls;
pub mod workload_api;

pub use backend::{refused_addr, refused_addrs, reset, Behavior, BlackHole, TestBackend};
pub use client::{assert_ends, close, connect, http, read_to_end, round_trip, wait_until_refused};
pub use server::{backend_list, one_pool, TestServer};
pub use temp::{toml_path, TempDir};

use std::future::Future;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long any single wait may take before the test fails. Generous: it only bounds bugs.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for the large transfers, which are slow in debug builds.
pub const TRANSFER_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(10);

/// Awaits `future` for at most [`DEADLINE`], panicking with `what` if it does not finish.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    within_for(DEADLINE, what, future).await
}

/// Awaits `future` for at most `limit`, panicking with `what` if it does not finish.
pub async fn within_for<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Runs `probe` every [`POLL`] until it returns `Some`, for at most [`DEADLINE`]; `None` if it
/// never did. The one polling loop: [`wait_until`] is its panicking form, and a caller that
/// wants to say more when the deadline passes (the last value seen) uses it directly.
pub async fn poll_for<T>(mut probe: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if start.elapsed() > DEADLINE {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `condition` until it holds, panicking with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    if poll_for(async || condition().then_some(())).await.is_none() {
        panic!("condition not met after {DEADLINE:?}: {what}");
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a payload is reproducible from its seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Removes ANSI escape sequences (the binary's log lines are coloured even when piped).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every entry of the access log at `path` so far, parsed (a line not yet complete is skipped).
pub fn access_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits until the access log at `path` holds `count` entries whose `outcome` is `outcome`.
pub async fn wait_for_outcomes(path: &std::path::Path, outcome: &str, count: usize) {
    wait_until(&format!("{count} access log entries ending {outcome}"), || {
        access_log(path)
            .iter()
            .filter(|e| e["outcome"] == outcome)
            .count()
            == count
    })
    .await;
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat has a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Set in the environment of the copy of a test that runs inside its own network namespace.
const IN_NAMESPACE: &str = "FULCRUM_TEST_IN_NETNS";

/// Whether this is the copy of test `name` running in a network namespace of its own. If not,
/// runs that copy (`unshare --net --map-root-user`, this test binary, only `name`), asserts it
/// passed, and returns false: the caller then returns. The copy sets the namespace up itself.
pub fn in_own_network_namespace(name: &str) -> bool {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return true;
    }
    let status = std::process::Command::new("unshare")
        .args(["--net", "--map-root-user"])
        .arg(std::env::current_exe().expect("path of this test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run `unshare` (util-linux): {e}"));
    assert!(
        status.success(),
        "the test inside its network namespace failed ({status}); see its output above. \
         It needs `unshare --net --map-root-user` to work (root, or unprivileged user namespaces)"
    );
    false
}

/// Runs `ip ARGS` (iproute2) and asserts it succeeded.
pub fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(status.success(), "`ip {}` failed: {status}", args.join(" "));
}
