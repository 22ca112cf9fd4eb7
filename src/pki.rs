//! Development PKI: a throwaway CA plus server and client certificates for `fulcrum certs`,
//! `fulcrum demo` and the end-to-end tests.
//!
//! Owns: generating an ECDSA P-256 CA, issuing server and client leaves from it (including
//! deliberately broken ones for tests, through [`LeafSpec`]), and writing the PEM files of a
//! [`DevPki`] to a directory with safe permissions (keys 0600, certificates 0644).
//!
//! These certificates are for development and testing only, never for production: the CA key
//! sits unencrypted next to the certificates, the CA lives ten years, and nothing here supports
//! revocation. Generation is pure and in memory; only [`write()`] touches the file system.
//!
//! Must not: read or trust existing key material, overwrite a file unless asked to (`force`),
//! or load certificates for the server (that is `tls`).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};

#[cfg(test)]
mod tests;

/// Lifetime of the development CA: long enough that nobody regenerates it mid-project.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Lifetime of server and client leaves.
const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// Certificates start this long before "now", so a peer whose clock is slightly behind
/// still accepts a freshly generated certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// 9999-12-31T23:59:59Z, the last instant an X.509 `GeneralizedTime` can hold.
const MAX_CERT_TIME_SECS: u64 = 253_402_300_799;
/// Common name of the CA made by [`generate`].
const DEV_CA_NAME: &str = "fulcrum development CA";

/// Errors from generating or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    /// A client name cannot be used as a certificate identity or a file name.
    #[error("invalid client name {name:?}: {reason}")]
    InvalidClientName { name: String, reason: &'static str },
    /// A `--server-name` is neither an IP literal nor a DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName { name: String, reason: &'static str },
    /// The same client name was given twice, so its files would collide.
    #[error("client name {name:?} is given more than once")]
    DuplicateClient { name: String },
    /// A validity bound outside what a certificate can encode.
    #[error("{field} is outside the range a certificate can hold (1970-01-01 to 9999-12-31)")]
    TimeOutOfRange { field: &'static str },
    /// A target file exists and `force` was not given; nothing was written.
    #[error("refusing to overwrite existing file {} (use --force)", path.display())]
    Exists { path: PathBuf },
    /// Checking whether a target file exists failed (e.g. permission denied on the directory).
    #[error("could not check {}: {error}", path.display())]
    Inspect { path: PathBuf, error: io::Error },
    /// The output directory could not be created.
    #[error("could not create directory {}: {error}", path.display())]
    CreateDir { path: PathBuf, error: io::Error },
    /// A certificate or key file could not be written.
    #[error("could not write {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    /// A certificate to revoke is not a PEM certificate.
    #[error("cannot read the serial number of a certificate to revoke: {reason}")]
    BadCertificate { reason: String },
}

impl From<rcgen::Error> for PkiError {
    fn from(error: rcgen::Error) -> Self {
        PkiError::Generate(error)
    }
}

/// A certificate and its private key, both PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert: String,
    /// The PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`), unencrypted.
    pub key: String,
}

impl fmt::Debug for Pem {
    /// Shows the certificate but never the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Extended key usage put into a leaf certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eku {
    /// `id-kp-clientAuth` only: usable as a TLS client certificate.
    ClientAuth,
    /// `id-kp-serverAuth` only: usable as a TLS server certificate.
    ServerAuth,
    /// No extended key usage extension at all (tests use this for "wrong purpose" cases).
    None,
}

/// Everything that varies between leaf certificates; [`Ca::leaf`] issues one.
///
/// The fields are public so tests can build deliberately bad certificates: expired
/// (`not_after` in the past), not yet valid (`not_before` in the future), wrong EKU, no names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    /// Subject common name; `None` leaves the subject empty.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// URI subject alternative names (SPIFFE IDs).
    pub uri_sans: Vec<String>,
    /// IP address subject alternative names.
    pub ip_sans: Vec<IpAddr>,
    /// Which TLS role the certificate is for.
    pub eku: Eku,
    /// Start of validity (whole seconds; sub-second parts are dropped).
    pub not_before: SystemTime,
    /// End of validity (whole seconds; sub-second parts are dropped).
    pub not_after: SystemTime,
}

