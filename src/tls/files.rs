//! Reading the certificate, key and CA files of the TLS settings, and why one cannot be used
//! ([`TlsError`]). It reads files and parses PEM; it must not build configurations or decide
//! trust.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

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
    #[error("source = \"spiffe\": no X509-SVID has come from the Workload API yet")]
    NotDelivered,
    #[error("the Workload API gave no X509-SVID {wanted:?} (it gave: {offered})")]
    NoSvid { wanted: String, offered: String },
    #[error("the X509-SVID {id} from the Workload API cannot be used: {reason}")]
    Svid { id: String, reason: String },
    #[error("the Workload API's bundle of trust domain {domain:?} cannot be used: {reason}")]
    Bundle { domain: String, reason: String },
    #[error("CRL file {path}: {reason}")]
    Crl { path: PathBuf, reason: String },
    #[error(
        "CRL file {path}: the CRL issued by {issuer} is not signed by a CA certificate of client_ca or of a trust domain's bundle that may sign CRLs"
    )]
    CrlIssuer { path: PathBuf, issuer: String },
    #[error(
        "this build's crypto provider ({provider}) has no {group}; build with the default aws-lc-rs provider or remove it from key_exchange"
    )]
    UnsupportedKxGroup {
        provider: &'static str,
        group: crate::config::KxGroup,
    },
}

/// The bytes of a certificate or key file.
pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Every certificate of a CA file (`pem`, read from `path`) as trust anchors.
pub(crate) fn trust_anchors(what: &'static str, path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
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
pub(crate) fn certificates(
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
pub(crate) fn private_key(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: pem_reason(e),
    })
}

pub(crate) fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
        other => format!("{other:?}"),
    }
}
