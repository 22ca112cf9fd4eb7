//! Caps on what peers can hold at once: open connections (per process, per listener) and
//! connections from one source still in their PROXY-header or TLS-handshake phase.
//!
//! Every count is an RAII guard ([`Place`], [`InHandshake`]): taking one counts, dropping it
//! uncounts, so no path of a connection can leak a slot. Taking never waits: over the cap the
//! caller refuses the connection at once. Pure: no I/O, no clock; the caps' values come from the
//! config (the default process cap from the open-file limit, read by `net`). The budget of splice
//! pipes ([`pipe_budget`]) is derived here too, from the same limit and the connection cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Open connections counted against a cap.
#[derive(Debug, Default)]
pub(crate) struct Gauge(AtomicUsize);

impl Gauge {
    /// Takes one of `cap` places, or `None` when all are taken.
    pub(crate) fn take(self: &Arc<Self>, cap: usize) -> Option<Place> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        if before >= cap {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(Arc::clone(self)))
    }

    /// Places taken now.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One place of a [`Gauge`], given back on drop.
#[derive(Debug)]
pub(crate) struct Place(Arc<Gauge>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections in their handshake phase, per source (an address masked to its prefix).
#[derive(Debug, Default)]
pub(crate) struct Handshakes {
    /// Only sources with a connection in the phase: at most as many entries as such connections.
    by_source: Mutex<HashMap<IpAddr, u32>>,
}

impl Handshakes {
    /// Counts one more connection of `source` in the phase, unless `max` already are.
    pub(crate) fn enter(self: &Arc<Self>, source: IpAddr, max: u32) -> Option<InHandshake> {
        let mut by_source = self.lock();
        let count = by_source.entry(source).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(InHandshake {
            handshakes: Arc::clone(self),
            source,
        })
    }

    /// Connections of `source` in the phase now.
    pub(crate) fn of(&self, source: IpAddr) -> u32 {
        self.lock().get(&source).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Counter updates only; nothing panics while the lock is held.
        self.by_source.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection in its handshake phase; leaving the phase (drop) uncounts it.
#[derive(Debug)]
pub(crate) struct InHandshake {
    handshakes: Arc<Handshakes>,
    source: IpAddr,
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        let mut by_source = self.handshakes.lock();
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// Whether `e` says this process is out of descriptors, buffers or memory (not a peer's fault).
pub(crate) fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// This process's soft limit on open files (`Max open files` in `/proc/self/limits`), if it
/// can be read and is not unlimited: what the default caps are derived from. (The one read of
/// the system in this room; the caps themselves take it as an argument.)
pub(crate) fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The default process-wide `max_connections` for an open-file limit of `nofile`: two
/// descriptors per proxied connection (client and backend), after a reserve of a quarter of the
/// limit, at most 256, for listening sockets, the admin listener, health probes, Redis, log
/// files and splice pipes. At 20 000 that is 9 872; at 1 024, 384; never less than 1.
pub(crate) fn default_max_connections(nofile: u64) -> usize {
    usize::try_from((nofile.saturating_sub(reserve(nofile)) / 2).max(1)).unwrap_or(usize::MAX)
}

/// Descriptors [`default_max_connections`] keeps out of the connections' reach: a quarter of the
/// limit, at most 256.
fn reserve(nofile: u64) -> u64 {
    (nofile / 4).min(256)
}

/// How many splice pipes (two descriptors each, held by a bulk direction or idle in the pool)
/// may be alive at once, for an open-file limit of `nofile` and a process cap of
/// `max_connections`: the descriptors that the connections at their cap (two each) and half of
/// the reserve (listening sockets, the admin listener, probes, Redis, log files) leave, halved:
/// `(nofile - 2 x max_connections - ceil(reserve / 2)) / 2`, 0 when nothing is left.
///
/// With the default cap that is a quarter of the reserve: 64 pipes at 20 000 or 1 024, 8 at 128.
/// A lower cap leaves more; a cap set above what the limit can hold leaves none, and every
/// direction copies through a buffer (no descriptor).
pub(crate) fn pipe_budget(nofile: u64, max_connections: usize) -> usize {
    let connections = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(2);
    let reserve = reserve(nofile);
    let spare = nofile
        .saturating_sub(connections)
        .saturating_sub(reserve - reserve / 2);
    usize::try_from(spare / 2).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_gives_exactly_cap_places_and_takes_them_back_on_drop() {
        let gauge = Arc::new(Gauge::default());
        let places: Vec<Place> = (0..3).filter_map(|_| gauge.take(3)).collect();
        assert_eq!(places.len(), 3);
        assert!(gauge.take(3).is_none(), "a fourth place");
        assert_eq!(gauge.get(), 3, "a refused take leaves no count behind");
        drop(places);
        assert_eq!(gauge.get(), 0);
        assert!(gauge.take(3).is_some());
    }

    #[test]
    fn handshakes_are_capped_per_source_and_forgotten_when_none_is_left() {
        let handshakes = Arc::new(Handshakes::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<InHandshake> = (0..2).filter_map(|_| handshakes.enter(a, 2)).collect();
        assert!(handshakes.enter(a, 2).is_none(), "a third handshake from a");
        let other = handshakes.enter(b, 2).expect("another source is not affected");
        assert_eq!((handshakes.of(a), handshakes.of(b)), (2, 1));
        drop(held);
        drop(other);
        assert!(
            handshakes.lock().is_empty(),
            "no entry is kept for sources without handshakes"
        );
    }

    #[test]
    fn the_default_cap_leaves_a_reserve_and_two_descriptors_per_connection() {
        assert_eq!(default_max_connections(20_000), 9_872);
        assert!(
            default_max_connections(20_000) >= 9_800,
            "bench/run holds 9 800 connections"
        );
        assert_eq!(default_max_connections(1_024), 384);
        assert_eq!(default_max_connections(64), 24);
        assert_eq!(default_max_connections(0), 1);
    }

    #[test]
    fn splice_pipes_get_what_the_connections_and_half_the_reserve_leave() {
        for (nofile, pipes) in [(20_000, 64), (1_024, 64), (128, 8), (64, 4)] {
            let cap = default_max_connections(nofile);
            assert_eq!(pipe_budget(nofile, cap), pipes, "at {nofile}");
            // Connections at their cap, every pipe alive, and half the reserve still free.
            let used = 2 * cap as u64 + 2 * pipes as u64;
            assert!(used + reserve(nofile) / 2 <= nofile, "at {nofile}: {used} in use");
        }
        assert_eq!(
            pipe_budget(20_000, 1_000),
            (20_000 - 2_000 - 128) / 2,
            "a lower cap leaves room for more pipes"
        );
        assert_eq!(
            pipe_budget(1_024, 1_000_000),
            0,
            "a cap past the limit leaves none"
        );
        assert_eq!(pipe_budget(0, 1), 0);
        assert_eq!(pipe_budget(u64::MAX, usize::MAX), 0);
    }
}
