//! The pure core of the cluster-wide limiter: local shares ("leases") of a client's window.
//!
//! Several fulcrum instances count one client's connections in a shared store (Redis, driven by
//! [`super::cluster`]). To keep the store off the hot path, an instance claims a small share of
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
//! - Overrides apply to identities, never to IP keys, as in [`super::local::RateLimiter`].
//! - At most `max_clients` keys are tracked; stale entries (older window) are swept when the
//!   table is full (at most once per window, so a flood of new keys cannot force a sweep per
//!   call), and a new key at a still-full table is rejected.
//! - A wall clock stepping back may let a later window's share be used in an earlier window; the
//!   store's count for each window still bounds what was admitted from it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::key::ClientKey;
use super::local::RejectReason;

/// What [`Shares::check`] says to do with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareDecision {
    /// Admitted from this instance's local share: no store round trip.
    Admit,
    /// Claim `amount` more of `window` from the store, then call [`Shares::grant`].
    Claim { window: u64, amount: u32 },
    /// Refused.
    Reject(RejectReason),
}

/// Local shares per client. Thread-safe through `&self`.
#[derive(Debug)]
pub struct Shares {
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

impl Shares {
    /// `window` should be non-zero (config validation's job); zero is treated as 1ns.
    pub fn new(capacity: u32, window: Duration, overrides: HashMap<String, u32>, max_clients: usize) -> Self {
        Shares {
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
    pub fn check(&self, key: &ClientKey, unix_now: Duration) -> ShareDecision {
        let window = self.window_index(unix_now);
        let capacity = self.capacity_for(key);
        if capacity == 0 {
            return ShareDecision::Reject(RejectReason::Rate);
        }
        let claim = ShareDecision::Claim {
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
                    return ShareDecision::Reject(RejectReason::TooManyClients);
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
            ShareDecision::Admit
        } else if lease.exhausted {
            ShareDecision::Reject(RejectReason::Rate)
        } else {
            claim
        }
    }

    /// Records the store's answer to a claim of `amount` for `window`: `total` is the window's
    /// count after the claim. Returns [`ShareDecision::Admit`] (one unit of the usable part is
    /// used for the connection that claimed) or [`ShareDecision::Reject`].
    pub fn grant(
        &self,
        key: &ClientKey,
        window: u64,
        amount: u32,
        total: u64,
        unix_now: Duration,
    ) -> ShareDecision {
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
            ShareDecision::Admit
        } else {
            ShareDecision::Reject(RejectReason::Rate)
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
mod tests;
