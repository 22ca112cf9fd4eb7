//! Least-connections backend selection: which backend gets the next connection.
//!
//! A [`Pool`] tracks, for each backend of one upstream, how many connections it holds and whether
//! it is in rotation. [`Pool::pick`] returns a [`Lease`] on the backend with the fewest active
//! connections; the lease *is* the count: it is taken at selection (before any dial) and given back
//! when the lease is dropped, so no error path can leak load. Ties are broken round-robin.
//!
//! Structure (chosen by `benches/balancer.rs`, numbers in README): backends sit in buckets by
//! active count, each bucket an intrusive FIFO list, under one short `std::sync::Mutex`. Picking
//! takes the head of the lowest non-empty bucket and moves it to the tail of the next bucket;
//! releasing moves it to the tail of the bucket below. Both are O(1) whatever the pool size, and
//! FIFO order inside a bucket is what makes ties round-robin. This module does no I/O and knows
//! nothing of sockets, health probes or metrics; it only counts.
//!
//! Slow start: a backend put back with [`Pool::ramp_up`] is capped for a period so it is not
//! handed every new connection just because it has the fewest. While ramping, it is eligible
//! only while `count < ceil(f * (m + 1))`, where `m` is the lowest count among the other
//! in-rotation backends and `f` grows linearly from [`RAMP_START`] to 1 over the period. When no
//! other backend can take the connection, a capped backend still gets it: the ramp never turns a
//! client away. Time is passed in ([`Pool::pick_at`]); this module never reads a clock except in
//! the [`Pool::pick`] convenience wrapper.

use std::sync::Arc;
use std::time::{Duration, Instant};

// `--cfg shuttle` (scripts/concurrency-check) swaps in shuttle's lock so its scheduler can
// interleave threads at every acquisition; every other build uses std's.
#[cfg(shuttle)]
use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(shuttle))]
use std::sync::{Mutex, MutexGuard};

/// Share of its fair load a ramping backend may take at the start of its slow start.
pub const RAMP_START: f64 = 0.1;

const NIL: u32 = u32::MAX;

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

