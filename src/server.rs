//! The running balancer: binds listeners, accepts connections, and runs the shutdown sequence.
//!
//! [`Server`] turns a validated [`Config`] into live state (pools, counters) and sockets.
//! [`Server::run`] spawns one accept loop per listener; each accepted socket becomes a task of its
//! own (see [`crate::connection`]), tracked by one `TaskTracker`. On shutdown the accept loops stop
//! at once (new connections are refused), open connections get `drain_timeout` to finish, then
//! are cancelled. Health probe loops (see [`crate::health`]) run in the same tracker and stop with
//! the accept loops. This module owns sockets and tasks; it does not decide where a connection goes
//! (balancer) or move its bytes (proxy).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::authz::Authorization;
use crate::balancer::Pool;
use crate::config::{
    BackendAddr, Config, HealthCheckConfig, ListenerConfig, RateLimitConfig, UpstreamConfig,
};
use crate::health::BackendHealth;
use crate::metrics::{Counter, Rejections};
use crate::ratelimit::{RateLimitPolicy, RateLimiter};

/// Listen backlog for client-facing sockets.
const BACKLOG: i32 = 1024;
/// After the drain deadline, how long cancelled connections get to close their sockets.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("admin: cannot bind {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
    #[error("listener {0:?} has no socket: pass one for every configured listener")]
    MissingListener(String),
    #[error("listener {listener:?}: {source}")]
    Tls {
        listener: String,
        source: crate::tls::TlsError,
    },
    #[error("access log: cannot open {path}: {source}")]
    AccessLog { path: String, source: io::Error },
}

/// Live state shared by every task: listeners, upstreams and their counters.
#[derive(Debug)]
pub struct State {
    listeners: Vec<Arc<Listener>>,
    upstreams: Vec<Arc<Upstream>>,
    drain_timeout: Duration,
    /// Which configuration this is: 1 for the one started with; a reload bumps it.
    pub(crate) generation: u64,
    /// When this state was built: the origin of the uptime in `/status`.
    pub(crate) started: Instant,
    /// Set when shutdown starts: no new connections, open ones are draining.
    pub(crate) draining: AtomicBool,
    /// `[access_log]`, shared with every listener.
    pub(crate) access_log: Option<Arc<crate::accesslog::AccessLog>>,
}

/// A listener's routing, policies and counters.
pub struct Listener {
    pub name: String,
    /// The configured bind address.
    pub bind: SocketAddr,
    /// The addresses actually bound (port 0 resolved), set once the sockets are known.
    pub(crate) bound: OnceLock<Vec<SocketAddr>>,
    /// Where connections go unless SNI picks another upstream.
    pub upstream: Arc<Upstream>,
    /// TLS termination; `None` for plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether clients must present a certificate (and are then authorized by identity).
    pub mutual_tls: bool,
    /// Lowercase server name -> upstream.
    pub sni: Vec<(String, Arc<Upstream>)>,
    pub handshake_timeout: Duration,
    pub authorization: Arc<Authorization>,
    pub limiter: Option<RateLimiter>,
    pub reject_response: Option<Vec<u8>>,
    pub accepted: Counter,
    pub rejected: Rejections,
    /// Keeps a flood of rejections from flooding the log.
    pub(crate) reject_log: crate::connection::LogThrottle,
    /// Where each closed connection's line goes, if `[access_log]` is configured.
    pub(crate) access_log: Option<Arc<crate::accesslog::AccessLog>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("upstream", &self.upstream.name)
            .field("tls", &self.tls.is_some())
            .field("mutual_tls", &self.mutual_tls)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// The addresses this listener accepts on: the bound ones once known, else the configured one.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.bound.get().cloned().unwrap_or_else(|| vec![self.bind])
    }

    /// The upstream for a TLS server name: an SNI entry, else the listener's own upstream.
    pub fn route(&self, server_name: Option<&str>) -> &Arc<Upstream> {
        server_name
            .and_then(|name| {
                self.sni
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, u)| u)
            })
            .unwrap_or(&self.upstream)
    }
}

