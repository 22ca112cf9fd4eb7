//! TLS termination for listeners: loading certificates and building each listener's rustls
//! configuration; and the client side, to backends (`[upstream.tls]`) and to the shared rate
//! limit's Redis (`[rate_limit.shared.tls]`).
//!
//! Policy, fixed here and nowhere else: the crypto provider of [`provider`] (ring by default);
//! TLS 1.3, plus TLS 1.2 with ECDHE key exchange and AEAD ciphers only when `min_version = "1.2"`
//! (rustls offers nothing weaker); with `client_ca`, a client certificate chaining to that CA is
//! required (rustls/webpki check the chain, validity dates and the clientAuth key usage), and
//! with `crl` it must not be revoked. Each CRL's signature is checked once, when the file is
//! loaded (it must be signed by a certificate of `client_ca` allowed to sign CRLs), and its
//! revoked serials go into a table per issuer; a handshake then costs one lookup per
//! certificate ([`Revocations`]), where webpki's own CRL support would verify every CRL's
//! signature again on every handshake. The client certificate must be covered by a CRL of its
//! issuer (otherwise it is refused as `revocation_unknown`, as nginx and HAProxy do); an
//! intermediate is refused if a CRL of its issuer revokes it. Partitioned and delta CRLs (and
//! CRLs with other critical extensions) are refused at load. A CRL past its `nextUpdate` keeps
//! being applied (see README).
//!
//! Resumption: every listener (and every generation of it: a reload starts afresh) has its own
//! in-memory [`SessionCache`] of at most `session_cache` sessions, each resumable for
//! `session_timeout`. Resumption is stateful only: TLS 1.2 by session ID, TLS 1.3 by one
//! ticket per full handshake that is a key into that cache; no stateless tickets are issued, so
//! there are no ticket keys to rotate or leak, and a session never leaves the process. rustls
//! does not verify the client certificate again on resumption, so [`ServerTls::verify`] lets
//! the connection check the stored chain now (dates, CRLs, CA): a resumption is never weaker
//! than a full handshake.
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
use rustls::server::{StoresServerSessions, WebPkiClientVerifier};
use rustls::{CertificateError, RootCertStore, ServerConfig};
use x509_parser::prelude::FromDer;

use crate::config::{TlsConfig, TlsVersion};
use crate::metrics::HandshakeFailure;

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
        "CRL file {path}: the CRL issued by {issuer} is not signed by a certificate of the client CA file"
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

/// A listener's TLS: the rustls configuration, and the client certificate verifier (mTLS) kept
/// apart so that a connection can check a resumed session's chain and a reload can check open
/// connections' certificates against new trust.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The CRLs in force (`[listener.tls] crl`), in file order.
    pub crls: Vec<CrlInfo>,
}

/// What fulcrum reports of one CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlInfo {
    /// The CRL's issuer, as text.
    pub issuer: String,
    /// When the issuer promised the next CRL; `None` if the CRL does not say.
    pub next_update: Option<SystemTime>,
}

