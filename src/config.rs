//! Configuration: TOML text -> raw serde structs -> a validated, fully typed [`Config`].
//!
//! This module owns every rule about what a valid configuration is, and the wording of the errors
//! an operator sees for a bad one (file, key, bad value). It is pure: it never opens sockets, never
//! resolves host names and reads no file except the one [`Config::load`] is given and the secret
//! files it names, `[rate_limit.shared] password_file` and `[admin] token_file`, each refused if
//! group or others may read it (certificate files are loaded by `tls`; [`Config::files`] lists
//! them and `files.rs` hashes their bytes for `[reload] watch`, without parsing them). `fulcrum
//! check` and `fulcrum run` both go through [`Config::load`], so they can never disagree. A Redis
//! password never leaves here in text: [`Secret`] and [`SharedRateLimitConfig`] redact it in Debug,
//! and errors echo a URL only with its password replaced.
//!
//! This file holds the load pipeline ([`Config::load`], [`Config::from_toml`], the `Validator`'s
//! entry point), the [`Config`] itself and the small top-level sections (`drain_timeout`,
//! `[runtime]`, `[access_log]`, `[reload]`, `max_connections`). Each larger section has a file of
//! its own holding its typed structs, its raw tables and the `impl Validator` block that turns one
//! into the other: `listener.rs`, `upstream.rs` (with `[dns]`), `ratelimit.rs`, `admin.rs`,
//! `authorization.rs`. Below them, `values.rs` has the `Validator`, [`ConfigError`] and the value
//! parsers they share; above this file, `files.rs` reads a loaded [`Config`] for the files it is
//! made of and their fingerprint. Every public item but those of `files` is re-exported here, at
//! `crate::config::X`, so a section file never has to be named from outside. Addresses and
//! prefixes ([`IpNet`], [`SourcePrefixes`]) belong to `crate::addr`, re-exported here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod admin;
mod authorization;
mod certificate;
mod crl_fetch;
mod dns;
pub(crate) mod files;
mod health_check;
mod key_exchange;
mod listener;
mod listener_tls;
mod log;
mod ratelimit;
mod schema;
mod spiffe;
mod upstream;
mod values;

pub use crate::addr::{IpNet, SourcePrefixes, DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX};
pub use admin::AdminConfig;
pub use authorization::AuthorizationConfig;
pub use certificate::{select, CertificateConfig, ServerName, TrustFiles};
pub use crl_fetch::{
    crl_url, CrlFetch, DEFAULT_CRL_MAX_SIZE, DEFAULT_CRL_REFRESH, DEFAULT_CRL_TIMEOUT, MAX_CRL_URLS,
    MIN_CRL_REFRESH,
};
pub use dns::DnsConfig;
pub use health_check::{
    HealthCheckConfig, OnDown, DEFAULT_HEALTH_FALL, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_RISE,
    DEFAULT_HEALTH_TIMEOUT,
};
pub use key_exchange::{KeyExchange, KxGroup, DEFAULT_KEY_EXCHANGE};
pub use listener::{
    ListenerConfig, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
pub use listener_tls::{TlsConfig, TlsVersion, DEFAULT_SESSION_CACHE, DEFAULT_SESSION_TIMEOUT};
pub use log::{LogConfig, LogFormat};
pub use ratelimit::{
    redact_url, ListenerLimit, OnUnavailable, RateLimitConfig, RateLimitPolicy, RedisTlsConfig,
    SharedConcurrency, SharedRateLimitConfig, DEFAULT_MAX_CLIENTS, DEFAULT_SHARED_KEY_PREFIX,
    DEFAULT_SHARED_TIMEOUT,
};
pub use spiffe::{SpiffeConfig, TlsSource, DEFAULT_SPIFFE_STARTUP_TIMEOUT};
pub use upstream::{
    BackendConfig, Discover, UpstreamAlpn, UpstreamConfig, UpstreamTlsConfig, DEFAULT_CONNECT_ATTEMPTS,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_DISCOVER_INTERVAL, DEFAULT_DISCOVER_MAX_BACKENDS, DEFAULT_QUEUE_TIMEOUT,
    MAX_QUEUE_SIZE,
};
pub use values::{BackendAddr, ConfigError, Keepalive, Secret, MAX_DURATION};

use admin::RawAdmin;
use dns::RawDns;
use listener::RawListener;
use ratelimit::RawRateLimit;
use upstream::RawUpstream;
use values::Validator;

// The tests (`use super::*`) name it from here, as when every section was in this file.
#[cfg(test)]
use std::net::SocketAddr;

/// Default time open connections get to finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on `[runtime] workers`.
pub const MAX_WORKERS: usize = 1024;
/// Default `[reload] debounce`: quiet time after a watched file changes before reloading.
pub const DEFAULT_WATCH_DEBOUNCE: Duration = Duration::from_secs(1);

/// `[runtime] scheduler`: how worker threads share connections (with more than one worker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// `"shared"` (the default): one multi-threaded runtime; an idle worker takes tasks from a
    /// busy one, so a few long heavy streams spread over every worker.
    #[default]
    Shared,
    /// `"per_worker"`: each worker is a thread with a single-threaded runtime and an accept queue
    /// of its own (an `SO_REUSEPORT` socket per listener); a connection stays on the worker that
    /// accepted it (no stealing, no wake-ups across threads). More short connections per
    /// CPU-second and a shorter tail, but streams the kernel's hash puts on one worker stay there.
    PerWorker,
}

