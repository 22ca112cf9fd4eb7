//! Phase 1, the front: who the client is, by its address ([`Who`]).
//!
//! On a listener that accepts the PROXY protocol the client is the header's source: headers are
//! read only from `trusted_proxies` (others are refused before a byte is read), at most
//! `max_handshakes_per_source` at once from one real peer, by the connection's handshake
//! deadline. Elsewhere the client is the peer. This phase reads nothing past the header: the TLS
//! handshake and everything that judges the client belong to admission.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{field, Span};

use super::limits::in_handshake;
use super::refusal::{Refusal, Step, Stop};
use crate::accesslog::Entry;
use crate::metrics::Reason;
use crate::net::Origin;
use crate::proxy_protocol::SslInfo;
use crate::ratelimit::ClientKey;
use crate::state::{Listener, Registration};

/// Who the client is, as far as the phases after the front need to know: its address from the
/// front, the rest from admission.
pub(super) struct Who {
    /// Rate-limit key: the identity on mTLS listeners, else the source IP.
    pub(super) key: ClientKey,
    /// The client's address (from the PROXY header when the listener accepts one).
    pub(super) addr: SocketAddr,
    /// The address the client connected to.
    pub(super) local: SocketAddr,
    /// Registration of an authorized mTLS connection, for revocation on reload.
    pub(super) registration: Option<Registration>,
    /// The client's TLS session, for a PROXY v2 header to the backend.
    pub(super) ssl: Option<SslInfo>,
    /// The server name the client asked for (SNI).
    pub(super) authority: Option<String>,
}

impl Who {
    /// The client as a PROXY header to its backend names it.
    pub(super) fn origin(&self) -> Origin<'_> {
        Origin {
            addr: self.addr,
            local: self.local,
            ssl: self.ssl.as_ref(),
            authority: self.authority.as_deref(),
        }
    }
}

/// Phase 1: the client's address, by `deadline` (the PROXY header's and the TLS handshake's
/// together), unless `stop` comes first. A header's source becomes the span's `client.addr` and
/// the access log's `client`.
pub(super) async fn front(
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    deadline: tokio::time::Instant,
    stop: Stop<'_>,
    entry: &mut Entry,
) -> Step<Who> {
    // A socket bound to one address is reached at it: no system call to ask.
    let local = if listener.bind.ip().is_unspecified() {
        client.local_addr().unwrap_or(peer)
    } else {
        listener.bind
    };
    let addr = if listener.accept_proxy_protocol {
        let source = match source(client, peer, listener, deadline, stop).await {
            Step::Next(source) => source,
            Step::Refused(refusal) => return Step::Refused(refusal),
            Step::Aborted => return Step::Aborted,
        };
        Span::current().record("client.addr", field::display(source));
        entry.client = source;
        source
    } else {
        peer
    };
    if !listener.admits_source(addr.ip()) {
        let detail = format_args!("{} is refused by allow_from/deny_from", addr.ip());
        return Step::Refused(Refusal::new(Reason::SourceDenied, detail));
    }
    Step::Next(Who {
        key: ClientKey::from_ip(listener.prefixes.mask(addr.ip())),
        addr,
        local,
        registration: None,
        ssl: None,
        authority: None,
    })
}

/// The PROXY header's source, on a listener that accepts one: only from `trusted_proxies`, at
/// most `max_handshakes_per_source` headers at once from one real peer (the TLS handshake that
/// follows is counted against the source the header names).
async fn source(
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    deadline: tokio::time::Instant,
    stop: Stop<'_>,
) -> Step<SocketAddr> {
    if !listener.trusted_proxies.iter().any(|net| net.contains(peer.ip())) {
        let detail = format_args!("{} is not in trusted_proxies", peer.ip());
        return Step::Refused(Refusal::new(Reason::UntrustedProxy, detail));
    }
    // While the header is read the source is not known yet: the real peer holds the place.
    let _in_header = match in_handshake(listener, peer) {
        Ok(place) => place,
        Err(refusal) => return Step::Refused(refusal),
    };
    let header = tokio::select! {
        biased;
        _ = stop.stopped() => return Step::Aborted,
        header = Box::pin(crate::proxy_protocol::reader::read_header(client, deadline)) => header,
    };
    match header {
        // LOCAL or an unsupported family: the front's own connection, keep its address.
        Ok(header) => Step::Next(header.source.unwrap_or(peer)),
        Err(e) => Step::Refused(Refusal::new(Reason::ProxyHeader, e)),
    }
}
