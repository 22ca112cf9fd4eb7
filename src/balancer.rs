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
//!   turns a client away. Time is passed in ([`Pool::pick_at`]); this module reads the clock only
//!   in the [`Pool::pick`] convenience wrapper and when a dropped lease serves a waiter.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
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

const NIL: u32 = u32::MAX;

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

/// The backends of one upstream and their active-connection counts.
#[derive(Debug)]
pub struct Pool {
    state: Mutex<State>,
}

/// Holds one connection's share of a backend's load. Dropping it releases the count.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// Index of the leased backend in the pool (the order given to [`Pool::new`]).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lock().release(self.index);
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

/// The queue is full: `queue_size` callers are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue is full")]
pub struct QueueFull;

impl Pool {
    /// A pool of `size` backends, all in rotation with no connections, weight 1, no cap.
    /// Pools are limited to `u32::MAX - 1` backends.
    pub fn new(size: usize) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            state: Mutex::new(State::default()),
        });
        for _ in 0..size.min(NIL as usize - 1) {
            pool.add_with(Spec::default());
        }
        pool
    }

    /// Number of backends in the pool.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`Pool::pick_at`] at the current time.
    pub fn pick(self: &Arc<Self>, exclude: &[usize]) -> Option<Lease> {
        self.pick_at(exclude, Instant::now())
    }

    /// Leases the eligible backend with the lowest `(active + 1) / weight` at `now`, skipping the
    /// indices in `exclude` (backends this connection already failed to reach): a backup only
    /// when no primary can take it (there is no queue here). `None` if no backend is left.
    pub fn pick_at(self: &Arc<Self>, exclude: &[usize], now: Instant) -> Option<Lease> {
        match self.choose(exclude, now, false) {
            Choice::Leased(lease) => Some(lease),
            Choice::Full | Choice::Nothing => None,
        }
    }

    /// Like [`Pool::pick_at`], for a caller that can queue: with `queues`, primaries that are all
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

    /// Waits, behind the callers already waiting, for a backend not in `exclude` to have room:
    /// at most `queue_size` may wait. The returned future resolves to a lease; dropped before
    /// that (a timeout), it leaves the queue and gives back a lease it may have been handed.
    pub fn wait(self: &Arc<Self>, exclude: &[usize], queue_size: usize) -> Result<Wait, QueueFull> {
        let mut state = self.lock();
        if state.waiters.len() >= queue_size {
            return Err(QueueFull);
        }
        state.next_waiter += 1;
        let id = state.next_waiter;
        state.waiters.push_back(Waiter {
            id,
            exclude: exclude.to_vec(),
            waker: None,
            served: None,
        });
        // A slot freed since the caller's `choose` goes to the queue's head right away.
        state.serve_waiters(Instant::now());
        Ok(Wait {
            pool: Arc::clone(self),
            id,
        })
    }

    /// Callers waiting in the queue (served ones included until they take their lease).
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
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

    /// Puts a backend in or out of rotation. Its count is kept either way: connections already
    /// open stay counted until their leases drop. Taking it out ends any slow start. A retired
    /// slot stays out.
    pub fn set_in_rotation(&self, index: usize, in_rotation: bool) {
        let mut state = self.lock();
        state.set_in_rotation(index, in_rotation);
        if in_rotation {
            state.serve_waiters(Instant::now());
        }
    }

    /// Adds a backend (on reload) in rotation with weight 1 and no cap, and returns its index.
    pub fn add(&self) -> usize {
        self.add_with(Spec::default())
    }

    /// Adds a backend (on reload) in rotation and returns its index: a new slot, at the end.
    pub fn add_with(&self, spec: Spec) -> usize {
        let mut state = self.lock();
        let index = state.add(spec);
        state.serve_waiters(Instant::now());
        index
    }

    /// Gives the slot of a retired backend to a new one, in rotation with `spec` and no
    /// connection, so that backends coming and going (a rotating DNS answer) do not grow the
    /// pool. Refused (`false`, nothing changed) unless the slot is retired and no lease of it is
    /// left. The caller must know that nothing else still maps the slot to its old backend (a
    /// connection of an older generation would take the new one for it).
    pub fn reuse(&self, index: usize, spec: Spec) -> bool {
        let mut state = self.lock();
        if !state.reuse(index, spec) {
            return false;
        }
        state.serve_waiters(Instant::now());
        true
    }

    /// Gives a backend a new weight, cap and role (on reload, or the weight from the admin
    /// API). Its count and rotation are kept.
    pub fn respec(&self, index: usize, spec: Spec) {
        let mut state = self.lock();
        state.respec(index, spec);
        state.serve_waiters(Instant::now());
    }

    /// Removes a backend (on reload): out of rotation for good. Its open connections keep their
    /// leases and drain.
    pub fn retire(&self, index: usize) {
        let mut state = self.lock();
        state.set_in_rotation(index, false);
        if let Some(meta) = state.meta.get_mut(index) {
            meta.retired = true;
        }
    }

    /// Puts a backend in rotation with a slow start of `period` beginning at `since`.
    pub fn ramp_up(&self, index: usize, since: Instant, period: Duration) {
        let mut state = self.lock();
        state.set_in_rotation(index, true);
        if let Some(meta) = state.meta.get_mut(index) {
            if meta.in_rotation {
                meta.ramp = Some(Ramp { since, period });
                state.nodes[index].flags |= RAMPING;
            }
        }
        state.serve_waiters(since);
    }

    /// Whether a backend is still in its slow start at `now`.
    pub fn is_ramping(&self, index: usize, now: Instant) -> bool {
        self.lock()
            .meta
            .get(index)
            .and_then(|m| m.ramp)
            .is_some_and(|r| r.fraction(now) < 1.0)
    }

    /// Whether any backend is in rotation.
    pub fn any_in_rotation(&self) -> bool {
        self.lock().meta.iter().any(|m| m.in_rotation)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, so poisoning cannot carry a broken state;
        // recover rather than propagate a panic into every connection.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A caller's place in the queue (see [`Pool::wait`]).
#[derive(Debug)]
pub struct Wait {
    pool: Arc<Pool>,
    id: u64,
}

impl Future for Wait {
    type Output = Lease;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Lease> {
        let mut state = self.pool.lock();
        let Some(position) = state.waiters.iter().position(|w| w.id == self.id) else {
            // Not in the queue any more: cannot happen while this future lives; wait forever
            // rather than invent a lease (the caller's timeout ends it).
            return Poll::Pending;
        };
        if let Some(index) = state.waiters[position].served {
            state.waiters.remove(position);
            drop(state);
            return Poll::Ready(Lease {
                pool: Arc::clone(&self.pool),
                index,
            });
        }
        state.waiters[position].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(position) = state.waiters.iter().position(|w| w.id == self.id) {
            if let Some(waiter) = state.waiters.remove(position) {
                if let Some(index) = waiter.served {
                    // Handed a slot it will not use: give it to the next waiter, or back.
                    state.release(index);
                }
            }
        }
    }
}

impl Spec {
    fn clamped(self) -> Spec {
        Spec {
            weight: self.weight.clamp(1, MAX_WEIGHT),
            ..self
        }
    }
}

/// In its class's bucket for `count`: in rotation and below its cap.
const LINKED: u8 = 1;
/// In slow start (cleared lazily once the ramp is over).
const RAMPING: u8 = 2;
/// No class: an empty leaf of a [`Tree`].
const NO_CLASS: u16 = u16::MAX;

/// What a pick reads of a backend, kept small so that 10 000 of them stay in cache.
#[derive(Debug)]
struct Node {
    /// When it entered its bucket: of two equal scores, the older goes first.
    stamp: u64,
    count: u32,
    prev: u32,
    next: u32,
    /// Its `max_connections`, `u32::MAX` for none.
    max: u32,
    /// Index of its class in `State::classes`.
    class: u16,
    flags: u8,
}

/// The rest of a backend, read off the hot path.
#[derive(Debug)]
struct Meta {
    spec: Spec,
    in_rotation: bool,
    /// Removed by a reload: never back in rotation.
    retired: bool,
    ramp: Option<Ramp>,
}

#[derive(Clone, Copy, Debug)]
struct Ramp {
    since: Instant,
    period: Duration,
}

impl Ramp {
    /// Share of its weight the backend has at `now`: [`RAMP_START`] growing linearly to 1.
    fn fraction(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        let progress = (elapsed / self.period.as_secs_f64()).min(1.0);
        RAMP_START + (1.0 - RAMP_START) * progress
    }
}

#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
}

