//! TLS termination for listeners: loading certificates and building each listener's rustls
//! configuration; and the client side, to backends (`[upstream.tls]`) and to the shared rate
//! limit's Redis (`[rate_limit.shared.tls]`).
//!
//! Policy, fixed here and nowhere else: the crypto provider of [`provider`] (ring by default);
//! TLS 1.3, plus TLS 1.2 with ECDHE key exchange and AEAD ciphers only when `min_version = "1.2"`
//! (rustls offers nothing weaker). With `client_ca` or `trust_domains`, a client certificate is
//! required and judged by the listener's [`Trust`] (anchors and intermediates, path, dates, name
//! constraints, trust domains, CRLs bound to their issuer's key: see `trust`), which
//! [`client_trust`] loads from the files and [`ClientVerifier`] runs inside rustls's handshake;
//! rustls checks the client's signature with the provider's algorithms.
//!
//! Resumption: every listener (and every generation of it: a reload starts afresh) has its own
//! in-memory [`SessionCache`] of at most `session_cache` sessions, each resumable for
//! `session_timeout`. Resumption is stateful only: TLS 1.2 by session ID, TLS 1.3 by one
//! ticket per full handshake that is a key into that cache; no stateless tickets are issued, so
//! there are no ticket keys to rotate or leak, and a session never leaves the process. rustls
//! does not verify the client certificate again on resumption, so [`ServerTls::verify`] lets
//! the connection judge the stored chain now, as a full handshake would: a resumption is never
//! weaker than a full handshake.
//!
//! The redis client builds its own rustls configuration at each connect, from the process-wide
//! default provider: [`install_default_provider`] makes that ours, and [`redis_certificates`]
//! checks the files the same way as [`client_config`] before handing them over as PEM.
//!
//! This module reads certificate files and builds configs; it does not accept connections or
//! decide who is authorized (that is `connection` with `identity` and `authz`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::StoresServerSessions;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use x509_parser::prelude::FromDer;

use crate::config::{TlsConfig, TlsVersion};
use crate::metrics::HandshakeFailure;
pub use crate::trust::CrlInfo;
use crate::trust::{CrlError, Rejection, Revocations, Store, Trust, Verified};

/// Why a listener's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} file {path} contains no PEM certificate")]
    NoCertificates { what: &'static str, path: PathBuf },
    #[error("key file {key} does not match the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{what} file {path}: certificate not usable as a trust anchor: {reason}")]
    BadCa {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
    #[error("CRL file {path}: {reason}")]
    Crl { path: PathBuf, reason: String },
    #[error(
        "CRL file {path}: the CRL issued by {issuer} is not signed by a CA certificate of client_ca or of a trust domain's bundle that may sign CRLs"
    )]
    CrlIssuer { path: PathBuf, issuer: String },
}

/// The crypto provider every TLS object in fulcrum uses: ring by default, AWS-LC with the
/// `aws-lc-rs` feature.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(chosen_provider())
}

fn chosen_provider() -> rustls::crypto::CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    provider
}

/// Makes [`provider`] the process-wide default rustls provider, for code that builds rustls
/// configurations itself (the redis client). Idempotent; a provider already installed (by an
/// earlier call, or by a program embedding fulcrum) is kept.
pub fn install_default_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An Err means another thread installed one in between: that one stays, as documented.
        let _ = chosen_provider().install_default();
    }
}

/// A listener's TLS: the rustls configuration, and the client trust (mTLS) kept apart so that a
/// connection can check a resumed session's chain and a reload can check open connections'
/// certificates against new trust.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// mTLS: the verifier rustls runs, holding the listener's [`Trust`].
    pub verifier: Option<Arc<ClientVerifier>>,
    /// The CRLs in force (`[listener.tls] crl`), in file order.
    pub crls: Vec<CrlInfo>,
}

