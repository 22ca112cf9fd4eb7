//! One client connection's life, from accept to the closing log line, as named phases.
//!
//! Each phase returns a value that says how the connection goes on, or why it ends:
//! 1. [`front`]: reading the front, the PROXY header on listeners that accept one (its source is
//!    then the client for everything after);
//! 2. [`admit`]: admission on TLS listeners: the handshake under the listener's deadline, then,
//!    judged against the generation live at that moment, the upstream (SNI or the listener's),
//!    the client identity from the verified certificate (verified again for a resumed session),
//!    and the authorization of that identity for that upstream (mTLS; default deny).
//!    [`Admission`] is admitted (and registered for revocation and expiry) or refused;
//! 3. [`limit`]: the per-client rate limit (key: identity on mTLS listeners, source IP
//!    otherwise), a [`Permit`] held for the whole connection;
//! 4. [`connect`]: pick a backend and dial it, trying the next least-loaded one on refusal or
//!    timeout; each dial's outcome feeds the backend's health (passive detection);
//! 5. [`relay`]: bytes both ways until both sides end, the drain deadline, the backend being
//!    marked down (`on_down = "close"`), the access being revoked or the client certificate
//!    expiring: an [`End`], whose label is the `end` field of the closing log line.
//!
//! Then one summary log line and one access log entry (see [`crate::accesslog`]) for every
//! connection, refused ones included (with interim entries of long connections from the relay's
//! meter); the handshake, connect and connection-duration histograms, the byte counters (as bytes
//! move) and the per-identity table are fed as the phases go. No backend is dialed before phases
//! 1-3 pass. The backend
//! lease and the rate-limit permit are held for the whole connection, so counts are exact on
//! every path. Failures end this connection only and are logged once, here. This module owns the
//! order of the phases; their substance lives in tls, identity, authz, ratelimit, balancer, net
//! and proxy.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, info_span, warn, Instrument, Span};

use crate::accesslog::Entry;
use crate::authz::Decision as Authz;
use crate::balancer::{Choice, Lease};
use crate::caps::{InHandshake, Place};
use crate::config::OnDown;
use crate::health::probe::record;
use crate::health::{AdminState, Source};
use crate::metrics::identities::Refused;
use crate::metrics::{HandshakeFailure, Reason};
use crate::net::{BackendStream, Origin};
use crate::proxy::{relay_tcp, Meter, Progress, RelayError, Side, Timeout, Timeouts};
use crate::proxy_protocol::SslInfo;
use crate::ratelimit::{ClientKey, Decision as Limit, Permit};
use crate::state::{Backend, Cut, Grant, Listener, Live, Registration, State, Upstream};
use crate::tls::ServerTls;

/// Deadline for writing a refusal (reject response, TLS close_notify) to a client.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);

/// Serves one accepted client connection to completion. Never panics on peer input; every wait
/// on a peer is bounded by a deadline or by `abort` (the drain deadline).
// Not an `async fn`: its future would keep a second copy of every argument beside the captured
// one for the connection's whole life (the future sits in the task of every open connection).
// The setup's box is made here, so the task does not carry the client socket and address either.
pub(crate) fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    live: Arc<Live>,
    place: Places,
    abort: CancellationToken,
) -> impl Future<Output = ()> {
    let span = info_span!(
        "conn",
        client.addr = %peer,
        listener = %listener.name,
        client.id = field::Empty,
        upstream = field::Empty,
        backend.addr = field::Empty,
        alpn = field::Empty,
    );
    let started = Instant::now();
    // Setup (front, handshake, admission, limit, dial) runs in a box of its own, freed once it is
    // done: an idle connection's task then holds only what its relay needs.
    let setup = Box::pin(setup(
        client,
        peer,
        Arc::clone(&listener),
        live,
        abort.clone(),
        started,
    ));
    // The span covers the whole task, held once.
    async move {
        let (proxied, entry) = setup.await;
        // Without an access log the entry is not kept while the connection is open.
        let mut entry = listener.access_log.is_some().then_some(entry);
        if let Some(proxied) = proxied {
            proxied.run(&abort, started, entry.as_deref_mut()).await;
        }
        // The connection's places in the process's and the listener's caps, given back now.
        drop(place);
        if let (Some(log), Some(mut entry)) = (&listener.access_log, entry) {
            entry.duration = started.elapsed();
            log.send(*entry);
        }
    }
    .instrument(span)
}

/// A connection's setup, owning what it needs (it runs in its own box): socket options, then
/// [`serve`]. Gives back the relay to run, if any, and the access log entry.
async fn setup(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    live: Arc<Live>,
    abort: CancellationToken,
    started: Instant,
) -> (Option<Box<Proxied>>, Box<Entry>) {
    let _ = client.set_nodelay(true);
    if let Some(settings) = &listener.tcp_keepalive {
        let _ = crate::net::keepalive(&client, settings);
    }
    // Boxed: the entry is large and an idle connection's task should not carry it inline.
    let mut entry = Box::new(Entry::new(&listener.name, peer));
    let proxied = serve(client, peer, &listener, &live, &abort, started, &mut entry).await;
    (proxied, entry)
}

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

