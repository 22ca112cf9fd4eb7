//! The `[authorization]` table, as the global section and as a listener's own
//! `[listener.authorization]`: entries (an identity or a pattern -> the upstreams it may reach,
//! each from anywhere or from listed networks), `deny` and `shadow`; the result is an
//! [`authz::Policy`](crate::authz::Policy).
//!
//! ```toml
//! [authorization]
//! alice = ["web"]
//! bob = ["db", { upstream = "web", from = ["10.1.0.0/16"] }]
//! "spiffe://prod.example/ns/payments/**" = ["payments"]
//! deny = ["spiffe://prod.example/ns/payments/sa/legacy"]   # or a [authorization.deny] table of name = reason
//! [authorization.shadow]                                      # same shape, only counted
//! ```
//!
//! This file checks the table's shape, the names and patterns (their syntax is `authz`'s) and
//! that every upstream named exists; it must not decide who is allowed (`authz` does, default
//! deny) nor which listener may have a table of its own (`listener.rs` does).

use std::collections::BTreeMap;

use toml::Value;

use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Validator};
use crate::addr::IpNet;
use crate::authz::{Grant, Name, Policy};

/// An `[authorization]` table as read from TOML: identities plus the reserved keys `deny` and
/// `shadow` (so no identity named `deny` or `shadow` can be granted).
pub(super) type RawAuthorization = BTreeMap<String, Value>;
/// A validated `[authorization]` table.
pub type AuthorizationConfig = Policy;

/// The JSON Schema of a [`RawAuthorization`] table (`#[schemars(with = ...)]` on the fields that
/// hold one): the shape `policy` reads, nothing about names or upstreams. Never a value.
pub(super) enum AuthorizationTable {}

impl schemars::JsonSchema for AuthorizationTable {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Authorization".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let upstreams = serde_json::json!({
            "description": "The upstreams this identity or pattern may reach: names, or \
                            { upstream = \"NAME\", from = [\"NETWORK\", ...] } to allow them only \
                            from those networks. Each upstream must exist.",
            "type": "array",
            "items": {
                "anyOf": [
                    { "type": "string", "description": "An upstream name." },
                    {
                        "type": "object",
                        "properties": {
                            "upstream": { "type": "string", "description": "An upstream name." },
                            "from": {
                                "description": "Networks (\"10.0.0.0/8\", \"::1\") the grant holds \
                                                from; leave it out for anywhere.",
                                "type": "array",
                                "items": { "type": "string" },
                                "minItems": 1
                            }
                        },
                        "required": ["upstream"],
                        "additionalProperties": false
                    }
                ]
            }
        });
        let deny = serde_json::json!({
            "description": "Identities or patterns refused whatever else matches: a list, or a \
                            table of them to a reason (logged).",
            "anyOf": [
                { "type": "array", "items": { "type": "string", "minLength": 1 } },
                { "type": "object", "additionalProperties": { "type": "string" } }
            ]
        });
        let table = |description: &str, shadow: schemars::Schema| {
            schemars::json_schema!({
                "description": description,
                "type": "object",
                "properties": { "deny": deny, "shadow": shadow },
                "propertyNames": { "minLength": 1 },
                "additionalProperties": upstreams
            })
        };
        let shadow = table(
            "A candidate table of the same shape (its own deny, no shadow): only counted, never \
             enforced.",
            schemars::Schema::from(false),
        );
        table(
            "Identity or pattern -> the upstreams it may reach (default deny), plus the reserved \
             keys deny and shadow.",
            shadow,
        )
    }
}

