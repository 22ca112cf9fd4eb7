//! Phase 2, admission: which upstream the client reaches, and as whom ([`admit`]).
//!
//! On a TLS listener: the handshake under the connection's deadline, then, judged against the
//! generation live at that moment (not the one live at accept), the upstream (SNI, ALPN or the
//! listener's), the client identity from the verified certificate (verified again for a resumed
//! session or one from before a reload) and the authorization of that identity for that upstream
//! (mTLS; default deny). An authorized mTLS connection is registered, so that a reload removing
//! its access, or its certificate's expiry, closes it. A plain listener admits as it accepted.
//! The rules are `tls`'s, `identity`'s and `authz`'s; this file applies them in order and records
//! what they found. It does not limit, dial or relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, Span};

use super::client::Client;
use super::front::Who;
use super::limits::in_handshake;
use super::refusal::{Refusal, Step};
use crate::accesslog::Entry;
use crate::authz::Decision as Authz;
use crate::metrics::{HandshakeFailure, Reason};
use crate::proxy_protocol::SslInfo;
use crate::ratelimit::ClientKey;
use crate::state::{Grant, Listener, Live, State, Upstream};
use crate::tls::ServerTls;

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
/// `upstream` and the access log's. (Not boxed: no allocation on the plain path.)
pub(super) fn admit_plain(
    client: TcpStream,
    listener: &Arc<Listener>,
    who: Who,
    entry: &mut Entry,
) -> Admitted {
    let upstream = Arc::clone(&listener.upstream);
    note_upstream(&upstream, entry);
    Admitted {
        client: Client::Plain(client),
        listener: Arc::clone(listener),
        upstream,
        who,
    }
}

/// Phase 2 on a TLS listener (`tls`): handshake -> identity -> authorization, by `deadline`; the
/// upstream is then the span's `upstream` and the access log's. `who` comes from the front.
#[allow(clippy::too_many_arguments)]
pub(super) async fn admit(
    client: TcpStream,
    tls: &ServerTls,
    listener: &Arc<Listener>,
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
    let client = match handshake(client, tls, listener, deadline, abort).await {
        Step::Next(client) => client,
        Step::Refused(refusal) => return refused(refusal, None),
        Step::Aborted => return Admission::Aborted,
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
        Err(refusal) => return refused(refusal, Some(Client::Tls(client))),
    };
    note_upstream(&judged.upstream, entry);
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
        client: Client::Tls(client),
        listener: judged.listener,
        upstream: judged.upstream,
        who,
    }))
}

/// The TLS handshake, by `deadline` unless the drain deadline passes first: timed on success,
/// counted by its cause on failure.
async fn handshake(
    client: TcpStream,
    tls: &ServerTls,
    listener: &Listener,
    deadline: tokio::time::Instant,
    abort: &CancellationToken,
) -> Step<Box<TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
    let handshake_started = Instant::now();
    let handshake = tokio::select! {
        _ = abort.cancelled() => return Step::Aborted,
        handshake = Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(client))) => handshake,
    };
    match handshake {
        Ok(Ok(stream)) => {
            listener.figures.handshake.observe(handshake_started.elapsed());
            Step::Next(Box::new(stream))
        }
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
