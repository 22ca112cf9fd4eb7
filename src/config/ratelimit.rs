//! The `[rate_limit]` section: the global [`RateLimitPolicy`] and where it is counted
//! (`[rate_limit.shared]`, Redis, with its TLS and its `password_file`), the source prefixes
//! that name a client, a listener's own `[listener.rate_limit]` settled over the global one
//! ([`ListenerLimit`]), and [`redact_url`], the only form in which a Redis URL may be shown.
//!
//! A Redis password never leaves here in text: [`SharedRateLimitConfig`] redacts it in Debug and
//! errors echo the URL only redacted. This file decides what a valid limit is; it must not count
//! anything (the `ratelimit` module does) nor dial Redis.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::values::{ConfigError, Secret, Validator};
use crate::addr::{SourcePrefixes, DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX};

/// Default bound on clients tracked by a rate limiter.
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;
/// Default `[rate_limit.shared] key_prefix`.
pub const DEFAULT_SHARED_KEY_PREFIX: &str = "fulcrum:rl:";
/// Default `[rate_limit.shared] timeout`: the budget for one limiter round trip to Redis.
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(50);
/// Default `[rate_limit.shared] concurrency_lease`: how long a killed instance's concurrency
/// slots stay taken.
const DEFAULT_CONCURRENCY_LEASE: Duration = Duration::from_secs(10);
/// The shortest `concurrency_lease`: a shorter one would refresh every record more than three
/// times a second.
const MIN_CONCURRENCY_LEASE: Duration = Duration::from_secs(1);

/// A per-client connection limit, as a limiter enforces it: the global `[rate_limit]`, or a
/// listener's own (its `capacity`/`window` over the global rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// New connections admitted per client per window. 0 rejects everything.
    pub capacity: u32,
    /// Length of one fixed window. Non-zero once validated; a limiter given a zero window treats
    /// it as one nanosecond rather than panicking.
    pub window: Duration,
    /// Open connections allowed per client at once; `None` means no concurrency cap.
    pub max_concurrent: Option<u32>,
    /// Upper bound on tracked client keys, so memory stays bounded under a flood of new clients.
    pub max_clients: usize,
    /// Identity -> capacity (`[rate_limit.clients]`), replacing `capacity` for that identity.
    /// Never applies to IP keys.
    pub overrides: HashMap<String, u32>,
}

/// The global `[rate_limit]`: its policy, and where it is counted.
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    pub policy: RateLimitPolicy,
    /// `[rate_limit.shared]`: count in Redis across instances; `None` counts per instance.
    pub shared: Option<SharedRateLimitConfig>,
}

/// How a listener's connections are limited, settled when the config is validated: a
/// `[listener.rate_limit]` of its own wins over the global `[rate_limit]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerLimit {
    /// Counted by the one global limiter, together with every other listener without a limit of
    /// its own (and across instances with `[rate_limit.shared]`). Holds the global policy.
    Global(RateLimitPolicy),
    /// Counted by a limiter of this listener alone, in this instance.
    Own(RateLimitPolicy),
}

impl ListenerLimit {
    /// The policy enforced on this listener's clients.
    pub fn policy(&self) -> &RateLimitPolicy {
        match self {
            ListenerLimit::Global(policy) | ListenerLimit::Own(policy) => policy,
        }
    }
}

/// `[rate_limit.shared]`: the global limit counted in Redis, summed over every instance.
/// Its Debug output shows the URL with any password replaced, and never `password`.
#[derive(Clone)]
pub struct SharedRateLimitConfig {
    /// A `redis://` or `rediss://` (TLS) URL: host, port, database, optional user name, and the
    /// password unless `password` is set. Validated to parse.
    pub redis: String,
    /// Read from `password_file`; given, the URL carries no password (validated).
    pub password: Option<Secret>,
    /// `[rate_limit.shared.tls]`; only with `rediss://` (validated). `rediss://` without it
    /// verifies Redis against the system's roots.
    pub tls: Option<RedisTlsConfig>,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Budget for one round trip (dial included); past it `on_unavailable` applies.
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// Where `password` was read from (watched with `[reload] watch`).
    pub password_file: Option<PathBuf>,
    /// `shared_concurrency = true`: `max_concurrent` counted over every instance too.
    pub concurrency: Option<SharedConcurrency>,
}

