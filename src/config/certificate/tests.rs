//! `[[listener.tls.certificate]]`: the server-name rule, the choice of an entry, and the config
//! rules, each refusal beside the acceptance it bounds.

use std::path::Path;

use super::{select, ServerName};
use crate::config::{Config, TlsConfig};

fn names(list: &[&str]) -> Vec<ServerName> {
    list.iter()
        .map(|n| ServerName::parse(n).expect("valid server name"))
        .collect()
}

/// Which of `entries` (each a list of server names) `select` picks for `sni`.
fn pick(entries: &[&[&str]], sni: Option<&str>) -> Option<usize> {
    let entries: Vec<Vec<ServerName>> = entries.iter().map(|e| names(e)).collect();
    select(entries.iter().map(Vec::as_slice), sni)
}

#[test]
fn an_exact_name_wins_over_a_wildcard_listed_before_it() {
    let entries: &[&[&str]] = &[&["*.b.example"], &["x.b.example"]];
    assert_eq!(pick(entries, Some("x.b.example")), Some(1));
    assert_eq!(pick(entries, Some("y.b.example")), Some(0));
}

#[test]
fn a_wildcard_covers_one_label_and_neither_two_nor_none() {
    let entries: &[&[&str]] = &[&["a.example"], &["*.b.example"]];
    assert_eq!(pick(entries, Some("x.b.example")), Some(1));
    assert_eq!(pick(entries, Some("y.x.b.example")), None);
    assert_eq!(pick(entries, Some("b.example")), None);
    assert_eq!(pick(entries, Some(".b.example")), None);
}

#[test]
fn names_compare_without_regard_to_ascii_case_and_no_sni_picks_no_entry() {
    let entries: &[&[&str]] = &[&["A.Example"], &["*.B.example"]];
    assert_eq!(pick(entries, Some("a.EXAMPLE")), Some(0));
    assert_eq!(pick(entries, Some("X.b.Example")), Some(1));
    assert_eq!(pick(entries, Some("c.example")), None);
    assert_eq!(pick(entries, None), None);
}

