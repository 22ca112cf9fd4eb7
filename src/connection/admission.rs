//! Phase 2, admission: which upstream the client reaches, and as whom ([`admit`]).
//!
//! On a TLS listener: the handshake under the connection's deadline (with the certificate and
//! client trust the client's SNI chooses among the listener's), then, judged against the
//! generation live at that moment (not the one live at accept), the upstream (SNI, ALPN or the
//! listener's), the client identity from the verified certificate (verified again for a resumed
//! session or one from before a reload, by the trust the same SNI chooses) and the authorization
//! of that identity, from its source, for that upstream (mTLS; default deny; deny entries first;
//! a shadow table is judged beside and only counted). An authorized mTLS connection is
//! registered, so that a reload removing its access, or its certificate's expiry, closes it. A
//! plain listener admits as it accepted.
//! The rules are `tls`'s, `identity`'s and `authz`'s; this file applies them in order and records
//! what they found. It does not limit, dial or relay.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tracing::{field, Span};

use super::client::{reset, Client};
use super::front::Who;
use super::limits::in_handshake;
use super::record::Record;
use super::refusal::{Refusal, Step, Stop};
use crate::accesslog::Entry;
use crate::authz::{Decision as Authz, Denial, Matched};
use crate::identity::ClientIdentity;
use crate::metrics::{HandshakeFailure, Reason};
use crate::proxy_protocol::SslInfo;
use crate::quarantine::QuarantineStore;
use crate::ratelimit::ClientKey;
use crate::state::{Grant, Listener, ListenerTls, Live, State, Upstream};
use crate::tls::{Hello, ServerTls, TlsStream};

/// A client through admission, on its way to the limit and a backend.
pub(super) struct Admitted {
    pub(super) client: Client,
    /// The listener as the generation live at admission has it.
    pub(super) listener: Arc<Listener>,
    pub(super) upstream: Arc<Upstream>,
    pub(super) who: Who,
}

/// The outcome of admission.
pub(super) enum Admission {
    /// Boxed: it carries the client's identity and TLS facts, the other outcomes much less.
    Admitted(Box<Admitted>),
    /// Refused; with the stream when the handshake completed, so that it can be closed cleanly.
    Refused {
        refusal: Refusal,
        client: Option<Client>,
    },
    /// The drain deadline passed during the handshake.
    Aborted,
}

/// Phase 2 on a plain listener: nothing to check; the listener's upstream is the span's
/// `upstream`, the access log's and the connection's `record`'s. (Not boxed: no allocation on
/// the plain path.)
pub(super) fn admit_plain(
    client: TcpStream,
    listener: &Arc<Listener>,
    who: Who,
    record: &Record,
    entry: &mut Entry,
) -> Admitted {
    let upstream = Arc::clone(&listener.upstream);
    note_upstream(&upstream, entry);
    record.admitted(&upstream, entry);
    Admitted {
        client: Client::Plain(client),
        listener: Arc::clone(listener),
        upstream,
        who,
    }
}

