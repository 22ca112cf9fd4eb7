//! What `discover` names resolved to: the last good address set of each discovering upstream
//! (its first `discover_max_backends` addresses), when to ask again, and how the asking went. Shared by every generation, so that a reload or a
//! rebuild starts from the set already known instead of an empty upstream.
//!
//! This is a table and nothing more: the resolver that fills it, and the rebuild a changed set
//! asks for, live in `discovery`. Time is passed in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::metrics::Counter;

/// The discovered sets, by upstream name.
#[derive(Debug, Default)]
pub struct Discovered {
    sets: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// The `host:port` the set is for: a set stands only while the upstream discovers that name.
    target: String,
    /// Sorted, no duplicates, at most `discover_max_backends`; empty until a resolution first
    /// succeeds.
    addrs: Vec<SocketAddr>,
    /// Addresses of the last good answer past `discover_max_backends`, left out of `addrs`.
    ignored: usize,
    /// When to resolve again (`None`: at once).
    next: Option<Instant>,
    outcomes: Arc<Outcomes>,
}

/// Resolutions of one upstream's name by outcome (`fulcrum_dns_resolutions_total`).
#[derive(Debug, Default)]
pub struct Outcomes {
    pub ok: Counter,
    /// The name resolved to no address: the last good set stays.
    pub empty: Counter,
    /// The resolver failed or timed out: the last good set stays.
    pub failed: Counter,
}

/// How one resolution went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Addresses(Vec<SocketAddr>),
    Empty,
    Failed,
}

impl Discovered {
    /// The last good set for `upstream` resolving `target` (empty if none yet).
    pub fn addrs(&self, upstream: &str, target: &str) -> Vec<SocketAddr> {
        self.lock()
            .get(upstream)
            .filter(|e| e.target == target)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Whether `upstream` has a set for `target` (resolved at least once since it was named).
    pub fn knows(&self, upstream: &str, target: &str) -> bool {
        self.lock()
            .get(upstream)
            .is_some_and(|e| e.target == target && e.next.is_some())
    }

    /// When `upstream` should resolve `target` next: `None` means now (never resolved, or the
    /// name changed).
    pub fn next(&self, upstream: &str, target: &str) -> Option<Instant> {
        self.lock()
            .get(upstream)
            .filter(|e| e.target == target)
            .and_then(|e| e.next)
    }

    /// Records a resolution of `target` for `upstream` and when to resolve again. A failed or
    /// empty one keeps the last good set. Of a good one, the first `max` addresses in address
    /// order are the set (`discover_max_backends`), the rest are ignored (see [`Self::ignored`]),
    /// so that whatever a DNS server answers, the same answer makes the same bounded set.
    /// Returns whether the set changed.
    pub fn record(
        &self,
        upstream: &str,
        target: &str,
        resolution: Resolution,
        next: Instant,
        max: usize,
    ) -> bool {
        let mut sets = self.lock();
        let entry = sets.entry(upstream.to_string()).or_default();
        if entry.target != target {
            entry.target = target.to_string();
            entry.addrs.clear();
            entry.ignored = 0;
        }
        entry.next = Some(next);
        match resolution {
            Resolution::Addresses(mut addrs) => {
                entry.outcomes.ok.inc();
                addrs.sort_unstable();
                addrs.dedup();
                let max = max.max(1);
                entry.ignored = addrs.len().saturating_sub(max);
                addrs.truncate(max);
                let changed = entry.addrs != addrs;
                entry.addrs = addrs;
                changed
            }
            Resolution::Empty => {
                entry.outcomes.empty.inc();
                false
            }
            Resolution::Failed => {
                entry.outcomes.failed.inc();
                false
            }
        }
    }

    /// How many addresses of `upstream`'s last good answer were past `discover_max_backends`
    /// and left out of its set.
    pub fn ignored(&self, upstream: &str) -> usize {
        self.lock().get(upstream).map_or(0, |e| e.ignored)
    }

    /// The resolution counters of `upstream` (made if needed; kept when its name changes).
    pub fn outcomes(&self, upstream: &str) -> Arc<Outcomes> {
        Arc::clone(&self.lock().entry(upstream.to_string()).or_default().outcomes)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Nothing panics while holding it; recover rather than spread a panic.
        self.sets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_new_set_is_a_change_and_the_same_set_again_is_not() {
        let table = Discovered::default();
        let now = Instant::now();
        let set = vec![addr("127.0.0.12:80"), addr("127.0.0.11:80")];
        assert!(table.record("u", "app:80", Resolution::Addresses(set.clone()), now, 256));
        assert!(!table.record("u", "app:80", Resolution::Addresses(set), now, 256));
        assert_eq!(
            table.addrs("u", "app:80"),
            vec![addr("127.0.0.11:80"), addr("127.0.0.12:80")]
        );
    }

    #[test]
    fn an_answer_past_the_maximum_keeps_the_first_addresses_in_address_order() {
        let table = Discovered::default();
        let now = Instant::now();
        // 1 000 addresses, duplicated and in no particular order.
        let answer: Vec<SocketAddr> = (0..2_000u32)
            .map(|i| (i * 7919) % 1_000)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)))
            .collect();
        assert!(table.record("u", "app:80", Resolution::Addresses(answer.clone()), now, 256));
        let kept = table.addrs("u", "app:80");
        assert_eq!(kept.len(), 256);
        let mut first: Vec<SocketAddr> = answer.clone();
        first.sort_unstable();
        first.dedup();
        first.truncate(256);
        assert_eq!(kept, first);
        assert_eq!(table.ignored("u"), 744);
        let mut reversed = answer;
        reversed.reverse();
        assert!(
            !table.record("u", "app:80", Resolution::Addresses(reversed), now, 256),
            "the same answer in another order is the same set"
        );
        let small = vec![addr("127.0.0.11:80")];
        assert!(table.record("u", "app:80", Resolution::Addresses(small), now, 256));
        assert_eq!(table.ignored("u"), 0);
    }

    #[test]
    fn a_failed_or_empty_resolution_keeps_the_last_good_set() {
        let table = Discovered::default();
        let now = Instant::now();
        let set = vec![addr("127.0.0.11:80")];
        table.record("u", "app:80", Resolution::Addresses(set.clone()), now, 256);
        assert!(!table.record("u", "app:80", Resolution::Failed, now, 256));
        assert!(!table.record("u", "app:80", Resolution::Empty, now, 256));
        assert_eq!(table.addrs("u", "app:80"), set);
        let outcomes = table.outcomes("u");
        assert_eq!(
            (outcomes.ok.get(), outcomes.empty.get(), outcomes.failed.get()),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_set_stands_only_for_the_name_it_was_resolved_for() {
        let table = Discovered::default();
        let later = Instant::now() + Duration::from_secs(10);
        table.record(
            "u",
            "app:80",
            Resolution::Addresses(vec![addr("127.0.0.11:80")]),
            later,
            256,
        );
        assert!(table.addrs("u", "other:80").is_empty());
        assert_eq!(
            table.next("u", "other:80"),
            None,
            "a new name is resolved at once"
        );
        assert_eq!(table.next("u", "app:80"), Some(later));
        assert!(table.knows("u", "app:80") && !table.knows("u", "other:80"));
    }
}
