//! Backend health: when a backend leaves the rotation and when it comes back.
//!
//! Two halves, as everywhere in fulcrum:
//! - this pure core: [`HealthState`] counts consecutive successes and failures with hysteresis
//!   (`rise` successes to come up, `fall` failures to go down) and says when the state flips;
//!   [`check_reply`] and [`jittered`] are the other decisions; [`BackendHealth`] is the state a
//!   live backend carries. No I/O, no clock.
//! - the thin I/O shell, the `probe` room above the live model: one probe loop per backend (jittered, each probe bounded by
//!   the probe `timeout`, so a black-holed backend delays no other probe), and
//!   `probe::record`, which applies an outcome, from a probe or from real traffic (passive
//!   detection), to a live backend: rotation in the pool, the down signal watched by open
//!   connections (`on_down = "close"`), slow start, metrics and the one log line per transition.
//!
//! Semantics: backends start up. Probe and traffic failures both count toward `fall`, except
//! those of this process's own making (out of descriptors or memory), which count for nothing; a
//! successful real connect only resets the failure streak, never counts toward `rise`: a down
//! backend gets no traffic, so only probes bring it back. Without a `[upstream.health_check]`
//! table, healthy backends are not probed, but a backend taken out by passive detection is
//! probed (TCP connect, default settings) until it passes `rise` probes.
//! This module does not pick backends (balancer) or move bytes (proxy).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::HealthCheckConfig;
use crate::metrics::Counter;

/// A change of a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `rise` consecutive successful probes: back in rotation.
    Up,
    /// `fall` consecutive failures: out of rotation.
    Down,
}

/// Rise/fall hysteresis over a stream of outcomes. Starts up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    successes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
}

impl HealthState {
    /// An up backend that goes down after `fall` consecutive failures and comes back after `rise`
    /// consecutive successes (both at least 1).
    pub fn new(rise: u32, fall: u32) -> HealthState {
        HealthState {
            up: true,
            successes: 0,
            failures: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// New thresholds (on reload); the up/down state and current streaks are kept.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Length of the current run of identical outcomes (successes if the last was one).
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }

    /// Takes one probe outcome (or a failed real connect, `ok = false`); returns the transition
    /// it causes, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= self.rise {
                self.up = true;
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.fall {
                self.up = false;
                return Some(Transition::Down);
            }
        }
        None
    }

    /// Takes a successful real connect: it ends a failure streak of an up backend, and nothing
    /// else (it never brings a down backend back; only probes do).
    pub fn observe_traffic_success(&mut self) {
        if self.up {
            self.failures = 0;
        }
    }
}

/// Why a probe or a real connect counted as a failure. The messages go into the transition log.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("connect refused")]
    Refused,
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("reply did not match expect")]
    Mismatch,
    #[error("connection closed after {got} of {want} expected reply bytes")]
    ShortReply { got: usize, want: usize },
    #[error("probe i/o failed: {0}")]
    Io(io::Error),
    /// The TLS handshake to the backend failed (its certificate refused included: the message
    /// names what was wrong with it).
    #[error("tls handshake failed: {0}")]
    Tls(io::Error),
}

impl Failure {
    /// Whether it failed for want of this process's own resources (descriptors, buffers,
    /// memory): judged as local, never against the backend.
    pub(crate) fn is_local(&self) -> bool {
        match self {
            Failure::Connect(e) | Failure::Io(e) | Failure::Tls(e) => crate::caps::is_resource_exhaustion(e),
            _ => false,
        }
    }

    /// Classifies a failed dial made under `timeout`.
    pub fn from_connect(e: io::Error, timeout: Duration) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::TimedOut => Failure::TimedOut(timeout),
            _ => Failure::Connect(e),
        }
    }
}

