//! `fulcrum verify`: judges a client certificate chain exactly as a handshake on a listener would
//! at a given time, through the same code (the listener's `trust::Trust` loaded
//! by `tls`, the identity rule, authorization), contacting nothing. The operator's answer to
//! "why was my client refused?".
//!
//! This module loads the listener's trust files and renders the verdict; it must not hold a
//! rule of its own about certificates or authorization.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::authz::{Authorization, Decision, Denial, Matched};
use crate::config::{Config, ListenerConfig};

/// Why no verdict could be given (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no listener named {0:?}")]
    NoSuchListener(String),
    #[error("listener {0:?} does not verify client certificates (no client_ca or trust_domains)")]
    NotMutual(String),
    #[error(
        "listener {0:?} takes its client trust from the SPIFFE Workload API (source = \"spiffe\"), \
         which `fulcrum verify` does not contact: it judges with files only"
    )]
    WorkloadApi(String),
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
    /// The authorization entry that decided: `exact entry "ID"`, `pattern "P"`, `deny entry
    /// "P"` or `no entry`.
    pub matched: Option<String>,
    /// Upstreams granted only from networks: without `--from`, which; with it, those the
    /// source is outside of.
    pub only_from_networks: Vec<String>,
    /// What the shadow table would decide, if the listener's table has one.
    pub shadow: Option<Shadow>,
}

/// The shadow table's verdict on the same identity.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Shadow {
    pub matched: String,
    /// The routed upstreams the shadow table would allow.
    pub upstreams: Vec<String>,
}

/// What `fulcrum verify` is asked: which listener (left out: the only mTLS one), for which
/// server name (SNI), from which source address (left out: grants limited to networks are
/// reported as such), at what time.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub listener: Option<&'a str>,
    pub server_name: Option<&'a str>,
    pub from: Option<IpAddr>,
    pub at: SystemTime,
}

impl Verdict {
    fn refused(reason: &str, detail: String) -> Verdict {
        Verdict {
            verdict: "refused",
            identity: None,
            reason: Some(reason.into()),
            detail: Some(detail),
            upstreams: Vec::new(),
            matched: None,
            only_from_networks: Vec::new(),
            shadow: None,
        }
    }

    pub fn accepted(&self) -> bool {
        self.verdict == "accepted"
    }

    /// `accepted: IDENTITY; may reach: UP1, UP2 (ENTRY)` or `refused: REASON: detail`, then
    /// the grants limited to networks and the shadow verdict, if any.
    pub fn line(&self) -> String {
        let mut line = match (self.accepted(), &self.identity) {
            (true, Some(identity)) => format!(
                "accepted: {identity}; may reach: {} ({})",
                self.upstreams.join(", "),
                self.matched.as_deref().unwrap_or("no entry")
            ),
            _ => format!(
                "refused: {}: {}",
                self.reason.as_deref().unwrap_or(""),
                self.detail.as_deref().unwrap_or("")
            ),
        };
        if !self.only_from_networks.is_empty() {
            line.push_str(&format!(
                "; only from listed networks: {}",
                self.only_from_networks.join(", ")
            ));
        }
        if let Some(shadow) = &self.shadow {
            line.push_str(&format!(
                "; shadow would allow: {} ({})",
                shadow.upstreams.join(", "),
                shadow.matched
            ));
        }
        line
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

/// Judges `chain` as `question`'s listener would.
pub fn judge(
    config: &Config,
    question: Question<'_>,
    chain: &[CertificateDer<'static>],
) -> Result<Verdict, VerifyError> {
    let Question {
        listener,
        server_name,
        from,
        at,
    } = question;
    let listener = pick(config, listener)?;
    let Some(tls) = &listener.tls else {
        return Err(VerifyError::NotMutual(listener.name.clone()));
    };
    if tls.source.is_spiffe() {
        return Err(VerifyError::WorkloadApi(listener.name.clone()));
    }
    // The certificate entry the server name picks (or the default one): its trust, and its own
    // authorization if it has one.
    let entry = tls
        .certificate_for(server_name)
        .or_else(|| tls.certificates.iter().find(|c| c.default));
    let files = entry.map_or_else(|| tls.trust(), |c| c.trust());
    let Some((trust, _)) = crate::tls::client_trust_of(files, tls.identity_from_cn)? else {
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
    let own = entry.and_then(|c| c.authorization.as_ref());
    let policy = match own.or(listener.authorization.as_ref()) {
        Some(own) => own.inheriting_deny(&config.authorization),
        None => config.authorization.clone(),
    };
    let authorization = Authorization::new(&policy);
    let mut routed: Vec<&String> = std::iter::once(&listener.upstream)
        .chain(listener.sni.iter().map(|(_, u)| u))
        .chain(listener.alpn_routes.iter().map(|(_, u)| u))
        .collect();
    routed.sort();
    routed.dedup();
    // Without --from, no network holds the unspecified address: what needs one says so.
    let source = from.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let allowed = |table: &Authorization| -> (Vec<String>, Vec<String>) {
        let (mut allowed, mut networks) = (Vec::new(), Vec::new());
        for upstream in &routed {
            match table.check(&identity, upstream, source) {
                Decision::Allow => allowed.push(upstream.to_string()),
                Decision::Deny(Denial::Source) => networks.push(upstream.to_string()),
                Decision::Deny(_) => {}
            }
        }
        (allowed, networks)
    };
    let matched = authorization.judge(&identity, &listener.upstream, source).matched;
    if let Matched::Deny(..) = matched {
        let mut verdict = Verdict::refused("denied", format!("{identity} is refused by {matched}"));
        verdict.identity = Some(identity.to_string());
        verdict.matched = Some(matched.to_string());
        return Ok(verdict);
    }
    let (upstreams, only_from_networks) = allowed(&authorization);
    let shadow = authorization.shadow().map(|shadow| Shadow {
        matched: shadow
            .judge(&identity, &listener.upstream, source)
            .matched
            .to_string(),
        upstreams: allowed(shadow).0,
    });
    Ok(Verdict {
        verdict: "accepted",
        identity: Some(identity.to_string()),
        reason: None,
        detail: None,
        upstreams,
        matched: Some(matched.to_string()),
        only_from_networks,
        shadow,
    })
}

fn pick<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c ListenerConfig, VerifyError> {
    let mutual = |l: &ListenerConfig| l.tls.as_ref().is_some_and(|t| t.verifies_clients());
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
