//! One client connection's life, from accept to the closing log line.
//!
//! Steps, in order, each able to end the connection before the next:
//! 1. TLS handshake (TLS listeners), under the listener's total handshake deadline;
//! 2. client identity from the verified certificate, and the upstream (SNI or the listener's);
//! 3. authorization of that identity for that upstream (mTLS listeners; default deny);
//! 4. the per-client rate limit (key: identity on mTLS listeners, source IP otherwise);
//! 5. pick a backend and dial it, trying the next least-loaded one on refusal or timeout; each
//!    dial's outcome feeds the backend's health (passive detection);
//! 6. relay bytes both ways, until both sides end, the drain deadline, or (with
//!    `on_down = "close"`) the backend being marked down; 7. one summary log line, and one
//!    access log entry (see [`crate::accesslog`]) for every connection, refused ones included.
//!
//! No backend is dialed before steps 1-4 pass. The backend lease and the rate-limit permit are
//! held for the whole connection, so counts are exact on every path. Failures end this connection
//! only and are logged once, here. This module owns the order of the steps; the steps themselves
//! live in tls, identity, authz, ratelimit, balancer and proxy.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, info_span, warn, Instrument, Span};

use crate::accesslog::Entry;
use crate::authz::Decision as Authz;
use crate::balancer::Lease;
use crate::config::OnDown;
use crate::health::{self, Failure, Source};
use crate::identity::identity_from_der;
use crate::metrics::Reason;
use crate::proxy::{relay, relay_tcp, Progress, RelayError, Side};
use crate::proxy_protocol::{parse, Header, Parse, SslInfo, MAX_HEADER};
use crate::ratelimit::{ClientKey, Decision as Limit, Permit};
use crate::reload::Registration;
use crate::server::{dial, Backend, Listener, Upstream};

/// Deadline for writing a refusal (reject response, TLS close_notify) to a client.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);

/// Serves one accepted client connection to completion. Never panics on peer input; every wait
/// on a peer is bounded by a deadline or by `abort` (the drain deadline).
pub(crate) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    abort: CancellationToken,
) {
    let span = info_span!(
        "conn",
        client.addr = %peer,
        listener = %listener.name,
        client.id = field::Empty,
        upstream = field::Empty,
        backend.addr = field::Empty,
    );
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let mut entry = Entry::new(&listener.name, peer);
    serve(client, peer, &listener, &abort, started, &mut entry)
        .instrument(span)
        .await;
    if let Some(log) = &listener.access_log {
        entry.duration = started.elapsed();
        log.send(entry);
    }
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: &Arc<Listener>,
    abort: &CancellationToken,
    started: Instant,
    entry: &mut Entry,
) {
    let local = client.local_addr().unwrap_or(peer);
    let peer = if listener.accept_proxy_protocol {
        let header = tokio::select! {
            _ = abort.cancelled() => return,
            header = Box::pin(read_proxy_header(&mut client, listener.handshake_timeout)) => header,
        };
        match header {
            // LOCAL or an unsupported family: the front's own connection, keep its address.
            Ok(header) => header.source.unwrap_or(peer),
            Err(e) => return refused(listener, entry, Reason::ProxyHeader, &e),
        }
    } else {
        peer
    };
    if listener.accept_proxy_protocol {
        Span::current().record("client.addr", field::display(peer));
        entry.client = peer;
    }
    let mut who = Who {
        key: ClientKey::from_ip(peer.ip()),
        addr: peer,
        local,
        registration: None,
        ssl: None,
        authority: None,
    };
    let Some(tls) = &listener.tls else {
        return forward(client, listener, &listener.upstream, who, abort, started, entry).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
    let handshake = tokio::select! {
        _ = abort.cancelled() => return,
        handshake = Box::pin(tokio::time::timeout(listener.handshake_timeout, acceptor.accept(client))) => handshake,
    };
    let mut client = match handshake {
        // Boxed: a TLS session is large, and the future of every connection would carry its size.
        Ok(Ok(stream)) => Box::new(stream),
        Ok(Err(e)) => return refused(listener, entry, Reason::TlsHandshake, &e),
        Err(_) => {
            return refused(
                listener,
                entry,
                Reason::TlsHandshake,
                &"handshake deadline passed",
            )
        }
    };
    let (_, session) = client.get_ref();
    let upstream = listener.route(session.server_name());
    entry.upstream = Some(upstream.name.clone());
    who.authority = session.server_name().map(str::to_string);
    who.ssl = Some(SslInfo {
        verified: listener.mutual_tls,
        client_cert: listener.mutual_tls,
        version: session.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
            other => format!("{other:?}"),
        }),
        cipher: session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite())),
        cn: None,
    });
    if listener.mutual_tls {
        let identity = match session.peer_certificates().and_then(|chain| chain.first()) {
            Some(leaf) => identity_from_der(leaf),
            // Unreachable with a client verifier configured; refuse rather than assume.
            None => return refused(listener, entry, Reason::TlsHandshake, &"no client certificate"),
        };
        let identity = match identity {
            Ok(identity) => identity,
            Err(e) => {
                refused(listener, entry, Reason::Unauthorized, &e);
                return close_tls(&mut client).await;
            }
        };
        Span::current().record("client.id", field::display(&identity));
        entry.identity = Some(identity.to_string());
        if listener.authorization.check(&identity, &upstream.name) == Authz::Deny {
            refused(
                listener,
                entry,
                Reason::Unauthorized,
                &format_args!("{identity} may not reach upstream {:?}", upstream.name),
            );
            return close_tls(&mut client).await;
        }
        // Tracked while open, so that a reload removing this access closes the connection.
        let chain = session.peer_certificates().unwrap_or_default();
        who.registration = Some(
            listener
                .registry
                .register(&listener.name, &upstream.name, &identity, chain),
        );
        if let Some(ssl) = &mut who.ssl {
            ssl.cn = Some(identity.to_string());
        }
        who.key = ClientKey::Identity(identity.into());
    }
    let upstream = Arc::clone(upstream);
    // Boxed: the TLS path is larger, and plain connections should not pay for its size.
    Box::pin(forward(client, listener, &upstream, who, abort, started, entry)).await
}

