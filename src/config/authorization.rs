//! The `[authorization]` table, identity -> the upstreams it may reach, as the global section and
//! as a listener's own `[listener.authorization]`: both must name only upstreams that exist.
//!
//! This file checks the table's shape and names; it must not decide who is allowed (`authz`
//! does, default deny) nor which listener may have a table of its own (`listener.rs` does).

use std::collections::BTreeMap;

use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Validator};

impl Validator<'_> {
    /// `[authorization]` or a listener's own: every upstream named must exist.
    pub(super) fn authorization(
        &self,
        key: &str,
        raw: BTreeMap<String, Vec<String>>,
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut authorization = Vec::with_capacity(raw.len());
        for (identity, allowed) in raw {
            if let Some(missing) = allowed.iter().find(|a| !upstreams.iter().any(|u| u.name == **a)) {
                return Err(self.invalid(
                    format!("{key}.{identity:?}"),
                    missing,
                    "no [[upstream]] has this name",
                ));
            }
            authorization.push((identity, allowed));
        }
        Ok(authorization)
    }
}
