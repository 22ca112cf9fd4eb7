use super::*;
use std::time::UNIX_EPOCH;

fn live() -> Live {
    let config = crate::Config::from_toml(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n",
        "t",
    )
    .expect("config");
    let loaded = build::load(&config).expect("load");
    let addrs = vec![("a".to_string(), "127.0.0.1:1".parse().expect("addr"))];
    Live::new(State::assemble(&config, loaded, addrs, None, 1), None)
}

fn grant(expires: Option<u64>) -> Grant {
    Grant {
        listener: "a".into(),
        upstream: "u".into(),
        identity: ClientIdentity::new("alice"),
        chain: Vec::new(),
        expires: expires.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
    }
}

fn register(live: &Live, expires: Option<u64>) -> Registration {
    let ok: Result<((), Option<Grant>), ()> = Ok(((), Some(grant(expires))));
    let (_, registration) = live
        .admit(1, ok, |_| unreachable!("generation 1 is live"))
        .expect("admitted");
    registration.expect("registered")
}

#[test]
fn expiry_cuts_only_registrations_whose_time_has_come_and_reports_the_next() {
    let live = live();
    let early = register(&live, Some(100));
    let late = register(&live, Some(200));
    let never = register(&live, None);
    assert_eq!(live.registry.expire(UNIX_EPOCH + Duration::from_secs(99)).0, 0);
    let (cut, next) = live.registry.expire(UNIX_EPOCH + Duration::from_secs(150));
    assert_eq!((cut, next), (1, Some(UNIX_EPOCH + Duration::from_secs(200))));
    assert_eq!(early.cut.reason(), Some(Cut::CertExpired));
    assert_eq!((late.cut.reason(), never.cut.reason()), (None, None));
    assert_eq!(
        live.registered(),
        3,
        "a cut connection stays registered until it closes"
    );
}

#[test]
fn a_closed_connection_leaves_no_expiry_behind() {
    let live = live();
    drop(register(&live, Some(100)));
    assert_eq!(live.registered(), 0);
    assert_eq!(
        live.registry.expire(UNIX_EPOCH + Duration::from_secs(1000)),
        (0, None)
    );
}

#[test]
fn admission_judges_again_when_a_reload_swapped_in_between() {
    let live = live();
    let first = || -> Result<(String, Option<Grant>), ()> { Ok(("first".into(), None)) };
    let again = |state: &Arc<State>| Ok((format!("again, by generation {}", state.generation), None));
    let (verdict, _) = live.admit(0, first(), again).expect("admitted");
    assert_eq!(verdict, "again, by generation 1");
    let (verdict, _) = live
        .admit(1, first(), |_| unreachable!("still live"))
        .expect("admitted");
    assert_eq!(verdict, "first");
    let refused: Result<((), Option<Grant>), &str> = Err("refused");
    assert!(live.admit(1, refused, |_| unreachable!("still live")).is_err());
    assert_eq!(live.registered(), 0, "a refusal registers nothing");
}

#[test]
fn a_swap_revokes_registrations_the_next_generation_no_longer_authorizes() {
    let live = live();
    let kept = register(&live, None);
    let next = live.state();
    // The same generation again (nobody is authorized: [authorization] is empty): alice loses access.
    assert_eq!(live.swap(next), 1);
    assert_eq!(kept.cut.reason(), Some(Cut::AccessRevoked));
}
