//! The running balancer: binds listeners (or takes the sockets systemd passed), accepts
//! connections, applies reloads (`apply`), runs the shutdown sequence, and tells systemd about each
//! (`READY=1`, `RELOADING=1`, `STOPPING=1`, watchdog pings; see [`crate::systemd`]).
//!
//! [`Server`] turns a validated [`Config`] into a live generation (see [`crate::state`]) and sockets.
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

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, Scheduler};
use crate::reload::{Change, Handle, Request};
use crate::state::build::{load_with, Loaded};
use crate::state::workload::WorkloadTable;
use crate::state::{Discovered, Live, ServerError, State};
use crate::systemd::{Activation, Notifier};

mod apply;
mod listen;
mod quarantine;
mod workers;

use listen::{accept_loop, bind_listener};
use workers::Workers;

/// After the drain deadline, how long cancelled connections get to close their sockets.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// A configured balancer with its sockets bound, ready to [`run`](Server::run).
pub struct Server {
    live: Arc<Live>,
    sockets: Vec<(String, TcpListener)>,
    admin: Option<TcpListener>,
    /// `[admin] socket`, bound (std: it becomes tokio's once `run` is on the runtime) and its file.
    admin_unix: Option<(std::os::unix::net::UnixListener, crate::admin::socket::SocketFile)>,
    /// Workers: SO_REUSEPORT sockets per listener bound on reload.
    workers: usize,
    /// With `scheduler = "per_worker"`, the worker threads connections run on (none with one
    /// worker), started with the server so that they exist once it is bound; else none, and
    /// everything runs on the caller's runtime.
    pool: Workers,
    /// Listeners serving a socket systemd passed, with their configured `bind`.
    inherited: Vec<(String, SocketAddr)>,
    notifier: Notifier,
    requests: mpsc::Sender<Request>,
    inbox: mpsc::Receiver<Request>,
    /// With `source = "spiffe"`: the Workload API client, which delivered once.
    agent: Option<crate::workload::Agent>,
}

