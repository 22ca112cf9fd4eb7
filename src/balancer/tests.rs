use super::*;
use proptest::prelude::*;
use std::future::Future;
use std::sync::OnceLock;
use std::task::Poll;

/// The instant the tests run at. The pool never reads the clock for a pick (time is an
/// argument), so any instant will do: it is taken once, and a slow start is measured in offsets
/// from it, never in time that really passes.
fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn counts(pool: &Pool) -> Vec<u32> {
    pool.active_all()
}

#[test]
fn an_idle_pool_is_visited_round_robin() {
    let pool = Pool::new(3);
    let picks: Vec<usize> = (0..9)
        .map(|_| pool.pick(&[], t0()).expect("backend").index())
        .collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
}

#[test]
fn short_connections_one_after_another_spread_evenly() {
    let pool = Pool::new(4);
    let mut seen = [0u32; 4];
    for _ in 0..400 {
        let lease = pool.pick(&[], t0()).expect("backend");
        seen[lease.index()] += 1;
    }
    assert_eq!(seen, [100; 4]);
    assert_eq!(counts(&pool), vec![0; 4]);
}

#[test]
fn the_least_loaded_backend_gets_every_new_connection() {
    let pool = Pool::new(2);
    let held: Vec<Lease> = (0..5)
        .map(|_| pool.pick(&[1], t0()).expect("backend 0"))
        .collect();
    assert!(held.iter().all(|l| l.index() == 0));
    let next: Vec<usize> = (0..10)
        .map(|_| pool.pick(&[], t0()).expect("backend"))
        .map(|l| l.index())
        .collect();
    assert_eq!(next, vec![1; 10]);
}

#[test]
fn dropping_a_lease_gives_its_count_back() {
    let pool = Pool::new(2);
    let a = pool.pick(&[], t0()).unwrap();
    let b = pool.pick(&[], t0()).unwrap();
    assert_eq!(counts(&pool), vec![1, 1]);
    drop(a);
    assert_eq!(counts(&pool), vec![0, 1]);
    drop(b);
    assert_eq!(counts(&pool), vec![0, 0]);
}

#[test]
fn excluded_backends_are_skipped_even_when_least_loaded() {
    let pool = Pool::new(3);
    let lease = pool.pick(&[0, 1], t0()).expect("backend 2");
    assert_eq!(lease.index(), 2);
    assert!(pool.pick(&[0, 1, 2], t0()).is_none());
}

#[test]
fn backends_out_of_rotation_get_nothing_and_keep_their_count() {
    let pool = Pool::new(2);
    let held = pool.pick(&[], t0()).unwrap();
    assert_eq!(held.index(), 0);
    pool.set_in_rotation(0, false, t0());
    for _ in 0..5 {
        assert_eq!(pool.pick(&[], t0()).unwrap().index(), 1);
    }
    pool.set_in_rotation(1, false, t0());
    assert!(pool.pick(&[], t0()).is_none());
    assert!(!pool.any_in_rotation());
    drop(held);
    assert_eq!(counts(&pool), vec![0, 0]);
    pool.set_in_rotation(0, true, t0());
    assert_eq!(pool.pick(&[], t0()).unwrap().index(), 0);
}

#[test]
fn an_empty_pool_picks_nothing() {
    let pool = Pool::new(0);
    assert!(pool.is_empty());
    assert!(pool.pick(&[], t0()).is_none());
}

#[test]
fn leases_dropped_on_many_threads_return_counts_to_zero() {
    let pool = Pool::new(7);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut held = Vec::new();
                for i in 0..10_000 {
                    held.push(pool.pick(&[], t0()).expect("backend"));
                    if i % 3 == 0 {
                        held.clear();
                    }
                }
            });
        }
    });
    assert_eq!(counts(&pool), vec![0; 7]);
}

#[derive(Clone, Debug)]
enum Op {
    Pick,
    PickExcluding(usize),
    Drop(usize),
    Rotation(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Pick),
        1 => (0..8usize).prop_map(Op::PickExcluding),
        3 => (0..64usize).prop_map(Op::Drop),
        1 => (0..8usize, any::<bool>()).prop_map(|(i, up)| Op::Rotation(i, up)),
    ]
}

