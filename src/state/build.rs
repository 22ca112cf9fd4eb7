//! Building a generation: every file it needs loaded (`load`), then assembled from the
//! validated config (`State::assemble`, infallible), taking over what stays from the running
//! generation: an upstream's pool, kept backends with their counts and health, listeners'
//! counters and the access log.
//!
//! `fulcrum check` ([`validate`]), startup and every reload run this same code, so they can never
//! disagree. CRLs fetched from distribution points (`crl_urls`) are applied here beside the
//! `crl` file's, from the table every generation shares (`FetchedCrls`): at load (a URL with no
//! CRL held yet is first looked for in `crl_cache_dir`) and by `Loaded::refresh`, which builds
//! the running generation again with what was fetched, reading no file (`build::fetched`).
//!
//! Which limiter counts each listener is settled here from the policy `config` gave it: the one
//! global limiter (cluster-wide with `[rate_limit.shared]`) or one of its own. This module reads
//! certificate and key files; it binds nothing.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::fetched_crls::FetchedCrls;
use super::workload::WorkloadTable;
use super::{Discovered, Listener, ListenerTls, ServerError, State, Upstream};
use crate::authz::Authorization;
use crate::config::{Config, ListenerLimit, TlsConfig};
use crate::ratelimit::{ClusterLimiter, Limiter, RateLimiter};
use crate::tls::expiry::Expiry;
use crate::tls::svid::Material;
use crate::tls::Certificates;

mod fetched;

/// What `fulcrum check` reports of a configuration that loads.
#[derive(Debug)]
pub struct Checked {
    /// What loads but an operator should fix.
    pub warnings: Vec<String>,
    /// Every certificate and CRL deadline, earliest first.
    pub certificates: Vec<Expiry>,
    /// Per mTLS listener and CA file, the anchors and intermediates found in it (one line each).
    pub trust: Vec<String>,
    /// Per mTLS listener, its effective authorization (entries, patterns, deny, shadow) and the
    /// patterns that overlap (one line each).
    pub policy: Vec<String>,
}

/// Checks everything `run` would load (config and certificate files) without binding anything,
/// and returns warnings: what loads but an operator should fix (a CRL past its `nextUpdate`, a
/// certificate expiring within 14 days, an admin listener open to the network without a token).
/// `fulcrum check` calls [`check`]; `Server::bind` and reloads build the same state.
pub fn validate(config: &Config) -> Result<Vec<String>, ServerError> {
    check(config).map(|checked| checked.warnings)
}

/// [`validate`], with the certificate deadlines. A configuration with `source = "spiffe"`
/// fails here (nothing was delivered): `fulcrum check` asks the Workload API first
/// (`crate::check_connected`).
pub fn check(config: &Config) -> Result<Checked, ServerError> {
    check_with(config, &Arc::default())
}