/// A connection closed without being proxied: why, and the detail for the log line.
struct Refusal {
    reason: Reason,
    /// Why the TLS handshake (or the check of a resumed session's certificate) failed.
    handshake: Option<HandshakeFailure>,
    detail: String,
    /// The client's identity, when it is known: counted in the per-identity table.
    identity: Option<Arc<str>>,
}

impl Refusal {
    fn new(reason: Reason, detail: impl std::fmt::Display) -> Refusal {
        Refusal {
            reason,
            handshake: None,
            detail: detail.to_string(),
            identity: None,
        }
    }

    /// The refusal of a client known by `identity`.
    fn of(mut self, identity: Arc<str>) -> Refusal {
        self.identity = Some(identity);
        self
    }

    /// A failed handshake, counted on `listener` by its cause.
    fn handshake(listener: &Listener, failure: HandshakeFailure, detail: impl std::fmt::Display) -> Refusal {
        listener.handshake_failures.inc(failure);
        Refusal {
            reason: Reason::TlsHandshake,
            handshake: Some(failure),
            detail: detail.to_string(),
            identity: None,
        }
    }

    /// Counts the refusal, notes it for the access log and logs it (throttled).
    fn record(self, listener: &Listener, entry: &mut Entry) {
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

/// Phases 1-4; `Some` when a backend answered and the relay can start.
async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: &Arc<Listener>,
    live: &Live,
    abort: &CancellationToken,
    started: Instant,
    entry: &mut Entry,
) -> Option<Box<Proxied>> {
    let local = client.local_addr().unwrap_or(peer);
    // One deadline for the PROXY header and the TLS handshake together.
    let deadline = crate::clock::later(
        tokio::time::Instant::from_std(started),
        listener.handshake_timeout,
    );
    let peer = match front(&mut client, peer, listener, deadline, abort).await {
        Some(Ok(peer)) => peer,
        Some(Err(refusal)) => {
            refusal.record(listener, entry);
            return None;
        }
        None => return None,
    };
    if listener.accept_proxy_protocol {
        Span::current().record("client.addr", field::display(peer));
        entry.client = peer;
    }
    let who = Who {
        key: ClientKey::from_ip(listener.prefixes.mask(peer.ip())),
        addr: peer,
        local,
        registration: None,
        ssl: None,
        authority: None,
    };
    let Some(tls) = &listener.tls else {
        let upstream = Arc::clone(&listener.upstream);
        return prepare(
            Client::Plain(client),
            Arc::clone(listener),
            upstream,
            who,
            abort,
            started,
            entry,
        )
        .await;
    };
    match admit(client, tls, listener, live, who, deadline, abort, entry).await {
        Admission::Admitted(admitted) => {
            let Admitted {
                client,
                listener,
                upstream,
                who,
            } = *admitted;
            prepare(
                Client::Tls(client),
                listener,
                upstream,
                who,
                abort,
                started,
                entry,
            )
            .await
        }
        Admission::Refused { refusal, client } => {
            refusal.record(listener, entry);
            if let Some(mut client) = client {
                close_tls(&mut client).await;
            }
            None
        }
        Admission::Aborted => None,
    }
}

/// Phase 1: the PROXY header on listeners that accept one, whose source is then the client:
/// only from `trusted_proxies` (others are refused before a byte is read), at most
/// `max_handshakes_per_source` headers at once from one real peer (the TLS handshake that
/// follows is counted against the source the header names); by `deadline`.
/// `None` when the drain deadline cut it short.
async fn front(
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    deadline: tokio::time::Instant,
    abort: &CancellationToken,
) -> Option<Result<SocketAddr, Refusal>> {
    if !listener.accept_proxy_protocol {
        return Some(Ok(peer));
    }
    if !listener.trusted_proxies.iter().any(|net| net.contains(peer.ip())) {
        let detail = format_args!("{} is not in trusted_proxies", peer.ip());
        return Some(Err(Refusal::new(Reason::UntrustedProxy, detail)));
    }
    // While the header is read the source is not known yet: the real peer holds the place.
    let _in_header = match in_handshake(listener, peer) {
        Ok(place) => place,
        Err(refusal) => return Some(Err(refusal)),
    };
    let header = tokio::select! {
        _ = abort.cancelled() => return None,
        header = Box::pin(crate::proxy_protocol::reader::read_header(client, deadline)) => header,
    };
    Some(match header {
        // LOCAL or an unsupported family: the front's own connection, keep its address.
        Ok(header) => Ok(header.source.unwrap_or(peer)),
        Err(e) => Err(Refusal::new(Reason::ProxyHeader, e)),
    })
}

/// Counts the connection among `peer`'s source's connections in a handshake phase, or refuses
/// it when `max_handshakes_per_source` already are.
fn in_handshake(listener: &Listener, peer: SocketAddr) -> Result<InHandshake, Refusal> {
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

/// Who the client is, as far as the phases after admission need to know.
struct Who {
    /// Rate-limit key: the identity on mTLS listeners, else the source IP.
    key: ClientKey,
    /// The client's address (from the PROXY header when the listener accepts one).
    addr: SocketAddr,
    /// The address the client connected to.
    local: SocketAddr,
    /// Registration of an authorized mTLS connection, for revocation on reload.
    registration: Option<Registration>,
    /// The client's TLS session, for a PROXY v2 header to the backend.
    ssl: Option<SslInfo>,
    /// The server name the client asked for (SNI).
    authority: Option<String>,
}

/// A client through admission, on its way to the limit and a backend.
struct Admitted {
    client: Box<TlsStream<TcpStream>>,
    /// The listener as the generation live at admission has it.
    listener: Arc<Listener>,
    upstream: Arc<Upstream>,
    who: Who,
}

/// The outcome of admission on a TLS listener.
enum Admission {
    /// Boxed: it carries a TLS session, and the future of every connection would carry its size.
    Admitted(Box<Admitted>),
    /// Refused; with the stream when the handshake completed, so that it can be closed cleanly.
    Refused {
        refusal: Refusal,
        client: Option<Box<TlsStream<TcpStream>>>,
    },
    /// The drain deadline passed during the handshake.
    Aborted,
}

/// Phase 2: handshake -> identity -> authorization, judged against the generation live once
/// the handshake is done (not the one live at accept). An authorized mTLS connection is
/// registered, so that a reload removing its access, or its certificate's expiry, closes it.
#[allow(clippy::too_many_arguments)] // each is one thing the phase reads; a struct would only rename them
async fn admit(
    client: TcpStream,
    tls: &ServerTls,
    listener: &Listener,
    live: &Live,
    mut who: Who,
    deadline: tokio::time::Instant,
    abort: &CancellationToken,
    entry: &mut Entry,
) -> Admission {
    let refused = |refusal, client| Admission::Refused { refusal, client };
    // Counted until the handshake is over (this function returns).
    let _in_handshake = match in_handshake(listener, who.addr) {
        Ok(place) => place,
        Err(refusal) => return refused(refusal, None),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
    let handshake_started = Instant::now();
    let handshake = tokio::select! {
        _ = abort.cancelled() => return Admission::Aborted,
        handshake = Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(client))) => handshake,
    };
    let client = match handshake {
        Ok(Ok(stream)) => {
            listener.figures.handshake.observe(handshake_started.elapsed());
            Box::new(stream)
        }
        Ok(Err(e)) => {
            let failure = crate::tls::classify_io(&e);
            let refusal = match crate::tls::rejection_of(&e) {
                Some(rejection) => Refusal::handshake(listener, failure, rejection),
                None => Refusal::handshake(listener, failure, e),
            };
            return refused(refusal, None);
        }
        Err(_) => {
            let refusal =
                Refusal::handshake(listener, HandshakeFailure::Timeout, "handshake deadline passed");
            return refused(refusal, None);
        }
    };
    let (_, session) = client.get_ref();
    who.authority = session.server_name().map(str::to_string);
    entry.sni.clone_from(&who.authority);
    // rustls speaks nothing else.
    let version = session.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLSv1.3",
    });
    entry.tls_version = version;
    who.ssl = Some(SslInfo {
        verified: listener.mutual_tls,
        client_cert: listener.mutual_tls,
        version: version.map(str::to_string),
        cipher: session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite())),
        cn: None,
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
    });
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    if let Some(protocol) = &alpn {
        let shown = String::from_utf8_lossy(protocol);
        Span::current().record("alpn", field::display(&shown));
        entry.alpn = Some(shown.into_owned());
    }
    let presented = Presented {
        chain: session
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
        resumed: session.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        server_name: who.authority.as_deref(),
        alpn: alpn.as_deref(),
        handshake_tls: tls,
        accepted_by: listener,
    };
    let current = live.state();
    let first = presented.judge(&current);
    let (judged, registration) = match live.admit(current.generation, first, |now| presented.judge(now)) {
        Ok(admitted) => admitted,
        Err(refusal) => return refused(refusal, Some(client)),
    };
    entry.upstream = Some(judged.upstream.name.clone());
    if let Some((serial, not_after)) = judged.certificate {
        entry.client_serial = Some(serial);
        entry.client_not_after = Some(not_after);
    }
    if let Some(identity) = judged.identity {
        Span::current().record("client.id", field::display(&identity));
        entry.identity = Some(identity.to_string());
        if let Some(ssl) = &mut who.ssl {
            ssl.cn = Some(identity.to_string());
        }
        who.key = ClientKey::Identity(identity.into());
    }
    who.registration = registration;
    Admission::Admitted(Box::new(Admitted {
        client,
        listener: judged.listener,
        upstream: judged.upstream,
        who,
    }))
}

