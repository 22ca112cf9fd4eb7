//! The listening sockets: binding them (SO_REUSEPORT siblings, one per worker) or taking the ones
//! systemd passed (socket activation), the options they hand down to accepted connections, the
//! accept loops with their back-off, and serving the backlog a closing socket still holds. It
//! accepts and hands each connection to `connection`; it must not decide anything about a
//! connection.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::caps::is_resource_exhaustion;
use crate::config::{Keepalive, ListenerConfig};
use crate::state::{Listener, Live, ServerError, State};
use crate::systemd::Inherited;

/// Listen backlog for client-facing sockets.
pub(super) const BACKLOG: i32 = 1024;

/// Whether a running listener was configured with `bind` (port 0 means "any port": kept).
pub(super) fn configured_same(old: &Listener, bind: SocketAddr) -> bool {
    same_address(bind, old.bind)
}

/// Whether a socket at `addr` answers for a configured `bind` (port 0 means "any port").
fn same_address(bind: SocketAddr, addr: SocketAddr) -> bool {
    addr == bind || (bind.port() == 0 && addr.ip() == bind.ip())
}

/// The listeners' sockets at start.
#[derive(Default)]
pub(super) struct Opened {
    pub(super) sockets: Vec<(String, TcpListener)>,
    /// The listeners serving a socket systemd passed, with the `bind` they were configured with:
    /// a reload that keeps that `bind` keeps the socket.
    pub(super) inherited: Vec<(String, SocketAddr)>,
}

/// Opens every listener: with the socket systemd passed for it if there is one (see [`pair`]:
/// one socket, so one accept loop, whatever the workers), else bound here as [`bind_all`] does,
/// with a warning when systemd passed others. A passed socket no listener takes is closed with a
/// warning.
pub(super) fn open(
    listeners: &[ListenerConfig],
    workers: usize,
    passed: Vec<Inherited>,
) -> Result<Opened, ServerError> {
    let wanted: Vec<(&str, SocketAddr)> = listeners.iter().map(|l| (l.name.as_str(), l.bind)).collect();
    let offered: Vec<(Option<&str>, SocketAddr)> =
        passed.iter().map(|p| (p.name.as_deref(), p.addr)).collect();
    let pairs = pair(&wanted, &offered);
    let any_passed = !passed.is_empty();
    let mut passed: Vec<Option<Inherited>> = passed.into_iter().map(Some).collect();
    let mut opened = Opened::default();
    for (l, pick) in listeners.iter().zip(pairs) {
        let Some(inherited) = pick.and_then(|i| passed.get_mut(i)).and_then(Option::take) else {
            if any_passed {
                warn!(listener = %l.name, bind = %l.bind, "systemd passed no socket for this listener: binding it here (a restart refuses its connections; add it to the .socket unit)");
            }
            opened.sockets.extend(bind_all(l, l.bind, workers)?);
            continue;
        };
        let Inherited { fd, addr, socket, .. } = inherited;
        info!(listener = %l.name, fd, %addr, "serving the socket systemd passed");
        let socket = socket
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(socket))
            .map_err(|source| ServerError::Bind {
                name: l.name.clone(),
                addr,
                source,
            })?;
        opened.sockets.push((l.name.clone(), socket));
        opened.inherited.push((l.name.clone(), l.bind));
    }
    for Inherited { fd, name, addr, .. } in passed.into_iter().flatten() {
        warn!(fd, ?name, %addr, "systemd passed a socket no listener has the name or address of: closing it (systemd keeps it open, unserved)");
    }
    Ok(opened)
}

/// Which passed socket (an index into `passed`, each with its `FileDescriptorName=` if systemd
/// gave names, and its address) each listener (name, `bind`) takes: the one named after it, else
/// one at its `bind` whose name is no listener's (systemd names a socket after its unit when
/// `FileDescriptorName=` is not set). Each socket goes to one listener at most.
fn pair(listeners: &[(&str, SocketAddr)], passed: &[(Option<&str>, SocketAddr)]) -> Vec<Option<usize>> {
    let named_for_a_listener =
        |name: Option<&str>| name.is_some_and(|n| listeners.iter().any(|(l, _)| *l == n));
    let mut taken = vec![false; passed.len()];
    let mut pairs = Vec::with_capacity(listeners.len());
    for &(listener, bind) in listeners {
        let free = |i: &usize| !taken.get(*i).copied().unwrap_or(true);
        let found = passed
            .iter()
            .position(|(name, _)| *name == Some(listener))
            .filter(free)
            .or_else(|| {
                (0..passed.len()).find(|i| {
                    free(i)
                        && passed.get(*i).is_some_and(|&(name, addr)| {
                            !named_for_a_listener(name) && same_address(bind, addr)
                        })
                })
            });
        if let Some(slot) = found.and_then(|i| taken.get_mut(i)) {
            *slot = true;
        }
        pairs.push(found);
    }
    pairs
}

