//! The pure core of the cluster-wide limiter: local shares ("leases") of a client's window.
//!
//! Several fulcrum instances count one client's connections in a shared store (Redis, driven by
//! [`crate::sharedlimit`]). To keep the store off the hot path, an instance claims a small share of
//! the client's window at once and hands it out locally; only when the share is used up does it
//! claim again. This module decides, per connection, one of: admit from the local share, claim a
//! share of N for window W first, or reject. It does no I/O and reads no clock: the wall-clock
//! time since the UNIX epoch is an argument.
//!
//! # Semantics
//!
//! - Windows are aligned to wall-clock multiples of `window` (`unix_time / window`), so every
//!   instance computes the same window index (assuming clocks agree to well under a window).
//! - A claim of `amount` returns the store's new total for the window. Only the part of the claim
//!   that lies within `capacity` is usable; the overshoot is wasted, never admitted. Hence the
//!   total admitted over all instances never exceeds `capacity` per window.
//! - Once a claim comes back at or over capacity, the client's window is exhausted here: later
//!   connections in that window are rejected without asking the store again.
//! - Unused local shares die with their window.
//! - Overrides apply to identities, never to IP keys, as in [`super::RateLimiter`].
//! - At most `max_clients` keys are tracked; stale entries (older window) are swept when the
//!   table is full (at most once per window, so a flood of new keys cannot force a sweep per
//!   call), and a new key at a still-full table is rejected.
//! - A wall clock stepping back may let a later window's share be used in an earlier window; the
//!   store's count for each window still bounds what was admitted from it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::{ClientKey, RejectReason};

/// What [`SharedLimiter::check`] says to do with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedDecision {
    /// Admitted from this instance's local share: no store round trip.
    Admit,
    /// Claim `amount` more of `window` from the store, then call [`SharedLimiter::grant`].
    Claim { window: u64, amount: u32 },
    /// Refused.
    Reject(RejectReason),
}

/// Local shares per client. Thread-safe through `&self`.
#[derive(Debug)]
pub struct SharedLimiter {
    capacity: u32,
    window_nanos: u128,
    overrides: HashMap<String, u32>,
    max_clients: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<ClientKey, Lease>,
    /// The window of the last stale sweep.
    last_sweep: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Window index the share belongs to.
    window: u64,
    /// Admissions left in the local share.
    left: u32,
    /// The store reported the window full: reject without claiming again.
    exhausted: bool,
}

impl SharedLimiter {
    /// `window` should be non-zero (config validation's job); zero is treated as 1ns.
    pub fn new(capacity: u32, window: Duration, overrides: HashMap<String, u32>, max_clients: usize) -> Self {
        SharedLimiter {
            capacity,
            window_nanos: window.as_nanos().max(1),
            overrides,
            max_clients,
            table: Mutex::default(),
        }
    }

    /// The window index of a wall-clock time (time since the UNIX epoch).
    pub fn window_index(&self, unix_now: Duration) -> u64 {
        u64::try_from(unix_now.as_nanos() / self.window_nanos).unwrap_or(u64::MAX)
    }

    /// The capacity that applies to `key` (an override for identities, else the global one).
    pub fn capacity_for(&self, key: &ClientKey) -> u32 {
        match key {
            ClientKey::Identity(id) => self.overrides.get(&**id).copied().unwrap_or(self.capacity),
            ClientKey::Ip(_) => self.capacity,
        }
    }

    /// The share claimed at once: a tenth of the capacity, at least 1.
    pub fn share(capacity: u32) -> u32 {
        (capacity / 10).max(1)
    }

    /// Decides for one connection of `key` at wall-clock time `unix_now`.
    pub fn check(&self, key: &ClientKey, unix_now: Duration) -> SharedDecision {
        let window = self.window_index(unix_now);
        let capacity = self.capacity_for(key);
        if capacity == 0 {
            return SharedDecision::Reject(RejectReason::Rate);
        }
        let claim = SharedDecision::Claim {
            window,
            amount: Self::share(capacity),
        };
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let table = &mut *table;
        let Some(lease) = table.entries.get_mut(key) else {
            if table.entries.len() >= self.max_clients {
                if table.last_sweep.is_none_or(|swept| swept < window) {
                    table.last_sweep = Some(window);
                    table.entries.retain(|_, lease| lease.window >= window);
                }
                if table.entries.len() >= self.max_clients {
                    return SharedDecision::Reject(RejectReason::TooManyClients);
                }
            }
            return claim;
        };
        if window > lease.window {
            *lease = Lease {
                window,
                left: 0,
                exhausted: false,
            };
        }
        if lease.left > 0 {
            lease.left -= 1;
            SharedDecision::Admit
        } else if lease.exhausted {
            SharedDecision::Reject(RejectReason::Rate)
        } else {
            claim
        }
    }

