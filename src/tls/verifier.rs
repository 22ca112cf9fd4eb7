//! The client certificate verifier of an mTLS listener: its [`Trust`] loaded from the files
//! (`client_ca`, `trust_domains`, `crl`) and run inside rustls's handshake. The rules are the
//! trust core's (`trust`); this room reads files and adapts to rustls.
//!
//! CRLs fetched from their distribution points come in as DER: [`ClientVerifier::check_crl`]
//! checks one as a file's CRL is checked (`trust::Revocations`: signed by a CA of the trust that
//! may sign CRLs, bound to its key), and [`ClientVerifier::with_fetched`] makes the verifier
//! again from the same stores with the file's CRLs and the fetched ones.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::CertificateError;
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::files::{certificates, pem_reason, read, TlsError};
use super::provider::chosen_provider;
use crate::config::{CrlFetch, TlsConfig, TrustFiles, MAX_CRL_URLS};
use crate::trust::{CrlError, CrlInfo, Revocations, Store, Trust};

/// The client certificate verifier of an mTLS listener: `Trust::verify` at handshake time,
/// with the TLS signature checks of the crypto provider. It remembers the verdicts of the last
/// few handshakes so that admission reads the verified path's expiry without verifying again.
#[derive(Debug)]
pub struct ClientVerifier {
    pub trust: Trust,
    /// The `crl` file's CRLs, as read: [`ClientVerifier::with_fetched`] applies them again.
    file_crls: Vec<CertificateRevocationListDer<'static>>,
    hints: Vec<rustls::DistinguishedName>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    recent: Mutex<VecDeque<(Vec<CertificateDer<'static>>, SystemTime)>>,
    /// With `crl_from_certificates`: where the distribution points of the client certificates
    /// seen are recorded (shared by every generation of the listener).
    seen: Option<Arc<SeenPoints>>,
}

/// The HTTP CRL distribution points named by client certificates this listener verified
/// (`crl_from_certificates`), in the order first seen, at most [`MAX_CRL_URLS`]; and a wake-up
/// for the fetcher when one is added. Only a leaf whose path to an anchor verified (accepted,
/// or refused only for want of a CRL) is read, so a client cannot make fulcrum fetch a URL of
/// its choosing with a certificate the trust did not issue.
#[derive(Debug)]
pub struct SeenPoints {
    urls: Mutex<Vec<String>>,
    /// How many were recorded: the fetcher waits for a change.
    count: tokio::sync::watch::Sender<usize>,
}

impl Default for SeenPoints {
    fn default() -> SeenPoints {
        SeenPoints {
            urls: Mutex::default(),
            count: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl SeenPoints {
    /// The points recorded so far.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.urls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes whenever a point is recorded.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Records the points of `leaf` not yet recorded, while there is room.
    fn record(&self, leaf: &CertificateDer<'_>) {
        let points = distribution_points_of(leaf);
        if points.is_empty() {
            return;
        }
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        let before = urls.len();
        for point in points {
            if urls.len() < MAX_CRL_URLS && !urls.contains(&point) {
                urls.push(point);
            }
        }
        if urls.len() > before {
            self.count.send_replace(urls.len());
        }
    }
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
            file_crls: Vec::new(),
            hints,
            algorithms: chosen_provider().signature_verification_algorithms,
            recent: Mutex::default(),
            seen: None,
        }
    }

    /// The verifier of `files` (see [`client_trust_of`]), keeping the file's CRLs for
    /// `ClientVerifier::with_fetched`; `None` without client authentication.
    pub fn load(
        files: TrustFiles<'_>,
        identity_from_cn: bool,
    ) -> Result<Option<(ClientVerifier, Vec<CrlInfo>)>, TlsError> {
        Ok(
            load_trust(files, identity_from_cn)?.map(|(trust, info, file_crls)| {
                let verifier = ClientVerifier {
                    file_crls,
                    ..ClientVerifier::new(trust)
                };
                (verifier, info)
            }),
        )
    }

    /// Checks a fetched CRL exactly as a file's (signed by a CA of this trust that may sign
    /// CRLs, of a kind `trust` applies in full), and reads what the replace rule compares.
    pub(crate) fn check_crl(&self, der: &CertificateRevocationListDer<'_>) -> Result<CheckedCrl, CrlError> {
        let cas: Vec<_> = self.trust.all_cas().collect();
        let (_, info) = Revocations::load(std::slice::from_ref(der), &cas)?;
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| CrlError::Invalid(format!("a CRL cannot be parsed: {e}")))?;
        let info = info
            .into_iter()
            .next()
            .ok_or_else(|| CrlError::Invalid("no CRL".into()))?;
        Ok(CheckedCrl {
            issuer: info.issuer,
            number: crl.crl_number().map(|n| n.to_bytes_be()),
            this_update: seconds(crl.last_update().timestamp()),
            next_update: info.next_update,
        })
    }

