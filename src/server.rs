//! The running balancer: binds listeners, accepts connections, reloads, and runs the shutdown
//! sequence.
//!
//! [`Server`] turns a validated [`Config`] into live state (pools, counters) and sockets.
//! [`Server::run`] spawns accept loops (one per socket; one socket per worker with
//! SO_REUSEPORT); each accepted socket becomes a task of its own (see [`crate::connection`]),
//! tracked by one `TaskTracker`. A reload ([`crate::reload::Handle`], SIGHUP, `POST /reload`)
//! builds the next generation of [`State`] with the same code as startup, binds what is new, swaps
//! it in atomically, and stops what is gone: connections already open keep the generation they
//! started with, backends that stay keep their pool slot (so their count) and health. On shutdown
//! the accept loops stop at once (new connections are refused; those the kernel already queued
//! on a socket are still served), open connections get `drain_timeout` to finish, then are
//! cancelled. This module owns sockets and tasks; it does not
//! decide where a connection goes (balancer) or move its bytes (proxy).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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
use crate::reload::{Handle, Live, Registry, ReloadCounters, ReloadError, Request};
use crate::sharedlimit::{Limiter, SharedRateLimiter};
use crate::tls::ServerTls;

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
    #[error("upstream {upstream:?}: {source}")]
    UpstreamTls {
        upstream: String,
        source: crate::tls::TlsError,
    },
    #[error("listener {listener:?}: {source}")]
    Tls {
        listener: String,
        source: crate::tls::TlsError,
    },
    #[error(transparent)]
    SharedRateLimit(#[from] crate::sharedlimit::RedisClientError),
    #[error("access log: cannot open {path}: {source}")]
    AccessLog { path: String, source: io::Error },
}

/// One generation of live state: listeners, upstreams and their counters. A reload builds the
/// next one; tasks holding this one keep it.
#[derive(Debug)]
pub struct State {
    /// 1 at startup, +1 per successful reload.
    pub generation: u64,
    listeners: Vec<Arc<Listener>>,
    upstreams: Vec<Arc<Upstream>>,
    drain_timeout: Duration,
    /// Open mTLS connections (shared by every generation).
    pub(crate) registry: Arc<Registry>,
    /// Reload outcomes (shared by every generation).
    pub reloads: Arc<ReloadCounters>,
    /// Failed round trips to the shared rate limit's Redis (shared by every generation).
    pub ratelimit_backend_errors: Arc<crate::metrics::Counter>,
    /// When the server started: the origin of the uptime in `/status` (kept across reloads).
    pub(crate) started: Instant,
    /// Set when shutdown starts: no new connections, open ones are draining.
    pub(crate) draining: AtomicBool,
    /// `[access_log]`, shared with every listener (opened at start; kept across reloads).
    pub(crate) access_log: Option<Arc<crate::accesslog::AccessLog>>,
}

/// A listener's routing, policies and counters.
pub struct Listener {
    pub name: String,
    /// Where connections go unless SNI picks another upstream.
    pub upstream: Arc<Upstream>,
    /// Bound address (the first socket's, with port 0 resolved once bound).
    pub bind: SocketAddr,
    /// TLS termination; `None` for plaintext.
    pub tls: Option<ServerTls>,
    /// Whether clients must present a certificate (and are then authorized by identity).
    pub mutual_tls: bool,
    /// Lowercase server name -> upstream.
    pub sni: Vec<(String, Arc<Upstream>)>,
    pub handshake_timeout: Duration,
    /// Expect a PROXY protocol header first (see [`crate::config::ListenerConfig`]).
    pub accept_proxy_protocol: bool,
    pub authorization: Arc<Authorization>,
    pub limiter: Option<Limiter>,
    pub reject_response: Option<Vec<u8>>,
    /// Counters carry over reloads for a listener that keeps its name.
    pub accepted: Arc<Counter>,
    pub rejected: Arc<Rejections>,
    pub(crate) registry: Arc<Registry>,
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
    /// The addresses this listener accepts on (SO_REUSEPORT siblings share one).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        vec![self.bind]
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
    /// In configured order. Kept backends are the same `Arc` across reloads.
    pub backends: Vec<Arc<Backend>>,
    /// Pool slot -> position in `backends` (`None`: a slot of another generation).
    slots: Vec<Option<usize>>,
    /// Shared by every generation of this upstream: a backend's count follows its slot.
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub connect_attempts: usize,
    /// Probe settings, thresholds, `on_down` and slow start (see [`crate::health`]).
    pub health_check: HealthCheckConfig,
    /// PROXY protocol header sent to backends before any client byte.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// TLS to the backends, and the name to verify (default: the backend's host).
    pub tls: Option<(Arc<rustls::ClientConfig>, Option<String>)>,
}

