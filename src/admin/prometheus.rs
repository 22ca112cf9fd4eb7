//! Prometheus text rendering of the live state's counters (`GET /metrics`).
//!
//! Reads a generation's [`State`] on scrape and never blocks a connection. The metric names and
//! labels are a public contract: keep them. This module renders; the counters live in `metrics`
//! and in the state they count.

use std::fmt::Write;

use crate::metrics::{HandshakeFailure, Reason};
use crate::state::{Backend, State, Upstream};

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(state: &State) -> String {
    let mut out = String::with_capacity(4096);
    header(
        &mut out,
        "fulcrum_connections_total",
        "counter",
        "Connections accepted, per listener.",
    );
    for l in state.listeners() {
        let _ = writeln!(
            out,
            "fulcrum_connections_total{{listener=\"{}\"}} {}",
            escape(&l.name),
            l.accepted.get()
        );
    }
    header(
        &mut out,
        "fulcrum_connections_rejected_total",
        "counter",
        "Connections closed without being proxied, per listener and reason.",
    );
    for l in state.listeners() {
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "fulcrum_connections_rejected_total{{listener=\"{}\",reason=\"{}\"}} {}",
                escape(&l.name),
                reason.label(),
                l.rejected.get(reason)
            );
        }
    }
    header(
        &mut out,
        "fulcrum_tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes (and refused resumed sessions) on TLS listeners, per listener and reason.",
    );
    for l in state.listeners().filter(|l| l.tls.is_some()) {
        for failure in HandshakeFailure::ALL {
            let _ = writeln!(
                out,
                "fulcrum_tls_handshake_failures_total{{listener=\"{}\",reason=\"{}\"}} {}",
                escape(&l.name),
                failure.label(),
                l.handshake_failures.get(failure)
            );
        }
    }
    header(
        &mut out,
        "fulcrum_backend_active_connections",
        "gauge",
        "Connections currently counted against each backend (from selection until both directions close).",
    );
    // By slot: a reload that removes a backend leaves its slot behind.
    backend_counter(&mut out, state, "fulcrum_backend_active_connections", |u, b| {
        Some(u64::from(u.pool.active(b.slot)))
    });
    header(
        &mut out,
        "fulcrum_backend_weight",
        "gauge",
        "Each backend's weight now (as configured, or as set through the admin API).",
    );
    backend_counter(&mut out, state, "fulcrum_backend_weight", |u, b| {
        Some(u64::from(u.pool.weight(b.slot)))
    });
    header(
        &mut out,
        "fulcrum_backend_max_connections",
        "gauge",
        "Each capped backend's max_connections (backends without a cap have no sample).",
    );
    backend_counter(&mut out, state, "fulcrum_backend_max_connections", |u, b| {
        u.pool.spec(b.slot)?.max_connections.map(u64::from)
    });
    header(
        &mut out,
        "fulcrum_upstream_queue_length",
        "gauge",
        "Clients waiting now in each upstream's queue for a backend below its max_connections.",
    );
    for u in state.upstreams() {
        let _ = writeln!(
            out,
            "fulcrum_upstream_queue_length{{upstream=\"{}\"}} {}",
            escape(&u.name),
            u.pool.waiting()
        );
    }
    header(
        &mut out,
        "fulcrum_upstream_queue_wait_seconds",
        "summary",
        "Time clients spent in each upstream's queue (waits that ended: served or timed out).",
    );
    for u in state.upstreams() {
        let name = escape(&u.name);
        let _ = writeln!(
            out,
            "fulcrum_upstream_queue_wait_seconds_sum{{upstream=\"{name}\"}} {}\n\
             fulcrum_upstream_queue_wait_seconds_count{{upstream=\"{name}\"}} {}",
            u.queue_waits.micros.get() as f64 / 1e6,
            u.queue_waits.ended.get()
        );
    }
    header(
        &mut out,
        "fulcrum_dns_resolutions_total",
        "counter",
        "Resolutions of each discovering upstream's name, by outcome (ok; empty or failed: the last good set stayed).",
    );
    for u in state.upstreams().filter(|u| u.discover.is_some()) {
        let outcomes = state.discovered.outcomes(&u.name);
        for (outcome, counter) in [
            ("ok", &outcomes.ok),
            ("empty", &outcomes.empty),
            ("failed", &outcomes.failed),
        ] {
            let _ = writeln!(
                out,
                "fulcrum_dns_resolutions_total{{upstream=\"{}\",outcome=\"{outcome}\"}} {}",
                escape(&u.name),
                counter.get()
            );
        }
    }
    header(
        &mut out,
        "fulcrum_backend_connections_total",
        "counter",
        "Connections proxied to each backend (connect succeeded).",
    );
    backend_counter(&mut out, state, "fulcrum_backend_connections_total", |_, b| {
        Some(b.connections.get())
    });
    header(
        &mut out,
        "fulcrum_backend_connect_failures_total",
        "counter",
        "Failed dials (refused, unreachable or timed out), per backend.",
    );
    backend_counter(
        &mut out,
        state,
        "fulcrum_backend_connect_failures_total",
        |_, b| Some(b.connect_failures.get()),
    );
    header(
        &mut out,
        "fulcrum_backend_up",
        "gauge",
        "1 if the backend is in rotation by health checks, 0 if marked down.",
    );
    backend_counter(&mut out, state, "fulcrum_backend_up", |_, b| {
        Some(u64::from(b.is_up()))
    });
    header(
        &mut out,
        "fulcrum_backend_health_transitions_total",
        "counter",
        "Health state changes per backend, by the state entered.",
    );
    for u in state.upstreams() {
        for b in &u.backends {
            for (to, count) in [("up", &b.health.went_up), ("down", &b.health.went_down)] {
                let _ = writeln!(
                    out,
                    "fulcrum_backend_health_transitions_total{{upstream=\"{}\",backend=\"{}\",to=\"{to}\"}} {}",
                    escape(&u.name),
                    escape(&b.label),
                    count.get()
                );
            }
        }
    }
    header(
        &mut out,
        "fulcrum_backend_admin_state",
        "gauge",
        "1 for the admin state an operator set for the backend (ready, drain, maint), 0 for the others.",
    );
    for u in state.upstreams() {
        for b in &u.backends {
            let current = b.health.admin_state();
            for s in crate::health::AdminState::ALL {
                let _ = writeln!(
                    out,
                    "fulcrum_backend_admin_state{{upstream=\"{}\",backend=\"{}\",state=\"{}\"}} {}",
                    escape(&u.name),
                    escape(&b.label),
                    s.label(),
                    u8::from(s == current)
                );
            }
        }
    }
    header(
        &mut out,
        "fulcrum_backend_admin_state_changes_total",
        "counter",
        "Admin state changes of each backend (POST /upstreams/{upstream}/backends/{backend}/state).",
    );
    backend_counter(
        &mut out,
        state,
        "fulcrum_backend_admin_state_changes_total",
        |_, b| Some(b.health.admin_changes.get()),
    );
    header(
        &mut out,
        "fulcrum_config_reloads_total",
        "counter",
        "Configuration reloads, by result (ok: applied; error: refused, the old one kept serving).",
    );
    let _ = writeln!(
        out,
        "fulcrum_config_reloads_total{{result=\"ok\"}} {}",
        state.reloads.ok.get()
    );
    let _ = writeln!(
        out,
        "fulcrum_config_reloads_total{{result=\"error\"}} {}",
        state.reloads.failed.get()
    );
    header(
        &mut out,
        "fulcrum_config_generation",
        "gauge",
        "Generation of the running configuration (1 at start).",
    );
    let _ = writeln!(out, "fulcrum_config_generation {}", state.generation);
    header(
        &mut out,
        "fulcrum_ratelimit_backend_errors_total",
        "counter",
        "Round trips to the shared rate limit's Redis that failed or timed out (on_unavailable applied).",
    );
    let _ = writeln!(
        out,
        "fulcrum_ratelimit_backend_errors_total {}",
        state.ratelimit_backend_errors.get()
    );
    header(
        &mut out,
        "fulcrum_access_log_dropped_total",
        "counter",
        "Access log lines dropped because the writer fell behind (the queue was full).",
    );
    let _ = writeln!(
        out,
        "fulcrum_access_log_dropped_total {}",
        state.access_log_dropped()
    );
    out
}

/// One sample per backend (`None`: no sample for that one).
fn backend_counter(
    out: &mut String,
    state: &State,
    name: &str,
    value: impl Fn(&Upstream, &Backend) -> Option<u64>,
) {
    for u in state.upstreams() {
        for b in &u.backends {
            if let Some(value) = value(u, b) {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",backend=\"{}\"}} {value}",
                    escape(&u.name),
                    escape(&b.label),
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}
