//! Rate limiting: whether a client may open one more connection now.
//!
//! One room, four parts, and the one [`Limiter`] a listener holds (all keyed by [`ClientKey`]):
//! - [`local`]: the per-instance fixed-window limiter with concurrency caps (pure: time is an
//!   argument; permits are RAII guards);
//! - [`shares`]: the pure core of the cluster-wide limiter (local shares of a window counted in a
//!   shared store);
//! - [`slots`]: the pure core of `shared_concurrency` (slots of `max_concurrent` leased from the
//!   shared store);
//! - [`cluster`]: their Redis shell, with `on_unavailable` when Redis cannot answer in time.
//!
//! Which policy a listener enforces (its own `[listener.rate_limit]` over the global
//! `[rate_limit]`) is settled by `config`; which limiter instance counts it is settled when a
//! generation is assembled (`state`). This module never touches sockets and reads no clock: the
//! caller passes `now`. Only the Redis shell, [`cluster`], reads clocks of its own (the wall clock
//! of the shared windows, and the time of what it does after a round trip).

pub mod cluster;
mod key;
pub mod local;
pub mod shares;
pub mod slots;

use std::sync::Arc;
use std::time::Instant;

pub use crate::config::{RateLimitPolicy, DEFAULT_MAX_CLIENTS};
pub use cluster::ClusterLimiter;
pub use key::ClientKey;
pub use local::{Decision, Permit, RateLimiter, RejectReason};

/// The rate limiter of one listener.
#[derive(Clone, Debug)]
pub enum Limiter {
    /// Counted by this instance alone.
    Local(RateLimiter),
    /// Counted in Redis across instances (`[rate_limit.shared]`).
    Cluster(Arc<ClusterLimiter>),
}

impl Limiter {
    /// The limiter that counts open connections (`max_concurrent`) in this instance.
    pub fn open_counts(&self) -> &RateLimiter {
        match self {
            Limiter::Local(local) => local,
            Limiter::Cluster(cluster) => cluster.concurrency(),
        }
    }

    /// Decides whether `key` may open a connection at `now`. A cluster limiter may wait for
    /// Redis (a concurrency slot, a window share), each wait never longer than the configured
    /// `timeout`.
    pub async fn check(&self, key: &ClientKey, now: Instant) -> Decision {
        match self {
            Limiter::Local(local) => local.check(key, now),
            // Boxed: the Redis round trip's state would otherwise sit in every connection's
            // future, limited ones or not (see connection's size test).
            Limiter::Cluster(cluster) => Box::pin(cluster.check(key, now)).await,
        }
    }
}
