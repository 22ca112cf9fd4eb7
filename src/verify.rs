//! `fulcrum verify`: judges a client certificate chain exactly as a handshake on a listener would
//! at a given time, through the same code (the listener's `trust::Trust` loaded
//! by `tls`, the identity rule, authorization), contacting nothing. The operator's answer to
//! "why was my client refused?".
//!
//! This module loads the listener's trust files and renders the verdict; it must not hold a
//! rule of its own about certificates or authorization.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::authz::{Authorization, Decision};
use crate::config::{Config, ListenerConfig};

/// Why no verdict could be given (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no listener named {0:?}")]
    NoSuchListener(String),
    #[error("listener {0:?} does not verify client certificates (no client_ca or trust_domains)")]
    NotMutual(String),
    #[error("no listener verifies client certificates")]
    NoMutualListener,
    #[error("several listeners verify client certificates ({0}): name one with --listener")]
    Ambiguous(String),
    #[error("cannot read the chain file {path}: {reason}")]
    Chain { path: PathBuf, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The judgment on a chain, as printed.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `accepted` or `refused`.
    pub verdict: &'static str,
    pub identity: Option<String>,
    /// A handshake failure reason (`fulcrum_tls_handshake_failures_total`'s label), or
    /// `unauthorized` for a chain without a usable identity (as the log line says).
    pub reason: Option<String>,
    pub detail: Option<String>,
    /// The upstreams this listener routes to that the identity may reach.
    pub upstreams: Vec<String>,
}

impl Verdict {
    fn refused(reason: &str, detail: String) -> Verdict {
        Verdict {
            verdict: "refused",
            identity: None,
            reason: Some(reason.into()),
            detail: Some(detail),
            upstreams: Vec::new(),
        }
    }

    pub fn accepted(&self) -> bool {
        self.verdict == "accepted"
    }

    /// `accepted: IDENTITY; may reach: UP1, UP2` or `refused: REASON: detail`.
    pub fn line(&self) -> String {
        match (self.accepted(), &self.identity) {
            (true, Some(identity)) => {
                format!("accepted: {identity}; may reach: {}", self.upstreams.join(", "))
            }
            _ => format!(
                "refused: {}: {}",
                self.reason.as_deref().unwrap_or(""),
                self.detail.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Reads a PEM chain file: the leaf first, then what a client would send.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let failed = |reason: String| VerifyError::Chain {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(format!("{e:?}")))?;
    if chain.is_empty() {
        return Err(failed("no PEM certificate".into()));
    }
    Ok(chain)
}

/// Judges `chain` on the listener named `listener` (or the only one verifying clients) at `at`.
pub fn judge(
    config: &Config,
    listener: Option<&str>,
    chain: &[CertificateDer<'static>],
    at: SystemTime,
) -> Result<Verdict, VerifyError> {
    let listener = pick(config, listener)?;
    let Some(tls) = &listener.tls else {
        return Err(VerifyError::NotMutual(listener.name.clone()));
    };
    let Some((trust, _)) = crate::tls::client_trust(tls)? else {
        return Err(VerifyError::NotMutual(listener.name.clone()));
    };
    let verified = match trust.verify(chain, at) {
        Ok(verified) => verified,
        Err(rejection) => return Ok(Verdict::refused(rejection.reason.label(), rejection.detail)),
    };
    let identity = match verified.certified {
        Ok(certified) => certified.identity,
        Err(e) => return Ok(Verdict::refused("unauthorized", e.to_string())),
    };
    let table = listener.authorization.as_ref().unwrap_or(&config.authorization);
    let authorization = Authorization::new(table.iter().cloned());
    let mut routed: Vec<&String> = std::iter::once(&listener.upstream)
        .chain(listener.sni.iter().map(|(_, u)| u))
        .chain(listener.alpn_routes.iter().map(|(_, u)| u))
        .collect();
    routed.sort();
    routed.dedup();
    let upstreams = routed
        .into_iter()
        .filter(|u| authorization.check(&identity, u) == Decision::Allow)
        .cloned()
        .collect();
    Ok(Verdict {
        verdict: "accepted",
        identity: Some(identity.to_string()),
        reason: None,
        detail: None,
        upstreams,
    })
}

fn pick<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c ListenerConfig, VerifyError> {
    let mutual = |l: &ListenerConfig| {
        l.tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some() || !t.trust_domains.is_empty())
    };
    if let Some(name) = name {
        let listener = config
            .listeners
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| VerifyError::NoSuchListener(name.into()))?;
        return if mutual(listener) {
            Ok(listener)
        } else {
            Err(VerifyError::NotMutual(name.into()))
        };
    }
    let candidates: Vec<&ListenerConfig> = config.listeners.iter().filter(|l| mutual(l)).collect();
    match candidates.as_slice() {
        [] => Err(VerifyError::NoMutualListener),
        [one] => Ok(one),
        several => Err(VerifyError::Ambiguous(
            several
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}
