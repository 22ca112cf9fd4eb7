//! The tournament over the classes of one role, and the rank it compares: which class holds the
//! backend that ranks first.
//!
//! A class's best backend is the head of its lowest non-empty bucket (`buckets.rs`); its rank is
//! its exact score `(count + 1) / weight` in fixed point, then its stamp. The tree caches the
//! winner of every match, so the best class is read off the root and a class whose best backend
//! changed replays at most O(log classes) matches. This file owns the tree's matches and the
//! ranking only (the types are in `model.rs`, and it names only `model`): it never changes a
//! count, and it does not know about exclusions, caps or the slow start (`select.rs` applies
//! those).

use super::model::{Class, Entry, Node, Rank, State, Tree, NIL, NO_CLASS};

impl Entry {
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
pub(super) fn score(count: u32, weight: u32) -> u64 {
    ((u64::from(count) + 1) << SCORE_BITS) / u64::from(weight)
}

pub(super) const SCORE_BITS: u32 = 24;

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
    pub(super) fn best(&self) -> Option<u16> {
        match self.slots[..] {
            [only] => Some(only),
            _ => self.win.get(1).map(|e| e.class).filter(|&c| c != NO_CLASS),
        }
    }
}

impl State {
    /// Enters a new class in its role's tournament; returns its slot there.
    pub(super) fn push_class(&mut self, class: u16, backup: bool) -> usize {
        let (classes, nodes) = (&self.classes, &self.nodes);
        self.trees[usize::from(backup)].push(class, |c| entry(classes, nodes, c))
    }

    /// Replays the tournament above a class whose best backend may have changed.
    #[inline]
    pub(super) fn refresh(&mut self, class: u16) {
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
}
