//! Tests of the authorization decision: every allow beside the denials that surround it.

use super::*;

fn grants() -> Authorization {
    Authorization::new([
        ("alice".to_owned(), vec!["db".to_owned(), "web".to_owned()]),
        (
            "spiffe://example.org/ns/prod/sa/web".to_owned(),
            vec!["db".to_owned()],
        ),
        ("idle".to_owned(), Vec::new()),
    ])
}

fn id(name: &str) -> ClientIdentity {
    ClientIdentity::new(name)
}

#[test]
fn a_listed_identity_is_allowed_to_its_upstreams() {
    let authz = grants();
    assert_eq!(authz.check(&id("alice"), "db"), Decision::Allow);
    assert_eq!(authz.check(&id("alice"), "web"), Decision::Allow);
    let spiffe = id("spiffe://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "db"), Decision::Allow);
}

#[test]
fn an_unknown_identity_is_denied() {
    assert_eq!(grants().check(&id("mallory"), "db"), Decision::Deny);
    assert_eq!(grants().check(&id(""), "db"), Decision::Deny);
}

#[test]
fn a_known_identity_is_denied_an_upstream_not_listed_for_it() {
    let authz = grants();
    let spiffe = id("spiffe://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "web"), Decision::Deny);
    assert_eq!(authz.check(&id("alice"), "cache"), Decision::Deny);
    assert_eq!(authz.check(&id("idle"), "db"), Decision::Deny);
}

#[test]
fn an_identity_differing_only_in_case_is_denied() {
    let authz = grants();
    assert_eq!(authz.check(&id("Alice"), "db"), Decision::Deny);
    assert_eq!(authz.check(&id("ALICE"), "db"), Decision::Deny);
    let spiffe = id("SPIFFE://example.org/ns/prod/sa/web");
    assert_eq!(authz.check(&spiffe, "db"), Decision::Deny);
}

#[test]
fn an_upstream_differing_only_in_case_is_denied() {
    assert_eq!(grants().check(&id("alice"), "DB"), Decision::Deny);
}

#[test]
fn prefixes_suffixes_and_padding_of_a_listed_identity_are_denied() {
    let authz = grants();
    for name in [
        "alice2", "alic", "xalice", " alice", "alice ", "alice\0", "\0alice",
    ] {
        assert_eq!(authz.check(&id(name), "db"), Decision::Deny, "{name:?}");
    }
    let longer = id("spiffe://example.org/ns/prod/sa/web/extra");
    assert_eq!(authz.check(&longer, "db"), Decision::Deny);
    let shorter = id("spiffe://example.org/ns/prod/sa");
    assert_eq!(authz.check(&shorter, "db"), Decision::Deny);
}

#[test]
fn an_identity_containing_nul_is_denied_even_if_configured() {
    let authz = Authorization::new([("ali\0ce".to_owned(), vec!["db".to_owned()])]);
    assert_eq!(authz.check(&id("ali\0ce"), "db"), Decision::Deny);
}

#[test]
fn an_empty_authorization_denies_everything() {
    let authz = Authorization::default();
    assert_eq!(authz.check(&id("alice"), "db"), Decision::Deny);
    assert_eq!(authz.upstreams_named().count(), 0);
}

#[test]
fn repeated_entries_for_one_identity_are_merged() {
    let authz = Authorization::new([
        ("alice".to_owned(), vec!["db".to_owned()]),
        ("alice".to_owned(), vec!["web".to_owned(), "db".to_owned()]),
    ]);
    assert_eq!(authz.check(&id("alice"), "db"), Decision::Allow);
    assert_eq!(authz.check(&id("alice"), "web"), Decision::Allow);
    assert_eq!(authz.upstreams_named().count(), 2);
}

#[test]
fn upstreams_named_lists_every_granted_pair_once_in_sorted_order() {
    let authz = grants();
    let pairs: Vec<(&str, &str)> = authz.upstreams_named().collect();
    assert_eq!(
        pairs,
        [
            ("alice", "db"),
            ("alice", "web"),
            ("spiffe://example.org/ns/prod/sa/web", "db"),
        ]
    );
}

proptest::proptest! {
    #[test]
    fn only_the_exactly_listed_pair_is_allowed(
        listed in "[a-zA-Z0-9]{1,8}",
        other in "[a-zA-Z0-9]{0,9}",
        mutation in 0u8..5,
        same_upstream in proptest::bool::ANY,
    ) {
        let authz = Authorization::new([(listed.clone(), vec!["db".to_owned()])]);
        let asked = match mutation {
            0 => listed.clone(),
            1 => format!("{listed}{other}"),
            2 => format!("{other}{listed}"),
            3 => listed.to_ascii_uppercase(),
            _ => other,
        };
        let upstream = if same_upstream { "db" } else { "web" };
        let expected = if asked == listed && same_upstream {
            Decision::Allow
        } else {
            Decision::Deny
        };
        proptest::prop_assert_eq!(authz.check(&id(&asked), upstream), expected);
    }
}
