use super::*;
use crate::identity::ClientIdentity;
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
        server_name: None,
        source: std::net::Ipv4Addr::LOCALHOST.into(),
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
    let lease = first
        .pool
        .pick(&[first.backends[0].slot], Instant::now())
        .expect("a backend");
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
            next.pool.pick(&[], Instant::now()).expect("a backend").index(),
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
        Instant::now(),
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

#[test]
fn a_rotating_discovered_set_reuses_the_slots_of_removed_backends_instead_of_growing_the_pool() {
    let config = upstream_config("discover='app.internal:80'", "");
    let set = |round: u8| -> Vec<SocketAddr> {
        (1..=4)
            .map(|host| SocketAddr::from(([10, round, 0, host], 80)))
            .collect()
    };
    let mut running = Upstream::new(&config, None, None, &set(0));
    let mut slots = Vec::new();
    for round in 1..=10 {
        // As a rebuild does: the next generation is built while the one before is still live,
        // and replaces it.
        running = Upstream::new(&config, None, Some(&running), &set(round));
        slots.push(running.pool.len());
        let labels: Vec<String> = running.backends.iter().map(|b| b.label.clone()).collect();
        let wanted: Vec<String> = set(round).iter().map(|a| a.to_string()).collect();
        assert_eq!(labels, wanted, "round {round}");
        let leases: Vec<_> = (0..4)
            .filter_map(|_| running.pool.pick(&[], Instant::now()))
            .collect();
        let mut picked: Vec<usize> = leases.iter().map(|l| l.index()).collect();
        picked.sort_unstable();
        let mut own: Vec<usize> = running.backends.iter().map(|b| b.slot).collect();
        own.sort_unstable();
        assert_eq!(picked, own, "round {round}: only this set's backends are picked");
    }
    // Two sets at most: the live one and the one it replaced (live while it was built).
    assert_eq!(slots, [8; 10]);
}

#[test]
fn a_removed_backend_keeps_its_slot_while_a_lease_of_it_or_a_generation_holding_it_lives() {
    let config = upstream_config("discover='app.internal:80'", "");
    let addr = |host: u8| SocketAddr::from(([10, 0, 0, host], 80));
    let first = Upstream::new(&config, None, None, &[addr(1), addr(2)]);
    let lease = first
        .pool
        .pick(&[first.backends[1].slot], Instant::now())
        .expect("the first backend");
    assert_eq!(lease.index(), 0);
    let second = Upstream::new(&config, None, Some(&first), &[addr(2)]);
    drop(first);
    // 10.0.0.1's backend is gone, but a connection still holds a lease of its slot.
    let third = Upstream::new(&config, None, Some(&second), &[addr(2), addr(3)]);
    assert_eq!((third.backends[1].slot, third.pool.len()), (2, 3));
    assert_eq!(third.pool.active(0), 1, "the lease still counts on its slot");
    drop(lease);
    drop(second);
    let fourth = Upstream::new(&config, None, Some(&third), &[addr(2), addr(3), addr(4)]);
    assert_eq!(
        (fourth.backends[2].slot, fourth.pool.len()),
        (0, 3),
        "a slot nothing refers to is reused"
    );
    assert_eq!(fourth.backend(0).map(|b| b.label.as_str()), Some("10.0.0.4:80"));
    drop(third);
    // 10.0.0.4 goes, then another address comes while `fourth`, which maps slot 0 to
    // 10.0.0.4, is still held (by a connection of that generation, say).
    let fifth = Upstream::new(&config, None, Some(&fourth), &[addr(2), addr(3)]);
    let sixth = Upstream::new(&config, None, Some(&fifth), &[addr(2), addr(3), addr(5)]);
    assert_eq!((sixth.backends[2].slot, sixth.pool.len()), (3, 4));
    assert_eq!(fourth.backend(0).map(|b| b.label.as_str()), Some("10.0.0.4:80"));
    assert!(sixth.backend(0).is_none());
}

/// A live generation with an mTLS listener `a` (a fresh development PKI in `dir`) where alice
/// may reach `u`, and its config.
fn mtls_live(dir: &std::path::Path) -> (Live, Config) {
    let pki = crate::pki::generate(&[], &[]).expect("development PKI");
    crate::pki::write(dir, &pki, true).expect("write the PKI");
    let path = |name: &str| dir.join(name).display().to_string();
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='{}'\nkey='{}'\nclient_ca='{}'\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[authorization]\nalice=['u']\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem"),
    );
    let config = crate::Config::from_toml(&text, "t").expect("config");
    let loaded = build::load(&config).expect("load");
    let addrs = vec![("a".to_string(), "127.0.0.1:1".parse().expect("addr"))];
    let state = State::assemble(&config, loaded, addrs, None, 1, Default::default());
    (Live::new(state, None), config)
}

#[test]
fn a_rebuild_that_keeps_the_trust_verifies_no_open_certificate_and_a_reload_does() {
    let dir = std::env::temp_dir().join(format!("fulcrum-state-trust-{}", std::process::id()));
    let (live, config) = mtls_live(&dir);
    // Registered with a chain that does not verify (none at all): only a new verification
    // can cut it, since alice stays authorized.
    let open = register(&live, None);
    let current = live.state();
    let tls = current.listener("a").and_then(|l| l.tls_for(None)).expect("TLS");
    assert!(!tls.accepts(&[]), "an empty chain verifies");
    let addrs = vec![("a".to_string(), current.listener("a").expect("a").bind)];

    // A changed `discover` set: the same config, the loaded files reused.
    let rebuilt = State::assemble(
        &current.config,
        build::Loaded::reuse(&current),
        addrs.clone(),
        Some(&current),
        2,
        Arc::clone(&current.discovered),
    );
    drop(current);
    assert_eq!(live.swap(Arc::new(rebuilt)), 0);
    assert_eq!(open.cut.reason(), None, "a rebuild verified an open certificate");

    // A reload reads the CA file again: a new verifier, so open chains are verified again.
    let current = live.state();
    let loaded = build::load(&config).expect("load");
    let reloaded = State::assemble(
        &config,
        loaded,
        addrs,
        Some(&current),
        3,
        Arc::clone(&current.discovered),
    );
    drop(current);
    assert_eq!(live.swap(Arc::new(reloaded)), 1);
    assert_eq!(open.cut.reason(), Some(Cut::AccessRevoked));
    let _ = std::fs::remove_dir_all(&dir);
}
