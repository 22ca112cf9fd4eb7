//! Health probes and their outcomes: probe loops, and applying outcomes to live backends. The
//! I/O side of `health` (its pure core), above the live model (`state`) it changes.
//!
//! `spawn` starts one probe loop per backend of an upstream; [`once`] is one probe (connect,
//! `send`, the `expect`ed reply, all within the probe `timeout`); `record` applies an outcome,
//! from a probe or from a real client's dial (passive detection), to the backend: rotation in the
//! pool, the down signal, slow start, counters and one log line per transition. The decisions
//! themselves are the pure core's (`health`). Probes dial through `net`, as client connections do,
//! and a probe that fails for want of this process's own descriptors or memory is judged as a
//! client's dial is (`Failure::is_local`): logged as local, never held against
//! the backend (`record_probe`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{BackendAddr, HealthCheckConfig};
use crate::health::{check_reply, jittered, AdminState, Failure, Source, Transition};
use crate::net::{dial, DialError};
use crate::state::Upstream;
use crate::throttle::LogThrottle;

/// Probes that could not run for want of local resources: many backends' probes fail together
/// then, so their log lines share one process-wide throttle.
static LOCAL_FAILURES: LogThrottle = LogThrottle::new();

/// What became of a probe's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probed {
    /// Applied to the backend's health ([`record`]).
    Recorded,
    /// The probe failed for want of this process's own descriptors, buffers or memory: it says
    /// nothing about the backend, so it was logged as local and not counted at all (neither
    /// toward `fall` nor as the end of a success streak).
    Local,
}

/// Applies a probe's outcome to backend `index` of `upstream`, unless the probe failed for want
/// of local resources (`Failure::is_local`, as client dials are judged): then the backend's
/// health is left as it was, and a (throttled) warning says the probe could not run.
pub(crate) fn record_probe(upstream: &Upstream, index: usize, outcome: Result<(), Failure>) -> Probed {
    match outcome {
        Err(failure) if failure.is_local() => {
            if let Some(suppressed) = LOCAL_FAILURES.admit() {
                let backend = upstream.backend(index).map_or("", |b| b.label.as_str());
                warn!(
                    upstream = %upstream.name,
                    backend,
                    error = %failure,
                    suppressed,
                    "probe could not run: out of local resources (not counted against the backend)"
                );
            }
            Probed::Local
        }
        outcome => {
            record(upstream, index, Source::Probe, outcome);
            Probed::Recorded
        }
    }
}

/// Applies one outcome to backend `index` of `upstream`, acting on a transition: rotation, the
/// down signal, slow start, counters and one log line.
pub(crate) fn record(upstream: &Upstream, index: usize, source: Source, outcome: Result<(), Failure>) {
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
            upstream.pool.set_in_rotation(index, false, Instant::now());
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
            // Drained or in maintenance, it stays out of rotation until an operator says ready.
            if status.admin == AdminState::Ready {
                back_in_rotation(upstream, index);
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

/// Puts backend `index` back in rotation, ramping it in when the upstream has slow start.
fn back_in_rotation(upstream: &Upstream, index: usize) {
    match upstream.health_check.slow_start {
        Some(period) => upstream.pool.ramp_up(index, Instant::now(), period),
        None => upstream.pool.set_in_rotation(index, true, Instant::now()),
    }
}

/// Sets the admin state of backend `index` of `upstream` (an operator's request through the
/// admin API, `who` for the log line): `drain` takes it out of rotation, `maint` also closes
/// its open connections, `ready` returns it to rotation if it is healthy. Returns the state it
/// had, or `None` if the backend is not in this generation.
pub(crate) fn set_admin_state(
    upstream: &Upstream,
    index: usize,
    state: AdminState,
    who: &str,
) -> Option<AdminState> {
    let backend = upstream.backend(index)?;
    let health = &backend.health;
    let mut status = health.lock();
    let before = status.admin;
    status.admin = state;
    health.admin.store(state as u8, Ordering::Relaxed);
    match state {
        AdminState::Ready if before != AdminState::Ready && status.state.is_up() => {
            back_in_rotation(upstream, index)
        }
        AdminState::Ready => {}
        AdminState::Drain | AdminState::Maint => upstream.pool.set_in_rotation(index, false, Instant::now()),
    }
    if state == AdminState::Maint {
        status.maint.cancel();
    } else if before == AdminState::Maint {
        status.maint = CancellationToken::new();
    }
    drop(status);
    if before != state {
        health.admin_changes.inc();
    }
    info!(
        upstream = %upstream.name,
        backend = %backend.label,
        from = before.label(),
        to = state.label(),
        by = who,
        "backend admin state set"
    );
    Some(before)
}

/// Starts one probe loop per backend of `upstream`, tracked by `tracker`, stopped by `shutdown`
/// (a reload stops one generation's loops and starts the next one's).
pub(crate) fn spawn(upstream: &Arc<Upstream>, tracker: &TaskTracker, shutdown: &CancellationToken) {
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
    let mut next = crate::clock::later(tokio::time::Instant::now(), check.interval.mul_f64(rng.unit()));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = crate::clock::later(tokio::time::Instant::now(), jittered(check.interval, rng.unit()));
        if !check.active && backend.health.is_up() {
            continue;
        }
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            outcome = once(&backend.addr, check) => outcome,
        };
        record_probe(&upstream, index, outcome);
    }
}

/// One probe: connect, write `send`, read the `expect`ed reply, all within `timeout`.
pub async fn once(addr: &BackendAddr, check: &HealthCheckConfig) -> Result<(), Failure> {
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

/// A failed dial of real traffic, as health judges it.
impl From<DialError> for Failure {
    fn from(e: DialError) -> Failure {
        match e {
            DialError::Refused => Failure::Refused,
            DialError::TimedOut(after) => Failure::TimedOut(after),
            DialError::Connect(e) => Failure::Connect(e),
            DialError::Io(e) => Failure::Io(e),
            DialError::Tls(e) => Failure::Tls(e),
        }
    }
}

#[cfg(test)]
mod tests;
