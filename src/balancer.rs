//! Weighted least-connections backend selection: which backend gets the next connection.
//!
//! A [`Pool`] tracks, for each backend of one upstream, how many connections it holds, its weight,
//! its cap, whether it is a backup and whether it is in rotation. [`Pool::pick`] returns a
//! [`Lease`] on the backend minimizing `(active + 1) / weight` (HAProxy's `leastconn`); the lease
//! *is* the count: it is taken at selection (before any dial) and given back when the lease is
//! dropped, so no error path can leak load. Ties are broken round-robin.
//!
//! Structure (chosen by `benches/balancer.rs`, numbers in README): backends are grouped by weight
//! into classes; inside a class they sit in buckets by active count, each bucket an intrusive
//! FIFO list, all under one short `std::sync::Mutex`. A class's best backend is the head of its
//! lowest non-empty bucket; a small tournament tree over the classes (at most 256 per role)
//! keeps the class whose best backend ranks first, by exact score and then by the time it entered
//! its bucket. So a pick costs O(1) in the pool size and O(log distinct weights) in the worst
//! case, and the oldest of equal scores goes first, which makes ties round-robin within and across
//! weights. This module does no I/O and knows nothing of sockets, health probes or metrics; it
//! only counts.
//!
//! - **Caps**: a backend at its `max_connections` leaves its bucket until a lease of it drops.
//! - **Backups** are picked only when no primary can take the connection: none is in rotation (or
//!   each is excluded for this connection), or every one is at its cap and the caller does not
//!   queue ([`Pool::choose`]).
//! - **The queue**: when every eligible backend is at its cap, a caller may wait
//!   ([`Pool::wait`]). Waiters are served in order: a freed slot (a dropped lease, a backend
//!   back in rotation) is handed to the first waiter under the pool's lock, so a new arrival
//!   never overtakes it, and a waiter holds no lease until it is served.
//! - **Slow start**: a backend put back with [`Pool::ramp_up`] has an effective weight that grows
//!   from [`RAMP_START`] of its weight to all of it over a period, as HAProxy's does: while
//!   ramping it is eligible only while `count < ceil(f * weight * s)`, where `s` is the best
//!   `(active + 1) / weight` among the other eligible backends and `f` the ramp's fraction. When
//!   no other backend can take the connection, a capped backend still gets it: the ramp never
//!   turns a client away.
//!
//! # Time
//! Time is passed in: every method that may hand a backend to a caller or a waiter takes `now`
//! (the slow start is the only rule that reads it). The one place that reads the clock is a slot
//! given back by a `Drop` (a [`Lease`], or a [`Wait`] handed a slot it will not use) while callers
//! are queued: a `Drop` takes no argument, and the freed slot must go to the first waiter at once,
//! under the lock that frees it (left for the next call with a `now`, it could wait for a call
//! that never comes). See `queue.rs`.
//!
//! # Files
//! Every file names only files below it, so the balancer's files form no circle: `model` is the
//! leaf, and each rule is an inherent `impl` in the file that owns it (a method call needs no
//! import).
//! - this file: the API ([`Pool`]'s methods, [`Lease`], [`Choice`]); it names `model`, `select`
//!   and `queue`;
//! - `model`: the data ([`Pool`], [`Lease`], [`Spec`], the locked state and its parts, the
//!   constants) and the lock; names nothing of the balancer;
//! - `buckets`: classes and their buckets, and every change to a backend's count or membership;
//! - `tournament`: the tree over the classes that keeps the best one on top, and the score;
//! - `select`: the search (least rank, backups, caps) and the slow start;
//! - `queue`: the bounded FIFO queue of callers waiting for a slot.

mod buckets;
mod model;
mod queue;
mod select;
mod tournament;

use std::sync::Arc;
use std::time::{Duration, Instant};

use model::{State, NIL};
use select::Found;

pub use model::{Lease, Pool, Spec, MAX_WEIGHT, RAMP_START};
pub use queue::{QueueFull, Wait};

impl Lease {
    /// Index of the leased backend in the pool (the order given to [`Pool::new`]).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lock().give_back(self.index);
    }
}

/// The outcome of [`Pool::choose`].
#[derive(Debug)]
pub enum Choice {
    /// A backend, counted.
    Leased(Lease),
    /// Every backend that could take the connection is at its cap: the caller may queue.
    Full,
    /// No backend can take the connection (none in rotation, or all excluded).
    Nothing,
}

impl Pool {
    /// A pool of `size` backends, all in rotation with no connections, weight 1, no cap.
    /// Pools are limited to `u32::MAX - 1` backends.
    pub fn new(size: usize) -> Arc<Pool> {
        // Nobody waits on a pool being made: no queue to serve, so no time needed.
        let mut state = State::default();
        for _ in 0..size.min(NIL as usize - 1) {
            state.add(Spec::default());
        }
        Arc::new(Pool::with_state(state))
    }

