use super::*;

fn run(state: &mut HealthState, outcomes: &[bool]) -> Vec<Option<Transition>> {
    outcomes.iter().map(|ok| state.observe(*ok)).collect()
}

#[test]
fn a_backend_starts_up_and_goes_down_only_after_fall_consecutive_failures() {
    let mut state = HealthState::new(2, 3);
    assert!(state.is_up());
    assert_eq!(run(&mut state, &[false, false]), vec![None, None]);
    assert!(state.is_up());
    assert_eq!(state.observe(false), Some(Transition::Down));
    assert!(!state.is_up());
    assert_eq!(state.observe(false), None, "already down: no second transition");
}

#[test]
fn a_down_backend_comes_back_only_after_rise_consecutive_successes() {
    let mut state = HealthState::new(2, 1);
    assert_eq!(state.observe(false), Some(Transition::Down));
    assert_eq!(run(&mut state, &[true, false, true]), vec![None, None, None]);
    assert!(!state.is_up());
    assert_eq!(state.observe(true), Some(Transition::Up));
    assert_eq!(state.observe(true), None, "already up: no second transition");
}

#[test]
fn alternating_results_never_mark_a_backend_down_with_fall_three() {
    let mut state = HealthState::new(2, 3);
    let flapping: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
    assert!(run(&mut state, &flapping).iter().all(Option::is_none));
    let two_and_one: Vec<bool> = (0..99).map(|i| i % 3 != 0).collect();
    assert!(run(&mut state, &two_and_one).iter().all(Option::is_none));
    assert!(state.is_up());
}

#[test]
fn a_successful_real_connect_ends_a_failure_streak_but_never_brings_a_backend_back() {
    let mut state = HealthState::new(1, 3);
    run(&mut state, &[false, false]);
    state.observe_traffic_success();
    assert_eq!(run(&mut state, &[false, false]), vec![None, None]);
    assert_eq!(state.observe(false), Some(Transition::Down));
    state.observe_traffic_success();
    assert!(!state.is_up());
    assert_eq!(state.observe(true), Some(Transition::Up));
}

#[test]
fn rise_and_fall_of_zero_behave_as_one() {
    let mut state = HealthState::new(0, 0);
    assert_eq!(state.observe(false), Some(Transition::Down));
    assert_eq!(state.observe(true), Some(Transition::Up));
}

#[test]
fn replies_are_judged_against_expect_byte_for_byte() {
    assert!(check_reply(b"+PONG", b"+PONG").is_ok());
    assert!(matches!(check_reply(b"+PONG", b"-ERR "), Err(Failure::Mismatch)));
    assert!(matches!(check_reply(b"+PONG", b"-"), Err(Failure::Mismatch)));
    assert!(matches!(
        check_reply(b"+PONG", b"+PO"),
        Err(Failure::ShortReply { got: 3, want: 5 })
    ));
    assert_eq!(Failure::Mismatch.to_string(), "reply did not match expect");
}

#[test]
fn a_jittered_interval_stays_within_ten_percent_and_never_overflows() {
    let minute = Duration::from_secs(60);
    assert_eq!(jittered(minute, 0.0), Duration::from_secs(54));
    assert_eq!(jittered(minute, 1.0), Duration::from_secs(66));
    assert_eq!(
        jittered(Duration::MAX, 1.0),
        Duration::MAX,
        "saturates instead of panicking"
    );
}
