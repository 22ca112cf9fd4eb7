//! The client certificate verifier of an mTLS listener: its [`Trust`] loaded from the files
//! (`client_ca`, `trust_domains`, `crl`) and run inside rustls's handshake. The rules are the
//! trust core's (`trust`); this room reads files and adapts to rustls.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::CertificateError;
use x509_parser::prelude::FromDer;

use super::files::{certificates, pem_reason, read, TlsError};
use super::provider::chosen_provider;
use crate::config::{TlsConfig, TrustFiles};
use crate::trust::{CrlError, CrlInfo, Revocations, Store, Trust};

/// The client certificate verifier of an mTLS listener: `Trust::verify` at handshake time,
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

    pub(crate) fn take_recent(&self, chain: &[CertificateDer<'static>]) -> Option<SystemTime> {
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

/// The client trust of a listener (`client_ca`, `trust_domains`, `crl`, `identity_from_cn`), or
/// `None` without client authentication; with the CRLs' report. The fallback's, on a listener
/// with certificate entries (see [`TlsConfig`]); [`client_trust_of`] loads any certificate's.
pub fn client_trust(tls: &TlsConfig) -> Result<Option<(Trust, Vec<CrlInfo>)>, TlsError> {
    client_trust_of(tls.trust(), tls.identity_from_cn)
}

/// The client trust loaded from `files`, identities taken by the listener's `identity_from_cn`;
/// `None` without client authentication.
pub fn client_trust_of(
    files: TrustFiles<'_>,
    identity_from_cn: bool,
) -> Result<Option<(Trust, Vec<CrlInfo>)>, TlsError> {
    if !files.verifies_clients() {
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
        client_ca: files.client_ca.map(|path| store("client CA", path)).transpose()?,
        rule: crate::identity::Rule {
            from_common_name: identity_from_cn,
        },
        ..Trust::default()
    };
    for (domain, path) in files.trust_domains {
        trust
            .trust_domains
            .insert(domain.clone(), store("trust domain bundle", path)?);
    }
    let mut crls = Vec::new();
    if let Some(path) = files.crl {
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
