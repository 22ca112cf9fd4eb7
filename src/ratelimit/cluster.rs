//! The thin Redis shell of the cluster-wide limiter (`[rate_limit.shared]`).
//!
//! [`ClusterLimiter`] counts each client's window in Redis, summed over every fulcrum instance
//! using the same Redis and key prefix, and with `shared_concurrency` its open connections too.
//! The decisions are made by the pure [`Shares`] (local shares of a window) and
//! [`Slots`] (leased slots of `max_concurrent`, asked for by `cluster/slots.rs`); this module only
//! reads the wall clock, talks to Redis through its `Store` (`cluster/store.rs`: the client,
//! the connection, `timeout`, the health and [`RETRY_AFTER`]), and applies `on_unavailable` when
//! Redis cannot answer within `timeout`. It must not hold a lock across an await, and no Redis
//! await may run without the `timeout` deadline, so no connection ever hangs on Redis.
//!
//! Window keys are `{key_prefix}{client}:{window_index}`, incremented by the claimed share with
//! `INCRBY` and given a TTL of two windows by the first increment (one Lua script, atomic).
//! `max_concurrent` is checked first, so a connection refused for concurrency costs no share:
//! per instance by a local limiter, and with `shared_concurrency` then over the instances.
//!
//! [`redis_client`] builds the redis client from the configuration (URL, `password_file`, TLS
//! files) when a generation is loaded, so `fulcrum check` and a reload fail on what would fail
//! here; a reload builds a new client, so a changed password or CA applies to the next
//! generation (the slots a reload keeps count through the new one).

mod slots;
mod store;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use self::slots::{Outcome, SharedSlots};
use self::store::Store;
pub use self::store::{redis_client, RedisClientError, RETRY_AFTER};
use super::key::ClientKey;
use super::local::{Decision, Permit, RateLimiter, RejectReason};
use super::shares::{ShareDecision, Shares};
use super::slots::Slots;
use crate::config::{OnUnavailable, RateLimitPolicy, SharedRateLimitConfig};
use crate::metrics::Counter;

/// `INCRBY key share`; the increment that creates the key also sets its TTL (two windows).
const CLAIM_SCRIPT: &str = "local n = redis.call('INCRBY', KEYS[1], ARGV[1]) \
    if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
    return n";

/// The cluster-wide limiter: local shares of each client's window claimed from Redis, and with
/// `shared_concurrency` slots of `max_concurrent` leased from it.
pub struct ClusterLimiter {
    /// Shared with the limiter this one replaced on a reload when the policy and key prefix
    /// stayed the same (the local shares are still good).
    core: Arc<Shares>,
    policy: RateLimitPolicy,
    window: Duration,
    prefix: String,
    on_unavailable: OnUnavailable,
    /// The per-instance limiter, used when Redis is unavailable and `on_unavailable = "local"`.
    fallback: RateLimiter,
    /// Only `max_concurrent` (its capacity is unlimited), counted in this instance. With
    /// `shared_concurrency` too: it then never refuses what the slots would admit, and keeps the
    /// per-instance count a reload hands over.
    concurrency: RateLimiter,
    /// `shared_concurrency`: shared with the limiter this one replaced when the key prefix
    /// stayed the same (the slots held stay held).
    slots: Option<Arc<SharedSlots>>,
    store: Arc<Store>,
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("prefix", &self.prefix)
            .field("on_unavailable", &self.on_unavailable)
            .field("shared_concurrency", &self.slots.is_some())
            .finish_non_exhaustive()
    }
}

impl ClusterLimiter {
    /// The redis client it counts through (a rebuild of the same generation reuses it).
    pub(crate) fn client(&self) -> redis::Client {
        self.store.client.clone()
    }