/// An upstream group: its backends, their pool and dial settings.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub backends: Vec<Backend>,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub connect_attempts: usize,
    /// Probe settings, thresholds, `on_down` and slow start (see [`crate::health`]).
    pub health_check: HealthCheckConfig,
}

/// One backend's address, counters and health. Its active count lives in the pool.
#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// The configured `host:port` text: the `backend` label in metrics and logs.
    pub label: String,
    pub connections: Counter,
    pub connect_failures: Counter,
    /// Rise/fall state, the down signal and transition counters.
    pub health: BackendHealth,
}

impl Backend {
    /// Whether the backend is in rotation as far as health checking goes.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }
}

impl Upstream {
    pub(crate) fn new(config: &UpstreamConfig) -> Upstream {
        Upstream {
            name: config.name.clone(),
            backends: config
                .backends
                .iter()
                .map(|addr| Backend {
                    addr: addr.clone(),
                    label: addr.to_string(),
                    connections: Counter::default(),
                    connect_failures: Counter::default(),
                    health: BackendHealth::new(&config.health_check),
                })
                .collect(),
            pool: Pool::new(config.backends.len()),
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            health_check: config.health_check.clone(),
        }
    }
}

/// Checks everything `run` would load (config and certificate files) without binding anything.
/// `fulcrum check` calls this; `Server::bind` builds the same state.
pub fn validate(config: &Config) -> Result<(), ServerError> {
    State::build(config).map(drop)
}