/// One backend's address, counters and health. Its active count lives in the pool, at `slot`.
#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// Index in the upstream's pool.
    pub slot: usize,
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
    /// Builds an upstream, taking over `previous` (the same upstream in the running generation):
    /// its pool, and the backends that stay, with their counters and health. Backends that go are
    /// retired from the pool; their open connections drain.
    pub(crate) fn new(
        config: &UpstreamConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let pool = previous.map_or_else(|| Pool::new(0), |p| Arc::clone(&p.pool));
        let mut backends = Vec::with_capacity(config.backends.len());
        for addr in &config.backends {
            let label = addr.to_string();
            let kept = previous.and_then(|p| p.backends.iter().find(|b| b.label == label));
            let backend = match kept {
                Some(kept) => {
                    kept.health.reconfigure(&config.health_check);
                    Arc::clone(kept)
                }
                None => Arc::new(Backend {
                    addr: addr.clone(),
                    slot: pool.add(),
                    label,
                    connections: Counter::default(),
                    connect_failures: Counter::default(),
                    health: BackendHealth::new(&config.health_check),
                }),
            };
            backends.push(backend);
        }
        for gone in previous.iter().flat_map(|p| &p.backends) {
            if !backends.iter().any(|b| Arc::ptr_eq(b, gone)) {
                pool.retire(gone.slot);
            }
        }
        let mut slots = vec![None; pool.len()];
        for (position, b) in backends.iter().enumerate() {
            if let Some(slot) = slots.get_mut(b.slot) {
                *slot = Some(position);
            }
        }
        Upstream {
            name: config.name.clone(),
            backends,
            slots,
            pool,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            health_check: config.health_check.clone(),
            proxy_protocol: config.proxy_protocol,
            tls: tls.map(|c| (c, config.tls.as_ref().and_then(|t| t.server_name.clone()))),
        }
    }

    /// The backend at a pool slot, if it belongs to this generation.
    pub fn backend(&self, slot: usize) -> Option<&Arc<Backend>> {
        self.backends.get((*self.slots.get(slot)?)?)
    }
}

/// Checks everything `run` would load (config and certificate files) without binding anything.
/// `fulcrum check` calls this; `Server::bind` and reloads build the same state.
pub fn validate(config: &Config) -> Result<(), ServerError> {
    let tls = load_tls(config)?;
    let addrs = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.bind))
        .collect();
    State::assemble(config, tls, addrs, None, 1);
    Ok(())
}

/// Every certificate file a generation needs, loaded, and the shared rate limit's redis client
/// built from its files: the part of building a generation that can fail.
struct Loaded {
    listeners: Vec<Option<ServerTls>>,
    upstreams: Vec<Option<Arc<rustls::ClientConfig>>>,
    redis: Option<redis::Client>,
}