impl Validator<'_> {
    /// `[authorization]` or a listener's own: names and patterns well formed, every upstream
    /// named existing, networks parsed.
    pub(super) fn authorization(
        &self,
        key: &str,
        raw: RawAuthorization,
        upstreams: &[UpstreamConfig],
    ) -> Result<AuthorizationConfig, ConfigError> {
        self.policy(key, raw, upstreams, true)
    }

    fn policy(
        &self,
        key: &str,
        raw: RawAuthorization,
        upstreams: &[UpstreamConfig],
        may_shadow: bool,
    ) -> Result<Policy, ConfigError> {
        let mut policy = Policy::default();
        for (identity, value) in raw {
            let at = format!("{key}.{identity:?}");
            match (identity.as_str(), value) {
                ("deny", value) => policy.deny = self.deny(&format!("{key}.deny"), value)?,
                ("shadow", Value::Table(table)) if may_shadow => {
                    let shadow = self.policy(&format!("{key}.shadow"), table.into_iter().collect(), upstreams, false)?;
                    policy.shadow = Some(Box::new(shadow));
                }
                ("shadow", _) if !may_shadow => {
                    return Err(self.invalid(at, "{..}", "a shadow table has no shadow of its own"))
                }
                ("shadow", value) => return Err(self.invalid(at, value, "expected a table like [authorization]")),
                (_, Value::Array(items)) => {
                    let name = self.identity_name(&at, &identity)?;
                    let grants = items
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| self.grant(&format!("{at}[{i}]"), item, upstreams))
                        .collect::<Result<_, _>>()?;
                    policy.entries.push((name, grants));
                }
                (_, value) => {
                    return Err(self.invalid(
                        at,
                        value,
                        "expected a list of upstreams, e.g. [\"web\", { upstream = \"db\", from = [\"10.0.0.0/8\"] }]",
                    ))
                }
            }
        }
        Ok(policy)
    }

    /// An identity or pattern as an entry or deny entry names it.
    fn identity_name(&self, key: &str, text: &str) -> Result<Name, ConfigError> {
        if text.is_empty() {
            return Err(self.invalid(key, "\"\"", "an identity is not empty"));
        }
        Name::parse(text).map_err(|e| self.invalid(key, text, e.to_string()))
    }

    /// One item of an entry's list: an upstream name, or `{ upstream, from }`.
    fn grant(&self, key: &str, item: Value, upstreams: &[UpstreamConfig]) -> Result<Grant, ConfigError> {
        let known = |name: &str| upstreams.iter().any(|u| u.name == name);
        let shape = "expected an upstream name or { upstream = \"NAME\", from = [\"NETWORK\", ...] }";
        let (upstream, from) = match item {
            Value::String(upstream) => (upstream, None),
            Value::Table(mut table) => {
                let upstream = match table.remove("upstream") {
                    Some(Value::String(upstream)) => upstream,
                    _ => return Err(self.invalid(key, "{..}", shape)),
                };
                let from = table.remove("from");
                if let Some(extra) = table.keys().next() {
                    return Err(self.invalid(key, extra, format!("unknown key; {shape}")));
                }
                (upstream, from)
            }
            other => return Err(self.invalid(key, other, shape)),
        };
        if !known(&upstream) {
            return Err(self.invalid(key, &upstream, "no [[upstream]] has this name"));
        }
        let from = match from {
            None => Vec::new(),
            Some(Value::Array(networks)) if networks.is_empty() => {
                return Err(self.invalid(
                    format!("{key}.from"),
                    "[]",
                    "admits no source; leave `from` out to grant from anywhere",
                ))
            }
            Some(Value::Array(networks)) => self.networks(&format!("{key}.from"), networks)?,
            Some(other) => {
                return Err(self.invalid(format!("{key}.from"), other, "expected a list of networks"))
            }
        };
        Ok(Grant { upstream, from })
    }

    /// `deny`: a list of identities or patterns, or a table of them to the operator's reason.
    fn deny(&self, key: &str, value: Value) -> Result<Vec<(Name, String)>, ConfigError> {
        let items: Vec<(String, String)> = match value {
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(name) => Ok((name, String::new())),
                    other => Err(self.invalid(key, other, "expected an identity or pattern")),
                })
                .collect::<Result<_, _>>()?,
            Value::Table(table) => table
                .into_iter()
                .map(|(name, why)| match why {
                    Value::String(why) => Ok((name, why)),
                    other => {
                        Err(self.invalid(format!("{key}.{name:?}"), other, "expected the reason, a string"))
                    }
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(self.invalid(
                    key,
                    other,
                    "expected a list of identities or patterns, or a table of them to a reason",
                ))
            }
        };
        items
            .into_iter()
            .map(|(name, why)| Ok((self.identity_name(key, &name)?, why)))
            .collect()
    }

    /// `from`: a list of networks (`10.0.0.0/8`, `::1`).
    fn networks(&self, key: &str, items: Vec<Value>) -> Result<Vec<IpNet>, ConfigError> {
        items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => IpNet::parse(&text).map_err(|why| self.invalid(key, &text, why)),
                other => Err(self.invalid(key, other, "expected a network, e.g. \"10.0.0.0/8\"")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
