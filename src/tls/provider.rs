//! The crypto provider every TLS object in fulcrum uses, chosen here and nowhere else: ring by
//! default, AWS-LC with the `aws-lc-rs` feature.

use std::sync::Arc;

/// The crypto provider every TLS object in fulcrum uses: ring by default, AWS-LC with the
/// `aws-lc-rs` feature.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(chosen_provider())
}

pub(crate) fn chosen_provider() -> rustls::crypto::CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    provider
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
