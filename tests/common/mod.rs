//! Shared helpers for the end-to-end tests: a balancer running in-process, test backends, and
//! waits that poll a condition under a deadline instead of sleeping.
//!
//! Everything binds 127.0.0.1 port 0. Every wait on a peer goes through [`within`] or
//! [`wait_until`], so a bug shows up as a failure naming what was awaited, never as a hung run.

// Each test binary uses a different subset of these helpers. They are test code: `pub` only
// shares them between the test binaries, and a failed setup may panic.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod pki;
pub mod process;
pub mod redis;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::state::State;
use fulcrum::{CancellationToken, Config, Server};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any single wait may take before the test fails. Generous: it only bounds bugs.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for the large transfers, which are slow in debug builds.
pub const TRANSFER_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(10);

/// Awaits `future` for at most [`DEADLINE`], panicking with `what` if it does not finish.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    within_for(DEADLINE, what, future).await
}

/// Awaits `future` for at most `limit`, panicking with `what` if it does not finish.
pub async fn within_for<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `condition` until it holds, panicking with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > DEADLINE {
            panic!("condition not met after {DEADLINE:?}: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The balancer, running on a task of the test's runtime. Dropping it cancels it.
pub struct TestServer {
    addrs: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub state: Arc<State>,
    /// Reloads the running server.
    pub handle: fulcrum::reload::Handle,
    shutdown: CancellationToken,
    run: Option<JoinHandle<()>>,
}

/// Binds a server from TOML text and spawns its `run`.
pub async fn start(toml: &str) -> TestServer {
    start_config(Config::from_toml(toml, "<test>").expect("test config is valid")).await
}

/// Binds a server from a config file (so that it can reload it) and spawns its `run`.
pub async fn start_file(path: &std::path::Path) -> TestServer {
    start_config(Config::load(path).unwrap_or_else(|e| panic!("test config: {e}"))).await
}

async fn start_config(config: Config) -> TestServer {
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let server = Server::bind(config).await.expect("server binds");
    let addrs = names
        .into_iter()
        .map(|name| {
            let addr = server.local_addr(&name).expect("listener has an address");
            (name, addr)
        })
        .collect();
    let admin = server.admin_addr();
    let state = server.state();
    let handle = server.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(server.run(shutdown.clone()));
    TestServer {
        addrs,
        admin,
        state,
        handle,
        shutdown,
        run: Some(run),
    }
}

impl TestServer {
    /// The current generation's state (`state` is the first one's).
    pub fn current(&self) -> Arc<State> {
        self.handle.state()
    }

    /// The bound address of a listener.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("no listener named {listener:?}"))
    }

    /// Cancels the shutdown token (the drain starts); `run` keeps going until drained.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Cancels and waits for `run` to return, within `limit`.
    pub async fn stop_within(mut self, limit: Duration) {
        self.shutdown.cancel();
        let run = self.run.take().expect("run is awaited once");
        within_for(limit, "Server::run to return", run)
            .await
            .expect("Server::run does not panic");
    }

    /// Waits for `run` to return (after [`TestServer::cancel`]).
    pub async fn stopped(self) {
        self.stop_within(DEADLINE).await
    }

    /// Active connections per backend of `upstream`, counts only, in configured order.
    pub fn active(&self, upstream: &str) -> Vec<u32> {
        self.state
            .active_connections(upstream)
            .into_iter()
            .map(|(_, count)| count)
            .collect()
    }

    /// Waits until no connection is counted against any backend.
    pub async fn wait_idle(&self) {
        let state = Arc::clone(&self.state);
        wait_until("every backend's active count to return to 0", || {
            state.total_active() == 0
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a [`TestBackend`] does with each accepted connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Send every byte back; half-close when the client does.
    Echo,
    /// Send this banner first, then echo.
    BannerThenEcho(Vec<u8>),
    /// Read one chunk, then reset the connection (SO_LINGER 0, then close).
    ResetAfterFirstRead,
    /// Read and discard everything, never write, keep the connection open after the client's
    /// end of stream.
    Silent,
}

/// A backend on 127.0.0.1 that counts the connections it accepted.
pub struct TestBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TestBackend {
    pub async fn start(behavior: Behavior) -> TestBackend {
        TestBackend::start_at("127.0.0.1:0".parse().expect("address"), behavior).await
    }

    /// A backend on `addr` (port 0: any), e.g. back on the address of one that was stopped.
    pub async fn start_at(addr: SocketAddr, behavior: Behavior) -> TestBackend {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = listener.local_addr().expect("test backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            behavior,
            Arc::clone(&accepted),
            stop.clone(),
        ));
        TestBackend { addr, accepted, stop }
    }

    pub async fn echo() -> TestBackend {
        TestBackend::start(Behavior::Echo).await
    }

    pub async fn banner(banner: &[u8]) -> TestBackend {
        TestBackend::start(Behavior::BannerThenEcho(banner.to_vec())).await
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    behavior: Behavior,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let behavior = behavior.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(stream, behavior) => {}
            }
        });
    }
}

async fn serve(stream: TcpStream, behavior: Behavior) -> io::Result<()> {
    match behavior {
        Behavior::Echo => echo(stream, &[]).await,
        Behavior::BannerThenEcho(banner) => echo(stream, &banner).await,
        Behavior::ResetAfterFirstRead => {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await?;
            reset(stream);
            Ok(())
        }
        Behavior::Silent => {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            while stream.read(&mut buf).await? > 0 {}
            std::future::pending().await
        }
    }
}

async fn echo(stream: TcpStream, banner: &[u8]) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    write.write_all(banner).await?;
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

/// Closes `stream` with a reset instead of a FIN: SO_LINGER 0, then close.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
    drop(stream);
}