proptest! {
    #[test]
    fn the_picked_backend_always_has_the_minimal_count(size in 1..8usize, ops in prop::collection::vec(op(), 1..300)) {
        let pool = Pool::new(size);
        let mut held: Vec<Lease> = Vec::new();
        let mut model = vec![0u32; size];
        let mut up = vec![true; size];
        for op in ops {
            match op {
                Op::Pick | Op::PickExcluding(_) => {
                    let exclude: Vec<usize> = match op { Op::PickExcluding(e) => vec![e % size], _ => vec![] };
                    let eligible: Vec<usize> = (0..size).filter(|i| up[*i] && !exclude.contains(i)).collect();
                    match pool.pick(&exclude, t0()) {
                        Some(lease) => {
                            let i = lease.index();
                            prop_assert!(eligible.contains(&i), "picked {} which is not eligible", i);
                            let min = eligible.iter().map(|j| model[*j]).min().unwrap();
                            prop_assert_eq!(model[i], min, "picked {} with count {} but min is {}", i, model[i], min);
                            model[i] += 1;
                            held.push(lease);
                        }
                        None => prop_assert!(eligible.is_empty()),
                    }
                }
                Op::Drop(k) => {
                    if !held.is_empty() {
                        let lease = held.swap_remove(k % held.len());
                        model[lease.index()] -= 1;
                    }
                }
                Op::Rotation(i, in_rotation) => {
                    pool.set_in_rotation(i % size, in_rotation, t0());
                    up[i % size] = in_rotation;
                }
            }
            prop_assert_eq!(pool.active_all(), model.clone());
        }
        held.clear();
        prop_assert_eq!(pool.active_all(), vec![0; size]);
    }
}

/// A pool of 3 where backends 0 and 1 hold 20 connections each and backend 2 just came back
/// with a 10 s slow start at `t0`.
fn pool_with_a_returning_backend(t0: Instant) -> (Arc<Pool>, Vec<Lease>) {
    let pool = Pool::new(3);
    pool.set_in_rotation(2, false, t0);
    let held: Vec<Lease> = (0..40).map(|_| pool.pick(&[], t0).expect("backend")).collect();
    assert_eq!(counts(&pool), vec![20, 20, 0]);
    pool.ramp_up(2, t0, Duration::from_secs(10));
    (pool, held)
}

#[test]
fn a_backend_in_slow_start_gets_only_a_small_share_at_first() {
    let t0 = t0();
    let (pool, mut held) = pool_with_a_returning_backend(t0);
    held.extend((0..20).map(|_| pool.pick(&[], t0).expect("backend")));
    // cap = ceil(0.1 * (min of others + 1)) = 3 while the others hold 20-30.
    assert_eq!(counts(&pool)[2], 3, "{:?}", counts(&pool));
    assert!(pool.is_ramping(2, t0));
}

#[test]
fn a_backend_in_slow_start_gets_more_as_the_period_passes() {
    let t0 = t0();
    let (pool, mut held) = pool_with_a_returning_backend(t0);
    let halfway = t0 + Duration::from_secs(5);
    held.extend((0..6).map(|_| pool.pick(&[], halfway).expect("backend")));
    // f = 0.55: cap = ceil(0.55 * 21) = 12, and six picks all fit under it.
    assert_eq!(counts(&pool), vec![20, 20, 6]);
    held.extend((0..20).map(|_| pool.pick(&[], halfway).expect("backend")));
    let c = counts(&pool);
    let cap = (0.55 * f64::from(c[0].min(c[1]) + 1)).ceil() as u32;
    assert!(c[2] <= cap && c[2] + 1 >= cap, "{c:?} with cap {cap}");
    assert!(c[2] > 12, "the cap grows with the others' load: {c:?}");
}

#[test]
fn after_slow_start_a_backend_is_plain_least_connections_again() {
    let t0 = t0();
    let (pool, mut held) = pool_with_a_returning_backend(t0);
    let later = t0 + Duration::from_secs(10);
    assert!(!pool.is_ramping(2, later));
    held.extend((0..20).map(|_| pool.pick(&[], later).expect("backend")));
    assert_eq!(counts(&pool), vec![20, 20, 20]);
}

