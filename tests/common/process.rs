//! The one way to start the real `fulcrum` binary: [`command`] builds it (optionally under a
//! wrapper such as `prlimit` or `setpriv`), [`output`] runs a short command (`check`, `verify`,
//! `ctl` ...) to completion, and [`Fulcrum`] runs `run --config` with its stderr read line by
//! line (colours removed), signalled with `kill`, and awaited under a deadline.
//!
//! The child is killed when the handle drops, so a failing test never leaves one behind.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{schema, strip_ansi, within};

/// The binary, or `WRAPPER... -- fulcrum` when `wrapper` (a program and its arguments) is not
/// empty, with `RUST_LOG` removed and stdin closed. Callers add the arguments and say what
/// becomes of stdout and stderr; [`std::process::Command::output`] suits a blocking test.
pub fn command(wrapper: &[&str]) -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_fulcrum");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = std::process::Command::new(program);
            command.args(args).arg("--").arg(binary);
            command
        }
        None => std::process::Command::new(binary),
    };
    command.env_remove("RUST_LOG").stdin(Stdio::null());
    command
}

/// [`command`] for the test's runtime, killed when dropped.
pub fn async_command(wrapper: &[&str]) -> Command {
    let mut command = Command::from(command(wrapper));
    command.kill_on_drop(true);
    command
}

/// Runs the binary with `args` (a short command such as `check` or `verify`) to completion,
/// within the deadline.
pub async fn output(args: &[&str]) -> std::process::Output {
    output_under(&[], args).await
}

/// `fulcrum ctl --admin ADMIN --token-file TOKEN ARGS`, to completion.
pub async fn ctl(admin: SocketAddr, token: &Path, args: &[&str]) -> std::process::Output {
    let admin = admin.to_string();
    let token = token.to_str().expect("UTF-8 token path");
    let mut all = vec!["ctl", "--admin", &admin, "--token-file", token];
    all.extend_from_slice(args);
    output(&all).await
}

/// [`output`] under `wrapper` (see [`command`]).
pub async fn output_under(wrapper: &[&str], args: &[&str]) -> std::process::Output {
    let child = async_command(wrapper)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fulcrum");
    within("fulcrum to exit", child.wait_with_output())
        .await
        .expect("collect fulcrum's output")
}

/// A running `fulcrum run --config PATH`.
pub struct Fulcrum {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Fulcrum {
    /// Starts the binary on `config` with the default log level.
    pub fn run(config: &Path) -> Fulcrum {
        Fulcrum::run_under(&[], config)
    }

    /// Starts the binary under `wrapper` (a program and its arguments, such as `prlimit
    /// --nofile=64:64`, which gets `-- fulcrum run ...`), or directly when `wrapper` is empty.
    pub fn run_under(wrapper: &[&str], config: &Path) -> Fulcrum {
        Fulcrum::spawn(async_command(wrapper), config)
    }

    /// Starts `command` (from [`async_command`], with what the test adds: environment
    /// variables, descriptors) as `run --config PATH`. A config fulcrum accepts must match the
    /// config schema too.
    pub fn spawn(mut command: Command, config: &Path) -> Fulcrum {
        if fulcrum::Config::load(config).is_ok() {
            schema::assert_valid(&std::fs::read_to_string(config).expect("read the config"));
        }
        let mut child = command
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fulcrum run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(strip_ansi(&line)).is_err() {
                    break;
                }
            }
        });
        Fulcrum { child, lines }
    }

    /// Waits for the first stderr line `pick` accepts; panics with everything seen if stderr ends.
    pub async fn wait_for_line<T>(&mut self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let mut seen = Vec::new();
        let lines = &mut self.lines;
        within(what, async {
            loop {
                let Some(line) = lines.recv().await else {
                    panic!("fulcrum's stderr ended before {what}; it said: {seen:#?}");
                };
                if let Some(found) = pick(&line) {
                    return found;
                }
                seen.push(line);
            }
        })
        .await
    }

    /// The address of `listener`'s first `listening` log line.
    pub async fn listening(&mut self, listener: &str) -> SocketAddr {
        let field = format!("listener={listener}");
        self.wait_for_line("the `listening` log line", |line| {
            if !line.contains(" listening ") || !line.split_whitespace().any(|f| f == field) {
                return None;
            }
            line.split_whitespace()
                .find_map(|f| f.strip_prefix("addr="))?
                .parse()
                .ok()
        })
        .await
    }

    /// The admin API's TCP address, from its `admin listening` log line.
    pub async fn admin_addr(&mut self) -> SocketAddr {
        self.wait_for_line("the admin address", |line| {
            if !line.contains("admin listening") {
                return None;
            }
            line.split_whitespace()
                .find_map(|f| f.strip_prefix("addr="))?
                .parse()
                .ok()
        })
        .await
    }

    /// The process id, as `kill` and `/proc` take it.
    pub fn pid(&self) -> String {
        self.child.id().expect("fulcrum is running").to_string()
    }

    /// Asserts the process is still running.
    pub fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("poll the child");
        assert!(status.is_none(), "fulcrum exited: {status:?}");
    }

    /// Sends `signal` (a `kill` name such as "TERM" or "HUP").
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed: {status}");
    }

    /// Waits for the process to exit, then returns its status and the stderr lines not yet read.
    pub async fn exit(mut self) -> (ExitStatus, Vec<String>) {
        let status = within("fulcrum to exit", self.child.wait())
            .await
            .expect("wait for fulcrum");
        let mut rest = Vec::new();
        while let Some(line) = within("the rest of stderr", self.lines.recv()).await {
            rest.push(line);
        }
        (status, rest)
    }
}