/// Binds `workers` sockets at `addr` for listener `l` (SO_REUSEPORT siblings when more than
/// one), each carrying the options its connections need from before it listens.
pub(super) fn bind_all(
    l: &ListenerConfig,
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<(String, TcpListener)>, ServerError> {
    let name = &l.name;
    let error = |source| ServerError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let bind_listener = |addr| bind_listener(addr, l.tcp_keepalive.as_ref());
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

/// Binds and listens at `addr` (SO_REUSEPORT), with [`client_options`] for `keepalive` set
/// first so that every connection it completes has them.
pub(super) fn bind_listener(addr: SocketAddr, keepalive: Option<&Keepalive>) -> io::Result<TcpListener> {
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
    client_options(socket2::SockRef::from(&socket), keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Sets on `socket` the options a client connection carries: TCP_NODELAY, and TCP keepalive as
/// the listener says (its timers and `TCP_USER_TIMEOUT`, or off). Set on a listening socket they
/// are handed down: Linux copies them to each connection it completes there, which then needs no
/// call of its own (six fewer system calls per connection).
fn client_options(socket: socket2::SockRef<'_>, keepalive: Option<&Keepalive>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    match keepalive {
        Some(settings) => crate::net::keepalive(socket, settings),
        None => {
            socket.set_keepalive(false)?;
            socket.set_tcp_user_timeout(None)
        }
    }
}

/// Whether `socket` has the options [`client_options`] sets for `keepalive`.
fn carries(socket: socket2::SockRef<'_>, keepalive: Option<&Keepalive>) -> io::Result<bool> {
    let timers = match keepalive {
        None => !socket.keepalive()? && socket.tcp_user_timeout()?.is_none(),
        Some(settings) => {
            socket.keepalive()?
                && socket.tcp_keepalive_time()? == settings.idle
                && socket.tcp_keepalive_interval()? == settings.interval
                && socket.tcp_keepalive_retries()? == settings.count
                && socket.tcp_user_timeout()? == Some(settings.user_timeout())
        }
    };
    Ok(timers && socket.tcp_nodelay()?)
}

/// What a listening socket hands down to the connections it completes, and how many of the
/// next accepted ones must be given their options anyway.
#[derive(Default)]
struct HandedDown {
    /// The keepalive the socket was last given ([`client_options`]); `None` before.
    carried: Option<Option<Keepalive>>,
    /// Accepted connections still to be given their options themselves.
    explicit: usize,
}

impl HandedDown {
    /// At most this many connections wait in an accept queue (Linux's default
    /// `net.core.somaxconn`, above [`BACKLOG`]; systemd's default `Backlog=`).
    const QUEUED: usize = 4096;

    /// Brings `socket` in line with the listener's `wanted` keepalive when they differ (at the
    /// start if it was not bound with them, and after a reload that changed `tcp_keepalive`),
    /// then gives `stream` its options if the kernel may have completed it before: the one in
    /// hand at the change and the next [`Self::QUEUED`] accepted, as many as the queue held.
    /// Elsewhere than on Linux every connection is given its options itself.
    fn apply(&mut self, socket: BorrowedFd<'_>, wanted: Option<Keepalive>, stream: Option<BorrowedFd<'_>>) {
        let bound_with = || carries(socket2::SockRef::from(&socket), wanted.as_ref()).unwrap_or(false);
        if self.carried.is_none() && bound_with() {
            // Bound with them (or given them by whoever passed it): so was every connection.
            self.carried = Some(wanted);
        }
        if self.carried != Some(wanted) {
            let set = client_options(socket2::SockRef::from(&socket), wanted.as_ref());
            self.carried = set.ok().map(|()| wanted);
            self.explicit = Self::QUEUED + usize::from(stream.is_some());
        }
        let explicit = self.explicit > 0 || self.carried.is_none() || !cfg!(target_os = "linux");
        if let Some(stream) = stream.filter(|_| explicit) {
            self.explicit = self.explicit.saturating_sub(1);
            let _ = client_options(socket2::SockRef::from(&stream), wanted.as_ref());
        }
    }
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
    let mut handed_down = HandedDown::default();
    if let Some(listener) = live.state().listener(&name) {
        handed_down.apply(socket.as_fd(), listener.tcp_keepalive, None);
    }
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
                handed_down.apply(socket.as_fd(), listener.tcp_keepalive, Some(stream.as_fd()));
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
    take_backlog(socket, handed_down, &name, &live, &tracker, &abort);
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
    mut handed_down: HandedDown,
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
            handed_down.apply(socket.as_fd(), listener.tcp_keepalive, Some(stream.as_fd()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// A connection to `socket` and fulcrum's side of it, accepted.
    async fn accepted(socket: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        (client, socket.accept().await.unwrap().0)
    }

    /// TCP_NODELAY, and the keepalive idle time if keepalive is on.
    fn options(socket: socket2::SockRef<'_>) -> (bool, Option<Duration>) {
        let on = socket.keepalive().unwrap();
        let idle = on.then(|| socket.tcp_keepalive_time().unwrap());
        (socket.tcp_nodelay().unwrap(), idle)
    }

    #[tokio::test]
    async fn a_listening_socket_hands_its_options_down_and_a_change_reaches_the_queued_connections() {
        let socket = bind_listener(addr("127.0.0.1:0"), None).unwrap();
        let short = Keepalive {
            idle: Duration::from_secs(20),
            ..Keepalive::default()
        };
        let mut handed_down = HandedDown::default();
        handed_down.apply(socket.as_fd(), Some(short), None);
        let (_client, first) = accepted(&socket).await;
        let idle = Some(Duration::from_secs(20));
        assert_eq!(options(socket2::SockRef::from(&first)), (true, idle), "inherited");
        assert_eq!(
            socket2::SockRef::from(&first).tcp_user_timeout().unwrap(),
            Some(short.user_timeout())
        );
        // Completed before a change: given the new options with the change, as is the one in hand.
        let (_queued_client, queued) = accepted(&socket).await;
        handed_down.apply(socket.as_fd(), None, Some(first.as_fd()));
        assert_eq!(options(socket2::SockRef::from(&socket)), (true, None));
        assert_eq!(options(socket2::SockRef::from(&first)), (true, None));
        assert_eq!(
            options(socket2::SockRef::from(&queued)),
            (true, idle),
            "before apply"
        );
        handed_down.apply(socket.as_fd(), None, Some(queued.as_fd()));
        assert_eq!(options(socket2::SockRef::from(&queued)), (true, None));
        // Past the queue's length, a connection has what the socket handed down.
        handed_down.explicit = 0;
        let (_later_client, later) = accepted(&socket).await;
        socket2::SockRef::from(&later).set_keepalive(true).unwrap();
        handed_down.apply(socket.as_fd(), None, Some(later.as_fd()));
        assert!(socket2::SockRef::from(&later).keepalive().unwrap(), "left alone");
    }

    #[test]
    fn a_passed_socket_goes_to_the_listener_it_is_named_after_whatever_its_address() {
        let listeners = [("web", addr("0.0.0.0:443")), ("api", addr("0.0.0.0:8443"))];
        let passed = [
            (Some("api"), addr("10.0.0.1:9000")),
            (Some("web"), addr("0.0.0.0:8443")),
        ];
        assert_eq!(pair(&listeners, &passed), vec![Some(1), Some(0)]);
    }

    #[test]
    fn without_a_matching_name_a_passed_socket_goes_to_the_listener_at_its_address() {
        let listeners = [("web", addr("0.0.0.0:443")), ("api", addr("127.0.0.1:0"))];
        let passed = [
            (None, addr("127.0.0.1:9000")),
            (Some("fulcrum.socket"), addr("0.0.0.0:443")),
        ];
        assert_eq!(pair(&listeners, &passed), vec![Some(1), Some(0)]);
    }

    #[test]
    fn a_socket_named_after_one_listener_is_not_taken_by_another_at_its_address() {
        let listeners = [("web", addr("0.0.0.0:443")), ("api", addr("0.0.0.0:8443"))];
        let passed = [(Some("api"), addr("0.0.0.0:443"))];
        assert_eq!(pair(&listeners, &passed), vec![None, Some(0)]);
    }

    #[test]
    fn a_passed_socket_no_listener_names_or_binds_is_left() {
        let listeners = [("web", addr("0.0.0.0:443"))];
        let passed = [
            (Some("old"), addr("0.0.0.0:80")),
            (Some("web"), addr("0.0.0.0:443")),
            (Some("web"), addr("0.0.0.0:444")),
        ];
        assert_eq!(pair(&listeners, &passed), vec![Some(1)]);
    }
}
