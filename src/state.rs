//! The live model: one generation of state, and what outlives generations.
//!
//! A [`State`] is everything a running configuration is made of: its [`Listener`]s (routing,
//! TLS, authorization, limiter, counters), its [`Upstream`]s (backends, their pool, dial and
//! health settings) and each [`Backend`] (address, counters, health). [`Live`] holds the current
//! generation; a reload swaps in the next one, and every task keeps the generation it started
//! with. The [`Registry`] of open connections (and the grants of mTLS ones) is shared by every
//! generation, so a reload can close those whose access it takes away, an operator can list and
//! close them, and a quarantine can close its subject's. The quarantine table is shared the same
//! way. How a generation is built from a loaded config (pure
//! once its files are read) is [`build`]; which open connections a generation would close, for a
//! reload and for its preview, is [`impact`].
//!
//! This module is read by everything that runs (accept loops, connections, probes, the admin
//! side); it does not bind sockets, spawn tasks or move bytes: the orchestrator that does
//! (`server`) sits above it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::authz::Authorization;
use crate::balancer::{Pool, Spec};
use crate::config::{BackendAddr, BackendConfig, Config, Discover, HealthCheckConfig, UpstreamConfig};
use crate::health::BackendHealth;
use crate::metrics::{
    Counter, HandshakeFailures, Identities, ListenerFigures, Rejections, ReloadCounters, Traffic,
    UpstreamFigures,
};
use crate::ratelimit::Limiter;
use crate::tls::ServerTls;

pub mod build;
mod certificates;
mod discovered;
mod error;
pub(crate) mod fetched_crls;
pub mod impact;
pub(crate) mod registry;
pub mod workload;

pub(crate) use certificates::ListenerTls;
pub use discovered::{Discovered, Outcomes, Resolution};
pub use error::ServerError;
pub(crate) use registry::close_at_expiry;
use registry::Entry;
pub(crate) use registry::Grant;
pub use registry::{Cut, CutSignal, Registration, Registry};
pub use workload::WorkloadError;

/// One generation of live state: listeners, upstreams and their counters. A reload builds the
/// next one; tasks holding this one keep it.
#[derive(Debug)]
pub struct State {
    /// 1 at startup, +1 per successful reload.
    pub generation: u64,
    pub(crate) listeners: Vec<Arc<Listener>>,
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    /// How long open connections may run after shutdown starts.
    pub(crate) drain_timeout: Duration,
    /// Cap on open client connections for the whole process.
    pub(crate) max_connections: usize,
    /// Splice pipes that may be alive at once, held or pooled ([`crate::caps::pipe_budget`]):
    /// applied to the relay when this generation goes live.
    pub(crate) max_pipes: usize,
    /// `[admin]`: its token and request rules (the sockets are bound once, at start).
    pub(crate) admin: Option<crate::config::AdminConfig>,
    /// The global rate limiter, if any: a reload takes over its counts.
    pub(crate) global_limiter: Option<Limiter>,
    /// `[reload]`: whether (and how) this generation's files are watched.
    pub(crate) reload: crate::config::ReloadConfig,
    /// The files this generation was built from (the config file and every file it names).
    pub(crate) files: Vec<PathBuf>,
    /// With `[reload] watch`: their fingerprint just before they were read.
    pub(crate) loaded: Vec<Option<u64>>,
    /// Reload outcomes (shared by every generation).
    pub reloads: Arc<ReloadCounters>,
    /// Failed round trips to the shared rate limit's Redis (shared by every generation).
    pub ratelimit_backend_errors: Arc<Counter>,
    /// Identities and serials refused at admission (shared by every generation).
    pub quarantine: Arc<crate::quarantine::QuarantineStore>,
    /// When the server started: the origin of the uptime in `/status` (kept across reloads).
    pub(crate) started: Instant,
    /// Set when shutdown starts: no new connections, open ones are draining.
    pub(crate) draining: AtomicBool,
    /// `[access_log]`, shared with every listener (opened at start; kept across reloads).
    pub(crate) access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// The configuration this generation was built from: a changed `discover` set rebuilds it
    /// without reading any file.
    pub(crate) config: Arc<Config>,
    /// What `discover` names resolved to (shared by every generation).
    pub discovered: Arc<Discovered>,
    /// Open connections and refusals per client identity (shared by every generation).
    pub identities: Arc<Identities>,
    /// When this generation's certificates and CRLs expire.
    pub(crate) certificates: Vec<crate::tls::expiry::Expiry>,
    /// CRLs fetched from their distribution points (shared by every generation).
    pub(crate) fetched_crls: Arc<fetched_crls::FetchedCrls>,
    /// The Workload API's last delivery and counters (shared by every generation).
    pub(crate) workload: Arc<workload::WorkloadTable>,
    /// The delivery this generation's `source = "spiffe"` sides were built with.
    pub(crate) workload_material: Option<Arc<crate::tls::svid::Material>>,
}

