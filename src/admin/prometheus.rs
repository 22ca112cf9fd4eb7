//! `GET /metrics`: the live state's counters, gauges and histograms, encoded by the Prometheus
//! client crate (`prometheus-client`) as OpenMetrics or as the classic text format, by `Accept`.
//!
//! On each scrape the state is read once into `Families` (plain values, no lock held on the
//! connection path), which a `prometheus-client` collector encodes. The metric names and labels
//! are a public contract: keep them (docs/operations.md lists each with its type and labels). No family is
//! labelled by client identity: identities are unbounded (they are in `/status`'s top lists).
//! This module renders; the counters live in `metrics` and in the state they count.

use std::time::UNIX_EPOCH;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::{HandshakeFailure, Histogram, Reason, Traffic};
use crate::state::fetched_crls::Outcome;
use crate::state::{Backend, State, Upstream};
use crate::tls::expiry::Scope;

/// The exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, for `Accept: application/openmetrics-text`.
    OpenMetrics,
    /// The classic Prometheus text format (0.0.4), the default.
    Text,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header (OpenMetrics only when it names it).
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Renders every metric in the classic Prometheus text format (version 0.0.4).
pub fn render(state: &State) -> String {
    render_as(state, Format::Text)
}

/// Renders every metric in `format`.
pub fn render_as(state: &State, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(families(state)));
    let mut out = String::with_capacity(16 * 1024);
    let encoded = match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
    };
    // Writing to a String cannot fail; the encoder fails only on names we never produce.
    if encoded.is_err() {
        out.clear();
    }
    out
}

