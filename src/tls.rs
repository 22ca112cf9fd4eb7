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
    #[error("client CA file {path}: certificate not usable as a trust anchor: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider every TLS object in fulcrum uses: ring by default, AWS-LC with the
/// `aws-lc-rs` feature.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
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
            client_verifier = Some(Arc::clone(&verifier));
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
    Ok(ServerTls {
        config: Arc::new(config),
        client_verifier,
    })
}

/// The client configuration for TLS to an upstream's backends: verify them against `ca`, and
/// present a client certificate when one is configured (mTLS to the backend).
pub fn client_config(tls: &crate::config::UpstreamTlsConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("backend CA", &tls.ca)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: tls.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates("client certificate", cert)?;
            let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
                what: "client key",
                path: key.clone(),
                reason: pem_reason(e),
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| TlsError::KeyMismatch {
                    cert: cert.clone(),
                    key: key.clone(),
                    reason: e.to_string(),
                })?
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;

    /// A temp dir with a CA, a server cert/key pair and a second, unrelated key.
    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            let dir = std::env::temp_dir().join(format!("fulcrum-tls-test-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let ca = Ca::new("test CA").unwrap();
            let server = ca.server(&[]).unwrap();
            let other = ca.server(&[]).unwrap();
            std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
            std::fs::write(dir.join("server.pem"), &server.cert).unwrap();
            std::fs::write(dir.join("server.key"), &server.key).unwrap();
            std::fs::write(dir.join("other.key"), &other.key).unwrap();
            std::fs::write(dir.join("empty.pem"), "").unwrap();
            Files { dir }
        }

        fn config(&self, cert: &str, key: &str, ca: Option<&str>) -> TlsConfig {
            TlsConfig {
                cert: self.dir.join(cert),
                key: self.dir.join(key),
                client_ca: ca.map(|c| self.dir.join(c)),
                min_version: TlsVersion::Tls12,
            }
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn error(result: Result<ServerTls, TlsError>) -> String {
        match result {
            Ok(_) => panic!("config was built but should not be"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn matching_files_build_a_config_with_and_without_client_auth() {
        let f = Files::new("ok");
        assert!(server_config(&f.config("server.pem", "server.key", Some("ca.pem"))).is_ok());
        assert!(server_config(&f.config("server.pem", "server.key", None)).is_ok());
    }

    #[test]
    fn an_unreadable_file_is_named_in_the_error() {
        let f = Files::new("missing");
        let e = error(server_config(&f.config("nope.pem", "server.key", None)));
        assert!(e.contains("certificate file") && e.contains("nope.pem"), "{e}");
        let e = error(server_config(&f.config("server.pem", "nope.key", None)));
        assert!(e.contains("key file") && e.contains("nope.key"), "{e}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let f = Files::new("mismatch");
        let e = error(server_config(&f.config("server.pem", "other.key", None)));
        assert!(e.contains("does not match") && e.contains("other.key"), "{e}");
    }

    #[test]
    fn an_empty_ca_bundle_is_refused() {
        let f = Files::new("emptyca");
        let e = error(server_config(&f.config(
            "server.pem",
            "server.key",
            Some("empty.pem"),
        )));
        assert!(e.contains("client CA") && e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn a_certificate_file_without_certificates_is_refused() {
        let f = Files::new("nocert");
        let e = error(server_config(&f.config("empty.pem", "server.key", None)));
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