/// A listener's routing, policies and counters.
pub struct Listener {
    pub(crate) name: String,
    /// Where connections go unless SNI picks another upstream.
    pub(crate) upstream: Arc<Upstream>,
    /// Bound address (the first socket's, with port 0 resolved once bound).
    pub bind: SocketAddr,
    /// TLS termination, its certificates chosen by SNI; `None` for plaintext.
    pub(crate) tls: Option<ListenerTls>,
    /// Whether clients must present a certificate (and are then authorized by identity).
    pub(crate) mutual_tls: bool,
    /// Lowercase server name -> upstream.
    pub(crate) sni: Vec<(String, Arc<Upstream>)>,
    /// Negotiated ALPN protocol -> upstream (`[listener.alpn]`).
    pub(crate) alpn_routes: Vec<(Vec<u8>, Arc<Upstream>)>,
    /// `[listener.tls] alpn_required`.
    pub(crate) alpn_required: bool,
    pub(crate) handshake_timeout: Duration,
    /// Expect a PROXY protocol header first (see [`crate::config::ListenerConfig`]).
    pub(crate) accept_proxy_protocol: bool,
    pub(crate) authorization: Arc<Authorization>,
    pub(crate) limiter: Option<Limiter>,
    /// `limiter` when it is this listener's own (`[listener.rate_limit]`): a reload takes over
    /// its counts.
    pub(crate) own_limiter: Option<crate::ratelimit::RateLimiter>,
    pub(crate) reject_response: Option<Vec<u8>>,
    /// With `accept_proxy_protocol`: the fronts allowed to send a header (empty: none).
    pub(crate) trusted_proxies: Vec<crate::config::IpNet>,
    /// `allow_from` (empty: any source) and `deny_from`, checked at accept.
    pub(crate) allow_from: Vec<crate::config::IpNet>,
    pub(crate) deny_from: Vec<crate::config::IpNet>,
    /// When a quiet, half-closed or old connection is closed (see [`crate::proxy::Timeouts`]).
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) half_closed_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) max_lifetime_jitter: Duration,
    /// TCP keepalive on the client leg.
    pub(crate) tcp_keepalive: Option<crate::config::Keepalive>,
    /// Cap on this listener's open connections (`None`: only the process cap).
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_handshakes_per_source: u32,
    /// How much of a source address is one client.
    pub(crate) prefixes: crate::config::SourcePrefixes,
    /// Open connections of this listener (carried over reloads with the name).
    pub(crate) open: Arc<crate::caps::Gauge>,
    /// Connections in their PROXY-header or TLS-handshake phase, per source (carried over too).
    pub(crate) handshakes: Arc<crate::caps::Handshakes>,
    /// How certificates become identities (`identity_from_cn`).
    pub(crate) identity_rule: crate::identity::Rule,
    /// Close mTLS connections when their client certificate expires (`close_on_expiry`).
    pub(crate) close_on_expiry: bool,
    /// Counters carry over reloads for a listener that keeps its name.
    pub accepted: Arc<Counter>,
    pub rejected: Arc<Rejections>,
    /// What the shadow authorization table would have decided (`fulcrum_authorization_shadow_total`).
    pub shadow: Arc<crate::metrics::ShadowVerdicts>,
    /// Why TLS handshakes failed (`fulcrum_tls_handshake_failures_total`).
    pub handshake_failures: Arc<HandshakeFailures>,
    /// Handshake and connection durations, bytes (carried over too).
    pub figures: Arc<ListenerFigures>,
    /// The state's per-identity table.
    pub(crate) identities: Arc<Identities>,
    /// Keeps a flood of rejections from flooding the log.
    pub(crate) reject_log: crate::throttle::LogThrottle,
    /// Where each closed connection's line goes, if `[access_log]` is configured.
    pub(crate) access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// `[access_log] interim`: how often an open connection writes an interim entry.
    pub(crate) access_log_interim: Option<Duration>,
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

    /// Connections open on this listener now (the places its cap counts).
    pub fn open_connections(&self) -> usize {
        self.open.get()
    }

    /// Connections counted under `source` (an address masked to its prefix) in their handshake
    /// phase now.
    pub fn handshakes_from(&self, source: IpAddr) -> u32 {
        self.handshakes.of(source)
    }

    /// The TLS (certificate and client trust) a client that asked for `server_name` is served
    /// and judged with; `None` on a plain listener.
    pub(crate) fn tls_for(&self, server_name: Option<&str>) -> Option<&ServerTls> {
        Some(&self.tls.as_ref()?.choose(server_name).tls)
    }

    /// Whether `allow_from` / `deny_from` let a client from `source` in.
    pub(crate) fn admits_source(&self, source: IpAddr) -> bool {
        let allowed = self.allow_from.is_empty() || self.allow_from.iter().any(|net| net.contains(source));
        allowed && !self.deny_from.iter().any(|net| net.contains(source))
    }

    /// The authorization a client that asked for `server_name` is judged by.
    pub(crate) fn authorization_for(&self, server_name: Option<&str>) -> &Arc<Authorization> {
        self.tls
            .as_ref()
            .and_then(|tls| tls.choose(server_name).authorization.as_ref())
            .unwrap_or(&self.authorization)
    }

    /// The upstream for a TLS server name and negotiated protocol: an SNI entry, else an ALPN
    /// entry (SNI wins when both match), else the listener's own upstream.
    pub fn route(&self, server_name: Option<&str>, alpn: Option<&[u8]>) -> &Arc<Upstream> {
        let by_name = server_name.and_then(|name| {
            self.sni
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, u)| u)
        });
        let by_protocol = || alpn.and_then(|p| self.alpn_routes.iter().find(|(a, _)| a == p).map(|(_, u)| u));
        by_name.or_else(by_protocol).unwrap_or(&self.upstream)
    }
}

