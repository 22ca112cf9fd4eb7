use super::*;
use proptest::prelude::*;

const LEASE: Duration = Duration::from_secs(10);

fn client() -> ClientKey {
    ClientKey::Identity(Arc::from("alice"))
}

fn slots(instance: &str, cap: u32) -> Arc<Slots> {
    Arc::new(Slots::new(instance.to_owned(), cap, LEASE, 100))
}

/// The store as the Redis script keeps it: per (client, instance) the slots held, the last
/// request applied and the expiry.
#[derive(Default)]
struct Store {
    records: HashMap<(ClientKey, String), (u32, u64, Instant)>,
}

impl Store {
    /// What the script does with one request of `instance` at `now`.
    fn apply(&mut self, instance: &str, request: &Request, now: Instant) -> u32 {
        self.records.retain(|_, record| record.2 > now);
        let others: u64 = self
            .records
            .iter()
            .filter(|((key, i), _)| *key == request.key && i != instance)
            .map(|(_, record)| u64::from(record.0))
            .sum();
        let room = u32::try_from(u64::from(request.cap).saturating_sub(others)).expect("below cap");
        let id = (request.key.clone(), instance.to_owned());
        if let Some(&(held, seq, _)) = self.records.get(&id) {
            if request.seq <= seq {
                return usable(held, room);
            }
        }
        let held = granted(request.ask, room);
        self.records.insert(id, (held, request.seq, now + request.lease));
        usable(held, room)
    }

    fn record(&self, instance: &str, now: Instant) -> u32 {
        self.records
            .get(&(client(), instance.to_owned()))
            .filter(|record| record.2 > now)
            .map_or(0, |record| record.0)
    }
}

/// One connection asking `slots` at `now`, its request answered by `store` at once.
fn connect(slots: &Arc<Slots>, store: &mut Store, now: Instant) -> Option<Slot> {
    match slots.acquire(&client(), now) {
        Acquire::Admit(slot) => Some(slot),
        Acquire::Ask(request) => {
            let granted = store.apply(slots.instance(), &request, now);
            match slots.answer(&request, Some(granted), now) {
                Answer::Admit(slot) => Some(slot),
                _ => None,
            }
        }
        Acquire::Wait | Acquire::Full | Acquire::TooManyClients => None,
    }
}

/// One keeper round of `slots` at `now`, answered by `store`.
fn keep(slots: &Arc<Slots>, store: &mut Store, now: Instant, all: bool) -> bool {
    let Some(requests) = slots.due(now, all) else {
        return false;
    };
    for request in requests {
        let granted = store.apply(slots.instance(), &request, now);
        assert!(matches!(
            slots.answer(&request, Some(granted), now),
            Answer::Recorded
        ));
    }
    true
}

#[test]
fn the_store_records_what_fits_with_at_most_half_the_room_left_as_spare() {
    let ask = |hold, need, spare| Ask { hold, need, spare };
    // Plenty of room: what is needed plus the whole spare.
    assert_eq!(granted(ask(0, 1, 2), 100), 3);
    // Four left: one needed, spare capped at half of the three left.
    assert_eq!(granted(ask(0, 1, 5), 4), 2);
    // The last slot goes to the connection that asks, none as spare.
    assert_eq!(granted(ask(3, 1, 1), 4), 4);
    assert_eq!(granted(ask(3, 1, 1), 3), 3);
    // No room: the open connections stay recorded, nothing more.
    assert_eq!(granted(ask(2, 1, 1), 0), 2);
    // A give-back records only the open connections.
    assert_eq!(granted(ask(1, 0, 0), 10), 1);
}

#[test]
fn a_busy_client_gets_a_tenth_of_the_cap_as_spare_and_at_least_one() {
    assert_eq!(block(4), 1);
    assert_eq!(block(100), 10);
    assert_eq!(block(0), 1);
}

proptest! {
    /// The store's arithmetic never records more than the room or the open connections, never
    /// fewer than the open connections, and never less when there is more room (the lower bound
    /// an instance relies on while a request is in flight).
    #[test]
    fn the_recorded_slots_stay_within_the_room_or_the_open_connections(
        hold in 0u32..50, need in 0u32..2, spare in 0u32..20, room in 0u32..60, more in 0u32..20,
    ) {
        let ask = Ask { hold, need, spare };
        let held = granted(ask, room);
        prop_assert!(held >= hold);
        prop_assert!(held <= hold.max(room));
        prop_assert!(held <= hold + need + spare);
        prop_assert!(granted(ask, room + more) >= held);
    }
}