#[test]
fn a_server_name_is_a_dns_name_or_a_leading_wildcard_label() {
    for good in ["a.example", "*.b.example", "localhost", "x-1_y.example"] {
        assert!(ServerName::parse(good).is_ok(), "{good} refused");
    }
    for bad in [
        "",
        "*",
        "*.",
        "a..example",
        "a.*.example",
        "**.example",
        "a.example.",
        "a b",
        "10.0.0.1",
    ] {
        assert!(ServerName::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(
        ServerName::parse("*.B.Example").expect("valid").to_string(),
        "*.b.example"
    );
}

/// A listener `a` with `[listener.tls]` holding `tls` (its keys, then entries), upstream `u`.
fn config(tls: &str) -> Result<Config, String> {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\n{tls}\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n"
    );
    Config::from_toml(&text, "t").map_err(|e| e.to_string())
}

fn tls_of(config: &Config) -> &TlsConfig {
    config.listeners[0].tls.as_ref().expect("a TLS listener")
}

/// Asserts `tls` is refused with an error naming `key` and saying `why`.
fn refused(tls: &str, key: &str, why: &str) {
    let e = config(tls).expect_err("refused");
    assert!(
        e.contains(key) && e.contains(why),
        "expected {key:?} and {why:?} in: {e}"
    );
}

const LISTENER: &str = "cert='s.pem'\nkey='s.key'\n";

fn entry(names: &str, extra: &str) -> String {
    format!("[[listener.tls.certificate]]\nserver_names={names}\ncert='e.pem'\nkey='e.key'\n{extra}\n")
}

#[test]
fn a_single_certificate_config_loads_as_before_with_no_entries() {
    let config = config(&format!("{LISTENER}client_ca='ca.pem'")).expect("valid");
    let tls = tls_of(&config);
    assert!(tls.certificates.is_empty());
    assert_eq!(
        (tls.cert.as_path(), tls.key.as_path()),
        (Path::new("s.pem"), Path::new("s.key"))
    );
    assert_eq!(tls.client_ca.as_deref(), Some(Path::new("ca.pem")));
    assert!(tls.certificate_for(Some("localhost")).is_none());
}

#[test]
fn a_server_name_listed_by_two_entries_is_refused_naming_the_second() {
    let two = format!(
        "{LISTENER}{}{}",
        entry("['a.example']", ""),
        entry("['b.example', 'A.example']", "")
    );
    refused(
        &two,
        "tls.certificate[1].server_names",
        "already listed by certificate[0]",
    );
    let distinct = format!(
        "{LISTENER}{}{}",
        entry("['a.example']", ""),
        entry("['*.a.example']", "")
    );
    assert_eq!(tls_of(&config(&distinct).expect("valid")).certificates.len(), 2);
}

#[test]
fn a_second_default_entry_is_refused() {
    let two = format!(
        "{}{}",
        entry("['a.example']", "default=true"),
        entry("['b.example']", "default=true")
    );
    refused(&two, "tls.certificate[1].default", "already the default");
}

#[test]
fn an_entry_without_server_names_is_refused_unless_it_is_the_default() {
    refused(
        &format!("{LISTENER}{}", entry("[]", "")),
        "tls.certificate[0].server_names",
        "at least one",
    );
    let bad = format!("{LISTENER}{}", entry("['a..example']", ""));
    refused(&bad, "tls.certificate[0].server_names", "expected a DNS name");
    let default = config(&entry("[]", "default=true")).expect("a default entry needs no name");
    assert_eq!(tls_of(&default).cert, Path::new("e.pem"));
}

#[test]
fn listener_cert_and_key_are_required_without_a_default_entry_and_refused_with_one() {
    refused(&entry("['a.example']", ""), "tls.cert", "required");
    let both = format!("{LISTENER}{}", entry("['a.example']", "default=true"));
    refused(&both, "tls.cert", "never served");
}

#[test]
fn an_entry_without_client_trust_inherits_the_listeners_whole_and_its_own_replaces_it() {
    let text = format!(
        "{LISTENER}client_ca='ca.pem'\ncrl='ca.crl'\n{}{}",
        entry("['a.example']", ""),
        entry("['b.example']", "client_ca='b-ca.pem'")
    );
    let config = config(&text).expect("valid");
    let tls = tls_of(&config);
    let a = tls.certificate_for(Some("a.example")).expect("entry a");
    assert_eq!(a.trust(), tls.trust(), "entry a inherits client_ca and crl");
    let b = tls.certificate_for(Some("b.example")).expect("entry b");
    assert_eq!(
        (b.client_ca.as_deref(), b.crl.as_deref()),
        (Some(Path::new("b-ca.pem")), None)
    );
    let crl_alone = format!(
        "{LISTENER}client_ca='ca.pem'\n{}",
        entry("['a.example']", "crl='a.crl'")
    );
    refused(
        &crl_alone,
        "tls.certificate[0].crl",
        "needs client_ca or trust_domains in this entry",
    );
}

#[test]
fn a_default_entry_is_the_fallback_with_its_own_trust() {
    let text = format!(
        "{}{}",
        entry("[]", "default=true\nclient_ca='d-ca.pem'"),
        entry("['a.example']", "client_ca='a-ca.pem'")
    );
    let config = config(&format!("close_on_expiry=false\n{text}")).expect("valid");
    let tls = tls_of(&config);
    assert_eq!(tls.client_ca.as_deref(), Some(Path::new("d-ca.pem")));
    assert!(tls.verifies_clients() && !tls.close_on_expiry);
    assert!(tls.certificate_for(Some("other.example")).is_none());
    let unused = format!("client_ca='ca.pem'\n{text}");
    refused(&unused, "tls.client_ca", "applies to no certificate");
}

#[test]
fn mixing_entries_with_and_without_client_certificates_is_refused() {
    let mixed = format!(
        "{}{}",
        entry("[]", "default=true\nclient_ca='d-ca.pem'"),
        entry("['a.example']", "")
    );
    refused(&mixed, "tls.certificate[1]", "every certificate of a listener");
    let mixed = format!("{LISTENER}{}", entry("['a.example']", "client_ca='a-ca.pem'"));
    refused(&mixed, "tls.certificate[0]", "every certificate of a listener");
}

#[test]
fn an_entrys_authorization_needs_client_certificates_and_known_upstreams() {
    let table = "[listener.tls.certificate.authorization]\nalice=['u']\n";
    let plain = format!("{LISTENER}{}{table}", entry("['a.example']", ""));
    refused(
        &plain,
        "tls.certificate[0].authorization",
        "needs client certificates",
    );
    let mtls = format!(
        "{LISTENER}client_ca='ca.pem'\n{}{table}",
        entry("['a.example']", "")
    );
    let config = config(&mtls).expect("valid");
    assert!(tls_of(&config).certificates[0].authorization.is_some());
    let unknown = mtls.replace("['u']", "['nope']");
    refused(
        &unknown,
        "tls.certificate[0].authorization",
        "no [[upstream]] has this name",
    );
}

#[test]
fn every_file_of_every_entry_is_listed_for_watching() {
    let text = format!(
        "{LISTENER}client_ca='ca.pem'\n{}",
        entry("['a.example']", "client_ca='a-ca.pem'\ncrl='a.crl'")
    );
    let config = config(&text).expect("valid");
    let files: Vec<&Path> = tls_of(&config).files().map(|p| p.as_path()).collect();
    let expected = ["s.pem", "s.key", "ca.pem", "e.pem", "e.key", "a-ca.pem", "a.crl"].map(Path::new);
    assert_eq!(files, expected);
}
