//! Selection micro-benchmark: picks/s for pool sizes 3, 100 and 10 000, on one thread and on
//! every core, for fulcrum's bucketed pool and for a lock-free linear scan over atomic counters
//! (the obvious alternative), so the structure can be chosen by the numbers.
//!
//! Each thread keeps a ring of 64 open leases: every op opens one and closes the oldest, so
//! counts differ between backends as they do in production. Run: `cargo bench --bench balancer`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fulcrum::balancer::Pool;

const OPS_PER_THREAD: usize = 400_000;
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

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for size in [3usize, 100, 10_000] {
        for threads in [1, cores] {
            let pool = Pool::new(size);
            let rate = run(threads, || {
                let mut held = VecDeque::with_capacity(HELD);
                for _ in 0..OPS_PER_THREAD {
                    if held.len() == HELD {
                        held.pop_front();
                    }
                    held.push_back(black_box(pool.pick(&[])).expect("backend"));
                }
            });
            assert!(pool.active_all().iter().all(|c| *c == 0));
            println!(
                "balancer buckets size={size:>6} threads={threads}: {:>7.2} M picks/s",
                rate / 1e6
            );

            let scan = Arc::new(Scan {
                counts: (0..size).map(|_| AtomicU32::new(0)).collect(),
                next: AtomicUsize::new(0),
            });
            let rate = run(threads, || {
                let mut held = VecDeque::with_capacity(HELD);
                for _ in 0..OPS_PER_THREAD / if size > 1000 { 20 } else { 1 } {
                    if held.len() == HELD {
                        scan.release(held.pop_front().expect("non-empty"));
                    }
                    held.push_back(black_box(scan.pick()));
                }
                for i in held {
                    scan.release(i);
                }
            }) / if size > 1000 { 20.0 } else { 1.0 };
            println!(
                "balancer scan    size={size:>6} threads={threads}: {:>7.2} M picks/s",
                rate / 1e6
            );
        }
    }
}