    /// This verifier again with `fetched` CRLs applied beside the file's (the file's only when
    /// `fetched` is empty, but then always checking revocation: a certificate of an issuer no CRL
    /// covers is refused). A fetched CRL that does not pass [`ClientVerifier::check_crl`] here
    /// (the stores changed since it was fetched) is left out, and returned.
    /// With `seen` (`crl_from_certificates`), the verifier records the distribution points of
    /// the client certificates it verifies there.
    pub(crate) fn with_fetched(
        &self,
        fetched: &[CertificateRevocationListDer<'static>],
        seen: Option<Arc<SeenPoints>>,
    ) -> (ClientVerifier, Vec<CrlInfo>, Vec<(usize, CrlError)>) {
        let mut unusable = Vec::new();
        let mut crls = self.file_crls.clone();
        for (i, der) in fetched.iter().enumerate() {
            match self.check_crl(der) {
                Ok(_) => crls.push(der.clone()),
                Err(e) => unusable.push((i, e)),
            }
        }
        let cas: Vec<_> = self.trust.all_cas().collect();
        // Each CRL loads on its own (the file's at its load, the others just now), so together.
        let (revocations, info) = Revocations::load(&crls, &cas).unwrap_or_default();
        let trust = Trust {
            client_ca: self.trust.client_ca.clone(),
            trust_domains: self.trust.trust_domains.clone(),
            revocations: Some(revocations),
            rule: self.trust.rule,
        };
        let verifier = ClientVerifier {
            file_crls: self.file_crls.clone(),
            seen,
            ..ClientVerifier::new(trust)
        };
        (verifier, info, unusable)
    }

    /// The URLs a listener with these settings fetches: `crl_urls`, then (with
    /// `crl_from_certificates`) the distribution points of the `client_ca` certificates and of
    /// the client certificates seen, not already listed, at most [`MAX_CRL_URLS`] in all; and how
    /// many of those were left out.
    pub(crate) fn crl_urls(&self, fetch: &CrlFetch, seen: Option<&SeenPoints>) -> (Vec<String>, usize) {
        let mut urls = fetch.urls.clone();
        let mut ignored = 0;
        if fetch.from_certificates {
            let seen = seen.iter().flat_map(|s| s.urls());
            for url in self.distribution_points().into_iter().chain(seen) {
                if urls.contains(&url) {
                    continue;
                }
                match urls.len() < MAX_CRL_URLS {
                    true => urls.push(url),
                    false => ignored += 1,
                }
            }
        }
        (urls, ignored)
    }

    /// The HTTP CRL distribution points of the `client_ca` certificates, in file order, each
    /// once (`crl_from_certificates`).
    fn distribution_points(&self) -> Vec<String> {
        let mut urls: Vec<String> = Vec::new();
        let stores = self.trust.client_ca.iter();
        for der in stores.flat_map(|s| s.anchors.iter().chain(&s.intermediates)) {
            for uri in distribution_points_of(der) {
                if !urls.contains(&uri) {
                    urls.push(uri);
                }
            }
        }
        urls
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
        let verdict = self.trust.verify(&chain, now);
        if let Some(seen) = &self.seen {
            // The leaf is on a verified path: accepted, or refused only for want of a CRL.
            let on_path = match &verdict {
                Ok(_) => true,
                Err(rejection) => rejection.reason == crate::metrics::HandshakeFailure::RevocationUnknown,
            };
            if on_path {
                seen.record(end_entity);
            }
        }
        match verdict {
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
    Ok(load_trust(files, identity_from_cn)?.map(|(trust, info, _)| (trust, info)))
}

/// A loaded trust, its CRLs' report and the `crl` file's CRLs.
type LoadedTrust = (Trust, Vec<CrlInfo>, Vec<CertificateRevocationListDer<'static>>);

/// [`client_trust_of`], with the `crl` file's CRLs as read.
fn load_trust(files: TrustFiles<'_>, identity_from_cn: bool) -> Result<Option<LoadedTrust>, TlsError> {
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
    let mut file_crls = Vec::new();
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
        file_crls = ders
            .iter()
            .map(|d| CertificateRevocationListDer::from(d.as_ref().to_vec()))
            .collect();
    }
    Ok(Some((trust, crls, file_crls)))
}

/// What the replace rule of fetched CRLs compares, of a CRL whose signature was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCrl {
    /// The CRL's issuer, as text.
    pub issuer: String,
    /// Its CRL number (big-endian bytes), if it has one.
    pub number: Option<Vec<u8>>,
    pub this_update: SystemTime,
    pub next_update: Option<SystemTime>,
}

/// The `http://` CRL distribution points (full names) a certificate names, each once; URLs of
/// another scheme, and a certificate that does not parse, give none.
fn distribution_points_of(der: &CertificateDer<'_>) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return urls;
    };
    for ext in cert.extensions() {
        let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() else {
            continue;
        };
        for point in points.iter() {
            let Some(DistributionPointName::FullName(names)) = &point.distribution_point else {
                continue;
            };
            for name in names {
                if let GeneralName::URI(uri) = name {
                    let uri = uri.to_string();
                    if crate::config::crl_url(&uri).is_ok() && !urls.contains(&uri) {
                        urls.push(uri);
                    }
                }
            }
        }
    }
    urls
}

fn seconds(timestamp: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(timestamp).unwrap_or(0))
}
