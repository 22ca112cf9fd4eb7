//! Which client identities use the balancer: open connections and refusals per identity, for the
//! top lists of `/status` and the status page (never Prometheus labels: identities are unbounded).
//!
//! The table is bounded: at most [`TRACKED`] identities are counted by name. An identity with no
//! open connection and no refusal leaves the table when its last connection closes, so clients
//! that come and go do not fill it; once it is full, identities not yet in it are counted together
//! as `untracked`. Pure: no I/O, no clock; one short mutex per open, close and refusal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// Identities counted by name at most.
pub const TRACKED: usize = 10_000;
/// Entries in each top list of `/status`.
pub const TOP: usize = 50;

/// What one identity (or the untracked rest) has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Connections open now (admitted, past the rate limit, not yet closed).
    pub open: u64,
    /// Connections refused by the rate limit.
    pub rate_limited: u64,
    /// Connections refused by the authorization map.
    pub unauthorized: u64,
}

impl Tally {
    fn refusals(&self) -> u64 {
        self.rate_limited + self.unauthorized
    }

    fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// Why an identified client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    RateLimited,
    Unauthorized,
}

/// The per-identity table, shared by every generation.
#[derive(Debug, Default)]
pub struct Identities {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<Arc<str>, Tally>,
    untracked: Tally,
}

impl Table {
    /// The tally for `identity`: its own, or the untracked one when the table is full.
    fn tally(&mut self, identity: &str) -> (Option<Arc<str>>, &mut Tally) {
        let name = match self.by_name.get_key_value(identity) {
            Some((name, _)) => Arc::clone(name),
            None if self.by_name.len() >= TRACKED => return (None, &mut self.untracked),
            None => identity.into(),
        };
        let tally = self.by_name.entry(Arc::clone(&name)).or_default();
        (Some(name), tally)
    }
}

/// One open connection of an identity, counted until it is dropped.
#[derive(Debug)]
pub struct OpenIdentity {
    table: Arc<Identities>,
    /// `None`: counted among the untracked.
    name: Option<Arc<str>>,
}

impl Drop for OpenIdentity {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        let tally = match &self.name {
            Some(name) => table.by_name.get_mut(name),
            None => Some(&mut table.untracked),
        };
        if let Some(tally) = tally {
            tally.open = tally.open.saturating_sub(1);
            if tally.is_empty() {
                if let Some(name) = &self.name {
                    table.by_name.remove(name);
                }
            }
        }
    }
}

/// One line of a top list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Named {
    pub identity: String,
    #[serde(flatten)]
    pub tally: Tally,
}

/// The top identities by open connections and by refusals, and what the lists leave out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Top {
    /// Identities counted by name now.
    pub tracked: usize,
    /// At most [`TOP`], most open connections first (ties by name).
    pub by_open: Vec<Named>,
    /// Open connections of every identity not in `by_open` (the untracked included).
    pub others_open: u64,
    /// At most [`TOP`] with at least one refusal, most refusals first (ties by name).
    pub by_refusals: Vec<Named>,
    /// Refusals of every identity not in `by_refusals` (the untracked included).
    pub others_refused: u64,
    /// Identities met once the table was full, together.
    pub untracked: Tally,
}

impl Identities {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an open connection of `identity` until the guard is dropped.
    pub fn open(self: &Arc<Self>, identity: &str) -> OpenIdentity {
        let mut table = self.lock();
        let (name, tally) = table.tally(identity);
        tally.open += 1;
        OpenIdentity {
            table: Arc::clone(self),
            name,
        }
    }

    /// Counts a refusal of `identity`.
    pub fn refused(&self, identity: &str, why: Refused) {
        let mut table = self.lock();
        let (_, tally) = table.tally(identity);
        match why {
            Refused::RateLimited => tally.rate_limited += 1,
            Refused::Unauthorized => tally.unauthorized += 1,
        }
    }

    /// The `n` identities with the most open connections and the `n` with the most refusals.
    pub fn top(&self, n: usize) -> Top {
        let table = self.lock();
        let mut all: Vec<Named> = table
            .by_name
            .iter()
            .map(|(name, tally)| Named {
                identity: name.to_string(),
                tally: *tally,
            })
            .collect();
        let total_open: u64 = all.iter().map(|e| e.tally.open).sum::<u64>() + table.untracked.open;
        let total_refused: u64 =
            all.iter().map(|e| e.tally.refusals()).sum::<u64>() + table.untracked.refusals();
        all.sort_by(|a, b| {
            b.tally
                .open
                .cmp(&a.tally.open)
                .then_with(|| a.identity.cmp(&b.identity))
        });
        let by_open: Vec<Named> = all.iter().filter(|e| e.tally.open > 0).take(n).cloned().collect();
        all.sort_by(|a, b| {
            b.tally
                .refusals()
                .cmp(&a.tally.refusals())
                .then_with(|| a.identity.cmp(&b.identity))
        });
        let by_refusals: Vec<Named> = all
            .iter()
            .filter(|e| e.tally.refusals() > 0)
            .take(n)
            .cloned()
            .collect();
        Top {
            tracked: table.by_name.len(),
            others_open: total_open - by_open.iter().map(|e| e.tally.open).sum::<u64>(),
            others_refused: total_refused - by_refusals.iter().map(|e| e.tally.refusals()).sum::<u64>(),
            by_open,
            by_refusals,
            untracked: table.untracked,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Identities, Refused, TRACKED};

    #[test]
    fn the_top_lists_rank_identities_and_total_the_rest() {
        let table = Arc::new(Identities::default());
        let held: Vec<_> = ["a", "b", "b", "c", "c", "c"]
            .iter()
            .map(|id| table.open(id))
            .collect();
        table.refused("d", Refused::RateLimited);
        table.refused("d", Refused::Unauthorized);
        table.refused("a", Refused::RateLimited);
        let top = table.top(2);
        let open: Vec<_> = top
            .by_open
            .iter()
            .map(|e| (e.identity.as_str(), e.tally.open))
            .collect();
        assert_eq!(open, [("c", 3), ("b", 2)]);
        assert_eq!(top.others_open, 1, "a's one connection");
        let refused: Vec<_> = top.by_refusals.iter().map(|e| e.identity.as_str()).collect();
        assert_eq!(refused, ["d", "a"]);
        assert_eq!(top.others_refused, 0);
        drop(held);
        let top = table.top(2);
        assert!(top.by_open.is_empty());
        assert_eq!(
            top.tracked, 2,
            "b and c left with their last connection; a and d were refused"
        );
    }

    #[test]
    fn identities_past_the_table_bound_are_counted_together_as_untracked() {
        let table = Arc::new(Identities::default());
        for i in 0..TRACKED {
            table.refused(&format!("client-{i}"), Refused::Unauthorized);
        }
        let late = table.open("one-too-many");
        table.refused("another", Refused::RateLimited);
        let top = table.top(3);
        assert_eq!(top.tracked, TRACKED);
        assert_eq!(top.untracked.open, 1);
        assert_eq!(top.untracked.rate_limited, 1);
        assert_eq!(top.by_refusals.len(), 3, "capped");
        assert_eq!(top.others_refused, TRACKED as u64 - 3 + 1);
        drop(late);
        assert_eq!(table.top(3).untracked.open, 0);
    }
}
