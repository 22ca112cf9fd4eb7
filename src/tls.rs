//! TLS termination for listeners: loading certificates and building each listener's rustls
//! configuration; and the client side, to backends (`[upstream.tls]`) and to the shared rate
//! limit's Redis (`[rate_limit.shared.tls]`).
//!
//! Policy, fixed here and nowhere else: the crypto provider of [`provider`] (AWS-LC by default);
//! TLS 1.3, plus TLS 1.2 with ECDHE key exchange and AEAD ciphers only when `min_version = "1.2"`
//! (rustls offers nothing weaker); the key exchange groups of `key_exchange` (X25519MLKEM768,
//! X25519, secp256r1, secp384r1 by default), in the listener's order, which wins over the client's
//! ([`ServerTls::config_for`], `key_exchange.rs`). With `client_ca` or `trust_domains`, a client
//! certificate is required and judged by the listener's `trust::Trust` (anchors and intermediates,
//! path, dates, name constraints, trust domains, CRLs bound to their issuer's key: see `trust`),
//! which [`client_trust`] loads from the files and [`ClientVerifier`] runs inside rustls's
//! handshake; rustls checks the client's signature with the provider's algorithms.
//!
//! Several certificates: a listener with `[[listener.tls.certificate]]` entries has one
//! [`ServerTls`] per entry besides its fallback ([`Certificates`], loaded by [`server_configs`]):
//! each its own rustls configuration, verifier and session cache, the handshake picking one by
//! the client's SNI (`config::select`). Certificates with the same client trust files share one
//! loaded verifier; none shares a session cache, so no session is resumed under another entry.
//!
//! Resumption: every listener's certificate (and every generation of it: a reload starts afresh)
//! has its own in-memory [`SessionCache`] of at most `session_cache` sessions, each resumable for
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
//! Serving: [`Hello`] reads a connection's ClientHello and [`TlsStream`] runs the handshake and
//! carries the bytes, holding buffers only while bytes move (`stream.rs`).
//!
//! This module reads certificate files and builds configs; it does not accept connections or
//! decide who is authorized (that is `connection` with `identity` and `authz`).

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, ServerConfig};

use crate::config::{TlsConfig, TlsVersion, TrustFiles};
use crate::metrics::HandshakeFailure;
pub use crate::trust::CrlInfo;
use crate::trust::{Rejection, Verified};

mod client;
pub(crate) mod crl_cache;
mod files;
mod key_exchange;
mod provider;
mod session;
mod stream;
pub mod svid;
mod verifier;

pub use client::{client_config, redis_certificates, UpstreamTls};
pub use files::TlsError;
use files::{certificates, private_key, read};
pub use provider::{install_default_provider, provider, provider_with, PROVIDER_NAME};
pub use session::SessionCache;
pub use stream::{Hello, TlsStream};
pub use verifier::{client_trust, client_trust_of, CheckedCrl, ClientVerifier, SeenPoints};

/// One certificate of a listener (its only one, its fallback or an entry): the rustls
/// configuration, and the client trust (mTLS) kept apart so that a connection can check a
/// resumed session's chain and a reload can check open connections' certificates against new
/// trust.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// mTLS: the verifier rustls runs, holding the listener's `trust::Trust`.
    pub verifier: Option<Arc<ClientVerifier>>,
    /// The CRLs in force (`[listener.tls] crl`), in file order.
    pub crls: Vec<CrlInfo>,
    /// `config` offering one key exchange group each, for [`ServerTls::config_for`].
    by_group: key_exchange::ByGroup,
}

impl ServerTls {
    /// Judges a client certificate chain (leaf first) against this listener's trust at `now`
    /// (`trust::Trust::verify`). `Ok(None)` without client authentication.
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

    /// The configuration to complete the handshake of `hello` with: `config`, or one that
    /// offers only the group the listener's `key_exchange` order prefers among those the client
    /// supports, so that the listener's order wins over the client's (`key_exchange.rs`).
    pub fn config_for(&self, hello: &rustls::server::ClientHello<'_>) -> Arc<ServerConfig> {
        self.by_group.choose(&self.config, hello)
    }

