//! The signature algorithms fulcrum accepts on client certificates and CRLs. Pure; it must not
//! verify anything itself.

use x509_parser::oid_registry::{self, Oid};

/// Whether certificates and CRLs signed with `algorithm` are accepted: what webpki accepts
/// (ECDSA, RSA PKCS#1 and PSS with SHA-2, Ed25519), so no SHA-1.
pub(super) fn accepted_signature(algorithm: &Oid<'_>) -> bool {
    use oid_registry::*;
    [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ED25519,
    ]
    .contains(algorithm)
}
