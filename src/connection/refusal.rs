//! A connection turned away before its relay: why ([`Refusal`]), how a phase says it did not
//! pass the connection on ([`Step`]), and what stops a phase from outside ([`Stop`]).
//!
//! Phases return refusals as values; the connection's task records each one once
//! ([`Refusal::record`]): counted by reason on the listener (and, for rate-limit and authorization
//! refusals of a known identity, in the per-identity table), noted in the access log entry and
//! logged under the listener's throttle. This file neither decides to refuse nor closes the client:
//! the phases decide, and the task closes the client as the refusing phase calls for.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::accesslog::Entry;
use crate::metrics::identities::Refused;
use crate::metrics::{HandshakeFailure, Reason};
use crate::state::{Cut, CutSignal, Listener};

/// How a phase ended: the connection goes on with what the phase established, or it stops.
pub(super) enum Step<T> {
    /// On to the next phase, with this.
    Next(T),
    /// Refused: the task records it and closes the client.
    Refused(Refusal),
    /// [`Stop`]ped during the phase: by the drain deadline (nothing to record: the access log
    /// entry's outcome stays `drain_deadline`) or a cut (the task reports it).
    Aborted,
}

/// What stops a connection's phases from outside: the drain deadline, or the connection being
/// cut (closed by an operator, quarantined) through its record in the table of open connections.
#[derive(Clone, Copy)]
pub(super) struct Stop<'a> {
    pub(super) abort: &'a CancellationToken,
    pub(super) cut: &'a CutSignal,
}

impl Stop<'_> {
    /// Completes when either comes (at once if one already has). Phases select on it first
    /// (`biased`): a stopped connection makes no more progress, whatever else is ready.
    pub(super) async fn stopped(self) {
        tokio::select! {
            _ = self.abort.cancelled() => {}
            _ = self.cut.cancelled() => {}
        }
    }

    /// Why the connection was cut, if it was, unless the drain deadline has passed (which ends
    /// it as it ends every connection).
    pub(super) fn cut(self) -> Option<Cut> {
        match self.abort.is_cancelled() {
            true => None,
            false => self.cut.reason(),
        }
    }
}

/// A connection closed without being proxied: why, and the detail for the log line.
pub(super) struct Refusal {
    reason: Reason,
    /// Why the TLS handshake (or the check of a resumed session's certificate) failed.
    handshake: Option<HandshakeFailure>,
    detail: String,
    /// The client's identity, when it is known: counted in the per-identity table.
    identity: Option<Arc<str>>,
}

impl Refusal {
    pub(super) fn new(reason: Reason, detail: impl std::fmt::Display) -> Refusal {
        Refusal {
            reason,
            handshake: None,
            detail: detail.to_string(),
            identity: None,
        }
    }

    /// The refusal of a client known by `identity`.
    pub(super) fn of(mut self, identity: Arc<str>) -> Refusal {
        self.identity = Some(identity);
        self
    }

    /// A failed handshake, counted on `listener` by its cause.
    pub(super) fn handshake(
        listener: &Listener,
        failure: HandshakeFailure,
        detail: impl std::fmt::Display,
    ) -> Refusal {
        listener.handshake_failures.inc(failure);
        Refusal {
            reason: Reason::TlsHandshake,
            handshake: Some(failure),
            detail: detail.to_string(),
            identity: None,
        }
    }

    /// Counts the refusal, notes it for the access log and logs it (throttled).
    pub(super) fn record(self, listener: &Listener, entry: &mut Entry) {
        listener.rejected.inc(self.reason);
        entry.refuse(self.reason);
        let refused = match self.reason {
            Reason::RateLimited => Some(Refused::RateLimited),
            Reason::Unauthorized => Some(Refused::Unauthorized),
            _ => None,
        };
        if let (Some(identity), Some(refused)) = (&self.identity, refused) {
            listener.identities.refused(identity, refused);
        }
        if let Some(suppressed) = listener.reject_log.admit() {
            warn!(
                reason = self.reason.label(),
                tls_failure = self.handshake.map(HandshakeFailure::label),
                suppressed,
                "connection refused: {}",
                self.detail
            );
        }
    }
}