/// A validated configuration. Every field is typed and checked; the running server never meets
/// an unresolved name or an unparsed string. It is obtained only from [`Config::load`] or
/// [`Config::from_toml`] (a private field keeps code outside this module from assembling one
/// unchecked); a library user may still adjust a loaded one's fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from, for messages (a path, or `<inline>`).
    pub origin: String,
    /// The file it was loaded from, re-read on reload (`None` for configs built in code).
    pub path: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub admin: Option<AdminConfig>,
    /// How long open connections may keep running after a shutdown signal.
    pub drain_timeout: Duration,
    /// `[runtime] workers`: threads serving connections; `None` means one per core.
    pub workers: Option<std::num::NonZeroUsize>,
    /// `[runtime] scheduler`: how those threads share the connections.
    pub scheduler: Scheduler,
    /// Identity -> upstreams it may reach (default deny). Upstream names are validated.
    pub authorization: AuthorizationConfig,
    /// Global per-client limits; `None` means no limiting (unless a listener sets its own).
    pub rate_limit: Option<RateLimitConfig>,
    /// `[access_log]`: one JSON line per closed connection; `None` writes none.
    pub access_log: Option<AccessLogConfig>,
    /// `[access_log] interim`: an interim entry (bytes so far) for every this long a connection
    /// stays open; `None` (the default) writes none.
    pub access_log_interim: Option<Duration>,
    /// `[reload]`: reloading by itself when a file changes.
    pub reload: ReloadConfig,
    /// `max_connections`: open client connections for the whole process (the admin listener's
    /// excepted); `None` derives the cap from the open-file limit when the server binds.
    pub max_connections: Option<usize>,
    /// `[rate_limit] ipv4_prefix` / `ipv6_prefix`: how much of a source address names a client
    /// for every per-source key (rate limit, concurrency cap, handshake limit).
    pub source_prefixes: SourcePrefixes,
    /// `[dns]`: how `discover` names are resolved.
    pub dns: DnsConfig,
    /// `[spiffe]`: the Workload API of the TLS sides with `source = "spiffe"`.
    pub spiffe: SpiffeConfig,
    /// `[log]`: how the process's log lines are written (read at startup only).
    pub log: LogConfig,
    /// Proof of validation: only this module makes a `Config`.
    _validated: Validated,
}

/// The private mark of a [`Config`] made by validation.
#[derive(Clone, Copy, Debug)]
struct Validated;

/// `[reload]`: whether fulcrum reloads by itself when the config file or a file it names changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadConfig {
    /// `watch`: reload, exactly as SIGHUP does, when a watched file changes (default off).
    pub watch: bool,
    /// `debounce`: how long the files must stay unchanged before the reload, so that a set of
    /// files written one after the other is applied once.
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: false,
            debounce: DEFAULT_WATCH_DEBOUNCE,
        }
    }
}

