//! The `/status` snapshot: live state as JSON for operators and the status page.
//!
//! [`snapshot`] is a pure function of the server's [`State`] and the current instant: it reads
//! counters and the pools, changes nothing and does no I/O, so the admin listener can call it on
//! every request. The field names are a public contract (the status page and operators' scripts
//! read them): add fields, do not rename them. [`PAGE`] is the status page itself, a single HTML
//! file with inline CSS and JS that polls `/status`; this module does not serve it (admin does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::identities::{Top, TOP};
use crate::metrics::Reason;
use crate::state::State;
use crate::tls::expiry::Scope;

/// The status page served at `/`: no external assets, polls `/status` every second.
pub const PAGE: &str = include_str!("status.html");

/// Everything `/status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Which configuration is live: 1 at start, bumped by each reload.
    pub generation: u64,
    /// Whole seconds since the server started.
    pub uptime_seconds: u64,
    /// Whether shutdown has started: no new connections, open ones finishing.
    pub draining: bool,
    /// While draining, connections still open; `null` otherwise.
    pub remaining_connections: Option<u64>,
    /// Connections counted against any backend right now.
    pub active_connections: u64,
    /// Access log lines lost because the writer fell behind.
    pub access_log_dropped: u64,
    pub listeners: Vec<ListenerStatus>,
    pub upstreams: Vec<UpstreamStatus>,
    /// Every certificate and CRL deadline, earliest first.
    pub certificates: Vec<CertificateStatus>,
    /// The top identities by open connections and by refusals (at most 50 each), and what the
    /// lists leave out.
    pub identities: Top,
}

/// When one certificate (or CRL) stops being valid.
#[derive(Clone, Debug, Serialize)]
pub struct CertificateStatus {
    /// The listener or upstream it belongs to (neither: the shared rate limit's Redis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Of a listener's certificate entry (`[[listener.tls.certificate]]`): its first server
    /// name, as the `certificate` label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// As the `kind` label of `fulcrum_certificate_not_after_timestamp_seconds`.
    pub kind: &'static str,
    /// RFC 3339, and UNIX seconds.
    pub not_after: String,
    pub not_after_seconds: u64,
    /// Whole days left (negative once past).
    pub days_left: i64,
    /// Due within 14 days (or past): shown in the warning colour.
    pub expiring: bool,
}

/// One listener: where it accepts, where it sends, what it refused.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    /// Bound addresses (several workers share one address, listed once).
    pub bind: Vec<SocketAddr>,
    pub upstream: String,
    /// Whether the listener terminates TLS.
    pub tls: bool,
    /// Whether clients must present a certificate.
    pub mtls: bool,
    /// Connections accepted (refused ones included).
    pub accepted: u64,
    /// Refusals by reason (every reason listed, zeros included).
    pub rejected: BTreeMap<&'static str, u64>,
}

/// One upstream group and its backends.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    /// Sum of the backends' active connections.
    pub active: u64,
    /// Clients waiting now for a backend below its `max_connections`.
    pub queue_length: usize,
    /// `queue_size`: how many may wait (0: none, refused at once).
    pub queue_size: usize,
    /// Waits that ended (served or timed out) since start, and their total time.
    pub queue_waits_total: u64,
    pub queue_wait_seconds_total: f64,
    /// With `discover`: the name, and how its resolutions went.
    pub discover: Option<DiscoverStatus>,
    pub backends: Vec<BackendStatus>,
}

/// A discovering upstream's name and resolutions.
#[derive(Clone, Debug, Serialize)]
pub struct DiscoverStatus {
    /// `host:port`.
    pub name: String,
    pub interval_seconds: f64,
    pub resolutions_ok: u64,
    /// Resolved to no address (the last good set stayed).
    pub resolutions_empty: u64,
    /// Failed or timed out (the last good set stayed).
    pub resolutions_failed: u64,
}

