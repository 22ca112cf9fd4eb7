//! Per-client connection rate limiting: the pure core.
//!
//! This module owns one decision: "may this client open one more connection now?". The caller
//! (the accept path in `server`) builds a [`ClientKey`] (the authenticated identity, or the peer
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

pub mod shared;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

// `--cfg shuttle` (scripts/concurrency-check) swaps in shuttle's locks and atomics so its scheduler
// can interleave threads at every acquisition and counter access; every other build uses std's.
#[cfg(shuttle)]
use shuttle::sync::{atomic::AtomicU32, Mutex, MutexGuard};
#[cfg(not(shuttle))]
use std::sync::{atomic::AtomicU32, Mutex, MutexGuard};

/// A sensible `max_clients` for callers without a configured value.
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;

/// Upper bound on the number of shards; more buys nothing on the machines we target.
const MAX_SHARDS: usize = 32;

/// Fewer tracked keys per shard than this would make "one shard full while others have room"
/// too likely, so small tables get fewer shards.
const MIN_CLIENTS_PER_SHARD: usize = 64;

/// What the limiter enforces. Immutable once the limiter is built; a reload builds a new limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// New connections admitted per client per window. 0 rejects everything.
    pub capacity: u32,
    /// Length of one fixed window. Should be non-zero (config validation's job); a zero window is
    /// treated as one nanosecond rather than panicking.
    pub window: Duration,
    /// Open connections allowed per client at once; `None` means no concurrency cap.
    pub max_concurrent: Option<u32>,
    /// Upper bound on tracked client keys, so memory stays bounded under a flood of new clients.
    pub max_clients: usize,
    /// Per-identity capacity, replacing `capacity` for that identity. Never applies to IP keys.
    pub overrides: HashMap<String, u32>,
}

/// Who a connection is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated client identity (e.g. from its certificate).
    Identity(Arc<str>),
    /// The peer address, for clients without an identity.
    Ip(IpAddr),
}

impl ClientKey {
    /// The key for a peer address, mapping `::ffff:a.b.c.d` to `a.b.c.d` so a dual-stack
    /// listener counts an IPv4 client the same way as an IPv4 listener does.
    pub fn from_ip(ip: IpAddr) -> Self {
        ClientKey::Ip(ip.to_canonical())
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Identity(id) => f.write_str(id),
            ClientKey::Ip(ip) => ip.fmt(f),
        }
    }
}

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
/// It holds only the client's open-connection counter, not the limiter.
#[derive(Debug)]
#[must_use = "dropping the permit releases the concurrency slot"]
pub struct Permit {
    open: Option<Arc<AtomicU32>>,
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
        Decision::Allow(Permit { open })
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const WINDOW: Duration = Duration::from_secs(10);

    fn policy(capacity: u32, max_concurrent: Option<u32>) -> RateLimitPolicy {
        RateLimitPolicy {
            capacity,
            window: WINDOW,
            max_concurrent,
            max_clients: 1000,
            overrides: HashMap::new(),
        }
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::from_ip(s.parse().unwrap())
    }

    fn identity(s: &str) -> ClientKey {
        ClientKey::Identity(Arc::from(s))
    }

    fn is_allowed(decision: &Decision) -> bool {
        matches!(decision, Decision::Allow(_))
    }

    fn reason(decision: &Decision) -> Option<RejectReason> {
        match decision {
            Decision::Allow(_) => None,
            Decision::Reject(reason) => Some(*reason),
        }
    }

