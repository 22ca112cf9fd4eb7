//! The config's JSON Schema ([`crate::config::config_schema`]): made by schemars from the raw
//! tables the TOML is read into (every `Raw*` type derives `JsonSchema`; their field docs become the
//! descriptions), so a key added to the code is in the schema the next time it is made.
//! `docs/fulcrum.schema.json` is its checked-in copy, for editors (taplo, Even Better TOML);
//! `tests/schema.rs` keeps the two equal and checks every example config against it. `config.rs`
//! hands the root table in, so that this file names no section and imports nothing of `config`.
//!
//! The schema says the shape of a config: keys, types, enumerated values, numeric bounds,
//! defaults. It must not try to be the validator: what depends on other keys, on files or on
//! parsing (durations, addresses, which upstreams exist) is `fulcrum check`'s, and the schema
//! accepts every config fulcrum accepts.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;

/// The schema's `$id`: a name, not a location (the file has no canonical URL).
const ID: &str = "urn:fulcrum:configuration";
const TITLE: &str = "fulcrum configuration";
const DESCRIPTION: &str = "The TOML configuration file of fulcrum, a layer-4 load balancer. \
                           Every key, its default and its bounds: docs/configuration.md. \
                           `fulcrum check --config FILE` runs the full validation.";

/// The JSON Schema (draft 2020-12) of a config file whose root table is read into `Root`.
pub(super) fn of<Root: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<Root>().to_value();
    if let Value::Object(root) = &mut schema {
        root.insert("$id".into(), ID.into());
        root.insert("title".into(), TITLE.into());
        root.insert("description".into(), DESCRIPTION.into());
    }
    tidy(&mut schema);
    schema
}