/// One backend's health and load.
#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    /// The configured `host:port` (the `backend` label in metrics).
    pub address: String,
    /// `"up"` (in rotation) or `"down"` (marked down by health checks).
    pub health: &'static str,
    /// What an operator set: `"ready"`, `"drain"` (no new connections) or `"maint"` (no new
    /// connections, open ones closed).
    pub admin_state: &'static str,
    /// Connections counted against it now (from selection until both directions close).
    pub active: u32,
    /// Its weight now (as configured, or as set through the admin API since).
    pub weight: u32,
    /// Its cap (`null`: none).
    pub max_connections: Option<u32>,
    /// Whether it is a backup (picked only when no primary can take a connection).
    pub backup: bool,
    /// Connections proxied to it (connect succeeded), since start.
    pub connections_total: u64,
    /// Failed dials (refused, unreachable or timed out), since start.
    pub connect_failures_total: u64,
}

/// Reads the live state at `now` (the uptime's end).
pub fn snapshot(state: &State, now: Instant) -> Status {
    snapshot_at(state, now, SystemTime::now())
}

/// [`snapshot`] with the wall clock given too (certificates' days left).
pub fn snapshot_at(state: &State, now: Instant, wall: SystemTime) -> Status {
    let draining = state.is_draining();
    let active_connections = state.total_active();
    let listeners = state
        .listeners()
        .map(|l| ListenerStatus {
            name: l.name.clone(),
            bind: l.addresses(),
            upstream: l.upstream.name.clone(),
            tls: l.tls.is_some(),
            mtls: l.mutual_tls,
            accepted: l.accepted.get(),
            rejected: Reason::ALL
                .iter()
                .map(|r| (r.label(), l.rejected.get(*r)))
                .collect(),
        })
        .collect();
    let upstreams = state
        .upstreams()
        .map(|u| {
            let backends: Vec<BackendStatus> = u
                .backends
                .iter()
                .map(|b| {
                    let spec = u.pool.spec(b.slot).unwrap_or_default();
                    BackendStatus {
                        address: b.label.clone(),
                        health: if b.is_up() { "up" } else { "down" },
                        admin_state: b.health.admin_state().label(),
                        active: u.pool.active(b.slot),
                        weight: spec.weight,
                        max_connections: spec.max_connections,
                        backup: spec.backup,
                        connections_total: b.connections.get(),
                        connect_failures_total: b.connect_failures.get(),
                    }
                })
                .collect();
            let discover = u.discover.as_ref().map(|target| {
                let outcomes = state.discovered.outcomes(&u.name);
                DiscoverStatus {
                    name: target.to_string(),
                    interval_seconds: target.interval.as_secs_f64(),
                    resolutions_ok: outcomes.ok.get(),
                    resolutions_empty: outcomes.empty.get(),
                    resolutions_failed: outcomes.failed.get(),
                }
            });
            UpstreamStatus {
                name: u.name.clone(),
                active: backends.iter().map(|b| u64::from(b.active)).sum(),
                queue_length: u.pool.waiting(),
                queue_size: u.queue_size,
                queue_waits_total: u.figures.queue.count(),
                queue_wait_seconds_total: u.figures.queue.snapshot().0,
                discover,
                backends,
            }
        })
        .collect();
    Status {
        generation: state.generation(),
        uptime_seconds: now.saturating_duration_since(state.started).as_secs(),
        draining,
        remaining_connections: draining.then_some(active_connections),
        active_connections,
        access_log_dropped: state.access_log_dropped(),
        listeners,
        upstreams,
        certificates: certificates(state, wall),
        identities: state.identities.top(TOP),
    }
}

fn certificates(state: &State, wall: SystemTime) -> Vec<CertificateStatus> {
    let mut all: Vec<_> = state
        .certificates
        .iter()
        .map(|c| {
            let (listener, upstream) = match &c.scope {
                Scope::Listener(name) => (Some(name.clone()), None),
                Scope::Upstream(name) => (None, Some(name.clone())),
                Scope::Redis => (None, None),
            };
            CertificateStatus {
                listener,
                upstream,
                certificate: c.certificate.clone(),
                kind: c.kind,
                not_after: humantime::format_rfc3339_seconds(c.not_after).to_string(),
                not_after_seconds: c.not_after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                days_left: c.days_left(wall),
                expiring: c.is_near(wall),
            }
        })
        .collect();
    all.sort_by_key(|c| c.not_after_seconds);
    all
}

/// The snapshot as JSON text.
pub fn render(state: &State, now: Instant) -> String {
    // Strings, numbers and string-keyed maps always serialize; keep the endpoint answering anyway.
    serde_json::to_string(&snapshot(state, now)).unwrap_or_else(|_| "{}".to_string())
}