/// What a finished handshake established, to be judged against a generation.
struct Presented<'a> {
    /// The client's certificate chain, leaf first (empty without client authentication).
    chain: Vec<CertificateDer<'static>>,
    /// Whether the session was resumed: rustls then checked no certificate.
    resumed: bool,
    server_name: Option<&'a str>,
    /// The protocol negotiated by ALPN.
    alpn: Option<&'a [u8]>,
    /// The TLS configuration the handshake ran with (the accepting generation's).
    handshake_tls: &'a ServerTls,
    accepted_by: &'a Listener,
}

/// Admission's verdict: where the connection goes, and who it is.
struct Judged {
    listener: Arc<Listener>,
    upstream: Arc<Upstream>,
    identity: Option<crate::identity::ClientIdentity>,
    /// The client certificate's serial and `notAfter` (mTLS), for the access log.
    certificate: Option<(String, std::time::SystemTime)>,
}

impl Presented<'_> {
    /// Judges the client by `state`: its listener there (gone: refused), the route, and on mTLS
    /// listeners the certificate (again, if the session was resumed or the listener's trust
    /// changed since the handshake), the identity and its authorization. Pure but for counting
    /// handshake failures.
    fn judge(&self, state: &State) -> Result<(Judged, Option<Grant>), Refusal> {
        let name = &self.accepted_by.name;
        let Some(listener) = state.listener(name) else {
            return Err(Refusal::new(
                Reason::Unauthorized,
                "its listener was removed by a reload",
            ));
        };
        if listener.alpn_required && self.alpn.is_none() {
            let detail = "the client offered no ALPN protocol (alpn_required)";
            return Err(Refusal::handshake(listener, HandshakeFailure::NoAlpn, detail));
        }
        let upstream = Arc::clone(listener.route(self.server_name, self.alpn));
        if !listener.mutual_tls {
            let judged = Judged {
                listener: Arc::clone(listener),
                upstream,
                identity: None,
                certificate: None,
            };
            return Ok((judged, None));
        }
        let Some(tls) = &listener.tls else {
            // Unreachable: an mTLS listener has TLS. Refuse rather than assume.
            return Err(Refusal::handshake(
                listener,
                HandshakeFailure::NoCertificate,
                "no TLS",
            ));
        };
        let same_trust = Arc::ptr_eq(&tls.config, &self.handshake_tls.config);
        // The handshake verified the chain; a resumption or a handshake under older trust is
        // verified again now, as is a chain whose handshake verdict is no longer at hand.
        let recorded = if self.resumed || !same_trust {
            None
        } else {
            tls.handshake_not_after(&self.chain)
        };
        let path_not_after = match recorded {
            Some(not_after) => Some(not_after),
            None => match tls.verify(&self.chain, std::time::SystemTime::now()) {
                Ok(verified) => verified.map(|v| v.not_after),
                Err(rejection) => {
                    let why = if self.resumed {
                        "resumed session: "
                    } else if !same_trust {
                        "handshake before a reload: "
                    } else {
                        ""
                    };
                    let detail = format_args!("{why}client certificate refused ({rejection})");
                    return Err(Refusal::handshake(listener, rejection.reason, detail));
                }
            },
        };
        let Some(leaf) = self.chain.first() else {
            // Unreachable with a client verifier configured; refuse rather than assume.
            return Err(Refusal::handshake(
                listener,
                HandshakeFailure::NoCertificate,
                "no client certificate",
            ));
        };
        let certified = crate::identity::inspect(leaf, listener.identity_rule)
            .map_err(|e| Refusal::new(Reason::Unauthorized, e))?;
        let identity = certified.identity;
        if listener.authorization.check(&identity, &upstream.name) == Authz::Deny {
            let detail = format!("{identity} may not reach upstream {:?}", upstream.name);
            return Err(Refusal::new(Reason::Unauthorized, detail).of(identity.to_string().into()));
        }
        // `notAfter` is the last second of validity (RFC 5280, as webpki reads it): the path
        // expires one second after its earliest one, the anchor's and the intermediates' of
        // the client_ca file included.
        let expires = listener
            .close_on_expiry
            .then(|| path_not_after.unwrap_or(certified.not_after) + Duration::from_secs(1));
        let grant = Grant {
            listener: name.clone(),
            upstream: upstream.name.clone(),
            identity: identity.clone(),
            chain: self.chain.clone(),
            expires,
        };
        let judged = Judged {
            listener: Arc::clone(listener),
            upstream,
            identity: Some(identity),
            certificate: Some((certified.serial, certified.not_after)),
        };
        Ok((judged, Some(grant)))
    }
}

