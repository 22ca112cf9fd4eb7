//! Authorization: which client identities may reach which upstreams, from where. This module
//! owns the decision and nothing around it: it is built from a [`Policy`] (what `[authorization]`
//! or a listener's own table says, already parsed) and answers [`Decision::Allow`] only when an
//! entry grants the upstream, else a [`Denial`] saying why (default deny). It must not do I/O,
//! log, or read configuration files.
//!
//! The order of a decision, the one place it is written down:
//! 1. an identity containing NUL is refused;
//! 2. a **deny** entry (exact or pattern) that matches refuses it, whatever else matches;
//! 3. the **entry** that decides is the exact entry for the identity if there is one, else the
//!    most specific matching pattern ([`Pattern::specificity`] defines the order); only that entry's grants
//!    apply, grants of other matching entries are not added;
//! 4. that entry must grant the upstream, and if every grant of that upstream lists `from`
//!    networks, the source must be in one of them.
//!
//! Names are compared byte for byte (no case folding); an unknown identity is refused exactly
//! like a known one without access. A table may carry a **shadow** table, judged the same way
//! and only reported ([`Authorization::shadow`]).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::addr::IpNet;
use crate::identity::ClientIdentity;

mod pattern;

pub use pattern::{Name, Pattern, PatternError};

/// One upstream an entry grants, from anywhere (`from` empty) or from the listed networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub upstream: String,
    pub from: Vec<IpNet>,
}

impl Grant {
    /// `upstream` from any source.
    pub fn to(upstream: impl Into<String>) -> Grant {
        Grant {
            upstream: upstream.into(),
            from: Vec::new(),
        }
    }
}

/// A table as configured: entries, deny entries (each with the operator's reason, maybe empty)
/// and an optional shadow table of the same shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub entries: Vec<(Name, Vec<Grant>)>,
    pub deny: Vec<(Name, String)>,
    pub shadow: Option<Box<Policy>>,
}

impl Policy {
    /// Exact identities to upstreams from anywhere, the simplest table (every name is exact,
    /// even one containing `*`).
    pub fn exact<I, S>(grants: impl IntoIterator<Item = (S, I)>) -> Policy
    where
        S: AsRef<str>,
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let entries = grants
            .into_iter()
            .map(|(name, upstreams)| {
                let name = Name::Exact(Arc::from(name.as_ref()));
                (name, upstreams.into_iter().map(Grant::to).collect())
            })
            .collect();
        Policy {
            entries,
            ..Policy::default()
        }
    }

    /// This table with `global`'s deny entries added to its own (and to its shadow's): a deny
    /// in `[authorization]` shuts an identity out of every listener, those with their own table
    /// included.
    pub fn inheriting_deny(&self, global: &Policy) -> Policy {
        let mut policy = self.clone();
        policy.deny.extend(global.deny.iter().cloned());
        if let Some(shadow) = &mut policy.shadow {
            shadow.deny.extend(global.deny.iter().cloned());
        }
        policy
    }
}

/// The outcome of an authorization check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a check refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No entry matches, or the deciding entry does not grant the upstream.
    Unlisted,
    /// A deny entry matches.
    Denied,
    /// The deciding entry grants the upstream only from networks the source is not in.
    Source,
}

/// Which entry decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched<'a> {
    /// A deny entry, with the operator's reason (maybe empty).
    Deny(&'a str, &'a str),
    /// The exact entry for the identity.
    Exact(&'a str),
    /// The most specific matching pattern.
    Pattern(&'a str),
    /// No entry matches.
    Nothing,
}

impl fmt::Display for Matched<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matched::Deny(name, "") => write!(f, "deny entry {name:?}"),
            Matched::Deny(name, why) => write!(f, "deny entry {name:?} ({why})"),
            Matched::Exact(name) => write!(f, "exact entry {name:?}"),
            Matched::Pattern(name) => write!(f, "pattern {name:?}"),
            Matched::Nothing => f.write_str("no entry"),
        }
    }
}

/// A decision and the entry that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub decision: Decision,
    pub matched: Matched<'a>,
}

/// Upstream -> the networks it is granted from (`None`: anywhere).
type Grants = HashMap<Arc<str>, Option<Vec<IpNet>>>;

/// The decision table of one [`Policy`], immutable once built. A check hashes the identity once,
/// scans the patterns (most specific first) only without an exact entry, and allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    exact: HashMap<Arc<str>, Grants>,
    /// Most specific first.
    patterns: Vec<(Pattern, Grants)>,
    deny_exact: HashMap<Arc<str>, Arc<str>>,
    deny_patterns: Vec<(Pattern, Arc<str>)>,
    shadow: Option<Box<Authorization>>,
}