/// [`check`] with the material `workload` holds (`crate::workload::check_connected`).
pub(crate) fn check_with(config: &Config, workload: &Arc<WorkloadTable>) -> Result<Checked, ServerError> {
    let tls = load_with(config, &Arc::default(), workload)?;
    let addrs = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.bind))
        .collect();
    let state = State::assemble(config, tls, addrs, None, 1, Arc::default());
    let now = std::time::SystemTime::now();
    let mut warnings = Vec::new();
    if let Some(admin) = config
        .admin
        .as_ref()
        .filter(|a| a.is_exposed() && a.token.is_none())
    {
        let addr = admin.bind.map(|a| a.to_string()).unwrap_or_default();
        warnings.push(format!(
            "[admin] bind = {addr:?} is not a loopback address and there is no token_file: anyone who can reach it \
             reads /status and /metrics, and mutating endpoints (POST /reload, backend states) are refused; \
             set [admin] token_file (or bind to loopback, or use [admin] socket)"
        ));
    }
    for (listener, issuer, at) in state.crl_deadlines() {
        if at <= now {
            warnings.push(format!(
                "listener {listener:?}: the CRL issued by {issuer} is past its nextUpdate ({}); it is still applied, but publish a fresh one",
                humantime::format_rfc3339_seconds(at)
            ));
        }
    }
    let mut certificates = state.certificates.clone();
    certificates.sort_by_key(|c| c.not_after);
    for near in certificates
        .iter()
        .filter(|c| c.is_near(now) && c.kind != "crl_next_update")
    {
        let when = humantime::format_rfc3339_seconds(near.not_after);
        warnings.push(match near.days_left(now) {
            days if days < 0 => format!("{} expired at {when}", near.describe()),
            days => format!(
                "{} expires in {days} day(s), at {when} (under {} days)",
                near.describe(),
                crate::tls::expiry::WARN_DAYS
            ),
        });
    }
    for listener in config.listeners.iter().filter(|l| l.accept_proxy_protocol) {
        if listener.trusted_proxies.iter().any(|net| net.prefix == 0) {
            warnings.push(format!(
                "listener {:?}: trusted_proxies includes a /0 network: any peer may send a PROXY header and \
                 name any source address, so per-source limits and logs trust what it says; list your fronts instead",
                listener.name
            ));
        }
    }
    let mut trust = Vec::new();
    for listener in state.listeners() {
        // Each client trust once, named by the first certificate using it.
        let mut verifiers: Vec<&Arc<crate::tls::ClientVerifier>> = Vec::new();
        for (entry, tls) in listener.tls.iter().flat_map(ListenerTls::each) {
            let Some(verifier) = tls
                .verifier
                .as_ref()
                .filter(|v| !verifiers.iter().any(|s| Arc::ptr_eq(s, v)))
            else {
                continue;
            };
            verifiers.push(verifier);
            let of = entry.map_or_else(String::new, |name| format!(" certificate {:?}", name.to_string()));
            describe_trust(&listener.name, &of, verifier, &mut trust, &mut warnings);
        }
        let fetch = config
            .listeners
            .iter()
            .find(|l| l.name == listener.name)
            .and_then(|l| l.tls.as_ref()?.crl_fetch.as_ref());
        let fallback = listener.tls_for(None).and_then(|t| t.verifier.as_ref());
        if let (Some(fetch), Some(verifier)) = (fetch, fallback) {
            let (urls, ignored) = verifier.crl_urls(fetch, None);
            let urls = match (urls.is_empty(), fetch.from_certificates) {
                (true, _) => {
                    "none yet: the distribution points of the client certificates seen will be fetched".into()
                }
                (false, true) => format!("{}, then those of the client certificates seen", urls.join(" | ")),
                (false, false) => urls.join(" | "),
            };
            trust.push(format!("listener {:?} CRL URLs: {urls}", listener.name));
            if ignored > 0 {
                warnings.push(ignored_urls(&listener.name, ignored));
            }
        }
    }
    let mut policy = Vec::new();
    for listener in state.listeners().filter(|l| l.mutual_tls) {
        let name = format!("listener {:?}", listener.name);
        policy.extend(policy_lines(&name, &listener.authorization));
        let entries = config
            .listeners
            .iter()
            .filter(|l| l.name == listener.name)
            .flat_map(|l| l.tls.iter().flat_map(|t| &t.certificates));
        for entry in entries {
            if let Some(own) = &entry.authorization {
                let table = Authorization::new(&own.inheriting_deny(&config.authorization));
                policy.extend(policy_lines(
                    &format!("{name} certificate {:?}", entry.label()),
                    &table,
                ));
            }
        }
    }
    Ok(Checked {
        warnings,
        certificates,
        trust,
        policy,
    })
}