#[test]
fn one_instance_admits_exactly_the_cap_and_most_connections_need_no_round_trip() {
    let slots = slots("a", 20);
    let mut store = Store::default();
    let now = Instant::now();
    let mut asked = 0;
    let mut open = Vec::new();
    for _ in 0..30 {
        match slots.acquire(&client(), now) {
            Acquire::Admit(slot) => open.push(slot),
            Acquire::Ask(request) => {
                asked += 1;
                let granted = store.apply("a", &request, now);
                if let Answer::Admit(slot) = slots.answer(&request, Some(granted), now) {
                    open.push(slot);
                }
            }
            // Refused after the store had no slot left, without asking again.
            Acquire::Full => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(open.len(), 20);
    assert_eq!(slots.open(&client()), 20);
    // Blocks of 2 spare (20 / 10) halve as the room shrinks: 10 round trips for 20, not 20.
    assert!(asked < 20, "{asked} round trips");
    assert_eq!(store.record("a", now), 20);
}

#[test]
fn two_instances_admit_the_cap_in_total_and_refuse_the_next_on_either() {
    let (a, b) = (slots("a", 4), slots("b", 4));
    let mut store = Store::default();
    let now = Instant::now();
    let held: Vec<Slot> = [&a, &a, &b, &b]
        .into_iter()
        .map(|s| connect(s, &mut store, now).expect("admitted"))
        .collect();
    assert!(connect(&a, &mut store, now).is_none());
    assert!(connect(&b, &mut store, now).is_none());
    assert_eq!(store.record("a", now) + store.record("b", now), 4);
    drop(held);
}

#[test]
fn a_closed_connection_beyond_the_spare_is_given_back_at_once_and_an_idle_client_is_dropped() {
    let (a, b) = (slots("a", 4), slots("b", 4));
    let mut store = Store::default();
    let now = Instant::now();
    let held: Vec<Slot> = (0..4)
        .map(|_| connect(&a, &mut store, now).expect("admitted"))
        .collect();
    assert!(connect(&b, &mut store, now).is_none());
    drop(held);
    // Four held, none open: three more than the spare of one, so the keeper is due at once.
    let requests = a.due(now, false).expect("tracked");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].ask,
        Ask {
            hold: 0,
            need: 0,
            spare: 1
        }
    );
    let granted = store.apply("a", &requests[0], now);
    a.answer(&requests[0], Some(granted), now);
    // (`b`, refused by the store, asks again once its pause is over.)
    let later = now + LEASE / FULL_FOR;
    let in_b = connect(&b, &mut store, later).expect("b gets a slot a gave back");
    // The next tick finds `a` idle: it gives its spare back, and the one after drops it.
    assert!(keep(&a, &mut store, later, true));
    assert_eq!(store.record("a", later), 0);
    assert!(!keep(&a, &mut store, later, true));
    assert_eq!(a.tracked_clients(), 0);
    drop(in_b);
}

#[test]
fn a_connection_closing_within_the_spare_wakes_no_keeper() {
    let a = slots("a", 100);
    let mut store = Store::default();
    let now = Instant::now();
    // One asked for with a block of ten spare, one from the spare: closing one leaves ten.
    let first = connect(&a, &mut store, now).expect("admitted");
    let second = connect(&a, &mut store, now).expect("admitted from the spare");
    drop(second);
    assert_eq!(a.due(now, false).expect("tracked"), Vec::new());
    // Closing the other leaves eleven: one is given back.
    drop(first);
    assert_eq!(a.due(now, false).expect("tracked").len(), 1);
}

#[test]
fn while_a_request_is_in_flight_the_clients_next_connection_waits_for_its_answer() {
    let a = slots("a", 4);
    let now = Instant::now();
    let Acquire::Ask(request) = a.acquire(&client(), now) else {
        panic!("the first connection asks");
    };
    assert!(matches!(a.acquire(&client(), now), Acquire::Wait));
    // No answer: the connection that asked gets `on_unavailable`, and the next one asks again.
    assert!(matches!(a.answer(&request, None, now), Answer::Unavailable));
    assert!(matches!(a.acquire(&client(), now), Acquire::Ask(_)));
}