impl Pool {
    /// A pool of `size` backends, all in rotation with no connections.
    /// Pools are limited to `u32::MAX - 1` backends.
    pub fn new(size: usize) -> Arc<Pool> {
        let size = size.min(NIL as usize - 1);
        let mut state = State {
            nodes: Vec::with_capacity(size),
            buckets: vec![List::EMPTY],
            lowest: 0,
        };
        for i in 0..size as u32 {
            state.nodes.push(Node {
                count: 0,
                in_rotation: true,
                retired: false,
                ramp: None,
                prev: NIL,
                next: NIL,
            });
            state.push_back(0, i);
        }
        Arc::new(Pool {
            state: Mutex::new(state),
        })
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

    /// Leases the in-rotation backend with the fewest active connections, skipping the indices in
    /// `exclude` (backends this connection already failed to reach) and, while another backend
    /// can take the connection, backends capped by their slow start at `now`. `None` if no
    /// backend is left.
    pub fn pick_at(self: &Arc<Self>, exclude: &[usize], now: Instant) -> Option<Lease> {
        let index = self.lock().pick(exclude, now)?;
        Some(Lease {
            pool: Arc::clone(self),
            index,
        })
    }

    /// Active connections of one backend (0 for an index out of range).
    pub fn active(&self, index: usize) -> u32 {
        self.lock().nodes.get(index).map_or(0, |n| n.count)
    }

    /// Active connections of every backend, in pool order.
    pub fn active_all(&self) -> Vec<u32> {
        self.lock().nodes.iter().map(|n| n.count).collect()
    }

    /// Puts a backend in or out of rotation. Its count is kept either way: connections already
    /// open stay counted until their leases drop. Taking it out ends any slow start. A retired
    /// slot stays out.
    pub fn set_in_rotation(&self, index: usize, in_rotation: bool) {
        self.lock().set_in_rotation(index, in_rotation);
    }

    /// Adds a backend (on reload) in rotation and returns its index. Slots are never reused: a
    /// connection of an older generation may still map a retired slot to the backend it had.
    pub fn add(&self) -> usize {
        let mut state = self.lock();
        state.nodes.push(Node {
            count: 0,
            in_rotation: false,
            retired: false,
            ramp: None,
            prev: NIL,
            next: NIL,
        });
        let index = state.nodes.len() - 1;
        state.set_in_rotation(index, true);
        index
    }

    /// Removes a backend (on reload): out of rotation for good. Its open connections keep their
    /// leases and drain.
    pub fn retire(&self, index: usize) {
        let mut state = self.lock();
        state.set_in_rotation(index, false);
        if let Some(node) = state.nodes.get_mut(index) {
            node.retired = true;
        }
    }

    /// Puts a backend in rotation with a slow start of `period` beginning at `since`.
    pub fn ramp_up(&self, index: usize, since: Instant, period: Duration) {
        let mut state = self.lock();
        state.set_in_rotation(index, true);
        if let Some(node) = state.nodes.get_mut(index) {
            node.ramp = Some(Ramp { since, period });
        }
    }

    /// Whether a backend is still in its slow start at `now`.
    pub fn is_ramping(&self, index: usize, now: Instant) -> bool {
        self.lock()
            .nodes
            .get(index)
            .and_then(|n| n.ramp)
            .is_some_and(|r| r.fraction(now) < 1.0)
    }

    /// Whether any backend is in rotation.
    pub fn any_in_rotation(&self) -> bool {
        self.lock().nodes.iter().any(|n| n.in_rotation)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, so poisoning cannot carry a broken state;
        // recover rather than propagate a panic into every connection.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct Node {
    count: u32,
    in_rotation: bool,
    /// Removed by a reload: never back in rotation.
    retired: bool,
    /// Slow start in progress, cleared lazily once over.
    ramp: Option<Ramp>,
    prev: u32,
    next: u32,
}

#[derive(Clone, Copy, Debug)]
struct Ramp {
    since: Instant,
    period: Duration,
}

impl Ramp {
    /// Share of its fair load the backend may take at `now`: [`RAMP_START`] growing linearly to 1.
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

#[derive(Debug)]
struct State {
    nodes: Vec<Node>,
    /// `buckets[c]` lists the in-rotation backends with exactly `c` active connections.
    buckets: Vec<List>,
    /// No bucket below this one is non-empty.
    lowest: usize,
}

impl State {
    fn set_in_rotation(&mut self, index: usize, in_rotation: bool) {
        let Some(node) = self.nodes.get_mut(index) else {
            return;
        };
        if !in_rotation {
            node.ramp = None;
        }
        if node.in_rotation == in_rotation || (in_rotation && node.retired) {
            return;
        }
        let count = node.count;
        node.in_rotation = in_rotation;
        if in_rotation {
            self.push_back(count, index as u32);
        } else {
            self.unlink(count, index as u32);
        }
    }

    fn pick(&mut self, exclude: &[usize], now: Instant) -> Option<usize> {
        while self.lowest < self.buckets.len() && self.buckets[self.lowest].head == NIL {
            self.lowest += 1;
        }
        // The first backend skipped for its slow start: taken if nobody else can be.
        let mut capped: Option<(usize, u32)> = None;
        let mut bucket = self.lowest;
        while bucket < self.buckets.len() {
            let mut cursor = self.buckets[bucket].head;
            while cursor != NIL {
                if !exclude.contains(&(cursor as usize)) {
                    if self.ramp_allows(cursor, now) {
                        return Some(self.take(bucket, cursor));
                    }
                    capped.get_or_insert((bucket, cursor));
                }
                cursor = self.nodes[cursor as usize].next;
            }
            bucket += 1;
        }
        capped.map(|(bucket, cursor)| self.take(bucket, cursor))
    }

    /// Moves a backend from its bucket to the next one up: one more connection.
    fn take(&mut self, bucket: usize, index: u32) -> usize {
        self.unlink(bucket as u32, index);
        let node = &mut self.nodes[index as usize];
        node.count += 1;
        let count = node.count;
        self.push_back(count, index);
        index as usize
    }

    /// Whether a backend may take one more connection under its slow start (always, without one).
    fn ramp_allows(&mut self, index: u32, now: Instant) -> bool {
        let node = &mut self.nodes[index as usize];
        let Some(ramp) = node.ramp else {
            return true;
        };
        let fraction = ramp.fraction(now);
        if fraction >= 1.0 {
            node.ramp = None;
            return true;
        }
        let count = node.count;
        let Some(others_min) = self.lowest_count_except(index) else {
            return true; // nobody to share with
        };
        let cap = (fraction * f64::from(others_min + 1)).ceil() as u32;
        count < cap
    }

    /// The lowest count among in-rotation backends other than `index`.
    fn lowest_count_except(&self, index: u32) -> Option<u32> {
        self.buckets
            .iter()
            .enumerate()
            .skip(self.lowest)
            .find_map(|(bucket, list)| {
                let mut cursor = list.head;
                while cursor != NIL {
                    if cursor != index {
                        return Some(bucket as u32);
                    }
                    cursor = self.nodes[cursor as usize].next;
                }
                None
            })
    }

    fn release(&mut self, index: usize) {
        let Some(node) = self.nodes.get(index) else {
            return;
        };
        let (count, in_rotation) = (node.count, node.in_rotation);
        if count == 0 {
            return; // unreachable with leases: each release pairs with one pick
        }
        if in_rotation {
            self.unlink(count, index as u32);
        }
        self.nodes[index].count = count - 1;
        if in_rotation {
            self.push_back(count - 1, index as u32);
            self.lowest = self.lowest.min(count as usize - 1);
        }
    }

    fn push_back(&mut self, bucket: u32, index: u32) {
        let bucket = bucket as usize;
        if self.buckets.len() <= bucket {
            self.buckets.resize(bucket + 1, List::EMPTY);
        }
        let tail = self.buckets[bucket].tail;
        let node = &mut self.nodes[index as usize];
        node.prev = tail;
        node.next = NIL;
        if tail == NIL {
            self.buckets[bucket].head = index;
        } else {
            self.nodes[tail as usize].next = index;
        }
        self.buckets[bucket].tail = index;
        self.lowest = self.lowest.min(bucket);
    }

    fn unlink(&mut self, bucket: u32, index: u32) {
        let (prev, next) = {
            let node = &self.nodes[index as usize];
            (node.prev, node.next)
        };
        let list = &mut self.buckets[bucket as usize];
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
        let node = &mut self.nodes[index as usize];
        node.prev = NIL;
        node.next = NIL;
    }
}

#[cfg(test)]
mod tests;