/// Who the client is, as far as the steps after the handshake need to know.
struct Who {
    /// Rate-limit key: the identity on mTLS listeners, else the source IP.
    key: ClientKey,
    /// The client's address (from the PROXY header when the listener accepts one).
    addr: SocketAddr,
    /// The address the client connected to.
    local: SocketAddr,
    /// Registration of an authorized mTLS connection, for revocation on reload.
    registration: Option<Registration>,
    /// The client's TLS session, for a PROXY v2 header to the backend.
    ssl: Option<SslInfo>,
    /// The server name the client asked for (SNI).
    authority: Option<String>,
}

/// Reads a PROXY protocol header from the start of `stream`, consuming exactly its bytes (it
/// peeks, so nothing after the header is ever taken), all within `deadline`.
pub(crate) async fn read_proxy_header(stream: &mut TcpStream, deadline: Duration) -> Result<Header, String> {
    let read = async {
        let mut buf = vec![0u8; MAX_HEADER];
        let mut seen = 0;
        loop {
            let n = stream.peek(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a complete PROXY header".to_string());
            }
            match parse(&buf[..n]) {
                Ok(Parse::Complete(header)) => {
                    stream
                        .read_exact(&mut buf[..header.len])
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(header);
                }
                Ok(Parse::Incomplete) if n >= MAX_HEADER => {
                    return Err(format!("PROXY header longer than {MAX_HEADER} bytes"));
                }
                Ok(Parse::Incomplete) => {
                    // Peeking again returns at once with the same bytes: wait a little for more.
                    if n == seen {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen = n;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| "no complete PROXY header before the deadline".to_string())?
}

/// Steps 4-7 for a client whose transport is ready.
async fn forward<C: Transport>(
    mut client: C,
    listener: &Listener,
    upstream: &Upstream,
    who: Who,
    abort: &CancellationToken,
    started: Instant,
    entry: &mut Entry,
) {
    let Who {
        key, registration, ..
    } = &who;
    Span::current().record("upstream", upstream.name.as_str());
    entry.upstream = Some(upstream.name.clone());
    let permit: Option<Permit> = match &listener.limiter {
        None => None,
        Some(limiter) => match limiter.check(key).await {
            Limit::Allow(permit) => Some(permit),
            Limit::Reject(why) => {
                refused(
                    listener,
                    entry,
                    Reason::RateLimited,
                    &format_args!("client {key}: {why}"),
                );
                if let Some(response) = &listener.reject_response {
                    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.write_all(response)).await;
                }
                let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
                return;
            }
        },
    };
    let connected = tokio::select! {
        _ = abort.cancelled() => return,
        connected = Box::pin(connect(upstream, &who)) => connected,
    };
    let (mut backend, lease, chosen) = match connected {
        Ok(connected) => connected,
        Err(reason) => {
            refused(
                listener,
                entry,
                reason,
                &format_args!("upstream {:?}", upstream.name),
            );
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
            return;
        }
    };
    chosen.connections.inc();
    Span::current().record("backend.addr", chosen.label.as_str());
    entry.backend = Some(chosen.label.clone());
    // Taken after the dial: if the backend went down meanwhile, the signal has already fired.
    let backend_down = match upstream.health_check.on_down {
        OnDown::Close => Some(chosen.health.down_signal()),
        OnDown::Keep => None,
    };
    let revoked = registration.as_ref().map(|r| r.revoked.clone());
    let abort_relay = abort.clone();
    let stop = async move {
        let down = async {
            match backend_down {
                Some(down) => down.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let revoked = async {
            match revoked {
                Some(revoked) => revoked.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = abort_relay.cancelled() => {}
            _ = down => {}
            _ = revoked => {}
        }
    };

    let mut progress = Progress::default();
    // Zero-copy between plain sockets, buffered through TLS.
    let result = match &mut backend {
        BackendStream::Plain(plain) => match client.as_plain() {
            Some(tcp) => relay_tcp(tcp, plain, &mut progress, stop).await,
            None => relay(&mut client, plain, &mut progress, stop).await,
        },
        BackendStream::Tls(tls) => relay(&mut client, tls.as_mut(), &mut progress, stop).await,
    };
    let end = match &result {
        Ok(()) => "closed",
        Err(RelayError::Cancelled) if abort.is_cancelled() => "drain_deadline",
        Err(RelayError::Cancelled) => {
            // The backend was marked down with `on_down = "close"`, or a reload removed the
            // client's access: reset both sides, so neither mistakes the cut for a clean end.
            let _ = socket2::SockRef::from(client.tcp()).set_linger(Some(Duration::ZERO));
            let _ = socket2::SockRef::from(backend.tcp()).set_linger(Some(Duration::ZERO));
            match registration {
                Some(r) if r.revoked.is_cancelled() => "access_revoked",
                _ => "backend_down",
            }
        }
        Err(RelayError::Io { side, source }) => {
            // Mirror an abort: the other side sees a reset too, never a clean end of stream.
            let other = match side {
                Side::Client => backend.tcp(),
                Side::Backend => client.tcp(),
            };
            let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
            describe(*side, source)
        }
    };
    info!(
        bytes_up = progress.client_to_backend,
        bytes_down = progress.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end,
        "connection closed"
    );
    entry.bytes_up = progress.client_to_backend;
    entry.bytes_down = progress.backend_to_client;
    entry.outcome = end;
    // The concurrency slot first: once the backend count reads zero, the client may reconnect.
    drop(permit);
    drop(lease);
}

/// Leases and dials backends until one answers, at most `connect_attempts` distinct ones. Each
/// dial's outcome feeds the backend's health (passive detection). With no backend in rotation
/// nothing is dialed: [`Reason::NoHealthyBackend`].
async fn connect(upstream: &Upstream, who: &Who) -> Result<(BackendStream, Lease, Arc<Backend>), Reason> {
    let mut tried: Vec<usize> = Vec::new();
    for _ in 0..upstream.connect_attempts {
        let Some(lease) = upstream.pool.pick_at(&tried, Instant::now()) else {
            break;
        };
        let Some(backend) = upstream.backend(lease.index()) else {
            // A backend a reload added after this connection's generation: not ours to use.
            tried.push(lease.index());
            continue;
        };
        match open_backend(upstream, backend, who).await {
            Ok(stream) => {
                health::record(upstream, lease.index(), Source::Traffic, Ok(()));
                return Ok((stream, lease, Arc::clone(backend)));
            }
            Err(failure) => {
                backend.connect_failures.inc();
                debug!(backend = %backend.label, error = %failure, "backend connect failed");
                tried.push(lease.index());
                if failure.is_local_exhaustion() {
                    // Out of descriptors or memory here: says nothing about the backend's health.
                    continue;
                }
                health::record(upstream, lease.index(), Source::Traffic, Err(failure));
            }
        }
    }
    Err(if tried.is_empty() {
        Reason::NoHealthyBackend
    } else {
        Reason::ConnectFailed
    })
}

/// Dials a backend, sends the PROXY header (before any client byte, and before TLS), and runs
/// the TLS handshake to it when the upstream asks for one: all within `connect_timeout`.
async fn open_backend(upstream: &Upstream, backend: &Backend, who: &Who) -> Result<BackendStream, Failure> {
    let timeout = upstream.connect_timeout;
    let open = async {
        let mut stream = dial(&backend.addr, timeout)
            .await
            .map_err(|e| Failure::from_connect(e, timeout))?;
        if let Some(version) = upstream.proxy_protocol {
            let header = crate::proxy_protocol::encode(
                version,
                who.addr,
                who.local,
                who.ssl.as_ref(),
                who.authority.as_deref(),
            );
            stream.write_all(&header).await.map_err(Failure::Io)?;
        }
        let Some((config, name)) = &upstream.tls else {
            return Ok(BackendStream::Plain(stream));
        };
        let name = match (name, &backend.addr) {
            (Some(name), _) => name.clone(),
            (None, crate::config::BackendAddr::Name { host, .. }) => host.clone(),
            (None, crate::config::BackendAddr::Ip(ip)) => ip.ip().to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| Failure::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, stream)
            .await
            .map_err(Failure::Io)?;
        Ok(BackendStream::Tls(Box::new(tls)))
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| Failure::TimedOut(timeout))?
}

/// The backend side of a connection: plain TCP, or TLS to the backend (`[upstream.tls]`).
enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Counts a refusal, notes it for the access log and logs it (throttled).
fn refused(listener: &Listener, entry: &mut Entry, reason: Reason, detail: &dyn std::fmt::Display) {
    listener.rejected.inc(reason);
    entry.refuse(reason);
    if let Some(suppressed) = listener.reject_log.admit() {
        warn!(
            reason = reason.label(),
            suppressed, "connection refused: {detail}"
        );
    }
}

async fn close_tls(client: &mut Box<TlsStream<TcpStream>>) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
}

fn describe(side: Side, e: &io::Error) -> &'static str {
    let reset = matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    );
    match (side, reset) {
        (Side::Client, true) => "client_reset",
        (Side::Client, false) => "client_error",
        (Side::Backend, true) => "backend_reset",
        (Side::Backend, false) => "backend_error",
    }
}

/// A client transport: plain TCP or TLS over TCP. Gives access to the socket underneath (to
/// reset it, or to splice from it when there is no TLS in between).
trait Transport: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;

    /// The socket itself when bytes can go to it directly (plain TCP).
    fn as_plain(&mut self) -> Option<&mut TcpStream>;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn as_plain(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
}

impl Transport for Box<TlsStream<TcpStream>> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn as_plain(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

/// Lets at most [`LogThrottle::PER_SECOND`] lines through per second; reports how many it held
/// back since the last line it let through.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    /// Second (since the throttle's first use) of the current budget, and lines used in it.
    state: std::sync::Mutex<(u64, u32)>,
    suppressed: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl LogThrottle {
    const PER_SECOND: u32 = 10;

    /// `Some(suppressed_since_last)` if this line may be logged.
    pub(crate) fn admit(&self) -> Option<u64> {
        let second = self.origin.get_or_init(Instant::now).elapsed().as_secs();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != second {
            *state = (second, 0);
        }
        if state.1 < Self::PER_SECOND {
            state.1 += 1;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every open connection is one task holding this future: its size is most of what an idle
    /// connection costs (issue: memory per idle connection on par with HAProxy's ~3.3 kB).
    #[tokio::test]
    async fn a_connection_task_stays_under_four_kibibytes() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = backend.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let toml = format!(
            "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['{addr}']\n"
        );
        let config = crate::Config::from_toml(&toml, "t").expect("config");
        let server = crate::Server::bind(config).await.expect("bind server");
        let listener = server.state().listener("a").cloned().expect("listener");
        let task = super::handle(client, addr, listener, tokio_util::sync::CancellationToken::new());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 4096, "a connection's future is {size} bytes");
    }
}
