//! `key_exchange` in `[listener.tls]` and `[upstream.tls]`: the default, the spellings, and the
//! refusals (empty, unknown, twice), each naming the key and the value.

use super::{KeyExchange, KxGroup, DEFAULT_KEY_EXCHANGE};
use crate::config::Config;

/// A TLS listener `a` with `listener_keys` in its `[listener.tls]`, in front of upstream `u` over
/// TLS with `upstream_keys` in its `[upstream.tls]`.
fn config(listener_keys: &str, upstream_keys: &str) -> Result<Config, String> {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n\
         [listener.tls]\ncert='server.pem'\nkey='server.key'\n{listener_keys}\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[upstream.tls]\nca='ca.pem'\n{upstream_keys}\n"
    );
    Config::from_toml(&text, "test.toml").map_err(|e| e.to_string())
}

/// The listener's and the upstream's `key_exchange`.
fn both(config: &Config) -> (KeyExchange, KeyExchange) {
    let listener = config.listeners[0].tls.as_ref().expect("[listener.tls]");
    let upstream = config.upstreams[0].tls.as_ref().expect("[upstream.tls]");
    (listener.key_exchange.clone(), upstream.key_exchange.clone())
}

const LISTENER_KEY: &str = "listener[0] (\"a\").tls.key_exchange";
const UPSTREAM_KEY: &str = "upstream[0] (\"u\").tls.key_exchange";

#[test]
fn without_key_exchange_both_sides_offer_the_hybrid_then_x25519_then_p256_then_p384() {
    let config = config("", "").expect("valid");
    assert_eq!(both(&config), (KeyExchange::Default, KeyExchange::Default));
    assert_eq!(
        KeyExchange::Default.groups(),
        [
            KxGroup::X25519MlKem768,
            KxGroup::X25519,
            KxGroup::Secp256r1,
            KxGroup::Secp384r1
        ]
    );
    assert_eq!(DEFAULT_KEY_EXCHANGE[0].name(), "X25519MLKEM768");
}

#[test]
fn names_are_read_in_any_case_and_the_nist_aliases_name_the_secp_groups_in_the_order_given() {
    let config = config(
        "key_exchange = ['x25519', 'P-384', 'X25519MLKEM768']",
        "key_exchange = ['p-256', 'SECP384R1', 'x25519mlkem768', 'X25519']",
    )
    .expect("valid");
    let (listener, upstream) = both(&config);
    assert_eq!(
        listener.groups(),
        [KxGroup::X25519, KxGroup::Secp384r1, KxGroup::X25519MlKem768]
    );
    assert_eq!(
        upstream.groups(),
        [
            KxGroup::Secp256r1,
            KxGroup::Secp384r1,
            KxGroup::X25519MlKem768,
            KxGroup::X25519
        ]
    );
}

#[test]
fn a_classical_only_list_is_what_is_configured_with_no_hybrid_added() {
    let config = config(
        "key_exchange = ['X25519', 'secp256r1']",
        "key_exchange = ['X25519']",
    )
    .expect("valid");
    let (listener, upstream) = both(&config);
    assert_eq!(
        listener,
        KeyExchange::Configured(vec![KxGroup::X25519, KxGroup::Secp256r1])
    );
    assert_eq!(upstream, KeyExchange::Configured(vec![KxGroup::X25519]));
}

#[test]
fn an_unknown_group_is_refused_naming_the_key_the_value_and_the_known_names() {
    for (listener, upstream, key) in [
        ("key_exchange = ['X25519', 'X448']", "", LISTENER_KEY),
        ("", "key_exchange = ['kyber768']", UPSTREAM_KEY),
        ("key_exchange = ['MLKEM768']", "", LISTENER_KEY),
    ] {
        let e = config(listener, upstream).expect_err("unknown group");
        assert!(e.contains(key), "{e}");
        assert!(e.contains("unknown key exchange group"), "{e}");
        assert!(e.contains("X25519MLKEM768, X25519, secp256r1 (P-256)"), "{e}");
    }
    let e = config("key_exchange = ['X448']", "").expect_err("unknown group");
    assert!(e.contains("\"X448\""), "{e}");
}

#[test]
fn an_empty_list_is_refused_on_either_side() {
    let e = config("key_exchange = []", "").expect_err("empty");
    assert!(
        e.contains(LISTENER_KEY) && e.contains("offers no key exchange group"),
        "{e}"
    );
    let e = config("", "key_exchange = []").expect_err("empty");
    assert!(
        e.contains(UPSTREAM_KEY) && e.contains("offers no key exchange group"),
        "{e}"
    );
}

#[test]
fn a_group_named_twice_is_refused_even_by_another_spelling() {
    for twice in [
        "['X25519', 'X25519']",
        "['secp256r1', 'P-256']",
        "['X25519MLKEM768', 'x25519mlkem768']",
    ] {
        let e = config(&format!("key_exchange = {twice}"), "").expect_err(twice);
        assert!(e.contains(LISTENER_KEY) && e.contains("twice"), "{twice}: {e}");
        let e = config("", &format!("key_exchange = {twice}")).expect_err(twice);
        assert!(e.contains(UPSTREAM_KEY) && e.contains("twice"), "{twice}: {e}");
    }
}

#[test]
fn a_certificate_entry_has_no_key_exchange_of_its_own() {
    let entry = "[[listener.tls.certificate]]\ncert='b.pem'\nkey='b.key'\nserver_names=['b.example']\n\
                 key_exchange=['X25519']\n";
    let e = config(&format!("key_exchange = ['X25519']\n{entry}"), "").expect_err("per-entry key");
    assert!(e.contains("key_exchange"), "{e}");
}

#[test]
fn every_group_parses_from_its_own_name() {
    for group in KxGroup::ALL {
        assert_eq!(KxGroup::parse(group.name()), Some(group));
        assert_eq!(KxGroup::parse(&group.to_string().to_lowercase()), Some(group));
    }
    assert_eq!(KxGroup::parse("P-521"), None);
    assert_eq!(KxGroup::parse(""), None);
}