    /// This certificate with `verifier` in place of its own and `crls` as its report: the same
    /// certificate, ALPN, key exchange order and session cache (sessions are judged again at
    /// resumption, by the verifier then in force), under the listener's versions (`min_version`).
    pub fn with_verifier(
        &self,
        verifier: Arc<ClientVerifier>,
        crls: Vec<CrlInfo>,
        min_version: TlsVersion,
    ) -> Result<ServerTls, TlsError> {
        let versions = versions(min_version);
        let verifier = Some(verifier);
        let provider = Arc::clone(self.config.crypto_provider());
        let config = rebuilt(&self.config, provider, versions, &verifier)?;
        Ok(ServerTls {
            by_group: key_exchange::ByGroup::new(&config, |p| rebuilt(&config, p, versions, &verifier))?,
            config: Arc::new(config),
            verifier,
            crls,
        })
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

/// Every certificate of a TLS listener, loaded: the fallback, served when the client's SNI names
/// no entry, and each `[[listener.tls.certificate]]` entry's, in config order (a default entry
/// is the fallback too: the same configuration, session cache and verifier).
#[derive(Clone)]
pub struct Certificates {
    pub fallback: ServerTls,
    pub entries: Vec<ServerTls>,
}

/// Loads the fallback certificate of a listener (its only one without entries) with its CA and
/// CRL files, and builds its server configuration.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTls, TlsError> {
    let verifier = verifier(tls.trust(), tls.identity_from_cn)?;
    certificate(tls, &tls.cert, &tls.key, verifier)
}

/// Loads every certificate of a listener ([`Certificates`]); equal client trust files are
/// loaded once.
pub fn server_configs(tls: &TlsConfig) -> Result<Certificates, TlsError> {
    let mut verifiers: Vec<(TrustFiles<'_>, Verifier)> = Vec::new();
    let mut load = |cert, key, trust| -> Result<ServerTls, TlsError> {
        let verifier = match verifiers.iter().find(|(t, _)| *t == trust) {
            Some((_, loaded)) => loaded.clone(),
            None => {
                let loaded = verifier(trust, tls.identity_from_cn)?;
                verifiers.push((trust, loaded.clone()));
                loaded
            }
        };
        certificate(tls, cert, key, verifier)
    };
    let entries = tls
        .certificates
        .iter()
        .map(|c| load(&c.cert, &c.key, c.trust()))
        .collect::<Result<Vec<_>, _>>()?;
    let default = tls.certificates.iter().zip(&entries).find(|(c, _)| c.default);
    let fallback = match default {
        Some((_, entry)) => entry.clone(),
        None => load(&tls.cert, &tls.key, tls.trust())?,
    };
    Ok(Certificates { fallback, entries })
}

/// A certificate's client verifier (none without client authentication) and its CRLs' report.
type Verifier = (Option<Arc<ClientVerifier>>, Vec<CrlInfo>);

/// The verifier of `trust`.
fn verifier(trust: TrustFiles<'_>, identity_from_cn: bool) -> Result<Verifier, TlsError> {
    Ok(match ClientVerifier::load(trust, identity_from_cn)? {
        Some((verifier, crls)) => (Some(Arc::new(verifier)), crls),
        None => (None, Vec::new()),
    })
}

/// The server configuration of one certificate (`cert`, `key`) with `verifier`, under the
/// listener's policy (`tls`: versions, ALPN, a session cache of its own).
fn certificate(
    tls: &TlsConfig,
    cert: &std::path::Path,
    key: &std::path::Path,
    verifier: Verifier,
) -> Result<ServerTls, TlsError> {
    let chain = certificates("certificate", cert, &read("certificate", cert)?)?;
    let private_key = private_key("key", key, &read("key", key)?)?;
    serving(tls, chain, private_key, verifier, |reason| {
        TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason,
        }
    })
}

/// The server configuration of the certificate `chain` with its `private_key` and `verifier`,
/// under the listener's policy (`tls`: versions, ALPN, a session cache of its own); `mismatch`
/// says why a key that does not match the certificate is refused.
fn serving(
    tls: &TlsConfig,
    chain: Vec<CertificateDer<'static>>,
    private_key: rustls::pki_types::PrivateKeyDer<'static>,
    (verifier, crls): Verifier,
    mismatch: impl FnOnce(String) -> TlsError,
) -> Result<ServerTls, TlsError> {
    let versions = versions(tls.min_version);
    let mut config = builder(provider_with(&tls.key_exchange)?, versions, &verifier)?
        .with_single_cert(chain, private_key)
        .map_err(|e| mismatch(e.to_string()))?;
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
        by_group: key_exchange::ByGroup::new(&config, |p| rebuilt(&config, p, versions, &verifier))?,
        config: Arc::new(config),
        verifier,
        crls,
    })
}

/// The protocol versions a listener with `min_version` accepts.
fn versions(min_version: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS12: [&rustls::SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min_version {
        TlsVersion::Tls12 => &TLS12,
        TlsVersion::Tls13 => &TLS13,
    }
}

/// A server configuration under way with `provider` and `versions`, verifying clients with
/// `verifier` (none: no client authentication); its certificate comes next.
fn builder(
    provider: Arc<CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    verifier: &Option<Arc<ClientVerifier>>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(match verifier {
        Some(verifier) => {
            builder.with_client_cert_verifier(Arc::clone(verifier) as Arc<dyn ClientCertVerifier>)
        }
        None => builder.with_no_client_auth(),
    })
}

/// `old` with `provider` and `verifier` in place of its own, under `versions`: the same
/// certificate resolver, ALPN, session cache and tickets.
fn rebuilt(
    old: &ServerConfig,
    provider: Arc<CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    verifier: &Option<Arc<ClientVerifier>>,
) -> Result<ServerConfig, TlsError> {
    let mut config =
        builder(provider, versions, verifier)?.with_cert_resolver(Arc::clone(&old.cert_resolver));
    config.ignore_client_order = old.ignore_client_order;
    config.alpn_protocols = old.alpn_protocols.clone();
    config.session_storage = Arc::clone(&old.session_storage);
    config.send_tls13_tickets = old.send_tls13_tickets;
    Ok(config)
}

pub mod expiry;

#[cfg(test)]
mod tests;
