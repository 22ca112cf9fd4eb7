//! The thin Redis shell of the cluster-wide limiter (`[rate_limit.shared]`).
//!
//! [`ClusterLimiter`] counts each client's window in Redis, summed over every fulcrum instance
//! using the same Redis and key prefix. The decisions are made by the pure
//! [`Shares`] (local shares of a window); this module only reads the wall clock, talks to Redis,
//! and applies `on_unavailable` when Redis cannot answer within `timeout`. It must not hold a lock
//! across an await, and no Redis await may run without the `timeout` deadline, so no connection
//! ever hangs on Redis.
//!
//! Redis keys are `{key_prefix}{client}:{window_index}`, incremented by the claimed share with
//! `INCRBY` and given a TTL of two windows by the first increment (one Lua script, atomic).
//! `max_concurrent` stays per instance: it is enforced by a local limiter before any share is
//! used, so a connection refused for concurrency costs no share.
//!
//! After a failed round trip Redis is not tried again for [`RETRY_AFTER`]; meanwhile
//! `on_unavailable` applies at once. The first success after that brings shared limiting back.
//! Each change between available and unavailable is logged once.
//!
//! [`redis_client`] builds the redis client from the configuration (URL, `password_file`, TLS
//! files) when a generation is loaded, so `fulcrum check` and a reload fail on what would fail
//! here; a reload builds a new client, so a changed password or CA applies to the next
//! generation. The password goes to Redis only: it is in no log line, error or Debug output of
//! this module.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;

use super::local::{ClientKey, Decision, RateLimiter, RejectReason};
use super::shares::{ShareDecision, Shares};
use crate::config::{OnUnavailable, RateLimitPolicy, SharedRateLimitConfig};
use crate::metrics::Counter;
use crate::tls::TlsError;

/// How long a failed Redis is left alone before a later connection tries it again.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

/// `INCRBY key share`; the increment that creates the key also sets its TTL (two windows).
const CLAIM_SCRIPT: &str = "local n = redis.call('INCRBY', KEYS[1], ARGV[1]) \
    if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
    return n";

/// Why the shared rate limit's Redis client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error("[rate_limit.shared.tls]: {0}")]
    Tls(#[from] TlsError),
    #[error("[rate_limit.shared] redis: {0}")]
    Client(String),
}

/// The redis client for `shared`: its URL, the password from `password_file` if any, and for
/// `rediss://` the `[rate_limit.shared.tls]` files (checked here). Does no network I/O.
pub fn redis_client(shared: &SharedRateLimitConfig) -> Result<redis::Client, RedisClientError> {
    // Whatever the redis crate says, the password and the URL's password never show.
    let failed = |e: redis::RedisError| {
        let mut message = e
            .to_string()
            .replace(&shared.redis, &crate::config::redact_url(&shared.redis));
        if let Some(password) = &shared.password {
            message = message.replace(password.expose(), "***");
        }
        RedisClientError::Client(message)
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(shared.redis.as_str()).map_err(failed)?;
    if let Some(password) = &shared.password {
        let settings = info.redis_settings().clone().set_password(password.expose());
        info = info.set_redis_settings(settings);
    }
    if let redis::ConnectionAddr::TcpTls { .. } = info.addr() {
        // The redis client builds its rustls configuration from the process default provider.
        crate::tls::install_default_provider();
    }
    match &shared.tls {
        Some(tls) => redis::Client::build_with_tls(info, crate::tls::redis_certificates(tls)?),
        None => redis::Client::open(info),
    }
    .map_err(failed)
}

/// The cluster-wide limiter: local shares of each client's window, claimed from Redis.
pub struct ClusterLimiter {
    /// Shared with the limiter this one replaced on a reload when the policy and key prefix
    /// stayed the same (the local shares are still good).
    core: Arc<Shares>,
    policy: RateLimitPolicy,
    window: Duration,
    on_unavailable: OnUnavailable,
    /// The per-instance limiter, used when Redis is unavailable and `on_unavailable = "local"`.
    fallback: RateLimiter,
    /// Only `max_concurrent` (its capacity is unlimited).
    concurrency: RateLimiter,
    redis: Redis,
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("prefix", &self.redis.prefix)
            .field("on_unavailable", &self.on_unavailable)
            .finish_non_exhaustive()
    }
}

struct Redis {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// The open connection, cloned out for each round trip (it multiplexes).
    connection: Mutex<Option<MultiplexedConnection>>,
    health: Mutex<Health>,
    /// `fulcrum_ratelimit_backend_errors_total`.
    errors: Arc<Counter>,
}

struct Health {
    available: bool,
    /// While in the future, Redis is not tried.
    retry_at: Option<Instant>,
}

impl ClusterLimiter {
    /// The redis client it counts through (a rebuild of the same generation reuses it).
    pub(crate) fn client(&self) -> redis::Client {
        self.redis.client.clone()
    }

