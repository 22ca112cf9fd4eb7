//! Helpers for the mTLS, authorization and rate-limit end-to-end tests: certificate files in a
//! per-test temporary directory, counting echo backends, an in-process balancer, rustls clients,
//! and deadline-bounded waits.
//!
//! Everything binds 127.0.0.x port 0, certificates are generated at run time, and every wait on
//! a peer has a generous deadline ([`PEER_DEADLINE`]) that only guards against hangs: it is never
//! what a test asserts.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::metrics::Reason;
use fulcrum::pki::{Ca, Pem};
use fulcrum::state::State;
use fulcrum::CancellationToken;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Hang guard for any single wait on a peer or a condition. Generous on purpose: a healthy run
/// takes milliseconds, so this only decides how long a broken run takes to fail.
pub const PEER_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `future` under [`PEER_DEADLINE`], panicking with `what` if it does not finish.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PEER_DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {PEER_DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `condition` until it holds, panicking with `what` after [`PEER_DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PEER_DEADLINE;
    while !condition() {
        if Instant::now() >= deadline {
            panic!("timed out after {PEER_DEADLINE:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A unique directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "fulcrum-test-{label}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns the absolute path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// [`write`](TempDir::write), mode 0600: a secret file (`token_file`, `password_file`) that
    /// group or others may read is refused.
    pub fn write_secret(&self, name: &str, contents: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.write(name, contents);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

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
            backends = super::backend_list(backends),
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

/// A path as a TOML string.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("temp paths are UTF-8"))
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

/// A TCP echo server on 127.0.0.1 port 0 that counts the connections it accepts.
pub struct EchoBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind echo backend");
        let addr = socket.local_addr().expect("echo backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(echo_loop(socket, Arc::clone(&accepted), stop.clone()));
        EchoBackend { addr, accepted, stop }
    }

    /// Connections this backend has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn echo_loop(socket: TcpListener, accepted: Arc<AtomicUsize>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut read, mut write) = stream.into_split();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                } => {}
            }
        });
    }
}

/// The real balancer, running in-process until dropped.
pub struct Balancer {
    pub state: Arc<State>,
    addrs: Vec<(String, SocketAddr)>,
    stop: CancellationToken,
}

impl Balancer {
    /// Parses `toml`, binds every listener (their `bind` should use port 0) and starts serving.
    pub async fn start(toml: &str) -> Balancer {
        let config = fulcrum::Config::from_toml(toml, "<test>").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let server = fulcrum::Server::bind(config).await.expect("bind the balancer");
        let addrs = names
            .into_iter()
            .map(|name| {
                let addr = server.local_addr(&name).expect("listener address");
                (name, addr)
            })
            .collect();
        let state = server.state();
        let stop = CancellationToken::new();
        tokio::spawn(server.run(stop.clone()));
        Balancer { state, addrs, stop }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("no listener {listener:?}"))
    }

    /// The non-zero rejection counters of a listener, as `(label, count)`.
    pub fn rejections(&self, listener: &str) -> Vec<(&'static str, u64)> {
        let l = self
            .state
            .listener(listener)
            .unwrap_or_else(|| panic!("no listener {listener:?}"));
        Reason::ALL
            .iter()
            .map(|r| (r.label(), l.rejected.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Waits until the listener's rejection counters are exactly `expected` (non-zero ones).
    pub async fn wait_for_rejections(&self, listener: &str, expected: &[(Reason, u64)]) {
        let expected: Vec<(&'static str, u64)> = expected.iter().map(|(r, n)| (r.label(), *n)).collect();
        let deadline = Instant::now() + PEER_DEADLINE;
        loop {
            let actual = self.rejections(listener);
            if actual == expected {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {PEER_DEADLINE:?} waiting until listener {listener:?} counts \
                     rejections {expected:?}; it counts {actual:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
