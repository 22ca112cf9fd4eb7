//! fulcrum under systemd, without systemd: the real binary started the way a service manager
//! starts it. Socket activation: the test holds a listening socket, as a `.socket` unit does,
//! and passes it as fd 3 with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the child's own
//! pid: `sh` sets it to `$$`, then execs fulcrum, which keeps the pid), so a restart refuses no
//! connection: they wait in the socket's queue. Notifications: the test binds the datagram socket
//! `NOTIFY_SOCKET` names and reads what fulcrum says.

mod common;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::process::{async_command, Fulcrum};
use common::{connect, one_pool, refused_addr, round_trip, wait_until, within, TempDir, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};

/// Connections the client loop of the restart test makes, one after another.
const RESTART_CONNECTIONS: usize = 200;
/// Connections the loop has had served before the first process is stopped.
const BEFORE_RESTART: usize = 20;
/// Connections opened while no fulcrum runs at all.
const DURING_GAP: usize = 3;

/// `sh` puts its stdin (the passed socket) on fd 3, gives fulcrum /dev/null as stdin, sets
/// `LISTEN_PID` to its own pid unless the test set one, and execs fulcrum in its place. `$0` is
/// the `--` that [`common::process::command`] puts before the binary.
const ACTIVATE: &str = r#"LISTEN_PID=${LISTEN_PID:-$$} exec "$@" 3<&0 0</dev/null"#;

/// A config with listener `main` bound at `bind`, in front of `backend`.
fn config(dir: &TempDir, bind: SocketAddr, backend: SocketAddr) -> PathBuf {
    let text = one_pool(&[backend], "").replace("127.0.0.1:0", &bind.to_string());
    dir.write("fulcrum.toml", &format!("drain_timeout = \"5s\"\n{text}"))
}

/// A listening socket on 127.0.0.1, as systemd's `.socket` unit holds one.
fn systemd_socket() -> (std::net::TcpListener, SocketAddr) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the passed socket");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

/// `fulcrum run` with `fd3` as fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES=names` and `env`.
fn activated(config: &Path, fd3: impl Into<OwnedFd>, names: &str, env: &[(&str, &str)]) -> Fulcrum {
    let mut command = async_command(&["sh", "-c", ACTIVATE]);
    command
        .stdin(fd3.into())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", names)
        .envs(env.iter().copied());
    Fulcrum::spawn(command, config)
}

/// A copy of the passed socket for one process (the test keeps its own open, as systemd does).
fn passed(socket: &std::net::TcpListener) -> OwnedFd {
    socket.try_clone().expect("dup the passed socket").into()
}

/// One echo round trip through `addr`; any failure (refused, reset, no answer) as its text.
async fn echoes(addr: SocketAddr, message: &[u8]) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(message)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = vec![0; message.len()];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if reply == message {
            Ok(())
        } else {
            Err(format!("echoed {reply:?}"))
        }
    };
    tokio::time::timeout(common::DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| Err("no echo within the deadline".to_string()))
}

async fn stop(fulcrum: Fulcrum) {
    fulcrum.signal("TERM");
    let (status, rest) = fulcrum.exit().await;
    assert!(status.success(), "fulcrum exited with {status}: {rest:#?}");
}

#[tokio::test]
async fn connections_through_the_passed_socket_are_served_before_and_after_a_reload_though_the_config_binds_elsewhere(
) {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("activation");
    let (socket, addr) = systemd_socket();
    let elsewhere = refused_addr();
    let config = config(&dir, elsewhere, echo.addr);
    let mut fulcrum = activated(&config, passed(&socket), "main", &[]);

    assert_eq!(
        fulcrum.listening("main").await,
        addr,
        "the listener did not take the passed socket"
    );
    let mut stream = connect(addr).await;
    assert_eq!(round_trip(&mut stream, b"through fd 3").await, b"through fd 3");
    drop(stream);

    fulcrum.signal("HUP");
    fulcrum
        .wait_for_line("the reload", |l| {
            l.contains("configuration reloaded").then_some(())
        })
        .await;
    assert_eq!(
        echoes(addr, b"after the reload").await,
        Ok(()),
        "the reload dropped the passed socket"
    );
    assert_eq!(echo.accepted(), 2);
    stop(fulcrum).await;
}

#[tokio::test]
async fn a_restart_on_the_passed_socket_refuses_and_resets_no_connection() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("activation-restart");
    let (socket, addr) = systemd_socket();
    let config = config(&dir, refused_addr(), echo.addr);
    let mut first = activated(&config, passed(&socket), "main", &[]);
    assert_eq!(first.listening("main").await, addr);

    // Clients one after another, through the stop of the first process and the start of the
    // second; each must be served.
    let served = Arc::new(AtomicUsize::new(0));
    let clients = tokio::spawn({
        let served = Arc::clone(&served);
        async move {
            let mut failures = Vec::new();
            for i in 0..RESTART_CONNECTIONS {
                match echoes(addr, format!("connection {i}").as_bytes()).await {
                    Ok(()) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("connection {i}: {e}")),
                }
            }
            failures
        }
    });
    wait_until("the first process serves the clients", || {
        served.load(Ordering::Relaxed) >= BEFORE_RESTART
    })
    .await;

    stop(first).await;
    // No fulcrum runs now: these complete in the kernel and wait in the passed socket's queue.
    let mut waiting = Vec::new();
    for i in 0..DURING_GAP {
        let mut stream = connect(addr).await;
        within("write", stream.write_all(format!("queued {i}").as_bytes()))
            .await
            .expect("a connection made while no process runs is accepted by the kernel");
        waiting.push(stream);
    }

    let mut second = activated(&config, passed(&socket), "main", &[]);
    assert_eq!(second.listening("main").await, addr);
    for (i, mut stream) in waiting.into_iter().enumerate() {
        let mut reply = vec![0; format!("queued {i}").len()];
        within("the queued connection's echo", stream.read_exact(&mut reply))
            .await
            .expect("a connection queued during the restart is served by the new process");
        assert_eq!(reply, format!("queued {i}").as_bytes());
    }
    let failures = within("the client loop", clients).await.expect("client loop");
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "connections refused or reset across the restart"
    );
    assert_eq!(served.load(Ordering::Relaxed), RESTART_CONNECTIONS);
    stop(second).await;
}

