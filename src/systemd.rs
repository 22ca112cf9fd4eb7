//! What systemd hands a service and what it expects back: the listening sockets of socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3), and the
//! notifications of `Type=notify` / `Type=notify-reload` (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `STATUS=`) with the watchdog's `WATCHDOG=1` pings.
//!
//! A thin shell over two crates: `listenfd` turns the passed descriptors into sockets, `sd-notify`
//! writes the notifications. This module checks what was passed (listening TCP sockets, as many
//! names as descriptors, meant for this process) but does not decide which listener takes which
//! socket: `server::listen` does. Without `NOTIFY_SOCKET` every notification is a no-op; without
//! `LISTEN_PID` naming this process nothing is inherited.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The environment variables of socket activation, unset once read so that no child inherits them.
const LISTEN_VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// A `STATUS=` line longer than this is cut (systemctl shows one line).
const STATUS_MAX: usize = 200;

/// Why the sockets systemd passed cannot be used. fulcrum refuses to start: a socket unit that
/// does not fit the service is a deployment error to fix, not one to serve around.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: {variable}={value:?} is not a number of descriptors")]
    Count { variable: &'static str, value: String },
    #[error(
        "socket activation: LISTEN_FDNAMES={names:?} names {named} socket(s) but LISTEN_FDS passes {count}"
    )]
    Names {
        names: String,
        named: usize,
        count: usize,
    },
    #[error("socket activation: inherited fd {fd}{} is not a TCP socket: {source}", label(.name))]
    NotTcp {
        fd: i32,
        name: Option<String>,
        source: std::io::Error,
    },
    #[error(
        "socket activation: inherited fd {fd}{} is a TCP socket but not a listening one \
         (fulcrum needs `Accept=no`, the default, in the .socket unit)",
        label(.name)
    )]
    NotListening { fd: i32, name: Option<String> },
}

fn label(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default()
}

/// One listening socket systemd passed.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) fd: i32,
    /// Its `FileDescriptorName=`, when systemd passed names (`LISTEN_FDNAMES`).
    pub(crate) name: Option<String>,
    pub(crate) addr: SocketAddr,
    pub(crate) socket: std::net::TcpListener,
}

/// What systemd handed this process at start: the sockets to serve instead of binding, and where
/// to send notifications. `Activation::default()` is none of it (what [`crate::Server::bind`] uses).
#[derive(Debug, Default)]
pub struct Activation {
    pub(crate) sockets: Vec<Inherited>,
    pub(crate) notifier: Notifier,
}

impl Activation {
    /// Reads socket activation and notification settings from the environment, checks every
    /// passed descriptor, and unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`.
    ///
    /// Changes the environment: call it before any thread starts (before the async runtime).
    pub fn from_env() -> Result<Activation, ActivationError> {
        let var = |name| std::env::var(name).ok();
        let judged = passed(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        // listenfd reads the same variables, so it goes before they are unset.
        let sockets = judged.and_then(|judged| match judged {
            Passed::Sockets(names) => take(names),
            Passed::NotOurs(why) => {
                info!("socket activation variables ignored: {why}");
                Ok(Vec::new())
            }
            Passed::Nothing => Ok(Vec::new()),
        });
        for variable in LISTEN_VARIABLES {
            std::env::remove_var(variable);
        }
        Ok(Activation {
            sockets: sockets?,
            notifier: Notifier::from_env(),
        })
    }
}

/// What the socket activation variables say, judged without touching a descriptor.
#[derive(Debug, PartialEq)]
enum Passed {
    /// No `LISTEN_FDS`, or zero descriptors.
    Nothing,
    /// Meant for another process, or unusable: why.
    NotOurs(String),
    /// This many descriptors from fd 3, each with its name if systemd gave names.
    Sockets(Vec<Option<String>>),
}

/// Reads the variables as `sd_listen_fds_with_names(3)` does: `LISTEN_PID` must name this process
/// (`own_pid`), `LISTEN_FDNAMES` (when set) names every descriptor.
fn passed(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Passed, ActivationError> {
    let Some(fds) = fds else {
        return Ok(Passed::Nothing);
    };
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => return Ok(Passed::NotOurs("LISTEN_FDS is set but LISTEN_PID is not".into())),
        Some(Ok(pid)) if pid == own_pid => {}
        Some(_) => {
            return Ok(Passed::NotOurs(format!(
                "LISTEN_PID={:?} is not this process ({own_pid})",
                pid.unwrap_or_default()
            )))
        }
    }
    let count: usize = fds.parse().map_err(|_| ActivationError::Count {
        variable: "LISTEN_FDS",
        value: fds.to_string(),
    })?;
    if count == 0 {
        return Ok(Passed::Nothing);
    }
    let Some(names) = names else {
        return Ok(Passed::Sockets(vec![None; count]));
    };
    let named: Vec<Option<String>> = names.split(':').map(|n| Some(n.to_string())).collect();
    if named.len() != count {
        return Err(ActivationError::Names {
            names: names.to_string(),
            named: named.len(),
            count,
        });
    }
    Ok(Passed::Sockets(named))
}

/// Takes the passed descriptors as listening TCP sockets (close-on-exec from here on).
fn take(names: Vec<Option<String>>) -> Result<Vec<Inherited>, ActivationError> {
    let mut passed = listenfd::ListenFd::from_env();
    let mut sockets = Vec::with_capacity(names.len());
    for (index, name) in names.into_iter().enumerate() {
        let fd = FIRST_FD.saturating_add(i32::try_from(index).unwrap_or(i32::MAX));
        let not_tcp = |source| ActivationError::NotTcp {
            fd,
            name: name.clone(),
            source,
        };
        let socket = match passed.take_tcp_listener(index) {
            Ok(Some(socket)) => socket,
            Ok(None) => return Err(not_tcp(std::io::ErrorKind::NotFound.into())),
            Err(e) => return Err(not_tcp(e)),
        };
        if !socket2::SockRef::from(&socket).is_listener().map_err(not_tcp)? {
            return Err(ActivationError::NotListening { fd, name });
        }
        let addr = socket.local_addr().map_err(not_tcp)?;
        debug!(fd = socket.as_raw_fd(), ?name, %addr, "inherited a listening socket");
        sockets.push(Inherited {
            fd,
            name,
            addr,
            socket,
        });
    }
    Ok(sockets)
}

/// Sends systemd the service's state, when it listens (`NOTIFY_SOCKET` was set at start).
#[derive(Clone, Debug, Default)]
pub(crate) struct Notifier {
    enabled: bool,
    /// `WATCHDOG_USEC` (for this process): systemd restarts the service when no ping arrives
    /// within it.
    watchdog: Option<Duration>,
}

impl Notifier {
    fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Notifier {
            enabled,
            watchdog: sd_notify::watchdog_enabled().filter(|d| enabled && !d.is_zero()),
        }
    }

