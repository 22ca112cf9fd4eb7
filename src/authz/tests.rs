//! Tests of the authorization decision: every allow beside the denials that surround it.

use super::*;
use std::net::IpAddr;

fn grants() -> Authorization {
    Authorization::new(&Policy::exact([
        ("alice", vec!["db", "web"]),
        ("spiffe://example.org/ns/prod/sa/web", vec!["db"]),
        ("idle", Vec::new()),
    ]))
}

const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// The decision for `identity` and `upstream` from [`HOME`].
trait Check {
    fn at(&self, identity: &str, upstream: &str) -> Decision;
}

impl Check for Authorization {
    fn at(&self, identity: &str, upstream: &str) -> Decision {
        self.check(&id(identity), upstream, HOME)
    }
}

const ALLOW: Decision = Decision::Allow;
const UNLISTED: Decision = Decision::Deny(Denial::Unlisted);

fn id(name: &str) -> ClientIdentity {
    ClientIdentity::new(name)
}

#[test]
fn a_listed_identity_is_allowed_to_its_upstreams() {
    let authz = grants();
    assert_eq!(authz.at("alice", "db"), ALLOW);
    assert_eq!(authz.at("alice", "web"), ALLOW);
    let spiffe = id("spiffe://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "db", HOME), ALLOW);
}

#[test]
fn an_unknown_identity_is_denied() {
    assert_eq!(grants().at("mallory", "db"), UNLISTED);
    assert_eq!(grants().at("", "db"), UNLISTED);
}

#[test]
fn a_known_identity_is_denied_an_upstream_not_listed_for_it() {
    let authz = grants();
    let spiffe = id("spiffe://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "web", HOME), UNLISTED);
    assert_eq!(authz.at("alice", "cache"), UNLISTED);
    assert_eq!(authz.at("idle", "db"), UNLISTED);
}

#[test]
fn an_identity_differing_only_in_case_is_denied() {
    let authz = grants();
    assert_eq!(authz.at("Alice", "db"), UNLISTED);
    assert_eq!(authz.at("ALICE", "db"), UNLISTED);
    let spiffe = id("SPIFFE://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "db", HOME), UNLISTED);
}

#[test]
fn an_upstream_differing_only_in_case_is_denied() {
    assert_eq!(grants().at("alice", "DB"), UNLISTED);
}

#[test]
fn prefixes_suffixes_and_padding_of_a_listed_identity_are_denied() {
    let authz = grants();
    for name in [
        "alice2", "alic", "xalice", " alice", "alice ", "alice\0", "\0alice",
    ] {
        assert_eq!(authz.at(name, "db"), UNLISTED, "{name:?}");
    }
    let longer = id("spiffe://example.org/ns/prod/sa/web/extra");
    assert_eq!(authz.check(&longer, "db", HOME), UNLISTED);
    let shorter = id("spiffe://example.org/ns/prod/sa");
    assert_eq!(authz.check(&shorter, "db", HOME), UNLISTED);
}

#[test]
fn an_identity_containing_nul_is_denied_even_if_configured() {
    let authz = Authorization::new(&Policy::exact([("ali\0ce", vec!["db"])]));
    assert_eq!(authz.at("ali\0ce", "db"), UNLISTED);
}

#[test]
fn an_empty_authorization_denies_everything() {
    let authz = Authorization::default();
    assert_eq!(authz.at("alice", "db"), UNLISTED);
    assert_eq!(authz.summary().exact, 0);
}

#[test]
fn repeated_entries_for_one_identity_are_merged() {
    let authz = Authorization::new(&Policy::exact([
        ("alice", vec!["db"]),
        ("alice", vec!["web", "db"]),
    ]));
    assert_eq!(authz.at("alice", "db"), ALLOW);
    assert_eq!(authz.at("alice", "web"), ALLOW);
    assert_eq!(authz.summary().exact, 1);
}

fn name(text: &str) -> Name {
    Name::parse(text).expect(text)
}

fn entry(identity: &str, upstreams: &[&str]) -> (Name, Vec<Grant>) {
    (name(identity), upstreams.iter().map(|u| Grant::to(*u)).collect())
}

fn net(text: &str) -> IpNet {
    IpNet::parse(text).expect(text)
}

const PAYMENTS: &str = "spiffe://prod.example/ns/payments";

#[test]
fn a_one_segment_pattern_allows_one_segment_and_refuses_two() {
    let authz = Authorization::new(&Policy {
        entries: vec![entry("spiffe://prod.example/ns/*/sa/api", &["web"])],
        ..Policy::default()
    });
    assert_eq!(authz.at("spiffe://prod.example/ns/payments/sa/api", "web"), ALLOW);
    assert_eq!(authz.at("spiffe://prod.example/ns/a/b/sa/api", "web"), UNLISTED);
}

#[test]
fn a_double_star_pattern_allows_trailing_segments_and_refuses_the_bare_prefix() {
    let authz = Authorization::new(&Policy {
        entries: vec![entry(&format!("{PAYMENTS}/**"), &["payments"])],
        ..Policy::default()
    });
    assert_eq!(authz.at(&format!("{PAYMENTS}/sa/api"), "payments"), ALLOW);
    assert_eq!(authz.at(&format!("{PAYMENTS}/sa/api/v2"), "payments"), ALLOW);
    assert_eq!(authz.at(PAYMENTS, "payments"), UNLISTED);
    assert_eq!(
        authz.at("spiffe://prod.example/ns/other/sa/api", "payments"),
        UNLISTED
    );
}

#[test]
fn a_dns_suffix_pattern_allows_names_below_it() {
    let authz = Authorization::new(&Policy {
        entries: vec![entry("*.batch.internal", &["jobs"])],
        ..Policy::default()
    });
    assert_eq!(authz.at("worker-1.batch.internal", "jobs"), ALLOW);
    assert_eq!(authz.at("batch.internal", "jobs"), UNLISTED);
    assert_eq!(authz.at("worker-1.batch.internal.evil", "jobs"), UNLISTED);
}

#[test]
fn an_exact_entry_beats_every_pattern_and_its_grants_alone_apply() {
    let api = format!("{PAYMENTS}/sa/api");
    let authz = Authorization::new(&Policy {
        entries: vec![
            entry(&format!("{PAYMENTS}/**"), &["payments"]),
            entry(&api, &["web"]),
        ],
        ..Policy::default()
    });
    let verdict = authz.judge(&id(&api), "web", HOME);
    assert_eq!(verdict.decision, ALLOW);
    assert_eq!(verdict.matched, Matched::Exact(&api));
    assert_eq!(authz.at(&api, "payments"), UNLISTED);
}

#[test]
fn the_most_specific_pattern_wins_and_grants_are_not_unioned() {
    let narrow = format!("{PAYMENTS}/sa/*");
    let authz = Authorization::new(&Policy {
        entries: vec![
            entry("spiffe://prod.example/ns/*/sa/api", &["web"]),
            entry(&narrow, &["payments"]),
            entry("spiffe://prod.example/**", &["metrics"]),
        ],
        ..Policy::default()
    });
    let api = format!("{PAYMENTS}/sa/api");
    let verdict = authz.judge(&id(&api), "payments", HOME);
    assert_eq!(
        verdict,
        Verdict {
            decision: ALLOW,
            matched: Matched::Pattern(&narrow)
        }
    );
    assert_eq!(authz.at(&api, "web"), UNLISTED);
    assert_eq!(authz.at(&api, "metrics"), UNLISTED);
    assert_eq!(authz.at("spiffe://prod.example/ns/shop/sa/api", "web"), ALLOW);
    assert_eq!(authz.at("spiffe://prod.example/ns/shop/sa/db", "metrics"), ALLOW);
    assert_eq!(authz.overlaps().len(), 3);
}

#[test]
fn a_deny_entry_beats_an_exact_grant() {
    let policy = Policy {
        entries: vec![entry("alice", &["web"]), entry("bob", &["web"])],
        deny: vec![(name("alice"), "key leaked".to_owned())],
        shadow: None,
    };
    let authz = Authorization::new(&policy);
    let verdict = authz.judge(&id("alice"), "web", HOME);
    assert_eq!(verdict.decision, Decision::Deny(Denial::Denied));
    assert_eq!(verdict.matched, Matched::Deny("alice", "key leaked"));
    assert_eq!(authz.at("bob", "web"), ALLOW);
}

#[test]
fn a_deny_pattern_beats_a_matching_grant_and_spares_the_rest() {
    let policy = Policy {
        entries: vec![entry("spiffe://prod.example/**", &["web"])],
        deny: vec![(name(&format!("{PAYMENTS}/**")), String::new())],
        shadow: None,
    };
    let authz = Authorization::new(&policy);
    assert_eq!(
        authz.at(&format!("{PAYMENTS}/sa/api"), "web"),
        Decision::Deny(Denial::Denied)
    );
    assert_eq!(authz.at("spiffe://prod.example/ns/shop/sa/api", "web"), ALLOW);
}

#[test]
fn a_grant_with_networks_allows_its_sources_and_refuses_others() {
    let policy = Policy {
        entries: vec![(
            name("alice"),
            vec![Grant {
                upstream: "web".into(),
                from: vec![net("127.0.0.2")],
            }],
        )],
        ..Policy::default()
    };
    let authz = Authorization::new(&policy);
    let other: IpAddr = "127.0.0.3".parse().expect("address");
    assert_eq!(authz.check(&id("alice"), "web", HOME), ALLOW);
    assert_eq!(
        authz.check(&id("alice"), "web", other),
        Decision::Deny(Denial::Source)
    );
    let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("address");
    assert_eq!(authz.check(&id("alice"), "web", mapped), ALLOW);
}

#[test]
fn an_upstream_granted_from_anywhere_and_from_networks_is_granted_from_anywhere() {
    let policy = Policy {
        entries: vec![(
            name("alice"),
            vec![
                Grant {
                    upstream: "web".into(),
                    from: vec![net("10.0.0.0/8")],
                },
                Grant::to("web"),
            ],
        )],
        ..Policy::default()
    };
    assert_eq!(Authorization::new(&policy).at("alice", "web"), ALLOW);
}

#[test]
fn a_listener_table_inherits_the_global_deny_entries() {
    let global = Policy {
        deny: vec![(name("alice"), String::new())],
        ..Policy::default()
    };
    let own = Policy {
        entries: vec![entry("alice", &["web"])],
        shadow: Some(Box::new(Policy {
            entries: vec![entry("alice", &["web"])],
            ..Policy::default()
        })),
        ..Policy::default()
    };
    let authz = Authorization::new(&own.inheriting_deny(&global));
    assert_eq!(authz.at("alice", "web"), Decision::Deny(Denial::Denied));
    let shadow = authz.shadow().expect("shadow");
    assert_eq!(shadow.at("alice", "web"), Decision::Deny(Denial::Denied));
}

/// The documented winner, written the slow way: every matching entry, the exact one if any,
/// else the one whose literal prefix is longest, then without `**`, then with more segments,
/// then whose text sorts first.
fn documented_winner(entries: &[String], identity: &str) -> Option<String> {
    let matching: Vec<&String> = entries.iter().filter(|e| name(e).matches(identity)).collect();
    if let Some(exact) = matching.iter().find(|e| !e.contains('*')) {
        return Some((*exact).clone());
    }
    let rank = |e: &String| {
        let literal = e.find('*').unwrap_or(e.len());
        let tail = e.ends_with("**");
        let segments = e.trim_start_matches("spiffe://").split('/').count() - 1 - usize::from(tail);
        (literal, !tail, segments)
    };
    let best = matching.iter().map(|e| rank(e)).max()?;
    matching.into_iter().filter(|e| rank(e) == best).min().cloned()
}

proptest::proptest! {
    #[test]
    fn only_the_exactly_listed_pair_is_allowed(
        listed in "[a-zA-Z0-9]{1,8}",
        other in "[a-zA-Z0-9]{0,9}",
        mutation in 0u8..5,
        same_upstream in proptest::bool::ANY,
    ) {
        let authz = Authorization::new(&Policy::exact([(listed.clone(), vec!["db"])]));
        let asked = match mutation {
            0 => listed.clone(),
            1 => format!("{listed}{other}"),
            2 => format!("{other}{listed}"),
            3 => listed.to_ascii_uppercase(),
            _ => other,
        };
        let upstream = if same_upstream { "db" } else { "web" };
        let expected = if asked == listed && same_upstream { ALLOW } else { UNLISTED };
        proptest::prop_assert_eq!(authz.at(&asked, upstream), expected);
    }

    #[test]
    fn the_chosen_entry_is_the_documented_winner(
        raw in proptest::collection::vec(proptest::collection::vec(0u8..5, 1..5), 1..12),
        tails in proptest::collection::vec(proptest::bool::ANY, 12),
        asked in proptest::collection::vec(0u8..3, 1..6),
    ) {
        // Entries over a tiny alphabet so that they overlap often: segment 0..2 literal, 3 `*`.
        let segment = |s: u8| match s { 0 => "a", 1 => "b", 2 => "c", _ => "*" };
        let mut entries: Vec<String> = raw.iter().zip(&tails).map(|(segments, tail)| {
            let path: Vec<&str> = segments.iter().map(|s| segment(*s)).collect();
            let tail = if *tail { "/**" } else { "" };
            format!("spiffe://td/{}{tail}", path.join("/"))
        }).collect();
        entries.sort();
        entries.dedup();
        let identity = format!("spiffe://td/{}", asked.iter().map(|s| segment(*s)).collect::<Vec<_>>().join("/"));
        let upstream = |e: &String| format!("u{}", entries.iter().position(|x| x == e).unwrap_or(0));
        let policy = Policy {
            entries: entries.iter().map(|e| (name(e), vec![Grant::to(upstream(e))])).collect(),
            ..Policy::default()
        };
        let authz = Authorization::new(&policy);
        let winner = documented_winner(&entries, &identity);
        for e in &entries {
            let expected = if Some(e) == winner.as_ref() { ALLOW } else { UNLISTED };
            proptest::prop_assert_eq!(authz.at(&identity, &upstream(e)), expected, "{} for {}", e, identity);
        }
        let matched = authz.judge(&id(&identity), "none", HOME).matched;
        let expected = match &winner {
            None => Matched::Nothing,
            Some(w) if !w.contains('*') => Matched::Exact(w),
            Some(w) => Matched::Pattern(w),
        };
        proptest::prop_assert_eq!(matched, expected);
    }
}
