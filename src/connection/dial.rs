//! Phase 4, the dial: a backend that answers ([`Connected`]), with the lease that counts the
//! connection against it, or why there is none.
//!
//! Backends are leased and dialed until one answers, at most `connect_attempts` distinct ones;
//! with every backend at its `max_connections` the client waits in the upstream's queue. Each
//! dial's outcome feeds the backend's health (passive detection). Selection is the balancer's and
//! the dial itself (PROXY header, TLS to the backend) is `net`'s: this file owns the attempts,
//! the queue wait and what they tell health. It never touches the client's stream.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, Span};

use super::refusal::{Refusal, Step, Stop};
use crate::accesslog::Entry;
use crate::balancer::{Choice, Lease};
use crate::health::Source;
use crate::metrics::Reason;
use crate::net::{BackendStream, Origin};
use crate::probe::record;
use crate::state::{Backend, Upstream};

/// A backend that answered, with the lease that counts this connection against it.
pub(super) struct Connected {
    pub(super) backend: BackendStream,
    pub(super) lease: Lease,
    pub(super) chosen: Arc<Backend>,
}

/// Phase 4: a backend of `upstream` for the client `origin` names (its PROXY header), unless
/// `stop` comes first (the lease of a dial or a place in the queue is then given back as it is
/// dropped). The backend answering is counted and named in the span and the access log entry.
pub(super) async fn connect(
    upstream: &Upstream,
    origin: &Origin<'_>,
    stop: Stop<'_>,
    entry: &mut Entry,
) -> Step<Connected> {
    let dialed = tokio::select! {
        biased;
        _ = stop.stopped() => return Step::Aborted,
        dialed = dial(upstream, origin) => dialed,
    };
    match dialed {
        Ok(connected) => {
            connected.chosen.connections.inc();
            Span::current().record("backend.addr", connected.chosen.label.as_str());
            entry.backend = Some(connected.chosen.label.clone());
            Step::Next(connected)
        }
        Err(reason) => Step::Refused(Refusal::new(reason, format_args!("upstream {:?}", upstream.name))),
    }
}

/// Leases and dials backends until one answers, at most `connect_attempts` distinct ones. Each
/// dial's outcome feeds the backend's health (passive detection). With no backend in rotation
/// nothing is dialed: [`Reason::NoHealthyBackend`]. With every backend at its `max_connections`,
/// the client waits in the upstream's queue (holding no lease) or is refused.
async fn dial(upstream: &Upstream, origin: &Origin<'_>) -> Result<Connected, Reason> {
    let mut tried: Vec<usize> = Vec::new();
    for _ in 0..upstream.connect_attempts {
        let lease = match upstream
            .pool
            .choose(&tried, Instant::now(), upstream.queue_size > 0)
        {
            Choice::Leased(lease) => lease,
            Choice::Full => queue(upstream, &tried).await?,
            Choice::Nothing => break,
        };
        let Some(backend) = upstream.backend(lease.index()) else {
            // A backend a reload added after this connection's generation: not ours to use.
            tried.push(lease.index());
            continue;
        };
        let dial_started = Instant::now();
        match crate::net::open(upstream, backend, origin).await {
            Ok(stream) => {
                upstream.figures.connect.observe(dial_started.elapsed());
                record(upstream, lease.index(), Source::Traffic, Ok(()));
                return Ok(Connected {
                    backend: stream,
                    lease,
                    chosen: Arc::clone(backend),
                });
            }
            Err(failure) => {
                // As health judges it: the probe room maps the dial's error.
                let failure = crate::health::Failure::from(failure);
                backend.connect_failures.inc();
                debug!(backend = %backend.label, error = %failure, "backend connect failed");
                tried.push(lease.index());
                if failure.is_local() {
                    // Out of descriptors or memory here: says nothing about the backend's health.
                    continue;
                }
                record(upstream, lease.index(), Source::Traffic, Err(failure));
            }
        }
    }
    Err(if tried.is_empty() {
        Reason::NoHealthyBackend
    } else {
        Reason::ConnectFailed
    })
}

/// Waits in the upstream's queue, behind those already waiting, for a backend below its cap:
/// at most `queue_timeout`. The rate-limit permit is already held; no lease is until served.
async fn queue(upstream: &Upstream, tried: &[usize]) -> Result<Lease, Reason> {
    let Ok(wait) = upstream.pool.wait(tried, upstream.queue_size, Instant::now()) else {
        return Err(Reason::QueueFull);
    };
    let since = Instant::now();
    let served = tokio::time::timeout(upstream.queue_timeout, wait).await;
    upstream.figures.queue.observe(since.elapsed());
    served.map_err(|_| Reason::QueueTimeout)
}
