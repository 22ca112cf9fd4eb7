//! Phase 3, the limits, and every count a connection takes: its places in the `max_connections`
//! caps ([`take_places`], before any handshake), its place among its source's connections in a
//! handshake ([`in_handshake`], for the front and admission), the per-client rate limit
//! ([`limit`]) and what it holds until it ends ([`Held`]).
//!
//! The counts are RAII values: giving one back is dropping it, so no path can leak one. The
//! rules themselves (caps, windows, shares) live in `caps` and `ratelimit`; this file only takes
//! and holds. It dials nothing and reads no byte from the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::refusal::Refusal;
use crate::accesslog::Entry;
use crate::balancer::Lease;
use crate::caps::{InHandshake, Place};
use crate::metrics::identities::OpenIdentity;
use crate::metrics::Reason;
use crate::ratelimit::{ClientKey, Decision as Limit, Permit};
use crate::state::{Listener, Live, State};

/// A connection's places in the process's and its listener's `max_connections`.
pub(crate) type Places = (Place, Place);

/// Takes the places a new connection of `listener` needs, or refuses it at once, before any
/// handshake: counted (`max_connections`), logged (throttled) and written to the access log.
pub(crate) fn take_places(
    live: &Live,
    state: &State,
    listener: &Listener,
    peer: SocketAddr,
) -> Option<Places> {
    let taken = listener
        .open
        .take(listener.max_connections.unwrap_or(usize::MAX))
        .and_then(|in_listener| Some((live.open.take(state.max_connections)?, in_listener)));
    if taken.is_none() {
        let mut entry = Entry::new(&listener.name, peer);
        let cap = match listener.max_connections {
            Some(cap) if listener.open.get() >= cap => format!("listener max_connections ({cap})"),
            _ => format!("process max_connections ({})", state.max_connections),
        };
        Refusal::new(Reason::MaxConnections, format_args!("{cap} reached")).record(listener, &mut entry);
        if let Some(log) = &listener.access_log {
            log.send(entry);
        }
    }
    taken
}

/// Counts the connection among `peer`'s source's connections in a handshake phase, or refuses
/// it when `max_handshakes_per_source` already are.
pub(super) fn in_handshake(listener: &Listener, peer: SocketAddr) -> Result<InHandshake, Refusal> {
    let source = listener.prefixes.mask(peer.ip());
    listener
        .handshakes
        .enter(source, listener.max_handshakes_per_source)
        .ok_or_else(|| {
            let detail = format_args!(
                "{} connections from {source} are already in their handshake",
                listener.max_handshakes_per_source
            );
            Refusal::new(Reason::HandshakeLimit, detail)
        })
}

/// What the limit phase takes, held until the connection ends (in [`Held`]).
pub(super) struct Limited {
    permit: Option<Permit>,
    open: Option<OpenIdentity>,
}

/// Phase 3: the client's rate limit (none on a listener without one), by `key`: the identity on
/// mTLS listeners, the source IP otherwise. Past it, an identified client's connection counts
/// among its identity's open connections until it ends.
pub(super) async fn limit(listener: &Listener, key: &ClientKey) -> Result<Limited, Refusal> {
    let permit = match &listener.limiter {
        None => None,
        Some(limiter) => match limiter.check(key, Instant::now()).await {
            Limit::Allow(permit) => Some(permit),
            Limit::Reject(why) => {
                let refusal = Refusal::new(Reason::RateLimited, format_args!("client {key}: {why}"));
                return Err(match key {
                    ClientKey::Identity(identity) => refusal.of(Arc::clone(identity)),
                    ClientKey::Ip(_) => refusal,
                });
            }
        },
    };
    let open = match key {
        ClientKey::Identity(identity) => Some(listener.identities.open(identity)),
        ClientKey::Ip(_) => None,
    };
    Ok(Limited { permit, open })
}

/// The counts a connection holds until it ends, given back in this order ([`Held::release`]).
pub(super) struct Held {
    /// The rate-limit concurrency slot first: once the backend count reads zero, the client may
    /// reconnect.
    permit: Option<Permit>,
    lease: Lease,
    open: Option<OpenIdentity>,
}

impl Held {
    /// The limit phase's counts with the backend's `lease` from the dial.
    pub(super) fn new(limited: Limited, lease: Lease) -> Held {
        let Limited { permit, open } = limited;
        Held { permit, lease, open }
    }

    /// Gives the counts back, in the order of the fields.
    pub(super) fn release(self) {
        let Held { permit, lease, open } = self;
        drop(permit);
        drop(lease);
        drop(open);
    }
}
