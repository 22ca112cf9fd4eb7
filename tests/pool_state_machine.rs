//! Model-based test of the balancer's `Pool` as the server drives it: connections open, fail over
//! to another backend, close; health checks mark backends down and up; reloads retire backends and
//! add new ones. A random sequence of those operations runs against the real `Pool` and against a
//! plain model (a count and two flags per slot), and after every step the two must agree: the same
//! counts, a pick only ever of an eligible backend with the lowest count, `None` only when nothing
//! is eligible, and every count back to zero once all connections are gone.

use std::sync::Arc;
use std::time::Instant;

use fulcrum::balancer::{Lease, Pool};
use proptest::prelude::*;

/// One step of the server's life, with indices taken modulo what exists at that point.
#[derive(Clone, Debug)]
enum Op {
    /// A client connects: pick a backend.
    Open,
    /// Connection `conn`'s backend refused it: give the lease back and try another backend,
    /// excluding every one this connection already tried (the `connect_attempts` loop).
    Fail { conn: usize },
    /// Connection `conn` ends.
    Close { conn: usize },
    /// A health check marks backend `slot` down.
    MarkDown { slot: usize },
    /// A health check marks backend `slot` up again.
    MarkUp { slot: usize },
    /// A reload removes the backends whose bit is set in `retire` and adds `add` new ones.
    Reload { retire: u8, add: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Open),
        2 => any::<usize>().prop_map(|conn| Op::Fail { conn }),
        3 => any::<usize>().prop_map(|conn| Op::Close { conn }),
        1 => any::<usize>().prop_map(|slot| Op::MarkDown { slot }),
        1 => any::<usize>().prop_map(|slot| Op::MarkUp { slot }),
        1 => (any::<u8>(), 0..3usize).prop_map(|(retire, add)| Op::Reload { retire, add }),
    ]
}

/// What the pool should know about one slot.
#[derive(Clone, Debug)]
struct Slot {
    count: u32,
    up: bool,
    retired: bool,
}

/// One open client connection: its lease and the backends it already failed to reach.
struct Connection {
    lease: Lease,
    tried: Vec<usize>,
}

struct Harness {
    pool: Arc<Pool>,
    /// The instant every step happens at: nothing here ramps, so the pool's time never matters
    /// (it reads no clock itself).
    now: Instant,
    model: Vec<Slot>,
    connections: Vec<Connection>,
}

impl Harness {
    fn new(size: usize) -> Harness {
        let slot = Slot {
            count: 0,
            up: true,
            retired: false,
        };
        Harness {
            pool: Pool::new(size),
            now: Instant::now(),
            model: vec![slot; size],
            connections: Vec::new(),
        }
    }

    /// Picks through the pool and checks the choice against the model; counts it in the model.
    fn pick(&mut self, exclude: &[usize]) -> Result<Option<Lease>, TestCaseError> {
        let eligible: Vec<usize> = (0..self.model.len())
            .filter(|&i| self.model[i].up && !self.model[i].retired && !exclude.contains(&i))
            .collect();
        let Some(lease) = self.pool.pick(exclude, self.now) else {
            prop_assert!(eligible.is_empty(), "no pick, but {:?} were eligible", eligible);
            return Ok(None);
        };
        let i = lease.index();
        prop_assert!(eligible.contains(&i), "picked {} outside {:?}", i, eligible);
        let min = eligible.iter().map(|&j| self.model[j].count).min();
        prop_assert_eq!(
            Some(self.model[i].count),
            min,
            "picked {} but it was not least loaded",
            i
        );
        self.model[i].count += 1;
        Ok(Some(lease))
    }