impl List {
    const EMPTY: List = List { head: NIL, tail: NIL };
}

/// The backends of one weight and role, in buckets by active count.
#[derive(Debug)]
struct Class {
    weight: u32,
    backup: bool,
    /// `buckets[c]` lists the linked backends of this class with exactly `c` connections.
    buckets: Vec<List>,
    /// No bucket below this one is non-empty (`buckets.len()` when the class is empty).
    lowest: usize,
    /// Its leaf in its role's [`Tree`].
    slot: usize,
}

/// A tournament over the classes of one role: `win[1]` is the class whose best backend has the
/// lowest rank, so finding the best class costs nothing and updating one costs at most
/// O(log classes) comparisons of cached ranks (at most 8: weights are 1 to 256).
#[derive(Debug, Default)]
struct Tree {
    /// Leaves: `win[width + slot]` is the class in that slot, [`Entry::EMPTY`] while it has no
    /// linked backend; above them, the winner of each match.
    width: usize,
    win: Vec<Entry>,
    /// The class in each slot.
    slots: Vec<u16>,
}

/// A class and the rank of its best backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    class: u16,
    rank: Rank,
}

impl Entry {
    const EMPTY: Entry = Entry {
        class: NO_CLASS,
        rank: Rank {
            score: u64::MAX,
            stamp: u64::MAX,
        },
    };