/// `[access_log]`: where the per-connection JSON lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogConfig {
    /// `path = "stdout"`.
    Stdout,
    /// Any other `path`, resolved against the config file's directory; appended to, created if
    /// missing.
    File(PathBuf),
}
impl Config {
    /// Reads and validates a TOML file. The single entry point of `fulcrum run` and `fulcrum check`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut config = Config::parse(&text, &path.display().to_string(), base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in error messages. Relative file paths
    /// in it are taken as they are (relative to the working directory).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse(text, origin, Path::new(""))
    }

    fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_string(),
            message: syntax_message(text, &e),
        })?;
        Validator { origin, base }.config(raw)
    }

    /// Worker threads to run: `[runtime] workers`, else one per available core.
    pub fn workers(&self) -> usize {
        self.workers
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, |n| n.get())
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Whether a listener or an upstream takes its TLS material from the Workload API.
    pub fn uses_spiffe(&self) -> bool {
        let listeners = self
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .map(|t| &t.source);
        let upstreams = self
            .upstreams
            .iter()
            .filter_map(|u| u.tls.as_ref())
            .map(|t| &t.source);
        listeners.chain(upstreams).any(TlsSource::is_spiffe)
    }
}

/// The message for a TOML syntax error: toml's own, which quotes the offending line, unless that
/// line may hold a secret (a URL with a password, a `password`/`token`/`secret` key): then only
/// where and what, so that no secret reaches a terminal, a log or a `POST /reload` answer.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let full = e.to_string().trim_end().to_string();
    let Some(span) = e.span() else {
        return full;
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[start..end];
    let lower = line.to_ascii_lowercase();
    let secret = (lower.contains("://") && lower.contains('@'))
        || ["password", "token", "secret"].iter().any(|k| lower.contains(k));
    if !secret {
        return full;
    }
    let line_number = text[..start].matches('\n').count() + 1;
    format!(
        "TOML parse error at line {line_number}: {} (the line is not shown: it may hold a secret)",
        e.message().trim_end()
    )
}

/// The JSON Schema (draft 2020-12) of a config file, as `docs/fulcrum.schema.json` holds it: made
/// by `schema.rs` from `RawConfig` and the tables under it.
pub fn config_schema() -> serde_json::Value {
    schema::of::<RawConfig>()
}

/// A fulcrum configuration file (docs/configuration.md).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Duration: after SIGTERM/SIGINT, how long open connections may finish.
    #[schemars(extend("default" = "30s"))]
    drain_timeout: Option<String>,
    /// `[runtime]`: the threads serving connections.
    runtime: Option<RawRuntime>,
    /// `[[listener]]`: at least one.
    #[serde(default)]
    #[schemars(length(min = 1))]
    listener: Vec<RawListener>,
    /// `[[upstream]]`: the backend groups listeners serve.
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    /// `[admin]`: the admin API.
    admin: Option<RawAdmin>,
    /// `[authorization]`: which client identities may reach which upstreams; default deny.
    #[serde(default)]
    #[schemars(with = "authorization::AuthorizationTable")]
    authorization: authorization::RawAuthorization,
    /// `[rate_limit]`: per-client limits.
    rate_limit: Option<RawRateLimit>,
    /// `[access_log]`: one JSON line per closed connection.
    access_log: Option<RawAccessLog>,
    /// `[reload]`: reloading by itself when a file changes.
    reload: Option<RawReload>,
    /// Open client connections of the whole process (the admin API's excepted), at least 1;
    /// default derived from the open-file limit.
    #[schemars(range(min = 1))]
    max_connections: Option<usize>,
    /// `[dns]`: how `discover` names are resolved.
    dns: Option<RawDns>,
    /// `[spiffe]`: the SPIFFE Workload API.
    spiffe: Option<spiffe::RawSpiffe>,
    /// `[log]`: how the process's own log lines are written (not the access log).
    log: Option<log::RawLog>,
}

/// `[reload]`: reloading by itself when a file changes.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawReload {
    /// Reload, exactly as SIGHUP does, when the config or a file it names changes.
    #[schemars(extend("default" = false))]
    watch: Option<bool>,
    /// Duration the files must stay unchanged before such a reload.
    #[schemars(extend("default" = "1s"))]
    debounce: Option<String>,
}

/// `[access_log]`: one JSON line per closed connection.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    /// "stdout" or a file path (appended to, created if missing).
    #[schemars(length(min = 1))]
    path: String,
    /// Duration of at least 1s: an interim entry (bytes so far) for every this long a
    /// connection stays open; "0s" or absent: none.
    interim: Option<String>,
}

