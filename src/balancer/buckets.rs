//! The pool's counts: classes of one weight and role, their buckets by active count, and every
//! change to a backend's count or membership.
//!
//! A backend in rotation and below its cap is *linked*: it sits at the tail of the intrusive FIFO
//! list of its class's bucket for its count, stamped with the time it got there (a counter, not
//! the clock), so the oldest of a bucket is its head. Taking or giving back a connection moves it
//! to the next bucket up or down; reaching its cap, leaving rotation or being retired unlinks it.
//! Each change replays the class's match in the tournament (`tournament.rs`) and keeps the count
//! of full backends the search needs (a method call into `tournament.rs`, not an import). This
//! file owns those moves only: the types they move are in `model.rs`, which backend a connection
//! gets is `select.rs`, who waits for a slot is `queue.rs`. It names only `model`. No I/O, no
//! clock, no lock (the caller holds the pool's).

use super::model::{Class, List, Meta, Node, Spec, State, LINKED, NIL, RAMPING};

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
        let slot = self.push_class(class, spec.backup);
        self.classes[usize::from(class)].slot = slot;
        class
    }

    /// In rotation but not in a bucket: at (or, after a lower cap, above) its cap.
    pub(super) fn is_full(&self, index: usize) -> bool {
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

    pub(super) fn add(&mut self, spec: Spec) -> usize {
        let (node, meta) = self.fresh(spec);
        self.nodes.push(node);
        self.meta.push(meta);
        let index = self.nodes.len() - 1;
        self.set_in_rotation(index, true);
        index
    }

    pub(super) fn reuse(&mut self, index: usize, spec: Spec) -> bool {
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

    pub(super) fn respec(&mut self, index: usize, spec: Spec) {
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

    /// Out of rotation for good: a retired slot never comes back (until [`State::reuse`]).
    pub(super) fn retire(&mut self, index: usize) {
        self.set_in_rotation(index, false);
        if let Some(meta) = self.meta.get_mut(index) {
            meta.retired = true;
        }
    }

    pub(super) fn set_in_rotation(&mut self, index: usize, in_rotation: bool) {
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

    /// Moves a backend up one connection (out of its class's buckets at its cap).
    pub(super) fn take(&mut self, index: usize) -> usize {
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

    /// Moves a backend down one connection (back into a bucket below its cap). Whether it did:
    /// `false` for an index out of range or a count already at zero.
    pub(super) fn release(&mut self, index: usize) -> bool {
        let Some(node) = self.nodes.get(index) else {
            return false;
        };
        let (count, class) = (node.count, node.class);
        if count == 0 {
            return false; // unreachable with leases: each release pairs with one pick
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
        true
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
