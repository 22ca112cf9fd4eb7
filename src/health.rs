//! Backend health: when a backend leaves the rotation and when it comes back.
//!
//! Two halves, as everywhere in fulcrum:
//! - a pure core: [`HealthState`] counts consecutive successes and failures with hysteresis
//!   (`rise` successes to come up, `fall` failures to go down) and says when the state flips;
//!   [`check_reply`] and [`jittered`] are the other decisions. No I/O, no clock.
//! - a thin I/O shell: [`spawn`] starts one probe loop per backend (jittered, each probe bounded by
//!   the probe `timeout`, so a black-holed backend delays no other probe), and [`record`] applies
//!   an outcome, from a probe or from real traffic (passive detection), to a backend: rotation in
//!   the pool, the down signal watched by open connections (`on_down = "close"`), slow start,
//!   metrics and the one log line per transition.
//!
//! Semantics: backends start up. Probe and traffic failures both count toward `fall`; a
//! successful real connect only resets the failure streak, never counts toward `rise`: a down
//! backend gets no traffic, so only probes bring it back. Without a `[upstream.health_check]`
//! table, healthy backends are not probed, but a backend taken out by passive detection is
//! probed (TCP connect, default settings) until it passes `rise` probes.
//! This module does not pick backends (balancer) or move bytes (proxy).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{BackendAddr, HealthCheckConfig};
use crate::metrics::Counter;
use crate::server::{dial, Upstream};

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
}

impl Failure {
    /// Whether the dial failed for want of local resources (descriptors, memory): a fault of
    /// this process, not of the backend.
    pub fn is_local_exhaustion(&self) -> bool {
        match self {
            Failure::Connect(e) | Failure::Io(e) => crate::server::is_resource_exhaustion(e),
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
    interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// Health of one backend, shared by its probe loop and the connections that use it.
#[derive(Debug)]
pub struct BackendHealth {
    status: Mutex<Status>,
    /// Mirror of `status.state.is_up()`, readable without the lock (metrics).
    up: AtomicBool,
    /// Transitions to up, for `fulcrum_backend_health_transitions_total{to="up"}`.
    pub went_up: Counter,
    /// Transitions to down, for `fulcrum_backend_health_transitions_total{to="down"}`.
    pub went_down: Counter,
}

#[derive(Debug)]
struct Status {
    state: HealthState,
    /// Cancelled when the backend goes down; replaced by a fresh one when it comes back.
    down: CancellationToken,
}

impl BackendHealth {
    pub fn new(check: &HealthCheckConfig) -> BackendHealth {
        BackendHealth {
            status: Mutex::new(Status {
                state: HealthState::new(check.rise, check.fall),
                down: CancellationToken::new(),
            }),
            up: AtomicBool::new(true),
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

    fn lock(&self) -> MutexGuard<'_, Status> {
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
    fn label(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Traffic => "traffic",
        }
    }
}

/// Applies one outcome to backend `index` of `upstream`, acting on a transition: rotation, the
/// down signal, slow start, counters and one log line.
pub fn record(upstream: &Upstream, index: usize, source: Source, outcome: Result<(), Failure>) {
    let Some(backend) = upstream.backend(index) else {
        return;
    };
    let health = &backend.health;
    let mut status = health.lock();
    let transition = match (&outcome, source) {
        (Err(_), _) => status.state.observe(false),
        (Ok(()), Source::Probe) => status.state.observe(true),
        (Ok(()), Source::Traffic) => {
            status.state.observe_traffic_success();
            None
        }
    };
    let streak = status.state.streak();
    match transition {
        None => {}
        Some(Transition::Down) => {
            upstream.pool.set_in_rotation(index, false);
            health.up.store(false, Ordering::Relaxed);
            status.down.cancel();
            drop(status);
            health.went_down.inc();
            let reason = outcome.err().map(|e| e.to_string()).unwrap_or_default();
            warn!(
                upstream = %upstream.name,
                backend = %backend.label,
                source = source.label(),
                "backend marked down: {reason} ({streak} consecutive failures)"
            );
        }
        Some(Transition::Up) => {
            status.down = CancellationToken::new();
            match upstream.health_check.slow_start {
                Some(period) => upstream.pool.ramp_up(index, Instant::now(), period),
                None => upstream.pool.set_in_rotation(index, true),
            }
            health.up.store(true, Ordering::Relaxed);
            drop(status);
            health.went_up.inc();
            info!(
                upstream = %upstream.name,
                backend = %backend.label,
                source = source.label(),
                "backend marked up: passed {streak} consecutive probes"
            );
        }
    }
}

/// Starts one probe loop per backend of `upstream`, tracked by `tracker`, stopped by `shutdown`
/// (a reload stops one generation's loops and starts the next one's).
pub fn spawn(upstream: &Arc<Upstream>, tracker: &TaskTracker, shutdown: &CancellationToken) {
    for backend in &upstream.backends {
        tracker.spawn(probe_loop(Arc::clone(upstream), backend.slot, shutdown.clone()));
    }
}

/// Probes one backend: first at a random offset in `[0, interval)`, then every `interval`
/// +-10% (start to start). Without an active health check only a down backend is probed.
async fn probe_loop(upstream: Arc<Upstream>, index: usize, shutdown: CancellationToken) {
    let check = &upstream.health_check;
    let Some(backend) = upstream.backend(index) else {
        return;
    };
    let mut rng = Rng::seeded(index as u64);
    let mut next = tokio::time::Instant::now() + check.interval.mul_f64(rng.unit());
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = tokio::time::Instant::now() + jittered(check.interval, rng.unit());
        if !check.active && backend.health.is_up() {
            continue;
        }
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            outcome = probe(&backend.addr, check) => outcome,
        };
        record(&upstream, index, Source::Probe, outcome);
    }
}

/// One probe: connect, write `send`, read the `expect`ed reply, all within `timeout`.
pub async fn probe(addr: &BackendAddr, check: &HealthCheckConfig) -> Result<(), Failure> {
    match tokio::time::timeout(check.timeout, exchange(addr, check)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::TimedOut(check.timeout)),
    }
}

async fn exchange(addr: &BackendAddr, check: &HealthCheckConfig) -> Result<(), Failure> {
    let mut stream = dial(addr, check.timeout)
        .await
        .map_err(|e| Failure::from_connect(e, check.timeout))?;
    if !check.send.is_empty() {
        stream.write_all(&check.send).await.map_err(Failure::Io)?;
    }
    if !check.expect.is_empty() {
        let mut reply = vec![0; check.expect.len()];
        let mut filled = 0;
        while filled < reply.len() {
            let n = stream.read(&mut reply[filled..]).await.map_err(Failure::Io)?;
            if n == 0 {
                break;
            }
            filled += n;
            if !check.expect.starts_with(&reply[..filled]) {
                break;
            }
        }
        check_reply(&check.expect, &reply[..filled])?;
    }
    Ok(())
}

/// xorshift64*: cheap jitter, not for anything secret. Seeded from the clock, the process id and
/// a per-loop value so that loops started together spread out.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests;