impl ServerTls {
    /// Judges a client certificate chain (leaf first) against this listener's trust at `now`
    /// ([`Trust::verify`]). `Ok(None)` without client authentication.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<Option<Verified>, Rejection> {
        match &self.verifier {
            Some(verifier) => verifier.trust.verify(chain, now).map(Some),
            None => Ok(None),
        }
    }

    /// Whether a client certificate chain (leaf first) still verifies now.
    pub fn accepts(&self, chain: &[CertificateDer<'static>]) -> bool {
        self.verify(chain, SystemTime::now()).is_ok()
    }

    /// The earliest `notAfter` of the path this listener's handshake verified for `chain`, if
    /// the handshake's verdict is still at hand (taken: a second call returns `None`).
    pub fn handshake_not_after(&self, chain: &[CertificateDer<'static>]) -> Option<SystemTime> {
        self.verifier.as_ref()?.take_recent(chain)
    }

    /// The earliest `nextUpdate` of this listener's CRLs.
    pub fn crl_next_update(&self) -> Option<SystemTime> {
        self.crls.iter().filter_map(|c| c.next_update).min()
    }
}

/// The client certificate verifier of an mTLS listener: [`Trust::verify`] at handshake time,
/// with the TLS signature checks of the crypto provider. It remembers the verdicts of the last
/// few handshakes so that admission reads the verified path's expiry without verifying again.
#[derive(Debug)]
pub struct ClientVerifier {
    pub trust: Trust,
    hints: Vec<rustls::DistinguishedName>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    recent: Mutex<VecDeque<(Vec<CertificateDer<'static>>, SystemTime)>>,
}

/// Handshake verdicts remembered for admission; older ones are verified again if asked for.
const RECENT_VERDICTS: usize = 128;

impl ClientVerifier {
    pub fn new(trust: Trust) -> ClientVerifier {
        let hints = trust
            .anchors()
            .filter_map(|der| {
                let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
                Some(rustls::DistinguishedName::from(cert.subject().as_raw().to_vec()))
            })
            .collect();
        ClientVerifier {
            trust,
            hints,
            algorithms: chosen_provider().signature_verification_algorithms,
            recent: Mutex::default(),
        }
    }

    fn remember(&self, chain: Vec<CertificateDer<'static>>, not_after: SystemTime) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_VERDICTS {
            recent.pop_front();
        }
        recent.push_back((chain, not_after));
    }

    fn take_recent(&self, chain: &[CertificateDer<'static>]) -> Option<SystemTime> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let index = recent.iter().rposition(|(c, _)| c.as_slice() == chain)?;
        recent.remove(index).map(|(_, not_after)| not_after)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'static>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        match self.trust.verify(&chain, now) {
            Ok(verified) => {
                self.remember(chain, verified.not_after);
                Ok(rustls::server::danger::ClientCertVerified::assertion())
            }
            Err(rejection) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(rejection)),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a handshake (or a later check of a chain) failed, from the error rustls gave.
pub fn classify(error: &rustls::Error) -> HandshakeFailure {
    use rustls::Error;
    match error {
        Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
        Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => HandshakeFailure::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeFailure::NotYetValid
            }
            CertificateError::Revoked => HandshakeFailure::Revoked,
            CertificateError::UnknownRevocationStatus => HandshakeFailure::RevocationUnknown,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => HandshakeFailure::UnknownCa,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                HandshakeFailure::BadUsage
            }
            CertificateError::Other(other) => other
                .0
                .downcast_ref::<Rejection>()
                .map_or(HandshakeFailure::BadCertificate, |r| r.reason),
            _ => HandshakeFailure::BadCertificate,
        },
        Error::InvalidCertRevocationList(_) => HandshakeFailure::BadCertificate,
        Error::NoApplicationProtocol => HandshakeFailure::NoApplicationProtocol,
        _ => HandshakeFailure::Protocol,
    }
}

/// Why a server-side handshake ended in `error` (what tokio-rustls returns).
pub fn classify_io(error: &io::Error) -> HandshakeFailure {
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(e) => classify(e),
        None => HandshakeFailure::Closed,
    }
}

/// The client trust's own account of a refused chain, if `error` (what tokio-rustls returns)
/// carries one.
pub fn rejection_of(error: &io::Error) -> Option<&Rejection> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.downcast_ref(),
        _ => None,
    }
}