#[test]
fn once_the_lease_may_have_ended_no_connection_is_admitted_from_the_slots_held() {
    let a = slots("a", 100);
    let mut store = Store::default();
    let start = Instant::now();
    let first = connect(&a, &mut store, start).expect("admitted");
    assert_eq!(a.held(&client(), start), 11);
    // Admitted from the spare, no round trip, until the lease taken from the request ends.
    assert!(matches!(
        a.acquire(&client(), start + LEASE - Duration::from_millis(1)),
        Acquire::Admit(_)
    ));
    assert!(matches!(a.acquire(&client(), start + LEASE), Acquire::Ask(_)));
    drop(first);
}

#[test]
fn a_client_refused_at_its_cap_is_refused_without_asking_again_for_a_twentieth_of_the_lease() {
    let (a, b) = (slots("a", 1), slots("b", 1));
    let mut store = Store::default();
    let now = Instant::now();
    let in_a = connect(&a, &mut store, now).expect("admitted");
    assert!(connect(&b, &mut store, now).is_none());
    assert!(matches!(b.acquire(&client(), now), Acquire::Full));
    drop(in_a);
    // The next tick gives `a`'s slot back: it is free in the store, but `b` asks again only
    // once the pause is over.
    keep(&a, &mut store, now, true);
    let later = now + LEASE / FULL_FOR;
    assert!(matches!(
        b.acquire(&client(), later - Duration::from_millis(1)),
        Acquire::Full
    ));
    assert!(connect(&b, &mut store, later).is_some());
}

#[test]
fn a_zero_cap_refuses_every_connection_without_asking() {
    let a = slots("a", 0);
    assert!(matches!(a.acquire(&client(), Instant::now()), Acquire::Full));
    assert_eq!(a.tracked_clients(), 0);
}

#[test]
fn a_new_client_at_a_full_table_is_refused_while_tracked_ones_are_served() {
    let a = Arc::new(Slots::new("a".to_owned(), 4, LEASE, 2));
    let mut store = Store::default();
    let now = Instant::now();
    let key = |n: u8| ClientKey::Ip(std::net::IpAddr::from([192, 0, 2, n]));
    let mut ask = |k: &ClientKey| match a.acquire(k, now) {
        Acquire::Ask(request) => {
            let granted = store.apply("a", &request, now);
            a.answer(&request, Some(granted), now)
        }
        other => panic!("{other:?}"),
    };
    let one = ask(&key(1));
    let two = ask(&key(2));
    assert!(matches!(a.acquire(&key(3), now), Acquire::TooManyClients));
    assert!(matches!(a.acquire(&key(1), now), Acquire::Admit(_)));
    // Once client 2's connection is closed, it is the one dropped for a new client (the table
    // is swept at most once per refresh interval).
    drop(two);
    assert!(matches!(a.acquire(&key(3), now), Acquire::TooManyClients));
    assert!(matches!(a.acquire(&key(3), now + LEASE / 3), Acquire::Ask(_)));
    drop(one);
}

/// One step of several instances sharing a store.
#[derive(Debug, Clone)]
enum Step {
    /// A connection arrives at instance `n`.
    Connect(usize),
    /// The store applies request `n` in flight and its answer arrives.
    Deliver(usize),
    /// Request `n` in flight gets no answer; the store may still apply it later (a late ghost).
    Timeout(usize),
    /// The store applies late ghost `n` (nobody hears of it).
    Ghost(usize),
    /// Open connection `n` closes.
    Close(usize),
    /// Instance `n`'s keeper makes its round (every refresh when `all`).
    Keep(usize, bool),
    /// Time passes, in hundredths of the lease.
    Advance(u32),
}