/// An upstream group: its backends, their pool and dial settings.
#[derive(Debug)]
pub struct Upstream {
    pub(crate) name: String,
    /// In configured (or, discovered, address) order. Kept backends are the same `Arc` across
    /// reloads.
    pub backends: Vec<Arc<Backend>>,
    /// What each backend was configured with, aligned with `backends`: a reload that leaves a
    /// backend's weight as it was keeps a weight set at runtime.
    pub(crate) configured: Vec<Spec>,
    /// Pool slot -> position in `backends` (`None`: a slot of another generation).
    pub(crate) slots: Vec<Option<usize>>,
    /// Slots of backends removed by this generation or earlier ones, with the backend each
    /// held, not yet given to a new backend: a slot is reused once its old backend is gone (no
    /// generation maps the slot to it, no connection holds it) and no lease of it is left.
    pub(crate) vacated: Vec<(usize, Weak<Backend>)>,
    /// Shared by every generation of this upstream: a backend's count follows its slot.
    pub pool: Arc<Pool>,
    pub(crate) connect_timeout: Duration,
    pub(crate) connect_attempts: usize,
    /// Probe settings, thresholds, `on_down` and slow start (see [`crate::health`]).
    pub(crate) health_check: HealthCheckConfig,
    /// PROXY protocol header sent to backends before any client byte.
    pub(crate) proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// TLS to the backends (`[upstream.tls]`).
    pub(crate) tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// TCP keepalive on the backend leg.
    pub(crate) tcp_keepalive: Option<crate::config::Keepalive>,
    /// Clients that may wait for a backend below its cap (0: refused at once), and how long.
    pub(crate) queue_size: usize,
    pub(crate) queue_timeout: Duration,
    /// Connect and queue-wait durations (carried over reloads).
    pub figures: Arc<UpstreamFigures>,
    /// `discover`: the name its backends come from.
    pub(crate) discover: Option<Discover>,
}