/// Loads certificate, key, CA and CRL files and builds a listener's server configuration.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let (verifier, crls) = match client_trust(tls)? {
        Some((trust, crls)) => (Some(Arc::new(ClientVerifier::new(trust))), crls),
        None => (None, Vec::new()),
    };
    let builder = match &verifier {
        Some(verifier) => {
            builder.with_client_cert_verifier(Arc::clone(verifier) as Arc<dyn ClientCertVerifier>)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = certificates("certificate", &tls.cert, &read("certificate", &tls.cert)?)?;
    let key = private_key("key", &tls.key, &read("key", &tls.key)?)?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            reason: e.to_string(),
        })?;
    config.ignore_client_order = true;
    // Offered in this order; a client offering only others gets `no_application_protocol`.
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if tls.session_cache == 0 {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        config.session_storage = Arc::new(SessionCache::new(tls.session_cache, tls.session_timeout));
        // One ticket per full handshake: each is a key into the cache (TLS 1.3, stateful).
        config.send_tls13_tickets = 1;
    }
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
        crls,
    })
}

/// The client trust of a listener (`client_ca`, `trust_domains`, `crl`, `identity_from_cn`), or
/// `None` without client authentication; with the CRLs' report.
pub fn client_trust(tls: &TlsConfig) -> Result<Option<(Trust, Vec<CrlInfo>)>, TlsError> {
    if tls.client_ca.is_none() && tls.trust_domains.is_empty() {
        return Ok(None);
    }
    let store = |what: &'static str, path: &Path| -> Result<Store, TlsError> {
        let pem = read(what, path)?;
        Store::new(certificates(what, path, &pem)?).map_err(|reason| TlsError::BadCa {
            what,
            path: path.to_path_buf(),
            reason,
        })
    };
    let mut trust = Trust {
        client_ca: tls
            .client_ca
            .as_deref()
            .map(|path| store("client CA", path))
            .transpose()?,
        rule: crate::identity::Rule {
            from_common_name: tls.identity_from_cn,
        },
        ..Trust::default()
    };
    for (domain, path) in &tls.trust_domains {
        trust
            .trust_domains
            .insert(domain.clone(), store("trust domain bundle", path)?);
    }
    let mut crls = Vec::new();
    if let Some(path) = &tls.crl {
        let pem = read("CRL", path)?;
        let failed = |reason: String| TlsError::Crl {
            path: path.to_path_buf(),
            reason,
        };
        let ders = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(pem_reason(e)))?;
        if ders.is_empty() {
            return Err(failed("no PEM CRL (-----BEGIN X509 CRL-----) found".into()));
        }
        let cas: Vec<_> = trust.all_cas().collect();
        let (revocations, info) = Revocations::load(&ders, &cas).map_err(|e| match e {
            CrlError::Invalid(reason) => failed(reason),
            CrlError::Issuer { issuer } => TlsError::CrlIssuer {
                path: path.to_path_buf(),
                issuer,
            },
        })?;
        trust.revocations = Some(revocations);
        crls = info;
    }
    Ok(Some((trust, crls)))
}

/// A listener's TLS session cache: at most `capacity` sessions, each resumable for `timeout`
/// after it was stored; the oldest goes first when full.
#[derive(Debug)]
pub struct SessionCache {
    capacity: usize,
    timeout: Duration,
    sessions: Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    entries: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
    /// Keys in the order they were stored; may hold keys already taken (skipped on eviction).
    order: VecDeque<Vec<u8>>,
}

