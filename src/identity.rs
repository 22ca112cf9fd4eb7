//! Client identity: turns the DER bytes of a client's leaf certificate into the one name that
//! authorization and rate limiting key on. This module owns the identity rule below and nothing
//! else. It must not verify anything the trust core (`trust`) verifies (the path to an anchor,
//! validity periods, signatures, name constraints) and it must not do I/O: it only parses and extracts, so the rule
//! is tested with plain `#[test]`s on certificates generated at test time.
//!
//! # The identity rule
//!
//! This is the one place the rule is written down; docs/security.md and docs/configuration.md point here.
//!
//! 1. **Purpose.** If the certificate carries an extended key usage (EKU) extension, that
//!    extension must list `id-kp-clientAuth` (1.3.6.1.5.5.7.3.2) or `anyExtendedKeyUsage`;
//!    otherwise the certificate is refused. A certificate with *no* EKU extension is accepted:
//!    RFC 5280 reads the absence as "any purpose", which is also how webpki (rustls's verifier)
//!    treats client certificates. (webpki itself does not honour `anyExtendedKeyUsage`, so with
//!    rustls's stock client verifier a certificate listing only that is refused before it gets
//!    here.)
//! 2. **Name.** The identity is, in order of precedence:
//!    1. the URI SAN whose scheme is `spiffe` (the full URI string, for example
//!       `spiffe://example.org/ns/prod/sa/web`; the scheme is recognised in any letter case, as
//!       RFC 3986 says, but the URI is returned as written). An X.509-SVID has exactly one: a
//!       certificate with several `spiffe` URI SANs is refused;
//!    2. else the first DNS SAN;
//!    3. else, only when the certificate has neither a `spiffe` URI SAN nor a DNS SAN and the
//!       listener allows it (`identity_from_cn`, on by default), the subject Common Name. A
//!       subject with several Common Names is refused as ambiguous. With `identity_from_cn =
//!       false` such a certificate has no identity and is refused. Under a name-constrained CA a
//!       Common Name identity is refused by `trust` (no constraint form limits what it says).
//!
//!    As in RFC 6125, a SAN wins over the Common Name: `CN=alice` with DNS SAN `bob` is `bob`.
//!    Only `spiffe` URI SANs and DNS SANs count; other SANs (non-`spiffe` URIs, e-mail
//!    addresses, IP addresses, ...) are ignored for identity purposes, so a certificate whose
//!    only SANs are of those kinds falls back to its Common Name.
//! 3. **Validity of the name.** The chosen name must be non-empty, valid UTF-8 and free of NUL,
//!    every other control character (Unicode category Cc), every format character (category
//!    Cf: bidirectional overrides and isolates, zero-width characters, the soft hyphen, ...) and
//!    the line and paragraph separators. A DNS SAN or Common Name containing `://` is refused:
//!    only a `spiffe` URI SAN may look like a URI, so no other field can pass for a SPIFFE ID in
//!    `[authorization]`. A Common Name must be encoded as UTF8String, PrintableString,
//!    IA5String or NumericString. If the chosen name breaks any of this, the certificate is
//!    refused: the rule never falls through to a weaker name. A malformed or duplicated SAN or
//!    EKU extension also refuses the certificate.
//! 4. **No normalisation.** The name is returned byte-exact: no case folding, no trimming, no
//!    Unicode normalisation. Authorization compares it exactly.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::asn1_rs::{Any, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The authenticated name of a client, as chosen by [`identity_from_der`].
///
/// Cloning is cheap (a reference count), so the identity can be carried in spans and used as a
/// rate-limit key without copying the name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientIdentity(Arc<str>);

impl ClientIdentity {
    /// Wraps a name without checking it.
    ///
    /// Identities of real clients come only from [`identity_from_der`]; this constructor exists
    /// for tests and for code that rebuilds an identity it already trusts (for example a name
    /// read from configuration). Nothing here makes an unchecked name safe to log or compare:
    /// [`Display`](fmt::Display) escapes control characters, and authorization refuses names
    /// containing NUL.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name, byte-exact.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared name, for use as a map key without copying the string.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for ClientIdentity {
    /// Writes the name; control characters (which [`identity_from_der`] never produces) are
    /// escaped so that a hand-built identity cannot forge log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Escaped(&self.0).fmt(f)
    }
}

/// A name from a certificate for a log line or a message, its control characters escaped so
/// that it cannot forge log lines.
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(char::is_control) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl AsRef<str> for ClientIdentity {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ClientIdentity {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<ClientIdentity> for Arc<str> {
    fn from(identity: ClientIdentity) -> Self {
        identity.0
    }
}

/// Which certificate field an identity (or a refused name) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameField {
    /// A URI subject alternative name with the `spiffe` scheme.
    SpiffeUri,
    /// A DNS subject alternative name.
    Dns,
    /// The subject Common Name.
    CommonName,
}

impl fmt::Display for NameField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameField::SpiffeUri => "spiffe URI SAN",
            NameField::Dns => "DNS SAN",
            NameField::CommonName => "common name",
        })
    }
}