impl LeafSpec {
    /// A client certificate for `name`: CN=`name`, plus a URI SAN if `name` starts with
    /// `spiffe://`, else a DNS SAN if `name` is a valid DNS name. clientAuth, 90 days.
    pub fn client(name: &str) -> Self {
        let (not_before, not_after) = validity_from_now(LEAF_VALIDITY);
        let mut spec = LeafSpec {
            common_name: Some(name.to_owned()),
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            ip_sans: Vec::new(),
            eku: Eku::ClientAuth,
            not_before,
            not_after,
        };
        if is_spiffe_id(name) {
            spec.uri_sans.push(name.to_owned());
        } else if is_dns_name(name) {
            spec.dns_sans.push(name.to_owned());
        }
        spec
    }

    /// A server certificate for `localhost`, `127.0.0.1`, `::1` and each of `names`
    /// (IP literals become IP SANs, anything else a DNS SAN). serverAuth, 90 days.
    /// The common name is the first of `names`, or `localhost`.
    pub fn server(names: &[String]) -> Self {
        let (not_before, not_after) = validity_from_now(LEAF_VALIDITY);
        let mut spec = LeafSpec {
            common_name: Some(names.first().map_or("localhost", String::as_str).to_owned()),
            dns_sans: vec!["localhost".to_owned()],
            uri_sans: Vec::new(),
            ip_sans: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
            eku: Eku::ServerAuth,
            not_before,
            not_after,
        };
        for name in names {
            match name.parse::<IpAddr>() {
                Ok(ip) if !spec.ip_sans.contains(&ip) => spec.ip_sans.push(ip),
                Ok(_) => {}
                Err(_) if !spec.dns_sans.contains(name) => spec.dns_sans.push(name.clone()),
                Err(_) => {}
            }
        }
        spec
    }
}

/// A certificate authority that can issue leaves: its key and self-signed certificate.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    /// Never shows the CA key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed ECDSA P-256 CA named `common_name`: basicConstraints CA:true with
    /// path length 0 (it signs leaves only), keyCertSign + cRLSign, valid for ten years
    /// from a minute ago. Ten years is a development convenience, not a recommendation.
    pub fn new(common_name: &str) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = common_name_dn(Some(common_name));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity_from_now(CA_VALIDITY);
        set_validity(&mut params, not_before, not_after)?;
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Ca { issuer })
    }

    /// The CA certificate, PEM: what servers and clients put in their trust store.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA private key, PEM (PKCS#8, unencrypted).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate and key together.
    pub fn pem(&self) -> Pem {
        Pem {
            cert: self.cert_pem(),
            key: self.key_pem(),
        }
    }

    /// A server certificate per [`LeafSpec::server`]. Each name must be an IP literal or a
    /// DNS name (a leading `*.` wildcard label is allowed).
    pub fn server(&self, names: &[String]) -> Result<Pem, PkiError> {
        for name in names {
            if name.parse::<IpAddr>().is_err() {
                let host = name.strip_prefix("*.").unwrap_or(name);
                if !is_dns_name(host) {
                    return Err(PkiError::InvalidServerName {
                        name: name.clone(),
                        reason: "expected an IP address or a DNS name (letters, digits, '-', '_', dot-separated labels of at most 63 characters)",
                    });
                }
            }
        }
        self.leaf(&LeafSpec::server(names))
    }

    /// A client certificate per [`LeafSpec::client`]. `name` must be non-empty and free of
    /// control characters; a `spiffe://` name must be ASCII.
    pub fn client(&self, name: &str) -> Result<Pem, PkiError> {
        check_identity(name)?;
        self.leaf(&LeafSpec::client(name))
    }

    /// Issues an ECDSA P-256 leaf exactly as `spec` says, signed by this CA. Nothing is
    /// checked beyond what a certificate can encode, so tests can ask for broken ones.
    pub fn leaf(&self, spec: &LeafSpec) -> Result<Pem, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = common_name_dn(spec.common_name.as_deref());
        params.subject_alt_names = subject_alt_names(spec)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.eku {
            Eku::ClientAuth => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::ServerAuth => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::None => Vec::new(),
        };
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, spec.not_before, spec.not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