#[test]
fn a_backend_in_slow_start_still_gets_connections_nobody_else_can_take() {
    let t0 = t0();
    let (pool, held) = pool_with_a_returning_backend(t0);
    let more: Vec<Lease> = (0..5)
        .map(|_| pool.pick(&[0, 1], t0).expect("backend 2"))
        .collect();
    assert!(more.iter().all(|l| l.index() == 2));
    pool.set_in_rotation(0, false, t0);
    pool.set_in_rotation(1, false, t0);
    let alone = pool.pick(&[], t0).expect("the only backend in rotation");
    assert_eq!(alone.index(), 2);
    drop((held, more, alone));
    assert_eq!(counts(&pool), vec![0, 0, 0]);
}

#[test]
fn taking_a_backend_out_ends_its_slow_start() {
    let t0 = t0();
    let (pool, _held) = pool_with_a_returning_backend(t0);
    pool.set_in_rotation(2, false, t0);
    pool.set_in_rotation(2, true, t0);
    assert!(!pool.is_ramping(2, t0));
}

#[test]
fn a_retired_backend_gets_nothing_new_and_adding_never_takes_its_slot() {
    let pool = Pool::new(2);
    let held = pool.pick(&[], t0()).unwrap();
    assert_eq!(held.index(), 0);
    pool.retire(0);
    pool.set_in_rotation(0, true, t0()); // e.g. a late health probe: a retired slot stays out
    for _ in 0..4 {
        assert_eq!(pool.pick(&[], t0()).unwrap().index(), 1);
    }
    assert_eq!(pool.add(t0()), 2);
    drop(held);
    assert_eq!(pool.active_all(), vec![0, 0, 0]);
    // Drained, still not reused by `add`: an older generation may map slot 0 to the removed
    // backend; only its owner knows when none does ([`Pool::reuse`]).
    assert_eq!(pool.add(t0()), 3);
    let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[], t0()).unwrap().index()).collect();
    assert!(!picks.contains(&0), "{picks:?}");
}

#[test]
fn a_retired_slot_is_reused_only_once_its_last_lease_is_gone_and_then_serves_its_new_spec() {
    let pool = Pool::new(2);
    let spec = Spec {
        weight: 3,
        max_connections: Some(1),
        backup: false,
    };
    assert!(!pool.reuse(0, spec, t0()), "a slot in rotation is not free");
    let held = pool.pick(&[1], t0()).unwrap();
    pool.retire(0);
    assert!(
        !pool.reuse(0, spec, t0()),
        "a retired slot with a lease is not free"
    );
    assert!(!pool.reuse(7, spec, t0()), "no such slot");
    drop(held);
    assert!(pool.reuse(0, spec, t0()));
    assert_eq!(pool.len(), 2, "no slot was added");
    assert_eq!(pool.spec(0), Some(spec));
    let lease = pool.pick(&[1], t0()).expect("the reused slot is in rotation");
    assert_eq!((lease.index(), pool.active_all()), (0, vec![1, 0]));
    assert!(pool.pick(&[1], t0()).is_none(), "its new cap of 1 holds");
    drop(lease);
    pool.retire(0);
    assert!(pool.reuse(0, Spec::default(), t0()), "a slot can be reused again");
    assert_eq!(pool.spec(0), Some(Spec::default()));
    let mut picks: Vec<usize> = (0..4).map(|_| pool.pick(&[], t0()).unwrap().index()).collect();
    picks.sort_unstable();
    assert_eq!(picks, [0, 0, 1, 1], "the reused slot takes its turn");
}

// ---------------------------------------------------------------------------------------------
// Weights, caps, the queue and backups

fn weighted(specs: &[Spec]) -> Arc<Pool> {
    let pool = Pool::new(0);
    for spec in specs {
        pool.add_with(*spec, t0());
    }
    pool
}

fn weight(weight: u32) -> Spec {
    Spec {
        weight,
        ..Spec::default()
    }
}

fn capped(max: u32) -> Spec {
    Spec {
        max_connections: Some(max),
        ..Spec::default()
    }
}

const BACKUP: Spec = Spec {
    weight: 1,
    max_connections: None,
    backup: true,
};

#[test]
fn weights_1_and_3_spread_8_held_connections_2_and_6() {
    let pool = weighted(&[weight(1), weight(3)]);
    let held: Vec<Lease> = (0..8).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    assert_eq!(counts(&pool), vec![2, 6]);
    drop(held);
    assert_eq!(counts(&pool), vec![0, 0]);
}

