//! Schedule exploration of the balancer's counters and the rate limiter with `shuttle`.
//!
//! Built only under `RUSTFLAGS="--cfg shuttle"` (run `scripts/concurrency-check`): the library then
//! locks and counts with shuttle's `Mutex` and atomics, so every lock acquisition and counter access
//! in `Pool` and `RateLimiter` is a point where shuttle may switch threads. Each test body runs many
//! times under a random scheduler and under PCT (which is good at the "one thread runs far ahead"
//! bugs); a failing schedule is printed with a seed to replay.
//!
//! Everything is checked through the public API. A picker cannot see the pool at the instant of
//! its pick, so the minimality check brackets that instant: every thread announces a release
//! before dropping a lease and records a pick after it returns, which bounds each backend's count
//! at the pick from both sides. A pick is wrong only if its backend certainly had more connections
//! than another in-rotation backend certainly had.
#![cfg(shuttle)]

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::balancer::{Lease, Pool};
use fulcrum::ratelimit::{ClientKey, Decision, RateLimitPolicy, RateLimiter, RejectReason};
use shuttle::scheduler::PctScheduler;
use shuttle::sync::atomic::{AtomicBool, AtomicUsize};
use shuttle::{check_random, thread, Runner};

/// Schedules per test and scheduler: enough to hit the interesting interleavings of a handful of
/// threads a few times over, small enough that the whole file runs in seconds.
const ITERATIONS: usize = 2000;

/// Runs `body` under the random scheduler and under PCT with preemption depth 3.
fn explore<F>(body: F)
where
    F: Fn() + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let random = Arc::clone(&body);
    check_random(move || random(), ITERATIONS);
    let runner = Runner::new(PctScheduler::new(3, ITERATIONS), Default::default());
    runner.run(move || body());
}

/// What the threads of one test have announced and recorded, per backend.
struct Ledger {
    /// Picks that returned this backend and were recorded (after the pick returned).
    picked: Vec<AtomicUsize>,
    /// Releases announced (before the lease was dropped).
    releasing: Vec<AtomicUsize>,
    /// Releases done (after the lease was dropped).
    released: Vec<AtomicUsize>,
    /// Picks started, on any backend (before calling `pick`).
    picks_started: AtomicUsize,
}

impl Ledger {
    fn new(backends: usize) -> Ledger {
        let zeros = || (0..backends).map(|_| AtomicUsize::new(0)).collect();
        Ledger {
            picked: zeros(),
            releasing: zeros(),
            released: zeros(),
            picks_started: AtomicUsize::new(0),
        }
    }

    fn read(counters: &[AtomicUsize]) -> Vec<i64> {
        counters.iter().map(|c| c.load(SeqCst) as i64).collect()
    }

    /// Picks a backend and checks it against every backend in `stable` (in rotation for the whole
    /// test): its count at the pick cannot have been certainly higher than theirs.
    fn pick(&self, pool: &Arc<Pool>, stable: &[usize], now: Instant) -> Lease {
        let picked_before = Self::read(&self.picked);
        let released_before = Self::read(&self.released);
        self.picks_started.fetch_add(1, SeqCst);
        let lease = pool
            .pick(&[], now)
            .expect("a stable backend is always in rotation");
        let picked_after = Self::read(&self.picked);
        let releasing_after = Self::read(&self.releasing);
        let started_after = self.picks_started.load(SeqCst) as i64;
        // Picks begun but not counted in `picked_after`, this one included.
        let in_flight = started_after - picked_after.iter().sum::<i64>();

        let i = lease.index();
        // Increments of `i` before our pick completed before we looked; decrements of `i` before
        // our pick were announced before we looked again.
        let floor_i = picked_before[i] - releasing_after[i];
        for &j in stable.iter().filter(|&&j| j != i) {
            // Increments of `j` before our pick are recorded or still in flight (not ours);
            // decrements recorded before we started had happened.
            let ceiling_j = picked_after[j] + (in_flight - 1) - released_before[j];
            assert!(
                floor_i <= ceiling_j,
                "picked backend {i} with at least {floor_i} connections while backend {j} had at \
                 most {ceiling_j}"
            );
        }
        self.picked[i].fetch_add(1, SeqCst);
        lease
    }