impl Ca {
    /// A CRL signed by this CA, revoking `revoked` (PEM certificates it issued), issued now and
    /// due for its next update at `next_update`. PEM (`-----BEGIN X509 CRL-----`).
    pub fn crl(&self, revoked: &[&str], next_update: SystemTime) -> Result<String, PkiError> {
        let serials = revoked
            .iter()
            .map(|pem| serial_of(pem))
            .collect::<Result<Vec<_>, _>>()?;
        self.crl_of_serials(&serials, next_update)
    }

    /// A CRL signed by this CA revoking the certificates with these serial numbers (big-endian
    /// bytes), as [`Ca::crl`].
    pub fn crl_of_serials(&self, serials: &[Vec<u8>], next_update: SystemTime) -> Result<String, PkiError> {
        self.numbered_crl(serials, next_update, 1)
    }

    /// [`Ca::crl_of_serials`] with CRL number `number` (the others are number 1).
    pub fn numbered_crl(
        &self,
        serials: &[Vec<u8>],
        next_update: SystemTime,
        number: u64,
    ) -> Result<String, PkiError> {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = SystemTime::now().checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH);
        let this_update = epoch + since_epoch(now, "this_update")?;
        let revoked_certs = serials
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: this_update,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update: epoch + since_epoch(next_update, "next_update")?,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// The serial number of a PEM certificate, big-endian bytes.
pub fn serial_of(pem: &str) -> Result<Vec<u8>, PkiError> {
    let bad = |reason: String| PkiError::BadCertificate { reason };
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// A complete development PKI: CA, one server certificate, and named client certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPki {
    /// The CA (its key is included so more certificates can be issued later by hand).
    pub ca: Pem,
    /// The server certificate for the listener.
    pub server: Pem,
    /// One certificate per client, in the order given, keyed by client name.
    pub clients: Vec<(String, Pem)>,
}

/// Generates a fresh CA, a server certificate for `server_names` (plus the loopback names),
/// and one client certificate per name in `clients`. In memory only; see [`write()`].
pub fn generate(clients: &[String], server_names: &[String]) -> Result<DevPki, PkiError> {
    let ca = Ca::new(DEV_CA_NAME)?;
    let server = ca.server(server_names)?;
    let clients = clients
        .iter()
        .map(|name| Ok((name.clone(), ca.client(name)?)))
        .collect::<Result<Vec<_>, PkiError>>()?;
    Ok(DevPki {
        ca: ca.pem(),
        server,
        clients,
    })
}

/// Writes `pki` into `dir` (created with its parents if missing) as `ca.pem`, `ca.key`,
/// `server.pem`, `server.key` and `NAME.pem`/`NAME.key` per client; returns the paths written.
///
/// Client names must be plain file names: not empty, no `/` or NUL, not starting with `.`,
/// and not `ca` or `server`. A `spiffe://` client therefore cannot be written; issue it in
/// memory with [`Ca::client`] instead.
///
/// Without `force`, nothing is written if any target exists. With `force`, existing files are
/// truncated (following symlinks) and their permissions reset. Keys are created with mode
/// 0600 and certificates 0644. A failure part-way can leave the earlier files written.
pub fn write(dir: &Path, pki: &DevPki, force: bool) -> Result<Vec<PathBuf>, PkiError> {
    let mut seen = HashSet::new();
    for (name, _) in &pki.clients {
        check_file_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(PkiError::DuplicateClient { name: name.clone() });
        }
    }

    let mut files: Vec<(PathBuf, &str, FileKind)> = vec![
        (dir.join("ca.pem"), &pki.ca.cert, FileKind::Cert),
        (dir.join("ca.key"), &pki.ca.key, FileKind::Key),
        (dir.join("server.pem"), &pki.server.cert, FileKind::Cert),
        (dir.join("server.key"), &pki.server.key, FileKind::Key),
    ];
    for (name, pem) in &pki.clients {
        files.push((dir.join(format!("{name}.pem")), &pem.cert, FileKind::Cert));
        files.push((dir.join(format!("{name}.key")), &pem.key, FileKind::Key));
    }

