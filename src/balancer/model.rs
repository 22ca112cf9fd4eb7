//! The balancer's data: the public value types ([`Pool`], [`Lease`], [`Spec`]), the pool's locked
//! [`State`] and everything it is made of, and the constants they share.
//!
//! Definitions only. The rules live next to the data they change, as inherent `impl`s in the
//! file that owns each one: counts and membership in `buckets.rs`, the tournament in
//! `tournament.rs`, the search and the slow start in `select.rs`, the queue in `queue.rs`, the
//! public API in `balancer.rs`. What is here besides fields: [`Spec`]'s default and clamp, the
//! empty values of a list and of a tournament entry, and [`Pool::with_state`] and [`Pool::lock`],
//! the only ways to the pool's lock (so the `--cfg shuttle` swap of the lock is made here only).
//!
//! This file is the leaf of the balancer: it names nothing of its parent or its siblings, so each
//! of them may name its types without making a circle. Fields are `pub(super)`: visible to the
//! balancer's files, and to nothing outside it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

// `--cfg shuttle` (scripts/concurrency-check) swaps in shuttle's lock so its scheduler can
// interleave threads at every acquisition; every other build uses std's.
#[cfg(shuttle)]
use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(shuttle))]
use std::sync::{Mutex, MutexGuard};

/// Share of its weight a ramping backend has at the start of its slow start.
pub const RAMP_START: f64 = 0.1;
/// Largest weight a backend may have (weights are 1 to this).
pub const MAX_WEIGHT: u32 = 256;

/// No backend: the end of a bucket's list.
pub(super) const NIL: u32 = u32::MAX;
/// No class: an empty leaf of a [`Tree`].
pub(super) const NO_CLASS: u16 = u16::MAX;

/// [`Node::flags`]: in its class's bucket for `count` (in rotation and below its cap).
pub(super) const LINKED: u8 = 1;
/// [`Node::flags`]: in slow start (cleared lazily once the ramp is over).
pub(super) const RAMPING: u8 = 2;

/// What a backend is in its pool: its weight, its cap and whether it is a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// 1 to [`MAX_WEIGHT`]: the backend gets connections in proportion to it.
    pub weight: u32,
    /// Connections it may hold at once (`None`: unlimited).
    pub max_connections: Option<u32>,
    /// Picked only when no primary can take the connection.
    pub backup: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            weight: 1,
            max_connections: None,
            backup: false,
        }
    }
}

impl Spec {
    /// The same spec with its weight brought into 1 to [`MAX_WEIGHT`].
    pub(super) fn clamped(self) -> Spec {
        Spec {
            weight: self.weight.clamp(1, MAX_WEIGHT),
            ..self
        }
    }
}

/// The backends of one upstream and their active-connection counts.
#[derive(Debug)]
pub struct Pool {
    state: Mutex<State>,
}

impl Pool {
    /// A pool around `state`.
    pub(super) fn with_state(state: State) -> Pool {
        Pool {
            state: Mutex::new(state),
        }
    }

    /// The pool's state, under its one lock.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, so poisoning cannot carry a broken state;
        // recover rather than propagate a panic into every connection.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Holds one connection's share of a backend's load. Dropping it releases the count.
#[derive(Debug)]
pub struct Lease {
    pub(super) pool: Arc<Pool>,
    pub(super) index: usize,
}

/// Everything a pool knows, under its one lock.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) nodes: Vec<Node>,
    pub(super) meta: Vec<Meta>,
    pub(super) classes: Vec<Class>,
    /// `trees[0]` over the primary classes, `trees[1]` over the backup ones.
    pub(super) trees: [Tree; 2],
    /// Stamps handed out so far.
    pub(super) clock: u64,
    /// Backends in rotation but at their caps, primaries and backups.
    pub(super) full: [usize; 2],
    pub(super) waiters: VecDeque<Waiter>,
    pub(super) next_waiter: u64,
}

/// What a pick reads of a backend, kept small so that 10 000 of them stay in cache.
#[derive(Debug)]
pub(super) struct Node {
    /// When it entered its bucket: of two equal scores, the older goes first.
    pub(super) stamp: u64,
    pub(super) count: u32,
    pub(super) prev: u32,
    pub(super) next: u32,
    /// Its `max_connections`, `u32::MAX` for none.
    pub(super) max: u32,
    /// Index of its class in `State::classes`.
    pub(super) class: u16,
    /// [`LINKED`] and [`RAMPING`].
    pub(super) flags: u8,
}

/// The rest of a backend, read off the hot path.
#[derive(Debug)]
pub(super) struct Meta {
    pub(super) spec: Spec,
    pub(super) in_rotation: bool,
    /// Removed by a reload: never back in rotation.
    pub(super) retired: bool,
    pub(super) ramp: Option<Ramp>,
}

/// A backend's slow start: since when, and over how long.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ramp {
    pub(super) since: Instant,
    pub(super) period: Duration,
}

/// An intrusive FIFO list of backends (indices into `State::nodes`, linked by `prev`/`next`).
#[derive(Clone, Copy, Debug)]
pub(super) struct List {
    pub(super) head: u32,
    pub(super) tail: u32,
}

impl List {
    pub(super) const EMPTY: List = List { head: NIL, tail: NIL };
}

/// The backends of one weight and role, in buckets by active count.
#[derive(Debug)]
pub(super) struct Class {
    pub(super) weight: u32,
    pub(super) backup: bool,
    /// `buckets[c]` lists the linked backends of this class with exactly `c` connections.
    pub(super) buckets: Vec<List>,
    /// No bucket below this one is non-empty (`buckets.len()` when the class is empty).
    pub(super) lowest: usize,
    /// Its leaf in its role's [`Tree`].
    pub(super) slot: usize,
}

/// A tournament over the classes of one role: `win[1]` is the class whose best backend has the
/// lowest rank, so finding the best class costs nothing and updating one costs at most
/// O(log classes) comparisons of cached ranks (at most 8: weights are 1 to 256).
#[derive(Debug, Default)]
pub(super) struct Tree {
    /// Leaves: `win[width + slot]` is the class in that slot, [`Entry::EMPTY`] while it has no
    /// linked backend; above them, the winner of each match.
    pub(super) width: usize,
    pub(super) win: Vec<Entry>,
    /// The class in each slot.
    pub(super) slots: Vec<u16>,
}

/// A class and the rank of its best backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) class: u16,
    pub(super) rank: Rank,
}

impl Entry {
    /// No class: ranks after every real entry.
    pub(super) const EMPTY: Entry = Entry {
        class: NO_CLASS,
        rank: Rank {
            score: u64::MAX,
            stamp: u64::MAX,
        },
    };
}

/// A candidate's rank: its score, then its stamp (the older first, which makes ties rotate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Rank {
    pub(super) score: u64,
    pub(super) stamp: u64,
}

/// A caller waiting in the queue (`queue.rs`).
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) exclude: Vec<usize>,
    pub(super) waker: Option<Waker>,
    /// The backend it was handed (counted for it), once served.
    pub(super) served: Option<usize>,
}