/// Phase 3: the client's rate limit. `Ok(None)` on a listener without one.
async fn limit(listener: &Listener, key: &ClientKey) -> Result<Option<Permit>, Refusal> {
    let Some(limiter) = &listener.limiter else {
        return Ok(None);
    };
    match limiter.check(key).await {
        Limit::Allow(permit) => Ok(Some(permit)),
        Limit::Reject(why) => {
            let refusal = Refusal::new(Reason::RateLimited, format_args!("client {key}: {why}"));
            Err(match key {
                ClientKey::Identity(identity) => refusal.of(Arc::clone(identity)),
                ClientKey::Ip(_) => refusal,
            })
        }
    }
}

/// Phases 3-4 for a client whose transport is ready: the limit, then a backend.
async fn prepare(
    mut client: Client,
    listener: Arc<Listener>,
    upstream: Arc<Upstream>,
    who: Who,
    abort: &CancellationToken,
    started: Instant,
    entry: &mut Entry,
) -> Option<Box<Proxied>> {
    Span::current().record("upstream", upstream.name.as_str());
    entry.upstream = Some(upstream.name.clone());
    let permit = match limit(&listener, &who.key).await {
        Ok(permit) => permit,
        Err(refusal) => {
            refusal.record(&listener, entry);
            if let Some(response) = &listener.reject_response {
                let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.write_all(response)).await;
            }
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
            return None;
        }
    };
    // Counted among the identity's open connections until the connection ends.
    let open = match &who.key {
        ClientKey::Identity(identity) => Some(listener.identities.open(identity)),
        ClientKey::Ip(_) => None,
    };
    let connected = tokio::select! {
        _ = abort.cancelled() => return None,
        connected = connect(&upstream, &who) => connected,
    };
    let Connected {
        backend,
        lease,
        chosen,
    } = match connected {
        Ok(connected) => connected,
        Err(reason) => {
            Refusal::new(reason, format_args!("upstream {:?}", upstream.name)).record(&listener, entry);
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
            return None;
        }
    };
    chosen.connections.inc();
    Span::current().record("backend.addr", chosen.label.as_str());
    entry.backend = Some(chosen.label.clone());
    let timeouts = Timeouts {
        idle: listener.idle_timeout,
        half_closed: listener.half_closed_timeout,
        deadline: listener.max_lifetime.map(|max| {
            let age = lifetime(max, listener.max_lifetime_jitter, random_unit());
            crate::clock::later(tokio::time::Instant::from_std(started), age)
        }),
    };
    // Taken after the dial: if the backend went down meanwhile, the signal has already fired.
    let backend_down = match upstream.health_check.on_down {
        OnDown::Close => Some(chosen.health.down_signal()),
        OnDown::Keep => None,
    };
    // Boxed: the connection's task then holds a pointer while its relay runs.
    Some(Box::new(Proxied {
        client,
        backend,
        held: Held {
            permit,
            lease,
            _open: open,
        },
        backend_down,
        chosen,
        registration: who.registration,
        listener,
        timeouts,
    }))
}

