//! The per-instance fixed-window limiter: the pure core of rate limiting.
//!
//! This module owns one decision: "may this client open one more connection now?". The caller
//! (a connection, through its listener's [`super::Limiter`]) builds a [`ClientKey`] (the authenticated identity, or the peer
//! IP), passes the current [`Instant`], and gets a [`Decision`]. An admitted connection carries a
//! [`Permit`] for its whole life; dropping the permit releases its concurrency slot, so no error
//! path can leak a slot.
//!
//! It must not do I/O, read the clock, log, or know about sockets and TLS: time is always an
//! argument, which is what makes it testable with injected instants. It is thread-safe through
//! `&self`; clone the [`RateLimiter`] (an `Arc` inside) into every connection task.
//!
//! # Semantics
//!
//! - **Fixed windows.** At most `capacity` new connections per client per `window`. Windows are
//!   aligned to the `epoch` given to [`RateLimiter::new`]: the window index is
//!   `(now - epoch) / window`, and an instant before the epoch counts as window 0. When a
//!   client's window index advances, its count resets.
//! - **Window boundary.** Because windows are fixed, a client can open `capacity` connections at
//!   the end of one window and `capacity` more at the start of the next, so up to 2x capacity
//!   within a span of one window length. This is inherent to fixed windows and accepted here in
//!   exchange for O(1) state per client.
//! - **Concurrency.** With `max_concurrent` set, at most that many admitted connections per
//!   client may be open at once (counted by live [`Permit`]s).
//! - **Rejections are free.** A rejected attempt consumes neither capacity nor a concurrency slot,
//!   and a client that has never been admitted is not tracked at all.
//! - **Capacity 0** (globally or via an override) is valid and rejects every connection with
//!   [`RejectReason::Rate`]; `max_concurrent = Some(0)` likewise rejects with
//!   [`RejectReason::Concurrency`].
//! - **Overrides** apply to [`ClientKey::Identity`] only, never to IP keys.
//! - **IP keys** are canonicalised: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the same
//!   client as `a.b.c.d`.
//!
//! # Memory bound and the full-table policy
//!
//! At most `max_clients` keys are tracked. The bound is split across the shards, so the total
//! never exceeds it (a consequence: one shard can be full while others still have room). An
//! entry is *stale* when its window is older than the current one and it has no open permits;
//! stale entries can be evicted. An entry with open permits is never evicted, since its
//! concurrency count would be lost.
//!
//! When a new key arrives at a full shard, the shard is swept once for stale entries (at most one
//! sweep per shard per window, so an attacker cannot force an O(n) sweep on every call). If the
//! shard is still full, the **new key is rejected** with [`RejectReason::TooManyClients`], while
//! keys already tracked are served normally. We fail closed for new keys rather than evict live
//! state, which would let a flood of fresh keys reset everyone's limits. The lock-out lasts until
//! entries go stale, i.e. about one window (entries kept alive by open permits stay until those
//! connections close and the next window begins).
//!
//! # Contention
//!
//! State is split into shards, each a `Mutex<HashMap>`, picked by a keyed hash of the client key
//! (keyed so that clients cannot aim all their keys at one shard). A lock is held for one hashmap
//! operation, except for the amortised sweep described above. Checking an already tracked key
//! does not allocate; releasing a permit takes no lock.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

pub use super::key::ClientKey;
use super::slots::Slot;
use crate::config::RateLimitPolicy;

// `--cfg shuttle` (scripts/concurrency-check) swaps in shuttle's locks and atomics so its scheduler
// can interleave threads at every acquisition and counter access; every other build uses std's.
#[cfg(shuttle)]
use shuttle::sync::{atomic::AtomicU32, Mutex, MutexGuard};
#[cfg(not(shuttle))]
use std::sync::{atomic::AtomicU32, Mutex, MutexGuard};

/// Upper bound on the number of shards; more buys nothing on the machines we target.
const MAX_SHARDS: usize = 32;

/// Fewer tracked keys per shard than this would make "one shard full while others have room"
/// too likely, so small tables get fewer shards.
const MIN_CLIENTS_PER_SHARD: usize = 64;

/// The outcome of [`RateLimiter::check`].
#[derive(Debug)]
#[must_use = "dropping an `Allow` permit immediately releases its concurrency slot"]
pub enum Decision {
    /// Admit the connection; hold the permit until the connection closes.
    Allow(Permit),
    /// Refuse the connection.
    Reject(RejectReason),
}

/// Why a connection was refused. A client-side failure: log it, do not dial a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The client already opened `capacity` connections in the current window.
    #[error("connection rate limit exceeded")]
    Rate,
    /// The client already has `max_concurrent` connections open.
    #[error("too many concurrent connections")]
    Concurrency,
    /// The client is not tracked yet and the table of tracked clients is full.
    #[error("too many tracked clients")]
    TooManyClients,
}