    /// Builds the limiter for `policy` counted through `shared` with `client` (see
    /// [`redis_client`]), taking over from `previous` (the limiter a reload replaces): its open
    /// connection counts always, its local shares and fallback counts when the policy and key
    /// prefix are the same, its concurrency slots when the key prefix is. Does no I/O: Redis is
    /// dialed by the first connection that needs it.
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
        let same_prefix = previous.filter(|p| p.prefix == shared.key_prefix);
        let core = match same_prefix.filter(|p| p.policy == policy) {
            Some(previous) => Arc::clone(&previous.core),
            None => Arc::new(Shares::new(
                policy.capacity,
                policy.window,
                policy.overrides.clone(),
                policy.max_clients,
            )),
        };
        let store = Arc::new(Store::new(client, shared.timeout, errors));
        let slots = shared
            .concurrency
            .map(|c| match same_prefix.and_then(|p| p.slots.as_ref()) {
                Some(slots) => {
                    slots
                        .core()
                        .reconfigure(c.max_concurrent, c.lease, policy.max_clients);
                    slots.hand_over(Arc::clone(&store));
                    Arc::clone(slots)
                }
                None => {
                    let core = Slots::new(instance_name(), c.max_concurrent, c.lease, policy.max_clients);
                    Arc::new(SharedSlots::new(
                        core,
                        shared.key_prefix.clone(),
                        Arc::clone(&store),
                    ))
                }
            });
        ClusterLimiter {
            core,
            window: policy.window,
            prefix: shared.key_prefix.clone(),
            on_unavailable: shared.on_unavailable,
            fallback: RateLimiter::carry_over(previous.map(|p| &p.fallback), policy.clone(), epoch),
            policy,
            concurrency,
            slots,
            store,
        }
    }

    /// Decides for one connection of `key` arriving at `now`: concurrency first (a slot held
    /// here or leased from Redis with `shared_concurrency`), then the window's local share, else
    /// one claim from Redis; each round trip bounded by `timeout`, and `on_unavailable` when
    /// Redis cannot answer. The shared windows are counted on the wall clock, read here; a local
    /// fallback after a failed round trip decides at the time it runs, read here too.
    pub async fn check(&self, key: &ClientKey, now: Instant) -> Decision {
        let key = &key.canonical();
        // Concurrency first: a connection refused here costs no share.
        let permit = match self.concurrency.check(key, now) {
            Decision::Allow(permit) => permit,
            reject => return reject,
        };
        let permit = match &self.slots {
            None => permit,
            Some(slots) => match slots.acquire(key).await {
                Outcome::Admit(slot) => permit.holding(slot),
                Outcome::Reject(why) => return Decision::Reject(why),
                Outcome::Unavailable => return self.unavailable(key, permit),
            },
        };
        let (window, amount) = match self.core.check(key, unix_now()) {
            ShareDecision::Admit => return Decision::Allow(permit),
            ShareDecision::Reject(why) => return Decision::Reject(why),
            ShareDecision::Claim { window, amount } => (window, amount),
        };
        let name = format!("{}{key}:{window}", self.prefix);
        // Two windows, so a key outlives its window on every instance's clock.
        let ttl_ms = u64::try_from(self.window.as_millis().saturating_mul(2))
            .unwrap_or(u64::MAX)
            .max(1);
        let claim = redis::cmd("EVAL")
            .arg(CLAIM_SCRIPT)
            .arg(1)
            .arg(name)
            .arg(amount)
            .arg(ttl_ms)
            .to_owned();
        let total = self
            .store
            .call(move |mut connection| async move { claim.query_async::<u64>(&mut connection).await })
            .await;
        match total {
            Some(total) => match self.core.grant(key, window, amount, total, unix_now()) {
                ShareDecision::Admit => Decision::Allow(permit),
                ShareDecision::Reject(why) => Decision::Reject(why),
                // `grant` only admits or rejects.
                ShareDecision::Claim { .. } => Decision::Reject(RejectReason::Rate),
            },
            None => self.unavailable(key, permit),
        }
    }

    /// `on_unavailable` for a connection whose concurrency `permit` is taken.
    fn unavailable(&self, key: &ClientKey, permit: Permit) -> Decision {
        match self.on_unavailable {
            OnUnavailable::Allow => Decision::Allow(permit),
            OnUnavailable::Deny => Decision::Reject(RejectReason::Rate),
            OnUnavailable::Local => {
                // The fallback counts concurrency itself.
                drop(permit);
                self.fallback.check(key, Instant::now())
            }
        }
    }

    /// The limiter counting open connections (`max_concurrent`) in this instance.
    pub fn concurrency(&self) -> &RateLimiter {
        &self.concurrency
    }

    /// Whether the last Redis round trip succeeded (true before the first).
    pub fn is_available(&self) -> bool {
        self.store.is_available()
    }
}

/// A name for this instance's slot records, unique per process and per call: the process id
/// and a random number (std's hasher keys are random per process).
fn instance_name() -> String {
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{}-{random:016x}", std::process::id())
}

/// Wall-clock time since the UNIX epoch (zero if the clock is before it).
fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}
