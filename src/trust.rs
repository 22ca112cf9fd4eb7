//! The client trust boundary of an mTLS listener: which certificate chains it accepts, and why
//! it refuses the others. Pure: certificates, CRLs and the time come in as values; files are read
//! by `tls`, which wraps [`Trust`] in rustls's client verifier. The same [`Trust::verify`] judges a
//! handshake, a resumed session, the open connections after a reload, and `fulcrum verify`.
//!
//! # Anchors and intermediates
//! A CA file (`client_ca`, a trust domain's bundle) is split into a [`Store`]: a certificate whose
//! issuer is another certificate of the same file is an **intermediate**; the others (self-issued
//! roots, and CA certificates whose issuer the file does not hold) are **anchors**. Paths are built
//! from the client's leaf up to an anchor through the intermediates the client sent and those of
//! the file, checking each link's signature (so two roots of one name are told apart by key).
//!
//! # What a path must satisfy ([`Trust::verify`])
//! Every certificate on it, the anchor included, is within its validity dates and carries no
//! unknown critical extension, no malformed extension, and no critical key identifier or
//! authority information access; every issuer is a CA (basicConstraints), may sign certificates
//! (keyUsage), respects its path length, and allows client authentication when it has an
//! extended key usage; the leaf is not a CA, carries no `keyCertSign` and no name constraints,
//! and its extended key usage (if any) lists clientAuth. Name constraints of every CA on the path
//! (`trust::names`) bind the names of the certificates below it and the identity itself. With CRLs,
//! every certificate below the anchor must be covered by a CRL signed with its issuer's key
//! ([`Revocations`]) and not revoked by it.
//!
//! This module must not read files or clocks and must not decide authorization (`authz`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::identity::{self, Certified, IdentityError, NameField, Rule};
use crate::metrics::HandshakeFailure;

mod names;
mod revocation;
mod signature;

pub use revocation::CrlInfo;
use revocation::Uncovered;
pub(crate) use revocation::{CrlError, Revocations};
use signature::accepted_signature;

/// The most certificates a client may send (leaf included).
const MAX_PRESENTED: usize = 10;
/// The most intermediates between a leaf and its anchor.
const MAX_INTERMEDIATES: usize = 6;
/// The most signatures one path search may check (a client cannot make us verify more).
const SIGNATURE_BUDGET: usize = 64;

/// Why a chain is refused: the handshake failure reason (the metric's label) and a sentence for
/// the log line and `fulcrum verify`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.label())]
pub struct Rejection {
    pub reason: HandshakeFailure,
    pub detail: String,
}

impl Rejection {
    fn new(reason: HandshakeFailure, detail: impl fmt::Display) -> Rejection {
        Rejection {
            reason,
            detail: detail.to_string(),
        }
    }
}

/// What a verified chain establishes.
#[derive(Debug)]
pub struct Verified {
    /// The leaf's identity under the listener's rule (an error refuses the client later, as
    /// unauthorized: the chain itself is sound).
    pub certified: Result<Certified, IdentityError>,
    /// The earliest `notAfter` on the verified path, anchor included.
    pub not_after: SystemTime,
}

/// The CA certificates of one file, split into anchors and intermediates.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub anchors: Vec<CertificateDer<'static>>,
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Certificates of the file not used: (subject, why).
    pub unusable: Vec<(String, String)>,
}

