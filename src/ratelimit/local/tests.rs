use super::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const WINDOW: Duration = Duration::from_secs(10);

fn policy(capacity: u32, max_concurrent: Option<u32>) -> RateLimitPolicy {
    RateLimitPolicy {
        capacity,
        window: WINDOW,
        max_concurrent,
        max_clients: 1000,
        overrides: HashMap::new(),
    }
}

fn ip(s: &str) -> ClientKey {
    ClientKey::from_ip(s.parse().unwrap())
}

fn identity(s: &str) -> ClientKey {
    ClientKey::Identity(Arc::from(s))
}

fn is_allowed(decision: &Decision) -> bool {
    matches!(decision, Decision::Allow(_))
}

fn reason(decision: &Decision) -> Option<RejectReason> {
    match decision {
        Decision::Allow(_) => None,
        Decision::Reject(reason) => Some(*reason),
    }
}

/// Checks `key` `n` times at `now`, dropping permits, and returns how many were admitted.
fn admitted(limiter: &RateLimiter, key: &ClientKey, now: Instant, n: usize) -> usize {
    (0..n).filter(|_| is_allowed(&limiter.check(key, now))).count()
}

#[test]
fn exactly_capacity_connections_are_admitted_per_window() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(5, None), epoch);
    let key = ip("192.0.2.1");
    assert_eq!(admitted(&limiter, &key, epoch, 20), 5);
    let late = epoch + WINDOW - Duration::from_nanos(1);
    assert_eq!(reason(&limiter.check(&key, late)), Some(RejectReason::Rate));
    assert_eq!(admitted(&limiter, &key, epoch + WINDOW, 20), 5);
    assert_eq!(admitted(&limiter, &key, epoch + 7 * WINDOW, 20), 5);
}

#[test]
fn an_instant_before_the_epoch_counts_as_window_zero_without_panicking() {
    let now = Instant::now();
    let epoch = now + Duration::from_secs(3600);
    let limiter = RateLimiter::new(policy(2, None), epoch);
    let key = ip("192.0.2.1");
    assert_eq!(admitted(&limiter, &key, now, 5), 2);
    assert_eq!(admitted(&limiter, &key, epoch, 5), 0);
    assert_eq!(admitted(&limiter, &key, epoch + WINDOW, 5), 2);
}

#[test]
fn zero_capacity_rejects_every_connection_and_tracks_nobody() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(0, Some(10)), epoch);
    let decision = limiter.check(&ip("192.0.2.1"), epoch);
    assert_eq!(reason(&decision), Some(RejectReason::Rate));
    assert_eq!(limiter.tracked_clients(), 0);
}

#[test]
fn overrides_apply_to_identities_and_not_to_ips() {
    let epoch = Instant::now();
    let mut p = policy(2, None);
    p.overrides.insert("alice".to_owned(), 5);
    p.overrides.insert("192.0.2.1".to_owned(), 9);
    p.overrides.insert("mallory".to_owned(), 0);
    let limiter = RateLimiter::new(p, epoch);
    assert_eq!(admitted(&limiter, &identity("alice"), epoch, 20), 5);
    assert_eq!(admitted(&limiter, &identity("bob"), epoch, 20), 2);
    assert_eq!(admitted(&limiter, &ip("192.0.2.1"), epoch, 20), 2);
    assert_eq!(admitted(&limiter, &identity("mallory"), epoch, 20), 0);
}

#[test]
fn held_permits_block_and_dropping_one_releases_exactly_one_slot() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(100, Some(2)), epoch);
    let key = identity("alice");
    let first = limiter.check(&key, epoch);
    let second = limiter.check(&key, epoch);
    assert!(is_allowed(&first) && is_allowed(&second));
    let third = limiter.check(&key, epoch);
    assert_eq!(reason(&third), Some(RejectReason::Concurrency));
    drop(first);
    let fourth = limiter.check(&key, epoch);
    assert!(is_allowed(&fourth));
    let fifth = limiter.check(&key, epoch);
    assert_eq!(reason(&fifth), Some(RejectReason::Concurrency));
    // The cap spans windows: permits from an earlier window still hold their slots.
    let sixth = limiter.check(&key, epoch + WINDOW);
    assert_eq!(reason(&sixth), Some(RejectReason::Concurrency));
}

#[test]
fn concurrency_rejections_do_not_consume_capacity() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(3, Some(1)), epoch);
    let key = identity("alice");
    let held = limiter.check(&key, epoch);
    assert!(is_allowed(&held));
    for _ in 0..10 {
        let decision = limiter.check(&key, epoch);
        assert_eq!(reason(&decision), Some(RejectReason::Concurrency));
    }
    drop(held);
    assert_eq!(admitted(&limiter, &key, epoch, 10), 2);
}