/// An address where nothing listens: a connect to it is refused at once.
pub fn refused_addr() -> SocketAddr {
    refused_addrs(1)[0]
}

/// `n` distinct addresses where nothing listens (bound together so their ports differ, then
/// closed; nothing else binds them during the test).
pub fn refused_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind to learn a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address"))
        .collect()
}

/// A listener that never accepts and whose accept queue is full, so further connects to it hang
/// (their SYNs are dropped) until the dialer gives up.
pub struct BlackHole {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("black hole socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        socket.bind(&any.into()).expect("bind black hole");
        socket.listen(0).expect("listen with backlog 0");
        let addr = socket
            .local_addr()
            .expect("black hole address")
            .as_socket()
            .expect("an IP address");
        // Fill the accept queue: connect until one connect does not complete. On loopback a
        // handshake the kernel answers completes in microseconds; one it drops never does.
        let mut queued = Vec::new();
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(e)) => panic!("connect to the black hole failed: {e}"),
                Err(_) => {
                    return BlackHole {
                        addr,
                        _socket: socket,
                        _queued: queued,
                    }
                }
            }
        }
        panic!("the black hole's accept queue never filled");
    }
}

/// Connects to `addr`, within the deadline.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Writes `message` and reads back exactly as many bytes (an echo round trip).
pub async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    within("write", stream.write_all(message)).await.expect("write");
    let mut reply = vec![0u8; message.len()];
    within("echo reply", stream.read_exact(&mut reply))
        .await
        .expect("read echo reply");
    reply
}

/// One HTTP/1.1 request (to the admin API) with `Connection: close`; the status code and the
/// body. A `Host` header is added unless `headers` has one.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = connect(addr).await;
    within("the admin request", stream.write_all(request.as_bytes()))
        .await
        .expect("send");
    let response = String::from_utf8(read_to_end(&mut stream).await.expect("answer")).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Reads until end of stream, within the deadline.
pub async fn read_to_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    within("end of stream", stream.read_to_end(&mut out)).await?;
    Ok(out)
}

/// Closes cleanly: half-close, then read (and check) until the peer's end of stream.
pub async fn close(mut stream: TcpStream) {
    within("shutdown", stream.shutdown()).await.expect("shutdown");
    let rest = read_to_end(&mut stream).await.expect("clean end of stream");
    assert!(rest.is_empty(), "unexpected bytes at close: {rest:?}");
}

/// Waits until connecting to `addr` is refused (the listener is closed).
pub async fn wait_until_refused(addr: SocketAddr) {
    let start = Instant::now();
    loop {
        match tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            // The listener closed while this handshake was queued: it is closing, look again.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(Err(e)) => panic!("connect to {addr} failed with {e}, expected a refusal"),
            // Still accepting: drop the connection and look again.
            Ok(Ok(stream)) => drop(stream),
            Err(_) => panic!("connect to {addr} hung for {DEADLINE:?}"),
        }
        if start.elapsed() > DEADLINE {
            panic!("{addr} still accepts connections after {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a payload is reproducible from its seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `"a", "b"` for a TOML array of backend addresses.
pub fn backend_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config with one listener `main` in front of one upstream `pool`. `upstream_extra` is added
/// to the upstream table (e.g. `connect_timeout = "300ms"`).
pub fn one_pool(backends: &[SocketAddr], upstream_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
backends = [{}]
{upstream_extra}
"#,
        backend_list(backends)
    )
}

/// A config file under the system temp directory, removed on drop.
pub struct TempConfig {
    pub path: std::path::PathBuf,
}

impl TempConfig {
    /// Writes `text` to a file with a name unique to this process and call.
    pub fn new(text: &str) -> TempConfig {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "fulcrum-test-{}-{}-{nanos}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).expect("write temp config");
        TempConfig { path }
    }

    /// The path as text, as it appears in fulcrum's messages.
    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes ANSI escape sequences (the binary's log lines are coloured even when piped).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every entry of the access log at `path` so far, parsed (a line not yet complete is skipped).
pub fn access_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits until the access log at `path` holds `count` entries whose `outcome` is `outcome`.
pub async fn wait_for_outcomes(path: &std::path::Path, outcome: &str, count: usize) {
    wait_until(&format!("{count} access log entries ending {outcome}"), || {
        access_log(path)
            .iter()
            .filter(|e| e["outcome"] == outcome)
            .count()
            == count
    })
    .await;
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat has a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Set in the environment of the copy of a test that runs inside its own network namespace.
const IN_NAMESPACE: &str = "FULCRUM_TEST_IN_NETNS";

/// Whether this is the copy of test `name` running in a network namespace of its own. If not,
/// runs that copy (`unshare --net --map-root-user`, this test binary, only `name`), asserts it
/// passed, and returns false: the caller then returns. The copy sets the namespace up itself.
pub fn in_own_network_namespace(name: &str) -> bool {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return true;
    }
    let status = std::process::Command::new("unshare")
        .args(["--net", "--map-root-user"])
        .arg(std::env::current_exe().expect("path of this test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run `unshare` (util-linux): {e}"));
    assert!(
        status.success(),
        "the test inside its network namespace failed ({status}); see its output above. \
         It needs `unshare --net --map-root-user` to work (root, or unprivileged user namespaces)"
    );
    false
}

/// Runs `ip ARGS` (iproute2) and asserts it succeeded.
pub fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(status.success(), "`ip {}` failed: {status}", args.join(" "));
}

/// Asserts the peer ends `stream` (end of stream or reset) without sending data.
pub async fn assert_ends<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, what: &str) {
    let mut buf = [0u8; 16];
    match within(&format!("{what} to end"), stream.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{what}: {n} bytes instead of the end of the connection"),
    }
}
