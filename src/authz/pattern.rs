//! Identity names as policy writes them: an exact identity, or a pattern ([`Name`]). Pure.
//!
//! Two kinds of pattern, and no regular expressions:
//! - **SPIFFE ID patterns**, segment-aware: `spiffe://prod.example/ns/*/sa/web` (`*` is exactly
//!   one path segment) and `spiffe://prod.example/ns/payments/**` (`**`, last only, is one or
//!   more trailing segments). The trust domain is always written literally, so a pattern never
//!   matches across trust domains; a wildcard is always a whole segment (`pay*` is refused).
//! - **DNS suffix patterns**: `*.batch.internal` matches any name ending in `.batch.internal`
//!   with at least one label before it (`a.batch.internal`, `a.b.batch.internal`; not
//!   `batch.internal` itself).
//!
//! Comparison is byte for byte, like exact entries. Among patterns that match one identity the
//! most specific wins ([`Pattern::specificity`]): the longest literal text before the first
//! wildcard (for a DNS pattern, its literal suffix), then a pattern without `**`, then the one
//! with more segments, then the one whose text sorts first. This module owns the syntax, the
//! matching and that order; it must not know upstreams, sources or what a match grants.

use std::cmp::Reverse;
use std::fmt;
use std::sync::Arc;

/// Why a name cannot be a pattern. The messages are for operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a pattern names its trust domain literally (spiffe://TRUST.DOMAIN/...): a wildcard there could match any trust domain")]
    TrustDomain,
    #[error("a wildcard is a whole path segment: `*` for exactly one, `**` (last only) for one or more")]
    PartialSegment,
    #[error("`**` may only be the last path segment")]
    InnerDoubleStar,
    #[error("a SPIFFE ID pattern has no empty path segment and at least one segment after the trust domain")]
    EmptySegment,
    #[error("in a DNS name a wildcard is only a leading `*.` label followed by a literal suffix (e.g. `*.batch.internal`)")]
    Dns,
}

/// An identity as an authorization entry (or `server_identity`) writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// Matches this identity exactly.
    Exact(Arc<str>),
    Pattern(Pattern),
}

impl Name {
    /// An exact name if `text` has no `*`, else a pattern (refused if malformed).
    pub fn parse(text: &str) -> Result<Name, PatternError> {
        if text.contains('*') {
            Pattern::parse(text).map(Name::Pattern)
        } else {
            Ok(Name::Exact(Arc::from(text)))
        }
    }