    /// Checks `key` `n` times at `now`, dropping permits, and returns how many were admitted.
    fn admitted(limiter: &RateLimiter, key: &ClientKey, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| is_allowed(&limiter.check(key, now))).count()
    }

    #[test]
    fn exactly_capacity_connections_are_admitted_per_window() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(5, None), epoch);
        let key = ip("192.0.2.1");
        assert_eq!(admitted(&limiter, &key, epoch, 20), 5);
        let late = epoch + WINDOW - Duration::from_nanos(1);
        assert_eq!(reason(&limiter.check(&key, late)), Some(RejectReason::Rate));
        assert_eq!(admitted(&limiter, &key, epoch + WINDOW, 20), 5);
        assert_eq!(admitted(&limiter, &key, epoch + 7 * WINDOW, 20), 5);
    }

    #[test]
    fn an_instant_before_the_epoch_counts_as_window_zero_without_panicking() {
        let now = Instant::now();
        let epoch = now + Duration::from_secs(3600);
        let limiter = RateLimiter::new(policy(2, None), epoch);
        let key = ip("192.0.2.1");
        assert_eq!(admitted(&limiter, &key, now, 5), 2);
        assert_eq!(admitted(&limiter, &key, epoch, 5), 0);
        assert_eq!(admitted(&limiter, &key, epoch + WINDOW, 5), 2);
    }

    #[test]
    fn zero_capacity_rejects_every_connection_and_tracks_nobody() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(0, Some(10)), epoch);
        let decision = limiter.check(&ip("192.0.2.1"), epoch);
        assert_eq!(reason(&decision), Some(RejectReason::Rate));
        assert_eq!(limiter.tracked_clients(), 0);
    }

    #[test]
    fn overrides_apply_to_identities_and_not_to_ips() {
        let epoch = Instant::now();
        let mut p = policy(2, None);
        p.overrides.insert("alice".to_owned(), 5);
        p.overrides.insert("192.0.2.1".to_owned(), 9);
        p.overrides.insert("mallory".to_owned(), 0);
        let limiter = RateLimiter::new(p, epoch);
        assert_eq!(admitted(&limiter, &identity("alice"), epoch, 20), 5);
        assert_eq!(admitted(&limiter, &identity("bob"), epoch, 20), 2);
        assert_eq!(admitted(&limiter, &ip("192.0.2.1"), epoch, 20), 2);
        assert_eq!(admitted(&limiter, &identity("mallory"), epoch, 20), 0);
    }

    #[test]
    fn held_permits_block_and_dropping_one_releases_exactly_one_slot() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(100, Some(2)), epoch);
        let key = identity("alice");
        let first = limiter.check(&key, epoch);
        let second = limiter.check(&key, epoch);
        assert!(is_allowed(&first) && is_allowed(&second));
        let third = limiter.check(&key, epoch);
        assert_eq!(reason(&third), Some(RejectReason::Concurrency));
        drop(first);
        let fourth = limiter.check(&key, epoch);
        assert!(is_allowed(&fourth));
        let fifth = limiter.check(&key, epoch);
        assert_eq!(reason(&fifth), Some(RejectReason::Concurrency));
        // The cap spans windows: permits from an earlier window still hold their slots.
        let sixth = limiter.check(&key, epoch + WINDOW);
        assert_eq!(reason(&sixth), Some(RejectReason::Concurrency));
    }

    #[test]
    fn concurrency_rejections_do_not_consume_capacity() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(3, Some(1)), epoch);
        let key = identity("alice");
        let held = limiter.check(&key, epoch);
        assert!(is_allowed(&held));
        for _ in 0..10 {
            let decision = limiter.check(&key, epoch);
            assert_eq!(reason(&decision), Some(RejectReason::Concurrency));
        }
        drop(held);
        assert_eq!(admitted(&limiter, &key, epoch, 10), 2);
    }

    #[test]
    fn rate_rejections_do_not_take_a_concurrency_slot() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(1, Some(2)), epoch);
        let key = identity("alice");
        let held = limiter.check(&key, epoch);
        assert!(is_allowed(&held));
        for _ in 0..10 {
            let decision = limiter.check(&key, epoch);
            assert_eq!(reason(&decision), Some(RejectReason::Rate));
        }
        let next_window = limiter.check(&key, epoch + WINDOW);
        assert!(is_allowed(&next_window));
        drop(held);
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_the_ipv4_address() {
        let v4: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
        let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
        assert_eq!(ClientKey::from_ip(mapped), ClientKey::Ip(v4));
        assert_eq!(ClientKey::from_ip(mapped).to_string(), "192.0.2.1");

        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(3, None), epoch);
        assert!(is_allowed(&limiter.check(&ClientKey::Ip(v4), epoch)));
        assert!(is_allowed(&limiter.check(&ClientKey::from_ip(mapped), epoch)));
        // Even a key built directly from the mapped form is canonicalised.
        assert!(is_allowed(&limiter.check(&ClientKey::Ip(mapped), epoch)));
        assert_eq!(admitted(&limiter, &ClientKey::Ip(v4), epoch, 5), 0);
        assert_eq!(limiter.tracked_clients(), 1);
    }

    #[test]
    fn plain_ipv6_addresses_are_kept_as_is() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ClientKey::from_ip(v6), ClientKey::Ip(v6));
        assert_eq!(ClientKey::from_ip(v6).to_string(), "2001:db8::1");
        assert_eq!(identity("spiffe://x/y").to_string(), "spiffe://x/y");
    }

    #[test]
    fn reject_reasons_read_as_short_lowercase_text() {
        for reason in [
            RejectReason::Rate,
            RejectReason::Concurrency,
            RejectReason::TooManyClients,
        ] {
            let text = reason.to_string();
            assert_eq!(text, text.to_lowercase());
            assert!(!text.is_empty() && text.len() < 40);
        }
    }

    #[test]
    fn tracked_clients_stay_bounded_over_a_million_distinct_keys() {
        let epoch = Instant::now();
        let mut p = policy(1, Some(1));
        p.max_clients = 1000;
        let limiter = RateLimiter::new(p, epoch);
        let keys_per_window = 2000;
        let mut too_many = 0;
        for w in 0..500u32 {
            let now = epoch + WINDOW * w;
            let mut admitted_this_window = 0;
            for i in 0..keys_per_window {
                let key = ClientKey::Ip(Ipv4Addr::from(w * keys_per_window + i).into());
                let decision = limiter.check(&key, now);
                match reason(&decision) {
                    None => admitted_this_window += 1,
                    Some(RejectReason::TooManyClients) => too_many += 1,
                    Some(other) => panic!("unexpected rejection {other}"),
                }
                // Old keys are stale at a window's start, so its first key always gets in.
                if i == 0 {
                    assert!(is_allowed(&decision), "window {w} admitted no new key");
                }
                assert!(limiter.tracked_clients() <= 1000);
            }
            assert!(admitted_this_window <= 1000);
        }
        assert!(too_many > 0, "the table never filled");
    }

    #[test]
    fn a_full_table_rejects_a_new_key_but_serves_tracked_keys() {
        let epoch = Instant::now();
        let mut p = policy(10, None);
        p.max_clients = 1;
        let limiter = RateLimiter::new(p, epoch);
        let (a, b) = (identity("a"), identity("b"));
        assert!(is_allowed(&limiter.check(&a, epoch)));
        let rejected = limiter.check(&b, epoch);
        assert_eq!(reason(&rejected), Some(RejectReason::TooManyClients));
        assert!(is_allowed(&limiter.check(&a, epoch)));
        // Once `a` is stale, `b` takes its place.
        assert!(is_allowed(&limiter.check(&b, epoch + WINDOW)));
        assert_eq!(limiter.tracked_clients(), 1);
    }

    #[test]
    fn an_entry_with_an_open_permit_is_not_evicted() {
        let epoch = Instant::now();
        let mut p = policy(10, Some(1));
        p.max_clients = 1;
        let limiter = RateLimiter::new(p, epoch);
        let (a, b) = (identity("a"), identity("b"));
        let held = limiter.check(&a, epoch);
        assert!(is_allowed(&held));
        let rejected = limiter.check(&b, epoch + WINDOW);
        assert_eq!(reason(&rejected), Some(RejectReason::TooManyClients));
        // `a` kept its concurrency count: it is still at its cap.
        let again = limiter.check(&a, epoch + WINDOW);
        assert_eq!(reason(&again), Some(RejectReason::Concurrency));
        drop(held);
        assert!(is_allowed(&limiter.check(&b, epoch + 2 * WINDOW)));
    }

    #[test]
    fn many_threads_on_one_key_admit_exactly_capacity_in_total() {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(500, Some(10_000)), epoch);
        let key = identity("alice");
        let total: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| admitted(&limiter, &key, epoch, 1000)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(total, 500);
    }

    #[test]
    fn limiter_and_permit_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
        assert_send_sync::<Permit>();
        assert_send_sync::<Decision>();
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Advance the clock by this many milliseconds, then check key `key`.
        Check { key: usize, advance_ms: u64 },
        /// Drop the `nth` (modulo) open permit of key `key`.
        Release { key: usize, nth: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..4usize, prop_oneof![3 => Just(0u64), 1 => 0..2500u64])
                .prop_map(|(key, advance_ms)| Op::Check { key, advance_ms }),
            1 => (0..4usize, any::<usize>()).prop_map(|(key, nth)| Op::Release { key, nth }),
        ]
    }

    proptest! {
        /// The limiter agrees with a straightforward model, and so never admits more than a
        /// key's capacity per window nor holds more than `max_concurrent` permits per key.
        #[test]
        fn admissions_never_exceed_capacity_per_window_or_the_concurrency_cap(
            capacity in 0..5u32,
            alice_capacity in 0..5u32,
            max_concurrent in proptest::option::of(0..4u32),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let window = Duration::from_secs(1);
            let epoch = Instant::now();
            let mut p = policy(capacity, max_concurrent);
            p.window = window;
            p.overrides.insert("alice".to_owned(), alice_capacity);
            let limiter = RateLimiter::new(p, epoch);
            let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
            let keys = [
                identity("alice"),
                identity("bob"),
                ip("192.0.2.1"),
                ClientKey::Ip(mapped),
            ];
            // Model slot per key; the mapped address shares the IPv4 one.
            let slot = |key: usize| key.min(2);
            let capacities = [alice_capacity, capacity, capacity];
            let mut counts: [HashMap<u64, u32>; 3] = Default::default();
            let mut permits: [Vec<Permit>; 3] = Default::default();
            let mut elapsed = Duration::ZERO;

            for op in ops {
                match op {
                    Op::Check { key, advance_ms } => {
                        elapsed += Duration::from_millis(advance_ms);
                        let w = (elapsed.as_nanos() / window.as_nanos()) as u64;
                        let s = slot(key);
                        let count = counts[s].entry(w).or_default();
                        let expected = if *count >= capacities[s] {
                            Some(RejectReason::Rate)
                        } else if max_concurrent.is_some_and(|m| permits[s].len() >= m as usize) {
                            Some(RejectReason::Concurrency)
                        } else {
                            None
                        };
                        match limiter.check(&keys[key], epoch + elapsed) {
                            Decision::Allow(permit) => {
                                prop_assert_eq!(expected, None);
                                *count += 1;
                                permits[s].push(permit);
                            }
                            Decision::Reject(reason) => prop_assert_eq!(expected, Some(reason)),
                        }
                        prop_assert!(*count <= capacities[s]);
                        if let Some(m) = max_concurrent {
                            prop_assert!(permits[s].len() <= m as usize);
                        }
                    }
                    Op::Release { key, nth } => {
                        let open = &mut permits[slot(key)];
                        if !open.is_empty() {
                            let n = nth % open.len();
                            drop(open.swap_remove(n));
                        }
                    }
                }
            }
        }
    }
}
