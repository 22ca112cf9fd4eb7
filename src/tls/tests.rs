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
            cert: self.dir.join(cert),
            key: self.dir.join(key),
            client_ca: ca.map(|c| self.dir.join(c)),
            min_version: TlsVersion::Tls12,
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