impl Authorization {
    /// Builds the table. Entries naming the same identity are merged; an upstream granted both
    /// from anywhere and from networks is granted from anywhere.
    pub fn new(policy: &Policy) -> Self {
        let mut authorization = Authorization::default();
        for (name, grants) in &policy.entries {
            let table = match name {
                Name::Exact(name) => authorization.exact.entry(Arc::clone(name)).or_default(),
                Name::Pattern(pattern) => {
                    let at = authorization.patterns.iter().position(|(p, _)| p == pattern);
                    let at = at.unwrap_or_else(|| {
                        authorization.patterns.push((pattern.clone(), Grants::new()));
                        authorization.patterns.len() - 1
                    });
                    &mut authorization.patterns[at].1
                }
            };
            for grant in grants {
                let from = table
                    .entry(Arc::from(grant.upstream.as_str()))
                    .or_insert(Some(Vec::new()));
                match (from, grant.from.is_empty()) {
                    (from, true) => *from = None,
                    (Some(networks), false) => networks.extend(grant.from.iter().copied()),
                    (None, false) => {}
                }
            }
        }
        authorization
            .patterns
            .sort_by(|(a, _), (b, _)| b.specificity().cmp(&a.specificity()));
        for (name, why) in &policy.deny {
            let why = Arc::from(why.as_str());
            match name {
                Name::Exact(name) => {
                    authorization.deny_exact.insert(Arc::clone(name), why);
                }
                Name::Pattern(pattern) => authorization.deny_patterns.push((pattern.clone(), why)),
            }
        }
        authorization.shadow = policy.shadow.as_deref().map(|s| Box::new(Authorization::new(s)));
        authorization
    }

    /// Whether `identity`, connecting from `source`, may reach `upstream`.
    pub fn check(&self, identity: &ClientIdentity, upstream: &str, source: IpAddr) -> Decision {
        self.judge(identity, upstream, source).decision
    }

    /// [`check`](Self::check), with the entry that decided.
    pub fn judge(&self, identity: &ClientIdentity, upstream: &str, source: IpAddr) -> Verdict<'_> {
        let name = identity.as_str();
        let deny = |denial, matched| Verdict {
            decision: Decision::Deny(denial),
            matched,
        };
        if name.contains('\0') {
            return deny(Denial::Unlisted, Matched::Nothing);
        }
        if let Some((denied, why)) = self.deny_exact.get_key_value(name) {
            return deny(Denial::Denied, Matched::Deny(denied, why));
        }
        if let Some((pattern, why)) = self.deny_patterns.iter().find(|(p, _)| p.matches(name)) {
            return deny(Denial::Denied, Matched::Deny(pattern.as_str(), why));
        }
        let (grants, matched) = match self.exact.get_key_value(name) {
            Some((exact, grants)) => (grants, Matched::Exact(exact)),
            None => match self.patterns.iter().find(|(p, _)| p.matches(name)) {
                Some((pattern, grants)) => (grants, Matched::Pattern(pattern.as_str())),
                None => return deny(Denial::Unlisted, Matched::Nothing),
            },
        };
        let decision = match grants.get(upstream) {
            None => Decision::Deny(Denial::Unlisted),
            Some(None) => Decision::Allow,
            Some(Some(networks)) if networks.iter().any(|n| n.contains(source)) => Decision::Allow,
            Some(Some(_)) => Decision::Deny(Denial::Source),
        };
        Verdict { decision, matched }
    }

    /// The shadow table, judged beside this one and only reported.
    pub fn shadow(&self) -> Option<&Authorization> {
        self.shadow.as_deref()
    }

    /// What the table holds, for `fulcrum check`.
    pub fn summary(&self) -> Summary {
        Summary {
            exact: self.exact.len(),
            patterns: self.patterns.len(),
            deny: self.deny_exact.len() + self.deny_patterns.len(),
            shadow: self.shadow.as_ref().map(|s| Box::new(s.summary())),
        }
    }

    /// Pairs of patterns some identity could match both of (the more specific first): only the
    /// more specific one's grants apply to such an identity.
    pub fn overlaps(&self) -> Vec<(&str, &str)> {
        let mut pairs = Vec::new();
        for (i, (a, _)) in self.patterns.iter().enumerate() {
            for (b, _) in &self.patterns[i + 1..] {
                if a.overlaps(b) {
                    pairs.push((a.as_str(), b.as_str()));
                }
            }
        }
        pairs
    }
}

/// Counts of a table's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub exact: usize,
    pub patterns: usize,
    pub deny: usize,
    pub shadow: Option<Box<Summary>>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exact, {} patterns, {} deny",
            self.exact, self.patterns, self.deny
        )?;
        match &self.shadow {
            Some(shadow) => write!(f, "; shadow: {shadow}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