impl ServerTls {
    /// Checks a client certificate chain (leaf first) against this listener's trust now: CA,
    /// validity dates, CRLs. Always passes without client authentication.
    pub fn verify(&self, chain: &[CertificateDer<'static>]) -> Result<(), HandshakeFailure> {
        let Some(verifier) = &self.client_verifier else {
            return Ok(());
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(HandshakeFailure::NoCertificate);
        };
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    /// Whether a client certificate chain (leaf first) still verifies under this listener's
    /// trust ([`ServerTls::verify`]).
    pub fn accepts(&self, chain: &[CertificateDer<'static>]) -> bool {
        self.verify(chain).is_ok()
    }

    /// The earliest `nextUpdate` of this listener's CRLs.
    pub fn crl_next_update(&self) -> Option<SystemTime> {
        self.crls.iter().filter_map(|c| c.next_update).min()
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
    let mut client_verifier: Option<Arc<dyn ClientCertVerifier>> = None;
    let mut crl_info = Vec::new();
    let builder = match &tls.client_ca {
        Some(path) => {
            let pem = read("client CA", path)?;
            let roots = trust_anchors("client CA", path, &pem)?;
            let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            let verifier: Arc<dyn ClientCertVerifier> = match &tls.crl {
                Some(crl_path) => {
                    let cas = certificates("client CA", path, &pem)?;
                    let (revocations, info) = revocation_lists(crl_path, &cas)?;
                    crl_info = info;
                    Arc::new(Revoking {
                        inner: webpki,
                        revocations,
                    })
                }
                None => webpki,
            };
            client_verifier = Some(Arc::clone(&verifier));
            builder.with_client_cert_verifier(verifier)
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
        client_verifier,
        crls: crl_info,
    })
}

/// Revoked serial numbers per CRL issuer, from CRLs whose signatures were checked at load.
#[derive(Debug, Default)]
pub struct Revocations {
    /// Issuer name (DER) -> serial numbers (big-endian bytes) its CRLs revoke.
    by_issuer: HashMap<Vec<u8>, std::collections::HashSet<Vec<u8>>>,
}

impl Revocations {
    /// Checks a verified chain: the client certificate must be covered by a CRL of its issuer
    /// and not revoked by it; an intermediate must not be revoked by a CRL of its issuer.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), CertificateError> {
        let chain = std::iter::once(end_entity).chain(intermediates);
        for (position, der) in chain.enumerate() {
            let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
                .map_err(|_| CertificateError::BadEncoding)?;
            match self.by_issuer.get(cert.issuer().as_raw()) {
                Some(revoked) if revoked.contains(cert.raw_serial()) => {
                    return Err(CertificateError::Revoked)
                }
                Some(_) => {}
                None if position == 0 => return Err(CertificateError::UnknownRevocationStatus),
                None => {}
            }
        }
        Ok(())
    }
}

/// A client certificate verifier that adds [`Revocations`] to webpki's checks (chain, dates,
/// key usage).
#[derive(Debug)]
struct Revoking {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for Revoking {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.revocations
            .check(end_entity, intermediates)
            .map_err(rustls::Error::InvalidCertificate)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The CRLs of a PEM file, each checked to be signed by one of `cas` (the client CA bundle) that
/// may sign CRLs, and of a kind this checker applies in full (no partitioned or delta CRLs, no
/// unknown critical extension).
fn revocation_lists(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<(Revocations, Vec<CrlInfo>), TlsError> {
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::revocation_list::CertificateRevocationList;
    let failed = |reason: String| TlsError::Crl {
        path: path.to_path_buf(),
        reason,
    };
    let pem = read("CRL", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(pem_reason(e)))?;
    if crls.is_empty() {
        return Err(failed("no PEM CRL (-----BEGIN X509 CRL-----) found".into()));
    }
    let cas = cas
        .iter()
        .map(|der| x509_parser::certificate::X509Certificate::from_der(der).map(|(_, ca)| ca))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(format!("a client CA certificate cannot be parsed: {e}")))?;
    let mut revocations = Revocations::default();
    let mut info = Vec::with_capacity(crls.len());
    for der in &crls {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| failed(format!("a CRL cannot be parsed: {e}")))?;
        let issuer = crl.issuer().to_string();
        let may_sign = |ca: &x509_parser::certificate::X509Certificate<'_>| match ca.key_usage() {
            Ok(Some(usage)) => usage.value.crl_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        let signed = cas
            .iter()
            .filter(|ca| ca.subject() == crl.issuer() && may_sign(ca))
            .any(|ca| crl.verify_signature(ca.public_key()).is_ok());
        if !signed {
            return Err(TlsError::CrlIssuer {
                path: path.to_path_buf(),
                issuer,
            });
        }
        for ext in crl.extensions() {
            let unsupported = match ext.parsed_extension() {
                ParsedExtension::IssuingDistributionPoint(_) => {
                    Some("a partitioned CRL (issuingDistributionPoint)")
                }
                _ if ext.oid == x509_parser::oid_registry::OID_X509_EXT_DELTA_CRL_INDICATOR => {
                    Some("a delta CRL")
                }
                ParsedExtension::CRLNumber(_) | ParsedExtension::AuthorityKeyIdentifier(_) => None,
                _ if ext.critical => Some("a CRL with a critical extension fulcrum does not apply"),
                _ => None,
            };
            if let Some(what) = unsupported {
                return Err(failed(format!(
                    "the CRL issued by {issuer} is {what}: not supported"
                )));
            }
        }
        let revoked = revocations
            .by_issuer
            .entry(crl.issuer().as_raw().to_vec())
            .or_default();
        for entry in crl.iter_revoked_certificates() {
            if entry.extensions().iter().any(|e| e.critical) {
                return Err(failed(format!(
                    "the CRL issued by {issuer} has an entry with a critical extension (an indirect CRL): not supported"
                )));
            }
            revoked.insert(entry.raw_serial().to_vec());
        }
        let next_update = crl
            .next_update()
            .map(|t| UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0)));
        info.push(CrlInfo { issuer, next_update });
    }
    Ok((revocations, info))
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
