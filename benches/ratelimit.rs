//! Throughput of `RateLimiter::check` under contention.
//!
//! Measures checks per second with every core hammering the limiter, for one key shared by all
//! threads (worst-case lock contention) and for many distinct IP keys (spread over shards), plus
//! single-thread baselines and a mostly-rejecting case; `FULCRUM_BENCH_THREADS=1,2,4,...,64` for
//! the contention curve (`common/threads.rs`). Time is fixed at the epoch, so every check
//! lands in one window; it must not sleep or do I/O. Run with `cargo bench --bench ratelimit`.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use fulcrum::ratelimit::{ClientKey, Decision, RateLimitPolicy, RateLimiter};

#[path = "common/threads.rs"]
mod threads;

/// Checks per thread in every case: bounded work, a few seconds in total.
const CHECKS_PER_THREAD: usize = 2_000_000;
/// Distinct keys in the many-keys cases.
const MANY_KEYS: u32 = 100_000;

fn limiter(capacity: u32, epoch: Instant) -> RateLimiter {
    RateLimiter::new(
        RateLimitPolicy {
            capacity,
            window: Duration::from_secs(3600),
            max_concurrent: Some(1_000_000),
            // Headroom so that uneven shard filling never rejects one of the benchmark keys.
            max_clients: 2 * MANY_KEYS as usize,
            overrides: HashMap::new(),
        },
        epoch,
    )
}

/// Runs `CHECKS_PER_THREAD` checks on each of `threads` threads, cycling through `keys` from a
/// per-thread offset, and prints the aggregate rate.
fn run(name: &str, threads: usize, limiter: &RateLimiter, keys: &Arc<[ClientKey]>, now: Instant) {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (limiter, keys, barrier) = (limiter.clone(), Arc::clone(keys), barrier.clone());
            thread::spawn(move || {
                let offset = t * keys.len() / threads;
                let mut admitted = 0usize;
                barrier.wait();
                for i in 0..CHECKS_PER_THREAD {
                    let key = &keys[(offset + i) % keys.len()];
                    if let Decision::Allow(permit) = black_box(limiter.check(key, now)) {
                        admitted += 1;
                        drop(permit);
                    }
                }
                admitted
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let admitted: usize = handles
        .into_iter()
        .map(|h| h.join().expect("benchmark thread panicked"))
        .sum();
    let elapsed = start.elapsed();
    let total = threads * CHECKS_PER_THREAD;
    let rate = total as f64 / elapsed.as_secs_f64() / 1e6;
    let admit_pct = 100.0 * admitted as f64 / total as f64;
    println!("ratelimit {name} threads={threads}: {rate:.1} M checks/s ({admit_pct:.0}% admitted)");
}

/// Checks every key once, so the timed runs measure already tracked keys.
fn warm_up(limiter: &RateLimiter, keys: &[ClientKey], now: Instant) {
    for key in keys {
        drop(limiter.check(key, now));
    }
}

fn main() {
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let epoch = Instant::now();
    let one_key: Arc<[ClientKey]> = Arc::from(vec![ClientKey::Identity(Arc::from("alice"))]);
    let many_keys: Arc<[ClientKey]> = (0..MANY_KEYS)
        .map(|i| ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
        .collect();

    // Capacity above the total number of checks: every check is an admit.
    let counts = threads::counts(threads);
    let admits = limiter(u32::MAX, epoch);
    for &n in &counts {
        run("one-key", n, &admits, &one_key, epoch);
    }

    let admits = limiter(u32::MAX, epoch);
    warm_up(&admits, &many_keys, epoch);
    for &n in &counts {
        run("many-keys", n, &admits, &many_keys, epoch);
    }

    // Capacity 1: after the first check per key, every check is a rate rejection.
    let rejects = limiter(1, epoch);
    run("one-key-rejecting", threads, &rejects, &one_key, epoch);
    warm_up(&rejects, &many_keys, epoch);
    run("many-keys-rejecting", threads, &rejects, &many_keys, epoch);
}