/// `fulcrum check`'s account of one client trust of `listener` (`of`: which certificate's, empty
/// for the fallback's): a line per CA file with its anchors and intermediates into `trust`, and
/// a warning per certificate of it not usable as an anchor.
fn describe_trust(
    listener: &str,
    of: &str,
    verifier: &crate::tls::ClientVerifier,
    trust: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let stores = verifier
        .trust
        .client_ca
        .iter()
        .map(|s| ("client_ca".to_string(), s));
    let domains = verifier.trust.trust_domains.iter();
    for (file, store) in stores.chain(domains.map(|(d, s)| (format!("trust domain {d:?}"), s))) {
        let (anchors, intermediates) = store.describe();
        let intermediates = match intermediates.is_empty() {
            true => "none".into(),
            false => intermediates.join(" | "),
        };
        trust.push(format!(
            "listener {listener:?}{of} {file}: anchors: {}; intermediates: {intermediates}",
            anchors.join(" | "),
        ));
        for (subject, why) in &store.unusable {
            warnings.push(format!(
                "listener {listener:?}{of} {file}: {subject} is not used as a trust anchor: {why}"
            ));
        }
    }
}

/// `fulcrum check`'s account of an authorization table (`whose`: the listener's or one of its
/// certificates'): what it holds, and each pair of patterns an identity could match both of
/// (its own table's and its shadow's).
fn policy_lines(whose: &str, authorization: &Authorization) -> Vec<String> {
    let mut lines = vec![format!("{whose} authorization: {}", authorization.summary())];
    let tables = std::iter::once(("", authorization)).chain(authorization.shadow().map(|s| ("shadow ", s)));
    for (which, table) in tables {
        for (wins, loses) in table.overlaps() {
            lines.push(format!(
                "{whose} {which}patterns overlap: {wins:?} wins over {loses:?} for identities both match"
            ));
        }
    }
    lines
}

/// The warning for CRL URLs past [`crate::config::MAX_CRL_URLS`].
fn ignored_urls(listener: &str, ignored: usize) -> String {
    format!(
        "listener {listener:?}: {ignored} CRL distribution point(s) of the client_ca certificates are not fetched: \
         at most {} CRL URLs per listener",
        crate::config::MAX_CRL_URLS
    )
}

/// Every certificate file a generation needs, loaded, and the shared rate limit's redis client
/// built from its files: the part of building a generation that can fail.
pub(crate) struct Loaded {
    /// With `[reload] watch`: the files' fingerprint, taken before any of them is read.
    fingerprint: crate::config::files::Fingerprint,
    listeners: Vec<Option<Certificates>>,
    upstreams: Vec<Option<Arc<crate::tls::UpstreamTls>>>,
    redis: Option<redis::Client>,
    certificates: Vec<Expiry>,
    /// The fetched CRLs the listeners' verifiers were made with (shared by every generation).
    fetched: Arc<FetchedCrls>,
    /// The Workload API's last delivery (shared by every generation), and the one the
    /// `source = "spiffe"` sides were built with.
    workload: Arc<WorkloadTable>,
    material: Option<Arc<Material>>,
}