/// `[runtime]`: the threads serving connections.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    /// Threads serving connections, 1 to 1024 (1 runs a single-threaded runtime); default one
    /// per core.
    #[schemars(range(min = 1, max = 1024))]
    workers: Option<usize>,
    /// How the workers share connections: "shared" (the default: one multi-threaded runtime, an
    /// idle worker takes work from a busy one) or "per_worker" (each worker its own
    /// single-threaded runtime and accept queue; a connection stays where it was accepted).
    /// Read at startup.
    #[schemars(extend("enum" = ["shared", "per_worker"]))]
    scheduler: Option<String>,
}

impl Validator<'_> {
    /// The entry point: every section validated into its typed form, in this order (so that an
    /// error is always the first one in it): `[runtime]`, `drain_timeout`, `[rate_limit]`,
    /// `[dns]`, `[spiffe]`, the upstreams, the listeners (which name upstreams), `[authorization]`,
    /// `[admin]`, `[access_log]`, `[reload]`, `max_connections`, `[log]`.
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let workers = match raw.runtime.as_ref().and_then(|r| r.workers) {
            Some(n) if !(1..=MAX_WORKERS).contains(&n) => {
                return Err(self.invalid("runtime.workers", n, format!("must be 1 to {MAX_WORKERS}")))
            }
            Some(n) => std::num::NonZeroUsize::new(n),
            None => None,
        };
        let scheduler = match raw.runtime.as_ref().and_then(|r| r.scheduler.as_deref()) {
            None | Some("shared") => Scheduler::Shared,
            Some("per_worker") => Scheduler::PerWorker,
            Some(other) => {
                return Err(self.invalid(
                    "runtime.scheduler",
                    other,
                    "expected \"shared\" or \"per_worker\"",
                ))
            }
        };
        let drain_timeout = match &raw.drain_timeout {
            Some(text) => self.duration("drain_timeout", text)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let source_prefixes = match &raw.rate_limit {
            Some(r) => self.source_prefixes(r)?,
            None => SourcePrefixes::default(),
        };
        let rate_limit = match raw.rate_limit {
            Some(r) => Some(self.rate_limit(r)?),
            None => None,
        };
        let dns = self.dns(raw.dns)?;
        let spiffe = self.spiffe(raw.spiffe)?;
        let upstreams = self.upstreams(raw.upstream)?;
        let listeners = self.listeners(raw.listener, &upstreams, &rate_limit)?;
        let authorization = self.authorization("authorization", raw.authorization, &upstreams)?;
        let admin = match raw.admin {
            Some(a) => Some(self.admin(a)?),
            None => None,
        };
        let access_log_interim = match raw.access_log.as_ref().and_then(|a| a.interim.as_deref()) {
            Some(text) => match self.duration_or_off("access_log.interim", text)? {
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(self.invalid(
                        "access_log.interim",
                        text,
                        "must be at least 1s (or \"0s\" for none)",
                    ))
                }
                other => other,
            },
            None => None,
        };
        let access_log = match raw.access_log {
            Some(a) => Some(self.access_log(a)?),
            None => None,
        };
        let reload = match raw.reload {
            Some(r) => ReloadConfig {
                watch: r.watch.unwrap_or(false),
                debounce: match &r.debounce {
                    Some(text) => self.duration("reload.debounce", text)?,
                    None => DEFAULT_WATCH_DEBOUNCE,
                },
            },
            None => ReloadConfig::default(),
        };
        let max_connections = match raw.max_connections {
            Some(0) => return Err(self.invalid("max_connections", 0, "must be at least 1")),
            other => other,
        };
        let log = self.log(raw.log)?;
        Ok(Config {
            origin: self.origin.to_string(),
            path: None,
            listeners,
            upstreams,
            admin,
            drain_timeout,
            workers,
            scheduler,
            authorization,
            rate_limit,
            access_log,
            access_log_interim,
            reload,
            max_connections,
            source_prefixes,
            dns,
            spiffe,
            log,
            _validated: Validated,
        })
    }

    fn access_log(&self, raw: RawAccessLog) -> Result<AccessLogConfig, ConfigError> {
        match raw.path.as_str() {
            "" => Err(self.invalid("access_log.path", "", "expected \"stdout\" or a file path")),
            "stdout" => Ok(AccessLogConfig::Stdout),
            path => Ok(AccessLogConfig::File(self.base.join(path))),
        }
    }
}

#[cfg(test)]
mod tests;