    /// Whether `identity` is this name (exactly) or matches this pattern.
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            Name::Exact(name) => **name == *identity,
            Name::Pattern(pattern) => pattern.matches(identity),
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        match self {
            Name::Exact(name) => name,
            Name::Pattern(pattern) => pattern.as_str(),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pattern over identities (see the module doc for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: Arc<str>,
    shape: Shape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// `spiffe://TD/` then fixed segments (`None` is `*`), then `**` if `tail`.
    Spiffe {
        /// `spiffe://TD/`, trailing slash included.
        root: Box<str>,
        segments: Box<[Option<Box<str>>]>,
        tail: bool,
    },
    /// `*.` then this suffix; stored with its leading dot (`.batch.internal`).
    DnsSuffix(Box<str>),
}

const SPIFFE: &str = "spiffe://";

impl Pattern {
    /// Parses a pattern; `text` must contain a wildcard (a name without one is exact).
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let shape = match text.strip_prefix(SPIFFE) {
            Some(rest) => spiffe(rest)?,
            None => dns(text)?,
        };
        Ok(Pattern {
            text: Arc::from(text),
            shape,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `identity` matches.
    pub fn matches(&self, identity: &str) -> bool {
        match &self.shape {
            Shape::Spiffe { root, segments, tail } => {
                let Some(path) = identity.strip_prefix(&**root) else {
                    return false;
                };
                let mut parts = path.split('/');
                for segment in segments.iter() {
                    match (parts.next(), segment) {
                        (None, _) | (Some(""), _) => return false,
                        (Some(part), Some(literal)) if part != &**literal => return false,
                        _ => {}
                    }
                }
                let rest: Vec<&str> = parts.collect();
                if *tail {
                    !rest.is_empty() && rest.iter().all(|part| !part.is_empty())
                } else {
                    rest.is_empty()
                }
            }
            Shape::DnsSuffix(suffix) => {
                identity.len() > suffix.len() && identity.ends_with(&**suffix) && !identity.starts_with('.')
            }
        }
    }

    /// The order among patterns: greater is more specific (see the module doc).
    pub fn specificity(&self) -> impl Ord + '_ {
        let (literal, no_tail, segments) = match &self.shape {
            Shape::Spiffe { segments, tail, .. } => {
                let literal = self.text.find('*').unwrap_or(self.text.len());
                (literal, !tail, segments.len())
            }
            Shape::DnsSuffix(suffix) => (suffix.len(), true, 0),
        };
        (literal, no_tail, segments, Reverse(&*self.text))
    }

    /// Whether some identity could match both `self` and `other`.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        match (&self.shape, &other.shape) {
            (
                Shape::Spiffe {
                    root: a_root,
                    segments: a,
                    tail: a_tail,
                },
                Shape::Spiffe {
                    root: b_root,
                    segments: b,
                    tail: b_tail,
                },
            ) => {
                // Lengths a path can have: exactly n, or n + 1 and more with a tail.
                let lengths_meet = match (a_tail, b_tail) {
                    (false, false) => a.len() == b.len(),
                    (true, false) => b.len() > a.len(),
                    (false, true) => a.len() > b.len(),
                    (true, true) => true,
                };
                let literals_agree = a.iter().zip(b.iter()).all(|pair| match pair {
                    (Some(x), Some(y)) => x == y,
                    _ => true,
                });
                a_root == b_root && lengths_meet && literals_agree
            }
            (Shape::DnsSuffix(a), Shape::DnsSuffix(b)) => a.ends_with(&**b) || b.ends_with(&**a),
            _ => false,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The shape of `spiffe://` + `rest`.
fn spiffe(rest: &str) -> Result<Shape, PatternError> {
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain.is_empty() || domain.contains('*') {
        return Err(PatternError::TrustDomain);
    }
    let parts: Vec<&str> = path.split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    let mut tail = false;
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "" => return Err(PatternError::EmptySegment),
            "**" if i + 1 == parts.len() => tail = true,
            "**" => return Err(PatternError::InnerDoubleStar),
            "*" => segments.push(None),
            literal if literal.contains('*') => return Err(PatternError::PartialSegment),
            literal => segments.push(Some(literal.into())),
        }
    }
    Ok(Shape::Spiffe {
        root: format!("{SPIFFE}{domain}/").into(),
        segments: segments.into(),
        tail,
    })
}

/// The shape of a DNS suffix pattern, `*.` + a literal suffix.
fn dns(text: &str) -> Result<Shape, PatternError> {
    let suffix = text.strip_prefix('*').ok_or(PatternError::Dns)?;
    let labels = suffix.strip_prefix('.').ok_or(PatternError::Dns)?;
    if labels.is_empty() || labels.contains('*') || labels.split('.').any(str::is_empty) {
        return Err(PatternError::Dns);
    }
    Ok(Shape::DnsSuffix(suffix.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Pattern {
        Pattern::parse(text).expect(text)
    }

    #[test]
    fn a_single_star_matches_exactly_one_segment() {
        let p = pattern("spiffe://prod.example/ns/*/sa/web");
        assert!(p.matches("spiffe://prod.example/ns/payments/sa/web"));
        assert!(!p.matches("spiffe://prod.example/ns/a/b/sa/web"));
        assert!(!p.matches("spiffe://prod.example/ns//sa/web"));
        assert!(!p.matches("spiffe://prod.example/ns/payments/sa/web/x"));
    }

    #[test]
    fn a_double_star_matches_one_or_more_trailing_segments() {
        let p = pattern("spiffe://prod.example/ns/payments/**");
        assert!(p.matches("spiffe://prod.example/ns/payments/sa/api"));
        assert!(p.matches("spiffe://prod.example/ns/payments/x"));
        assert!(!p.matches("spiffe://prod.example/ns/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/payments/"));
        assert!(!p.matches("spiffe://prod.example/ns/paymentsx/sa"));
    }

    #[test]
    fn a_spiffe_pattern_never_matches_another_trust_domain() {
        let p = pattern("spiffe://prod.example/**");
        assert!(p.matches("spiffe://prod.example/a"));
        assert!(!p.matches("spiffe://prod.example.evil/a"));
        assert!(!p.matches("spiffe://dev.example/a"));
        assert!(!p.matches("prod.example/a"));
    }

    #[test]
    fn wildcards_in_the_trust_domain_are_refused() {
        for text in [
            "spiffe://*/ns/a",
            "spiffe://*.example/a",
            "spiffe://prod*/a",
            "spiffe://**",
        ] {
            assert_eq!(Pattern::parse(text), Err(PatternError::TrustDomain), "{text}");
        }
    }

    #[test]
    fn partial_inner_and_empty_wildcard_segments_are_refused() {
        assert_eq!(
            Pattern::parse("spiffe://td/ns/pay*"),
            Err(PatternError::PartialSegment)
        );
        assert_eq!(
            Pattern::parse("spiffe://td/**/sa"),
            Err(PatternError::InnerDoubleStar)
        );
        assert_eq!(Pattern::parse("spiffe://td//*"), Err(PatternError::EmptySegment));
        assert_eq!(Pattern::parse("spiffe://td/*/"), Err(PatternError::EmptySegment));
    }

    #[test]
    fn a_dns_suffix_pattern_matches_names_below_it_only() {
        let p = pattern("*.batch.internal");
        assert!(p.matches("a.batch.internal"));
        assert!(p.matches("a.b.batch.internal"));
        assert!(!p.matches("batch.internal"));
        assert!(!p.matches(".batch.internal"));
        assert!(!p.matches("abatch.internal"));
        assert!(!p.matches("a.batch.internal.evil"));
    }

    #[test]
    fn malformed_dns_patterns_are_refused() {
        for text in [
            "*",
            "*.",
            "a.*.internal",
            "*x.internal",
            "**.internal",
            "*.a..b",
            "alice*",
        ] {
            assert_eq!(Pattern::parse(text), Err(PatternError::Dns), "{text}");
        }
    }

    #[test]
    fn a_name_without_a_wildcard_is_exact() {
        let name = Name::parse("spiffe://td/ns/a").expect("exact");
        assert_eq!(name, Name::Exact(Arc::from("spiffe://td/ns/a")));
        assert!(name.matches("spiffe://td/ns/a"));
        assert!(!name.matches("spiffe://td/ns/a/b"));
    }

    #[test]
    fn the_longest_literal_prefix_is_the_most_specific() {
        let narrow = pattern("spiffe://td/ns/payments/sa/*");
        let wide = pattern("spiffe://td/ns/*/sa/api");
        assert!(narrow.specificity() > wide.specificity());
        let one = pattern("spiffe://td/ns/a/*");
        let many = pattern("spiffe://td/ns/a/**");
        assert!(one.specificity() > many.specificity());
        let deeper = pattern("spiffe://td/ns/a/*/**");
        assert!(deeper.specificity() > many.specificity());
        let (long, short) = (pattern("*.a.b.internal"), pattern("*.b.internal"));
        assert!(long.specificity() > short.specificity());
    }

    #[test]
    fn overlapping_patterns_are_found_and_disjoint_ones_are_not() {
        let overlap = |a: &str, b: &str| pattern(a).overlaps(&pattern(b));
        assert!(overlap("spiffe://td/ns/*/sa/web", "spiffe://td/ns/payments/**"));
        assert!(overlap("spiffe://td/**", "spiffe://td/a/*"));
        assert!(overlap("*.internal", "*.batch.internal"));
        assert!(!overlap("spiffe://td/ns/a/*", "spiffe://td/ns/b/*"));
        assert!(!overlap("spiffe://td/a/*", "spiffe://td/a/*/*"));
        assert!(!overlap("spiffe://td/a/*", "spiffe://td/a/x/**"));
        assert!(!overlap("spiffe://one/**", "spiffe://two/**"));
        assert!(!overlap("*.a.internal", "*.b.internal"));
        assert!(!overlap("*.internal", "spiffe://td/**"));
    }
}