impl Loaded {
    /// What `current` was loaded with, to build it again (with other discovered backends)
    /// without reading any file: the same TLS settings, session caches and redis client.
    pub(crate) fn reuse(current: &State) -> Loaded {
        let config = &current.config;
        Loaded {
            fingerprint: current.loaded.clone(),
            listeners: config
                .listeners
                .iter()
                .map(|l| {
                    current
                        .listener(&l.name)
                        .and_then(|x| x.tls.as_ref().map(ListenerTls::loaded))
                })
                .collect(),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| current.upstream(&u.name).and_then(|x| x.tls.clone()))
                .collect(),
            redis: match &current.global_limiter {
                Some(Limiter::Cluster(cluster)) => Some(cluster.client()),
                _ => None,
            },
            certificates: current.certificates.clone(),
            fetched: Arc::clone(&current.fetched_crls),
            workload: Arc::clone(&current.workload),
            material: current.workload_material.clone(),
        }
    }

    /// What `current` was loaded with, its listeners' client trust made again with the CRLs
    /// fetched now (in-memory material: no certificate, key or CRL file is read again; only the
    /// report of deadlines reads the certificates' dates): a fetched CRL takes effect the way a
    /// reload's would, closing the open connections it revokes.
    pub(crate) fn refresh(current: &State) -> Loaded {
        let mut loaded = Loaded::reuse(current);
        loaded.apply_workload(&current.config);
        loaded.apply_fetched(&current.config, false);
        loaded
    }

    /// With a Workload API delivery newer than the one the `source = "spiffe"` sides were built
    /// with, builds them again from it. A side the new material cannot serve (its SVID gone, a
    /// bundle unusable) keeps its previous configuration, and the error is logged.
    fn apply_workload(&mut self, config: &Config) {
        let Some(material) = self.workload.current() else {
            return;
        };
        if self.material.as_ref().is_some_and(|m| Arc::ptr_eq(m, &material)) {
            return;
        }
        for (l, slot) in config.listeners.iter().zip(&mut self.listeners) {
            let Some(tls) = l.tls.as_ref().filter(|t| t.source.is_spiffe()) else {
                continue;
            };
            match crate::tls::svid::server_configs(tls, &material) {
                Ok(certificates) => *slot = Some(certificates),
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "the Workload API's new material cannot be served; the previous certificate stays")
                }
            }
        }
        for (u, slot) in config.upstreams.iter().zip(&mut self.upstreams) {
            let Some(tls) = u.tls.as_ref().filter(|t| t.source.is_spiffe()) else {
                continue;
            };
            match crate::tls::svid::client_config(tls, &material) {
                Ok(upstream) => *slot = Some(Arc::new(upstream)),
                Err(e) => {
                    tracing::error!(upstream = %u.name, error = %e, "the Workload API's new material cannot be used; the previous client certificate stays")
                }
            }
        }
        self.material = Some(material);
    }

    /// Applies the fetched CRLs to every listener with `crl_urls` (after looking in
    /// `crl_cache_dir` for URLs without one, if `restore`), and reports their `nextUpdate`.
    fn apply_fetched(&mut self, config: &Config, restore: bool) {
        let mut applied = false;
        for (l, certificates) in config.listeners.iter().zip(&mut self.listeners) {
            let (Some(tls), Some(certificates)) = (&l.tls, certificates.as_mut()) else {
                continue;
            };
            let Some(fetch) = &tls.crl_fetch else { continue };
            if restore {
                fetched::restore_cached(&l.name, fetch, certificates, &self.fetched);
            }
            fetched::apply(&l.name, tls, fetch, certificates, &self.fetched);
            applied = true;
        }
        if applied {
            // The fetched CRLs' nextUpdate, in place of the file's alone.
            let fresh = crate::tls::expiry::of(config, &self.listeners);
            self.certificates.retain(|c| c.kind != "crl_next_update");
            self.certificates
                .extend(fresh.into_iter().filter(|c| c.kind == "crl_next_update"));
        }
    }
}

/// Loads every file of `config`, with no CRL fetched and nothing from the Workload API.
#[cfg(test)]
pub(crate) fn load(config: &Config) -> Result<Loaded, ServerError> {
    load_with(config, &Arc::default(), &Arc::default())
}