    fn winner(a: Entry, b: Entry) -> Entry {
        // An empty entry ranks after every real one.
        if b.rank < a.rank {
            b
        } else {
            a
        }
    }
}

/// `(count + 1) / weight` in fixed point with 24 fraction bits, which orders scores exactly:
/// with weights up to 256, two different scores differ by at least 1/65536, that is by at
/// least 256 units, so flooring never merges or swaps them, and equal scores get equal keys.
fn score(count: u32, weight: u32) -> u64 {
    ((u64::from(count) + 1) << SCORE_BITS) / u64::from(weight)
}

const SCORE_BITS: u32 = 24;

/// A candidate's rank: its score, then its stamp (the older first, which makes ties rotate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    score: u64,
    stamp: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    exclude: Vec<usize>,
    waker: Option<Waker>,
    /// The backend it was handed (counted for it), once served.
    served: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<Node>,
    meta: Vec<Meta>,
    classes: Vec<Class>,
    /// `trees[0]` over the primary classes, `trees[1]` over the backup ones.
    trees: [Tree; 2],
    /// Stamps handed out so far.
    clock: u64,
    /// Backends in rotation but at their caps, primaries and backups.
    full: [usize; 2],
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
}

/// What a search found.
enum Found {
    Index(usize),
    Full,
    Nothing,
}

/// A class's tournament entry: the rank of its best backend ([`Entry::EMPTY`] if it has none).
fn entry(classes: &[Class], nodes: &[Node], class: u16) -> Entry {
    let Some(c) = classes.get(usize::from(class)) else {
        return Entry::EMPTY;
    };
    match c.buckets.get(c.lowest).map(|l| l.head) {
        Some(head) if head != NIL => Entry {
            class,
            rank: Rank {
                score: score(c.lowest as u32, c.weight),
                stamp: nodes[head as usize].stamp,
            },
        },
        _ => Entry::EMPTY,
    }
}

impl Tree {
    /// Sets one slot's entry and replays the matches above it, stopping where nothing changes.
    fn update(&mut self, slot: usize, entry: Entry) {
        let mut i = self.width + slot;
        self.win[i] = entry;
        i /= 2;
        while i >= 1 {
            let winner = Entry::winner(self.win[2 * i], self.win[2 * i + 1]);
            if self.win[i] == winner {
                break;
            }
            self.win[i] = winner;
            i /= 2;
        }
    }

    /// Adds a class (rare: a weight not seen before) and replays every match.
    fn push(&mut self, class: u16, entries: impl Fn(u16) -> Entry) -> usize {
        self.slots.push(class);
        self.width = self.slots.len().next_power_of_two();
        self.win = vec![Entry::EMPTY; 2 * self.width];
        for (slot, &class) in self.slots.iter().enumerate() {
            self.win[self.width + slot] = entries(class);
        }
        for i in (1..self.width).rev() {
            self.win[i] = Entry::winner(self.win[2 * i], self.win[2 * i + 1]);
        }
        self.slots.len() - 1
    }

    /// The best class of this role (with one class, that one: [`State::refresh`] skips the
    /// tournament then, and the caller checks that the class has a backend).
    fn best(&self) -> Option<u16> {
        match self.slots[..] {
            [only] => Some(only),
            _ => self.win.get(1).map(|e| e.class).filter(|&c| c != NO_CLASS),
        }
    }
}