/// Proof of admission. Dropping it releases the client's concurrency slot (if a cap is set).
///
/// It holds only the client's open-connection counter, not the limiter, and with
/// `shared_concurrency` the slot leased for the whole cluster ([`Slot`], given back as it drops).
#[derive(Debug)]
#[must_use = "dropping the permit releases the concurrency slot"]
pub struct Permit {
    open: Option<Arc<AtomicU32>>,
    /// Boxed: a connection holds its permit for its whole life, and most hold no such slot.
    slot: Option<Box<Slot>>,
}

impl Permit {
    /// This permit holding `slot` too, released with it.
    pub(super) fn holding(mut self, slot: Slot) -> Permit {
        self.slot = Some(Box::new(slot));
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            // Each permit added exactly one to the counter, so this cannot underflow.
            open.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The per-client connection rate limiter. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    policy: RateLimitPolicy,
    epoch: Instant,
    /// `policy.window` in nanoseconds, at least 1.
    window_nanos: u64,
    /// Keyed hasher for picking a shard.
    hasher: RandomState,
    shards: Box<[Shard]>,
}

/// Aligned so that neighbouring shard locks do not share a cache line.
#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
    /// This shard's part of `max_clients`.
    limit: usize,
}

struct ShardState {
    entries: HashMap<ClientKey, Entry>,
    /// The window of the last stale sweep, so that we sweep at most once per window.
    last_sweep: Option<u64>,
}

struct Entry {
    /// Window index that `count` belongs to.
    window: u64,
    /// Connections admitted in `window`.
    count: u32,
    /// This client's capacity (overrides resolved once, at insertion).
    capacity: u32,
    /// Open connections; present iff the policy has `max_concurrent`. Incremented only under the
    /// shard lock, decremented lock-free by [`Permit::drop`].
    open: Option<Arc<AtomicU32>>,
}

impl Entry {
    fn new(window: u64, capacity: u32, track_open: bool) -> Self {
        Entry {
            window,
            count: 0,
            capacity,
            open: track_open.then(|| Arc::new(AtomicU32::new(0))),
        }
    }

    fn admit(&mut self, window: u64, max_concurrent: Option<u32>) -> Decision {
        // Only move forward: a caller whose `now` was taken a little earlier than another's
        // still counts against the newer window instead of resetting it.
        if window > self.window {
            self.window = window;
            self.count = 0;
        }
        if self.count >= self.capacity {
            return Decision::Reject(RejectReason::Rate);
        }
        let open = match (&self.open, max_concurrent) {
            (Some(open), Some(max)) => {
                // Increments happen only here, under the shard lock, so load-then-add cannot
                // overshoot; concurrent permit drops can only lower the value.
                if open.load(Ordering::Acquire) >= max {
                    return Decision::Reject(RejectReason::Concurrency);
                }
                open.fetch_add(1, Ordering::AcqRel);
                Some(Arc::clone(open))
            }
            _ => None,
        };
        self.count += 1;
        Decision::Allow(Permit { open, slot: None })
    }

    fn is_stale(&self, window: u64) -> bool {
        self.window < window
            && self
                .open
                .as_ref()
                .is_none_or(|open| open.load(Ordering::Acquire) == 0)
    }
}

impl ShardState {
    /// Evicts stale entries, at most once per window (the amortisation that keeps a full table
    /// from costing a full sweep on every call).
    fn sweep(&mut self, window: u64) {
        if self.last_sweep.is_some_and(|swept| swept >= window) {
            return;
        }
        self.last_sweep = Some(window);
        self.entries.retain(|_, entry| !entry.is_stale(window));
    }
}

impl RateLimiter {
    /// Builds a limiter whose windows are aligned to `epoch`.
    pub fn new(policy: RateLimitPolicy, epoch: Instant) -> Self {
        let window_nanos = u64::try_from(policy.window.as_nanos()).unwrap_or(u64::MAX).max(1);
        let shard_count = (policy.max_clients / MIN_CLIENTS_PER_SHARD).clamp(1, MAX_SHARDS);
        let base = policy.max_clients / shard_count;
        let extra = policy.max_clients % shard_count;
        let shards = (0..shard_count)
            .map(|i| Shard {
                state: Mutex::new(ShardState {
                    entries: HashMap::new(),
                    last_sweep: None,
                }),
                limit: base + usize::from(i < extra),
            })
            .collect();
        RateLimiter {
            inner: Arc::new(Inner {
                policy,
                epoch,
                window_nanos,
                hasher: RandomState::new(),
                shards,
            }),
        }
    }

