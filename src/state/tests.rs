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
    Live::new(
        State::assemble(&config, loaded, addrs, None, 1, Default::default()),
        None,
    )
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

fn upstream_config(toml_backends: &str, extra: &str) -> UpstreamConfig {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\n{toml_backends}\n{extra}\n"
    );
    let config = crate::Config::from_toml(&text, "t").expect("config");
    config.upstreams[0].clone()
}

#[test]
fn a_discovered_set_becomes_backends_and_a_missing_address_is_retired() {
    let config = upstream_config("discover='app.internal:80'", "");
    let addrs: Vec<SocketAddr> = ["127.0.0.11:80", "127.0.0.12:80"]
        .map(|a| a.parse().expect("addr"))
        .to_vec();
    let first = Upstream::new(&config, None, None, &addrs);
    let labels: Vec<&str> = first.backends.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels, ["127.0.0.11:80", "127.0.0.12:80"]);
    let lease = first.pool.pick(&[first.backends[0].slot]).expect("a backend");
    assert_eq!(lease.index(), first.backends[1].slot);
    let next = Upstream::new(&config, None, Some(&first), &addrs[..1]);
    assert!(
        Arc::ptr_eq(&next.backends[0], &first.backends[0]),
        "a kept address keeps its backend"
    );
    assert_eq!(next.backends.len(), 1);
    // The retired backend's lease still counts; no new connection can reach it.
    assert_eq!(next.pool.active(lease.index()), 1);
    for _ in 0..3 {
        assert_eq!(
            next.pool.pick(&[]).expect("a backend").index(),
            next.backends[0].slot
        );
    }
}

#[test]
fn a_backend_joining_a_running_upstream_ramps_in_and_the_first_ones_do_not() {
    let config = upstream_config(
        "backends=['127.0.0.1:1']",
        "[upstream.health_check]\nslow_start='30s'",
    );
    let first = Upstream::new(&config, None, None, &[]);
    assert!(!first.pool.is_ramping(first.backends[0].slot, Instant::now()));
    let grown = upstream_config(
        "backends=['127.0.0.1:1', '127.0.0.1:2']",
        "[upstream.health_check]\nslow_start='30s'",
    );
    let next = Upstream::new(&grown, None, Some(&first), &[]);
    assert!(!next.pool.is_ramping(next.backends[0].slot, Instant::now()));
    assert!(next.pool.is_ramping(next.backends[1].slot, Instant::now()));
}

#[test]
fn a_runtime_weight_stands_until_the_configured_weight_changes() {
    let config = |w: u32| upstream_config(&format!("backends=[{{ addr='127.0.0.1:1', weight={w} }}]"), "");
    let first = Upstream::new(&config(2), None, None, &[]);
    let slot = first.backends[0].slot;
    first.pool.respec(
        slot,
        Spec {
            weight: 7,
            ..first.pool.spec(slot).expect("spec")
        },
    );
    let same = Upstream::new(&config(2), None, Some(&first), &[]);
    assert_eq!(
        same.pool.weight(slot),
        7,
        "an unchanged configured weight keeps the runtime one"
    );
    let changed = Upstream::new(&config(5), None, Some(&same), &[]);
    assert_eq!(changed.pool.weight(slot), 5);
}
