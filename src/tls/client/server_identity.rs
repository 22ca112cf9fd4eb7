//! `[upstream.tls] server_identity`: a backend verified by the identity its certificate carries
//! instead of by the name fulcrum dialed. [`ServerIdentityVerifier`] verifies the chain exactly
//! as rustls's own verifier does (a path to `ca`, validity dates, the serverAuth usage: webpki,
//! through [`verify_server_cert_signed_by_trust_anchor`]), then replaces the name check: one of
//! the leaf's identities ([`identities`]: its SPIFFE URI SANs and DNS SANs) must match one entry.
//!
//! This file decides whether a backend's certificate is acceptable and says why not
//! ([`IdentityMismatch`]); it must not choose the SNI sent (the dial does) nor count or log a
//! refusal (the connection's dial phase and health do).

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

use crate::authz::Name;
use crate::identity::Escaped;

/// Verifies a backend's chain against the upstream's `ca` and its identity against
/// `server_identity`; the name fulcrum dialed (and sent as SNI) plays no part.
#[derive(Debug)]
pub(super) struct ServerIdentityVerifier {
    roots: Roots,
    /// Never empty (config validation refuses an empty list).
    expected: Arc<[Name]>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// What a backend's chain must lead to.
#[derive(Debug)]
pub(super) enum Roots {
    /// `ca`'s certificates.
    Ca(RootCertStore),
    /// The Workload API's bundles by trust domain: the bundle of the trust domain of the leaf's
    /// SPIFFE ID, so that a federated domain's CA cannot vouch for an identity of another.
    TrustDomains(std::collections::BTreeMap<String, RootCertStore>),
}

impl Roots {
    /// The store the chain of a leaf with these `identities` must lead to.
    fn for_leaf(&self, identities: &[String]) -> Result<&RootCertStore, rustls::Error> {
        match self {
            Roots::Ca(roots) => Ok(roots),
            Roots::TrustDomains(by_domain) => identities
                .iter()
                .filter(|id| is_spiffe(id))
                .find_map(|id| by_domain.get(crate::trust::trust_domain(id)))
                .ok_or(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        }
    }
}

impl ServerIdentityVerifier {
    pub(super) fn new(
        roots: Roots,
        expected: &[Name],
        algorithms: WebPkiSupportedAlgorithms,
    ) -> ServerIdentityVerifier {
        ServerIdentityVerifier {
            roots,
            expected: expected.into(),
            algorithms,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain first, as `WebPkiServerVerifier` does it: nothing about an unverified
        // certificate is worth reading.
        // (With trust domains, the leaf's SPIFFE ID, unverified, only picks the bundle to verify
        // it against: a wrong claim finds a bundle that does not sign it.)
        let found = identities(end_entity)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            self.roots.for_leaf(&found)?,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if found
            .iter()
            .any(|identity| self.expected.iter().any(|name| name.matches(identity)))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = IdentityMismatch {
            found,
            expected: Arc::clone(&self.expected),
        };
        Err(CertificateError::Other(OtherError(Arc::new(mismatch))).into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identities of a (verified) leaf certificate, in certificate order: its URI SANs whose
/// scheme is `spiffe` and its DNS SANs, as written. A DNS SAN spelling a URI (`://`) is none,
/// so that it cannot pass for a SPIFFE ID; other SANs and the subject are never identities.
fn identities(der: &[u8]) -> Result<Vec<String>, rustls::Error> {
    let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| bad())?;
    let Some(sans) = cert.subject_alternative_name().map_err(|_| bad())? else {
        return Ok(Vec::new());
    };
    let names = sans.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) if is_spiffe(uri) => Some(uri.to_string()),
        GeneralName::DNSName(dns) if !dns.contains("://") => Some(dns.to_string()),
        _ => None,
    });
    Ok(names.collect())
}

/// Whether `uri`'s scheme is `spiffe` (in any letter case, as RFC 3986 has it; the URI is still
/// compared as written).
fn is_spiffe(uri: &str) -> bool {
    uri.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

/// A backend whose chain verified but whose certificate is none of `server_identity`.
#[derive(Clone, Debug, thiserror::Error)]
pub(super) struct IdentityMismatch {
    /// The leaf's identities ([`identities`]).
    found: Vec<String>,
    expected: Arc<[Name]>,
}

/// Identities named in a refusal at most; a certificate may carry many SANs.
const NAMED_AT_MOST: usize = 4;

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found.as_slice() {
            [] => f.write_str("backend certificate has no SPIFFE ID or DNS name, so it is not")?,
            [one] => write!(f, "backend certificate identity {} is not", Escaped(one))?,
            many => {
                f.write_str("backend certificate identities ")?;
                for (i, name) in many.iter().take(NAMED_AT_MOST).enumerate() {
                    let comma = if i > 0 { ", " } else { "" };
                    write!(f, "{comma}{}", Escaped(name))?;
                }
                if many.len() > NAMED_AT_MOST {
                    write!(f, " (and {} more)", many.len() - NAMED_AT_MOST)?;
                }
                f.write_str(" are not")?;
            }
        }
        f.write_str(" server_identity ")?;
        for (i, name) in self.expected.iter().enumerate() {
            let or = if i > 0 { " or " } else { "" };
            write!(f, "{or}{name}")?;
        }
        Ok(())
    }
}

/// The error of a failed TLS handshake to a backend (what tokio-rustls returns), with a refusal
/// by `server_identity` as its own message rather than as rustls's debug rendering of it.
pub(super) fn readable(error: io::Error) -> io::Error {
    let mismatch = match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            other.0.downcast_ref::<IdentityMismatch>().cloned()
        }
        _ => None,
    };
    match mismatch {
        Some(mismatch) => io::Error::new(io::ErrorKind::InvalidData, mismatch),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    fn ia5(text: &str) -> rcgen::string::Ia5String {
        text.try_into().expect("IA5")
    }

    #[test]
    fn spiffe_uri_sans_and_dns_sans_are_identities_and_nothing_else_is() {
        let der = leaf(vec![
            rcgen::SanType::URI(ia5("spiffe://prod.example/ns/db/sa/pg")),
            rcgen::SanType::URI(ia5("https://pg.example/")),
            rcgen::SanType::DnsName(ia5("pg.db.internal")),
            rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
            rcgen::SanType::Rfc822Name(ia5("pg@example.org")),
        ]);
        assert_eq!(
            identities(&der).expect("parses"),
            ["spiffe://prod.example/ns/db/sa/pg", "pg.db.internal"]
        );
    }

    #[test]
    fn a_dns_san_spelling_a_spiffe_id_is_not_an_identity() {
        let der = leaf(vec![rcgen::SanType::DnsName(ia5(
            "spiffe://prod.example/ns/db/sa/pg",
        ))]);
        assert_eq!(identities(&der).expect("parses"), Vec::<String>::new());
    }

    #[test]
    fn a_refusal_names_the_identities_found_and_expected_with_control_characters_escaped() {
        let expected: Arc<[Name]> = ["spiffe://td/a", "*.db.internal"]
            .iter()
            .map(|text| Name::parse(text).expect("name"))
            .collect();
        let refusal = |found: &[&str]| {
            IdentityMismatch {
                found: found.iter().map(|s| s.to_string()).collect(),
                expected: Arc::clone(&expected),
            }
            .to_string()
        };
        assert_eq!(
            refusal(&["spiffe://td/b"]),
            "backend certificate identity spiffe://td/b is not server_identity spiffe://td/a or *.db.internal"
        );
        assert_eq!(
            refusal(&["x\ny", "b", "c", "d", "e", "f"]),
            "backend certificate identities x\\ny, b, c, d (and 2 more) are not server_identity \
             spiffe://td/a or *.db.internal"
        );
        assert_eq!(
            refusal(&[]),
            "backend certificate has no SPIFFE ID or DNS name, so it is not server_identity \
             spiffe://td/a or *.db.internal"
        );
    }
}
