use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::StoresServerSessions;
use rustls::CertificateError;

use super::*;
use crate::pki::Ca;

/// A temp dir with a CA, a server cert/key pair and a second, unrelated key.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("fulcrum-tls-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("test CA").unwrap();
        let server = ca.server(&[]).unwrap();
        let other = ca.server(&[]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert).unwrap();
        std::fs::write(dir.join("server.key"), &server.key).unwrap();
        std::fs::write(dir.join("other.key"), &other.key).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        Files { dir }
    }

    fn config(&self, cert: &str, key: &str, ca: Option<&str>) -> TlsConfig {
        TlsConfig {
            client_ca: ca.map(|c| self.dir.join(c)),
            ..TlsConfig::new(self.dir.join(cert), self.dir.join(key))
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn error(result: Result<ServerTls, TlsError>) -> String {
    match result {
        Ok(_) => panic!("config was built but should not be"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn matching_files_build_a_config_with_and_without_client_auth() {
    let f = Files::new("ok");
    assert!(server_config(&f.config("server.pem", "server.key", Some("ca.pem"))).is_ok());
    assert!(server_config(&f.config("server.pem", "server.key", None)).is_ok());
}

#[test]
fn an_unreadable_file_is_named_in_the_error() {
    let f = Files::new("missing");
    let e = error(server_config(&f.config("nope.pem", "server.key", None)));
    assert!(e.contains("certificate file") && e.contains("nope.pem"), "{e}");
    let e = error(server_config(&f.config("server.pem", "nope.key", None)));
    assert!(e.contains("key file") && e.contains("nope.key"), "{e}");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let f = Files::new("mismatch");
    let e = error(server_config(&f.config("server.pem", "other.key", None)));
    assert!(e.contains("does not match") && e.contains("other.key"), "{e}");
}

#[test]
fn an_empty_ca_bundle_is_refused() {
    let f = Files::new("emptyca");
    let e = error(server_config(&f.config(
        "server.pem",
        "server.key",
        Some("empty.pem"),
    )));
    assert!(e.contains("client CA") && e.contains("no PEM certificate"), "{e}");
}

#[test]
fn a_certificate_file_without_certificates_is_refused() {
    let f = Files::new("nocert");
    let e = error(server_config(&f.config("empty.pem", "server.key", None)));
    assert!(e.contains("no PEM certificate"), "{e}");
}

fn redis_tls(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> crate::config::RedisTlsConfig {
    crate::config::RedisTlsConfig {
        ca: ca.map(Path::to_path_buf),
        client_cert: client.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
    }
}

#[test]
fn redis_tls_files_are_checked_and_handed_over_as_read() {
    let f = Files::new("redis-ok");
    let (ca, cert, key) = (
        f.dir.join("ca.pem"),
        f.dir.join("server.pem"),
        f.dir.join("server.key"),
    );
    let certs = redis_certificates(&redis_tls(Some(&ca), Some((&cert, &key)))).expect("valid files");
    assert_eq!(certs.root_cert, Some(std::fs::read(&ca).unwrap()));
    let client = certs.client_tls.expect("client certificate");
    assert_eq!(client.client_cert, std::fs::read(&cert).unwrap());
    assert_eq!(client.client_key, std::fs::read(&key).unwrap());
    // Without a CA the redis client uses the system roots.
    let system = redis_certificates(&redis_tls(None, None)).expect("nothing to load");
    assert!(system.root_cert.is_none() && system.client_tls.is_none());
}

#[test]
fn redis_tls_files_that_cannot_be_used_are_refused_naming_the_file() {
    let f = Files::new("redis-bad");
    let path = |name: &str| f.dir.join(name);
    let error = |tls| match redis_certificates(&tls) {
        Ok(_) => panic!("bad Redis TLS files were accepted"),
        Err(e) => e.to_string(),
    };
    let e = error(redis_tls(Some(&path("empty.pem")), None));
    assert!(e.contains("Redis CA") && e.contains("no PEM certificate"), "{e}");
    let e = error(redis_tls(Some(&path("nope.pem")), None));
    assert!(e.contains("Redis CA") && e.contains("nope.pem"), "{e}");
    let e = error(redis_tls(None, Some((&path("server.pem"), &path("other.key")))));
    assert!(e.contains("does not match") && e.contains("other.key"), "{e}");
}

/// A CA written as `ca.pem` in its own temp dir, with CRL files beside it.
struct CrlFiles {
    dir: PathBuf,
    ca: Ca,
}

impl CrlFiles {
    fn new(tag: &str) -> CrlFiles {
        let dir = std::env::temp_dir().join(format!("fulcrum-crl-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("client CA").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        CrlFiles { dir, ca }
    }

    fn load(&self, crl_text: &str) -> Result<Vec<CrlInfo>, TlsError> {
        std::fs::write(self.dir.join("list.crl"), crl_text).unwrap();
        let mut tls = TlsConfig::new("unused.pem", "unused.key");
        tls.client_ca = Some(self.dir.join("ca.pem"));
        tls.crl = Some(self.dir.join("list.crl"));
        client_trust(&tls).map(|trust| trust.expect("mTLS").1)
    }
}

impl Drop for CrlFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_crl_of_the_client_ca_loads_with_its_issuer_and_next_update() {
    let f = CrlFiles::new("ok");
    let next = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let alice = f.ca.client("alice").unwrap();
    let crl = f.ca.crl(&[&alice.cert], next).unwrap();
    let info = f.load(&format!("{crl}{crl}")).expect("two CRLs of the client CA");
    assert_eq!(info.len(), 2);
    assert_eq!(info[0].next_update, Some(next));
    assert!(info[0].issuer.contains("client CA"), "{}", info[0].issuer);
}

#[test]
fn a_crl_of_another_ca_is_refused_naming_its_issuer() {
    let f = CrlFiles::new("foreign");
    let other = Ca::new("somebody else").unwrap();
    let crl = other
        .crl(&[], SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    let e = f
        .load(&crl)
        .expect_err("a CRL not signed by the client CA")
        .to_string();
    assert!(e.contains("somebody else") && e.contains("not signed"), "{e}");
}

#[test]
fn a_crl_file_without_a_crl_or_with_a_corrupt_one_is_refused_naming_the_file() {
    let f = CrlFiles::new("bad");
    let e = f.load("").expect_err("no CRL").to_string();
    assert!(e.contains("list.crl") && e.contains("no PEM CRL"), "{e}");
    let e = f
        .load("-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n")
        .expect_err("not a CRL")
        .to_string();
    assert!(e.contains("list.crl") && e.contains("cannot be parsed"), "{e}");
}

#[test]
fn the_session_cache_forgets_sessions_past_their_timeout_and_the_oldest_when_full() {
    let cache = SessionCache::new(2, Duration::from_secs(3600));
    for key in [b"a", b"b", b"c"] {
        assert!(cache.put(key.to_vec(), key.to_vec()));
    }
    assert_eq!(cache.get(b"a"), None, "the oldest session was evicted");
    assert_eq!(cache.get(b"b"), Some(b"b".to_vec()));
    assert_eq!(cache.take(b"c"), Some(b"c".to_vec()));
    assert_eq!(cache.take(b"c"), None, "a taken session is gone");

    let stale = SessionCache::new(8, Duration::ZERO);
    stale.put(b"k".to_vec(), b"v".to_vec());
    assert_eq!(stale.get(b"k"), None);
    assert_eq!(stale.take(b"k"), None);
}

#[test]
fn the_order_of_stored_sessions_stays_bounded_when_sessions_are_taken() {
    let cache = SessionCache::new(4, Duration::from_secs(3600));
    for i in 0..1000u32 {
        let key = i.to_be_bytes().to_vec();
        cache.put(key.clone(), key.clone());
        assert!(cache.take(&key).is_some());
    }
    assert!(cache.lock().order.len() <= 8, "{}", cache.lock().order.len());
}

#[test]
fn handshake_errors_are_classified_by_their_cause() {
    use rustls::Error;
    let cases = [
        (Error::NoCertificatesPresented, HandshakeFailure::NoCertificate),
        (
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            HandshakeFailure::UnknownCa,
        ),
        (
            Error::InvalidCertificate(CertificateError::Expired),
            HandshakeFailure::Expired,
        ),
        (
            Error::InvalidCertificate(CertificateError::NotValidYet),
            HandshakeFailure::NotYetValid,
        ),
        (
            Error::InvalidCertificate(CertificateError::Revoked),
            HandshakeFailure::Revoked,
        ),
        (
            Error::InvalidCertificate(CertificateError::UnknownRevocationStatus),
            HandshakeFailure::RevocationUnknown,
        ),
        (
            Error::InvalidCertificate(CertificateError::InvalidPurpose),
            HandshakeFailure::BadUsage,
        ),
        (
            Error::InvalidCertificate(CertificateError::BadEncoding),
            HandshakeFailure::BadCertificate,
        ),
        (Error::DecryptError, HandshakeFailure::Protocol),
    ];
    for (error, failure) in cases {
        assert_eq!(classify(&error), failure, "{error:?}");
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, error);
        assert_eq!(classify_io(&io), failure);
    }
    let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
    assert_eq!(classify_io(&eof), HandshakeFailure::Closed);
}

/// `f`'s listener with `[listener.tls]` keys `tls` (paths relative to `f`'s directory).
fn listener_tls(f: &Files, tls: &str) -> TlsConfig {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\n{tls}\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n"
    );
    let text = text.replace("DIR", &f.dir.display().to_string());
    let config = crate::Config::from_toml(&text, "t").expect("valid config");
    config.listeners[0].tls.clone().expect("TLS")
}

const ENTRY: &str = "[[listener.tls.certificate]]\ncert='DIR/server.pem'\nkey='DIR/server.key'\n";

#[test]
fn entries_share_a_verifier_where_their_client_trust_is_the_same_and_never_a_session_cache() {
    let f = Files::new("entries");
    let tls = listener_tls(
        &f,
        &format!(
            "cert='DIR/server.pem'\nkey='DIR/server.key'\nclient_ca='DIR/ca.pem'\n\
             {ENTRY}server_names=['a.example']\n{ENTRY}server_names=['b.example']\n"
        ),
    );
    let loaded = server_configs(&tls).expect("loads");
    let [a, b] = &loaded.entries[..] else {
        panic!("two entries")
    };
    for (one, other) in [(a, b), (a, &loaded.fallback)] {
        let (v1, v2) = (
            one.verifier.as_ref().expect("mTLS"),
            other.verifier.as_ref().expect("mTLS"),
        );
        assert!(Arc::ptr_eq(v1, v2), "the same client_ca loaded twice");
        assert!(!Arc::ptr_eq(&one.config, &other.config));
        assert!(!Arc::ptr_eq(
            &one.config.session_storage,
            &other.config.session_storage
        ));
    }
}

#[test]
fn a_default_entry_is_the_fallback_itself() {
    let f = Files::new("default");
    let tls = listener_tls(
        &f,
        &format!("{ENTRY}default=true\n{ENTRY}server_names=['a.example']\n"),
    );
    let loaded = server_configs(&tls).expect("loads");
    assert!(Arc::ptr_eq(&loaded.entries[0].config, &loaded.fallback.config));
    assert!(!Arc::ptr_eq(&loaded.entries[1].config, &loaded.fallback.config));
}
