//! TLS termination for listeners: loading certificates and building each listener's rustls
//! configuration.
//!
//! Policy, fixed here and nowhere else: the `ring` crypto provider (the only one compiled in);
//! TLS 1.3, plus TLS 1.2 with ECDHE key exchange and AEAD ciphers only when `min_version = "1.2"`
//! (rustls offers nothing weaker); with `client_ca`, a client certificate chaining to that CA is
//! required (rustls/webpki check the chain, validity dates and the clientAuth key usage). Every
//! listener gets its own `ServerConfig` and so its own session cache: a session made on one
//! listener cannot be resumed on another with different trust. Tickets are not issued, so
//! resumption is stateful and stays inside the process.
//!
//! This module reads certificate files and builds configs; it does not accept connections or
//! decide who is authorized (that is `connection` with `identity` and `authz`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    #[error("client CA file {path}: certificate not usable as a trust anchor: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider every TLS object in fulcrum uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads certificate, key and CA files and builds a listener's server configuration.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA", path)? {
                roots.add(cert).map_err(|e| TlsError::BadCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = certificates("certificate", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError::Read {
        what: "key",
        path: tls.key.clone(),
        reason: pem_reason(e),
    })?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            reason: e.to_string(),
        })?;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; an error if there is none.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |reason: String| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
        other => format!("{other:?}"),
    }
}