    /// `READY=1`: every listener accepts (at start, and after a reload, applied or refused).
    pub(crate) fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload` requires.
    pub(crate) fn reloading(&self) {
        if !self.enabled {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
            Err(e) => warn!(error = %e, "cannot read the monotonic clock for systemd's RELOADING=1"),
        }
    }

    /// `STOPPING=1`: the drain has begun.
    pub(crate) fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(&one_line(status))]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    /// Pings the watchdog at half its interval until `stop`. Runs on the serving runtime, so the
    /// pings stop, and systemd restarts the service, when that runtime is stuck. Returns at once
    /// without a watchdog.
    pub(crate) async fn watchdog(self, stop: CancellationToken) {
        let Some(interval) = self.watchdog else {
            return;
        };
        info!(?interval, "systemd watchdog: pinging at half the interval");
        let mut ticks = tokio::time::interval(interval / 2);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                // Once at `warn`: the socket does not come back between two pings.
                if !std::mem::replace(&mut warned, true) {
                    warn!(error = %e, "cannot ping systemd's watchdog");
                }
            }
        }
    }
}

/// A `STATUS=` value: one line (a newline would start another assignment), at most
/// [`STATUS_MAX`] characters.
fn one_line(status: &str) -> String {
    status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(STATUS_MAX)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_listen_fds_nothing_is_passed() {
        assert_eq!(passed(Some("7"), None, None, 7).unwrap(), Passed::Nothing);
        assert_eq!(passed(Some("7"), Some("0"), None, 7).unwrap(), Passed::Nothing);
    }

    #[test]
    fn descriptors_meant_for_this_process_are_taken_with_their_names() {
        assert_eq!(
            passed(Some("7"), Some("2"), Some("web:admin"), 7).unwrap(),
            Passed::Sockets(vec![Some("web".into()), Some("admin".into())])
        );
        assert_eq!(
            passed(Some("7"), Some("2"), None, 7).unwrap(),
            Passed::Sockets(vec![None, None])
        );
    }

    #[test]
    fn descriptors_meant_for_another_process_or_no_process_are_ignored() {
        for pid in [Some("8"), Some("not-a-pid"), None] {
            let judged = passed(pid, Some("1"), Some("web"), 7).unwrap();
            assert!(matches!(judged, Passed::NotOurs(_)), "{pid:?}: {judged:?}");
        }
    }

    #[test]
    fn a_name_count_that_differs_from_the_descriptor_count_is_refused() {
        let e = passed(Some("7"), Some("2"), Some("web"), 7).unwrap_err();
        assert!(
            matches!(
                e,
                ActivationError::Names {
                    named: 1,
                    count: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = passed(Some("7"), Some("two"), None, 7).unwrap_err();
        assert!(e.to_string().contains("LISTEN_FDS=\"two\""), "{e}");
    }

    #[test]
    fn a_status_is_one_line_of_bounded_length() {
        assert_eq!(one_line("reload refused:\nbad key"), "reload refused: bad key");
        assert_eq!(one_line(&"x".repeat(500)).len(), STATUS_MAX);
    }
}