#[test]
fn rate_rejections_do_not_take_a_concurrency_slot() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(1, Some(2)), epoch);
    let key = identity("alice");
    let held = limiter.check(&key, epoch);
    assert!(is_allowed(&held));
    for _ in 0..10 {
        let decision = limiter.check(&key, epoch);
        assert_eq!(reason(&decision), Some(RejectReason::Rate));
    }
    let next_window = limiter.check(&key, epoch + WINDOW);
    assert!(is_allowed(&next_window));
    drop(held);
}

#[test]
fn ipv4_mapped_ipv6_counts_as_the_ipv4_address() {
    let v4: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
    assert_eq!(ClientKey::from_ip(mapped), ClientKey::Ip(v4));
    assert_eq!(ClientKey::from_ip(mapped).to_string(), "192.0.2.1");

    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(3, None), epoch);
    assert!(is_allowed(&limiter.check(&ClientKey::Ip(v4), epoch)));
    assert!(is_allowed(&limiter.check(&ClientKey::from_ip(mapped), epoch)));
    // Even a key built directly from the mapped form is canonicalised.
    assert!(is_allowed(&limiter.check(&ClientKey::Ip(mapped), epoch)));
    assert_eq!(admitted(&limiter, &ClientKey::Ip(v4), epoch, 5), 0);
    assert_eq!(limiter.tracked_clients(), 1);
}

#[test]
fn plain_ipv6_addresses_are_kept_as_is() {
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    assert_eq!(ClientKey::from_ip(v6), ClientKey::Ip(v6));
    assert_eq!(ClientKey::from_ip(v6).to_string(), "2001:db8::1");
    assert_eq!(identity("spiffe://x/y").to_string(), "spiffe://x/y");
}

#[test]
fn reject_reasons_read_as_short_lowercase_text() {
    for reason in [
        RejectReason::Rate,
        RejectReason::Concurrency,
        RejectReason::TooManyClients,
    ] {
        let text = reason.to_string();
        assert_eq!(text, text.to_lowercase());
        assert!(!text.is_empty() && text.len() < 40);
    }
}

#[test]
fn tracked_clients_stay_bounded_over_a_million_distinct_keys() {
    let epoch = Instant::now();
    let mut p = policy(1, Some(1));
    p.max_clients = 1000;
    let limiter = RateLimiter::new(p, epoch);
    let keys_per_window = 2000;
    let mut too_many = 0;
    for w in 0..500u32 {
        let now = epoch + WINDOW * w;
        let mut admitted_this_window = 0;
        for i in 0..keys_per_window {
            let key = ClientKey::Ip(Ipv4Addr::from(w * keys_per_window + i).into());
            let decision = limiter.check(&key, now);
            match reason(&decision) {
                None => admitted_this_window += 1,
                Some(RejectReason::TooManyClients) => too_many += 1,
                Some(other) => panic!("unexpected rejection {other}"),
            }
            // Old keys are stale at a window's start, so its first key always gets in.
            if i == 0 {
                assert!(is_allowed(&decision), "window {w} admitted no new key");
            }
            assert!(limiter.tracked_clients() <= 1000);
        }
        assert!(admitted_this_window <= 1000);
    }
    assert!(too_many > 0, "the table never filled");
}

#[test]
fn a_full_table_rejects_a_new_key_but_serves_tracked_keys() {
    let epoch = Instant::now();
    let mut p = policy(10, None);
    p.max_clients = 1;
    let limiter = RateLimiter::new(p, epoch);
    let (a, b) = (identity("a"), identity("b"));
    assert!(is_allowed(&limiter.check(&a, epoch)));
    let rejected = limiter.check(&b, epoch);
    assert_eq!(reason(&rejected), Some(RejectReason::TooManyClients));
    assert!(is_allowed(&limiter.check(&a, epoch)));
    // Once `a` is stale, `b` takes its place.
    assert!(is_allowed(&limiter.check(&b, epoch + WINDOW)));
    assert_eq!(limiter.tracked_clients(), 1);
}

#[test]
fn an_entry_with_an_open_permit_is_not_evicted() {
    let epoch = Instant::now();
    let mut p = policy(10, Some(1));
    p.max_clients = 1;
    let limiter = RateLimiter::new(p, epoch);
    let (a, b) = (identity("a"), identity("b"));
    let held = limiter.check(&a, epoch);
    assert!(is_allowed(&held));
    let rejected = limiter.check(&b, epoch + WINDOW);
    assert_eq!(reason(&rejected), Some(RejectReason::TooManyClients));
    // `a` kept its concurrency count: it is still at its cap.
    let again = limiter.check(&a, epoch + WINDOW);
    assert_eq!(reason(&again), Some(RejectReason::Concurrency));
    drop(held);
    assert!(is_allowed(&limiter.check(&b, epoch + 2 * WINDOW)));
}