#[tokio::test]
async fn socket_activation_variables_for_another_process_are_ignored_and_fulcrum_binds_its_own() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("activation-other-pid");
    let (socket, passed_addr) = systemd_socket();
    let config = config(&dir, "127.0.0.1:0".parse().unwrap(), echo.addr);
    // pid 1 is never fulcrum: the variables were meant for a process that passed them on.
    let mut fulcrum = activated(&config, passed(&socket), "main", &[("LISTEN_PID", "1")]);

    fulcrum
        .wait_for_line("the variables ignored", |l| {
            l.contains("socket activation variables ignored").then_some(())
        })
        .await;
    let addr = fulcrum.listening("main").await;
    assert_ne!(
        addr, passed_addr,
        "fulcrum took a socket meant for another process"
    );
    assert_eq!(echoes(addr, b"bound by fulcrum").await, Ok(()));
    stop(fulcrum).await;
}

#[tokio::test]
async fn inherited_descriptors_that_are_not_listening_tcp_sockets_stop_the_start_with_a_clear_error() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("activation-not-listening");
    let config = config(&dir, "127.0.0.1:0".parse().unwrap(), echo.addr);
    // What `Accept=yes` passes: one connection, not a listening socket.
    let (peer, _) = systemd_socket();
    let connected = std::net::TcpStream::connect(peer.local_addr().unwrap()).unwrap();
    let file = std::fs::File::open(&config).unwrap();
    let cases: [(OwnedFd, &str); 2] = [
        (
            connected.into(),
            "fd 3 (\"main\") is a TCP socket but not a listening one",
        ),
        (file.into(), "fd 3 (\"main\") is not a TCP socket"),
    ];
    for (fd3, message) in cases {
        let fulcrum = activated(&config, fd3, "main", &[]);
        let (status, stderr) = fulcrum.exit().await;
        assert!(!status.success(), "fulcrum started on {message:?}");
        assert!(
            stderr.iter().any(|l| l.contains(message)),
            "no {message:?} in {stderr:#?}"
        );
    }
    assert_eq!(echo.accepted(), 0);
}

#[tokio::test]
async fn a_passed_socket_no_listener_wants_is_closed_with_a_warning_and_the_listener_binds_its_own() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("activation-stray");
    let (socket, passed_addr) = systemd_socket();
    let bind = refused_addr();
    let config = config(&dir, bind, echo.addr);
    let mut fulcrum = activated(&config, passed(&socket), "stray", &[]);

    fulcrum
        .wait_for_line("the warning about the stray socket", |l| {
            (l.contains("no listener has the name or address") && l.contains(&passed_addr.to_string()))
                .then_some(())
        })
        .await;
    assert_eq!(fulcrum.listening("main").await, bind);
    assert_eq!(echoes(bind, b"bound by fulcrum").await, Ok(()));
    stop(fulcrum).await;
}

/// The datagrams fulcrum sends to `NOTIFY_SOCKET`, read in order.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        Notifications {
            socket: UnixDatagram::bind(path).expect("bind the notify socket"),
            seen: Vec::new(),
        }
    }

    /// The next datagram holding the line `line` (earlier ones are kept in `seen`).
    async fn until(&mut self, line: &str) -> String {
        let mut buffer = vec![0; 4096];
        within(&format!("{line} from fulcrum"), async {
            loop {
                let n = self
                    .socket
                    .recv(&mut buffer)
                    .await
                    .expect("receive a notification");
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                self.seen.push(message.clone());
                if message.lines().any(|l| l == line) {
                    return message;
                }
            }
        })
        .await
    }
}

#[tokio::test]
async fn systemd_hears_ready_reloading_ready_watchdog_pings_and_stopping() {
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("notify");
    let config = config(&dir, "127.0.0.1:0".parse().unwrap(), echo.addr);
    let notify_path = dir.path().join("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    let mut command = async_command(&[]);
    // 200 ms: a ping every 100 ms.
    command
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let mut fulcrum = Fulcrum::spawn(command, &config);
    let addr = fulcrum.listening("main").await;

    let ready = notifications.until("READY=1").await;
    assert!(ready.contains("STATUS=serving 1 listener(s)"), "{ready:?}");
    assert_eq!(echoes(addr, b"ready").await, Ok(()));
    notifications.until("WATCHDOG=1").await;

    fulcrum.signal("HUP");
    let reloading = notifications.until("RELOADING=1").await;
    let monotonic = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"));
    assert!(monotonic.parse::<u64>().is_ok(), "{reloading:?}");
    let reloaded = notifications.until("READY=1").await;
    assert!(reloaded.contains("STATUS=generation 2 reloaded"), "{reloaded:?}");

    fulcrum.signal("TERM");
    notifications.until("STOPPING=1").await;
    let (status, rest) = fulcrum.exit().await;
    assert!(status.success(), "fulcrum exited with {status}: {rest:#?}");
}
