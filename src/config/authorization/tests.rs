//! Tests of the `[authorization]` table's shape: entries, patterns, networks, deny and shadow,
//! each accepted form beside the refusals around it.

use crate::authz::{Grant, Name};
use crate::config::Config;

const UPSTREAMS: &str =
    "[[upstream]]\nname='web'\nbackends=['127.0.0.1:1']\n[[upstream]]\nname='db'\nbackends=['127.0.0.1:2']\n";

fn load(authorization: &str) -> Result<Config, String> {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='web'\n{UPSTREAMS}[authorization]\n{authorization}\n"
    );
    Config::from_toml(&text, "t").map_err(|e| e.to_string())
}

fn refused(authorization: &str, expected: &[&str]) {
    let e = load(authorization).expect_err(authorization);
    for part in expected {
        assert!(e.contains(part), "{authorization}: {e:?} lacks {part:?}");
    }
}

fn name(text: &str) -> Name {
    Name::parse(text).expect(text)
}

#[test]
fn entries_take_upstream_names_and_tables_with_networks() {
    let config = load(
        "alice = ['web', { upstream = 'db', from = ['10.1.0.0/16', '::1'] }]\n'*.batch.internal' = ['db']",
    )
    .expect("valid");
    let policy = &config.authorization;
    assert_eq!(policy.entries.len(), 2);
    let (who, grants) = &policy.entries[1];
    assert_eq!(who, &name("alice"));
    assert_eq!(grants[0], Grant::to("web"));
    assert_eq!(grants[1].upstream, "db");
    assert_eq!(grants[1].from.len(), 2);
    assert_eq!(policy.entries[0].0, name("*.batch.internal"));
}

#[test]
fn a_grant_naming_a_missing_upstream_or_with_a_bad_shape_is_refused() {
    refused(
        "alice = ['nope']",
        &["authorization.\"alice\"[0]", "no [[upstream]] has this name"],
    );
    refused(
        "alice = [{ upstream = 'nope', from = ['10.0.0.0/8'] }]",
        &["no [[upstream]]"],
    );
    refused(
        "alice = [{ upstream = 'web', form = ['10.0.0.0/8'] }]",
        &["\"form\"", "unknown key"],
    );
    refused(
        "alice = [{ from = ['10.0.0.0/8'] }]",
        &["expected an upstream name"],
    );
    refused("alice = [1]", &["expected an upstream name"]);
    refused("alice = 'web'", &["expected a list of upstreams"]);
    refused(
        "alice = [{ upstream = 'web', from = [] }]",
        &["from", "admits no source"],
    );
    refused(
        "alice = [{ upstream = 'web', from = ['10.0.0.0/33'] }]",
        &["from", "prefix length"],
    );
    refused("'' = ['web']", &["not empty"]);
}

#[test]
fn malformed_patterns_and_patterns_across_trust_domains_are_refused() {
    refused(
        "'spiffe://*/ns/a' = ['web']",
        &["spiffe://*/ns/a", "trust domain"],
    );
    refused("'spiffe://prod/ns/pay*' = ['web']", &["whole path segment"]);
    refused("'spiffe://prod/**/sa' = ['web']", &["last path segment"]);
    refused("'alice*' = ['web']", &["leading `*.`"]);
    load("'spiffe://prod/ns/*/sa/**' = ['web']").expect("a valid pattern");
}

#[test]
fn deny_takes_a_list_or_a_table_of_reasons() {
    let config = load("alice = ['web']\ndeny = ['bob', 'spiffe://prod/ns/x/**']").expect("list");
    assert_eq!(config.authorization.deny.len(), 2);
    assert_eq!(config.authorization.deny[0], (name("bob"), String::new()));
    let config = load("alice = ['web']\n[authorization.deny]\nbob = 'key leaked'").expect("table");
    assert_eq!(
        config.authorization.deny,
        [(name("bob"), "key leaked".to_string())]
    );
    refused("deny = 'bob'", &["authorization.deny", "expected a list"]);
    refused("deny = ['spiffe://*/x']", &["trust domain"]);
    refused("[authorization.deny]\nbob = 1", &["expected the reason"]);
}

#[test]
fn a_shadow_table_has_the_same_shape_but_no_shadow_of_its_own() {
    let config =
        load("alice = ['web']\n[authorization.shadow]\nalice = ['db']\ndeny = ['bob']").expect("valid");
    let shadow = config.authorization.shadow.as_ref().expect("shadow");
    assert_eq!(shadow.entries, [(name("alice"), vec![Grant::to("db")])]);
    assert_eq!(shadow.deny.len(), 1);
    refused(
        "[authorization.shadow]\nalice = ['nope']",
        &["authorization.shadow.\"alice\"[0]"],
    );
    refused(
        "[authorization.shadow.shadow]\nalice = ['web']",
        &["no shadow of its own"],
    );
    refused("shadow = ['web']", &["expected a table"]);
}

#[test]
fn allow_from_and_deny_from_take_networks_and_allow_from_is_never_empty() {
    let listener = |keys: &str| {
        let text = format!("[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='web'\n{keys}\n{UPSTREAMS}");
        Config::from_toml(&text, "t").map_err(|e| e.to_string())
    };
    let config = listener("allow_from = ['10.0.0.0/8']\ndeny_from = ['10.0.0.1']").expect("valid");
    assert_eq!(config.listeners[0].allow_from.len(), 1);
    assert_eq!(config.listeners[0].deny_from.len(), 1);
    let e = listener("allow_from = []").expect_err("empty");
    assert!(e.contains("allow_from") && e.contains("admits no source"), "{e}");
    let e = listener("deny_from = ['not-a-network']").expect_err("bad");
    assert!(e.contains("deny_from"), "{e}");
}
