//! TLS for the end-to-end tests: a test CA with a server certificate written to a
//! [`TempDir`], rustls clients presenting (or not) a client certificate, and the checks that a
//! TLS connection was served (an echo) or refused (no data).
//!
//! Certificates are generated at run time; every wait on a peer goes through [`within`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fulcrum::pki::{Ca, Pem};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{backend_list, toml_path, within, TempDir};

/// A test CA with a server certificate, all written as PEM files to a temp dir.
pub struct Pki {
    pub ca: Ca,
    pub dir: TempDir,
    /// The CA certificate file: the listener's `client_ca` and the clients' trust anchor.
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// A fresh CA and a server certificate for `localhost` plus `extra_server_names`.
    pub fn new(extra_server_names: &[&str]) -> Pki {
        let ca = Ca::new("fulcrum test CA").expect("generate CA");
        let names: Vec<String> = extra_server_names.iter().map(|n| n.to_string()).collect();
        let server = ca.server(&names).expect("issue server certificate");
        let dir = TempDir::new("pki");
        let ca_file = dir.write("ca.pem", &ca.cert_pem());
        let server_cert = dir.write("server.pem", &server.cert);
        let server_key = dir.write("server.key", &server.key);
        Pki {
            ca,
            dir,
            ca_file,
            server_cert,
            server_key,
        }
    }

    /// A client certificate for `name`, issued by this CA.
    pub fn client(&self, name: &str) -> Pem {
        self.ca.client(name).expect("issue client certificate")
    }

    /// Writes `pem` to `<stem>.pem` and `<stem>.key`, for command-line clients.
    pub fn write_pem(&self, stem: &str, pem: &Pem) -> (PathBuf, PathBuf) {
        (
            self.dir.write(&format!("{stem}.pem"), &pem.cert),
            self.dir.write(&format!("{stem}.key"), &pem.key),
        )
    }

    /// A `[listener.tls]` table requiring client certificates from `client_ca`.
    pub fn tls_table(&self, client_ca: &Path, min_version: &str) -> String {
        format!(
            "[listener.tls]\ncert = {}\nkey = {}\nclient_ca = {}\nmin_version = \"{min_version}\"\n",
            toml_path(&self.server_cert),
            toml_path(&self.server_key),
            toml_path(client_ca),
        )
    }

    /// One mTLS listener `tls` (client certificates from `client_ca`, `listener_keys` added to
    /// its table) in front of upstream `web` with `backends`, then `rest` (e.g. `[authorization]`).
    pub fn one_pool_config(
        &self,
        client_ca: &Path,
        min_version: &str,
        listener_keys: &str,
        backends: &[SocketAddr],
        rest: &str,
    ) -> String {
        format!(
            "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n{listener_keys}\n{tls}\n\
             [[upstream]]\nname = \"web\"\nbackends = [{backends}]\n\n{rest}\n",
            tls = self.tls_table(client_ca, min_version),
            backends = backend_list(backends),
        )
    }

    /// A client configuration trusting this CA and presenting `cert`.
    pub fn client_config(&self, cert: Option<&Pem>) -> Arc<ClientConfig> {
        client_config(
            &self.ca.cert_pem(),
            cert,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }
}

/// A rustls client trusting `roots_pem`, offering `versions`, presenting `cert` if given.
pub fn client_config(
    roots_pem: &str,
    cert: Option<&Pem>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(ca.expect("CA PEM"))
            .expect("CA usable as a trust anchor");
    }
    let builder = ClientConfig::builder_with_provider(fulcrum::tls::provider())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match cert {
        Some(pem) => {
            let chain = vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("client cert PEM")];
            let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert and key match")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Connects to `addr` and runs a TLS handshake for `server_name`. The TCP connect must succeed;
/// the handshake result is returned (in TLS 1.3 a refused client certificate usually shows up on
/// the first read instead).
pub async fn connect_tls(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = within("TCP connect to the balancer", TcpStream::connect(addr))
        .await
        .expect("TCP connect to the balancer");
    let name = ServerName::try_from(server_name.to_owned()).expect("valid server name");
    within(
        "the client's TLS handshake",
        TlsConnector::from(Arc::clone(config)).connect(name, tcp),
    )
    .await
}

/// Connects over TCP from `source` (an address on the loopback network) to `addr`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind client source address");
    within("TCP connect to the balancer", socket.connect(addr))
        .await
        .expect("TCP connect to the balancer")
}

/// Sends `probe` and asserts the same bytes come back (the connection reached an echo backend).
pub async fn assert_echoes<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, probe: &[u8]) {
    within("sending the probe", stream.write_all(probe))
        .await
        .expect("write the probe");
    within("flushing the probe", stream.flush())
        .await
        .expect("flush the probe");
    let mut back = vec![0u8; probe.len()];
    within("the echoed probe", stream.read_exact(&mut back))
        .await
        .expect("read the echoed probe");
    assert_eq!(back, probe, "the echo backend sent back other bytes");
}

/// Asserts a connection was refused: the handshake failed, or the first read after sending a
/// probe ends (EOF or error) without a single byte of data.
pub async fn assert_refused<S: AsyncRead + AsyncWrite + Unpin>(connected: io::Result<S>) {
    let mut stream = match connected {
        Err(_) => return,
        Ok(stream) => stream,
    };
    // The write may fail if the server already closed; the read decides.
    let _ = within("sending the probe", stream.write_all(b"ping")).await;
    let _ = within("flushing the probe", stream.flush()).await;
    let mut buf = [0u8; 64];
    match within("the refused connection to end", stream.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected a refusal, but the connection returned data: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// Reads until EOF (or an error after at least nothing more arrives), at most `limit` bytes.
pub async fn read_to_end_bounded<S: AsyncRead + Unpin>(stream: &mut S, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() <= limit {
        let n = within("the peer to finish sending", stream.read(&mut buf)).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
    panic!("peer sent more than {limit} bytes without closing");
}