    /// Records the store's answer to a claim of `amount` for `window`: `total` is the window's
    /// count after the claim. Returns [`SharedDecision::Admit`] (one unit of the usable part is
    /// used for the connection that claimed) or [`SharedDecision::Reject`].
    pub fn grant(
        &self,
        key: &ClientKey,
        window: u64,
        amount: u32,
        total: u64,
        unix_now: Duration,
    ) -> SharedDecision {
        let capacity = u64::from(self.capacity_for(key));
        let before = total.saturating_sub(u64::from(amount));
        // Within `amount`, so it fits in u32.
        let usable = capacity.saturating_sub(before).min(u64::from(amount)) as u32;
        let exhausted = total >= capacity;
        let current = self.window_index(unix_now).max(window);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if window == current {
            let lease = table.entries.entry(key.clone()).or_insert(Lease {
                window,
                left: 0,
                exhausted: false,
            });
            if lease.window < window {
                *lease = Lease {
                    window,
                    left: 0,
                    exhausted: false,
                };
            }
            if lease.window == window {
                lease.left = lease.left.saturating_add(usable.saturating_sub(1));
                lease.exhausted |= exhausted;
            }
        }
        // A claim for a window that has since passed still admits the connection that made it
        // (it was counted in that window); its leftover dies with the window.
        if usable > 0 {
            SharedDecision::Admit
        } else {
            SharedDecision::Reject(RejectReason::Rate)
        }
    }