/// Phase 2 on a TLS listener (`tls`, its certificates): handshake -> identity -> authorization,
/// by `deadline` unless `stop` comes first; the upstream and the client's TLS facts are then the
/// span's, the access log's and the connection's `record`'s. `who` comes from the front.
#[allow(clippy::too_many_arguments)]
pub(super) async fn admit(
    client: TcpStream,
    tls: &ListenerTls,
    listener: &Arc<Listener>,
    live: &Live,
    mut who: Who,
    deadline: tokio::time::Instant,
    stop: Stop<'_>,
    record: &Record,
    entry: &mut Entry,
) -> Admission {
    let refused = |refusal, client| Admission::Refused { refusal, client };
    // Counted until the handshake is over (this function returns).
    let _in_handshake = match in_handshake(listener, who.addr) {
        Ok(place) => place,
        Err(refusal) => return refused(refusal, None),
    };
    let (client, handshake_tls) = match handshake(client, tls, listener, deadline, stop).await {
        Step::Next(done) => done,
        Step::Refused(refusal) => return refused(refusal, None),
        Step::Aborted => return Admission::Aborted,
    };
    let session = client.session();
    who.authority = client.server_name().map(str::to_string);
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
        handshake_tls,
        accepted_by: listener,
        source: who.addr.ip(),
        shadow: std::cell::RefCell::new(None),
    };
    let current = live.state();
    let first = presented.judge(&current);
    let admitted = live.admit(current.generation, first, |now| presented.judge(now));
    if let Some(shadow) = presented.shadow.take() {
        shadow.record(entry);
    }
    let (judged, registration) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refused(refusal, Some(Client::Tls(client))),
    };
    note_upstream(&judged.upstream, entry);
    if let Some((serial, not_after)) = &judged.certificate {
        entry.client_serial = Some(serial.clone());
        entry.client_not_after = Some(*not_after);
    }
    if let Some(identity) = &judged.identity {
        entry.identity = Some(identity.to_string());
    }
    // Listed with its identity and serial before the quarantine is asked again (below).
    record.admitted(&judged.upstream, entry);
    // A quarantine added between the judgement and the listing swept the open connections
    // before this one was among them: asked again now, it cannot be missed.
    if let (Some(identity), Some((serial, _))) = (&judged.identity, &judged.certificate) {
        if let Some(refusal) = quarantined(&live.state().quarantine, identity, serial) {
            drop(registration);
            return refused(refusal, Some(Client::Tls(client)));
        }
    }
    if let Some(identity) = judged.identity {
        Span::current().record("client.id", field::display(&identity));
        if let Some(ssl) = &mut who.ssl {
            ssl.cn = Some(identity.to_string());
        }
        who.key = ClientKey::Identity(identity.into());
    }
    who.registration = registration;
    Admission::Admitted(Box::new(Admitted {
        client: Client::Tls(client),
        listener: judged.listener,
        upstream: judged.upstream,
        who,
    }))
}

/// The TLS handshake, by `deadline` unless `stop` comes first (a cut client is then reset):
/// timed on success, counted by its cause on failure. It reads the ClientHello first and
/// completes with the certificate its server name chooses, in the configuration of the group the
/// listener prefers among the client's (`ServerTls::config_for`); it returns the certificate it
/// ran with. Each stage is boxed: its state is large, and a plain connection's setup should not
/// carry its size.
async fn handshake<'t>(
    client: TcpStream,
    tls: &'t ListenerTls,
    listener: &Listener,
    deadline: tokio::time::Instant,
    stop: Stop<'_>,
) -> Step<(Box<TlsStream>, &'t ServerTls)> {
    let handshake_started = Instant::now();
    // Stopped with the socket still in a stage's hands: reset it there if the connection was cut.
    let abandon = |tcp: &TcpStream| {
        if stop.cut().is_some() {
            reset(tcp);
        }
        Step::Aborted
    };
    let mut hello = Box::new(Hello::new(client));
    let read = tokio::select! {
        biased;
        _ = stop.stopped() => return abandon(hello.tcp()),
        read = tokio::time::timeout_at(deadline, hello.read()) => read,
    };
    let accepted = match settle(listener, read) {
        Step::Next(accepted) => accepted,
        Step::Refused(refusal) => return Step::Refused(refusal),
        Step::Aborted => return Step::Aborted,
    };
    let client_hello = accepted.client_hello();
    let server_name = client_hello.server_name().map(str::to_string);
    let chosen = &tls.choose(server_name.as_deref()).tls;
    let config = chosen.config_for(&client_hello);
    drop(accepted);
    let mut stream = match settle(listener, Ok(hello.start(config, server_name))) {
        Step::Next(stream) => Box::new(stream),
        Step::Refused(refusal) => return Step::Refused(refusal),
        Step::Aborted => return Step::Aborted,
    };
    let done = tokio::select! {
        biased;
        _ = stop.stopped() => return abandon(stream.tcp()),
        done = tokio::time::timeout_at(deadline, stream.handshake()) => done,
    };
    match settle(listener, done) {
        Step::Next(()) => {
            listener.figures.handshake.observe(handshake_started.elapsed());
            Step::Next((stream, chosen))
        }
        Step::Refused(refusal) => Step::Refused(refusal),
        Step::Aborted => Step::Aborted,
    }
}