/// What a proxied connection holds while its bytes flow: no more than its relay needs (the
/// setup's state, the handshake's included, is gone by then).
struct Proxied {
    client: Client,
    backend: BackendStream,
    held: Held,
    /// With `on_down = "close"`: cancelled when the backend is marked down.
    backend_down: Option<CancellationToken>,
    chosen: Arc<Backend>,
    /// An authorized mTLS connection's registration (revocation, expiry).
    registration: Option<Registration>,
    /// The listener as the generation that admitted the connection has it.
    listener: Arc<Listener>,
    timeouts: Timeouts,
}

/// The counts a connection holds until it ends, given back in this order.
struct Held {
    /// The rate-limit concurrency slot first: once the backend count reads zero, the client may
    /// reconnect.
    permit: Option<Permit>,
    lease: Lease,
    _open: Option<crate::metrics::identities::OpenIdentity>,
}

impl Proxied {
    /// Phase 5 and the closing log line.
    /// `entry`: the access log entry, with an access log.
    // Not an `async fn`, like `handle`: no second copy of the arguments in the future.
    fn run<'a>(
        self: Box<Self>,
        abort: &'a CancellationToken,
        started: Instant,
        entry: Option<&'a mut Entry>,
    ) -> impl Future<Output = ()> + 'a {
        let mut this = self;
        async move {
            let listener = Arc::clone(&this.listener);
            let mut tally = Tally {
                progress: Progress::default(),
                late: None,
                listener: &listener,
                backend: &Arc::clone(&this.chosen),
                interim: match (
                    listener.access_log.as_deref(),
                    listener.access_log_interim,
                    entry.as_deref(),
                ) {
                    (Some(log), Some(every), Some(entry)) => Some(Box::new(Interim {
                        every,
                        next: crate::clock::later(tokio::time::Instant::from_std(started), every),
                        started,
                        log,
                        entry,
                    })),
                    _ => None,
                },
            };
            let (end, aborted) = relay(&mut this, abort, &mut tally).await;
            if !aborted && end.is_cut() {
                // A clean cut is a complete end for TLS peers too: close_notify, then the FIN.
                if let Client::Tls(client) = &mut this.client {
                    close_tls(client).await;
                }
                if let BackendStream::Tls(backend) = &mut this.backend {
                    let _ = tokio::time::timeout(REFUSAL_DEADLINE, backend.shutdown()).await;
                }
            }
            let progress = tally.settle(end);
            listener.figures.duration.observe(started.elapsed());
            info!(
                bytes_up = progress.client_to_backend,
                bytes_down = progress.backend_to_client,
                duration_ms = started.elapsed().as_millis() as u64,
                end = end.label(),
                aborted,
                "connection closed"
            );
            if let Some(entry) = entry {
                entry.bytes_up = progress.client_to_backend;
                entry.bytes_down = progress.backend_to_client;
                entry.outcome = end.label();
                entry.aborted = aborted;
            }
            let Held { permit, lease, _open } = this.held;
            drop(permit);
            drop(lease);
        }
    }
}