/// Loads every file of `config` and applies the CRLs `fetched` holds for it (see [`Loaded`]);
/// `source = "spiffe"` sides are made of the Workload API material `workload` holds.
pub(crate) fn load_with(
    config: &Config,
    fetched: &Arc<FetchedCrls>,
    workload: &Arc<WorkloadTable>,
) -> Result<Loaded, ServerError> {
    let material = workload.current();
    let delivered = || material.as_deref().ok_or(crate::tls::TlsError::NotDelivered);
    let fingerprint = match config.reload.watch {
        true => crate::config::files::fingerprint(&config.files()),
        false => Vec::new(),
    };
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| match &u.tls {
            Some(t) if t.source.is_spiffe() => delivered()
                .and_then(|m| crate::tls::svid::client_config(t, m))
                .map(|tls| Some(Arc::new(tls)))
                .map_err(|source| ServerError::UpstreamTls {
                    upstream: u.name.clone(),
                    source,
                }),
            Some(t) => crate::tls::client_config(t)
                .map(|tls| Some(Arc::new(tls)))
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
            Some(t) => match t.source.is_spiffe() {
                true => delivered().and_then(|m| crate::tls::svid::server_configs(t, m)),
                false => crate::tls::server_configs(t),
            }
            .map(Some)
            .map_err(|source| ServerError::Tls {
                listener: l.name.clone(),
                source,
            }),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let redis = match config.rate_limit.as_ref().and_then(|r| r.shared.as_ref()) {
        Some(shared) => Some(crate::ratelimit::cluster::redis_client(shared)?),
        None => None,
    };
    let certificates = crate::tls::expiry::of(config, &listeners);
    let mut loaded = Loaded {
        fingerprint,
        listeners,
        upstreams,
        redis,
        certificates,
        fetched: Arc::clone(fetched),
        workload: Arc::clone(workload),
        material,
    };
    loaded.apply_fetched(config, true);
    Ok(loaded)
}

impl State {
    /// Builds a generation from a validated config and its loaded TLS settings, taking over what
    /// stays from `previous`, with the backends of discovering upstreams from `discovered`.
    /// Infallible: everything that can fail happened before, so a failed reload never touches
    /// the running generation's pools.
    pub(crate) fn assemble(
        config: &Config,
        loaded: Loaded,
        addrs: Vec<(String, SocketAddr)>,
        previous: Option<&State>,
        generation: u64,
        discovered: Arc<Discovered>,
    ) -> State {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .zip(loaded.upstreams)
            .map(|(u, tls)| {
                let previous = previous.and_then(|p| p.upstream(&u.name)).map(|u| &**u);
                let found = match &u.discover {
                    Some(target) => discovered.addrs(&u.name, &target.to_string()),
                    None => Vec::new(),
                };
                Arc::new(Upstream::new(u, tls, previous, &found))
            })
            .collect();
        let authorization = Arc::new(Authorization::new(&config.authorization));
        let reloads = previous.map_or_else(Default::default, |p| Arc::clone(&p.reloads));
        let epoch = Instant::now();
        let ratelimit_backend_errors =
            previous.map_or_else(Default::default, |p| Arc::clone(&p.ratelimit_backend_errors));
        let global_limiter = config.rate_limit.as_ref().map(|r| {
            // A reload takes over the counts (see `RateLimiter::carry_over`).
            let previous = previous.and_then(|p| p.global_limiter.as_ref());
            match (&r.shared, loaded.redis) {
                (Some(shared), Some(client)) => Limiter::Cluster(Arc::new(ClusterLimiter::new(
                    r.policy.clone(),
                    shared,
                    client,
                    epoch,
                    Arc::clone(&ratelimit_backend_errors),
                    previous.and_then(|l| match l {
                        Limiter::Cluster(cluster) => Some(&**cluster),
                        Limiter::Local(_) => None,
                    }),
                ))),
                // `load` builds a client exactly when there is `[rate_limit.shared]`.
                _ => Limiter::Local(RateLimiter::carry_over(
                    previous.map(Limiter::open_counts),
                    r.policy.clone(),
                    epoch,
                )),
            }
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
        let identities = previous.map_or_else(Default::default, |p| Arc::clone(&p.identities));
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
            let limiter = listener_limiter(
                l.rate_limit.as_ref(),
                global_limiter.as_ref(),
                old.and_then(|o| o.own_limiter.as_ref()),
                epoch,
            );
            let own_limiter = match (&l.rate_limit, &limiter) {
                (Some(ListenerLimit::Own(_)), Some(Limiter::Local(own))) => Some(own.clone()),
                _ => None,
            };
            listeners.push(Arc::new(Listener {
                name: l.name.clone(),
                bind,
                upstream,
                tls: l.tls.as_ref().zip(tls).map(|(settings, loaded)| {
                    // An entry's own table, built as the listener's own is below.
                    ListenerTls::new(settings, loaded, |own| {
                        Arc::new(Authorization::new(&own.inheriting_deny(&config.authorization)))
                    })
                }),
                mutual_tls: l.tls.as_ref().is_some_and(TlsConfig::verifies_clients),
                sni: l
                    .sni
                    .iter()
                    .filter_map(|(n, u)| Some((n.clone(), find(u)?)))
                    .collect(),
                alpn_routes: l
                    .alpn_routes
                    .iter()
                    .filter_map(|(p, u)| Some((p.as_bytes().to_vec(), find(u)?)))
                    .collect(),
                alpn_required: l.tls.as_ref().is_some_and(|t| t.alpn_required),
                handshake_timeout: l.handshake_timeout,
                accept_proxy_protocol: l.accept_proxy_protocol,
                authorization: match &l.authorization {
                    Some(own) => Arc::new(Authorization::new(&own.inheriting_deny(&config.authorization))),
                    None => Arc::clone(&authorization),
                },
                limiter,
                own_limiter,
                reject_response: l.reject_response.clone(),
                accepted: old.map_or_else(Default::default, |o| Arc::clone(&o.accepted)),
                rejected: old.map_or_else(Default::default, |o| Arc::clone(&o.rejected)),
                shadow: old.map_or_else(Default::default, |o| Arc::clone(&o.shadow)),
                handshake_failures: old.map_or_else(Default::default, |o| Arc::clone(&o.handshake_failures)),
                figures: old.map_or_else(Default::default, |o| Arc::clone(&o.figures)),
                identities: Arc::clone(&identities),
                identity_rule: crate::identity::Rule {
                    from_common_name: l.tls.as_ref().is_none_or(|t| t.identity_from_cn),
                },
                close_on_expiry: l.tls.as_ref().is_some_and(|t| t.close_on_expiry),
                trusted_proxies: l.trusted_proxies.clone(),
                allow_from: l.allow_from.clone(),
                deny_from: l.deny_from.clone(),
                idle_timeout: l.idle_timeout,
                half_closed_timeout: l.half_closed_timeout,
                max_lifetime: l.max_lifetime,
                max_lifetime_jitter: l.max_lifetime_jitter,
                tcp_keepalive: l.tcp_keepalive,
                max_connections: l.max_connections,
                max_handshakes_per_source: l.max_handshakes_per_source,
                prefixes: config.source_prefixes,
                open: old.map_or_else(Default::default, |o| Arc::clone(&o.open)),
                handshakes: old.map_or_else(Default::default, |o| Arc::clone(&o.handshakes)),
                reject_log: Default::default(),
                access_log: access_log.clone(),
                access_log_interim: config.access_log_interim,
            }));
        }
        let nofile = crate::caps::open_file_limit().unwrap_or(1024);
        let max_connections = config
            .max_connections
            .unwrap_or_else(|| crate::caps::default_max_connections(nofile));
        State {
            generation,
            listeners,
            upstreams,
            drain_timeout: config.drain_timeout,
            max_connections,
            max_pipes: crate::caps::pipe_budget(nofile, max_connections),
            global_limiter,
            admin: config.admin.clone(),
            reload: config.reload.clone(),
            files: config.files(),
            loaded: loaded.fingerprint,
            reloads,
            ratelimit_backend_errors,
            quarantine: previous.map_or_else(Default::default, |p| Arc::clone(&p.quarantine)),
            started: previous.map_or_else(Instant::now, |p| p.started),
            draining: AtomicBool::new(false),
            access_log,
            config: Arc::new(config.clone()),
            discovered,
            identities,
            certificates: loaded.certificates,
            fetched_crls: loaded.fetched,
            workload: loaded.workload,
            workload_material: loaded.material,
        }
    }
}

/// The limiter counting a listener's clients: the one global limiter, or one of its own (taking
/// over the counts of `previous`, the listener's own limiter before the reload).
fn listener_limiter(
    limit: Option<&ListenerLimit>,
    global: Option<&Limiter>,
    previous: Option<&RateLimiter>,
    epoch: Instant,
) -> Option<Limiter> {
    match limit? {
        // Config validation gives a listener `Global` only when there is a `[rate_limit]`.
        ListenerLimit::Global(_) => global.cloned(),
        ListenerLimit::Own(policy) => Some(Limiter::Local(RateLimiter::carry_over(
            previous,
            policy.clone(),
            epoch,
        ))),
    }
}