/// Judges the bytes read so far (at most `expect.len()`): a mismatch as soon as they differ,
/// a short reply if they match but stopped early.
pub fn check_reply(expect: &[u8], reply: &[u8]) -> Result<(), Failure> {
    if !expect.starts_with(reply) {
        return Err(Failure::Mismatch);
    }
    if reply.len() < expect.len() {
        return Err(Failure::ShortReply {
            got: reply.len(),
            want: expect.len(),
        });
    }
    Ok(())
}

/// `interval` scaled by a factor in [0.9, 1.1), `unit` being uniform in [0, 1).
pub fn jittered(interval: Duration, unit: f64) -> Duration {
    // Saturating: a factor that would leave Duration's range keeps the interval as it is.
    Duration::try_from_secs_f64(interval.as_secs_f64() * (0.9 + 0.2 * unit.clamp(0.0, 1.0)))
        .unwrap_or(interval)
}

/// What an operator set for a backend through the admin API (kept across reloads while the
/// backend stays). Health checks go on whatever it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdminState {
    /// In rotation when healthy.
    #[default]
    Ready,
    /// No new connections; open ones go on.
    Drain,
    /// No new connections, and open ones are closed.
    Maint,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    pub fn label(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(text: &str) -> Option<AdminState> {
        AdminState::ALL.into_iter().find(|s| s.label() == text)
    }
}

/// Health of one backend, shared by its probe loop and the connections that use it, with the
/// state an operator set: a backend takes new connections when it is up and `ready`.
#[derive(Debug)]
pub struct BackendHealth {
    status: Mutex<Status>,
    /// Mirror of `status.state.is_up()`, readable without the lock (metrics).
    pub(crate) up: AtomicBool,
    /// Mirror of `status.admin`, readable without the lock.
    pub(crate) admin: std::sync::atomic::AtomicU8,
    /// Admin state changes, for `fulcrum_backend_admin_state_changes_total`.
    pub admin_changes: Counter,
    /// Transitions to up, for `fulcrum_backend_health_transitions_total{to="up"}`.
    pub went_up: Counter,
    /// Transitions to down, for `fulcrum_backend_health_transitions_total{to="down"}`.
    pub went_down: Counter,
}

#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) state: HealthState,
    /// Cancelled when the backend goes down; replaced by a fresh one when it comes back.
    pub(crate) down: CancellationToken,
    pub(crate) admin: AdminState,
    /// Cancelled when the backend is put in `maint`; replaced when it leaves.
    pub(crate) maint: CancellationToken,
}

impl BackendHealth {
    pub fn new(check: &HealthCheckConfig) -> BackendHealth {
        BackendHealth {
            status: Mutex::new(Status {
                state: HealthState::new(check.rise, check.fall),
                down: CancellationToken::new(),
                admin: AdminState::Ready,
                maint: CancellationToken::new(),
            }),
            up: AtomicBool::new(true),
            admin: std::sync::atomic::AtomicU8::new(AdminState::Ready as u8),
            admin_changes: Counter::default(),
            went_up: Counter::default(),
            went_down: Counter::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Applies new rise/fall thresholds (on reload), keeping the backend's current health.
    pub fn reconfigure(&self, check: &HealthCheckConfig) {
        self.lock().state.set_thresholds(check.rise, check.fall);
    }

    /// A signal that fires when the backend is next marked down (at once if it is down now).
    pub fn down_signal(&self) -> CancellationToken {
        self.lock().down.clone()
    }

    /// A signal that fires when the backend is next put in `maint` (at once if it is now).
    pub fn maint_signal(&self) -> CancellationToken {
        self.lock().maint.clone()
    }

    /// The state an operator set.
    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    /// Whether the backend should take new connections: up and `ready`.
    pub fn takes_connections(&self) -> bool {
        self.is_up() && self.admin_state() == AdminState::Ready
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Status> {
        // Nothing panics while holding this lock; recover from poisoning rather than spread it.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where an outcome came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Probe,
    /// A real client connection's dial (passive detection).
    Traffic,
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Traffic => "traffic",
        }
    }
}

#[cfg(test)]
mod tests;