impl Server {
    /// Binds every listener and the admin socket named in the config.
    /// With several workers, each listener gets one SO_REUSEPORT socket per worker, so the kernel
    /// spreads new connections over as many accept loops.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Server::bind_activated(config, Activation::default()).await
    }

    /// [`bind`](Server::bind), but a listener takes the socket systemd passed for it (socket
    /// activation, [`Activation::from_env`]) instead of binding its own, and the server notifies
    /// systemd when `NOTIFY_SOCKET` was set (ready, reloading, stopping, watchdog).
    pub async fn bind_activated(config: Config, activation: Activation) -> Result<Server, ServerError> {
        let workers = config.workers();
        let Activation {
            sockets: passed,
            notifier,
        } = activation;
        let opened = listen::open(&config.listeners, workers, passed)?;
        let sockets = opened.sockets;
        let admin = match config.admin.as_ref().and_then(|a| a.bind) {
            // SO_REUSEPORT too, so that a new process started with the same config for an
            // upgrade can bind it; until the old one exits either may answer.
            Some(addr) => {
                Some(bind_listener(addr, None).map_err(|source| ServerError::AdminBind { addr, source })?)
            }
            None => None,
        };
        // Discovering upstreams start with the addresses their names resolve to now.
        let discovered = Arc::new(Discovered::default());
        crate::discovery::resolve_new(&config, &discovered).await;
        // TLS sides with `source = "spiffe"` wait for their first SVID (`startup_timeout`).
        let workload = Arc::new(WorkloadTable::default());
        let agent = match config.uses_spiffe() {
            true => Some(crate::workload::Agent::start(&config.spiffe, &workload).await?),
            false => None,
        };
        let mut server = Server::build(config, sockets, admin, discovered, workload)?;
        server.agent = agent;
        server.inherited = opened.inherited;
        server.notifier = notifier;
        Ok(server)
    }

    /// Uses sockets the caller bound itself, at least one per configured listener (by name; more
    /// than one, e.g. SO_REUSEPORT siblings, each get an accept loop); the listeners' `bind`
    /// addresses are then ignored. `admin` serves the admin API if given. Listeners added by a
    /// later reload are bound by the server.
    /// Discovering upstreams start empty and fill in once their names resolve. TLS with
    /// `source = "spiffe"` needs [`bind`](Server::bind), which waits for the Workload API.
    pub fn from_listeners(
        config: Config,
        sockets: Vec<(String, TcpListener)>,
        admin: Option<TcpListener>,
    ) -> Result<Server, ServerError> {
        Server::build(config, sockets, admin, Arc::default(), Arc::default())
    }

    fn build(
        config: Config,
        sockets: Vec<(String, TcpListener)>,
        admin: Option<TcpListener>,
        discovered: Arc<Discovered>,
        workload: Arc<WorkloadTable>,
    ) -> Result<Server, ServerError> {
        // Fetched CRLs start empty (or from `crl_cache_dir`) and outlive every generation, as
        // the Workload API's material does.
        let tls = load_with(&config, &Arc::default(), &workload)?;
        let mut addrs = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let bound = sockets.iter().find(|(name, _)| *name == l.name);
            let Some((_, socket)) = bound else {
                return Err(ServerError::MissingListener(l.name.clone()));
            };
            addrs.push((l.name.clone(), socket.local_addr().unwrap_or(l.bind)));
        }
        let state = State::assemble(&config, tls, addrs, None, 1, discovered);
        for l in &state.listeners {
            let summary = l.authorization.summary();
            let entry_tables = config
                .listeners
                .iter()
                .filter(|c| c.name == l.name)
                .flat_map(|c| c.tls.iter().flat_map(|t| &t.certificates))
                .any(|c| c.authorization.is_some());
            if !l.mutual_tls {
                info!(listener = %l.name, "listener accepts clients without certificates: no identity authorization applies");
            } else if summary.exact + summary.patterns == 0 && !entry_tables {
                warn!(listener = %l.name, "mTLS listener but its authorization grants nothing: every client will be refused");
            }
        }
        if let (Some(settings), Some(addr)) =
            (&config.admin, admin.as_ref().and_then(|s| s.local_addr().ok()))
        {
            crate::admin::warn_if_exposed(settings, addr);
        }
        let admin_unix = match config.admin.as_ref().and_then(|a| a.socket.as_ref()) {
            Some(path) => {
                Some(
                    crate::admin::socket::bind(path).map_err(|source| ServerError::AdminSocket {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        if let Some(log) = &state.access_log {
            log.open().map_err(|source| ServerError::AccessLog {
                path: match &config.access_log {
                    Some(crate::config::AccessLogConfig::File(path)) => path.display().to_string(),
                    _ => "stdout".to_string(),
                },
                source,
            })?;
        }
        let workers = config.workers();
        let pool = match config.scheduler {
            Scheduler::PerWorker => {
                Workers::start(workers).map_err(|source| ServerError::Workers { workers, source })?
            }
            Scheduler::Shared => Workers::default(),
        };
        let (requests, inbox) = mpsc::channel(8);
        Ok(Server {
            live: Arc::new(Live::new(state, config.path.clone())),
            sockets,
            admin,
            admin_unix,
            workers,
            pool,
            inherited: Vec::new(),
            notifier: Notifier::default(),
            requests,
            inbox,
            agent: None,
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

    /// The live model, for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
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
            admin_unix,
            workers,
            pool,
            inherited,
            notifier,
            requests,
            mut inbox,
            agent,
        } = self;
        drop(requests);
        let sockets_named: Vec<String> = sockets.iter().map(|(name, _)| name.clone()).collect();
        let mut tasks = Tasks {
            live: Arc::clone(&live),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            abort: CancellationToken::new(),
            accepting: Vec::new(),
            probes: shutdown.child_token(),
            handle: handle.clone(),
            workers,
            pool,
            inherited,
            notifier: notifier.clone(),
            workload: None,
        };
        if let Some(agent) = agent {
            tasks.watch_workload(agent);
        }
        for (name, socket) in sockets {
            // A listener with one socket (systemd's, or the caller's) is accepted from by every
            // worker; one bound here has a socket per worker.
            let sockets = |n: &str| sockets_named.iter().filter(|s| *s == n).count();
            let copies = if sockets(&name) == 1 {
                tasks.pool.count()
            } else {
                1
            };
            tasks.accept(name, socket, copies);
        }
        tasks.start_generation(&live.state());
        tasks.tracker.spawn(crate::state::close_at_expiry(
            Arc::clone(&live.registry),
            shutdown.clone(),
        ));
        tasks
            .tracker
            .spawn(quarantine::sync(Arc::clone(&live), shutdown.clone()));
        let log_stop = CancellationToken::new();
        let log_writer = live
            .state()
            .access_log
            .as_ref()
            .and_then(|log| log.start(log_stop.clone()));
        let admin_stop = CancellationToken::new();
        let unix = admin_unix.and_then(
            |(socket, file)| match tokio::net::UnixListener::from_std(socket) {
                Ok(socket) => Some((socket, file)),
                Err(e) => {
                    error!(path = %file.path().display(), error = %e, "admin socket cannot be served");
                    None
                }
            },
        );
        let admin_task = (admin.is_some() || unix.is_some()).then(|| {
            if let Some(addr) = admin.as_ref().and_then(|s| s.local_addr().ok()) {
                info!(%addr, "admin listening");
            }
            if let Some((_, file)) = &unix {
                info!(path = %file.path().display(), "admin listening on a Unix socket");
            }
            let sockets = crate::admin::Sockets { tcp: admin, unix };
            tokio::spawn(crate::admin::serve(sockets, handle, admin_stop.clone()))
        });
        let listeners = live.state().listeners().count();
        notifier.ready(&format!("serving {listeners} listener(s), generation 1"));
        let watchdog_stop = CancellationToken::new();
        let watchdog = tokio::spawn(notifier.clone().watchdog(watchdog_stop.clone()));

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(request) = inbox.recv() => {
                    let result = match request.change {
                        Change::Reread => tasks.reload(None).await,
                        Change::Apply(config) => tasks.reload(Some(*config)).await,
                        Change::Rediscover => Ok(tasks.rebuild(Loaded::reuse, "rebuilt with the discovered backends")),
                        Change::Refresh => Ok(tasks.rebuild(Loaded::refresh, "rebuilt with the fetched CRLs and the Workload API's material")),
                    };
                    let _ = request.reply.send(result);
                }
            }
        }
        drop(inbox);

        let state = live.state();
        state.draining.store(true, Ordering::Release);
        tasks.tracker.close();
        let drain = state.drain_timeout;
        notifier.stopping(&format!("draining {} connection(s)", state.total_active()));
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
        watchdog_stop.cancel();
        let _ = watchdog.await;
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
    /// Stops the current generation's probe loops, CRL warning and file watch.
    probes: CancellationToken,
    /// Asks the run loop for reloads (the file watch uses it).
    handle: Handle,
    workers: usize,
    /// The worker threads accept loops run on (`scheduler = "per_worker"` only).
    pool: Workers,
    /// Listeners serving a socket systemd passed, with the `bind` it answers for.
    inherited: Vec<(String, SocketAddr)>,
    notifier: Notifier,
    /// The Workload API watched (`[spiffe]`), and the token that stops watching it.
    workload: Option<(crate::config::SpiffeConfig, CancellationToken)>,
}

impl Tasks {
    /// Watches `agent`'s deliveries (stopping the Workload API watched before, if any).
    fn watch_workload(&mut self, agent: crate::workload::Agent) {
        if let Some((_, stop)) = self.workload.take() {
            stop.cancel();
        }
        let stop = self.shutdown.child_token();
        self.workload = Some((agent.settings().clone(), stop.clone()));
        let table = Arc::clone(&self.live.state().workload);
        self.tracker.spawn(agent.watch(table, self.handle.clone(), stop));
    }

    /// Stops watching the Workload API, if it was (a reload left nothing that takes material
    /// from it). What it delivered stays on record, unused.
    fn stop_workload(&mut self) {
        if let Some((settings, stop)) = self.workload.take() {
            stop.cancel();
            info!(socket = ?settings.socket, "nothing takes TLS material from the Workload API any more: stopped watching it");
        }
    }

    /// Before a reload to `config`: when it takes TLS material from a Workload API that is not
    /// watched yet (none, or another `[spiffe] socket`), connects to it and waits for its first
    /// delivery (`startup_timeout`); a failure refuses the reload.
    async fn ensure_workload(&mut self, config: &Config) -> Result<(), ServerError> {
        let watched = self
            .workload
            .as_ref()
            .is_some_and(|(s, _)| s.socket == config.spiffe.socket);
        if !config.uses_spiffe() || watched {
            return Ok(());
        }
        let agent = crate::workload::Agent::start(&config.spiffe, &self.live.state().workload).await?;
        self.watch_workload(agent);
        Ok(())
    }

    /// Starts accepting on `socket`: with worker threads, `copies` accept loops on it (one per
    /// worker for a listener with a single socket), each on the next worker's runtime.
    fn accept(&mut self, name: String, socket: TcpListener, copies: usize) {
        let Ok(addr) = socket.local_addr() else {
            return;
        };
        info!(listener = %name, %addr, "listening");
        let stop = self.shutdown.child_token();
        let (live, tracker, abort) = (Arc::clone(&self.live), self.tracker.clone(), self.abort.clone());
        let (listener, halt) = (name.clone(), stop.clone());
        let run = move |socket| {
            accept_loop(
                socket,
                listener.clone(),
                Arc::clone(&live),
                tracker.clone(),
                halt.clone(),
                abort.clone(),
            )
        };
        if self.pool.count() == 1 {
            self.tracker.spawn(run(socket));
        } else {
            // Registered with this runtime until now: each worker registers its own copy.
            let copies = socket.into_std().and_then(|socket| {
                let mut all = (1..copies)
                    .map(|_| socket.try_clone())
                    .collect::<Result<Vec<_>, _>>()?;
                all.push(socket);
                Ok(all)
            });
            for socket in copies.unwrap_or_else(|e| {
                error!(listener = %name, error = %e, "cannot hand the socket to the workers");
                Vec::new()
            }) {
                let Some(worker) = self.pool.next() else { break };
                let (run, name) = (run.clone(), name.clone());
                let on_worker = async move {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => run(socket).await,
                        Err(e) => {
                            error!(listener = %name, error = %e, "a worker cannot accept on its socket")
                        }
                    }
                };
                self.tracker.spawn_on(on_worker, worker);
            }
        }
        self.accepting.push((name, addr, stop));
    }

    /// Starts what runs for one generation, stopping the previous generation's: probe loops,
    /// discovery loops, the CRL `nextUpdate` warning, and the file watch (`[reload] watch`).
    fn start_generation(&mut self, state: &State) {
        self.probes.cancel();
        self.probes = self.shutdown.child_token();
        for upstream in state.upstreams() {
            crate::probe::spawn(upstream, &self.tracker, &self.probes);
            if let Some(target) = &upstream.discover {
                self.tracker.spawn(crate::discovery::run(
                    self.handle.clone(),
                    Arc::clone(&state.discovered),
                    upstream.name.clone(),
                    target.clone(),
                    state.config.dns.clone(),
                    self.probes.clone(),
                ));
            }
        }
        self.tracker.spawn(crate::tls::expiry::warn_at_crl_next_update(
            state.crl_deadlines(),
            self.probes.clone(),
        ));
        crate::crl_fetch::spawn(state, &self.tracker, &self.probes, &self.handle);
        if state.reload.watch {
            self.tracker.spawn(crate::watch::run(
                self.handle.clone(),
                state.files.clone(),
                state.loaded.clone(),
                state.reload.debounce,
                self.probes.clone(),
            ));
        }
    }
}
