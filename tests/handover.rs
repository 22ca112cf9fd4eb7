//! Upgrading without a gap on one host: two `fulcrum` processes share a port through
//! SO_REUSEPORT, the old one drains on SIGTERM while the new one serves, and no client is refused.
//!
//! A closing SO_REUSEPORT socket takes the connections still queued on it down with it unless the
//! kernel moves them to a sibling (`net.ipv4.tcp_migrate_req = 1`, Linux 5.14+), which is how the
//! README tells operators to run upgrades. The test must not change the host's settings, so it
//! re-runs itself in a network namespace of its own (`unshare --net --map-root-user`), where it
//! brings up loopback and sets that sysctl; the traffic never leaves that namespace.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::Fulcrum;
use common::{one_pool, wait_until, within, TempDir, TestBackend, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Concurrent clients, each opening one short connection after another.
const CLIENTS: usize = 8;
/// Connections each phase must see served before the test moves on.
const PER_PHASE: usize = 300;
/// Upper bound on connections per client, so the load always ends.
const MAX_PER_CLIENT: usize = 20_000;

fn config(port: u16, admin_port: u16, backend: SocketAddr) -> String {
    let listener = one_pool(&[backend], "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    format!("drain_timeout = \"30s\"\n\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\n{listener}")
}

#[test]
fn an_old_process_drains_while_a_new_one_on_the_same_port_serves_and_no_client_is_refused() {
    let name = "an_old_process_drains_while_a_new_one_on_the_same_port_serves_and_no_client_is_refused";
    if !common::in_own_network_namespace(name) {
        return;
    }
    prepare_namespace();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(handover());
}

/// Loopback up and queued connections moved between SO_REUSEPORT siblings, in this namespace only.
fn prepare_namespace() {
    common::ip(&["link", "set", "lo", "up"]);
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
        .expect("set net.ipv4.tcp_migrate_req in the test's namespace (Linux 5.14+)");
}

async fn handover() {
    let echo = TestBackend::echo().await;
    let [port, admin] = free_ports();
    // One config for both, as in an upgrade: the listener and the admin socket are shared.
    let dir = TempDir::new("handover");
    let config = dir.write("fulcrum.toml", &config(port, admin, echo.addr));

    let mut old = Fulcrum::run(&config);
    let addr = old.listening("main").await;
    let load = Load::start(addr);
    load.wait_for_more("the old process serves", PER_PHASE).await;

    let mut new = Fulcrum::run(&config);
    assert_eq!(
        new.listening("main").await,
        addr,
        "the new process bound another address"
    );
    load.wait_for_more("both processes serve", PER_PHASE).await;

    old.signal("TERM");
    let (status, rest) = within("the old process to drain and exit", old.exit()).await;
    assert!(status.success(), "the old process exited with {status}");
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "the old process did not stop gracefully: {rest:#?}"
    );
    load.wait_for_more("the new process serves alone", PER_PHASE)
        .await;
    let health = healthz(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "the new process's admin socket: {health:?}"
    );

    let (served, refused) = load.stop().await;
    assert_eq!(
        refused,
        Vec::<String>::new(),
        "clients refused during the handover"
    );
    assert!(served >= 3 * PER_PHASE, "only {served} connections served");
    new.signal("TERM");
    let (status, _) = new.exit().await;
    assert!(status.success(), "the new process exited with {status}");
}

/// The admin socket's answer to `GET /healthz`.
async fn healthz(admin: SocketAddr) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    within("GET /healthz", exchange).await.expect("admin answers")
}

/// Two distinct free ports (nothing else runs in this namespace to take them meanwhile).
fn free_ports() -> [u16; 2] {
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    let port = |i: usize| listeners[i].local_addr().expect("bound address").port();
    [port(0), port(1)]
}

/// Clients opening one echo connection after another until stopped.
struct Load {
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CLIENTS)
            .map(|client| {
                let (served, stop) = (Arc::clone(&served), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let started = Instant::now();
                    for n in 0..MAX_PER_CLIENT {
                        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(120) {
                            break;
                        }
                        let message = format!("client {client} connection {n}");
                        match echo_once(addr, message.as_bytes()).await {
                            Ok(()) => served.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                failures.push(format!("{message}: {e}"));
                                0
                            }
                        };
                    }
                    failures
                })
            })
            .collect();
        Load {
            served,
            stop,
            clients,
        }
    }

    /// Waits until `more` connections beyond the current count have been served.
    async fn wait_for_more(&self, what: &str, more: usize) {
        let target = self.served.load(Ordering::SeqCst) + more;
        wait_until(what, || self.served.load(Ordering::SeqCst) >= target).await;
    }

    /// Stops the clients; returns how many connections were served and every failure.
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for client in self.clients {
            failures.extend(within("a client to stop", client).await.expect("client task"));
        }
        (self.served.load(Ordering::SeqCst), failures)
    }
}

/// One connection: connect, echo `message`, half-close, read to the end; errors as text.
async fn echo_once(addr: SocketAddr, message: &[u8]) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(message).await?;
        stream.shutdown().await?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await?;
        Ok::<_, std::io::Error>(echoed)
    };
    match tokio::time::timeout(DEADLINE, exchange).await {
        Err(_) => Err(format!("no answer within {DEADLINE:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(echoed)) if echoed != message => Err(format!("echoed {echoed:?}")),
        Ok(Ok(_)) => Ok(()),
    }
}
