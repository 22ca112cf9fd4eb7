//! CRLs as a lookup table bound to their issuers' keys. Pure: the CRLs and CA certificates come
//! in as DER; `tls` reads the files.
//!
//! Each CRL's signature is checked once, at load, against the CA certificates of the listener
//! (anchors and intermediates of `client_ca` and of every trust domain's bundle) that bear the
//! CRL's issuer name and may sign CRLs; its revoked serials are filed under the public key that
//! verified it. A certificate is then covered only by CRLs signed with its issuer's key: two CAs
//! of one name and different keys (a key rollover) each need their own CRL. A handshake costs one
//! lookup per certificate, where webpki's own CRL support verifies every CRL's signature again on
//! every handshake. Partitioned and delta CRLs, indirect CRL entries and CRLs with other critical
//! extensions are refused at load.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::signature::accepted_signature;

/// What fulcrum reports of one CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlInfo {
    /// The CRL's issuer, as text.
    pub issuer: String,
    /// When the issuer promised the next CRL; `None` if the CRL does not say.
    pub next_update: Option<SystemTime>,
}

/// Why a CRL cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    #[error("{0}")]
    Invalid(String),
    #[error("the CRL issued by {issuer} is not signed by a CA certificate of the listener (client_ca or a trust domain's bundle) that may sign CRLs")]
    Issuer { issuer: String },
}

/// Why a certificate fails its revocation check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Uncovered {
    Revoked(String),
    Unknown(String),
}

/// Revoked serial numbers per issuing key, from CRLs whose signatures were checked at load.
#[derive(Debug, Default)]
pub struct Revocations {
    /// The signer's SubjectPublicKeyInfo (DER) -> serial numbers (big-endian bytes) it revokes.
    by_key: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
}

impl Revocations {
    /// Loads CRLs, each checked against `cas` (see the module documentation).
    pub fn load(
        crls: &[CertificateRevocationListDer<'_>],
        cas: &[&CertificateDer<'_>],
    ) -> Result<(Revocations, Vec<CrlInfo>), CrlError> {
        let invalid = |reason: String| CrlError::Invalid(reason);
        let cas = cas
            .iter()
            .map(|der| X509Certificate::from_der(der).map(|(_, ca)| ca))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("a CA certificate cannot be parsed: {e}")))?;
        let mut revocations = Revocations::default();
        let mut info = Vec::with_capacity(crls.len());
        for der in crls {
            let (_, crl) = CertificateRevocationList::from_der(der)
                .map_err(|e| invalid(format!("a CRL cannot be parsed: {e}")))?;
            let issuer = crl.issuer().to_string();
            let may_sign = |ca: &X509Certificate<'_>| match ca.key_usage() {
                Ok(Some(usage)) => usage.value.crl_sign(),
                Ok(None) => true,
                Err(_) => false,
            };
            let signer = cas
                .iter()
                .filter(|ca| ca.subject() == crl.issuer() && may_sign(ca))
                .find(|ca| {
                    accepted_signature(&crl.signature_algorithm.algorithm)
                        && crl.verify_signature(ca.public_key()).is_ok()
                })
                .ok_or_else(|| CrlError::Issuer {
                    issuer: issuer.clone(),
                })?;
            check_extensions(&crl, &issuer)?;
            let revoked = revocations
                .by_key
                .entry(signer.public_key().raw.to_vec())
                .or_default();
            for entry in crl.iter_revoked_certificates() {
                if entry.extensions().iter().any(|e| e.critical) {
                    return Err(invalid(format!(
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

    /// Checks `cert`, issued by `issuer` (whose key verified its signature): covered by a CRL of
    /// that key, and not revoked by it.
    pub(super) fn check(
        &self,
        cert: &X509Certificate<'_>,
        issuer: &X509Certificate<'_>,
    ) -> Result<(), Uncovered> {
        match self.by_key.get(issuer.public_key().raw) {
            Some(revoked) if revoked.contains(cert.raw_serial()) => Err(Uncovered::Revoked(format!(
                "{} (serial {}) is revoked by a CRL of {}",
                cert.subject(),
                cert.raw_serial_as_string(),
                issuer.subject()
            ))),
            Some(_) => Ok(()),
            None => Err(Uncovered::Unknown(format!(
                "no CRL signed by the key of {}, which issued {}",
                issuer.subject(),
                cert.subject()
            ))),
        }
    }
}

/// Refuses the kinds of CRL this table cannot apply in full.
fn check_extensions(crl: &CertificateRevocationList<'_>, issuer: &str) -> Result<(), CrlError> {
    for ext in crl.extensions() {
        let unsupported = match ext.parsed_extension() {
            ParsedExtension::IssuingDistributionPoint(_) => {
                Some("a partitioned CRL (issuingDistributionPoint)")
            }
            _ if ext.oid == x509_parser::oid_registry::OID_X509_EXT_DELTA_CRL_INDICATOR => {
                Some("a delta CRL")
            }
            ParsedExtension::CRLNumber(_) | ParsedExtension::AuthorityKeyIdentifier(_) if !ext.critical => {
                None
            }
            ParsedExtension::ParseError { .. } => Some("a CRL with a malformed extension"),
            _ if ext.critical => Some("a CRL with a critical extension fulcrum does not apply"),
            _ => None,
        };
        if let Some(what) = unsupported {
            return Err(CrlError::Invalid(format!(
                "the CRL issued by {issuer} is {what}: not supported"
            )));
        }
    }
    Ok(())
}