/// `shared_concurrency`: the global `max_concurrent` held by the sum of the instances, each
/// leasing its slots from Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedConcurrency {
    /// `[rate_limit] max_concurrent`.
    pub max_concurrent: u32,
    /// `concurrency_lease`: how long Redis keeps an instance's slots without a refresh (an
    /// instance refreshes every third of it), so a dead instance's slots come back within it.
    pub lease: Duration,
}

impl fmt::Debug for SharedRateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRateLimitConfig")
            .field("redis", &redact_url(&self.redis))
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .field("password_file", &self.password_file)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// `[rate_limit.shared.tls]`: how fulcrum verifies Redis, and the certificate it presents.
/// Paths resolve against the config file's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTlsConfig {
    /// PEM CA bundle trusted instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for a Redis with `tls-auth-clients yes` (both or neither).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// `url` with the password of its `user:password@` part, if any, replaced by `***`: the form in
/// which a Redis URL may appear in errors and Debug output. Works on unparsable text too: a
/// password may hold `/`, `?`, `#` or `@`, so the user information is taken to end at the
/// *last* `@` (and the authority at the first `/`, `?` or `#` after it); a URL with an `@` in
/// its path or query is then redacted further than needed, never less.
pub fn redact_url(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    let password_start = after_scheme + colon + 1;
    format!("{}***{}", &url[..password_start], &url[after_scheme + at..])
}

/// What the shared limiter does when Redis is unreachable, slow or failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Fall back to this instance's own limiter (same capacity, counted locally).
    Local,
    /// Admit the connection (concurrency caps still apply).
    Allow,
    /// Refuse the connection as rate limited.
    Deny,
}

/// `[rate_limit]`: per-client limits for every listener; without it (and without listener
/// overrides) nothing is limited.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    // Optional only so that a lone `[rate_limit.shared]` gets a clear message.
    /// New connections per client per window.
    #[schemars(required)]
    capacity: Option<u32>,
    /// Duration of the window `capacity` counts over.
    #[schemars(required)]
    window: Option<String>,
    /// Open connections per client at once; default none.
    max_concurrent: Option<u32>,
    /// Bound on tracked clients; at least 1.
    #[schemars(range(min = 1), extend("default" = 100000))]
    max_clients: Option<usize>,
    /// Identity -> its own capacity, in place of `capacity`.
    #[serde(default)]
    clients: HashMap<String, u32>,
    /// `[rate_limit.shared]`: count the limit across instances in Redis.
    shared: Option<RawSharedRateLimit>,
    /// How much of an IPv4 source address is one client (for every per-source key); 1 to 32.
    #[schemars(range(min = 1, max = 32), extend("default" = 32))]
    ipv4_prefix: Option<u8>,
    /// How much of an IPv6 source address is one client (for every per-source key); 1 to 128.
    #[schemars(range(min = 1, max = 128), extend("default" = 64))]
    ipv6_prefix: Option<u8>,
}

/// `[rate_limit.shared]`: the limit counted across instances in Redis; needs `[rate_limit]` with
/// `capacity` and `window`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawSharedRateLimit {
    /// `redis://` or `rediss://` (TLS) URL, user name and database in it; `#insecure` refused.
    redis: String,
    /// File holding the Redis AUTH password, of fulcrum's own (mode rule as `[admin]
    /// token_file`); not with a password in the URL.
    password_file: Option<PathBuf>,
    /// `[rate_limit.shared.tls]`: only with `rediss://`; without it Redis is checked against the
    /// system roots.
    tls: Option<RawRedisTls>,
    /// Prefix of every key fulcrum writes in Redis.
    #[schemars(extend("default" = "fulcrum:rl:"))]
    key_prefix: Option<String>,
    /// Duration: budget for one limiter round trip, dial included.
    #[schemars(extend("default" = "50ms"))]
    timeout: Option<String>,
    /// What to do when Redis cannot answer in time: fall back to this instance's own limiter,
    /// admit, or refuse.
    #[schemars(extend("default" = "local", "enum" = ["local", "allow", "deny"]))]
    on_unavailable: Option<String>,
    /// `true`: `max_concurrent` counted over the instances too; needs `[rate_limit]
    /// max_concurrent`.
    #[schemars(extend("default" = false))]
    shared_concurrency: Option<bool>,
    /// Duration, at least 1s and more than 3 x `timeout`: a dead instance's slots return within
    /// it; only with `shared_concurrency = true`.
    #[schemars(extend("default" = "10s"))]
    concurrency_lease: Option<String>,
}