    fn release(&self, lease: Lease) {
        let i = lease.index();
        self.releasing[i].fetch_add(1, SeqCst);
        drop(lease);
        self.released[i].fetch_add(1, SeqCst);
    }
}

#[test]
fn concurrent_picks_and_releases_pick_a_least_loaded_backend_and_return_to_zero() {
    explore(|| {
        let now = Instant::now();
        let pool = Pool::new(3);
        let ledger = Arc::new(Ledger::new(3));
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let (pool, ledger) = (Arc::clone(&pool), Arc::clone(&ledger));
                thread::spawn(move || {
                    let first = ledger.pick(&pool, &[0, 1, 2], now);
                    let second = ledger.pick(&pool, &[0, 1, 2], now);
                    // Vary the release order between threads.
                    if t % 2 == 0 {
                        ledger.release(first);
                        let third = ledger.pick(&pool, &[0, 1, 2], now);
                        ledger.release(second);
                        ledger.release(third);
                    } else {
                        ledger.release(second);
                        ledger.release(first);
                    }
                })
            })
            .collect();
        // An observer: a count never exceeds the leases that could exist, and never wraps.
        let counts = pool.active_all();
        assert!(counts.iter().all(|&c| c <= 6), "{counts:?}");
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.active_all(), vec![0, 0, 0]);
    });
}

#[test]
fn picks_stay_balanced_while_another_backend_is_marked_down_and_up() {
    explore(|| {
        let now = Instant::now();
        // Backends 0 and 1 stay in rotation; backend 2 flaps.
        let pool = Pool::new(3);
        let ledger = Arc::new(Ledger::new(3));
        let pickers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, ledger) = (Arc::clone(&pool), Arc::clone(&ledger));
                thread::spawn(move || {
                    (0..3)
                        .map(|_| ledger.pick(&pool, &[0, 1], now))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let flapper = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                pool.set_in_rotation(2, false, now);
                pool.set_in_rotation(2, true, now);
                pool.set_in_rotation(2, false, now);
            })
        };
        // With picks only, the backends that never leave rotation differ by at most one.
        let counts = pool.active_all();
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
        flapper.join().unwrap();
        let leases: Vec<Lease> = pickers.into_iter().flat_map(|p| p.join().unwrap()).collect();
        let counts = pool.active_all();
        assert_eq!(counts.iter().sum::<u32>(), 6);
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
        for lease in leases {
            ledger.release(lease);
        }
        assert_eq!(pool.active_all(), vec![0, 0, 0]);
    });
}

#[test]
fn a_backend_retired_before_a_pick_starts_is_never_picked_and_its_leases_drain() {
    explore(|| {
        let now = Instant::now();
        let pool = Pool::new(2);
        let held = pool.pick(&[], now).unwrap();
        assert_eq!(held.index(), 0);
        let retired = Arc::new(AtomicBool::new(false));
        let reloader = {
            let (pool, retired) = (Arc::clone(&pool), Arc::clone(&retired));
            thread::spawn(move || {
                let added = pool.add(now);
                pool.retire(0);
                retired.store(true, SeqCst);
                added
            })
        };
        let pickers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, retired) = (Arc::clone(&pool), Arc::clone(&retired));
                thread::spawn(move || {
                    let was_retired = retired.load(SeqCst);
                    let lease = pool.pick(&[], now).unwrap();
                    assert!(
                        !(was_retired && lease.index() == 0),
                        "picked a backend retired before the pick started"
                    );
                    lease
                })
            })
            .collect();
        drop(held);
        let added = reloader.join().unwrap();
        assert_eq!(added, 2, "slots are never reused");
        let leases: Vec<Lease> = pickers.into_iter().map(|p| p.join().unwrap()).collect();
        let sum: u32 = pool.active_all().iter().sum();
        assert_eq!(sum as usize, leases.len());
        drop(leases);
        assert_eq!(pool.active_all(), vec![0, 0, 0]);
        // Retired for good: a pick now only ever sees backends 1 and 2.
        let lease = pool.pick(&[1], now).unwrap();
        assert_eq!(lease.index(), 2);
    });
}

