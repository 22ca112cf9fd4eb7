//! The listening sockets: binding them (SO_REUSEPORT siblings, one per worker), the accept loops
//! with their back-off, and serving the backlog a closing socket still holds. It accepts and
//! hands each connection to `connection`; it must not decide anything about a connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::caps::is_resource_exhaustion;
use crate::state::{Listener, Live, ServerError, State};

/// Listen backlog for client-facing sockets.
pub(super) const BACKLOG: i32 = 1024;

/// Whether a running listener was configured with `bind` (port 0 means "any port": kept).
pub(super) fn configured_same(old: &Listener, bind: SocketAddr) -> bool {
    old.bind == bind || (bind.port() == 0 && old.bind.ip() == bind.ip())
}

/// Binds `workers` sockets for one listener (SO_REUSEPORT siblings when more than one).
pub(super) fn bind_all(
    name: &str,
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<(String, TcpListener)>, ServerError> {
    let error = |source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    // SO_REUSEPORT always, even with one worker: a second fulcrum process (an upgrade, or a
    // second instance on the same host) can then bind the same address and share its traffic.
    let first = bind_listener(addr).map_err(error)?;
    // Port 0 picks a port for the first socket; its siblings must share it.
    let bound = first.local_addr().map_err(error)?;
    let mut sockets = vec![(name.to_string(), first)];
    for _ in 1..workers {
        sockets.push((name.to_string(), bind_listener(bound).map_err(error)?));
    }
    Ok(sockets)
}

pub(super) fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop`, spawning one tracked task per connection, each on the generation
/// current when it was accepted. Resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off
/// exponentially instead of spinning.
pub(super) async fn accept_loop(
    socket: TcpListener,
    name: String,
    live: Arc<Live>,
    tracker: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_BACKOFF;
                let state = live.state();
                let Some(listener) = state.listener(&name) else {
                    break; // removed by a reload; its loop is being stopped
                };
                serve(stream, peer, listener, &state, &live, &tracker, &abort);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                warn!(listener = %name, error = %e, ?backoff, "accept failed: out of resources, backing off");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => debug!(listener = %name, error = %e, "accept failed"),
        }
    }
    take_backlog(socket, &name, &live, &tracker, &abort);
    debug!(listener = %name, "accept loop stopped");
}

/// Counts an accepted connection and spawns its task, or, over a `max_connections` cap, refuses
/// it at once (no task, no handshake).
fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: &Arc<Listener>,
    state: &State,
    live: &Arc<Live>,
    tracker: &TaskTracker,
    abort: &CancellationToken,
) {
    listener.accepted.inc();
    if let Some(places) = crate::connection::take_places(live, state, listener, peer) {
        tracker.spawn(crate::connection::handle(
            stream,
            peer,
            Arc::clone(listener),
            Arc::clone(live),
            places,
            abort.clone(),
        ));
    }
}

/// Serves the connections the kernel already completed on `socket`, which closing it would
/// reset. With SO_REUSEPORT another process may be serving the same port (an upgrade); closing
/// right after this leaves only connections completed in between to the kernel (moved to a
/// sibling socket with `net.ipv4.tcp_migrate_req = 1`, reset without it).
fn take_backlog(
    socket: TcpListener,
    name: &str,
    live: &Arc<Live>,
    tracker: &TaskTracker,
    abort: &CancellationToken,
) {
    let state = live.state();
    let Some(listener) = state.listener(name) else {
        return; // removed by a reload: nothing left to serve its clients with
    };
    let Ok(socket) = socket.into_std() else {
        return;
    };
    // The queue holds at most BACKLOG connections; the bound keeps this finite regardless.
    for _ in 0..BACKLOG {
        let accepted = socket.accept().and_then(|(stream, peer)| {
            stream.set_nonblocking(true)?;
            Ok((TcpStream::from_std(stream)?, peer))
        });
        match accepted {
            Ok((stream, peer)) => serve(stream, peer, listener, &state, live, tracker, abort),
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(_) => break, // empty (WouldBlock) or out of resources: close now
        }
    }
}
