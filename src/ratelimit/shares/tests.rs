use super::*;
use std::sync::Arc;

const WINDOW: Duration = Duration::from_secs(60);

fn identity(name: &str) -> ClientKey {
    ClientKey::Identity(Arc::from(name))
}

/// Runs one connection through `limiter` against a simulated store; true when admitted.
fn connect(
    limiter: &Shares,
    store: &mut HashMap<(ClientKey, u64), u64>,
    key: &ClientKey,
    now: Duration,
) -> bool {
    match limiter.check(key, now) {
        ShareDecision::Admit => true,
        ShareDecision::Reject(_) => false,
        ShareDecision::Claim { window, amount } => {
            let total = store.entry((key.clone(), window)).or_default();
            *total += u64::from(amount);
            let total = *total;
            limiter.grant(key, window, amount, total, now) == ShareDecision::Admit
        }
    }
}

#[test]
fn several_instances_never_admit_more_than_capacity_in_total() {
    for capacity in [1u32, 2, 7, 10, 20, 95, 100] {
        let instances: Vec<_> = (0..4)
            .map(|_| Shares::new(capacity, WINDOW, HashMap::new(), 100))
            .collect();
        let mut store = HashMap::new();
        let key = identity("alice");
        let now = Duration::from_secs(1_700_000_000);
        let mut admitted = 0;
        for i in 0..(capacity as usize * 5) {
            // Uneven spread: instance 0 gets twice the traffic.
            let instance = &instances[(i * 7 + i / 3) % 5 % 4];
            admitted += usize::from(connect(instance, &mut store, &key, now));
        }
        assert!(admitted <= capacity as usize, "capacity {capacity}: {admitted}");
        assert!(admitted > 0);
    }
}

#[test]
fn one_instance_alone_gets_exactly_capacity() {
    let limiter = Shares::new(20, WINDOW, HashMap::new(), 100);
    let mut store = HashMap::new();
    let key = identity("alice");
    let now = Duration::from_secs(1_700_000_000);
    let admitted = (0..60)
        .filter(|_| connect(&limiter, &mut store, &key, now))
        .count();
    assert_eq!(admitted, 20);
    // 10 claims of 2, then one that found the window full: no more claims after that.
    assert_eq!(store[&(key.clone(), limiter.window_index(now))], 20);
    assert_eq!(
        limiter.check(&key, now),
        ShareDecision::Reject(RejectReason::Rate)
    );
}

#[test]
fn an_overshooting_claim_admits_only_the_part_within_capacity() {
    let limiter = Shares::new(10, WINDOW, HashMap::new(), 100);
    let key = identity("alice");
    let now = Duration::from_secs(1_700_000_000);
    let w = limiter.window_index(now);
    // Another instance already took 9 of 10: this claim of 1 brings it to 10, usable 1.
    assert_eq!(limiter.grant(&key, w, 1, 10, now), ShareDecision::Admit);
    assert_eq!(
        limiter.check(&key, now),
        ShareDecision::Reject(RejectReason::Rate)
    );
    // A claim entirely past capacity admits nothing.
    let other = identity("bob");
    assert_eq!(
        limiter.grant(&other, w, 5, 15, now),
        ShareDecision::Reject(RejectReason::Rate)
    );
}

#[test]
fn a_new_window_resets_the_share_and_the_exhaustion() {
    let limiter = Shares::new(3, WINDOW, HashMap::new(), 100);
    let mut store = HashMap::new();
    let key = identity("alice");
    let start = Duration::from_secs(1_700_000_000 / 60 * 60);
    let admitted = |now| {
        (0..10)
            .filter(|_| connect(&limiter, &mut store, &key, now))
            .count()
    };
    let mut admitted = admitted;
    assert_eq!(admitted(start), 3);
    assert_eq!(admitted(start + WINDOW - Duration::from_nanos(1)), 0);
    assert_eq!(admitted(start + WINDOW), 3);
    assert_eq!(admitted(start + 5 * WINDOW), 3);
}