fn policy(capacity: u32, max_concurrent: Option<u32>) -> RateLimitPolicy {
    RateLimitPolicy {
        capacity,
        window: Duration::from_secs(10),
        max_concurrent,
        max_clients: 64,
        overrides: HashMap::new(),
    }
}

/// Threads checking one key in one window admit exactly `capacity` between them.
#[test]
fn concurrent_checks_in_one_window_admit_exactly_capacity() {
    explore(|| {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(3, None), epoch);
        let key = ClientKey::Identity(Arc::from("alice"));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (limiter, key) = (limiter.clone(), key.clone());
                thread::spawn(move || {
                    let mut admitted = 0;
                    for _ in 0..2 {
                        match limiter.check(&key, epoch) {
                            Decision::Allow(_) => admitted += 1,
                            Decision::Reject(reason) => assert_eq!(reason, RejectReason::Rate),
                        }
                    }
                    admitted
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 3);
        assert_eq!(limiter.tracked_clients(), 1);
    });
}

/// With threads on both sides of a window boundary, each window still admits at most `capacity`.
#[test]
fn concurrent_checks_across_a_window_boundary_admit_at_most_capacity_per_window() {
    explore(|| {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(2, None), epoch);
        let key = ClientKey::Identity(Arc::from("alice"));
        let threads: Vec<_> = [epoch, epoch + Duration::from_secs(10), epoch]
            .into_iter()
            .map(|now| {
                let (limiter, key) = (limiter.clone(), key.clone());
                thread::spawn(move || {
                    (0..2)
                        .filter(|_| matches!(limiter.check(&key, now), Decision::Allow(_)))
                        .count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // Two windows touched; a late caller counts against the newer window, never resets it.
        assert!((2..=4).contains(&total), "admitted {total}");
    });
}

/// Permits taken and dropped from several threads never exceed the concurrency cap, and each
/// releases its slot exactly once: afterwards exactly `max_concurrent` can be held again.
#[test]
fn concurrent_permits_respect_the_cap_and_release_exactly_once() {
    const CAP: u32 = 2;
    explore(|| {
        let epoch = Instant::now();
        let limiter = RateLimiter::new(policy(100, Some(CAP)), epoch);
        let key = ClientKey::Ip("192.0.2.7".parse().unwrap());
        // Raised after a permit is granted, lowered before it is dropped: never above the truth.
        let held = Arc::new(AtomicUsize::new(0));
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (limiter, key) = (limiter.clone(), key.clone());
                let (held, admitted) = (Arc::clone(&held), Arc::clone(&admitted));
                thread::spawn(move || {
                    for _ in 0..2 {
                        match limiter.check(&key, epoch) {
                            Decision::Allow(permit) => {
                                admitted.fetch_add(1, SeqCst);
                                let now_held = held.fetch_add(1, SeqCst) + 1;
                                assert!(now_held <= CAP as usize, "{now_held} permits held");
                                held.fetch_sub(1, SeqCst);
                                drop(permit);
                            }
                            Decision::Reject(reason) => {
                                assert_eq!(reason, RejectReason::Concurrency)
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // At least one check can never see the cap reached; at most all six get in.
        let admitted = admitted.load(SeqCst);
        assert!((1..=6).contains(&admitted), "admitted {admitted}");
        // Every slot came back once: exactly CAP permits fit again, no fewer (leak), no more
        // (double release).
        let again: Vec<Decision> = (0..CAP).map(|_| limiter.check(&key, epoch)).collect();
        assert!(again.iter().all(|d| matches!(d, Decision::Allow(_))));
        assert!(matches!(
            limiter.check(&key, epoch),
            Decision::Reject(RejectReason::Concurrency)
        ));
    });
}