fn steps(advance: bool) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        4 => (0usize..4).prop_map(Step::Connect),
        3 => (0usize..8).prop_map(Step::Deliver),
        1 => (0usize..8).prop_map(Step::Timeout),
        1 => (0usize..8).prop_map(Step::Ghost),
        2 => (0usize..32).prop_map(Step::Close),
        1 => ((0usize..4), any::<bool>()).prop_map(|(n, all)| Step::Keep(n, all)),
        1 => (0u32..if advance { 60 } else { 1 }).prop_map(Step::Advance),
    ];
    prop::collection::vec(step, 1..200)
}

/// Runs `steps` over `instances` sharing one store; after every step checks that the open
/// connections over all instances stay within `cap` plus the connections that were open on an
/// instance when its record expired (none without time passing). Returns that allowance.
fn run(cap: u32, instances: usize, steps: &[Step]) -> Result<u32, TestCaseError> {
    let all: Vec<Arc<Slots>> = (0..instances).map(|i| slots(&format!("i{i}"), cap)).collect();
    let mut store = Store::default();
    let mut now = Instant::now();
    // Requests in flight: instance, request, whether a connection waits for it.
    let mut flight: Vec<(usize, Request, bool)> = Vec::new();
    let mut ghosts: Vec<(usize, Request)> = Vec::new();
    let mut open: Vec<(usize, Slot)> = Vec::new();
    let mut allowance = 0;
    for step in steps {
        match *step {
            Step::Connect(i) => {
                let i = i % instances;
                match all[i].acquire(&client(), now) {
                    Acquire::Admit(slot) => open.push((i, slot)),
                    Acquire::Ask(request) => flight.push((i, request, true)),
                    Acquire::Wait | Acquire::Full | Acquire::TooManyClients => {}
                }
            }
            Step::Deliver(n) if !flight.is_empty() => {
                let (i, request, _) = flight.remove(n % flight.len());
                let granted = store.apply(all[i].instance(), &request, now);
                if let Answer::Admit(slot) = all[i].answer(&request, Some(granted), now) {
                    open.push((i, slot));
                }
            }
            Step::Timeout(n) if !flight.is_empty() => {
                let (i, request, _) = flight.remove(n % flight.len());
                let _ = all[i].answer(&request, None, now);
                ghosts.push((i, request));
            }
            Step::Ghost(n) if !ghosts.is_empty() => {
                let (i, request) = ghosts.remove(n % ghosts.len());
                store.apply(all[i].instance(), &request, now);
            }
            Step::Close(n) if !open.is_empty() => {
                open.remove(n % open.len());
            }
            Step::Keep(i, every) => {
                let i = i % instances;
                if let Some(requests) = all[i].due(now, every) {
                    flight.extend(requests.into_iter().map(|r| (i, r, false)));
                }
            }
            Step::Advance(hundredths) => {
                let later = now + LEASE * hundredths / 100;
                for slots in &all {
                    let record = store.records.get(&(client(), slots.instance().to_owned()));
                    if record.is_some_and(|r| r.2 > now && r.2 <= later) {
                        allowance += slots.open(&client());
                    }
                }
                now = later;
            }
            _ => {}
        }
        let total = u32::try_from(open.len()).expect("few");
        prop_assert!(
            total <= cap + allowance,
            "{total} open over a cap of {cap} (+{allowance} after expiries) after {step:?}"
        );
        for (i, slots) in all.iter().enumerate() {
            let here = open.iter().filter(|(o, _)| *o == i).count();
            prop_assert_eq!(slots.open(&client()) as usize, here);
        }
    }
    Ok(allowance)
}

proptest! {
    /// Requests delivered in any order, answers lost, lost requests applied late, connections
    /// closing and keepers running at any time: with every lease alive, never more than the
    /// cap open over all instances.
    #[test]
    fn several_instances_never_hold_more_than_the_cap_in_total(
        cap in 1u32..12, instances in 1usize..5, steps in steps(false),
    ) {
        prop_assert_eq!(run(cap, instances, &steps)?, 0);
    }

    /// With time passing and keepers late, a record may expire while its connections are open:
    /// the total then exceeds the cap by at most the connections open on such an instance when
    /// its record expired.
    #[test]
    fn an_expired_lease_lets_the_total_exceed_the_cap_by_at_most_the_connections_it_held(
        cap in 1u32..12, instances in 1usize..5, steps in steps(true),
    ) {
        run(cap, instances, &steps)?;
    }
}