/// One metric family as read from the state.
#[derive(Debug)]
struct Family {
    /// Without `_total` for counters (the encoder adds it).
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    labels: Vec<(&'static str, String)>,
    value: Value,
}

#[derive(Debug)]
enum Value {
    Int(u64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

/// The state's metrics at one scrape.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for sample in &family.samples {
                let mut encoder = metric.encode_family(&sample.labels)?;
                match (&sample.value, &family.kind) {
                    (Value::Int(v), MetricType::Counter) => {
                        encoder.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (Value::Int(v), _) => encoder.encode_gauge(v)?,
                    (Value::Histogram { sum, count, buckets }, _) => {
                        encoder.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds the families, in a fixed order.
struct Builder(Vec<Family>);

impl Builder {
    fn family(&mut self, name: &'static str, kind: MetricType, help: &'static str) -> &mut Vec<Sample> {
        self.0.push(Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        let last = self.0.len() - 1;
        &mut self.0[last].samples
    }

    fn counter(&mut self, name: &'static str, help: &'static str) -> &mut Vec<Sample> {
        self.family(name, MetricType::Counter, help)
    }

    fn gauge(&mut self, name: &'static str, help: &'static str) -> &mut Vec<Sample> {
        self.family(name, MetricType::Gauge, help)
    }

    fn histogram(&mut self, name: &'static str, help: &'static str) -> &mut Vec<Sample> {
        self.family(name, MetricType::Histogram, help)
    }
}

fn sample(labels: Vec<(&'static str, String)>, value: Value) -> Sample {
    Sample { labels, value }
}

fn histogram(h: &Histogram) -> Value {
    let (sum, count, buckets) = h.snapshot();
    Value::Histogram { sum, count, buckets }
}

/// One sample per backend (`None`: no sample for that one).
fn per_backend(samples: &mut Vec<Sample>, state: &State, value: impl Fn(&Upstream, &Backend) -> Option<u64>) {
    for u in state.upstreams() {
        for b in &u.backends {
            if let Some(v) = value(u, b) {
                samples.push(sample(backend_labels(u, b), Value::Int(v)));
            }
        }
    }
}

fn backend_labels(u: &Upstream, b: &Backend) -> Vec<(&'static str, String)> {
    vec![("upstream", u.name.clone()), ("backend", b.label.clone())]
}

/// Both directions of `traffic`, with `labels` and `direction`.
fn directions(samples: &mut Vec<Sample>, labels: Vec<(&'static str, String)>, traffic: &Traffic) {
    for (direction, counter) in [("up", &traffic.up), ("down", &traffic.down)] {
        let mut labels = labels.clone();
        labels.push(("direction", direction.to_string()));
        samples.push(sample(labels, Value::Int(counter.get())));
    }
}

fn families(state: &State) -> Families {
    let mut b = Builder(Vec::with_capacity(40));
    let listener = |name: &str| vec![("listener", name.to_string())];
    let upstream = |name: &str| vec![("upstream", name.to_string())];

    let s = b.counter("fulcrum_connections", "Connections accepted, per listener.");
    for l in state.listeners() {
        s.push(sample(listener(&l.name), Value::Int(l.accepted.get())));
    }
    let s = b.gauge(
        "fulcrum_listener_open_connections",
        "Connections of each listener open now (handshaking, queued or proxied).",
    );
    for l in state.listeners() {
        s.push(sample(listener(&l.name), Value::Int(l.open.get() as u64)));
    }
    let s = b.counter(
        "fulcrum_connections_rejected",
        "Connections closed without being proxied, per listener and reason.",
    );
    for l in state.listeners() {
        for reason in Reason::ALL {
            let mut labels = listener(&l.name);
            labels.push(("reason", reason.label().to_string()));
            s.push(sample(labels, Value::Int(l.rejected.get(reason))));
        }
    }
    let s = b.counter(
        "fulcrum_authorization_shadow",
        "Admissions judged by a shadow authorization table, per listener, upstream and what it would have decided.",
    );
    for l in state.listeners() {
        for (upstream, would_allow, count) in l.shadow.counts() {
            let mut labels = listener(&l.name);
            labels.push(("upstream", upstream));
            let outcome = if would_allow { "would_allow" } else { "would_deny" };
            labels.push(("outcome", outcome.to_string()));
            s.push(sample(labels, Value::Int(count)));
        }
    }
    let s = b.counter(
        "fulcrum_tls_handshake_failures",
        "Failed TLS handshakes (and refused resumed sessions) on TLS listeners, per listener and reason.",
    );
    for l in state.listeners().filter(|l| l.tls.is_some()) {
        for failure in HandshakeFailure::ALL {
            let mut labels = listener(&l.name);
            labels.push(("reason", failure.label().to_string()));
            s.push(sample(labels, Value::Int(l.handshake_failures.get(failure))));
        }
    }
    let s = b.histogram(
        "fulcrum_tls_handshake_duration_seconds",
        "Completed TLS handshakes on TLS listeners, from the first byte awaited to the handshake's end.",
    );
    for l in state.listeners().filter(|l| l.tls.is_some()) {
        s.push(sample(listener(&l.name), histogram(&l.figures.handshake)));
    }
    let s = b.histogram(
        "fulcrum_connection_duration_seconds",
        "Proxied connections that ended, from accept to close, per listener.",
    );
    for l in state.listeners() {
        s.push(sample(listener(&l.name), histogram(&l.figures.duration)));
    }
    let s = b.counter(
        "fulcrum_bytes",
        "Bytes proxied per listener, counted as they move; direction up is client to backend, down backend to client.",
    );
    for l in state.listeners() {
        directions(s, listener(&l.name), &l.figures.bytes);
    }
    let s = b.gauge(
        "fulcrum_backend_active_connections",
        "Connections currently counted against each backend (from selection until both directions close).",
    );
    // By slot: a reload that removes a backend leaves its slot behind.
    per_backend(s, state, |u, b| Some(u64::from(u.pool.active(b.slot))));
    let s = b.gauge(
        "fulcrum_backend_weight",
        "Each backend's weight now (as configured, or as set through the admin API).",
    );
    per_backend(s, state, |u, b| Some(u64::from(u.pool.weight(b.slot))));
    let s = b.gauge(
        "fulcrum_backend_max_connections",
        "Each capped backend's max_connections (backends without a cap have no sample).",
    );
    per_backend(s, state, |u, b| {
        u.pool.spec(b.slot)?.max_connections.map(u64::from)
    });
    let s = b.gauge(
        "fulcrum_upstream_queue_length",
        "Clients waiting now in each upstream's queue for a backend below its max_connections.",
    );
    for u in state.upstreams() {
        s.push(sample(upstream(&u.name), Value::Int(u.pool.waiting() as u64)));
    }
    let s = b.histogram(
        "fulcrum_upstream_queue_wait_seconds",
        "Time clients spent in each upstream's queue, sum and count only (kept for compatibility; see fulcrum_queue_wait_seconds).",
    );
    for u in state.upstreams() {
        let (sum, count, _) = u.figures.queue.snapshot();
        let buckets = vec![(f64::INFINITY, count)];
        s.push(sample(
            upstream(&u.name),
            Value::Histogram { sum, count, buckets },
        ));
    }
    let s = b.histogram(
        "fulcrum_queue_wait_seconds",
        "Time clients spent in each upstream's queue (waits that ended: served or timed out).",
    );
    for u in state.upstreams() {
        s.push(sample(upstream(&u.name), histogram(&u.figures.queue)));
    }
    let s = b.histogram(
        "fulcrum_backend_connect_duration_seconds",
        "Successful dials to each upstream's backends, until the connection (and backend TLS) is ready.",
    );
    for u in state.upstreams() {
        s.push(sample(upstream(&u.name), histogram(&u.figures.connect)));
    }
    let s = b.counter(
        "fulcrum_dns_resolutions",
        "Resolutions of each discovering upstream's name, by outcome (ok; empty or failed: the last good set stayed).",
    );
    for u in state.upstreams().filter(|u| u.discover.is_some()) {
        let outcomes = state.discovered.outcomes(&u.name);
        for (outcome, counter) in [
            ("ok", &outcomes.ok),
            ("empty", &outcomes.empty),
            ("failed", &outcomes.failed),
        ] {
            let mut labels = upstream(&u.name);
            labels.push(("outcome", outcome.to_string()));
            s.push(sample(labels, Value::Int(counter.get())));
        }
    }
    let s = b.counter(
        "fulcrum_crl_fetches",
        "Fetches of each listener's CRL URLs, by outcome (updated, unchanged; failed or refused: the last good CRL stayed).",
    );
    let fetching = state
        .config
        .listeners
        .iter()
        .filter(|l| l.tls.as_ref().is_some_and(|t| t.crl_fetch.is_some()));
    for l in fetching {
        let outcomes = state.fetched_crls.outcomes(&l.name);
        for outcome in Outcome::ALL {
            let labels = vec![
                ("listener", l.name.clone()),
                ("outcome", outcome.label().to_string()),
            ];
            s.push(sample(labels, Value::Int(outcomes.of(outcome).get())));
        }
    }
    let counted = [
        (
            "fulcrum_workload_api_updates",
            "Deliveries of the SPIFFE Workload API that changed the SVIDs or bundles in use (each applied without a reload).",
            &state.workload.updates,
        ),
        (
            "fulcrum_workload_api_reconnects",
            "Times the SPIFFE Workload API connection was lost and retried with backoff (the last SVIDs and bundles stayed in use).",
            &state.workload.reconnects,
        ),
        (
            "fulcrum_workload_api_errors",
            "SPIFFE Workload API errors: failed calls, broken streams, refused or withdrawn deliveries.",
            &state.workload.errors,
        ),
    ];
    for (name, help, counter) in counted {
        let s = b.counter(name, help);
        if state.config.uses_spiffe() {
            s.push(sample(Vec::new(), Value::Int(counter.get())));
        }
    }
    let s = b.counter(
        "fulcrum_backend_connections",
        "Connections proxied to each backend (connect succeeded).",
    );
    per_backend(s, state, |_, b| Some(b.connections.get()));
    let s = b.counter(
        "fulcrum_backend_connect_failures",
        "Failed dials (refused, unreachable or timed out), per backend.",
    );
    per_backend(s, state, |_, b| Some(b.connect_failures.get()));
    let s = b.counter(
        "fulcrum_backend_bytes",
        "Bytes proxied per backend, counted as they move; direction up is client to backend, down backend to client.",
    );
    for u in state.upstreams() {
        for backend in &u.backends {
            directions(s, backend_labels(u, backend), &backend.bytes);
        }
    }
    let s = b.gauge(
        "fulcrum_backend_up",
        "1 if the backend is in rotation by health checks, 0 if marked down.",
    );
    per_backend(s, state, |_, b| Some(u64::from(b.is_up())));
    let s = b.counter(
        "fulcrum_backend_health_transitions",
        "Health state changes per backend, by the state entered.",
    );
    for u in state.upstreams() {
        for backend in &u.backends {
            for (to, count) in [
                ("up", &backend.health.went_up),
                ("down", &backend.health.went_down),
            ] {
                let mut labels = backend_labels(u, backend);
                labels.push(("to", to.to_string()));
                s.push(sample(labels, Value::Int(count.get())));
            }
        }
    }
    let s = b.gauge(
        "fulcrum_backend_admin_state",
        "1 for the admin state an operator set for the backend (ready, drain, maint), 0 for the others.",
    );
    for u in state.upstreams() {
        for backend in &u.backends {
            let current = backend.health.admin_state();
            for admin in crate::health::AdminState::ALL {
                let mut labels = backend_labels(u, backend);
                labels.push(("state", admin.label().to_string()));
                s.push(sample(labels, Value::Int(u64::from(admin == current))));
            }
        }
    }
    let s = b.counter(
        "fulcrum_backend_admin_state_changes",
        "Admin state changes of each backend (POST /upstreams/{upstream}/backends/{backend}/state).",
    );
    per_backend(s, state, |_, b| Some(b.health.admin_changes.get()));
    let s = b.gauge(
        "fulcrum_certificate_not_after_timestamp_seconds",
        "When each certificate expires (UNIX seconds): a listener's server certificate, the earliest of its client CA bundle, the earliest nextUpdate of its CRLs; an upstream's backend CA and client certificate; Redis's CA and client certificate.",
    );
    for cert in &state.certificates {
        let mut labels = match &cert.scope {
            Scope::Listener(name) => listener(name),
            Scope::Upstream(name) => upstream(name),
            Scope::Redis => Vec::new(),
        };
        labels.extend(cert.certificate.iter().map(|c| ("certificate", c.clone())));
        labels.push(("kind", cert.kind.to_string()));
        let at = cert
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        s.push(sample(labels, Value::Int(at)));
    }
    let s = b.counter(
        "fulcrum_config_reloads",
        "Configuration reloads, by result (ok: applied; error: refused, the old one kept serving).",
    );
    for (result, count) in [("ok", &state.reloads.ok), ("error", &state.reloads.failed)] {
        s.push(sample(
            vec![("result", result.to_string())],
            Value::Int(count.get()),
        ));
    }
    let s = b.gauge(
        "fulcrum_config_generation",
        "Generation of the running configuration (1 at start).",
    );
    s.push(sample(Vec::new(), Value::Int(state.generation)));
    let s = b.counter(
        "fulcrum_ratelimit_backend_errors",
        "Round trips to the shared rate limit's Redis that failed or timed out (on_unavailable applied).",
    );
    s.push(sample(
        Vec::new(),
        Value::Int(state.ratelimit_backend_errors.get()),
    ));
    let s = b.gauge(
        "fulcrum_quarantined",
        "Identities and certificate serials quarantined now (this instance's and the cluster's).",
    );
    let quarantined = state.quarantine.lock().list(std::time::SystemTime::now()).count();
    s.push(sample(Vec::new(), Value::Int(quarantined as u64)));
    let s = b.counter(
        "fulcrum_quarantine_sync_errors",
        "Rounds of the quarantine's sync with the cluster's Redis that failed or timed out.",
    );
    s.push(sample(Vec::new(), Value::Int(state.quarantine.sync_errors.get())));
    let s = b.counter(
        "fulcrum_access_log_dropped",
        "Access log lines dropped because the writer fell behind (the queue was full).",
    );
    s.push(sample(Vec::new(), Value::Int(state.access_log_dropped())));
    let s = b.counter(
        "fulcrum_log_dropped",
        "Log lines (stderr) dropped because the writer fell behind; connections never wait for the log.",
    );
    s.push(sample(Vec::new(), Value::Int(crate::logging::dropped())));
    Families(b.0)
}