/// Why a verified client certificate yields no identity. Every variant refuses the connection.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The DER (or one of the extensions the rule reads) is malformed, duplicated or truncated.
    #[error("certificate could not be parsed: {reason}")]
    Unparsable {
        /// What the parser objected to.
        reason: String,
    },
    /// The certificate has an EKU extension without clientAuth or anyExtendedKeyUsage.
    #[error("certificate's extended key usage does not allow client authentication")]
    NotForClientAuth,
    /// No spiffe URI SAN, no DNS SAN and no Common Name.
    #[error("certificate has no usable identity (no spiffe URI SAN, no DNS SAN and no common name)")]
    NoIdentity,
    /// No `spiffe` URI SAN and no DNS SAN, on a listener with `identity_from_cn = false`.
    #[error("certificate has no spiffe URI SAN and no DNS SAN, and this listener does not take the common name (identity_from_cn = false)")]
    NoSan,
    /// No SAN to choose from and more than one Common Name.
    #[error(
        "certificate has no spiffe URI or DNS SAN and {count} common names, so its identity is ambiguous"
    )]
    AmbiguousCommonName {
        /// How many Common Names the subject has.
        count: usize,
    },
    /// The chosen name is the empty string.
    #[error("certificate {field} is empty")]
    EmptyName {
        /// Where the empty name was found.
        field: NameField,
    },
    /// More than one `spiffe` URI SAN: an X.509-SVID has exactly one.
    #[error("certificate has {count} spiffe URI SANs; an X.509-SVID has exactly one")]
    SeveralSpiffeIds {
        /// How many `spiffe` URI SANs the certificate has.
        count: usize,
    },
    /// A DNS SAN or Common Name that reads like a URI (contains `://`).
    #[error("certificate {field} {value} looks like a URI; only a spiffe URI SAN may")]
    LooksLikeUri {
        /// Where the refused name was found.
        field: NameField,
        /// The refused name, quoted, escaped and cut to 64 characters.
        value: String,
    },
    /// The chosen name is not UTF-8 or contains a control or format character.
    #[error(
        "certificate name is not valid UTF-8 or contains a control or format character ({field} {value})"
    )]
    InvalidName {
        /// Where the refused name was found.
        field: NameField,
        /// The refused name, quoted, escaped and cut to 64 characters.
        value: String,
    },
}

/// How a listener turns certificates into identities: the parts of the rule an operator sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `identity_from_cn`: whether a certificate without a `spiffe` URI SAN or DNS SAN may be
    /// named by its Common Name.
    pub from_common_name: bool,
}

impl Default for Rule {
    fn default() -> Self {
        Rule {
            from_common_name: true,
        }
    }
}

/// What a verified leaf certificate says about its client: the identity, and when the
/// certificate stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certified {
    pub identity: ClientIdentity,
    /// Which field the identity came from (name constraints bind each form differently).
    pub field: NameField,
    /// The certificate's `notAfter`.
    pub not_after: SystemTime,
    /// The certificate's serial number, lowercase hex with colons (`01:a2:...`), as logged.
    pub serial: String,
}

/// Extracts the client identity from a leaf certificate that rustls has already verified, with
/// the default [`Rule`].
///
/// Applies the rule in the [module documentation](self): EKU check first, then the name
/// precedence spiffe URI SAN > DNS SAN > Common Name, then the validity of the chosen name.
pub fn identity_from_der(der: &[u8]) -> Result<ClientIdentity, IdentityError> {
    inspect(der, Rule::default()).map(|certified| certified.identity)
}

/// Reads a verified leaf certificate once: its identity under `rule`, and its `notAfter`.
pub fn inspect(der: &[u8], rule: Rule) -> Result<Certified, IdentityError> {
    let cert = parse(der)?;
    check_client_auth(&cert)?;
    let (field, name) = choose_name(&cert, rule)?;
    Ok(Certified {
        identity: checked_identity(field, name)?,
        field,
        not_after: not_after_of(&cert),
        serial: serial_of(&cert),
    })
}

/// A certificate's serial, lowercase hex bytes joined by colons (`01:a2:...`).
fn serial_of(cert: &X509Certificate<'_>) -> String {
    cert.raw_serial_as_string()
}

