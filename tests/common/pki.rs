//! A production-shaped test PKI, generated at run time with rcgen: roots, intermediates and
//! name-constrained sub-CAs, client leaves (DNS and SPIFFE URI SANs), CRLs, and a rustls client
//! that presents a whole chain (leaf, then the intermediates it sends).
//!
//! Every key is ECDSA P-256. Everything is PEM text; files go into a [`TempDir`]. There is one
//! way to make a certificate, [`issue`]; the rest are small named shapes on top of it.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    NameConstraints, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::{toml_path, TempDir};

/// A certificate, its PKCS#8 private key, and (for a CA) what it needs to issue more.
pub struct Cert {
    /// The certificate, `-----BEGIN CERTIFICATE-----`.
    pub pem: String,
    /// Its private key, PKCS#8 `-----BEGIN PRIVATE KEY-----`.
    pub key_pem: String,
    der: Vec<u8>,
    signer: Issuer<'static, KeyPair>,
}

impl Cert {
    /// The serial number, big-endian bytes (what a CRL entry names).
    pub fn serial(&self) -> Vec<u8> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.der).expect("rcgen's certificate parses");
        cert.raw_serial().to_vec()
    }
}

/// The one way to make a certificate: a fresh P-256 key, `params`, signed by `issuer`
/// (self-signed without one). A certificate with an issuer carries its authority key identifier.
pub fn issue(mut params: CertificateParams, issuer: Option<&Cert>) -> Cert {
    let key = KeyPair::generate().expect("generate a P-256 key");
    params.use_authority_key_identifier_extension = issuer.is_some();
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, &issuer.signer),
        None => params.self_signed(&key),
    }
    .expect("sign the certificate");
    Cert {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
        signer: Issuer::new(params, key),
    }
}

/// `n` days from now (negative: ago).
pub fn days(n: i64) -> SystemTime {
    let span = Duration::from_secs(n.unsigned_abs() * 86_400);
    if n < 0 {
        SystemTime::now() - span
    } else {
        SystemTime::now() + span
    }
}

/// `params` valid from `not_before` to `not_after` (whole seconds).
pub fn valid(
    mut params: CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after);
    params
}

fn since_epoch(at: SystemTime) -> Duration {
    Duration::from_secs(at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs())
}

fn named(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params
}

/// A CA named `common_name`: basicConstraints CA (no path length limit), keyCertSign +
/// cRLSign, valid from a year ago (so a chain can be judged at a past instant) for ten years.
pub fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = named(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid(params, days(-365), days(3650))
}

/// A client leaf: CN = the first name, one SAN per name (`spiffe://...` a URI SAN, anything else
/// a DNS SAN), not a CA, digitalSignature, clientAuth; valid from a day ago for 30 days.
pub fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params = named(names.first().copied().unwrap_or("client"));
    params.subject_alt_names = names
        .iter()
        .map(|name| {
            let ia5 = Ia5String::try_from(*name).expect("an IA5 name");
            if name.starts_with("spiffe://") {
                SanType::URI(ia5)
            } else {
                SanType::DnsName(ia5)
            }
        })
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    valid(params, days(-1), days(30))
}

/// A self-signed root CA. Two roots of one `common_name` have the same subject DN (a rollover).
pub fn root(common_name: &str) -> Cert {
    issue(ca_params(common_name), None)
}

/// A CA issued by `issuer`.
pub fn intermediate(common_name: &str, issuer: &Cert) -> Cert {
    issue(ca_params(common_name), Some(issuer))
}

/// An intermediate that expired yesterday (valid from 30 days ago until a day ago).
pub fn expired_intermediate(common_name: &str, issuer: &Cert) -> Cert {
    issue(valid(ca_params(common_name), days(-30), days(-1)), Some(issuer))
}

/// A client leaf for `names` (see [`leaf_params`]) issued by `issuer`.
pub fn client(issuer: &Cert, names: &[&str]) -> Cert {
    issue(leaf_params(names), Some(issuer))
}

/// A sub-CA issued by `issuer` whose (critical) nameConstraints permit only DNS names under
/// `dns` (rcgen's own encoding).
pub fn dns_constrained_ca(common_name: &str, dns: &str, issuer: &Cert) -> Cert {
    let mut params = ca_params(common_name);
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(dns.to_owned())],
        excluded_subtrees: Vec::new(),
    });
    issue(params, Some(issuer))
}