#[test]
fn windows_are_aligned_to_wall_clock_multiples_of_the_window() {
    let limiter = Shares::new(3, WINDOW, HashMap::new(), 100);
    assert_eq!(limiter.window_index(Duration::from_secs(59)), 0);
    assert_eq!(limiter.window_index(Duration::from_secs(60)), 1);
    assert_eq!(limiter.window_index(Duration::from_secs(3600)), 60);
}

#[test]
fn overrides_apply_to_identities_and_not_to_ips() {
    let mut overrides = HashMap::new();
    overrides.insert("alice".to_owned(), 5);
    overrides.insert("192.0.2.1".to_owned(), 9);
    overrides.insert("mallory".to_owned(), 0);
    let limiter = Shares::new(2, WINDOW, overrides, 100);
    let mut store = HashMap::new();
    let now = Duration::from_secs(1_700_000_000);
    let mut count = |key: &ClientKey| {
        (0..20)
            .filter(|_| connect(&limiter, &mut store, key, now))
            .count()
    };
    assert_eq!(count(&identity("alice")), 5);
    assert_eq!(count(&identity("bob")), 2);
    assert_eq!(count(&ClientKey::from_ip("192.0.2.1".parse().unwrap())), 2);
    assert_eq!(count(&identity("mallory")), 0);
}

#[test]
fn the_table_is_bounded_and_stale_entries_make_room() {
    let limiter = Shares::new(5, WINDOW, HashMap::new(), 2);
    let mut store = HashMap::new();
    let now = Duration::from_secs(1_700_000_000);
    assert!(connect(&limiter, &mut store, &identity("a"), now));
    assert!(connect(&limiter, &mut store, &identity("b"), now));
    assert_eq!(
        limiter.check(&identity("c"), now),
        ShareDecision::Reject(RejectReason::TooManyClients)
    );
    assert!(connect(&limiter, &mut store, &identity("c"), now + WINDOW));
    assert!(limiter.tracked_clients() <= 2);
}

proptest::proptest! {
    /// Any interleaving of connections over several instances, with claims answered in any
    /// order, admits at most each window's capacity in total.
    #[test]
    fn shares_never_admit_more_than_capacity_over_instances(
        capacity in 0..40u32,
        ops in proptest::collection::vec((0..3usize, 0..4u64, proptest::bool::ANY), 1..300),
    ) {
        let instances: Vec<_> = (0..3)
            .map(|_| Shares::new(capacity, WINDOW, HashMap::new(), 100))
            .collect();
        let key = identity("alice");
        let base = Duration::from_secs(1_700_000_000 / 60 * 60);
        let mut store: HashMap<u64, u64> = HashMap::new();
        let mut admitted: HashMap<u64, u64> = HashMap::new();
        // Claims in flight: (instance, window, amount, now), answered later when `defer`.
        let mut pending = Vec::new();
        let mut now = base;
        for (instance, advance, defer) in ops {
            // Time only moves forward, a window at a time, now and then.
            if advance == 3 {
                now += WINDOW;
            }
            let w = instances[instance].window_index(now);
            match instances[instance].check(&key, now) {
                ShareDecision::Admit => *admitted.entry(w).or_default() += 1,
                ShareDecision::Reject(_) => {}
                ShareDecision::Claim { window, amount } => {
                    let total = store.entry(window).or_default();
                    *total += u64::from(amount);
                    pending.push((instance, window, amount, *total, now));
                }
            }
            if !defer {
                for (i, window, amount, total, now) in pending.drain(..) {
                    if instances[i].grant(&key, window, amount, total, now) == ShareDecision::Admit {
                        *admitted.entry(window).or_default() += 1;
                    }
                }
            }
            for count in admitted.values() {
                proptest::prop_assert!(*count <= u64::from(capacity));
            }
        }
    }
}
