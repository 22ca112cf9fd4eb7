//! TLS material from the SPIFFE Workload API (`source = "spiffe"`): the X509-SVIDs and the
//! bundles one response carried ([`Material`]), and the listener and upstream configurations
//! made of them, with the same policy as those made of files. Pure: the material comes in as
//! values (`crate::workload` talks to the Workload API); nothing here reads a file or a clock.
//!
//! A listener's client trust is every bundle, each bound to its trust domain (`trust::Trust`'s
//! `trust_domains`): a client's SPIFFE ID must chain to its own domain's bundle, federated
//! domains included. A backend's chain is verified against the bundle of its SPIFFE ID's
//! domain, then its identity against `server_identity`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

use super::{Certificates, ClientVerifier, TlsError, UpstreamTls};
use crate::config::{TlsConfig, UpstreamTlsConfig};
use crate::trust::{Store, Trust};

/// One X509-SVID: its SPIFFE ID, certificate chain (leaf first) and PKCS#8 private key.
pub struct Svid {
    pub id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Svid {
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The error of a key that does not match the SVID's certificate.
    pub(crate) fn mismatch(&self, reason: String) -> TlsError {
        TlsError::Svid {
            id: self.id.clone(),
            reason,
        }
    }
}

impl Clone for Svid {
    fn clone(&self) -> Svid {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl PartialEq for Svid {
    fn eq(&self, other: &Svid) -> bool {
        self.id == other.id
            && self.chain == other.chain
            && self.key.secret_pkcs8_der() == other.key.secret_pkcs8_der()
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// What one Workload API response delivered: the workload's SVIDs (the first is the default)
/// and the X.509 bundles by trust domain name (`example.org`), its own and federated ones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Material {
    pub svids: Vec<Svid>,
    pub bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl Material {
    /// The SVID with SPIFFE ID `wanted`, or the default (first) one.
    pub fn pick(&self, wanted: Option<&str>) -> Result<&Svid, TlsError> {
        let found = match wanted {
            Some(id) => self.svids.iter().find(|s| s.id == id),
            None => self.svids.first(),
        };
        found.ok_or_else(|| TlsError::NoSvid {
            wanted: wanted.unwrap_or("any").to_string(),
            offered: self
                .svids
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Each bundle as a trust store, by trust domain. An unusable bundle (no CA certificate)
    /// is an error naming its domain.
    fn stores(&self) -> Result<BTreeMap<String, Store>, TlsError> {
        self.bundles
            .iter()
            .map(|(domain, certs)| {
                Store::new(certs.clone())
                    .map(|store| (domain.clone(), store))
                    .map_err(|reason| TlsError::Bundle {
                        domain: domain.clone(),
                        reason,
                    })
            })
            .collect()
    }
}

/// A listener's certificate and client trust from `material`: its SVID (`svid`, else the
/// default) served, every client verified against its trust domain's bundle.
pub(crate) fn server_configs(tls: &TlsConfig, material: &Material) -> Result<Certificates, TlsError> {
    let svid = material.pick(tls.source.svid())?;
    let trust = Trust {
        trust_domains: material.stores()?,
        rule: crate::identity::Rule {
            from_common_name: tls.identity_from_cn,
        },
        ..Trust::default()
    };
    let verifier = Arc::new(ClientVerifier::new(trust));
    let fallback = super::serving(
        tls,
        svid.chain.clone(),
        svid.private_key(),
        (Some(verifier), Vec::new()),
        |reason| svid.mismatch(reason),
    )?;
    Ok(Certificates {
        fallback,
        entries: Vec::new(),
    })
}

/// An upstream's TLS from `material`: its SVID presented to the backends, their chains verified
/// against their trust domains' bundles.
pub(crate) fn client_config(tls: &UpstreamTlsConfig, material: &Material) -> Result<UpstreamTls, TlsError> {
    let svid = material.pick(tls.source.svid())?;
    let mut roots = BTreeMap::new();
    for (domain, certs) in &material.bundles {
        let mut store = RootCertStore::empty();
        let (_, unusable) = store.add_parsable_certificates(certs.iter().cloned());
        if store.is_empty() {
            return Err(TlsError::Bundle {
                domain: domain.clone(),
                reason: format!("no usable CA certificate ({unusable} unusable)"),
            });
        }
        roots.insert(domain.clone(), store);
    }
    let identity = (svid.chain.clone(), svid.private_key());
    super::client::workload_client_config(tls, identity, |reason| svid.mismatch(reason), roots)
}
