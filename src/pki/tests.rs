//! Tests for `pki`: generated certificates are parsed back with `x509-parser` and checked
//! field by field; `write` is exercised in unique temporary directories.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses a PEM certificate and hands the parsed form to `check`.
fn with_cert<R>(pem: &str, check: impl FnOnce(&X509Certificate<'_>) -> R) -> R {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).expect("valid PEM");
    let cert = pem.parse_x509().expect("valid X.509");
    check(&cert)
}

fn unix(time: SystemTime) -> i64 {
    i64::try_from(time.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// (not_before, not_after) as Unix seconds.
fn validity(cert: &X509Certificate<'_>) -> (i64, i64) {
    let v = cert.validity();
    (v.not_before.timestamp(), v.not_after.timestamp())
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str().unwrap().to_owned())
}

#[derive(Debug, Default, PartialEq)]
struct Sans {
    dns: Vec<String>,
    uri: Vec<String>,
    ip: Vec<IpAddr>,
}

fn sans(cert: &X509Certificate<'_>) -> Sans {
    let mut out = Sans::default();
    let Some(ext) = cert.subject_alternative_name().unwrap() else {
        return out;
    };
    for name in &ext.value.general_names {
        match name {
            GeneralName::DNSName(d) => out.dns.push((*d).to_owned()),
            GeneralName::URI(u) => out.uri.push((*u).to_owned()),
            GeneralName::IPAddress(b) => out.ip.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    out
}

/// (clientAuth, serverAuth), or `None` without an EKU extension.
fn eku(cert: &X509Certificate<'_>) -> Option<(bool, bool)> {
    let ext = cert.extended_key_usage().unwrap()?;
    Some((ext.value.client_auth, ext.value.server_auth))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fulcrum-pki-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn ca_is_a_self_signed_ca_that_may_sign_certificates_for_ten_years() {
    let ca = Ca::new("test CA").unwrap();
    with_cert(&ca.cert_pem(), |cert| {
        assert!(cert.is_ca());
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(common_name(cert).as_deref(), Some("test CA"));
        assert_eq!(cert.subject(), cert.issuer());
        let (from, to) = validity(cert);
        assert!((to - from - 3650 * 86_400).abs() <= 1);
    });
    assert!(ca.key_pem().contains("PRIVATE KEY"));
}

#[test]
fn server_cert_names_loopback_and_every_server_name() {
    let ca = Ca::new("test CA").unwrap();
    let pem = ca
        .server(&names(&["lb.example.com", "10.1.2.3", "localhost"]))
        .unwrap();
    with_cert(&pem.cert, |cert| {
        let sans = sans(cert);
        assert_eq!(sans.dns, names(&["localhost", "lb.example.com"]));
        let ips: Vec<IpAddr> = ["127.0.0.1", "::1", "10.1.2.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(sans.ip, ips);
        assert_eq!(eku(cert), Some((false, true)));
        assert!(!cert.is_ca());
        let ca_subject = with_cert(&ca.cert_pem(), |c| c.subject().as_raw().to_vec());
        assert_eq!(cert.issuer().as_raw(), ca_subject);
    });
}

#[test]
fn server_cert_rejects_a_name_that_is_neither_ip_nor_dns() {
    let ca = Ca::new("test CA").unwrap();
    let err = ca.server(&names(&["bad name"])).unwrap_err();
    assert!(matches!(err, PkiError::InvalidServerName { .. }), "{err}");
    assert!(ca.server(&names(&["*.example.com"])).is_ok());
}

#[test]
fn client_cert_carries_the_name_as_cn_and_dns_san_with_client_auth_for_90_days() {
    let ca = Ca::new("test CA").unwrap();
    let before = unix(SystemTime::now());
    let pem = ca.client("billing").unwrap();
    with_cert(&pem.cert, |cert| {
        assert_eq!(common_name(cert).as_deref(), Some("billing"));
        assert_eq!(sans(cert).dns, names(&["billing"]));
        assert_eq!(eku(cert), Some((true, false)));
        let (from, to) = validity(cert);
        assert!((before - 61..=before).contains(&from), "{from} vs {before}");
        assert!((to - from - 90 * 86_400).abs() <= 1);
    });
}

#[test]
fn client_key_matches_its_certificate() {
    let ca = Ca::new("test CA").unwrap();
    let pem = ca.client("billing").unwrap();
    let key = KeyPair::from_pem(&pem.key).unwrap();
    with_cert(&pem.cert, |cert| {
        assert_eq!(cert.public_key().subject_public_key.data, key.public_key_raw());
    });
}

#[test]
fn spiffe_client_gets_a_uri_san_and_no_dns_san() {
    let ca = Ca::new("test CA").unwrap();
    let id = "spiffe://example.org/ns/prod/sa/billing";
    with_cert(&ca.client(id).unwrap().cert, |cert| {
        let sans = sans(cert);
        assert_eq!(sans.uri, names(&[id]));
        assert!(sans.dns.is_empty());
        assert_eq!(common_name(cert).as_deref(), Some(id));
    });
}

#[test]
fn client_name_that_is_not_a_dns_name_gets_only_a_cn() {
    let ca = Ca::new("test CA").unwrap();
    with_cert(&ca.client("Alice Smith").unwrap().cert, |cert| {
        assert_eq!(common_name(cert).as_deref(), Some("Alice Smith"));
        assert_eq!(sans(cert), Sans::default());
    });
}

#[test]
fn empty_or_control_character_client_names_are_rejected() {
    let ca = Ca::new("test CA").unwrap();
    for bad in ["", "a\0b", "a\nb"] {
        let err = ca.client(bad).unwrap_err();
        assert!(matches!(err, PkiError::InvalidClientName { .. }), "{err}");
    }
}

#[test]
fn expired_spec_produces_a_cert_whose_validity_ended_as_asked() {
    let ca = Ca::new("test CA").unwrap();
    let now = SystemTime::now();
    let spec = LeafSpec {
        not_before: now - 30 * DAY,
        not_after: now - DAY,
        ..LeafSpec::client("old")
    };
    with_cert(&ca.leaf(&spec).unwrap().cert, |cert| {
        assert_eq!(validity(cert), (unix(now - 30 * DAY), unix(now - DAY)));
        assert!(!cert.validity().is_valid());
    });
}

#[test]
fn not_yet_valid_spec_produces_a_cert_whose_validity_starts_as_asked() {
    let ca = Ca::new("test CA").unwrap();
    let now = SystemTime::now();
    let spec = LeafSpec {
        not_before: now + DAY,
        not_after: now + 30 * DAY,
        ..LeafSpec::server(&[])
    };
    with_cert(&ca.leaf(&spec).unwrap().cert, |cert| {
        assert_eq!(validity(cert), (unix(now + DAY), unix(now + 30 * DAY)));
        assert!(!cert.validity().is_valid());
    });
}

#[test]
fn spec_without_eku_produces_a_cert_without_the_extension() {
    let ca = Ca::new("test CA").unwrap();
    let spec = LeafSpec {
        eku: Eku::None,
        ..LeafSpec::client("plain")
    };
    with_cert(&ca.leaf(&spec).unwrap().cert, |cert| {
        assert_eq!(eku(cert), None);
    });
}

#[test]
fn validity_before_1970_is_rejected() {
    let ca = Ca::new("test CA").unwrap();
    let spec = LeafSpec {
        not_before: UNIX_EPOCH - DAY,
        ..LeafSpec::client("ancient")
    };
    let err = ca.leaf(&spec).unwrap_err();
    assert!(
        matches!(err, PkiError::TimeOutOfRange { field: "not_before" }),
        "{err}"
    );
}

#[test]
fn generate_issues_every_client_from_the_same_ca() {
    let pki = generate(&names(&["alice", "bob"]), &names(&["lb.local"])).unwrap();
    let ca_subject = with_cert(&pki.ca.cert, |c| c.subject().as_raw().to_vec());
    let client_names: Vec<&str> = pki.clients.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(client_names, ["alice", "bob"]);
    for pem in pki.clients.iter().map(|(_, p)| p).chain([&pki.server]) {
        with_cert(&pem.cert, |c| assert_eq!(c.issuer().as_raw(), ca_subject));
    }
    with_cert(&pki.server.cert, |c| {
        assert!(sans(c).dns.contains(&"lb.local".to_owned()))
    });
}

#[test]
fn write_creates_the_directory_and_all_files_with_key_files_private() {
    let tmp = TempDir::new();
    let dir = tmp.0.join("nested/certs");
    let pki = generate(&names(&["alice"]), &[]).unwrap();
    let written = write(&dir, &pki, false).unwrap();
    let expected: Vec<PathBuf> = [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "alice.pem",
        "alice.key",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    assert_eq!(written, expected);
    for path in &written {
        let is_key = path.extension().is_some_and(|e| e == "key");
        assert_eq!(
            mode(path),
            if is_key { 0o600 } else { 0o644 },
            "{}",
            path.display()
        );
    }
    assert_eq!(
        fs::read_to_string(dir.join("alice.key")).unwrap(),
        pki.clients[0].1.key
    );
    assert_eq!(fs::read_to_string(dir.join("ca.pem")).unwrap(), pki.ca.cert);
}

#[test]
fn write_refuses_to_overwrite_and_writes_nothing_without_force() {
    let tmp = TempDir::new();
    fs::create_dir_all(&tmp.0).unwrap();
    fs::write(tmp.0.join("alice.key"), "old").unwrap();
    let pki = generate(&names(&["alice"]), &[]).unwrap();
    let err = write(&tmp.0, &pki, false).unwrap_err();
    assert!(matches!(&err, PkiError::Exists { path } if path.ends_with("alice.key")));
    assert!(err.to_string().contains("use --force"), "{err}");
    let left: Vec<_> = fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["alice.key"]);
    assert_eq!(fs::read_to_string(tmp.0.join("alice.key")).unwrap(), "old");
}

#[test]
fn write_with_force_overwrites_and_makes_existing_key_files_private() {
    let tmp = TempDir::new();
    fs::create_dir_all(&tmp.0).unwrap();
    let ca_key = tmp.0.join("ca.key");
    fs::write(&ca_key, "old").unwrap();
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
    let pki = generate(&[], &[]).unwrap();
    write(&tmp.0, &pki, true).unwrap();
    assert_eq!(fs::read_to_string(&ca_key).unwrap(), pki.ca.key);
    assert_eq!(mode(&ca_key), 0o600);
}

#[test]
fn write_rejects_client_names_that_are_unsafe_file_names() {
    let tmp = TempDir::new();
    let ca = Ca::new("test CA").unwrap();
    let pem = ca.client("x").unwrap();
    for bad in [
        "../x",
        "a/b",
        ".hidden",
        "ca",
        "server",
        "",
        "spiffe://example.org/x",
    ] {
        let pki = DevPki {
            ca: ca.pem(),
            server: pem.clone(),
            clients: vec![(bad.to_owned(), pem.clone())],
        };
        let err = write(&tmp.0, &pki, false).unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidClientName { .. }),
            "{bad:?}: {err}"
        );
        assert!(err.to_string().starts_with("invalid client name"), "{err}");
    }
    assert!(!tmp.0.exists(), "nothing may be created for a rejected name");
}

#[test]
fn write_rejects_a_client_name_given_twice() {
    let tmp = TempDir::new();
    let pki = generate(&names(&["alice", "alice"]), &[]).unwrap();
    let err = write(&tmp.0, &pki, false).unwrap_err();
    assert!(matches!(err, PkiError::DuplicateClient { .. }), "{err}");
    assert!(!tmp.0.exists());
}

#[test]
fn pem_debug_output_hides_the_private_key() {
    let pem = Pem {
        cert: "CERT".to_owned(),
        key: "SECRET".to_owned(),
    };
    assert!(!format!("{pem:?}").contains("SECRET"));
}
