//! `key_exchange`, in `[listener.tls]` and `[upstream.tls]`: the key exchange groups a TLS side
//! offers, in its order of preference ([`KeyExchange`], of [`KxGroup`]s). A listener's
//! `[[listener.tls.certificate]]` entries use the listener's.
//!
//! Pure, and about names only: which groups this build's crypto provider has, and what the order
//! does in a handshake, is `tls`'s business (`tls::provider`), which refuses a configured group
//! the provider lacks, so that `fulcrum check` reports it too.

use std::fmt;

use super::values::{ConfigError, Validator};

/// A key exchange group a TLS side may offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KxGroup {
    /// `X25519MLKEM768`: hybrid post-quantum, X25519 with ML-KEM-768 (TLS 1.3 only).
    X25519MlKem768,
    /// `X25519`.
    X25519,
    /// `secp256r1` (`P-256`).
    Secp256r1,
    /// `secp384r1` (`P-384`).
    Secp384r1,
}

/// The groups offered without `key_exchange`, most preferred first: the hybrid post-quantum one,
/// then the classical ones every client has. A build whose provider lacks one leaves it out.
pub const DEFAULT_KEY_EXCHANGE: [KxGroup; 4] = [
    KxGroup::X25519MlKem768,
    KxGroup::X25519,
    KxGroup::Secp256r1,
    KxGroup::Secp384r1,
];

impl KxGroup {
    /// Every group, in the order the names are listed in errors.
    pub const ALL: [KxGroup; 4] = [
        KxGroup::X25519MlKem768,
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
    ];

    /// The canonical spelling (the TLS registry's name).
    pub fn name(self) -> &'static str {
        match self {
            KxGroup::X25519MlKem768 => "X25519MLKEM768",
            KxGroup::X25519 => "X25519",
            KxGroup::Secp256r1 => "secp256r1",
            KxGroup::Secp384r1 => "secp384r1",
        }
    }

    /// The NIST name accepted besides the canonical one.
    fn alias(self) -> Option<&'static str> {
        match self {
            KxGroup::Secp256r1 => Some("P-256"),
            KxGroup::Secp384r1 => Some("P-384"),
            KxGroup::X25519MlKem768 | KxGroup::X25519 => None,
        }
    }

    /// The group `text` names, in any case, by its canonical name or its alias.
    pub fn parse(text: &str) -> Option<KxGroup> {
        KxGroup::ALL.into_iter().find(|g| {
            g.name().eq_ignore_ascii_case(text) || g.alias().is_some_and(|a| a.eq_ignore_ascii_case(text))
        })
    }
}

impl fmt::Display for KxGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `key_exchange`: the groups a TLS side offers, most preferred first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KeyExchange {
    /// Not configured: [`DEFAULT_KEY_EXCHANGE`], less the groups this build's provider lacks.
    #[default]
    Default,
    /// Configured: at least one group, none twice; each must be in this build's provider.
    Configured(Vec<KxGroup>),
}

impl KeyExchange {
    /// The groups, most preferred first (for [`KeyExchange::Default`], whether or not the
    /// provider has them all).
    pub fn groups(&self) -> &[KxGroup] {
        match self {
            KeyExchange::Default => &DEFAULT_KEY_EXCHANGE,
            KeyExchange::Configured(groups) => groups,
        }
    }
}

impl Validator<'_> {
    /// `key_exchange` at `key`: group names (any case; `P-256` and `P-384` for the `secp`
    /// ones), at least one, none twice. Absent: [`KeyExchange::Default`].
    pub(super) fn key_exchange(
        &self,
        key: &str,
        raw: Option<Vec<String>>,
    ) -> Result<KeyExchange, ConfigError> {
        let Some(names) = raw else {
            return Ok(KeyExchange::Default);
        };
        if names.is_empty() {
            return Err(self.invalid(
                key,
                "[]",
                "offers no key exchange group; leave key_exchange out for the default \
                 [\"X25519MLKEM768\", \"X25519\", \"secp256r1\"]",
            ));
        }
        let mut groups: Vec<KxGroup> = Vec::with_capacity(names.len());
        for name in &names {
            let Some(group) = KxGroup::parse(name) else {
                return Err(self.invalid(
                    key,
                    name,
                    "unknown key exchange group; expected X25519MLKEM768, X25519, secp256r1 (P-256) \
                     or secp384r1 (P-384)",
                ));
            };
            if groups.contains(&group) {
                return Err(self.invalid(key, name, format!("names {group} twice")));
            }
            groups.push(group);
        }
        Ok(KeyExchange::Configured(groups))
    }
}

#[cfg(test)]
mod tests;