impl SessionCache {
    pub fn new(capacity: usize, timeout: Duration) -> SessionCache {
        SessionCache {
            capacity: capacity.max(1),
            timeout,
            sessions: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // Map operations only; nothing panics while the lock is held.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, stored: Instant) -> bool {
        stored.elapsed() < self.timeout
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut sessions = self.lock();
        while sessions.entries.len() >= self.capacity {
            let Some(oldest) = sessions.order.pop_front() else {
                break;
            };
            sessions.entries.remove(&oldest);
        }
        if sessions.order.len() >= 2 * self.capacity {
            // Drop keys of sessions already taken, so the order list stays bounded too.
            let Sessions { entries, order } = &mut *sessions;
            order.retain(|k| entries.contains_key(k));
        }
        sessions.order.push_back(key.clone());
        sessions.entries.insert(key, (value, Instant::now()));
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let sessions = self.lock();
        let (value, stored) = sessions.entries.get(key)?;
        self.fresh(*stored).then(|| value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let (value, stored) = self.lock().entries.remove(key)?;
        self.fresh(stored).then_some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The client configuration for TLS to an upstream's backends: verify them against `ca`,
/// present a client certificate when one is configured (mTLS to the backend), and offer the
/// configured ALPN protocols (with `alpn = "client"`, see [`UpstreamTls::config_for`]).
pub fn client_config(tls: &crate::config::UpstreamTlsConfig) -> Result<UpstreamTls, TlsError> {
    let roots = trust_anchors("backend CA", &tls.ca, &read("backend CA", &tls.ca)?)?;
    let identity = tls.client_cert.as_ref().map(ClientIdentity::read).transpose()?;
    let mut config = checked_client_config(roots, identity.as_ref())?;
    if let crate::config::UpstreamAlpn::Fixed(list) = &tls.alpn {
        config.alpn_protocols = list.iter().map(|p| p.as_bytes().to_vec()).collect();
    }
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name: tls.server_name.clone(),
        pass_client_alpn: tls.alpn == crate::config::UpstreamAlpn::Client,
        by_protocol: Mutex::default(),
    })
}

/// TLS to an upstream's backends.
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The name to verify (default: the backend's host).
    pub server_name: Option<String>,
    /// `alpn = "client"`: offer the backend the protocol the client negotiated.
    pass_client_alpn: bool,
    /// With `pass_client_alpn`, the configuration per protocol, made at first use. Bounded: the
    /// protocols are those the listeners offer.
    by_protocol: Mutex<HashMap<Vec<u8>, Arc<rustls::ClientConfig>>>,
}

impl UpstreamTls {
    /// The configuration to dial a backend with for a client that negotiated `client_alpn`.
    pub fn config_for(&self, client_alpn: Option<&[u8]>) -> Arc<rustls::ClientConfig> {
        let Some(protocol) = client_alpn.filter(|_| self.pass_client_alpn) else {
            return Arc::clone(&self.config);
        };
        let mut by_protocol = self.by_protocol.lock().unwrap_or_else(|p| p.into_inner());
        let config = by_protocol.entry(protocol.to_vec()).or_insert_with(|| {
            let mut config = (*self.config).clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            Arc::new(config)
        });
        Arc::clone(config)
    }
}

/// The TLS files for the shared rate limit's Redis, checked like [`client_config`] checks an
/// upstream's (CA usable, key matching the certificate), as the PEM the redis client takes.
/// Without `ca` the redis client trusts the system's roots.
pub fn redis_certificates(tls: &crate::config::RedisTlsConfig) -> Result<redis::TlsCertificates, TlsError> {
    let (roots, root_cert) = match &tls.ca {
        Some(path) => {
            let pem = read("Redis CA", path)?;
            (trust_anchors("Redis CA", path, &pem)?, Some(pem))
        }
        None => (RootCertStore::empty(), None),
    };
    let identity = tls.client_cert.as_ref().map(ClientIdentity::read).transpose()?;
    checked_client_config(roots, identity.as_ref())?;
    Ok(redis::TlsCertificates {
        client_tls: identity.map(|identity| redis::ClientTlsConfig {
            client_cert: identity.cert_pem,
            client_key: identity.key_pem,
        }),
        root_cert,
    })
}

/// A client certificate and key as read from their files, PEM.
struct ClientIdentity {
    cert: PathBuf,
    key: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ClientIdentity {
    fn read((cert, key): &(PathBuf, PathBuf)) -> Result<ClientIdentity, TlsError> {
        Ok(ClientIdentity {
            cert_pem: read("client certificate", cert)?,
            key_pem: read("client key", key)?,
            cert: cert.clone(),
            key: key.clone(),
        })
    }
}

/// A client configuration verifying servers against `roots` and presenting `identity`: the
/// check that the key matches the certificate.
fn checked_client_config(
    roots: RootCertStore,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .with_root_certificates(roots);
    let Some(identity) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = certificates("client certificate", &identity.cert, &identity.cert_pem)?;
    let key = private_key("client key", &identity.key, &identity.key_pem)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            cert: identity.cert.clone(),
            key: identity.key.clone(),
            reason: e.to_string(),
        })
}

/// The bytes of a certificate or key file.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Every certificate of a CA file (`pem`, read from `path`) as trust anchors.
fn trust_anchors(what: &'static str, path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(what, path, pem)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Every certificate in `pem` (read from `path`); an error if there is none.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            reason: pem_reason(e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in `pem` (read from `path`).
fn private_key(what: &'static str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: pem_reason(e),
    })
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
        other => format!("{other:?}"),
    }
}

pub mod expiry;

#[cfg(test)]
mod tests;
