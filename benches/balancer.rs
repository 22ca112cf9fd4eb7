//! Selection micro-benchmark: picks/s for pool sizes 3, 100 and 10 000, on one thread and on
//! every core, with equal weights, five weights and 256 weights, and for a lock-free linear scan
//! over atomic counters (the obvious alternative), so the structure can be chosen by the numbers.
//!
//! Each thread keeps a ring of 64 open leases: every op opens one and closes the oldest, so
//! counts differ between backends as they do in production. The time is read once per thread
//! (a connection reads it anyway). Run: `cargo bench --bench balancer [-- FILTER]`; `FULCRUM_BENCH_THREADS=1,2,4,...,64` for the
//! contention curve (`common/threads.rs`).

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fulcrum::balancer::{Pool, Spec};

#[path = "common/threads.rs"]
mod threads;

const OPS_PER_THREAD: usize = 2_000_000;
const HELD: usize = 64;

/// Baseline: scan every counter from a rotating start, take the first minimum.
struct Scan {
    counts: Vec<AtomicU32>,
    next: AtomicUsize,
}

impl Scan {
    fn pick(&self) -> usize {
        let n = self.counts.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_count = u32::MAX;
        for k in 0..n {
            let i = (start + k) % n;
            let c = self.counts[i].load(Ordering::Relaxed);
            if c < best_count {
                best = i;
                best_count = c;
            }
        }
        self.counts[best].fetch_add(1, Ordering::Relaxed);
        best
    }

    fn release(&self, i: usize) {
        self.counts[i].fetch_sub(1, Ordering::Relaxed);
    }
}

fn run(threads: usize, op: impl Fn() + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(&op);
        }
    });
    (threads * OPS_PER_THREAD) as f64 / start.elapsed().as_secs_f64()
}

/// A pool of `size` backends whose weights cycle through `weights`.
fn weighted(size: usize, weights: &[u32]) -> Arc<Pool> {
    let pool = Pool::new(0);
    let now = Instant::now();
    for i in 0..size {
        pool.add_with(
            Spec {
                weight: weights[i % weights.len()],
                ..Spec::default()
            },
            now,
        );
    }
    pool
}

/// Picks/s of `pool` on `threads` threads, each holding a ring of [`HELD`] leases.
fn picks(pool: &Arc<Pool>, threads: usize) -> f64 {
    let rate = run(threads, || {
        let mut held = VecDeque::with_capacity(HELD);
        let now = Instant::now();
        for _ in 0..OPS_PER_THREAD {
            if held.len() == HELD {
                held.pop_front();
            }
            held.push_back(black_box(pool.pick(&[], now)).expect("backend"));
        }
    });
    assert!(pool.active_all().iter().all(|c| *c == 0));
    rate
}

fn main() {
    // `cargo bench --bench balancer -- 10000` runs only the lines containing "10000".
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all_weights: Vec<u32> = (1..=256).collect();
    let cases = [
        ("equal weights", &[1][..]),
        ("weights 1,2,3,5,8", &[1, 2, 3, 5, 8][..]),
        ("weights 1..=256", &all_weights[..]),
    ];
    for size in [3usize, 100, 10_000] {
        for threads in threads::counts(cores) {
            for (what, weights) in cases {
                let label = format!("balancer {what:<18} size={size:>6} threads={threads}");
                if label.contains(&filter) {
                    let rate = picks(&weighted(size, weights), threads);
                    println!("{label}: {:>7.2} M picks/s", rate / 1e6);
                }
            }
            let label = format!(
                "balancer {:<18} size={size:>6} threads={threads}",
                "scan (baseline)"
            );
            if !label.contains(&filter) {
                continue;
            }
            let scan = Arc::new(Scan {
                counts: (0..size).map(|_| AtomicU32::new(0)).collect(),
                next: AtomicUsize::new(0),
            });
            // The scan is O(n): a twentieth of the ops at 10 000 backends.
            let share = if size > 1000 { 20 } else { 1 };
            let rate = run(threads, || {
                let mut held = VecDeque::with_capacity(HELD);
                for _ in 0..OPS_PER_THREAD / share {
                    if held.len() == HELD {
                        scan.release(held.pop_front().expect("non-empty"));
                    }
                    held.push_back(black_box(scan.pick()));
                }
                for i in held {
                    scan.release(i);
                }
            }) / share as f64;
            println!("{label}: {:>7.2} M picks/s", rate / 1e6);
        }
    }
}