impl State {
    fn build(config: &Config) -> Result<State, ServerError> {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Upstream::new(u)))
            .collect();
        let authorization = Arc::new(Authorization::new(config.authorization.iter().cloned()));
        let epoch = std::time::Instant::now();
        let global_limiter = config
            .rate_limit
            .as_ref()
            .map(|r| RateLimiter::new(policy(r, None), epoch));
        let access_log = config.access_log.as_ref().map(|target| {
            Arc::new(crate::accesslog::AccessLog::new(
                target.clone(),
                crate::accesslog::CHANNEL_CAPACITY,
            ))
        });
        let find = |name: &str| upstreams.iter().find(|u| u.name == name).map(Arc::clone);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            // Config validation guarantees every named upstream exists; a listener naming none is skipped.
            let Some(upstream) = find(&l.upstream) else {
                continue;
            };
            let tls = match &l.tls {
                Some(t) => Some(crate::tls::server_config(t).map_err(|source| ServerError::Tls {
                    listener: l.name.clone(),
                    source,
                })?),
                None => None,
            };
            let mutual_tls = l.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            listeners.push(Arc::new(Listener {
                name: l.name.clone(),
                bind: l.bind,
                bound: OnceLock::new(),
                upstream,
                tls: tls.map(tokio_rustls::TlsAcceptor::from),
                mutual_tls,
                sni: l
                    .sni
                    .iter()
                    .filter_map(|(n, u)| Some((n.clone(), find(u)?)))
                    .collect(),
                handshake_timeout: l.handshake_timeout,
                authorization: Arc::clone(&authorization),
                limiter: listener_limiter(l, config.rate_limit.as_ref(), global_limiter.as_ref(), epoch),
                reject_response: l.reject_response.clone(),
                accepted: Counter::default(),
                rejected: Rejections::default(),
                reject_log: Default::default(),
                access_log: access_log.clone(),
            }));
        }
        Ok(State {
            listeners,
            upstreams,
            drain_timeout: config.drain_timeout,
            generation: 1,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            access_log,
        })
    }

    /// Which configuration this is: 1 for the one the server started with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether shutdown has started (open connections are draining).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Access log lines dropped because the writer fell behind (0 without an access log).
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.as_ref().map_or(0, |log| log.dropped.get())
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.listeners.iter()
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.iter()
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.iter().find(|l| l.name == name)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Active connections per backend of an upstream, as `(label, count)`.
    pub fn active_connections(&self, upstream: &str) -> Vec<(String, u32)> {
        self.upstream(upstream)
            .map(|u| {
                u.backends
                    .iter()
                    .map(|b| b.label.clone())
                    .zip(u.pool.active_all())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sum of active connections over all upstreams.
    pub fn total_active(&self) -> u64 {
        self.upstreams
            .iter()
            .flat_map(|u| u.pool.active_all())
            .map(u64::from)
            .sum()
    }
}

/// The limiter a listener uses: its own when it overrides capacity/window, else the shared one.
fn listener_limiter(
    listener: &ListenerConfig,
    global: Option<&RateLimitConfig>,
    shared: Option<&RateLimiter>,
    epoch: std::time::Instant,
) -> Option<RateLimiter> {
    match &listener.rate_limit {
        Some(o) => {
            let base = global.cloned().unwrap_or(RateLimitConfig {
                capacity: 0,
                window: Duration::from_secs(1),
                max_concurrent: None,
                max_clients: crate::config::DEFAULT_MAX_CLIENTS,
                clients: Default::default(),
            });
            Some(RateLimiter::new(policy(&base, Some(o)), epoch))
        }
        None => shared.cloned(),
    }
}

fn policy(r: &RateLimitConfig, o: Option<&crate::config::RateLimitOverride>) -> RateLimitPolicy {
    RateLimitPolicy {
        capacity: o.and_then(|o| o.capacity).unwrap_or(r.capacity),
        window: o.and_then(|o| o.window).unwrap_or(r.window),
        max_concurrent: r.max_concurrent,
        max_clients: r.max_clients,
        overrides: r.clients.clone(),
    }
}

/// A configured balancer with its sockets bound, ready to [`run`](Server::run).
pub struct Server {
    state: Arc<State>,
    listeners: Vec<(Arc<Listener>, TcpListener)>,
    admin: Option<TcpListener>,
}

impl Server {
    /// Binds every listener and the admin socket named in the config.
    /// With several workers, each listener gets one SO_REUSEPORT socket per worker, so the kernel
    /// spreads new connections over as many accept loops.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let workers = config.workers();
        let mut sockets = Vec::with_capacity(config.listeners.len() * workers);
        for l in &config.listeners {
            let error = |source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            };
            let first = bind_listener(l.bind, workers > 1).map_err(error)?;
            // Port 0 picks a port for the first socket; its siblings must share it.
            let addr = first.local_addr().map_err(error)?;
            sockets.push((l.name.clone(), first));
            for _ in 1..workers {
                sockets.push((l.name.clone(), bind_listener(addr, true).map_err(error)?));
            }
        }
        let admin = match &config.admin {
            Some(a) => Some(
                TcpListener::bind(a.bind)
                    .await
                    .map_err(|source| ServerError::AdminBind { addr: a.bind, source })?,
            ),
            None => None,
        };
        Server::from_listeners(config, sockets, admin)
    }

    /// Uses sockets the caller bound itself, at least one per configured listener (by name; more
    /// than one, e.g. SO_REUSEPORT siblings, each get an accept loop); the listeners' `bind`
    /// addresses are then ignored. `admin` serves `/metrics` if given.
    pub fn from_listeners(
        config: Config,
        mut sockets: Vec<(String, TcpListener)>,
        admin: Option<TcpListener>,
    ) -> Result<Server, ServerError> {
        let state = Arc::new(State::build(&config)?);
        for l in &state.listeners {
            if l.tls.is_none() || !l.mutual_tls {
                info!(listener = %l.name, "listener accepts clients without certificates: no identity authorization applies");
            } else if config.authorization.is_empty() {
                warn!(listener = %l.name, "mTLS listener but [authorization] is empty: every client will be refused");
            }
        }
        let mut listeners = Vec::with_capacity(state.listeners.len());
        for l in &state.listeners {
            let before = listeners.len();
            while let Some(pos) = sockets.iter().position(|(name, _)| *name == l.name) {
                let (_, socket) = sockets.swap_remove(pos);
                listeners.push((Arc::clone(l), socket));
            }
            if listeners.len() == before {
                return Err(ServerError::MissingListener(l.name.clone()));
            }
            let mut bound: Vec<SocketAddr> = listeners[before..]
                .iter()
                .filter_map(|(_, s)| s.local_addr().ok())
                .collect();
            bound.sort_unstable();
            bound.dedup();
            let _ = l.bound.set(bound);
        }
        if let Some(addr) = admin.as_ref().and_then(|s| s.local_addr().ok()) {
            if !addr.ip().to_canonical().is_loopback() {
                warn!(%addr, "admin listener is not on a loopback address: /status and /metrics are open to the network");
            }
        }
        if let Some(log) = &state.access_log {
            log.open().map_err(|source| ServerError::AccessLog {
                path: match &config.access_log {
                    Some(crate::config::AccessLogConfig::File(path)) => path.display().to_string(),
                    _ => "stdout".to_string(),
                },
                source,
            })?;
        }
        Ok(Server {
            state,
            listeners,
            admin,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(l, _)| l.name == listener)
            .and_then(|(_, s)| s.local_addr().ok())
    }

    /// The admin listener's address, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Live counters, for metrics and tests.
    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` is cancelled, then drains: stops accepting at once, waits up to
    /// `drain_timeout` for open connections, cancels the rest and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        for (listener, socket) in self.listeners {
            if let Ok(addr) = socket.local_addr() {
                info!(listener = %listener.name, %addr, upstream = %listener.upstream.name, "listening");
            }
            tracker.spawn(accept_loop(
                socket,
                listener,
                tracker.clone(),
                shutdown.clone(),
                abort.clone(),
            ));
        }
        for upstream in self.state.upstreams() {
            crate::health::spawn(upstream, &tracker, &shutdown);
        }
        let log_stop = CancellationToken::new();
        let log_writer = self
            .state
            .access_log
            .as_ref()
            .and_then(|log| log.start(log_stop.clone()));
        let admin_stop = CancellationToken::new();
        let admin_task = self.admin.map(|socket| {
            if let Ok(addr) = socket.local_addr() {
                info!(%addr, "admin listening");
            }
            tokio::spawn(crate::admin::serve(
                socket,
                Arc::clone(&self.state),
                admin_stop.clone(),
            ))
        });

        shutdown.cancelled().await;
        self.state.draining.store(true, Ordering::Release);
        tracker.close();
        let drain = self.state.drain_timeout;
        info!(
            active = self.state.total_active(),
            deadline = ?drain,
            "shutting down: no new connections, draining open ones"
        );
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            warn!(
                remaining = self.state.total_active(),
                "drain deadline passed; closing remaining connections"
            );
            abort.cancel();
            if tokio::time::timeout(CANCEL_GRACE, tracker.wait()).await.is_err() {
                error!("connections did not close after cancellation");
            }
        }
        // Every connection task has ended: their lines are queued. Flush them before returning.
        log_stop.cancel();
        if let Some(writer) = log_writer {
            if tokio::time::timeout(CANCEL_GRACE, writer).await.is_err() {
                error!("access log writer did not finish flushing");
            }
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        info!("stopped");
    }
}

fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `shutdown`, spawning one tracked task per connection. Resource exhaustion
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off exponentially instead of spinning.
async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_BACKOFF;
                listener.accepted.inc();
                tracker.spawn(crate::connection::handle(
                    stream,
                    peer,
                    Arc::clone(&listener),
                    abort.clone(),
                ));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                warn!(listener = %listener.name, error = %e, ?backoff, "accept failed: out of resources, backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => debug!(listener = %listener.name, error = %e, "accept failed"),
        }
    }
    debug!(listener = %listener.name, "accept loop stopped");
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Dials `addr` under `timeout`, with TCP_NODELAY set on success.
pub(crate) async fn dial(addr: &BackendAddr, timeout: Duration) -> io::Result<TcpStream> {
    let connect = async {
        match addr {
            BackendAddr::Ip(ip) => TcpStream::connect(ip).await,
            BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
