//! The config's JSON Schema as the tests hold configs against it: [`errors`] lists what the schema
//! refuses in a TOML text, [`assert_valid`] fails the test on any. The starters of `server.rs` and
//! `process.rs` call [`assert_valid`] on every config fulcrum accepts, so a key the code reads but
//! the schema lacks (or bounds it draws too tight) fails the test that wrote the config.
//!
//! The schema is [`fulcrum::config::config_schema`], made and compiled once per test binary; that
//! `docs/fulcrum.schema.json` is the same is `tests/schema.rs`'s to check.

use std::sync::OnceLock;

/// The schema, compiled on first use.
fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::validator_for(&fulcrum::config::config_schema()).expect("the config schema compiles")
    })
}

/// What the schema refuses in `toml` (a TOML document), one line each: where, and why. Panics if
/// `toml` is not TOML at all.
pub fn errors(toml: &str) -> Vec<String> {
    let document: toml::Table = toml::from_str(toml).unwrap_or_else(|e| panic!("not TOML: {e}\n{toml}"));
    let instance = serde_json::to_value(document).expect("TOML as JSON");
    validator()
        .iter_errors(&instance)
        .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}

/// Fails unless the schema accepts `toml`. Call it only for a config fulcrum accepts: one it
/// refuses may well be refused by the schema too.
pub fn assert_valid(toml: &str) {
    let errors = errors(toml);
    assert!(
        errors.is_empty(),
        "fulcrum accepts this config but docs/fulcrum.schema.json's schema refuses it \
         (fix the schemars attributes of the Raw* config types, then \
         `FULCRUM_BLESS=1 cargo test --test schema`):\n{}\n--- config ---\n{toml}",
        errors.join("\n")
    );
}