#[test]
fn many_threads_on_one_key_admit_exactly_capacity_in_total() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(500, Some(10_000)), epoch);
    let key = identity("alice");
    let total: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| admitted(&limiter, &key, epoch, 1000)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(total, 500);
}

#[test]
fn limiter_and_permit_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimiter>();
    assert_send_sync::<Permit>();
    assert_send_sync::<Decision>();
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock by this many milliseconds, then check key `key`.
    Check { key: usize, advance_ms: u64 },
    /// Drop the `nth` (modulo) open permit of key `key`.
    Release { key: usize, nth: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..4usize, prop_oneof![3 => Just(0u64), 1 => 0..2500u64])
            .prop_map(|(key, advance_ms)| Op::Check { key, advance_ms }),
        1 => (0..4usize, any::<usize>()).prop_map(|(key, nth)| Op::Release { key, nth }),
    ]
}

proptest! {
    /// The limiter agrees with a straightforward model, and so never admits more than a
    /// key's capacity per window nor holds more than `max_concurrent` permits per key.
    #[test]
    fn admissions_never_exceed_capacity_per_window_or_the_concurrency_cap(
        capacity in 0..5u32,
        alice_capacity in 0..5u32,
        max_concurrent in proptest::option::of(0..4u32),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let window = Duration::from_secs(1);
        let epoch = Instant::now();
        let mut p = policy(capacity, max_concurrent);
        p.window = window;
        p.overrides.insert("alice".to_owned(), alice_capacity);
        let limiter = RateLimiter::new(p, epoch);
        let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
        let keys = [
            identity("alice"),
            identity("bob"),
            ip("192.0.2.1"),
            ClientKey::Ip(mapped),
        ];
        // Model slot per key; the mapped address shares the IPv4 one.
        let slot = |key: usize| key.min(2);
        let capacities = [alice_capacity, capacity, capacity];
        let mut counts: [HashMap<u64, u32>; 3] = Default::default();
        let mut permits: [Vec<Permit>; 3] = Default::default();
        let mut elapsed = Duration::ZERO;

        for op in ops {
            match op {
                Op::Check { key, advance_ms } => {
                    elapsed += Duration::from_millis(advance_ms);
                    let w = (elapsed.as_nanos() / window.as_nanos()) as u64;
                    let s = slot(key);
                    let count = counts[s].entry(w).or_default();
                    let expected = if *count >= capacities[s] {
                        Some(RejectReason::Rate)
                    } else if max_concurrent.is_some_and(|m| permits[s].len() >= m as usize) {
                        Some(RejectReason::Concurrency)
                    } else {
                        None
                    };
                    match limiter.check(&keys[key], epoch + elapsed) {
                        Decision::Allow(permit) => {
                            prop_assert_eq!(expected, None);
                            *count += 1;
                            permits[s].push(permit);
                        }
                        Decision::Reject(reason) => prop_assert_eq!(expected, Some(reason)),
                    }
                    prop_assert!(*count <= capacities[s]);
                    if let Some(m) = max_concurrent {
                        prop_assert!(permits[s].len() <= m as usize);
                    }
                }
                Op::Release { key, nth } => {
                    let open = &mut permits[slot(key)];
                    if !open.is_empty() {
                        let n = nth % open.len();
                        drop(open.swap_remove(n));
                    }
                }
            }
        }
    }
}

#[test]
fn after_a_reload_with_the_same_policy_the_same_limiter_goes_on() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(2, Some(5)), epoch);
    let key = ClientKey::Identity("alice".into());
    let _held = [limiter.check(&key, epoch), limiter.check(&key, epoch)];
    // The reload happens a second later; the limiter goes on with its own epoch.
    let next = RateLimiter::carry_over(Some(&limiter), policy(2, Some(5)), epoch + Duration::from_secs(1));
    assert!(
        matches!(next.check(&key, epoch), Decision::Reject(RejectReason::Rate)),
        "the window's count went on"
    );
}

#[test]
fn after_a_reload_with_another_policy_open_connections_still_count_and_release() {
    let epoch = Instant::now();
    let limiter = RateLimiter::new(policy(10, Some(2)), epoch);
    let key = ClientKey::Identity("alice".into());
    let held = [limiter.check(&key, epoch), limiter.check(&key, epoch)];
    let next = RateLimiter::carry_over(Some(&limiter), policy(20, Some(2)), epoch);
    assert_eq!(next.open_connections(&key), 2);
    assert!(matches!(
        next.check(&key, epoch),
        Decision::Reject(RejectReason::Concurrency)
    ));
    drop(held);
    assert_eq!(
        next.open_connections(&key),
        0,
        "the old permits release the new limiter's slots"
    );
    assert!(
        matches!(next.check(&key, epoch), Decision::Allow(_)),
        "and the window restarted"
    );
}
