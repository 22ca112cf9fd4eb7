//! TLS cost with the compiled-in crypto provider: full mTLS handshakes (ECDSA P-256 certificates
//! from `fulcrum::pki`, client certificate verified), without and with a CRL, resumed ones, and
//! bulk record throughput, in memory so that only crypto and protocol work is measured. The
//! server side is timed on its own, which is the proxy's CPU per handshake; the key exchange group
//! negotiated is printed. Run: `cargo bench --bench handshake` (AWS-LC: X25519MLKEM768 is
//! negotiated; `FULCRUM_BENCH_KX=classical` makes the client offer only X25519), or with
//! `--no-default-features --features ring,mimalloc` for ring (X25519).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConnection};

const HANDSHAKES: usize = 400;
const BULK_BYTES: usize = 256 * 1024 * 1024;

fn main() {
    let common::Mtls {
        ca,
        dir,
        tls,
        server: server_config,
        client: mut client_config,
    } = common::mtls("bench");
    // The same listener with a CRL of the client CA revoking `n` other certificates.
    let with_crl = |n: usize| {
        let serials: Vec<Vec<u8>> = (0..n as u64)
            .map(|i| (i + 1_000_000).to_be_bytes().to_vec())
            .collect();
        let crl = ca
            .crl_of_serials(&serials, std::time::SystemTime::now() + Duration::from_secs(3600))
            .expect("sign CRL");
        std::fs::write(dir.join("ca.crl"), crl).expect("write CRL");
        let tls = fulcrum::config::TlsConfig {
            crl: Some(dir.join("ca.crl")),
            ..tls.clone()
        };
        fulcrum::tls::server_config(&tls)
            .expect("server config with CRL")
            .config
    };
    let crl_1 = with_crl(1);
    let crl_10k = with_crl(10_000);
    let resuming = Arc::new(client_config.clone());
    // Every handshake full: the client forgets its sessions.
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);
    let _ = std::fs::remove_dir_all(&dir);

    let provider = if cfg!(feature = "aws-lc-rs") {
        "aws-lc-rs"
    } else {
        "ring"
    };
    let mut last = None;
    for (what, server, client) in [
        ("full mtls handshakes", &server_config, &client_config),
        ("full mtls handshakes, CRL of 1", &crl_1, &client_config),
        ("full mtls handshakes, CRL of 10000", &crl_10k, &client_config),
        ("resumed mtls handshakes", &server_config, &resuming),
    ] {
        let (both, server_cpu, pair) = handshakes(server, client);
        println!(
            "{what} ({provider}, ECDSA P-256, client cert verified): {both:.0}/s both sides on one core, {server_cpu:.0} per server CPU-second"
        );
        println!(
            "  key exchange: {:?}",
            pair.0.negotiated_key_exchange_group().map(|g| g.name())
        );
        last = Some(pair);
    }

    // Bulk: client -> server application data through TLS records.
    let (mut client, mut server) = last.expect("at least one handshake");
    let chunk = vec![7u8; 16 * 1024];
    let mut sink = vec![0u8; 64 * 1024];
    let mut records = Vec::with_capacity(64 * 1024);
    let started = Instant::now();
    let mut moved = 0;
    while moved < BULK_BYTES {
        client.writer().write_all(&chunk).expect("plaintext in");
        records.clear();
        while client.wants_write() {
            client.write_tls(&mut records).expect("records out");
        }
        let mut rd = &records[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("records in");
            server.process_new_packets().expect("decrypt");
        }
        loop {
            match server.reader().read(&mut sink) {
                Ok(0) => break,
                Ok(n) => moved += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "tls bulk ({:?}): {:.2} Gbit/s encrypt+decrypt on one core",
        client.negotiated_cipher_suite().map(|s| s.suite()),
        moved as f64 * 8.0 / secs / 1e9
    );
}

/// [`HANDSHAKES`] handshakes in memory: handshakes per second with both sides on this core, per
/// server CPU-second, and the last connection pair.
fn handshakes(
    server_config: &Arc<rustls::ServerConfig>,
    client_config: &Arc<ClientConfig>,
) -> (f64, f64, (ClientConnection, ServerConnection)) {
    let mut server_time = Duration::ZERO;
    let started = Instant::now();
    let mut last = None;
    for _ in 0..HANDSHAKES {
        let mut client = ClientConnection::new(
            Arc::clone(client_config),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        let mut server = ServerConnection::new(Arc::clone(server_config)).expect("server");
        let mut buf = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            buf.clear();
            while client.wants_write() {
                client.write_tls(&mut buf).expect("client write");
            }
            let t = Instant::now();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).expect("server read");
            }
            server.process_new_packets().expect("server handshake");
            let mut out = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut out).expect("server write");
            }
            server_time += t.elapsed();
            let mut rd = &out[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read");
            }
            client.process_new_packets().expect("client handshake");
        }
        last = Some((client, server));
    }
    let total = started.elapsed();
    (
        HANDSHAKES as f64 / total.as_secs_f64(),
        HANDSHAKES as f64 / server_time.as_secs_f64(),
        last.expect("at least one handshake"),
    )
}