#[test]
fn equal_scores_across_weights_take_turns() {
    // Weights 1 and 2 holding 1 and 3: both score (1+1)/1 = (3+1)/2 = 2.
    let pool = weighted(&[weight(1), weight(2)]);
    let held: Vec<Lease> = (0..4).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    assert_eq!(counts(&pool), vec![1, 3]);
    // Short connections on the tie alternate: the one that waited longer goes first.
    let order: Vec<usize> = (0..6)
        .map(|_| pool.pick(&[], t0()).expect("a backend").index())
        .collect();
    assert_eq!(order, [0, 1, 0, 1, 0, 1]);
    drop(held);
}

#[test]
fn a_backend_at_its_cap_is_skipped_until_a_lease_of_it_drops() {
    let pool = weighted(&[capped(1), Spec::default()]);
    let first = pool.pick(&[], t0()).expect("a backend");
    assert_eq!(first.index(), 0);
    let others: Vec<Lease> = (0..3).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    assert!(
        others.iter().all(|l| l.index() == 1),
        "the capped backend took a second connection"
    );
    drop(first);
    assert_eq!(pool.pick(&[], t0()).expect("a backend").index(), 0);
}

#[test]
fn every_backend_full_answers_full_for_a_caller_that_queues() {
    let pool = weighted(&[capped(1), capped(1)]);
    let _held: Vec<Lease> = (0..2).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    assert!(matches!(pool.choose(&[], t0(), true), Choice::Full));
    assert!(matches!(pool.choose(&[], t0(), false), Choice::Full));
    assert!(pool.pick(&[], t0()).is_none());
}

#[test]
fn waiters_are_served_first_come_first_served_as_slots_free() {
    let pool = weighted(&[capped(1), capped(1)]);
    let mut held: Vec<Lease> = (0..2).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    let mut third = Box::pin(pool.wait(&[], 2, t0()).expect("room in the queue"));
    let mut fourth = Box::pin(pool.wait(&[], 2, t0()).expect("room in the queue"));
    assert_eq!(pool.wait(&[], 2, t0()).map(|_| ()), Err(QueueFull));
    assert_eq!(pool.waiting(), 2);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(third.as_mut().poll(&mut cx).is_pending());
    assert!(fourth.as_mut().poll(&mut cx).is_pending());
    // A new caller does not overtake the queue.
    drop(held.remove(1));
    assert!(matches!(pool.choose(&[], t0(), true), Choice::Full));
    let Poll::Ready(served) = third.as_mut().poll(&mut cx) else {
        panic!("the first waiter was not served by the freed slot");
    };
    assert_eq!(served.index(), 1);
    assert!(fourth.as_mut().poll(&mut cx).is_pending());
    drop(held);
    let Poll::Ready(last) = fourth.as_mut().poll(&mut cx) else {
        panic!("the second waiter was not served");
    };
    assert_eq!(last.index(), 0);
    assert_eq!(pool.waiting(), 0);
    drop((served, last));
    assert_eq!(counts(&pool), vec![0, 0]);
}

#[test]
fn a_waiter_that_gives_up_leaves_the_queue_and_hands_on_a_slot_it_was_given() {
    let pool = weighted(&[capped(1)]);
    let held = pool.pick(&[], t0()).expect("a backend");
    let first = pool.wait(&[], 2, t0()).expect("room");
    let mut second = Box::pin(pool.wait(&[], 2, t0()).expect("room"));
    drop(held); // served to `first`, which never takes it
    drop(first);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let Poll::Ready(lease) = second.as_mut().poll(&mut cx) else {
        panic!("the slot the first waiter dropped did not reach the second");
    };
    assert_eq!(counts(&pool), vec![1]);
    drop(lease);
    drop(second);
    assert_eq!((counts(&pool), pool.waiting()), (vec![0], 0));
}

#[test]
fn a_backup_gets_nothing_while_a_primary_is_in_rotation() {
    let pool = weighted(&[Spec::default(), BACKUP]);
    let held: Vec<Lease> = (0..5).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    assert_eq!(counts(&pool), vec![5, 0]);
    drop(held);
}

#[test]
fn a_backup_serves_while_no_primary_is_up_and_stops_when_one_returns() {
    let pool = weighted(&[Spec::default(), Spec::default(), BACKUP]);
    pool.set_in_rotation(0, false, t0());
    pool.set_in_rotation(1, false, t0());
    let on_backup = pool.pick(&[], t0()).expect("the backup");
    assert_eq!(on_backup.index(), 2);
    pool.set_in_rotation(1, true, t0());
    assert_eq!(pool.pick(&[], t0()).expect("a backend").index(), 1);
    // Excluding the only primary (it just failed to dial) falls over to the backup too.
    assert_eq!(pool.pick(&[1], t0()).expect("the backup").index(), 2);
}