    if !force {
        for (path, _, _) in &files {
            match fs::symlink_metadata(path) {
                Ok(_) => return Err(PkiError::Exists { path: path.clone() }),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(PkiError::Inspect {
                        path: path.clone(),
                        error,
                    })
                }
            }
        }
    }

    fs::create_dir_all(dir).map_err(|error| PkiError::CreateDir {
        path: dir.to_path_buf(),
        error,
    })?;

    let mut written = Vec::with_capacity(files.len());
    for (path, contents, kind) in files {
        write_file(&path, contents, kind, force).map_err(|error| PkiError::Write {
            path: path.clone(),
            error,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// Whether a file holds a secret (and so gets owner-only permissions).
#[derive(Clone, Copy)]
enum FileKind {
    Cert,
    Key,
}

impl FileKind {
    fn mode(self) -> u32 {
        match self {
            FileKind::Cert => 0o644,
            FileKind::Key => 0o600,
        }
    }
}

/// Creates (or with `force`, truncates) `path` and writes `contents`. Permissions are set
/// before any byte is written, so a key never sits in a readable file.
fn write_file(path: &Path, contents: &str, kind: FileKind, force: bool) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(kind.mode());
    if force {
        options.create(true).truncate(true);
    } else {
        // `create_new` also catches a file that appeared after the existence check.
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    if force {
        // `mode` only applies to newly created files; an existing one keeps its old mode.
        file.set_permissions(Permissions::from_mode(kind.mode()))?;
    }
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Validity `[now - CLOCK_SKEW, now - CLOCK_SKEW + lifetime]`.
fn validity_from_now(lifetime: Duration) -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
    (not_before, not_before + lifetime)
}

/// Sets `params`' validity; `rcgen` wants `time::OffsetDateTime`, which it does not
/// re-export, so the conversion goes through its `date_time_ymd` epoch plus a std `Duration`.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), PkiError> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before, "not_before")?;
    params.not_after = epoch + since_epoch(not_after, "not_after")?;
    Ok(())
}

/// Whole seconds since the Unix epoch, if a certificate can encode that instant.
fn since_epoch(time: SystemTime, field: &'static str) -> Result<Duration, PkiError> {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::TimeOutOfRange { field })?
        .as_secs();
    if secs > MAX_CERT_TIME_SECS {
        return Err(PkiError::TimeOutOfRange { field });
    }
    Ok(Duration::from_secs(secs))
}

fn common_name_dn(common_name: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(cn) = common_name {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

fn subject_alt_names(spec: &LeafSpec) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    for name in &spec.dns_sans {
        sans.push(SanType::DnsName(Ia5String::try_from(name.as_str())?));
    }
    for uri in &spec.uri_sans {
        sans.push(SanType::URI(Ia5String::try_from(uri.as_str())?));
    }
    sans.extend(spec.ip_sans.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

fn is_spiffe_id(name: &str) -> bool {
    name.starts_with("spiffe://")
}

/// A client name usable as a certificate identity.
fn check_identity(name: &str) -> Result<(), PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidClientName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("must not be empty");
    }
    if name.chars().any(char::is_control) {
        return invalid("must not contain control characters");
    }
    if is_spiffe_id(name) && !name.is_ascii() {
        return invalid("a spiffe:// URI must be ASCII");
    }
    Ok(())
}

/// A client name usable as the stem of `NAME.pem` / `NAME.key` inside the output directory.
fn check_file_name(name: &str) -> Result<(), PkiError> {
    check_identity(name)?;
    let invalid = |reason| {
        Err(PkiError::InvalidClientName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.contains('/') {
        return invalid("must be a plain file name without '/' (spiffe:// IDs cannot be written to files; use a plain name)");
    }
    if name.starts_with('.') {
        return invalid("must not start with '.'");
    }
    if name == "ca" || name == "server" {
        return invalid("\"ca\" and \"server\" are reserved for the CA and server files");
    }
    Ok(())
}

/// Dot-separated labels of 1-63 letters, digits, `-` or `_`, not starting or ending with
/// `-`, at most 253 bytes, and not an IP literal.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<IpAddr>().is_err()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}