fn load_tls(config: &Config) -> Result<Loaded, ServerError> {
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| match &u.tls {
            Some(t) => crate::tls::client_config(t)
                .map(Some)
                .map_err(|source| ServerError::UpstreamTls {
                    upstream: u.name.clone(),
                    source,
                }),
            None => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let listeners = config
        .listeners
        .iter()
        .map(|l| match &l.tls {
            Some(t) => crate::tls::server_config(t)
                .map(Some)
                .map_err(|source| ServerError::Tls {
                    listener: l.name.clone(),
                    source,
                }),
            None => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let redis = match config.rate_limit.as_ref().and_then(|r| r.shared.as_ref()) {
        Some(shared) => Some(crate::sharedlimit::client(shared)?),
        None => None,
    };
    Ok(Loaded {
        listeners,
        upstreams,
        redis,
    })
}

impl State {
    /// Builds a generation from a validated config and its loaded TLS settings, taking over what
    /// stays from `previous`. Infallible: everything that can fail happened before, so a failed
    /// reload never touches the running generation's pools.
    fn assemble(
        config: &Config,
        loaded: Loaded,
        addrs: Vec<(String, SocketAddr)>,
        previous: Option<&State>,
        generation: u64,
    ) -> State {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .zip(loaded.upstreams)
            .map(|(u, tls)| {
                let previous = previous.and_then(|p| p.upstream(&u.name)).map(|u| &**u);
                Arc::new(Upstream::new(u, tls, previous))
            })
            .collect();
        let authorization = Arc::new(Authorization::new(config.authorization.iter().cloned()));
        let registry = previous.map_or_else(Default::default, |p| Arc::clone(&p.registry));
        let reloads = previous.map_or_else(Default::default, |p| Arc::clone(&p.reloads));
        let epoch = std::time::Instant::now();
        let ratelimit_backend_errors =
            previous.map_or_else(Default::default, |p| Arc::clone(&p.ratelimit_backend_errors));
        let global_limiter = config
            .rate_limit
            .as_ref()
            .map(|r| match (&r.shared, loaded.redis) {
                (Some(shared), Some(client)) => Limiter::Shared(Arc::new(SharedRateLimiter::new(
                    policy(r, None),
                    shared,
                    client,
                    epoch,
                    Arc::clone(&ratelimit_backend_errors),
                ))),
                // `load_tls` builds a client exactly when there is `[rate_limit.shared]`.
                _ => Limiter::Local(RateLimiter::new(policy(r, None), epoch)),
            });
        // The access log is opened once, at start; a reload keeps it (changing it needs a restart).
        let access_log = match previous {
            Some(p) => p.access_log.clone(),
            None => config.access_log.as_ref().map(|target| {
                Arc::new(crate::accesslog::AccessLog::new(
                    target.clone(),
                    crate::accesslog::CHANNEL_CAPACITY,
                ))
            }),
        };
        let find = |name: &str| upstreams.iter().find(|u| u.name == name).map(Arc::clone);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (l, tls) in config.listeners.iter().zip(loaded.listeners) {
            // Config validation guarantees every named upstream exists; a listener naming none is skipped.
            let Some(upstream) = find(&l.upstream) else {
                continue;
            };
            let old = previous.and_then(|p| p.listener(&l.name));
            let bind = addrs
                .iter()
                .find(|(n, _)| *n == l.name)
                .map_or(l.bind, |(_, a)| *a);
            listeners.push(Arc::new(Listener {
                name: l.name.clone(),
                bind,
                upstream,
                tls,
                mutual_tls: l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
                sni: l
                    .sni
                    .iter()
                    .filter_map(|(n, u)| Some((n.clone(), find(u)?)))
                    .collect(),
                handshake_timeout: l.handshake_timeout,
                accept_proxy_protocol: l.accept_proxy_protocol,
                authorization: Arc::clone(&authorization),
                limiter: listener_limiter(l, config.rate_limit.as_ref(), global_limiter.as_ref(), epoch),
                reject_response: l.reject_response.clone(),
                accepted: old.map_or_else(Default::default, |o| Arc::clone(&o.accepted)),
                rejected: old.map_or_else(Default::default, |o| Arc::clone(&o.rejected)),
                registry: Arc::clone(&registry),
                reject_log: Default::default(),
                access_log: access_log.clone(),
            }));
        }
        State {
            generation,
            listeners,
            upstreams,
            drain_timeout: config.drain_timeout,
            registry,
            reloads,
            ratelimit_backend_errors,
            started: previous.map_or_else(Instant::now, |p| p.started),
            draining: AtomicBool::new(false),
            access_log,
        }
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
                    .map(|b| (b.label.clone(), u.pool.active(b.slot)))
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

/// The limiter a listener uses: its own (per instance) when it overrides capacity/window, else
/// the global one (cluster-wide with `[rate_limit.shared]`).
fn listener_limiter(
    listener: &ListenerConfig,
    global: Option<&RateLimitConfig>,
    shared: Option<&Limiter>,
    epoch: std::time::Instant,
) -> Option<Limiter> {
    match &listener.rate_limit {
        Some(o) => {
            let base = global.cloned().unwrap_or(RateLimitConfig {
                capacity: 0,
                window: Duration::from_secs(1),
                max_concurrent: None,
                max_clients: crate::config::DEFAULT_MAX_CLIENTS,
                clients: Default::default(),
                shared: None,
            });
            Some(Limiter::Local(RateLimiter::new(policy(&base, Some(o)), epoch)))
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
    live: Arc<Live>,
    sockets: Vec<(String, TcpListener)>,
    admin: Option<TcpListener>,
    /// Workers: SO_REUSEPORT sockets per listener bound on reload.
    workers: usize,
    requests: mpsc::Sender<Request>,
    inbox: mpsc::Receiver<Request>,
}

impl Server {
    /// Binds every listener and the admin socket named in the config.
    /// With several workers, each listener gets one SO_REUSEPORT socket per worker, so the kernel
    /// spreads new connections over as many accept loops.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let workers = config.workers();
        let mut sockets = Vec::with_capacity(config.listeners.len() * workers);
        for l in &config.listeners {
            sockets.extend(bind_all(&l.name, l.bind, workers)?);
        }
        let admin = match &config.admin {
            // SO_REUSEPORT too, so that a new process started with the same config for an
            // upgrade can bind it; until the old one exits either may answer.
            Some(a) => Some(
                bind_listener(a.bind).map_err(|source| ServerError::AdminBind { addr: a.bind, source })?,
            ),
            None => None,
        };
        let mut server = Server::from_listeners(config, sockets, admin)?;
        server.workers = workers;
        Ok(server)
    }

    /// Uses sockets the caller bound itself, at least one per configured listener (by name; more
    /// than one, e.g. SO_REUSEPORT siblings, each get an accept loop); the listeners' `bind`
    /// addresses are then ignored. `admin` serves the admin API if given. Listeners added by a
    /// later reload are bound by the server.
    pub fn from_listeners(
        config: Config,
        sockets: Vec<(String, TcpListener)>,
        admin: Option<TcpListener>,
    ) -> Result<Server, ServerError> {
        let tls = load_tls(&config)?;
        let mut addrs = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let bound = sockets.iter().find(|(name, _)| *name == l.name);
            let Some((_, socket)) = bound else {
                return Err(ServerError::MissingListener(l.name.clone()));
            };
            addrs.push((l.name.clone(), socket.local_addr().unwrap_or(l.bind)));
        }
        let state = State::assemble(&config, tls, addrs, None, 1);
        for l in &state.listeners {
            if !l.mutual_tls {
                info!(listener = %l.name, "listener accepts clients without certificates: no identity authorization applies");
            } else if config.authorization.is_empty() {
                warn!(listener = %l.name, "mTLS listener but [authorization] is empty: every client will be refused");
            }
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
        let (requests, inbox) = mpsc::channel(8);
        Ok(Server {
            live: Arc::new(Live::new(state, config.path.clone())),
            sockets,
            admin,
            workers: 1,
            requests,
            inbox,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.sockets
            .iter()
            .find(|(name, _)| name == listener)
            .and_then(|(_, s)| s.local_addr().ok())
    }

    /// The admin listener's address, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Live counters of the first generation, for metrics and tests (see [`Handle::state`] for
    /// the current one).
    pub fn state(&self) -> Arc<State> {
        self.live.state()
    }

    /// A handle to reload the running server and read its current state.
    pub fn handle(&self) -> Handle {
        Handle {
            requests: self.requests.clone(),
            live: Arc::clone(&self.live),
        }
    }

    /// Serves until `shutdown` is cancelled, then drains: stops accepting at once, waits up to
    /// `drain_timeout` for open connections, cancels the rest and returns. Reload requests are
    /// applied one at a time in between.
    pub async fn run(self, shutdown: CancellationToken) {
        let handle = self.handle();
        let Server {
            live,
            sockets,
            admin,
            workers,
            requests,
            mut inbox,
        } = self;
        drop(requests);
        let mut tasks = Tasks {
            live: Arc::clone(&live),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            abort: CancellationToken::new(),
            accepting: Vec::new(),
            probes: shutdown.child_token(),
            workers,
        };
        for (name, socket) in sockets {
            tasks.accept(name, socket);
        }
        tasks.start_probes(&live.state());
        let log_stop = CancellationToken::new();
        let log_writer = live
            .state()
            .access_log
            .as_ref()
            .and_then(|log| log.start(log_stop.clone()));
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|socket| {
            if let Ok(addr) = socket.local_addr() {
                info!(%addr, "admin listening");
            }
            tokio::spawn(crate::admin::serve(socket, handle, admin_stop.clone()))
        });

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(request) = inbox.recv() => {
                    let result = tasks.reload(request.config);
                    let _ = request.reply.send(result);
                }
            }
        }
        drop(inbox);

        let state = live.state();
        state.draining.store(true, Ordering::Release);
        tasks.tracker.close();
        let drain = state.drain_timeout;
        info!(
            active = state.total_active(),
            deadline = ?drain,
            "shutting down: no new connections, draining open ones"
        );
        if tokio::time::timeout(drain, tasks.tracker.wait()).await.is_err() {
            warn!(
                remaining = state.total_active(),
                "drain deadline passed; closing remaining connections"
            );
            tasks.abort.cancel();
            if tokio::time::timeout(CANCEL_GRACE, tasks.tracker.wait())
                .await
                .is_err()
            {
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

/// The running server's tasks: accept loops per socket, probe loops per generation.
struct Tasks {
    live: Arc<Live>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Cancels open connections at the drain deadline.
    abort: CancellationToken,
    /// Listener name, bound address and the token that stops its accept loop, per socket.
    accepting: Vec<(String, SocketAddr, CancellationToken)>,
    /// Stops the current generation's probe loops.
    probes: CancellationToken,
    workers: usize,
}

impl Tasks {
    fn accept(&mut self, name: String, socket: TcpListener) {
        let Ok(addr) = socket.local_addr() else {
            return;
        };
        info!(listener = %name, %addr, "listening");
        let stop = self.shutdown.child_token();
        self.tracker.spawn(accept_loop(
            socket,
            name.clone(),
            Arc::clone(&self.live),
            self.tracker.clone(),
            stop.clone(),
            self.abort.clone(),
        ));
        self.accepting.push((name, addr, stop));
    }

    fn start_probes(&mut self, state: &State) {
        self.probes.cancel();
        self.probes = self.shutdown.child_token();
        for upstream in state.upstreams() {
            crate::health::spawn(upstream, &self.tracker, &self.probes);
        }
    }

    /// Applies a reload: load (the same code as startup), bind what is new, swap, then stop what
    /// is gone. Any failure before the swap leaves the running generation untouched.
    fn reload(&mut self, config: Option<Config>) -> Result<u64, ReloadError> {
        let result = self.try_reload(config);
        match &result {
            Ok(generation) => {
                self.live.state().reloads.ok.inc();
                info!(generation, "configuration reloaded");
            }
            Err(e) => {
                self.live.state().reloads.failed.inc();
                error!(error = %e, "reload refused; the running configuration stays");
            }
        }
        result
    }

    fn try_reload(&mut self, config: Option<Config>) -> Result<u64, ReloadError> {
        let config = match config {
            Some(config) => config,
            None => Config::load(self.live.path.as_deref().ok_or(ReloadError::NoFile)?)?,
        };
        let tls = load_tls(&config)?;
        // A listener keeps its sockets if its name and configured address are unchanged.
        let current = self.live.state();
        let mut fresh = Vec::new();
        let mut addrs = Vec::new();
        for l in &config.listeners {
            let kept = current
                .listener(&l.name)
                .filter(|old| configured_same(old, l.bind))
                .map(|old| old.bind);
            match kept {
                Some(addr) => addrs.push((l.name.clone(), addr)),
                None => {
                    let sockets = bind_all(&l.name, l.bind, self.workers)?;
                    let addr = sockets
                        .first()
                        .and_then(|(_, s)| s.local_addr().ok())
                        .unwrap_or(l.bind);
                    addrs.push((l.name.clone(), addr));
                    fresh.extend(sockets);
                }
            }
        }
        let generation = current.generation + 1;
        let next = State::assemble(&config, tls, addrs, Some(&current), generation);
        let revoked = next.registry.revoke_lost_access(&next);
        if revoked > 0 {
            info!(
                revoked,
                "closed connections whose access the new configuration removes"
            );
        }
        // Stop accept loops of listeners that are gone or moved, then start the new ones.
        let keep: Vec<(String, SocketAddr)> = next.listeners().map(|l| (l.name.clone(), l.bind)).collect();
        self.accepting.retain(|(name, addr, stop)| {
            let stays = keep.iter().any(|(n, a)| n == name && a == addr);
            if !stays {
                stop.cancel();
            }
            stays
        });
        let next = Arc::new(next);
        self.start_probes(&next);
        self.live.swap_arc(Arc::clone(&next));
        for (name, socket) in fresh {
            self.accept(name, socket);
        }
        Ok(generation)
    }
}

/// Whether a running listener was configured with `bind` (port 0 means "any port": kept).
fn configured_same(old: &Listener, bind: SocketAddr) -> bool {
    old.bind == bind || (bind.port() == 0 && old.bind.ip() == bind.ip())
}

/// Binds `workers` sockets for one listener (SO_REUSEPORT siblings when more than one).
fn bind_all(name: &str, addr: SocketAddr, workers: usize) -> Result<Vec<(String, TcpListener)>, ServerError> {
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

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
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
async fn accept_loop(
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
                let Some(listener) = live.state().listener(&name).cloned() else {
                    break; // removed by a reload; its loop is being stopped
                };
                listener.accepted.inc();
                tracker.spawn(crate::connection::handle(stream, peer, listener, abort.clone()));
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

/// Serves the connections the kernel already completed on `socket`, which closing it would
/// reset. With SO_REUSEPORT another process may be serving the same port (an upgrade); closing
/// right after this leaves only connections completed in between to the kernel (moved to a
/// sibling socket with `net.ipv4.tcp_migrate_req = 1`, reset without it).
fn take_backlog(
    socket: TcpListener,
    name: &str,
    live: &Live,
    tracker: &TaskTracker,
    abort: &CancellationToken,
) {
    let Some(listener) = live.state().listener(name).cloned() else {
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
            Ok((stream, peer)) => {
                listener.accepted.inc();
                tracker.spawn(crate::connection::handle(
                    stream,
                    peer,
                    Arc::clone(&listener),
                    abort.clone(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(_) => break, // empty (WouldBlock) or out of resources: close now
        }
    }
}

/// Whether `e` says this process is out of descriptors, buffers or memory (not the peer's fault).
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
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
