//! Authorization: which client identities may reach which upstreams. This module owns the
//! decision and nothing around it: it is built from the configuration's map of identity to
//! upstream names, and answers [`Decision::Allow`] only for a pair listed there, [`Decision::Deny`]
//! for everything else (default deny). It must not do I/O, log, or interpret names: comparison is
//! exact, byte for byte (no case folding, prefixes, suffixes, substrings or wildcards), and an
//! unknown identity is denied exactly like a known one without access, so callers cannot tell
//! the two apart. Checking that the named upstreams exist is config validation's job, helped by
//! [`Authorization::upstreams_named`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::identity::ClientIdentity;

/// The outcome of an authorization check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The identity is listed for the upstream.
    Allow,
    /// Anything else: unknown identity, known identity without this upstream, or a name that
    /// can never match (one containing NUL).
    Deny,
}

/// The identity -> upstreams grants, immutable once built. Cheap to check: a check hashes the
/// two names and allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    /// Exact identity -> exact upstream names it may reach; the decision table.
    grants: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// The same grants as sorted, unique pairs, so validation reports them in a stable order.
    pairs: Vec<(Arc<str>, Arc<str>)>,
}

impl Authorization {
    /// Builds the grants from `(identity, upstream names)` entries, as read from the TOML map.
    ///
    /// Entries for the same identity are merged and duplicate upstreams collapse. An identity
    /// with an empty list is kept but can reach nothing. No name is rejected here; an identity
    /// containing NUL simply never matches.
    pub fn new(map: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        let mut grants: HashMap<Arc<str>, HashSet<Arc<str>>> = HashMap::new();
        for (identity, upstreams) in map {
            grants
                .entry(Arc::from(identity))
                .or_default()
                .extend(upstreams.into_iter().map(Arc::from));
        }
        let mut pairs: Vec<(Arc<str>, Arc<str>)> = grants
            .iter()
            .flat_map(|(identity, upstreams)| {
                upstreams
                    .iter()
                    .map(move |upstream| (Arc::clone(identity), Arc::clone(upstream)))
            })
            .collect();
        pairs.sort_unstable();
        Self { grants, pairs }
    }

    /// Whether `identity` may reach `upstream`. Exact comparison only; default deny.
    pub fn check(&self, identity: &ClientIdentity, upstream: &str) -> Decision {
        let name = identity.as_str();
        if name.contains('\0') {
            return Decision::Deny;
        }
        match self.grants.get(name) {
            Some(upstreams) if upstreams.contains(upstream) => Decision::Allow,
            _ => Decision::Deny,
        }
    }

    /// Every granted `(identity, upstream)` pair, sorted, each once; config validation uses it
    /// to flag upstream names that do not exist.
    pub fn upstreams_named(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs
            .iter()
            .map(|(identity, upstream)| (&**identity, &**upstream))
    }
}

#[cfg(test)]
mod tests;