/// One backend's address, counters and health. Its active count lives in the pool, at `slot`.
#[derive(Debug)]
pub struct Backend {
    pub(crate) addr: BackendAddr,
    /// Index in the upstream's pool.
    pub slot: usize,
    /// The configured `host:port` text: the `backend` label in metrics and logs.
    pub label: String,
    pub connections: Counter,
    pub connect_failures: Counter,
    /// Bytes to and from this backend, counted as they move.
    pub(crate) bytes: Traffic,
    /// Rise/fall state, the down signal and transition counters.
    pub(crate) health: BackendHealth,
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
    /// retired from the pool; their open connections drain; backends that join ramp in with the
    /// slow start, if one is set, in the slot of a backend removed earlier if one is free (see
    /// `vacated`), else in a new one. A discovering upstream's backends are `discovered`, the
    /// addresses its name last resolved to.
    pub(crate) fn new(
        config: &UpstreamConfig,
        tls: Option<Arc<crate::tls::UpstreamTls>>,
        previous: Option<&Upstream>,
        discovered: &[SocketAddr],
    ) -> Upstream {
        let pool = previous.map_or_else(|| Pool::new(0), |p| Arc::clone(&p.pool));
        let wanted: Vec<BackendConfig> = match &config.discover {
            None => config.backends.clone(),
            Some(_) => discovered
                .iter()
                .map(|addr| BackendConfig::new(BackendAddr::Ip(*addr)))
                .collect(),
        };
        // Slots whose old backend nothing refers to any more, lowest last (taken first).
        let mut vacated = previous.map(|p| p.vacated.clone()).unwrap_or_default();
        let mut free: Vec<usize> = Vec::new();
        vacated.retain(|(slot, old)| {
            let gone = old.strong_count() == 0;
            if gone {
                free.push(*slot);
            }
            !gone
        });
        free.sort_unstable_by(|a, b| b.cmp(a));
        let mut backends = Vec::with_capacity(wanted.len());
        let mut configured = Vec::with_capacity(wanted.len());
        for b in &wanted {
            let label = b.addr.to_string();
            let spec = Spec {
                weight: b.weight,
                max_connections: b.max_connections,
                backup: b.backup,
            };
            let kept = previous.and_then(|p| {
                let position = p.backends.iter().position(|k| k.label == label)?;
                Some((&p.backends[position], p.configured.get(position).copied()))
            });
            let backend = match kept {
                Some((kept, before)) => {
                    kept.health.reconfigure(&config.health_check);
                    if before != Some(spec) {
                        // A weight set at runtime stands until the configured weight changes.
                        let runtime = pool.spec(kept.slot).map_or(spec.weight, |s| s.weight);
                        let weight = match before {
                            Some(before) if before.weight == spec.weight => runtime,
                            _ => spec.weight,
                        };
                        pool.respec(kept.slot, Spec { weight, ..spec }, Instant::now());
                    }
                    Arc::clone(kept)
                }
                None => {
                    let slot = loop {
                        match free.pop() {
                            Some(slot) if pool.reuse(slot, spec, Instant::now()) => break slot,
                            // Still leased: tried again at the next rebuild.
                            Some(slot) => vacated.push((slot, Weak::new())),
                            None => break pool.add_with(spec, Instant::now()),
                        }
                    };
                    // One that joins a running upstream (a reload, a discovered address) ramps in.
                    if let (Some(_), Some(period)) = (previous, config.health_check.slow_start) {
                        pool.ramp_up(slot, Instant::now(), period);
                    }
                    Arc::new(Backend {
                        addr: b.addr.clone(),
                        slot,
                        label,
                        connections: Counter::default(),
                        connect_failures: Counter::default(),
                        bytes: Traffic::default(),
                        health: BackendHealth::new(&config.health_check),
                    })
                }
            };
            backends.push(backend);
            configured.push(spec);
        }
        vacated.extend(free.into_iter().map(|slot| (slot, Weak::new())));
        for gone in previous.iter().flat_map(|p| &p.backends) {
            if !backends.iter().any(|b| Arc::ptr_eq(b, gone)) {
                pool.retire(gone.slot);
                vacated.push((gone.slot, Arc::downgrade(gone)));
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
            configured,
            slots,
            vacated,
            pool,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            health_check: config.health_check.clone(),
            proxy_protocol: config.proxy_protocol,
            tls,
            tcp_keepalive: config.tcp_keepalive,
            queue_size: config.queue_size,
            queue_timeout: config.queue_timeout,
            figures: previous.map_or_else(Default::default, |p| Arc::clone(&p.figures)),
            discover: config.discover.clone(),
        }
    }

    /// The backend at a pool slot, if it belongs to this generation.
    pub fn backend(&self, slot: usize) -> Option<&Arc<Backend>> {
        self.backends.get((*self.slots.get(slot)?)?)
    }
}

impl State {
    /// Which configuration this is: 1 for the one the server started with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether shutdown has started (open connections are draining).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Makes the access log writer reopen its file (for `logrotate`; SIGUSR1): the lines taken
    /// before go to the old file, those after to a new one at the same path.
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
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

