//! The `[[upstream]]` rules that live in `upstream.rs`: `[upstream.tls] server_identity`.

use crate::config::Config;

/// One upstream `u` behind listener `a`, with `[upstream.tls]` holding `ca` and `tls_keys`.
fn with_tls(tls_keys: &str) -> Result<Config, String> {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[upstream.tls]\nca='ca.pem'\n{tls_keys}\n"
    );
    Config::from_toml(&text, "test.toml").map_err(|e| e.to_string())
}

fn server_identity(config: &Config) -> Option<Vec<String>> {
    let tls = config.upstreams[0].tls.as_ref().expect("[upstream.tls]");
    let names = tls.server_identity.as_ref()?;
    Some(names.iter().map(ToString::to_string).collect())
}

#[test]
fn server_identity_is_absent_unless_written() {
    let config = with_tls("server_name = 'db.internal'").expect("valid");
    assert_eq!(server_identity(&config), None);
}

#[test]
fn server_identity_takes_one_name_or_a_list_of_names_and_patterns() {
    let one = with_tls("server_identity = 'spiffe://prod.example/ns/db/sa/postgres'").expect("valid");
    assert_eq!(
        server_identity(&one).expect("set"),
        ["spiffe://prod.example/ns/db/sa/postgres"]
    );
    let list = with_tls(
        "server_identity = ['spiffe://prod.example/ns/*/sa/db', 'spiffe://prod.example/ns/db/**', \
         '*.db.internal', 'pg.internal']\nserver_name = 'pg.internal'",
    )
    .expect("valid");
    assert_eq!(
        server_identity(&list).expect("set"),
        [
            "spiffe://prod.example/ns/*/sa/db",
            "spiffe://prod.example/ns/db/**",
            "*.db.internal",
            "pg.internal"
        ]
    );
}

#[test]
fn a_bad_server_identity_pattern_is_refused_naming_the_key_and_the_value() {
    for bad in [
        "spiffe://*/x",
        "spiffe://prod.example/ns/db*",
        "spiffe://prod.example/**/db",
        "db.*.internal",
    ] {
        let e = with_tls(&format!("server_identity = ['spiffe://ok.example/a', '{bad}']")).expect_err(bad);
        assert!(
            e.contains("upstream[0] (\"u\").tls.server_identity") && e.contains(bad),
            "{bad}: {e}"
        );
    }
}

#[test]
fn an_empty_server_identity_list_or_name_is_refused_naming_the_key() {
    for empty in ["[]", "''", "['spiffe://ok.example/a', '']"] {
        let e = with_tls(&format!("server_identity = {empty}")).expect_err(empty);
        assert!(
            e.contains("upstream[0] (\"u\").tls.server_identity"),
            "{empty}: {e}"
        );
    }
}

#[test]
fn a_server_identity_that_is_a_uri_but_not_a_spiffe_id_is_refused() {
    let e = with_tls("server_identity = 'https://db.internal/'").expect_err("not a SPIFFE ID");
    assert!(
        e.contains("tls.server_identity") && e.contains("SPIFFE ID"),
        "{e}"
    );
}

#[test]
fn a_server_identity_of_the_wrong_type_is_refused_saying_what_it_takes() {
    let e = with_tls("server_identity = 7").expect_err("a number");
    assert!(
        e.contains("server_identity") && e.contains("a SPIFFE ID or DNS name"),
        "{e}"
    );
}