/// The relay's [`Meter`]: bytes counted on the listener and the backend as they move, and the
/// interim access log entries of a long connection (`[access_log] interim`).
struct Tally<'a> {
    progress: Progress,
    /// Of `progress`, the bytes written to a peer after its FIN (see [`Meter::late`]). Boxed:
    /// rare, and every idle connection's task carries this struct.
    late: Option<Box<Progress>>,
    listener: &'a Listener,
    backend: &'a Backend,
    /// Boxed: most connections have none, and should not carry its size.
    interim: Option<Box<Interim<'a>>>,
}

/// When the next interim entry is due, and where it goes.
struct Interim<'a> {
    every: Duration,
    next: tokio::time::Instant,
    started: Instant,
    log: &'a crate::accesslog::AccessLog,
    /// The access log entry so far (the interim entries' fields).
    entry: &'a Entry,
}

impl Tally<'_> {
    /// The bytes delivered, once the relay ended with `end`: what was written to a peer after
    /// its FIN counts only if that peer did not reset (it refused them), here and in the
    /// metrics.
    fn settle(&mut self, end: End) -> Progress {
        let Some(mut late) = self.late.take().map(|late| *late) else {
            return self.progress;
        };
        if end == End::BackendReset {
            self.progress.client_to_backend = self
                .progress
                .client_to_backend
                .saturating_sub(late.client_to_backend);
            late.client_to_backend = 0;
        }
        if end == End::ClientReset {
            self.progress.backend_to_client = self
                .progress
                .backend_to_client
                .saturating_sub(late.backend_to_client);
            late.backend_to_client = 0;
        }
        if late != Progress::default() {
            self.moved(late.client_to_backend, late.backend_to_client);
        }
        self.progress
    }
}

impl Meter for Tally<'_> {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn moved(&mut self, up: u64, down: u64) {
        self.listener.figures.bytes.add(up, down);
        self.backend.bytes.add(up, down);
    }

    fn late(&mut self, up: u64, down: u64) {
        let late = self.late.get_or_insert_with(Box::default);
        late.client_to_backend += up;
        late.backend_to_client += down;
    }

    fn next_checkpoint(&self) -> Option<tokio::time::Instant> {
        self.interim.as_ref().map(|i| i.next)
    }

    fn checkpoint(&mut self) {
        let Some(interim) = &mut self.interim else {
            return;
        };
        let mut entry = interim.entry.clone();
        entry.outcome = "interim";
        entry.bytes_up = self.progress.client_to_backend;
        entry.bytes_down = self.progress.backend_to_client;
        entry.duration = interim.started.elapsed();
        interim.log.send(entry);
        interim.next = crate::clock::later(interim.next, interim.every);
    }
}

/// A backend that answered, with the lease that counts this connection against it.
struct Connected {
    backend: BackendStream,
    lease: Lease,
    chosen: Arc<Backend>,
}

