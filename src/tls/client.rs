//! TLS as a client: to an upstream's backends (`[upstream.tls]`) and to the shared rate limit's
//! Redis (`[rate_limit.shared.tls]`). It builds client configurations from checked files; it
//! must not serve or decide anything about clients of fulcrum. A backend is verified against
//! `ca` and the name dialed, or with `server_identity` against `ca` and the identities its
//! certificate carries (`client/server_identity.rs`). Backends are offered the upstream's
//! `key_exchange` groups in its order, a key share sent for the first (and, with the hybrid
//! first, for X25519 too: rustls sends its classical part's share when X25519 is offered).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use super::files::{certificates, private_key, read, trust_anchors, TlsError};
use super::provider::{provider, provider_with};
use crate::authz::Name;

mod server_identity;

/// The client configuration for TLS to an upstream's backends: verify them against `ca` (and
/// the dial name, or `server_identity`), present a client certificate when one is configured
/// (mTLS to the backend), and offer the configured ALPN protocols (with `alpn = "client"`, see
/// [`UpstreamTls::config_for`]).
pub fn client_config(tls: &crate::config::UpstreamTlsConfig) -> Result<UpstreamTls, TlsError> {
    let roots = trust_anchors("backend CA", &tls.ca, &read("backend CA", &tls.ca)?)?;
    let identity = tls.client_cert.as_ref().map(ClientIdentity::read).transpose()?;
    let provider = provider_with(&tls.key_exchange)?;
    let config = checked_client_config(provider, roots, tls.server_identity.as_deref(), identity.as_ref())?;
    Ok(upstream_tls(tls, config))
}

/// [`client_config`] for `source = "spiffe"`: the SVID (`chain`, `key`) as the client certificate, and
/// each backend's chain verified against the bundle of its SPIFFE ID's trust domain before its
/// identity is checked against `server_identity` (which config validation requires).
pub(crate) fn workload_client_config(
    tls: &crate::config::UpstreamTlsConfig,
    (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    mismatch: impl FnOnce(String) -> TlsError,
    bundles: std::collections::BTreeMap<String, RootCertStore>,
) -> Result<UpstreamTls, TlsError> {
    let provider = provider_with(&tls.key_exchange)?;
    let algorithms = provider.signature_verification_algorithms;
    let expected = tls.server_identity.as_deref().unwrap_or_default();
    let verifier = server_identity::ServerIdentityVerifier::new(
        server_identity::Roots::TrustDomains(bundles),
        expected,
        algorithms,
    );
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| mismatch(e.to_string()))?;
    Ok(upstream_tls(tls, config))
}

/// The upstream's TLS around a client configuration: its ALPN and server name settings.
fn upstream_tls(tls: &crate::config::UpstreamTlsConfig, mut config: rustls::ClientConfig) -> UpstreamTls {
    if let crate::config::UpstreamAlpn::Fixed(list) = &tls.alpn {
        config.alpn_protocols = list.iter().map(|p| p.as_bytes().to_vec()).collect();
    }
    UpstreamTls {
        config: Arc::new(config),
        server_name: tls.server_name.clone(),
        pass_client_alpn: tls.alpn == crate::config::UpstreamAlpn::Client,
        by_protocol: Mutex::default(),
    }
}

/// TLS to an upstream's backends.
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI (default: the backend's host), verified unless `server_identity`
    /// is set.
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

    /// The error of a failed handshake to a backend (what tokio-rustls returns), made readable:
    /// a refusal by `server_identity` is its own message, naming the identities found and
    /// expected, rather than rustls's debug rendering of it.
    pub fn handshake_error(&self, error: std::io::Error) -> std::io::Error {
        server_identity::readable(error)
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
    checked_client_config(provider(), roots, None, identity.as_ref())?;
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

/// A client configuration with `provider` verifying servers against `roots` and the name dialed,
/// or with `server_identity` the identity they present, and presenting `identity`: the check
/// that the key matches the certificate.
fn checked_client_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: RootCertStore,
    server_identity: Option<&[Name]>,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = match server_identity {
        None => builder.with_root_certificates(roots),
        Some(expected) => builder.dangerous().with_custom_certificate_verifier(Arc::new(
            server_identity::ServerIdentityVerifier::new(
                server_identity::Roots::Ca(roots),
                expected,
                algorithms,
            ),
        )),
    };
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