    /// Decides whether `key` may open a connection at `now`, and counts it if so.
    pub fn check(&self, key: &ClientKey, now: Instant) -> Decision {
        let canonical;
        let key = match key {
            ClientKey::Ip(ip) if ip.to_canonical() != *ip => {
                canonical = ClientKey::from_ip(*ip);
                &canonical
            }
            _ => key,
        };
        let inner = &*self.inner;
        let max_concurrent = inner.policy.max_concurrent;
        let window = inner.window_index(now);
        let shard = inner.shard(key);
        let mut state = lock(&shard.state);

        if let Some(entry) = state.entries.get_mut(key) {
            return entry.admit(window, max_concurrent);
        }

        // A new key: only tracked once it has actually been admitted.
        let capacity = inner.capacity_for(key);
        if capacity == 0 {
            return Decision::Reject(RejectReason::Rate);
        }
        if state.entries.len() >= shard.limit {
            state.sweep(window);
            if state.entries.len() >= shard.limit {
                return Decision::Reject(RejectReason::TooManyClients);
            }
        }
        let mut entry = Entry::new(window, capacity, max_concurrent.is_some());
        let decision = entry.admit(window, max_concurrent);
        if matches!(decision, Decision::Allow(_)) {
            state.entries.insert(key.clone(), entry);
        }
        decision
    }

    /// The limiter to use for `policy` after a reload. With the same policy as `previous`, that
    /// very limiter: windows and counts go on as if there had been no reload. With another
    /// policy, a new limiter whose windows start now but which takes over the open connections
    /// `previous` counts (when both have `max_concurrent`), so a reload never frees a
    /// concurrency slot that is still held.
    pub fn carry_over(
        previous: Option<&RateLimiter>,
        policy: RateLimitPolicy,
        epoch: Instant,
    ) -> RateLimiter {
        match previous {
            Some(previous) if previous.inner.policy == policy => previous.clone(),
            Some(previous) => {
                let next = RateLimiter::new(policy, epoch);
                next.adopt_open_counts(previous, epoch);
                next
            }
            None => RateLimiter::new(policy, epoch),
        }
    }

    /// Tracks every client that has connections open in `previous`, sharing its counter of
    /// open connections (so the permits `previous` gave out release slots here too).
    fn adopt_open_counts(&self, previous: &RateLimiter, now: Instant) {
        let inner = &*self.inner;
        if inner.policy.max_concurrent.is_none() {
            return;
        }
        let window = inner.window_index(now);
        for shard in previous.inner.shards.iter() {
            let open: Vec<(ClientKey, Arc<AtomicU32>)> = lock(&shard.state)
                .entries
                .iter()
                .filter_map(|(key, entry)| {
                    let open = entry.open.as_ref()?;
                    (open.load(Ordering::Acquire) > 0).then(|| (key.clone(), Arc::clone(open)))
                })
                .collect();
            for (key, open) in open {
                let target = inner.shard(&key);
                let mut state = lock(&target.state);
                if state.entries.len() >= target.limit {
                    continue; // a smaller table: the clients that do not fit start uncounted
                }
                let mut entry = Entry::new(window, inner.capacity_for(&key), false);
                entry.open = Some(open);
                state.entries.insert(key, entry);
            }
        }
    }

    /// Open connections counted for `key` (0 if it is not tracked or nothing is capped).
    pub fn open_connections(&self, key: &ClientKey) -> u32 {
        let shard = self.inner.shard(key);
        lock(&shard.state)
            .entries
            .get(key)
            .and_then(|e| e.open.as_ref())
            .map_or(0, |open| open.load(Ordering::Acquire))
    }

    /// Number of client keys currently tracked (for tests and metrics).
    pub fn tracked_clients(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|shard| lock(&shard.state).entries.len())
            .sum()
    }

    /// The policy this limiter enforces.
    pub fn policy(&self) -> &RateLimitPolicy {
        &self.inner.policy
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("policy", &self.inner.policy)
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn window_index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / self.window_nanos
    }

    fn shard(&self, key: &ClientKey) -> &Shard {
        // The modulo result is below `shards.len()`, so it fits in `usize` and indexes in bounds.
        let index = self.hasher.hash_one(key) % self.shards.len() as u64;
        &self.shards[index as usize]
    }

    fn capacity_for(&self, key: &ClientKey) -> u32 {
        match key {
            ClientKey::Identity(id) => self
                .policy
                .overrides
                .get(&**id)
                .copied()
                .unwrap_or(self.policy.capacity),
            ClientKey::Ip(_) => self.policy.capacity,
        }
    }
}

/// Locks a shard, ignoring poisoning: nothing inside a critical section can panic midway through
/// an update (no user code runs there), so the counters are consistent even after a panic
/// elsewhere in the holding thread.
fn lock(state: &Mutex<ShardState>) -> MutexGuard<'_, ShardState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