/// Names definitions as the docs name the tables (`Listener`, not the code's `RawListener`),
/// unwraps descriptions, which come from doc comments wrapped at 100 columns, into one line each,
/// and takes out the `null` schemars allows for an `Option` (TOML has no null: an optional key is
/// left out).
fn tidy(value: &mut Value) {
    match value {
        Value::Object(map) => {
            without_null(map);
            for (key, value) in map.iter_mut() {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => *target = target.replacen("/$defs/Raw", "/$defs/", 1),
                    ("description", Value::String(text)) => *text = text.replace('\n', " "),
                    (_, value) => tidy(value),
                }
            }
            if let Some(Value::Object(defs)) = map.get_mut("$defs") {
                *defs = std::mem::take(defs)
                    .into_iter()
                    .map(|(name, schema)| match name.strip_prefix("Raw") {
                        Some(short) => (short.to_string(), schema),
                        None => (name, schema),
                    })
                    .collect();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(tidy),
        _ => {}
    }
}

/// `"type": ["string", "null"]` as `"type": "string"`; `"anyOf": [S, {"type": "null"}]` as S.
fn without_null(map: &mut serde_json::Map<String, Value>) {
    if let Some(Value::Array(types)) = map.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            map.insert("type".into(), only);
        }
    }
    let Some(Value::Array(any_of)) = map.get_mut("anyOf") else {
        return;
    };
    any_of.retain(|s| s.get("type").is_none_or(|t| t != "null"));
    if let [Value::Object(only)] = any_of.as_slice() {
        let only = only.clone();
        if only.keys().all(|key| !map.contains_key(key)) {
            map.remove("anyOf");
            map.extend(only);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::config_schema;

    #[test]
    fn the_schema_names_its_dialect_and_refuses_unknown_top_level_keys() {
        let schema = config_schema();
        assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
        assert_eq!(schema["title"], "fulcrum configuration");
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn definitions_are_named_as_the_docs_name_the_tables() {
        let schema = config_schema();
        let defs = schema["$defs"].as_object().expect("$defs");
        assert!(
            defs.contains_key("Listener") && defs.contains_key("Authorization"),
            "{defs:?}"
        );
        assert!(defs.keys().all(|name| !name.starts_with("Raw")), "{defs:?}");
        assert_eq!(
            schema["properties"]["listener"]["items"]["$ref"],
            "#/$defs/Listener"
        );
    }

    /// The default a key's schema shows (`$defs/TABLE/properties/KEY/default`, or the root's
    /// property KEY when `table` is empty), a duration as humantime writes it ("60s" as "1m").
    fn default_of(schema: &serde_json::Value, table: &str, key: &str) -> serde_json::Value {
        let properties = match table {
            "" => &schema["properties"],
            table => &schema["$defs"][table]["properties"],
        };
        let default = properties[key]["default"].clone();
        match default.as_str().map(humantime::parse_duration) {
            Some(Ok(d)) => humantime::format_duration(d).to_string().into(),
            _ => default,
        }
    }

    #[test]
    fn the_defaults_the_schema_shows_are_the_ones_the_code_applies() {
        use crate::config::*;
        use serde_json::json;
        let duration = |d| json!(humantime::format_duration(d).to_string());
        let schema = config_schema();
        let keepalive = Keepalive::default();
        let expected = [
            ("KeepaliveSettings", "idle", duration(keepalive.idle)),
            ("KeepaliveSettings", "interval", duration(keepalive.interval)),
            ("KeepaliveSettings", "count", json!(keepalive.count)),
            ("", "drain_timeout", duration(DEFAULT_DRAIN_TIMEOUT)),
            ("Reload", "debounce", duration(DEFAULT_WATCH_DEBOUNCE)),
            (
                "Listener",
                "handshake_timeout",
                duration(DEFAULT_HANDSHAKE_TIMEOUT),
            ),
            ("Listener", "idle_timeout", duration(DEFAULT_IDLE_TIMEOUT)),
            (
                "Listener",
                "max_handshakes_per_source",
                json!(DEFAULT_MAX_HANDSHAKES_PER_SOURCE),
            ),
            ("Tls", "session_cache", json!(DEFAULT_SESSION_CACHE)),
            ("Tls", "session_timeout", duration(DEFAULT_SESSION_TIMEOUT)),
            ("Tls", "crl_refresh", duration(DEFAULT_CRL_REFRESH)),
            ("Tls", "crl_max_size", json!(DEFAULT_CRL_MAX_SIZE)),
            ("Tls", "crl_timeout", duration(DEFAULT_CRL_TIMEOUT)),
            (
                "Tls",
                "key_exchange",
                json!(DEFAULT_KEY_EXCHANGE.map(KxGroup::name)),
            ),
            (
                "UpstreamTls",
                "key_exchange",
                json!(DEFAULT_KEY_EXCHANGE.map(KxGroup::name)),
            ),
            ("RateLimit", "max_clients", json!(DEFAULT_MAX_CLIENTS)),
            ("RateLimit", "ipv4_prefix", json!(DEFAULT_IPV4_PREFIX)),
            ("RateLimit", "ipv6_prefix", json!(DEFAULT_IPV6_PREFIX)),
            ("SharedRateLimit", "key_prefix", json!(DEFAULT_SHARED_KEY_PREFIX)),
            ("SharedRateLimit", "timeout", duration(DEFAULT_SHARED_TIMEOUT)),
            (
                "Spiffe",
                "startup_timeout",
                duration(DEFAULT_SPIFFE_STARTUP_TIMEOUT),
            ),
            ("Upstream", "connect_timeout", duration(DEFAULT_CONNECT_TIMEOUT)),
            ("Upstream", "queue_timeout", duration(DEFAULT_QUEUE_TIMEOUT)),
            (
                "Upstream",
                "discover_interval",
                duration(DEFAULT_DISCOVER_INTERVAL),
            ),
            (
                "Upstream",
                "discover_max_backends",
                json!(DEFAULT_DISCOVER_MAX_BACKENDS),
            ),
            ("Upstream", "connect_attempts", json!(DEFAULT_CONNECT_ATTEMPTS)),
            ("HealthCheck", "interval", duration(DEFAULT_HEALTH_INTERVAL)),
            ("HealthCheck", "timeout", duration(DEFAULT_HEALTH_TIMEOUT)),
            ("HealthCheck", "rise", json!(DEFAULT_HEALTH_RISE)),
            ("HealthCheck", "fall", json!(DEFAULT_HEALTH_FALL)),
        ];
        for (table, key, default) in expected {
            assert_eq!(default_of(&schema, table, key), default, "{table} {key}");
        }
    }
}