/// A sub-CA issued by `issuer` whose (critical) nameConstraints permit only URIs whose host is
/// `host` (RFC 5280 4.2.1.10). rcgen has no URI subtree, so the extension is encoded here.
pub fn uri_constrained_ca(common_name: &str, host: &str, issuer: &Cert) -> Cert {
    let mut params = ca_params(common_name);
    params.custom_extensions.push(uri_name_constraints(&[host]));
    issue(params, Some(issuer))
}

/// `nameConstraints` (2.5.29.30, critical) permitting URIs with these hosts:
/// `SEQUENCE { [0] IMPLICIT SEQUENCE OF GeneralSubtree }`, each `SEQUENCE { [6] IA5String }`.
pub fn uri_name_constraints(hosts: &[&str]) -> CustomExtension {
    let subtrees: Vec<u8> = hosts
        .iter()
        .flat_map(|host| der(0x30, &der(0x86, host.as_bytes())))
        .collect();
    let value = der(0x30, &der(0xa0, &subtrees));
    let mut extension = CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
    extension.set_criticality(true);
    extension
}

/// One DER TLV: `tag`, the definite length of `content`, `content`.
pub fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A CRL (PEM, `-----BEGIN X509 CRL-----`) signed by `issuer` revoking `revoked` (certificates
/// it issued), with crlNumber 1 and its authority key identifier, issued a minute ago, next
/// update in a day.
pub fn crl(issuer: &Cert, revoked: &[&Cert]) -> String {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let this_update = epoch + since_epoch(SystemTime::now() - Duration::from_secs(60));
    let params = CertificateRevocationListParams {
        this_update,
        next_update: epoch + since_epoch(days(1)),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|cert| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&cert.serial()),
                revocation_time: this_update,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(&issuer.signer)
        .expect("sign the CRL")
        .pem()
        .expect("CRL PEM")
}

/// Certificates one after the other, as one PEM file: a CA bundle, or a chain (leaf first).
pub fn pem_bundle(certs: &[&Cert]) -> String {
    certs.iter().map(|c| c.pem.as_str()).collect()
}

/// The listener's own certificate for `localhost` (serverAuth), from a root of its own that the
/// test clients trust, written to a directory.
pub struct ServerCert {
    /// The root the clients trust.
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerCert {
    pub fn new(dir: &TempDir) -> ServerCert {
        let ca = root("fulcrum test server root");
        let mut params = leaf_params(&["localhost"]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = issue(params, Some(&ca));
        ServerCert {
            ca_pem: ca.pem,
            cert: dir.write("server.pem", &server.pem),
            key: dir.write("server.key", &server.key_pem),
        }
    }

    /// The `cert` and `key` lines of a `[listener.tls]` table.
    pub fn tls_keys(&self) -> String {
        format!(
            "cert = {}\nkey = {}\n",
            toml_path(&self.cert),
            toml_path(&self.key)
        )
    }
}

/// A rustls client (TLS 1.3 and 1.2) trusting `server_ca` and presenting `chain` (PEM: the leaf,
/// then the intermediates it sends) with the leaf's key `key`.
pub fn chain_client_config(server_ca: &str, chain: &str, key: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots
            .add(ca.expect("server CA PEM"))
            .expect("server CA usable as a trust anchor");
    }
    let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
    let config = ClientConfig::builder_with_provider(fulcrum::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client chain and key match");
    Arc::new(config)
}

impl Cert {
    /// The certificate, DER.
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.der.clone())
    }

    /// Its private key, PKCS#8 DER.
    pub fn key_der(&self) -> rustls::pki_types::PrivatePkcs8KeyDer<'static> {
        rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(self.key_pem.as_bytes())
            .expect("PKCS#8 key PEM")
    }
}

/// An X509-SVID leaf as SPIRE issues one: [`leaf_params`] for `names` (the SPIFFE ID first, a URI
/// SAN; any others DNS SANs), for both serverAuth and clientAuth.
pub fn svid_params(names: &[&str]) -> CertificateParams {
    let mut params = leaf_params(names);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}