    /// Builds the limiter for `policy` counted through `shared` with `client` (see
    /// [`redis_client`]), taking over from `previous` (the limiter a reload replaces): its open
    /// connection counts always, its local shares and fallback counts when the policy and key
    /// prefix are the same. Does no I/O: Redis is dialed by the first connection that needs a
    /// claim.
    pub fn new(
        policy: RateLimitPolicy,
        shared: &SharedRateLimitConfig,
        client: redis::Client,
        epoch: Instant,
        errors: Arc<Counter>,
        previous: Option<&ClusterLimiter>,
    ) -> Self {
        let concurrency = RateLimiter::carry_over(
            previous.map(|p| &p.concurrency),
            RateLimitPolicy {
                capacity: u32::MAX,
                overrides: Default::default(),
                ..policy.clone()
            },
            epoch,
        );
        let same = previous.filter(|p| p.policy == policy && p.redis.prefix == shared.key_prefix);
        let core = match same {
            Some(previous) => Arc::clone(&previous.core),
            None => Arc::new(Shares::new(
                policy.capacity,
                policy.window,
                policy.overrides.clone(),
                policy.max_clients,
            )),
        };
        ClusterLimiter {
            core,
            window: policy.window,
            on_unavailable: shared.on_unavailable,
            fallback: RateLimiter::carry_over(previous.map(|p| &p.fallback), policy.clone(), epoch),
            policy,
            concurrency,
            redis: Redis {
                client,
                prefix: shared.key_prefix.clone(),
                timeout: shared.timeout,
                connection: Mutex::new(None),
                health: Mutex::new(Health {
                    available: true,
                    retry_at: None,
                }),
                errors,
            },
        }
    }

    /// Decides for one connection of `key` arriving at `now`: local share, else one claim from
    /// Redis (bounded by `timeout`), else `on_unavailable`. The shared windows are counted on the
    /// wall clock, read here; a local fallback after a failed round trip decides at the time it
    /// runs, read here too.
    pub async fn check(&self, key: &ClientKey, now: Instant) -> Decision {
        let key = &match key {
            ClientKey::Ip(ip) => ClientKey::from_ip(*ip),
            identity => identity.clone(),
        };
        // Concurrency first: a connection refused here costs no share.
        let permit = match self.concurrency.check(key, now) {
            Decision::Allow(permit) => permit,
            reject => return reject,
        };
        let (window, amount) = match self.core.check(key, unix_now()) {
            ShareDecision::Admit => return Decision::Allow(permit),
            ShareDecision::Reject(why) => return Decision::Reject(why),
            ShareDecision::Claim { window, amount } => (window, amount),
        };
        let name = format!("{}{key}:{window}", self.redis.prefix);
        // Two windows, so a key outlives its window on every instance's clock.
        let ttl_ms = u64::try_from(self.window.as_millis().saturating_mul(2))
            .unwrap_or(u64::MAX)
            .max(1);
        match self.redis.claim(&name, amount, ttl_ms).await {
            Some(total) => match self.core.grant(key, window, amount, total, unix_now()) {
                ShareDecision::Admit => Decision::Allow(permit),
                ShareDecision::Reject(why) => Decision::Reject(why),
                // `grant` only admits or rejects.
                ShareDecision::Claim { .. } => Decision::Reject(RejectReason::Rate),
            },
            None => match self.on_unavailable {
                OnUnavailable::Allow => Decision::Allow(permit),
                OnUnavailable::Deny => Decision::Reject(RejectReason::Rate),
                OnUnavailable::Local => {
                    // The fallback counts concurrency itself.
                    drop(permit);
                    self.fallback.check(key, Instant::now())
                }
            },
        }
    }

    /// The limiter counting open connections (`max_concurrent`), per instance.
    pub fn concurrency(&self) -> &RateLimiter {
        &self.concurrency
    }

    /// Whether the last Redis round trip succeeded (true before the first).
    pub fn is_available(&self) -> bool {
        lock(&self.redis.health).available
    }
}

impl Redis {
    /// Adds `amount` to key `name`; returns the new total, or `None` when Redis failed, timed
    /// out, or is being left alone after a failure.
    async fn claim(&self, name: &str, amount: u32, ttl_ms: u64) -> Option<u64> {
        if lock(&self.health).retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let outcome = tokio::time::timeout(self.timeout, self.round_trip(name, amount, ttl_ms)).await;
        let error = match outcome {
            Ok(Ok(total)) => {
                let mut health = lock(&self.health);
                health.retry_at = None;
                if !health.available {
                    health.available = true;
                    tracing::info!("shared rate limit: Redis is available again");
                }
                return Some(total);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.errors.inc();
        *lock(&self.connection) = None;
        let mut health = lock(&self.health);
        health.retry_at = Some(Instant::now() + RETRY_AFTER);
        if health.available {
            health.available = false;
            tracing::warn!(%error, "shared rate limit: Redis is unavailable; on_unavailable applies");
        }
        None
    }

    async fn round_trip(&self, name: &str, amount: u32, ttl_ms: u64) -> redis::RedisResult<u64> {
        let existing = lock(&self.connection).clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => {
                let connection = self.client.get_multiplexed_async_connection().await?;
                *lock(&self.connection) = Some(connection.clone());
                connection
            }
        };
        redis::cmd("EVAL")
            .arg(CLAIM_SCRIPT)
            .arg(1)
            .arg(name)
            .arg(amount)
            .arg(ttl_ms)
            .query_async(&mut connection)
            .await
    }
}

/// Wall-clock time since the UNIX epoch (zero if the clock is before it).
fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Locks ignoring poisoning: the sections only assign plain values and cannot panic midway.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
