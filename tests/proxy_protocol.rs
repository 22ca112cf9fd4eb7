//! Carrying the client to backends: PROXY protocol headers sent to backends (v1, v2 with the mTLS
//! identity), PROXY headers accepted from a trusted front, TLS (and mTLS) to backends, and a real
//! consumer (HAProxy with `accept-proxy`) reading what fulcrum sends.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::tls::{connect_tls, Pki};
use common::{toml_path, wait_until, within, TempDir, TestBackend, TestServer};
use fulcrum::metrics::Reason;
use fulcrum::proxy_protocol::{parse, Parse};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that records the first `header_len`-or-more bytes it receives: reads until a PROXY
/// header parses, then the rest of the stream, and returns (header bytes, payload).
async fn recording_backend() -> (SocketAddr, tokio::sync::oneshot::Receiver<(Vec<u8>, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes).await;
        let len = match parse(&bytes) {
            Ok(Parse::Complete(header)) => header.len,
            _ => 0,
        };
        let payload = bytes.split_off(len);
        let _ = tx.send((bytes, payload));
    });
    (addr, rx)
}

#[tokio::test]
async fn a_v1_header_with_the_real_client_address_reaches_the_backend_before_any_client_byte() {
    let (backend, recorded) = recording_backend().await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\nproxy_protocol = \"v1\"\n"
    ))
    .await;
    let listener = balancer.addr("plain");
    let mut client = within("connect", TcpStream::connect(listener))
        .await
        .expect("connect");
    let client_addr = client.local_addr().expect("client addr");
    client.write_all(b"hello backend").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let (header, payload) = within("the backend's bytes", recorded).await.expect("recorded");
    let expected = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        client_addr.ip(),
        listener.ip(),
        client_addr.port(),
        listener.port()
    );
    assert_eq!(String::from_utf8_lossy(&header), expected);
    assert_eq!(payload, b"hello backend");
}

#[tokio::test]
async fn a_v2_header_over_mtls_carries_the_client_address_identity_tls_version_and_cipher() {
    let pki = Pki::new(&[]);
    let (backend, recorded) = recording_backend().await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{}\
         [[upstream]]\nname = \"web\"\nbackends = [\"{backend}\"]\nproxy_protocol = \"v2\"\n\
         [authorization]\nalice = [\"web\"]\n",
        pki.tls_table(&pki.ca_file, "1.2")
    ))
    .await;
    let alice = pki.client("alice");
    let mut client = connect_tls(
        balancer.addr("tls"),
        &pki.client_config(Some(&alice)),
        "localhost",
    )
    .await
    .expect("alice's handshake");
    let client_addr = client.get_ref().0.local_addr().expect("client addr");
    client.write_all(b"payload").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let (header, payload) = within("the backend's bytes", recorded).await.expect("recorded");
    let Ok(Parse::Complete(header)) = parse(&header) else {
        panic!("the backend did not receive a complete v2 header: {header:?}");
    };
    assert_eq!(header.version, fulcrum::proxy_protocol::Version::V2);
    assert_eq!(header.source, Some(client_addr));
    assert_eq!(header.destination, Some(balancer.addr("tls")));
    assert_eq!(header.authority.as_deref(), Some("localhost"));
    let ssl = header.ssl.expect("an SSL TLV");
    assert!(ssl.verified && ssl.client_cert, "{ssl:?}");
    assert_eq!(ssl.cn.as_deref(), Some("alice"));
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert!(
        ssl.cipher.is_some_and(|c| c.starts_with("TLS13_")),
        "cipher missing"
    );
    assert_eq!(payload, b"payload");
}

#[tokio::test]
async fn an_accepted_proxy_header_is_the_client_for_rate_limits_and_its_payload_is_kept() {
    let backend = TestBackend::echo().await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         accept_proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [listener.rate_limit]\ncapacity = 1\nwindow = \"1h\"\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n",
        backend.addr
    ))
    .await;
    let edge = balancer.addr("edge");
    // Header and payload fused in one write, as a front may send them.
    let send = |source: &'static str| async move {
        let mut stream = within("connect", TcpStream::connect(edge))
            .await
            .expect("connect");
        let mut bytes = format!("PROXY TCP4 {source} 127.0.0.1 40000 443\r\n").into_bytes();
        bytes.extend_from_slice(b"ping");
        stream.write_all(&bytes).await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        let _ = within("the reply", stream.read_to_end(&mut reply)).await;
        reply
    };
    assert_eq!(send("10.1.2.3").await, b"ping", "first client from 10.1.2.3");
    assert_eq!(
        send("10.1.2.3").await,
        b"",
        "second connection from 10.1.2.3 is over capacity"
    );
    assert_eq!(
        send("10.9.9.9").await,
        b"ping",
        "another announced client is served"
    );
    balancer
        .wait_for_rejections("edge", &[(Reason::RateLimited, 1)])
        .await;
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_malformed_proxy_header_closes_the_connection_before_any_backend_is_dialed() {
    let backend = TestBackend::echo().await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         accept_proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n",
        backend.addr
    ))
    .await;
    for bad in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ] {
        let mut stream = within("connect", TcpStream::connect(balancer.addr("edge")))
            .await
            .expect("connect");
        stream.write_all(bad).await.expect("write");
        let mut reply = Vec::new();
        let _ = within("the close", stream.read_to_end(&mut reply)).await;
        assert!(reply.is_empty(), "{bad:?} got a reply");
    }
    balancer
        .wait_for_rejections("edge", &[(Reason::ProxyHeader, 3)])
        .await;
    assert_eq!(backend.accepted(), 0);
}

