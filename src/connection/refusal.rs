//! A connection turned away before its relay: why ([`Refusal`]), and how a phase says it did not
//! pass the connection on ([`Step`]).
//!
//! Phases return refusals as values; the connection's task records each one once
//! ([`Refusal::record`]): counted by reason on the listener (and, for rate-limit and authorization
//! refusals of a known identity, in the per-identity table), noted in the access log entry and
//! logged under the listener's throttle. This file neither decides to refuse nor closes the client:
//! the phases decide, and the task closes the client as the refusing phase calls for.

use std::sync::Arc;

use tracing::warn;

use crate::accesslog::Entry;
use crate::metrics::identities::Refused;
use crate::metrics::{HandshakeFailure, Reason};
use crate::state::Listener;

/// How a phase ended: the connection goes on with what the phase established, or it stops.
pub(super) enum Step<T> {
    /// On to the next phase, with this.
    Next(T),
    /// Refused: the task records it and closes the client.
    Refused(Refusal),
    /// The drain deadline passed during the phase: nothing to record (the access log entry's
    /// outcome stays `drain_deadline`).
    Aborted,
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