    /// Number of backends in the pool.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Leases the eligible backend with the lowest `(active + 1) / weight` at `now`, skipping the
    /// indices in `exclude` (backends this connection already failed to reach): a backup only
    /// when no primary can take it (there is no queue here). `None` if no backend is left.
    pub fn pick(self: &Arc<Self>, exclude: &[usize], now: Instant) -> Option<Lease> {
        match self.choose(exclude, now, false) {
            Choice::Leased(lease) => Some(lease),
            Choice::Full | Choice::Nothing => None,
        }
    }

    /// Like [`Pool::pick`], for a caller that can queue: with `queues`, primaries that are all
    /// at their caps answer [`Choice::Full`] (wait with [`Pool::wait`]) instead of falling over
    /// to the backups.
    pub fn choose(self: &Arc<Self>, exclude: &[usize], now: Instant, queues: bool) -> Choice {
        let mut state = self.lock();
        match state.choose(exclude, now, queues) {
            Found::Index(index) => Choice::Leased(Lease {
                pool: Arc::clone(self),
                index,
            }),
            Found::Full => Choice::Full,
            Found::Nothing => Choice::Nothing,
        }
    }

    /// Active connections of one backend (0 for an index out of range).
    pub fn active(&self, index: usize) -> u32 {
        self.lock().nodes.get(index).map_or(0, |n| n.count)
    }

    /// Active connections of every backend, in pool order.
    pub fn active_all(&self) -> Vec<u32> {
        self.lock().nodes.iter().map(|n| n.count).collect()
    }

    /// The weight of one backend (0 for an index out of range).
    pub fn weight(&self, index: usize) -> u32 {
        self.lock().meta.get(index).map_or(0, |m| m.spec.weight)
    }

    /// The weight, cap and role of one backend as the pool has them now.
    pub fn spec(&self, index: usize) -> Option<Spec> {
        self.lock().meta.get(index).map(|m| m.spec)
    }

    /// Puts a backend in or out of rotation at `now`. Its count is kept either way: connections
    /// already open stay counted until their leases drop. Taking it out ends any slow start. A
    /// retired slot stays out.
    pub fn set_in_rotation(&self, index: usize, in_rotation: bool, now: Instant) {
        let mut state = self.lock();
        state.set_in_rotation(index, in_rotation);
        if in_rotation {
            state.serve_waiters(now);
        }
    }

    /// Adds a backend (on reload) in rotation with weight 1 and no cap, and returns its index.
    pub fn add(&self, now: Instant) -> usize {
        self.add_with(Spec::default(), now)
    }

    /// Adds a backend (on reload) in rotation at `now` and returns its index: a new slot, at the
    /// end.
    pub fn add_with(&self, spec: Spec, now: Instant) -> usize {
        let mut state = self.lock();
        let index = state.add(spec);
        state.serve_waiters(now);
        index
    }

    /// Gives the slot of a retired backend to a new one, in rotation at `now` with `spec` and no
    /// connection, so that backends coming and going (a rotating DNS answer) do not grow the
    /// pool. Refused (`false`, nothing changed) unless the slot is retired and no lease of it is
    /// left. The caller must know that nothing else still maps the slot to its old backend (a
    /// connection of an older generation would take the new one for it).
    pub fn reuse(&self, index: usize, spec: Spec, now: Instant) -> bool {
        let mut state = self.lock();
        if !state.reuse(index, spec) {
            return false;
        }
        state.serve_waiters(now);
        true
    }

    /// Gives a backend a new weight, cap and role (on reload, or the weight from the admin
    /// API) at `now`. Its count and rotation are kept.
    pub fn respec(&self, index: usize, spec: Spec, now: Instant) {
        let mut state = self.lock();
        state.respec(index, spec);
        state.serve_waiters(now);
    }

    /// Removes a backend (on reload): out of rotation for good. Its open connections keep their
    /// leases and drain.
    pub fn retire(&self, index: usize) {
        self.lock().retire(index);
    }

    /// Puts a backend in rotation with a slow start of `period` beginning at `since`.
    pub fn ramp_up(&self, index: usize, since: Instant, period: Duration) {
        let mut state = self.lock();
        state.ramp_up(index, since, period);
        state.serve_waiters(since);
    }

    /// Whether a backend is still in its slow start at `now`.
    pub fn is_ramping(&self, index: usize, now: Instant) -> bool {
        self.lock().is_ramping(index, now)
    }

    /// Whether any backend is in rotation.
    pub fn any_in_rotation(&self) -> bool {
        self.lock().meta.iter().any(|m| m.in_rotation)
    }
}

#[cfg(test)]
mod tests;