/// `[rate_limit.shared.tls]`: TLS to Redis (`rediss://` only).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRedisTls {
    /// PEM file of the CA to trust instead of the system roots.
    ca: Option<PathBuf>,
    /// PEM client certificate chain (Redis `tls-auth-clients yes`), with `key`.
    cert: Option<PathBuf>,
    /// PEM key of `cert`.
    key: Option<PathBuf>,
}

/// `[listener.rate_limit]`: a listener's own limit.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimitOverride {
    /// New connections per client per window; required when there is no global `[rate_limit]`,
    /// else the global one.
    capacity: Option<u32>,
    /// Duration of the window; default the global one, else "1s".
    window: Option<String>,
}

impl Validator<'_> {
    pub(super) fn source_prefixes(&self, r: &RawRateLimit) -> Result<SourcePrefixes, ConfigError> {
        let prefix = |key: &str, value: Option<u8>, max: u8, default: u8| match value {
            Some(p) if p == 0 || p > max => Err(self.invalid(key, p, format!("must be 1 to {max}"))),
            Some(p) => Ok(p),
            None => Ok(default),
        };
        Ok(SourcePrefixes {
            ipv4: prefix("rate_limit.ipv4_prefix", r.ipv4_prefix, 32, DEFAULT_IPV4_PREFIX)?,
            ipv6: prefix("rate_limit.ipv6_prefix", r.ipv6_prefix, 128, DEFAULT_IPV6_PREFIX)?,
        })
    }

    pub(super) fn rate_limit(&self, r: RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
        let capacity = match (r.capacity, &r.shared, &r.window) {
            (Some(c), _, _) => c,
            (None, Some(_), None) => {
                return Err(self.invalid(
                    "rate_limit.shared",
                    "[rate_limit.shared]",
                    "needs [rate_limit] with capacity and window",
                ))
            }
            (None, _, _) => return Err(self.invalid("rate_limit.capacity", "", "required")),
        };
        let window = match &r.window {
            Some(text) => self.duration("rate_limit.window", text)?,
            None => return Err(self.invalid("rate_limit.window", "", "required")),
        };
        let max_clients = match r.max_clients {
            Some(0) => return Err(self.invalid("rate_limit.max_clients", 0, "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_CLIENTS,
        };
        Ok(RateLimitConfig {
            policy: RateLimitPolicy {
                capacity,
                window,
                max_concurrent: r.max_concurrent,
                max_clients,
                overrides: r.clients,
            },
            shared: match r.shared {
                Some(shared) => Some(self.shared_rate_limit(shared, r.max_concurrent)?),
                None => None,
            },
        })
    }

    /// A listener's own policy: its `capacity`/`window` over the global rest (or, without a
    /// global `[rate_limit]`, a 1 s window and no other limit).
    pub(super) fn listener_rate_limit(
        &self,
        key: &dyn Fn(&str) -> String,
        own: RawRateLimitOverride,
        global: &Option<RateLimitConfig>,
    ) -> Result<RateLimitPolicy, ConfigError> {
        let base = match global {
            Some(global) => global.policy.clone(),
            None if own.capacity.is_none() => {
                return Err(self.invalid(
                    key("rate_limit.capacity"),
                    "(missing)",
                    "required when there is no global [rate_limit]",
                ))
            }
            None => RateLimitPolicy {
                capacity: 0,
                window: Duration::from_secs(1),
                max_concurrent: None,
                max_clients: DEFAULT_MAX_CLIENTS,
                overrides: HashMap::new(),
            },
        };
        let window = match &own.window {
            Some(text) => self.duration(&key("rate_limit.window"), text)?,
            None => base.window,
        };
        Ok(RateLimitPolicy {
            capacity: own.capacity.unwrap_or(base.capacity),
            window,
            ..base
        })
    }

    fn shared_rate_limit(
        &self,
        raw: RawSharedRateLimit,
        max_concurrent: Option<u32>,
    ) -> Result<SharedRateLimitConfig, ConfigError> {
        const KEY: &str = "rate_limit.shared.redis";
        // Echoed in errors only without its password.
        let shown = redact_url(&raw.redis);
        let is_tls = raw.redis.starts_with("rediss://");
        if !is_tls && !raw.redis.starts_with("redis://") {
            return Err(self.invalid(KEY, &shown, "expected a redis:// or rediss:// (TLS) URL"));
        }
        let info = match redis::IntoConnectionInfo::into_connection_info(raw.redis.as_str()) {
            Ok(info) => info,
            Err(e) => return Err(self.invalid(KEY, &shown, e.to_string())),
        };
        if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            return Err(self.invalid(
                KEY,
                &shown,
                "#insecure (no certificate verification) is not supported; trust a private CA with \
                 [rate_limit.shared.tls] ca",
            ));
        }
        let password = match raw.password_file {
            None => None,
            Some(_) if info.redis_settings().password().is_some() => {
                return Err(self.invalid(
                    "rate_limit.shared.password_file",
                    &shown,
                    "give the password in the URL or in password_file, not both",
                ))
            }
            Some(path) => Some((self.password_file(&self.base.join(&path))?, self.base.join(path))),
        };
        let (password, password_file) = match password {
            Some((secret, path)) => (Some(secret), Some(path)),
            None => (None, None),
        };
        let tls = match raw.tls {
            None => None,
            Some(_) if !is_tls => {
                return Err(self.invalid(
                    "rate_limit.shared.tls",
                    &shown,
                    "[rate_limit.shared.tls] needs a rediss:// URL",
                ))
            }
            Some(t) => Some(RedisTlsConfig {
                ca: t.ca.map(|ca| self.base.join(ca)),
                client_cert: self.client_cert("rate_limit.shared.tls", t.cert, t.key)?,
            }),
        };
        let timeout = match &raw.timeout {
            Some(text) => self.duration("rate_limit.shared.timeout", text)?,
            None => DEFAULT_SHARED_TIMEOUT,
        };
        let on_unavailable = match raw.on_unavailable.as_deref() {
            None | Some("local") => OnUnavailable::Local,
            Some("allow") => OnUnavailable::Allow,
            Some("deny") => OnUnavailable::Deny,
            Some(other) => {
                return Err(self.invalid(
                    "rate_limit.shared.on_unavailable",
                    other,
                    "expected \"local\", \"allow\" or \"deny\"",
                ))
            }
        };
        let concurrency = self.shared_concurrency(
            raw.shared_concurrency,
            raw.concurrency_lease.as_deref(),
            max_concurrent,
            timeout,
        )?;
        Ok(SharedRateLimitConfig {
            redis: raw.redis,
            password,
            tls,
            key_prefix: raw
                .key_prefix
                .unwrap_or_else(|| DEFAULT_SHARED_KEY_PREFIX.to_owned()),
            timeout,
            on_unavailable,
            password_file,
            concurrency,
        })
    }

    /// `shared_concurrency` and its `concurrency_lease`: only with `[rate_limit] max_concurrent`,
    /// and a lease long enough for three refreshes of at most `timeout` each.
    fn shared_concurrency(
        &self,
        enabled: Option<bool>,
        lease: Option<&str>,
        max_concurrent: Option<u32>,
        timeout: Duration,
    ) -> Result<Option<SharedConcurrency>, ConfigError> {
        const KEY: &str = "rate_limit.shared.concurrency_lease";
        if enabled != Some(true) {
            return match lease {
                Some(text) => Err(self.invalid(KEY, text, "only with shared_concurrency = true")),
                None => Ok(None),
            };
        }
        let Some(max_concurrent) = max_concurrent else {
            return Err(self.invalid(
                "rate_limit.shared.shared_concurrency",
                true,
                "needs [rate_limit] max_concurrent (the cap to share)",
            ));
        };
        let (text, lease) = match lease {
            Some(text) => (text.to_owned(), self.duration(KEY, text)?),
            None => (
                humantime::format_duration(DEFAULT_CONCURRENCY_LEASE).to_string(),
                DEFAULT_CONCURRENCY_LEASE,
            ),
        };
        if lease < MIN_CONCURRENCY_LEASE || lease <= timeout.saturating_mul(3) {
            let reason = format!(
                "must be at least {} and more than three times timeout ({})",
                humantime::format_duration(MIN_CONCURRENCY_LEASE),
                humantime::format_duration(timeout)
            );
            return Err(self.invalid(KEY, text, reason));
        }
        Ok(Some(SharedConcurrency {
            max_concurrent,
            lease,
        }))
    }

    /// The password in `path`, without trailing whitespace (a final newline above all).
    fn password_file(&self, path: &Path) -> Result<Secret, ConfigError> {
        self.secret_file("rate_limit.shared.password_file", path, "password")
    }
}

#[cfg(test)]
mod tests;