/// Phase 4: leases and dials backends until one answers, at most `connect_attempts` distinct
/// ones. Each dial's outcome feeds the backend's health (passive detection). With no backend in
/// rotation nothing is dialed: [`Reason::NoHealthyBackend`]. With every backend at its
/// `max_connections`, the client waits in the upstream's queue (holding no lease) or is refused.
async fn connect(upstream: &Upstream, who: &Who) -> Result<Connected, Reason> {
    let origin = Origin {
        addr: who.addr,
        local: who.local,
        ssl: who.ssl.as_ref(),
        authority: who.authority.as_deref(),
    };
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
        match crate::net::open(upstream, backend, &origin).await {
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
                backend.connect_failures.inc();
                debug!(backend = %backend.label, error = %failure, "backend connect failed");
                tried.push(lease.index());
                if crate::net::is_local_exhaustion(&failure) {
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
    let Ok(wait) = upstream.pool.wait(tried, upstream.queue_size) else {
        return Err(Reason::QueueFull);
    };
    let since = Instant::now();
    let served = tokio::time::timeout(upstream.queue_timeout, wait).await;
    upstream.figures.queue.observe(since.elapsed());
    served.map_err(|_| Reason::QueueTimeout)
}

/// How a proxied connection ended: the `end` field of its log line and the access log's
/// `outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Both sides finished cleanly.
    Closed,
    /// Shutdown's drain deadline passed while it was open.
    DrainDeadline,
    /// A reload took the client's access away.
    AccessRevoked,
    /// The client's certificate expired (`close_on_expiry`).
    CertExpired,
    /// No byte either way for `idle_timeout`.
    IdleTimeout,
    /// Half-closed, and the other direction silent for `half_closed_timeout`.
    HalfClosedTimeout,
    /// Older than `max_lifetime` (less its jitter).
    MaxLifetime,
    /// Its backend was marked down with `on_down = "close"`.
    BackendDown,
    /// An operator put its backend in `maint`.
    BackendMaint,
    ClientReset,
    ClientError,
    BackendReset,
    BackendError,
}

impl End {
    pub(crate) fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::DrainDeadline => "drain_deadline",
            End::AccessRevoked => "access_revoked",
            End::CertExpired => "cert_expired",
            End::IdleTimeout => "idle_timeout",
            End::HalfClosedTimeout => "half_closed_timeout",
            End::MaxLifetime => "max_lifetime",
            End::BackendDown => "backend_down",
            End::BackendMaint => "backend_maint",
            End::ClientReset => "client_reset",
            End::ClientError => "client_error",
            End::BackendReset => "backend_reset",
            End::BackendError => "backend_error",
        }
    }

    /// Whether fulcrum ended the connection itself on a timer (a timeout, the lifetime, the
    /// drain deadline), which with nothing in flight is a clean close.
    fn is_cut(self) -> bool {
        matches!(
            self,
            End::IdleTimeout | End::HalfClosedTimeout | End::MaxLifetime | End::DrainDeadline
        )
    }

    /// Whether `e` means the peer reset the connection (`ENOTCONN` from a write or shutdown
    /// before our own FIN included).
    fn is_reset(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
        )
    }

    /// The end for an I/O error on `side`.
    fn failed(side: Side, e: &io::Error) -> End {
        match (side, End::is_reset(e)) {
            (Side::Client, true) => End::ClientReset,
            (Side::Client, false) => End::ClientError,
            (Side::Backend, true) => End::BackendReset,
            (Side::Backend, false) => End::BackendError,
        }
    }
}

/// The age at which a connection is closed for `max_lifetime`: `max - jitter * unit`, `unit`
/// uniform in [0, 1), so that connections opened together are closed over `jitter`, never after
/// `max`.
fn lifetime(max: Duration, jitter: Duration, unit: f64) -> Duration {
    let cut = Duration::try_from_secs_f64(jitter.as_secs_f64() * unit.clamp(0.0, 1.0)).unwrap_or(jitter);
    max.saturating_sub(cut)
}

/// A number uniform in [0, 1) that differs between connections (not for anything secret).
fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Phase 5: relays until both sides end, or the drain deadline, the backend being marked down
/// (`on_down = "close"`), a revocation, the certificate's expiry or one of the listener's
/// timeouts cuts it. Returns how it ended, and whether fulcrum reset the legs (`aborted`): a
/// failed side resets the other, and a cut resets both when bytes were in flight (always, when
/// access was taken away), so neither side mistakes a cut stream for a complete one; a timeout
/// or the drain deadline with nothing in flight closes both cleanly.
async fn relay(p: &mut Proxied, abort: &CancellationToken, progress: &mut Tally<'_>) -> (End, bool) {
    let Proxied {
        client,
        backend,
        backend_down,
        chosen,
        registration,
        timeouts,
        ..
    } = p;
    let cut = registration.as_ref().map(|r| &*r.cut);
    let maint = chosen.health.maint_signal();
    // An idle relay keeps this future for its whole life: the common case (no `on_down =
    // "close"`, no mTLS registration) waits on two signals, not four.
    let stop: std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> = match (&*backend_down, cut) {
        (None, None) => Box::pin(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = maint.cancelled() => {}
            }
        }),
        (down, cut) => Box::pin(async move {
            let down = async {
                match down {
                    Some(down) => down.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let cut = async {
                match cut {
                    Some(cut) => cut.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = down => {}
                _ = cut => {}
                _ = maint.cancelled() => {}
            }
        }),
    };
    let timeouts = *timeouts;
    // Zero-copy between plain sockets, buffered through TLS.
    let result = match backend {
        BackendStream::Plain(plain) => match client {
            Client::Plain(tcp) => relay_tcp(tcp, plain, progress, stop, timeouts).await,
            Client::Tls(tls) => crate::proxy::relay(tls.as_mut(), plain, progress, stop, timeouts).await,
        },
        BackendStream::Tls(tls) => match client {
            Client::Plain(tcp) => crate::proxy::relay(tcp, tls.as_mut(), progress, stop, timeouts).await,
            Client::Tls(client) => {
                crate::proxy::relay(client.as_mut(), tls.as_mut(), progress, stop, timeouts).await
            }
        },
    };
    // Closing with SO_LINGER 0 sends a reset instead of a FIN (and no TLS close_notify).
    let reset = |tcp: &TcpStream| {
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    };
    let reset_both = || {
        reset(client.tcp());
        reset(backend.tcp());
        true
    };
    // A cut with bytes in the relay, or unread in either socket, ends with resets; a cut with
    // nothing in flight closes cleanly.
    let cut = |in_flight: bool| (in_flight || unread(client.tcp()) || unread(backend.tcp())) && reset_both();
    match &result {
        // Both FINs were passed on. A reset that came after them cannot reach the other side any
        // more, but it is no clean end: the side that reset is named.
        Ok(()) if reset_pending(backend.tcp()) => (End::BackendReset, false),
        Ok(()) if reset_pending(client.tcp()) => (End::ClientReset, false),
        Ok(()) => (End::Closed, false),
        Err(RelayError::TimedOut { timeout, in_flight }) => {
            let end = match timeout {
                Timeout::Idle => End::IdleTimeout,
                Timeout::HalfClosed => End::HalfClosedTimeout,
                Timeout::Lifetime => End::MaxLifetime,
            };
            (end, cut(*in_flight))
        }
        Err(RelayError::Cancelled { in_flight }) if abort.is_cancelled() => {
            (End::DrainDeadline, cut(*in_flight))
        }
        Err(RelayError::Cancelled { .. }) => {
            // Taken away (revoked, expired, the backend down or in maintenance): always a reset.
            let end = match registration.as_ref().and_then(|r| r.cut.reason()) {
                Some(Cut::AccessRevoked) => End::AccessRevoked,
                Some(Cut::CertExpired) => End::CertExpired,
                None if chosen.health.admin_state() == AdminState::Maint => End::BackendMaint,
                None => End::BackendDown,
            };
            (end, reset_both())
        }
        Err(RelayError::Io { side, source }) => {
            // Mirror an abort: the other side sees a reset too, never a clean end of stream.
            reset(match side {
                Side::Client => backend.tcp(),
                Side::Backend => client.tcp(),
            });
            (End::failed(*side, source), true)
        }
    }
}

/// Whether bytes wait unread in our socket (the relay stopped reading them).
fn unread(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut byte), Ok(n) if n > 0)
}

