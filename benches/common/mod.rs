//! What the TLS benchmarks share: a throwaway CA from `fulcrum::pki`, an mTLS listener's server
//! config built by `fulcrum::tls` from files in a temporary directory, and a client config with
//! alice's certificate (resumption left on; a benchmark disables it for full handshakes).

// Each benchmark uses a part of this (`pub` only to share it between the bench binaries).
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub struct Mtls {
    pub ca: fulcrum::pki::Ca,
    /// Holds the listener's files; the caller removes it when done.
    pub dir: PathBuf,
    pub tls: fulcrum::config::TlsConfig,
    pub server: Arc<ServerConfig>,
    pub client: ClientConfig,
}

pub fn mtls(name: &str) -> Mtls {
    let dir = std::env::temp_dir().join(format!("fulcrum-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let ca = fulcrum::pki::Ca::new("bench CA").expect("CA");
    let server_pem = ca.server(&[]).expect("server certificate");
    let alice = ca.client("alice").expect("client certificate");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write CA");
    std::fs::write(dir.join("server.pem"), &server_pem.cert).expect("write server certificate");
    std::fs::write(dir.join("server.key"), &server_pem.key).expect("write server key");
    let tls = fulcrum::config::TlsConfig {
        client_ca: Some(dir.join("ca.pem")),
        ..fulcrum::config::TlsConfig::new(dir.join("server.pem"), dir.join("server.key"))
    };
    let server = fulcrum::tls::server_config(&tls).expect("server config").config;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca"))
        .expect("root");
    // The client offers fulcrum's default key exchange (X25519MLKEM768 first where the provider
    // has it). `FULCRUM_BENCH_KX=classical`: only X25519, as a ring build negotiates;
    // `FULCRUM_BENCH_KX=hybrid` (aws-lc-rs builds): only X25519MLKEM768.
    let mut provider = (*fulcrum::tls::provider()).clone();
    match std::env::var("FULCRUM_BENCH_KX").as_deref() {
        Ok("classical") => provider
            .kx_groups
            .retain(|g| g.name() == rustls::NamedGroup::X25519),
        Ok("hybrid") => provider
            .kx_groups
            .retain(|g| g.name() == rustls::NamedGroup::X25519MLKEM768),
        _ => {}
    }
    assert!(
        !provider.kx_groups.is_empty(),
        "FULCRUM_BENCH_KX names a group this build lacks"
    );
    let client = ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(alice.cert.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(alice.key.as_bytes()).expect("key"),
        )
        .expect("client auth");
    Mtls {
        ca,
        dir,
        tls,
        server,
        client,
    }
}