    /// `(listener, CRL issuer, nextUpdate)` of every CRL in force (once, when certificates of a
    /// listener share a client trust).
    pub fn crl_deadlines(&self) -> Vec<(String, String, SystemTime)> {
        let mut deadlines: Vec<_> = self
            .listeners
            .iter()
            .flat_map(|l| {
                l.tls
                    .iter()
                    .flat_map(ListenerTls::each)
                    .flat_map(|(_, tls)| &tls.crls)
                    .filter_map(|crl| crl.next_update.map(|at| (l.name.clone(), crl.issuer.clone(), at)))
            })
            .collect();
        deadlines.sort();
        deadlines.dedup();
        deadlines
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

/// The current generation of state, and what outlives generations: the registry of open mTLS
/// connections and the file reloads re-read.
pub struct Live {
    current: Mutex<Arc<State>>,
    /// Open mTLS connections, over every generation.
    pub(crate) registry: Arc<Registry>,
    /// Open client connections of the process, over every generation.
    pub(crate) open: Arc<crate::caps::Gauge>,
    /// The file to re-read on reload, if the config came from one.
    pub(crate) path: Option<PathBuf>,
}

impl Live {
    pub(crate) fn new(state: State, path: Option<PathBuf>) -> Live {
        crate::proxy::set_pipe_limit(state.max_pipes);
        Live {
            current: Mutex::new(Arc::new(state)),
            registry: Arc::default(),
            open: Arc::default(),
            path,
        }
    }

    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.lock())
    }

    /// Closes the open connections of a quarantined `subject` (`end="quarantined"`); how many.
    pub(crate) fn close_quarantined(&self, subject: &crate::quarantine::Subject) -> usize {
        use crate::quarantine::Subject;
        let filter = match subject {
            Subject::Identity(name) => registry::ConnectionFilter {
                identity: Some(name.clone()),
                ..Default::default()
            },
            Subject::Serial(hex) => registry::ConnectionFilter {
                serial: Some(hex.clone()),
                ..Default::default()
            },
        };
        self.registry
            .connections()
            .close_matching(&filter, Cut::Quarantined)
    }

    /// Open registered mTLS connections.
    pub fn registered(&self) -> usize {
        self.registry.len()
    }

    /// Admits a connection against the live generation, race-free against reloads.
    ///
    /// `first` is what the caller decided against generation `seen` (read before, outside any
    /// lock, so that certificate checks run unlocked). Under the registry's lock, which
    /// [`Live::swap`] takes too: if `seen` is still live, `first` stands; otherwise a reload
    /// came in between and `decide` judges again against the generation now live. A grant is
    /// registered before the lock is released. So a reload either swaps before this (and the
    /// connection is judged by the new generation) or after (and its sweep sees the
    /// registration): no connection is between "authorized" and "registered" for a reload to
    /// miss.
    pub(crate) fn admit<T, E>(
        &self,
        seen: u64,
        first: Result<(T, Option<Grant>), E>,
        decide: impl FnOnce(&Arc<State>) -> Result<(T, Option<Grant>), E>,
    ) -> Result<(T, Option<Registration>), E> {
        let mut open = self.registry.lock();
        let current = self.state();
        let (value, grant) = if current.generation == seen {
            first?
        } else {
            decide(&current)?
        };
        let registration = grant.map(|grant| self.registry.insert(&mut open, grant));
        Ok((value, registration))
    }

    /// Makes `next` the live generation, then closes the open connections it no longer allows
    /// (see `revoke_lost_access`). Returns how many were closed. The swap happens
    /// under the registry's lock (see [`Live::admit`]); the checks, which verify certificates
    /// only where the trust changed, after it is released. Applies `next`'s pipe budget.
    pub(crate) fn swap(&self, next: Arc<State>) -> usize {
        crate::proxy::set_pipe_limit(next.max_pipes);
        let (open, previous): (Vec<Arc<Entry>>, Arc<State>) = {
            let open = self.registry.lock();
            let previous = std::mem::replace(&mut *self.lock(), Arc::clone(&next));
            (open.entries(), previous)
        };
        revoke_lost_access(&open, &previous, &next)
    }

    fn lock(&self) -> MutexGuard<'_, Arc<State>> {
        // Only an Arc is swapped under this lock; nothing can panic while it is held.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Cuts every connection of `open` that `next` no longer allows (its source, its chain or its
/// authorization: see [`State::would_close`], the judgement the reload preview shows), with
/// `previous` the generation live until now. Returns how many were cut.
///
/// A rebuild that reuses what was loaded (a changed `discover` set) keeps every listener's
/// verifier, so it verifies no certificate at all.
fn revoke_lost_access(open: &[Arc<Entry>], previous: &State, next: &State) -> usize {
    let lost = next.would_close(open, previous, SystemTime::now());
    for loss in &lost {
        loss.entry.cut(Cut::AccessRevoked);
    }
    lost.len()
}

#[cfg(test)]
mod tests;