/// A TLS echo backend presenting `cert` and, if `client_ca` is given, requiring client
/// certificates from it. Counts completed handshakes.
async fn tls_backend(
    cert: &fulcrum::pki::Pem,
    client_ca: Option<&str>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let provider = fulcrum::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("ca"))
                .expect("root");
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.cert.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(cert.key.as_bytes()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (mut r, mut w) = tokio::io::split(&mut tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test]
async fn upstream_mtls_reaches_a_backend_that_requires_a_client_certificate() {
    let backend_pki = Pki::new(&[]);
    let backend_cert = backend_pki.ca.server(&[]).expect("backend cert");
    let lb_client = backend_pki.client("fulcrum-lb");
    let (cert, key) = backend_pki.write_pem("lb", &lb_client);
    let (addr, handshakes) = tls_backend(&backend_cert, Some(&backend_pki.ca.cert_pem())).await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{addr}\"]\n\
         [upstream.tls]\nca = {}\ncert = {}\nkey = {}\nserver_name = \"localhost\"\n",
        toml_path(&backend_pki.ca_file),
        toml_path(&cert),
        toml_path(&key)
    ))
    .await;
    let mut client = within("connect", TcpStream::connect(balancer.addr("plain")))
        .await
        .expect("connect");
    client.write_all(b"over tls").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    within("the echo", client.read_to_end(&mut reply))
        .await
        .expect("read");
    assert_eq!(reply, b"over tls");
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_backend_whose_certificate_does_not_verify_is_refused_and_counted_as_a_connect_failure() {
    let trusted = Pki::new(&[]);
    let impostor = Pki::new(&[]);
    let impostor_cert = impostor.ca.server(&[]).expect("impostor cert");
    let (addr, handshakes) = tls_backend(&impostor_cert, None).await;
    let balancer = TestServer::start(&format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{addr}\"]\nconnect_attempts = 1\n\
         [upstream.tls]\nca = {}\nserver_name = \"localhost\"\n",
        toml_path(&trusted.ca_file)
    ))
    .await;
    let mut client = within("connect", TcpStream::connect(balancer.addr("plain")))
        .await
        .expect("connect");
    client.write_all(b"secret").await.expect("write");
    let mut reply = Vec::new();
    let _ = within("the close", client.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty(),
        "the client got bytes from an unverified backend"
    );
    balancer
        .wait_for_rejections("plain", &[(Reason::ConnectFailed, 1)])
        .await;
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// HAProxy (Debian package) as the backend with `accept-proxy`: its log line shows the client
/// address it parsed from fulcrum's header, for v1 and v2.
#[tokio::test]
async fn haproxy_with_accept_proxy_logs_the_client_address_fulcrum_sent() {
    let Ok(haproxy) = which("haproxy") else {
        panic!("haproxy is not installed: .ci/run installs Debian's haproxy for this test");
    };
    for version in ["v1", "v2"] {
        let echo = TestBackend::echo().await;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
            probe.local_addr().expect("addr").port()
        };
        let dir = TempDir::new("haproxy");
        let cfg = dir.write(
            "haproxy.cfg",
            &format!(
                "global\n  log stdout format raw local0\ndefaults\n  mode tcp\n  log global\n  \
                 timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
                 frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n  \
                 log-format \"parsed-source=%ci:%cp\"\n  default_backend be\n\
                 backend be\n  server s1 {}\n",
                echo.addr
            ),
        );
        let mut child = tokio::process::Command::new(&haproxy)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start haproxy");
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_until("haproxy listens", || std::net::TcpStream::connect(target).is_ok()).await;
        let balancer = TestServer::start(&format!(
            "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
             [[upstream]]\nname = \"web\"\nbackends = [\"{target}\"]\nproxy_protocol = \"{version}\"\n"
        ))
        .await;
        let mut client = within("connect", TcpStream::connect(balancer.addr("plain")))
            .await
            .expect("connect");
        let client_addr = client.local_addr().expect("client addr");
        client.write_all(b"through haproxy").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        within("the echo through haproxy", client.read_to_end(&mut reply))
            .await
            .expect("read");
        assert_eq!(reply, b"through haproxy", "{version}");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout);
        let mut line = String::new();
        let expected = format!("parsed-source={client_addr}");
        let found = within("haproxy's log line", async {
            use tokio::io::AsyncBufReadExt;
            loop {
                line.clear();
                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return false;
                }
                if line.contains("parsed-source=") {
                    return line.trim() == expected;
                }
            }
        })
        .await;
        assert!(found, "{version}: haproxy logged {line:?}, expected {expected:?}");
        let _ = child.kill().await;
    }
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
        .ok_or(())
}