impl State {
    /// The class for `spec`'s weight and role, made if needed.
    fn class_for(&mut self, spec: Spec) -> u16 {
        let spec = spec.clamped();
        if let Some(i) = self
            .classes
            .iter()
            .position(|c| c.weight == spec.weight && c.backup == spec.backup)
        {
            return i as u16;
        }
        let class = self.classes.len() as u16;
        self.classes.push(Class {
            weight: spec.weight,
            backup: spec.backup,
            buckets: vec![List::EMPTY],
            lowest: 1,
            slot: 0,
        });
        let (classes, nodes) = (&self.classes, &self.nodes);
        let slot = self.trees[usize::from(spec.backup)].push(class, |c| entry(classes, nodes, c));
        self.classes[usize::from(class)].slot = slot;
        class
    }

    /// Replays the tournament above a class whose best backend may have changed.
    #[inline]
    fn refresh(&mut self, class: u16) {
        if self.classes.len() == 1 {
            return; // the common pool: every backend one weight, no backup
        }
        let c = &self.classes[usize::from(class)];
        let (role, slot) = (usize::from(c.backup), c.slot);
        if self.trees[role].slots.len() == 1 {
            return; // one class of this role: it is the best one whenever it has a backend
        }
        let entry = entry(&self.classes, &self.nodes, class);
        self.trees[role].update(slot, entry);
    }

    /// In rotation but not in a bucket: at (or, after a lower cap, above) its cap.
    fn is_full(&self, index: usize) -> bool {
        self.meta[index].in_rotation && self.nodes[index].flags & LINKED == 0
    }

    /// Runs a change to one backend, keeping the counts of full backends.
    fn tracked(&mut self, index: usize, change: impl FnOnce(&mut State)) {
        let before = (self.is_full(index), usize::from(self.meta[index].spec.backup));
        change(self);
        let after = (self.is_full(index), usize::from(self.meta[index].spec.backup));
        if before.0 {
            self.full[before.1] -= 1;
        }
        if after.0 {
            self.full[after.1] += 1;
        }
    }

    /// A backend's node and metadata as it starts: no connection, out of rotation.
    fn fresh(&mut self, spec: Spec) -> (Node, Meta) {
        let node = Node {
            stamp: 0,
            count: 0,
            prev: NIL,
            next: NIL,
            max: spec.max_connections.unwrap_or(u32::MAX),
            class: self.class_for(spec),
            flags: 0,
        };
        let meta = Meta {
            spec: spec.clamped(),
            in_rotation: false,
            retired: false,
            ramp: None,
        };
        (node, meta)
    }

    fn add(&mut self, spec: Spec) -> usize {
        let (node, meta) = self.fresh(spec);
        self.nodes.push(node);
        self.meta.push(meta);
        let index = self.nodes.len() - 1;
        self.set_in_rotation(index, true);
        index
    }

    fn reuse(&mut self, index: usize, spec: Spec) -> bool {
        let free =
            self.meta.get(index).is_some_and(|m| m.retired && !m.in_rotation) && self.nodes[index].count == 0;
        if !free {
            return false;
        }
        // Out of rotation: in no bucket and not counted as full, so only its fields change.
        (self.nodes[index], self.meta[index]) = self.fresh(spec);
        self.set_in_rotation(index, true);
        true
    }

    fn respec(&mut self, index: usize, spec: Spec) {
        let spec = spec.clamped();
        if self.meta.get(index).is_none_or(|m| m.spec == spec) {
            return;
        }
        self.tracked(index, |state| {
            state.unlink_node(index);
            let class = state.class_for(spec);
            state.nodes[index].class = class;
            state.nodes[index].max = spec.max_connections.unwrap_or(u32::MAX);
            state.meta[index].spec = spec;
            state.link_node(index);
        });
    }

    fn set_in_rotation(&mut self, index: usize, in_rotation: bool) {
        let Some(meta) = self.meta.get_mut(index) else {
            return;
        };
        if !in_rotation {
            meta.ramp = None;
            self.nodes[index].flags &= !RAMPING;
        }
        if meta.in_rotation == in_rotation || (in_rotation && meta.retired) {
            return;
        }
        self.tracked(index, |state| {
            state.meta[index].in_rotation = in_rotation;
            if in_rotation {
                state.link_node(index);
            } else {
                state.unlink_node(index);
            }
        });
    }