#[test]
fn backups_take_the_overflow_of_full_primaries_only_without_a_queue() {
    let pool = weighted(&[capped(1), BACKUP]);
    let _primary = pool.pick(&[], t0()).expect("the primary");
    assert!(matches!(pool.choose(&[], t0(), true), Choice::Full));
    let Choice::Leased(lease) = pool.choose(&[], t0(), false) else {
        panic!("without a queue the overflow goes to the backup");
    };
    assert_eq!(lease.index(), 1);
}

#[test]
fn a_new_weight_keeps_the_count_and_changes_the_share() {
    let pool = weighted(&[weight(1), weight(1)]);
    let mut held: Vec<Lease> = (0..2).map(|_| pool.pick(&[], t0()).expect("a backend")).collect();
    pool.respec(1, weight(4), t0());
    assert_eq!(counts(&pool), vec![1, 1]);
    held.extend((0..5).map(|_| pool.pick(&[], t0()).expect("a backend")));
    // (1+1)/1 = 2 against (5+1)/4 = 1.5 and (6+1)/4 = 1.75: the heavier one took all five.
    assert_eq!(counts(&pool), vec![1, 6]);
    assert_eq!(pool.weight(1), 4);
}

#[derive(Clone, Debug)]
enum WeightedOp {
    Pick,
    Drop(usize),
    Rotation(usize, bool),
    Reweigh(usize, u32),
}

fn weighted_op() -> impl Strategy<Value = WeightedOp> {
    prop_oneof![
        4 => Just(WeightedOp::Pick),
        3 => (0..64usize).prop_map(WeightedOp::Drop),
        1 => (0..8usize, any::<bool>()).prop_map(|(i, up)| WeightedOp::Rotation(i, up)),
        1 => (0..8usize, 1..=MAX_WEIGHT).prop_map(|(i, w)| WeightedOp::Reweigh(i, w)),
    ]
}

proptest! {
    #[test]
    fn every_weighted_pick_minimizes_active_plus_one_over_weight(
        weights in prop::collection::vec(prop_oneof![1..=4u32, 1..=MAX_WEIGHT], 1..8),
        ops in prop::collection::vec(weighted_op(), 1..300),
    ) {
        let size = weights.len();
        let pool = weighted(&weights.iter().map(|w| weight(*w)).collect::<Vec<_>>());
        let mut weights = weights;
        let mut held: Vec<Lease> = Vec::new();
        let mut model = vec![0u32; size];
        let mut up = vec![true; size];
        for op in ops {
            match op {
                WeightedOp::Pick => match pool.pick(&[], t0()) {
                    Some(lease) => {
                        let i = lease.index();
                        prop_assert!(up[i], "picked {} which is out of rotation", i);
                        // (a + 1) / wa <= (b + 1) / wb for every eligible b, exactly.
                        let score = |j: usize| (u64::from(model[j]) + 1, u64::from(weights[j]));
                        let (load, w) = score(i);
                        for j in (0..size).filter(|j| up[*j]) {
                            let (other_load, other_w) = score(j);
                            prop_assert!(load * other_w <= other_load * w, "picked {} ({}/{}) over {} ({}/{})", i, load, w, j, other_load, other_w);
                        }
                        model[i] += 1;
                        held.push(lease);
                    }
                    None => prop_assert!(!up.iter().any(|u| *u)),
                },
                WeightedOp::Drop(k) => {
                    if !held.is_empty() {
                        let lease = held.swap_remove(k % held.len());
                        model[lease.index()] -= 1;
                    }
                }
                WeightedOp::Rotation(i, in_rotation) => {
                    pool.set_in_rotation(i % size, in_rotation, t0());
                    up[i % size] = in_rotation;
                }
                WeightedOp::Reweigh(i, w) => {
                    pool.respec(i % size, weight(w), t0());
                    weights[i % size] = w;
                }
            }
            prop_assert_eq!(pool.active_all(), model.clone());
        }
        held.clear();
        prop_assert_eq!(pool.active_all(), vec![0; size]);
    }
}