    /// Number of client keys with a local share (for tests and metrics).
    pub fn tracked_clients(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const WINDOW: Duration = Duration::from_secs(60);

    fn identity(name: &str) -> ClientKey {
        ClientKey::Identity(Arc::from(name))
    }

    /// Runs one connection through `limiter` against a simulated store; true when admitted.
    fn connect(
        limiter: &SharedLimiter,
        store: &mut HashMap<(ClientKey, u64), u64>,
        key: &ClientKey,
        now: Duration,
    ) -> bool {
        match limiter.check(key, now) {
            SharedDecision::Admit => true,
            SharedDecision::Reject(_) => false,
            SharedDecision::Claim { window, amount } => {
                let total = store.entry((key.clone(), window)).or_default();
                *total += u64::from(amount);
                let total = *total;
                limiter.grant(key, window, amount, total, now) == SharedDecision::Admit
            }
        }
    }

    #[test]
    fn several_instances_never_admit_more_than_capacity_in_total() {
        for capacity in [1u32, 2, 7, 10, 20, 95, 100] {
            let instances: Vec<_> = (0..4)
                .map(|_| SharedLimiter::new(capacity, WINDOW, HashMap::new(), 100))
                .collect();
            let mut store = HashMap::new();
            let key = identity("alice");
            let now = Duration::from_secs(1_700_000_000);
            let mut admitted = 0;
            for i in 0..(capacity as usize * 5) {
                // Uneven spread: instance 0 gets twice the traffic.
                let instance = &instances[(i * 7 + i / 3) % 5 % 4];
                admitted += usize::from(connect(instance, &mut store, &key, now));
            }
            assert!(admitted <= capacity as usize, "capacity {capacity}: {admitted}");
            assert!(admitted > 0);
        }
    }

    #[test]
    fn one_instance_alone_gets_exactly_capacity() {
        let limiter = SharedLimiter::new(20, WINDOW, HashMap::new(), 100);
        let mut store = HashMap::new();
        let key = identity("alice");
        let now = Duration::from_secs(1_700_000_000);
        let admitted = (0..60)
            .filter(|_| connect(&limiter, &mut store, &key, now))
            .count();
        assert_eq!(admitted, 20);
        // 10 claims of 2, then one that found the window full: no more claims after that.
        assert_eq!(store[&(key.clone(), limiter.window_index(now))], 20);
        assert_eq!(
            limiter.check(&key, now),
            SharedDecision::Reject(RejectReason::Rate)
        );
    }

    #[test]
    fn an_overshooting_claim_admits_only_the_part_within_capacity() {
        let limiter = SharedLimiter::new(10, WINDOW, HashMap::new(), 100);
        let key = identity("alice");
        let now = Duration::from_secs(1_700_000_000);
        let w = limiter.window_index(now);
        // Another instance already took 9 of 10: this claim of 1 brings it to 10, usable 1.
        assert_eq!(limiter.grant(&key, w, 1, 10, now), SharedDecision::Admit);
        assert_eq!(
            limiter.check(&key, now),
            SharedDecision::Reject(RejectReason::Rate)
        );
        // A claim entirely past capacity admits nothing.
        let other = identity("bob");
        assert_eq!(
            limiter.grant(&other, w, 5, 15, now),
            SharedDecision::Reject(RejectReason::Rate)
        );
    }

    #[test]
    fn a_new_window_resets_the_share_and_the_exhaustion() {
        let limiter = SharedLimiter::new(3, WINDOW, HashMap::new(), 100);
        let mut store = HashMap::new();
        let key = identity("alice");
        let start = Duration::from_secs(1_700_000_000 / 60 * 60);
        let admitted = |now| {
            (0..10)
                .filter(|_| connect(&limiter, &mut store, &key, now))
                .count()
        };
        let mut admitted = admitted;
        assert_eq!(admitted(start), 3);
        assert_eq!(admitted(start + WINDOW - Duration::from_nanos(1)), 0);
        assert_eq!(admitted(start + WINDOW), 3);
        assert_eq!(admitted(start + 5 * WINDOW), 3);
    }

    #[test]
    fn windows_are_aligned_to_wall_clock_multiples_of_the_window() {
        let limiter = SharedLimiter::new(3, WINDOW, HashMap::new(), 100);
        assert_eq!(limiter.window_index(Duration::from_secs(59)), 0);
        assert_eq!(limiter.window_index(Duration::from_secs(60)), 1);
        assert_eq!(limiter.window_index(Duration::from_secs(3600)), 60);
    }

    #[test]
    fn overrides_apply_to_identities_and_not_to_ips() {
        let mut overrides = HashMap::new();
        overrides.insert("alice".to_owned(), 5);
        overrides.insert("192.0.2.1".to_owned(), 9);
        overrides.insert("mallory".to_owned(), 0);
        let limiter = SharedLimiter::new(2, WINDOW, overrides, 100);
        let mut store = HashMap::new();
        let now = Duration::from_secs(1_700_000_000);
        let mut count = |key: &ClientKey| {
            (0..20)
                .filter(|_| connect(&limiter, &mut store, key, now))
                .count()
        };
        assert_eq!(count(&identity("alice")), 5);
        assert_eq!(count(&identity("bob")), 2);
        assert_eq!(count(&ClientKey::from_ip("192.0.2.1".parse().unwrap())), 2);
        assert_eq!(count(&identity("mallory")), 0);
    }

    #[test]
    fn the_table_is_bounded_and_stale_entries_make_room() {
        let limiter = SharedLimiter::new(5, WINDOW, HashMap::new(), 2);
        let mut store = HashMap::new();
        let now = Duration::from_secs(1_700_000_000);
        assert!(connect(&limiter, &mut store, &identity("a"), now));
        assert!(connect(&limiter, &mut store, &identity("b"), now));
        assert_eq!(
            limiter.check(&identity("c"), now),
            SharedDecision::Reject(RejectReason::TooManyClients)
        );
        assert!(connect(&limiter, &mut store, &identity("c"), now + WINDOW));
        assert!(limiter.tracked_clients() <= 2);
    }

    proptest::proptest! {
        /// Any interleaving of connections over several instances, with claims answered in any
        /// order, admits at most each window's capacity in total.
        #[test]
        fn shares_never_admit_more_than_capacity_over_instances(
            capacity in 0..40u32,
            ops in proptest::collection::vec((0..3usize, 0..4u64, proptest::bool::ANY), 1..300),
        ) {
            let instances: Vec<_> = (0..3)
                .map(|_| SharedLimiter::new(capacity, WINDOW, HashMap::new(), 100))
                .collect();
            let key = identity("alice");
            let base = Duration::from_secs(1_700_000_000 / 60 * 60);
            let mut store: HashMap<u64, u64> = HashMap::new();
            let mut admitted: HashMap<u64, u64> = HashMap::new();
            // Claims in flight: (instance, window, amount, now), answered later when `defer`.
            let mut pending = Vec::new();
            let mut now = base;
            for (instance, advance, defer) in ops {
                // Time only moves forward, a window at a time, now and then.
                if advance == 3 {
                    now += WINDOW;
                }
                let w = instances[instance].window_index(now);
                match instances[instance].check(&key, now) {
                    SharedDecision::Admit => *admitted.entry(w).or_default() += 1,
                    SharedDecision::Reject(_) => {}
                    SharedDecision::Claim { window, amount } => {
                        let total = store.entry(window).or_default();
                        *total += u64::from(amount);
                        pending.push((instance, window, amount, *total, now));
                    }
                }
                if !defer {
                    for (i, window, amount, total, now) in pending.drain(..) {
                        if instances[i].grant(&key, window, amount, total, now) == SharedDecision::Admit {
                            *admitted.entry(window).or_default() += 1;
                        }
                    }
                }
                for count in admitted.values() {
                    proptest::prop_assert!(*count <= u64::from(capacity));
                }
            }
        }
    }
}