    fn release(&mut self, lease: Lease) {
        self.model[lease.index()].count -= 1;
        drop(lease);
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let slots = self.model.len();
        match op {
            Op::Open => {
                if let Some(lease) = self.pick(&[])? {
                    self.connections.push(Connection {
                        lease,
                        tried: Vec::new(),
                    });
                }
            }
            Op::Fail { conn } if !self.connections.is_empty() => {
                let Connection { lease, mut tried } =
                    self.connections.swap_remove(conn % self.connections.len());
                tried.push(lease.index());
                // The failed backend's count drops as soon as the lease does, before the retry.
                self.release(lease);
                if let Some(lease) = self.pick(&tried)? {
                    prop_assert!(!tried.contains(&lease.index()), "retried a failed backend");
                    self.connections.push(Connection { lease, tried });
                }
            }
            Op::Close { conn } if !self.connections.is_empty() => {
                let connection = self.connections.swap_remove(conn % self.connections.len());
                self.release(connection.lease);
            }
            Op::Fail { .. } | Op::Close { .. } => {}
            Op::MarkDown { slot } => {
                self.pool.set_in_rotation(slot % slots, false, self.now);
                self.model[slot % slots].up = false;
            }
            Op::MarkUp { slot } => {
                // A retired slot stays out whatever its health says.
                self.pool.set_in_rotation(slot % slots, true, self.now);
                self.model[slot % slots].up = true;
            }
            Op::Reload { retire, add } => {
                for i in (0..slots.min(8)).filter(|i| retire & (1 << i) != 0) {
                    self.pool.retire(i);
                    self.model[i].retired = true;
                }
                for _ in 0..add {
                    let index = self.pool.add(self.now);
                    prop_assert_eq!(index, self.model.len(), "slots are never reused");
                    self.model.push(Slot {
                        count: 0,
                        up: true,
                        retired: false,
                    });
                }
            }
        }
        self.check()
    }

    /// The pool agrees with the model, and every count is the number of leases held on it.
    fn check(&self) -> Result<(), TestCaseError> {
        let counts: Vec<u32> = self.model.iter().map(|s| s.count).collect();
        prop_assert_eq!(self.pool.len(), self.model.len());
        prop_assert_eq!(self.pool.active_all(), counts.clone());
        let mut held = vec![0u32; self.model.len()];
        for connection in &self.connections {
            held[connection.lease.index()] += 1;
        }
        prop_assert_eq!(held, counts);
        let any_up = self.model.iter().any(|s| s.up && !s.retired);
        prop_assert_eq!(self.pool.any_in_rotation(), any_up);
        Ok(())
    }
}

proptest! {
    #[test]
    fn the_pool_matches_a_model_through_open_fail_close_mark_down_and_reload(
        size in 1..6usize,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut harness = Harness::new(size);
        for op in ops {
            harness.apply(op)?;
        }
        // All connections end: every count, retired slots included, returns to zero.
        for connection in std::mem::take(&mut harness.connections) {
            harness.release(connection.lease);
        }
        harness.check()?;
        prop_assert!(harness.pool.active_all().iter().all(|&c| c == 0));
    }
}

/// A concrete run of the model: a retired backend with open connections drains, never returns.
#[test]
fn a_retired_backend_keeps_its_open_connections_counted_and_never_returns() {
    let mut harness = Harness::new(2);
    for op in [Op::Open, Op::Open, Op::Open] {
        harness.apply(op).unwrap();
    }
    assert_eq!(harness.pool.active_all(), vec![2, 1]);
    harness.apply(Op::Reload { retire: 0b01, add: 1 }).unwrap();
    harness.apply(Op::MarkUp { slot: 0 }).unwrap();
    assert_eq!(harness.pool.active_all(), vec![2, 1, 0]);
    for _ in 0..4 {
        harness.apply(Op::Open).unwrap();
    }
    let counts = harness.pool.active_all();
    assert_eq!(counts[0], 2, "the retired backend took nothing new: {counts:?}");
    assert!(
        counts[1] + counts[2] == 5 && counts[1].abs_diff(counts[2]) <= 1,
        "{counts:?}"
    );
    while !harness.connections.is_empty() {
        harness.apply(Op::Close { conn: 0 }).unwrap();
    }
    assert_eq!(harness.pool.active_all(), vec![0, 0, 0]);
}