    /// Links a node into its bucket if it is in rotation and below its cap.
    fn link_node(&mut self, index: usize) {
        let (node, meta) = (&self.nodes[index], &self.meta[index]);
        if node.flags & LINKED != 0 || !meta.in_rotation || node.count >= node.max {
            return;
        }
        let (class, count) = (node.class, node.count);
        self.push_back(class, count, index as u32);
        self.nodes[index].flags |= LINKED;
        self.refresh(class);
    }

    fn unlink_node(&mut self, index: usize) {
        let node = &self.nodes[index];
        if node.flags & LINKED == 0 {
            return;
        }
        let (class, count) = (node.class, node.count);
        self.unlink(class, count, index as u32);
        self.nodes[index].flags &= !LINKED;
        self.refresh(class);
    }

    /// Whether some backend of a role that is not excluded is at its cap.
    fn any_full(&self, backup: bool, exclude: &[usize]) -> bool {
        let full = self.full[usize::from(backup)];
        if full == 0 || exclude.is_empty() {
            return full > 0;
        }
        let excluded = exclude
            .iter()
            .enumerate()
            .filter(|&(k, &i)| {
                !exclude[..k].contains(&i)
                    && self.meta.get(i).is_some_and(|m| m.spec.backup == backup)
                    && self.is_full(i)
            })
            .count();
        full > excluded
    }

    /// The search of [`Pool::choose`]: a counted index, or why there is none.
    fn choose(&mut self, exclude: &[usize], now: Instant, queues: bool) -> Found {
        if let Some(index) = self.search(false, exclude, now) {
            return Found::Index(self.take(index));
        }
        let primaries_full = self.any_full(false, exclude);
        if primaries_full && queues {
            return Found::Full;
        }
        if let Some(index) = self.search(true, exclude, now) {
            return Found::Index(self.take(index));
        }
        if primaries_full || self.any_full(true, exclude) {
            Found::Full
        } else {
            Found::Nothing
        }
    }

    /// The eligible backend of a role with the lowest rank, not in `exclude`, with slow-start
    /// caps applied; not counted yet. The tournament's winner, unless it is excluded or ramping.
    fn search(&mut self, backup: bool, exclude: &[usize], now: Instant) -> Option<usize> {
        let class = &self.classes[usize::from(self.trees[usize::from(backup)].best()?)];
        let head = class.buckets.get(class.lowest)?.head as usize;
        if self.nodes[head].flags & RAMPING == 0 && !exclude.contains(&head) {
            return Some(head);
        }
        self.search_all(backup, exclude, now)
    }