/// Whether the peer reset the connection since our last call that would have said so.
fn reset_pending(tcp: &TcpStream) -> bool {
    match socket2::SockRef::from(tcp).take_error() {
        Ok(Some(e)) => End::is_reset(&e),
        _ => false,
    }
}

async fn close_tls(client: &mut Box<TlsStream<TcpStream>>) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
}

/// A client transport: plain TCP, or TLS over TCP (boxed: a session is large, and plain
/// connections should not carry its size).
enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    /// The socket underneath (to reset it).
    fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(tls) => tls.get_ref().0,
        }
    }

    /// The stream to write to: the socket, or the TLS session over it.
    fn writer(&mut self) -> std::pin::Pin<&mut (dyn AsyncWrite + Unpin + Send)> {
        match self {
            Client::Plain(tcp) => std::pin::Pin::new(tcp),
            Client::Tls(tls) => std::pin::Pin::new(tls.as_mut()),
        }
    }
}

/// For the refusal paths (a reject response, the shutdown); the relay takes the streams apart.
impl AsyncWrite for Client {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.get_mut().writer().poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().writer().poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().writer().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_lifetime_lies_within_the_jitter_below_max_lifetime() {
        let (max, jitter) = (Duration::from_secs(600), Duration::from_secs(60));
        assert_eq!(super::lifetime(max, jitter, 0.0), max);
        assert_eq!(super::lifetime(max, jitter, 0.5), Duration::from_secs(570));
        assert!(super::lifetime(max, jitter, 0.999_999) > Duration::from_secs(540));
        assert_eq!(
            super::lifetime(max, jitter, 7.0),
            Duration::from_secs(540),
            "clamped"
        );
        // No overflow however large the configured values.
        assert!(super::lifetime(Duration::MAX, Duration::MAX, 0.5) < Duration::MAX);
        let unit = super::random_unit();
        assert!((0.0..1.0).contains(&unit), "{unit}");
    }

    /// Every open connection is one task holding this future: its size is most of what an idle
    /// connection costs (issue 22: at most 2.0 kB per idle plain connection). The setup's state
    /// (handshake, dial, refusal paths) lives in a box freed before the relay starts.
    #[tokio::test]
    async fn an_idle_connection_task_future_fits_in_half_a_kibibyte() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = backend.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let toml = format!(
            "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['{addr}']\n"
        );
        let config = crate::Config::from_toml(&toml, "t").expect("config");
        let server = crate::Server::bind(config).await.expect("bind server");
        let listener = server.state().listener("a").cloned().expect("listener");
        let live = server.live();
        let places = super::take_places(&live, &live.state(), &listener, addr).expect("places");
        let task = super::handle(
            client,
            addr,
            listener,
            live,
            places,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        // 2 784 bytes before the setup was boxed apart from the relay, 768 while `handle` and
        // `Proxied::run` were `async fn`s (issue 22). At 512 or less, tokio's task cell (the
        // future plus about 120 bytes, in multiples of 128) is 640 bytes.
        assert!(size <= 512, "a connection's future is {size} bytes");
        // What the relay holds besides, on the heap while bytes may flow.
        let relay = std::mem::size_of::<super::Proxied>();
        assert!(
            relay <= 320,
            "a proxied connection's relay state is {relay} bytes"
        );
    }
}
