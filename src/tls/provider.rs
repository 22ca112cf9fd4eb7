//! The crypto provider every TLS object in fulcrum uses, chosen here and nowhere else: AWS-LC by
//! default (the `aws-lc-rs` feature, which wins when `ring` is on too), ring in a build with
//! only the `ring` feature; and its key exchange groups in a configured order
//! ([`provider_with`]). It must not build configurations: `tls.rs` and `client.rs` do.
//!
//! ring has no ML-KEM: a ring build leaves X25519MLKEM768 out of the default `key_exchange`
//! without a word, and refuses a `key_exchange` that names it ([`TlsError::UnsupportedKxGroup`]).

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, SupportedKxGroup};

use super::files::TlsError;
use crate::config::{KeyExchange, KxGroup};

/// The name of this build's provider, as operators choose it (a Cargo feature).
#[cfg(feature = "aws-lc-rs")]
pub const PROVIDER_NAME: &str = "aws-lc-rs";
/// The name of this build's provider, as operators choose it (a Cargo feature).
#[cfg(not(feature = "aws-lc-rs"))]
pub const PROVIDER_NAME: &str = "ring";

/// The crypto provider every TLS object in fulcrum uses, offering the default `key_exchange`
/// (X25519MLKEM768, X25519, secp256r1, secp384r1; the hybrid only where the provider has it). For code
/// with no `key_exchange` of its own: the Redis client, `fulcrum verify`, benchmarks.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(chosen_provider())
}

/// [`provider`], not yet shared.
pub(crate) fn chosen_provider() -> CryptoProvider {
    let mut provider = base_provider();
    provider.kx_groups = KeyExchange::Default
        .groups()
        .iter()
        .filter_map(|g| group(*g))
        .collect();
    provider
}

/// The provider offering the groups of `key_exchange` in its order (a key share for the first;
/// on a server the first the client supports is chosen). A configured group the provider lacks
/// is an error; the default list loses those silently.
pub fn provider_with(key_exchange: &KeyExchange) -> Result<Arc<CryptoProvider>, TlsError> {
    let groups = match key_exchange {
        KeyExchange::Default => return Ok(provider()),
        KeyExchange::Configured(groups) => groups,
    };
    let kx_groups = groups
        .iter()
        .map(|g| {
            group(*g).ok_or(TlsError::UnsupportedKxGroup {
                provider: PROVIDER_NAME,
                group: *g,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(CryptoProvider {
        kx_groups,
        ..base_provider()
    }))
}

/// The compiled-in provider with rustls's own defaults.
fn base_provider() -> CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    provider
}

/// This build's implementation of `group`, if it has one.
fn group(group: KxGroup) -> Option<&'static dyn SupportedKxGroup> {
    #[cfg(feature = "aws-lc-rs")]
    use rustls::crypto::aws_lc_rs::kx_group;
    #[cfg(not(feature = "aws-lc-rs"))]
    use rustls::crypto::ring::kx_group;
    match group {
        #[cfg(feature = "aws-lc-rs")]
        KxGroup::X25519MlKem768 => Some(kx_group::X25519MLKEM768),
        #[cfg(not(feature = "aws-lc-rs"))]
        KxGroup::X25519MlKem768 => None,
        KxGroup::X25519 => Some(kx_group::X25519),
        KxGroup::Secp256r1 => Some(kx_group::SECP256R1),
        KxGroup::Secp384r1 => Some(kx_group::SECP384R1),
    }
}

/// Makes [`provider`] the process-wide default rustls provider, for code that builds rustls
/// configurations itself (the redis client). Idempotent; a provider already installed (by an
/// earlier call, or by a program embedding fulcrum) is kept.
pub fn install_default_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An Err means another thread installed one in between: that one stays, as documented.
        let _ = chosen_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(provider: &CryptoProvider) -> Vec<String> {
        let names = provider.kx_groups.iter().map(|g| format!("{:?}", g.name()));
        names.collect()
    }

    #[test]
    fn the_default_provider_offers_the_default_key_exchange_this_build_has_in_order() {
        let expected: &[&str] = if cfg!(feature = "aws-lc-rs") {
            &["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]
        } else {
            &["X25519", "secp256r1", "secp384r1"]
        };
        assert_eq!(names(&provider()), expected);
        assert_eq!(
            names(&provider_with(&KeyExchange::Default).expect("default")),
            expected
        );
    }

    #[test]
    fn a_configured_key_exchange_is_offered_in_its_own_order() {
        let configured = KeyExchange::Configured(vec![KxGroup::Secp384r1, KxGroup::X25519]);
        let provider = provider_with(&configured).expect("classical groups are in every build");
        assert_eq!(names(&provider), ["secp384r1", "X25519"]);
    }

    #[test]
    fn a_configured_hybrid_is_refused_only_by_a_build_without_ml_kem() {
        let hybrid = KeyExchange::Configured(vec![KxGroup::X25519MlKem768, KxGroup::X25519]);
        let result = provider_with(&hybrid);
        #[cfg(feature = "aws-lc-rs")]
        assert_eq!(
            names(&result.expect("AWS-LC has ML-KEM")),
            ["X25519MLKEM768", "X25519"]
        );
        #[cfg(not(feature = "aws-lc-rs"))]
        assert_eq!(
            result.expect_err("ring has no ML-KEM").to_string(),
            "this build's crypto provider (ring) has no X25519MLKEM768; build with the default \
             aws-lc-rs provider or remove it from key_exchange"
        );
    }
}