/// How a handshake stage ended by its deadline: done, or the refusal for its failure (counted
/// by its cause) or for the deadline.
fn settle<T>(listener: &Listener, stage: Result<std::io::Result<T>, tokio::time::error::Elapsed>) -> Step<T> {
    match stage {
        Ok(Ok(done)) => Step::Next(done),
        Ok(Err(e)) => {
            let failure = crate::tls::classify_io(&e);
            let refusal = match crate::tls::rejection_of(&e) {
                Some(rejection) => Refusal::handshake(listener, failure, rejection),
                None => Refusal::handshake(listener, failure, e),
            };
            Step::Refused(refusal)
        }
        Err(_) => {
            let refusal =
                Refusal::handshake(listener, HandshakeFailure::Timeout, "handshake deadline passed");
            Step::Refused(refusal)
        }
    }
}

/// The upstream admission chose, in the span and the access log entry.
fn note_upstream(upstream: &Upstream, entry: &mut Entry) {
    Span::current().record("upstream", upstream.name.as_str());
    entry.upstream = Some(upstream.name.clone());
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
    /// The client's source address (the PROXY header's, when one was accepted).
    source: IpAddr,
    /// The last judgement's shadow verdict, if its listener has a shadow table.
    shadow: std::cell::RefCell<Option<ShadowVerdict>>,
}

/// What a listener's shadow authorization table said of a client, beside the real table.
struct ShadowVerdict {
    listener: Arc<Listener>,
    upstream: String,
    would_allow: bool,
    allowed: bool,
}

impl ShadowVerdict {
    /// Counts it on its listener; when it disagrees with the real table, says so in the span
    /// (every log line of the connection) and the access log entry.
    fn record(&self, entry: &mut Entry) {
        self.listener.shadow.count(&self.upstream, self.would_allow);
        if self.would_allow != self.allowed {
            let shadow = if self.would_allow {
                "would_allow"
            } else {
                "would_deny"
            };
            Span::current().record("shadow", shadow);
            entry.shadow = Some(shadow);
        }
    }
}

/// The refusal of a client whose identity or certificate `serial` is quarantined now.
fn quarantined(store: &QuarantineStore, identity: &ClientIdentity, serial: &str) -> Option<Refusal> {
    let (subject, until, why) = store.refusing(identity.as_str(), serial, std::time::SystemTime::now())?;
    let until = humantime::format_rfc3339_seconds(until);
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    let detail = format_args!("{subject} is quarantined until {until}{why}");
    Some(Refusal::new(Reason::Quarantined, detail).of(identity.to_string().into()))
}

/// The refusal for an authorization `denial` of `identity` (from `source`) for `upstream`.
fn refusal(
    denial: Denial,
    identity: &ClientIdentity,
    upstream: &str,
    source: IpAddr,
    matched: Matched<'_>,
) -> Refusal {
    let refusal = match denial {
        Denial::Unlisted => Refusal::new(
            Reason::Unauthorized,
            format_args!("{identity} may not reach upstream {upstream:?} ({matched})"),
        ),
        Denial::Denied => Refusal::new(Reason::Denied, format_args!("{identity} is refused by {matched}")),
        Denial::Source => Refusal::new(
            Reason::SourceDenied,
            format_args!("{identity} may reach upstream {upstream:?} only from the networks of {matched}, not from {source}"),
        ),
    };
    refusal.of(identity.to_string().into())
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
        let Some(tls) = listener.tls_for(self.server_name) else {
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
        if let Some(refusal) = quarantined(&state.quarantine, &identity, &certified.serial) {
            return Err(refusal);
        }
        let authorization = listener.authorization_for(self.server_name);
        let verdict = authorization.judge(&identity, &upstream.name, self.source);
        if let Some(shadow) = authorization.shadow() {
            let would_allow = shadow.check(&identity, &upstream.name, self.source) == Authz::Allow;
            let allowed = verdict.decision == Authz::Allow;
            self.shadow.replace(Some(ShadowVerdict {
                listener: Arc::clone(listener),
                upstream: upstream.name.clone(),
                would_allow,
                allowed,
            }));
        }
        if let Authz::Deny(denial) = verdict.decision {
            return Err(refusal(
                denial,
                &identity,
                &upstream.name,
                self.source,
                verdict.matched,
            ));
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
            server_name: self.server_name.map(str::to_string),
            source: self.source,
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