impl Store {
    /// Splits a CA file's certificates (see the module documentation). An anchor that is not a
    /// CA certificate, or has an unknown critical extension, is left out and listed in
    /// `unusable`; a file without a usable anchor is an error.
    pub fn new(certificates: Vec<CertificateDer<'static>>) -> Result<Store, String> {
        let parsed = certificates
            .iter()
            .map(|der| parse(der).map_err(|e| format!("a certificate cannot be parsed: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut store = Store::default();
        for (index, cert) in parsed.iter().enumerate() {
            let issued_by_another = !self_issued(cert)
                && parsed
                    .iter()
                    .enumerate()
                    .any(|(other, c)| other != index && c.subject().as_raw() == cert.issuer().as_raw());
            let der = certificates[index].clone();
            if issued_by_another {
                store.intermediates.push(der);
                continue;
            }
            match anchor_fault(cert) {
                None => store.anchors.push(der),
                Some(why) => store.unusable.push((cert.subject().to_string(), why)),
            }
        }
        if store.anchors.is_empty() {
            return Err(match store.unusable.first() {
                Some((subject, why)) => format!("no usable trust anchor ({subject}: {why})"),
                None => "no trust anchor: every certificate is issued by another one in the file".into(),
            });
        }
        Ok(store)
    }

    /// The subjects of the anchors and intermediates, as text, for `fulcrum check`.
    pub fn describe(&self) -> (Vec<String>, Vec<String>) {
        let subjects = |ders: &[CertificateDer<'static>]| {
            ders.iter()
                .filter_map(|der| parse(der).ok().map(|c| c.subject().to_string()))
                .collect()
        };
        (subjects(&self.anchors), subjects(&self.intermediates))
    }
}

/// Why a certificate cannot be a trust anchor, if it cannot.
fn anchor_fault(cert: &X509Certificate<'_>) -> Option<String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Some("not a CA certificate (no basicConstraints CA:TRUE)".into()),
        Err(e) => return Some(format!("malformed basicConstraints: {e}")),
    }
    extension_fault(cert).map(|e| e.detail)
}

/// A listener's client trust: the stores, the CRLs, and the identity rule (which picks the
/// store for a SPIFFE ID and is bound by name constraints).
#[derive(Debug, Default)]
pub struct Trust {
    /// `client_ca`: chains of certificates without a SPIFFE ID (and of every certificate when
    /// `trust_domains` is empty).
    pub client_ca: Option<Store>,
    /// `trust_domains`: a SPIFFE ID of trust domain TD must chain to TD's bundle.
    pub trust_domains: BTreeMap<String, Store>,
    /// `crl`: `None` without CRLs (no revocation check).
    pub revocations: Option<Revocations>,
    pub rule: Rule,
}

impl Trust {
    /// Every anchor and intermediate of every store (for CRL signers and certificate hints).
    pub fn all_cas(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.client_ca
            .iter()
            .chain(self.trust_domains.values())
            .flat_map(|s| s.anchors.iter().chain(&s.intermediates))
    }

    /// The anchors of every store.
    pub fn anchors(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.client_ca
            .iter()
            .chain(self.trust_domains.values())
            .flat_map(|s| s.anchors.iter())
    }

    /// Judges a client's chain (leaf first, then what it sent) at `now`.
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: SystemTime) -> Result<Verified, Rejection> {
        let bad = |detail: String| Rejection::new(HandshakeFailure::BadCertificate, detail);
        let Some((leaf_der, sent)) = chain.split_first() else {
            return Err(Rejection::new(
                HandshakeFailure::NoCertificate,
                "no client certificate",
            ));
        };
        if chain.len() > MAX_PRESENTED {
            return Err(bad(format!(
                "the client sent {} certificates; at most {MAX_PRESENTED} are taken",
                chain.len()
            )));
        }
        let leaf =
            parse(leaf_der).map_err(|e| bad(format!("the client certificate cannot be parsed: {e}")))?;
        let sent = sent
            .iter()
            .map(|der| {
                parse(der).map_err(|e| bad(format!("a certificate the client sent cannot be parsed: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let certified = identity::inspect(leaf_der, self.rule);
        let (store, source) = self.store_for(certified.as_ref().ok())?;
        leaf_fault(&leaf)?;
        let anchors = parse_all(&store.anchors);
        let mut intermediates = parse_all(&store.intermediates);
        intermediates.extend(sent);
        let mut search = Search {
            anchors: &anchors,
            intermediates: &intermediates,
            budget: SIGNATURE_BUDGET,
            judge: |path: &[&X509Certificate<'_>]| self.judge(path, certified.as_ref().ok(), now),
            first_error: None,
        };
        let mut path = vec![&leaf];
        match search.extend(&mut path) {
            Some(not_after) => Ok(Verified { certified, not_after }),
            None => Err(search.first_error.unwrap_or_else(|| {
                Rejection::new(
                    HandshakeFailure::UnknownCa,
                    format!(
                        "no path from the certificate's issuer {} to an anchor of {source}",
                        leaf.issuer()
                    ),
                )
            })),
        }
    }

    /// The store a certificate with this identity must chain to, and how to name it.
    fn store_for(&self, certified: Option<&Certified>) -> Result<(&Store, String), Rejection> {
        let spiffe = certified
            .filter(|c| c.field == NameField::SpiffeUri)
            .map(|c| c.identity.as_str());
        match spiffe {
            Some(id) if !self.trust_domains.is_empty() => {
                let domain = trust_domain(id);
                match self.trust_domains.get(domain) {
                    Some(store) => Ok((store, format!("trust domain {domain:?}'s bundle"))),
                    None => Err(Rejection::new(
                        HandshakeFailure::TrustDomain,
                        format!(
                            "{id} is of trust domain {domain:?}, which this listener does not trust (trust_domains: {})",
                            self.trust_domains.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )),
                }
            }
            _ => match &self.client_ca {
                Some(store) => Ok((store, "client_ca".into())),
                None => Err(Rejection::new(
                    HandshakeFailure::UnknownCa,
                    "the certificate has no SPIFFE ID and this listener has no client_ca (only trust_domains)",
                )),
            },
        }
    }

    /// Judges one signature-linked path (leaf first, anchor last); returns its earliest
    /// `notAfter`.
    fn judge(
        &self,
        path: &[&X509Certificate<'_>],
        certified: Option<&Certified>,
        now: SystemTime,
    ) -> Result<SystemTime, Rejection> {
        for (depth, issuer) in path.iter().enumerate().skip(1) {
            issuer_fault(issuer, depth - 1)?;
        }
        for cert in path {
            dates(cert, now)?;
        }
        names::check(path, certified).map_err(|v| Rejection::new(HandshakeFailure::NameConstraints, v))?;
        if let Some(revocations) = &self.revocations {
            for pair in path.windows(2) {
                revocations.check(pair[0], pair[1]).map_err(|e| match e {
                    Uncovered::Revoked(detail) => Rejection::new(HandshakeFailure::Revoked, detail),
                    Uncovered::Unknown(detail) => Rejection::new(HandshakeFailure::RevocationUnknown, detail),
                })?;
            }
        }
        Ok(path.iter().map(|c| not_after(c)).min().unwrap_or(UNIX_EPOCH))
    }
}

/// A SPIFFE ID's trust domain: the authority of `spiffe://TD/...`.
pub(crate) fn trust_domain(id: &str) -> &str {
    let rest = id.get("spiffe://".len()..).unwrap_or("");
    rest.split('/').next().unwrap_or("")
}

/// Depth-first search for a path to an anchor, judging each complete one.
struct Search<'s, 'a, J> {
    anchors: &'s [X509Certificate<'a>],
    intermediates: &'s [X509Certificate<'a>],
    budget: usize,
    judge: J,
    /// The verdict on the first complete path that failed: the most telling reason.
    first_error: Option<Rejection>,
}

impl<'s, 'a, J> Search<'s, 'a, J>
where
    J: FnMut(&[&X509Certificate<'a>]) -> Result<SystemTime, Rejection>,
{
    /// Extends `path` (leaf first) to an anchor; the earliest `notAfter` of the first path that
    /// passes the judge.
    fn extend(&mut self, path: &mut Vec<&'s X509Certificate<'a>>) -> Option<SystemTime> {
        let current = *path.last()?;
        for anchor in self.anchors {
            if !self.signed_by(current, anchor) {
                continue;
            }
            path.push(anchor);
            let verdict = (self.judge)(path);
            path.pop();
            match verdict {
                Ok(not_after) => return Some(not_after),
                Err(e) => {
                    self.first_error.get_or_insert(e);
                }
            }
        }
        if path.len() > MAX_INTERMEDIATES {
            return None;
        }
        for intermediate in self.intermediates {
            let on_path = path.iter().any(|c| c.as_raw() == intermediate.as_raw());
            if on_path || !self.signed_by(current, intermediate) {
                continue;
            }
            path.push(intermediate);
            let found = self.extend(path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Whether `issuer` is named as `cert`'s issuer and its key verifies `cert`'s signature.
    fn signed_by(&mut self, cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
        if cert.issuer().as_raw() != issuer.subject().as_raw() || self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        signature_verifies(cert, issuer)
    }
}

fn signature_verifies(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    accepted_signature(&cert.signature_algorithm.algorithm)
        && cert.signature_algorithm == cert.tbs_certificate.signature
        && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

/// A certificate's `notAfter` (RFC 5280's last second of validity).
fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    time(cert.validity().not_after.timestamp())
}

fn time(seconds: i64) -> SystemTime {
    // Before 1970 is as good as expired (or long valid, for a notBefore).
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

fn dates(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), Rejection> {
    let validity = cert.validity();
    if now < time(validity.not_before.timestamp()) {
        return Err(Rejection::new(
            HandshakeFailure::NotYetValid,
            format!("{} is not valid before {}", cert.subject(), validity.not_before),
        ));
    }
    // notAfter is the last second of validity.
    if now > not_after(cert) + Duration::from_secs(1) {
        return Err(Rejection::new(
            HandshakeFailure::Expired,
            format!("{} expired at {}", cert.subject(), validity.not_after),
        ));
    }
    Ok(())
}

fn self_issued(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw()
}

/// An extension fault of any certificate on a path: malformed, duplicated, unknown and
/// critical, or critical where RFC 5280 says it must not be.
fn extension_fault(cert: &X509Certificate<'_>) -> Option<Rejection> {
    let bad = |what: String| {
        Some(Rejection::new(
            HandshakeFailure::BadCertificate,
            format!("{}: {what}", cert.subject()),
        ))
    };
    if let Err(e) = cert.extensions_map() {
        return bad(format!("{e}"));
    }
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ParseError { error } => {
                return bad(format!("malformed extension {}: {error}", ext.oid));
            }
            ParsedExtension::BasicConstraints(_)
            | ParsedExtension::KeyUsage(_)
            | ParsedExtension::ExtendedKeyUsage(_)
            | ParsedExtension::SubjectAlternativeName(_)
            | ParsedExtension::NameConstraints(_) => {}
            ParsedExtension::AuthorityKeyIdentifier(_)
            | ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::AuthorityInfoAccess(_)
                if ext.critical =>
            {
                return bad(format!("extension {} must not be critical", ext.oid));
            }
            _ if ext.critical => return bad(format!("unknown critical extension {}", ext.oid)),
            _ => {}
        }
    }
    None
}

/// The client leaf's own rules (see the module documentation).
fn leaf_fault(leaf: &X509Certificate<'_>) -> Result<(), Rejection> {
    let bad = |what: &str| {
        Rejection::new(
            HandshakeFailure::BadCertificate,
            format!("the client certificate {what}"),
        )
    };
    if let Some(fault) = extension_fault(leaf) {
        return Err(fault);
    }
    if leaf
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(bad("is a CA certificate"));
    }
    if leaf
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|ku| ku.value.key_cert_sign())
    {
        return Err(bad("may sign certificates (keyCertSign)"));
    }
    if leaf.name_constraints().ok().flatten().is_some() {
        return Err(bad("carries name constraints"));
    }
    if let Ok(Some(eku)) = leaf.extended_key_usage() {
        if !eku.value.client_auth {
            return Err(Rejection::new(
                HandshakeFailure::BadUsage,
                "the client certificate's extended key usage does not list clientAuth",
            ));
        }
    }
    Ok(())
}

/// An issuer's rules, `below` being the number of intermediates between it and the leaf.
fn issuer_fault(issuer: &X509Certificate<'_>, below: usize) -> Result<(), Rejection> {
    let bad = |what: String| {
        Rejection::new(
            HandshakeFailure::BadCertificate,
            format!("{}: {what}", issuer.subject()),
        )
    };
    if let Some(fault) = extension_fault(issuer) {
        return Err(fault);
    }
    match issuer.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if let Some(limit) = bc.value.path_len_constraint {
                if below > limit as usize {
                    return Err(bad(format!(
                        "its path length constraint {limit} allows fewer than the {below} CA certificates below it"
                    )));
                }
            }
        }
        _ => {
            return Err(bad(
                "issues certificates but is not a CA (basicConstraints)".into()
            ))
        }
    }
    if issuer
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|ku| !ku.value.key_cert_sign())
    {
        return Err(bad(
            "issues certificates but its key usage lacks keyCertSign".into()
        ));
    }
    if let Ok(Some(eku)) = issuer.extended_key_usage() {
        if !eku.value.client_auth && !eku.value.any {
            return Err(Rejection::new(
                HandshakeFailure::BadUsage,
                format!(
                    "{}: its extended key usage does not allow client authentication",
                    issuer.subject()
                ),
            ));
        }
    }
    Ok(())
}

fn parse<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!("{} trailing bytes after the certificate", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// The store's certificates, parsed (they parsed at load).
fn parse_all<'a>(ders: &'a [CertificateDer<'static>]) -> Vec<X509Certificate<'a>> {
    ders.iter().filter_map(|der| parse(der).ok()).collect()
}

#[cfg(test)]
mod tests;
