//! Replays the committed fuzz seed corpora (`fuzz/corpus/<target>/`) through the same checks the
//! cargo-fuzz targets run (`fuzz/checks.rs`), so CI exercises them on stable without libFuzzer.
//! Seeds named `bad-*` must be refused by the parser, the others accepted (`partial-*`: a valid
//! prefix), so the corpus keeps meaning what its names say.
//!
//! `cargo test --test fuzz_corpus -- --ignored` regenerates the certificate and PROXY header
//! seeds (config seeds are hand-written files).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fulcrum::pki::{Ca, Eku, LeafSpec};
use fulcrum::proxy_protocol::{self, Parse, SslInfo, Version};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every seed of `target`, by file name, after running the target's check on it.
fn replay(target: &str, check: fn(&[u8])) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for entry in fs::read_dir(corpus(target)).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        let data = fs::read(&path).expect("corpus file");
        check(&data);
        seeds.push((
            path.file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned(),
            data,
        ));
    }
    assert!(seeds.len() >= 5, "{target}: only {} seeds", seeds.len());
    assert!(
        seeds.len() <= 50,
        "{target}: {} seeds; commit seeds, not fuzzing output",
        seeds.len()
    );
    seeds
}

#[test]
fn config_seeds_pass_the_fuzz_checks_and_only_bad_ones_are_refused() {
    for (name, data) in replay("config", checks::config) {
        let text = String::from_utf8(data).unwrap();
        let result = fulcrum::Config::from_toml(&text, &name);
        assert_eq!(
            result.is_err(),
            name.starts_with("bad-") || name == "empty.toml",
            "{name}: {result:?}"
        );
    }
}

#[test]
fn identity_seeds_pass_the_fuzz_checks_and_only_bad_ones_are_refused() {
    for (name, data) in replay("identity", checks::identity) {
        let result = fulcrum::identity::identity_from_der(&data);
        assert_eq!(result.is_err(), name.starts_with("bad-"), "{name}: {result:?}");
    }
}

#[test]
fn proxy_protocol_seeds_pass_the_fuzz_checks_and_only_bad_ones_are_refused() {
    for (name, data) in replay("proxy_protocol", checks::proxy_protocol) {
        let result = proxy_protocol::parse(&data);
        match &result {
            Err(_) => assert!(name.starts_with("bad-"), "{name}: {result:?}"),
            Ok(Parse::Incomplete) => assert!(name.starts_with("partial-"), "{name}: {result:?}"),
            Ok(Parse::Complete(_)) => assert!(
                !name.starts_with("bad-") && !name.starts_with("partial-"),
                "{name}"
            ),
        }
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

fn write(target: &str, name: &str, data: &[u8]) {
    fs::write(corpus(target).join(name), data).expect("write seed");
}

/// CRC-32C for the checksummed seed (the codec's own is private).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn regenerate_seed_corpora() {
    let ca = Ca::new("fulcrum fuzz seed CA").unwrap();
    let alice = der(&ca.client("alice").unwrap().cert);
    write("identity", "client-alice.der", &alice);
    let spiffe = ca.client("spiffe://example.org/ns/prod/sa/web").unwrap();
    write("identity", "client-spiffe.der", &der(&spiffe.cert));
    write("identity", "ca.der", &der(&ca.cert_pem()));
    let no_eku = LeafSpec {
        eku: Eku::None,
        ..LeafSpec::client("carol.example")
    };
    write(
        "identity",
        "client-without-eku.der",
        &der(&ca.leaf(&no_eku).unwrap().cert),
    );
    let server = ca.server(&["localhost".to_string()]).unwrap();
    write("identity", "bad-server-eku.der", &der(&server.cert));
    let nameless = LeafSpec {
        common_name: None,
        dns_sans: vec![],
        uri_sans: vec![],
        ..LeafSpec::client("x")
    };
    write(
        "identity",
        "bad-no-names.der",
        &der(&ca.leaf(&nameless).unwrap().cert),
    );
    write("identity", "bad-truncated.der", &alice[..alice.len() / 2]);
    write("identity", "bad-trailing-byte.der", &[&alice[..], &[0]].concat());
    write("identity", "bad-empty.der", b"");
    write("identity", "bad-not-der.der", b"-----BEGIN CERTIFICATE-----\n");

    let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
    let (v4a, v4b) = (addr("192.168.0.1:56324"), addr("192.168.0.11:443"));
    let (v6a, v6b) = (addr("[2001:db8::1]:56324"), addr("[2001:db8::2]:443"));
    let pp = |name: &str, data: &[u8]| write("proxy_protocol", name, data);
    pp("v1-tcp4.bin", &encode(Version::V1, v4a, v4b));
    pp("v1-tcp6.bin", &encode(Version::V1, v6a, v6b));
    pp("v1-tcp6-mapped.bin", &encode(Version::V1, v4a, v6b));
    pp("v1-unknown.bin", b"PROXY UNKNOWN\r\n");
    pp("v1-unknown-longest.bin", b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n");
    pp(
        "v1-tcp4-with-payload.bin",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 0 65535\r\nGET / HTTP/1.1\r\n\r\n",
    );
    pp("v2-ipv4.bin", &encode(Version::V2, v4a, v4b));
    pp("v2-ipv6.bin", &encode(Version::V2, v6a, v6b));
    let ssl = SslInfo {
        verified: true,
        client_cert: true,
        version: Some("TLSv1.3".into()),
        cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
        cn: Some("alice".into()),
        alpn: None,
    };
    pp(
        "v2-ssl-authority.bin",
        &proxy_protocol::encode(Version::V2, v4a, v6b, Some(&ssl), Some("a.example")),
    );
    let sig = b"\r\n\r\n\0\r\nQUIT\n";
    pp("v2-local.bin", &[&sig[..], &[0x20, 0x00, 0x00, 0x00]].concat());
    pp(
        "v2-unix.bin",
        &[&sig[..], &[0x21, 0x31, 0x00, 0xd8], &[b'/'; 216]].concat(),
    );
    let mut crc = [
        &encode(Version::V2, v4a, v4b)[..],
        &[0x03, 0x00, 0x04, 0, 0, 0, 0, 0x01, 0x00, 0x02, b'h', b'2'],
    ]
    .concat();
    crc[15] += 12;
    let sum = crc32c(&crc);
    crc[31..35].copy_from_slice(&sum.to_be_bytes());
    pp("v2-crc32c-alpn.bin", &crc);
    pp("partial-v2.bin", &encode(Version::V2, v6a, v6b)[..30]);
    pp("partial-v1.bin", b"PROXY TCP6 2001:db8::1 ");
    pp(
        "bad-tls-clienthello.bin",
        &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03],
    );
    pp("bad-http.bin", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    pp("bad-v1-double-space.bin", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n");
    pp("bad-v1-family-mismatch.bin", b"PROXY TCP4 ::1 ::1 1 2\r\n");
    pp(
        "bad-v2-tlv-overrun.bin",
        &[
            &encode(Version::V2, v4a, v4b)[..14],
            &[0x00, 0x0f],
            &[0; 12],
            &[0x02, 0x00, 0x09],
        ]
        .concat(),
    );
    pp(
        "bad-v2-too-long.bin",
        &[&sig[..], &[0x21, 0x11, 0xff, 0xff]].concat(),
    );
    pp(
        "bad-v2-version.bin",
        &[&sig[..], &[0x11, 0x11, 0x00, 0x0c]].concat(),
    );
}

fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    proxy_protocol::encode(version, source, destination, None, None)
}