    /// [`State::search`] the long way: every class, every bucket that may hold a better rank.
    fn search_all(&mut self, backup: bool, exclude: &[usize], now: Instant) -> Option<usize> {
        // The best candidate so far, and the best one its ramp held back.
        let mut best: Option<(usize, Rank)> = None;
        let mut capped: Option<(usize, Rank)> = None;
        for c in 0..self.classes.len() {
            let class = &self.classes[c];
            if class.backup != backup {
                continue;
            }
            let weight = class.weight;
            let mut bucket = class.lowest;
            'class: while bucket < self.classes[c].buckets.len() {
                let score = score(bucket as u32, weight);
                if best.is_some_and(|(_, b)| b.score < score) {
                    break; // nothing in this class can beat the best any more
                }
                let mut cursor = self.classes[c].buckets[bucket].head;
                while cursor != NIL {
                    let index = cursor as usize;
                    let rank = Rank {
                        score,
                        stamp: self.nodes[index].stamp,
                    };
                    if !exclude.contains(&index) {
                        if self.ramp_allows(index, backup, now) {
                            if best.is_none_or(|(_, b)| rank < b) {
                                best = Some((index, rank));
                            }
                            break 'class;
                        }
                        if capped.is_none_or(|(_, b)| rank < b) {
                            capped = Some((index, rank));
                        }
                    }
                    cursor = self.nodes[index].next;
                }
                bucket += 1;
            }
        }
        best.or(capped).map(|(index, _)| index)
    }

    /// Moves a backend up one connection (out of its class's buckets at its cap).
    fn take(&mut self, index: usize) -> usize {
        let node = &self.nodes[index];
        let (class, count, max) = (node.class, node.count, node.max);
        // Every candidate is linked: it comes out of bucket `count`.
        self.unlink(class, count, index as u32);
        self.nodes[index].count = count + 1;
        if count + 1 < max {
            self.push_back(class, count + 1, index as u32);
        } else {
            self.nodes[index].flags &= !LINKED;
            self.full[usize::from(self.meta[index].spec.backup)] += 1;
        }
        self.refresh(class);
        index
    }

    /// Whether a backend may take one more connection under its slow start (always, without one).
    fn ramp_allows(&mut self, index: usize, backup: bool, now: Instant) -> bool {
        if self.nodes[index].flags & RAMPING == 0 {
            return true;
        }
        let Some(ramp) = self.meta[index].ramp else {
            return true;
        };
        let fraction = ramp.fraction(now);
        if fraction >= 1.0 {
            self.meta[index].ramp = None;
            self.nodes[index].flags &= !RAMPING;
            return true;
        }
        let (count, weight) = (self.nodes[index].count, self.meta[index].spec.weight);
        let Some(others) = self.best_score_except(index, backup) else {
            return true; // nobody to share with
        };
        let others = others as f64 / f64::from(1u32 << SCORE_BITS);
        let cap = (fraction * f64::from(weight) * others).ceil();
        f64::from(count) < cap
    }

    /// The lowest score among linked backends of the same role other than `index`.
    fn best_score_except(&self, index: usize, backup: bool) -> Option<u64> {
        let mut best: Option<u64> = None;
        for class in self.classes.iter().filter(|c| c.backup == backup) {
            let found = class
                .buckets
                .iter()
                .enumerate()
                .skip(class.lowest)
                .find_map(|(bucket, list)| {
                    let mut cursor = list.head;
                    while cursor != NIL {
                        if cursor as usize != index {
                            return Some(score(bucket as u32, class.weight));
                        }
                        cursor = self.nodes[cursor as usize].next;
                    }
                    None
                });
            if let Some(score) = found {
                if best.is_none_or(|b| score < b) {
                    best = Some(score);
                }
            }
        }
        best
    }

    fn release(&mut self, index: usize) {
        let Some(node) = self.nodes.get(index) else {
            return;
        };
        let (count, class) = (node.count, node.class);
        if count == 0 {
            return; // unreachable with leases: each release pairs with one pick
        }
        if node.flags & LINKED != 0 {
            self.unlink(class, count, index as u32);
            self.nodes[index].count = count - 1;
            self.push_back(class, count - 1, index as u32);
            self.refresh(class);
        } else {
            // Out of rotation (stays out) or at its cap (back in below it).
            self.tracked(index, |state| {
                state.nodes[index].count = count - 1;
                state.link_node(index);
            });
        }
        if !self.waiters.is_empty() {
            self.serve_waiters(Instant::now());
        }
    }

    /// Hands free slots to the waiters, first come first served; wakes those served.
    fn serve_waiters(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].served.is_some() {
                i += 1;
                continue;
            }
            let exclude = std::mem::take(&mut self.waiters[i].exclude);
            let found = self.choose(&exclude, now, true);
            self.waiters[i].exclude = exclude;
            match found {
                Found::Index(index) => {
                    let waiter = &mut self.waiters[i];
                    waiter.served = Some(index);
                    if let Some(waker) = waiter.waker.take() {
                        waker.wake();
                    }
                    i += 1;
                }
                // No room for this one: later ones wait behind it (first come, first served).
                Found::Full | Found::Nothing => return,
            }
        }
    }

    fn push_back(&mut self, class: u16, bucket: u32, index: u32) {
        let bucket = bucket as usize;
        let class = &mut self.classes[usize::from(class)];
        let was_empty = class.lowest >= class.buckets.len();
        if class.buckets.len() <= bucket {
            class.buckets.resize(bucket + 1, List::EMPTY);
        }
        class.lowest = if was_empty {
            bucket
        } else {
            class.lowest.min(bucket)
        };
        let list = &mut class.buckets[bucket];
        let tail = list.tail;
        if tail == NIL {
            list.head = index;
        } else {
            self.nodes[tail as usize].next = index;
        }
        list.tail = index;
        self.clock += 1;
        let node = &mut self.nodes[index as usize];
        node.prev = tail;
        node.next = NIL;
        node.stamp = self.clock;
    }

    fn unlink(&mut self, class: u16, bucket: u32, index: u32) {
        let (prev, next) = {
            let node = &self.nodes[index as usize];
            (node.prev, node.next)
        };
        let class = &mut self.classes[usize::from(class)];
        let list = &mut class.buckets[bucket as usize];
        if prev == NIL {
            list.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        // Eagerly past empty buckets (`buckets.len()` when the class is empty).
        while class.lowest < class.buckets.len() && class.buckets[class.lowest].head == NIL {
            class.lowest += 1;
        }
    }
}

#[cfg(test)]
mod tests;