/// The `notAfter` of a certificate (for the intermediates of a chain; the leaf's comes from
/// [`inspect`]).
pub fn not_after(der: &[u8]) -> Result<SystemTime, IdentityError> {
    parse(der).map(|cert| not_after_of(&cert))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|err| match err {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => unparsable(e),
        x509_parser::nom::Err::Incomplete(_) => IdentityError::Unparsable {
            reason: "the DER is truncated".to_owned(),
        },
    })?;
    if !rest.is_empty() {
        return Err(IdentityError::Unparsable {
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

fn not_after_of(cert: &X509Certificate<'_>) -> SystemTime {
    let seconds = cert.validity().not_after.timestamp();
    // A notAfter before 1970 is as good as expired.
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The raw bytes of the chosen name, before validation.
enum RawName<'a> {
    Text(&'a str),
    NotUtf8(&'a [u8]),
}

fn unparsable(err: X509Error) -> IdentityError {
    IdentityError::Unparsable {
        reason: err.to_string(),
    }
}

fn check_client_auth(cert: &X509Certificate<'_>) -> Result<(), IdentityError> {
    match cert.extended_key_usage().map_err(unparsable)? {
        None => Ok(()),
        Some(eku) if eku.value.client_auth || eku.value.any => Ok(()),
        Some(_) => Err(IdentityError::NotForClientAuth),
    }
}

/// Context-specific tag numbers of the GeneralName choices the rule reads (RFC 5280 4.2.1.6).
const DNS_NAME_TAG: u32 = 2;
const URI_TAG: u32 = 6;

fn choose_name<'a>(
    cert: &'a X509Certificate<'a>,
    rule: Rule,
) -> Result<(NameField, RawName<'a>), IdentityError> {
    let sans: &[GeneralName<'a>] = match cert.subject_alternative_name().map_err(unparsable)? {
        Some(ext) => &ext.value.general_names,
        None => &[],
    };
    // x509-parser reports a SAN entry whose bytes are not UTF-8 as `Invalid`; such an entry is
    // still the chosen name when it is in the chosen position, and is then refused.
    let spiffe: Vec<RawName<'a>> = sans
        .iter()
        .filter_map(|san| match san {
            GeneralName::URI(uri) if has_spiffe_scheme(uri.as_bytes()) => Some(RawName::Text(uri)),
            GeneralName::Invalid(tag, bytes) if tag.0 == URI_TAG && has_spiffe_scheme(bytes) => {
                Some(RawName::NotUtf8(bytes))
            }
            _ => None,
        })
        .collect();
    match spiffe.len() {
        0 => {}
        1 => {
            if let Some(name) = spiffe.into_iter().next() {
                return Ok((NameField::SpiffeUri, name));
            }
        }
        count => return Err(IdentityError::SeveralSpiffeIds { count }),
    }
    for san in sans {
        match san {
            GeneralName::DNSName(dns) => return Ok((NameField::Dns, RawName::Text(dns))),
            GeneralName::Invalid(tag, bytes) if tag.0 == DNS_NAME_TAG => {
                return Ok((NameField::Dns, RawName::NotUtf8(bytes)));
            }
            _ => {}
        }
    }
    if !rule.from_common_name {
        return Err(IdentityError::NoSan);
    }
    let mut common_names = cert.subject().iter_common_name();
    match (common_names.next(), common_names.next()) {
        (None, _) => Err(IdentityError::NoIdentity),
        (Some(cn), None) => Ok((NameField::CommonName, common_name_text(cn.attr_value()))),
        (Some(_), Some(_)) => Err(IdentityError::AmbiguousCommonName {
            count: 2 + common_names.count(),
        }),
    }
}

/// Whether a URI's scheme is `spiffe` (schemes are case-insensitive, RFC 3986 section 3.1).
fn has_spiffe_scheme(uri: &[u8]) -> bool {
    const SCHEME: &[u8] = b"spiffe:";
    uri.get(..SCHEME.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SCHEME))
}

/// The Common Name as text, if it uses one of the string types whose bytes are UTF-8 (or a
/// subset of it); any other encoding (BMPString, TeletexString, ...) is treated as not UTF-8.
fn common_name_text<'a>(value: &Any<'a>) -> RawName<'a> {
    let bytes: &'a [u8] = value.data;
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString => {
            match std::str::from_utf8(bytes) {
                Ok(text) => RawName::Text(text),
                Err(_) => RawName::NotUtf8(bytes),
            }
        }
        _ => RawName::NotUtf8(bytes),
    }
}

fn checked_identity(field: NameField, name: RawName<'_>) -> Result<ClientIdentity, IdentityError> {
    let text = match name {
        RawName::Text(text) => text,
        RawName::NotUtf8(bytes) => {
            return Err(IdentityError::InvalidName {
                field,
                value: loggable(bytes),
            });
        }
    };
    if text.is_empty() {
        return Err(IdentityError::EmptyName { field });
    }
    if text.chars().any(|c| c.is_control() || is_format(c)) {
        return Err(IdentityError::InvalidName {
            field,
            value: loggable(text.as_bytes()),
        });
    }
    if field != NameField::SpiffeUri && text.contains("://") {
        return Err(IdentityError::LooksLikeUri {
            field,
            value: loggable(text.as_bytes()),
        });
    }
    Ok(ClientIdentity(Arc::from(text)))
}

/// Whether `c` is a Unicode format character (general category Cf, Unicode 16), or the line or
/// paragraph separator: invisible characters that make two names look alike or reorder a log
/// line (bidirectional overrides, zero-width joiners, ...).
fn is_format(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// A quoted, escaped rendering of untrusted name bytes, cut to a length fit for one log line.
fn loggable(bytes: &[u8]) -> String {
    const MAX_CHARS: usize = 64;
    let text = String::from_utf8_lossy(bytes);
    let mut shown: String = text.chars().take(MAX_CHARS).collect();
    let cut = shown.len() < text.len();
    shown = format!("{shown:?}");
    if cut {
        shown.push_str("...");
    }
    shown
}

#[cfg(test)]
mod tests;
