//! TLS termination for listeners: loading certificates and building each listener's rustls
//! configuration; and the client side, to backends (`[upstream.tls]`) and to the shared rate
//! limit's Redis (`[rate_limit.shared.tls]`).
//!
//! Policy, fixed here and nowhere else: the crypto provider of [`provider`] (ring by default);
//! TLS 1.3, plus TLS 1.2 with ECDHE key exchange and AEAD ciphers only when `min_version = "1.2"`
//! (rustls offers nothing weaker); with `client_ca`, a client certificate chaining to that CA is
//! required (rustls/webpki check the chain, validity dates and the clientAuth key usage). Every
//! listener gets its own `ServerConfig` and so its own session cache: a session made on one
//! listener cannot be resumed on another with different trust. Tickets are not issued, so
//! resumption is stateful and stays inside the process.
//!
//! The redis client builds its own rustls configuration at each connect, from the process-wide
//! default provider: [`install_default_provider`] makes that ours, and [`redis_certificates`]
//! checks the files the same way as [`client_config`] before handing them over as PEM.
//!
//! This module reads certificate files and builds configs; it does not accept connections or
//! decide who is authorized (that is `connection` with `identity` and `authz`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{TlsConfig, TlsVersion};

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
/// apart so that a reload can check open connections' certificates against a new CA.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl ServerTls {
    /// Whether a client certificate chain (leaf first) still verifies under this listener's CA.
    /// Always true without client authentication.
    pub fn accepts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some(verifier) = &self.client_verifier else {
            return true;
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

/// Loads certificate, key and CA files and builds a listener's server configuration.
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
    let builder = match &tls.client_ca {
        Some(path) => {
            let roots = trust_anchors("client CA", path, &read("client CA", path)?)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
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
    Ok(ServerTls {
        config: Arc::new(config),
        client_verifier,
    })
}

/// The client configuration for TLS to an upstream's backends: verify them against `ca`, and
/// present a client certificate when one is configured (mTLS to the backend).
pub fn client_config(tls: &crate::config::UpstreamTlsConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = trust_anchors("backend CA", &tls.ca, &read("backend CA", &tls.ca)?)?;
    let identity = tls.client_cert.as_ref().map(ClientIdentity::read).transpose()?;
    Ok(Arc::new(checked_client_config(roots, identity.as_ref())?))
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

#[cfg(test)]
mod tests;
