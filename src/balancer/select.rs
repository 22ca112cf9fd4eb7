//! The search: which backend a connection gets, and the slow start that holds a returning backend
//! back.
//!
//! A pick reads the tournament's winner (`tournament.rs`) and takes the head of that class's
//! lowest bucket: O(1) in the pool size. Only when that head is excluded for this connection or
//! ramping does the search walk the classes the long way. Backups are searched only when no
//! primary can take the connection, and a caller that queues is told [`Found::Full`] instead of
//! falling over to them. The slow start's fraction is the only rule that depends on time, and
//! `now` is always an argument: this file never reads the clock, and it changes a count only
//! through [`State::take`] (`buckets.rs`). It names `model` and `tournament` (the score), never
//! the API above it: [`Found`] is what it answers, and `balancer.rs` and `queue.rs` read it.

use std::time::{Duration, Instant};

use super::model::{Ramp, Rank, State, NIL, RAMPING, RAMP_START};
use super::tournament::{score, SCORE_BITS};

impl Ramp {
    /// Share of its weight the backend has at `now`: [`RAMP_START`] growing linearly to 1.
    fn fraction(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        let progress = (elapsed / self.period.as_secs_f64()).min(1.0);
        RAMP_START + (1.0 - RAMP_START) * progress
    }
}

/// What a search found.
pub(super) enum Found {
    Index(usize),
    Full,
    Nothing,
}

impl State {
    /// Puts a backend in rotation with a slow start of `period` beginning at `since` (a retired
    /// one stays out, with no ramp).
    pub(super) fn ramp_up(&mut self, index: usize, since: Instant, period: Duration) {
        self.set_in_rotation(index, true);
        if let Some(meta) = self.meta.get_mut(index) {
            if meta.in_rotation {
                meta.ramp = Some(Ramp { since, period });
                self.nodes[index].flags |= RAMPING;
            }
        }
    }

    /// Whether a backend is still in its slow start at `now`.
    pub(super) fn is_ramping(&self, index: usize, now: Instant) -> bool {
        self.meta
            .get(index)
            .and_then(|m| m.ramp)
            .is_some_and(|r| r.fraction(now) < 1.0)
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

    /// The search of [`Pool::choose`](super::Pool::choose): a counted index, or why there is none.
    pub(super) fn choose(&mut self, exclude: &[usize], now: Instant, queues: bool) -> Found {
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
}
