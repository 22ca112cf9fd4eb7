//! A listener's order of key exchange groups (`key_exchange`), made to win over the client's.
//!
//! rustls 0.23 chooses the first group of the client's `supported_groups` that the server has
//! (asking, by HelloRetryRequest, for a key share of it if the client sent none): the server's
//! order only filters. So each certificate has, beside its configuration offering every group,
//! one configuration per group offering that group alone ([`ByGroup`]); the handshake reads the
//! ClientHello and completes with the configuration of the first group, in the listener's order,
//! that the client supports, or with the full one when rustls would choose that group anyway
//! (the common case: the client prefers what the listener prefers). A client that supports the
//! preferred group but sent no key share for it is asked for one: a round trip more, so that a
//! client listing X25519 before X25519MLKEM768 still gets the hybrid when the listener puts it
//! first.
//!
//! This file only makes and picks these configurations; what they contain is `tls.rs`'s.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::ClientHello;
use rustls::{ProtocolVersion, ServerConfig};

use super::files::TlsError;

/// The configurations of one certificate that offer a single group each: entry `i` offers only
/// group `i` of the full configuration's provider. The last group has none: a client supporting
/// it and no group before it gets it from the full configuration.
#[derive(Clone)]
pub(super) struct ByGroup(Vec<Arc<ServerConfig>>);

impl ByGroup {
    /// The single-group configurations of `full`: `rebuild` makes `full` again with a provider
    /// (the same certificate, ALPN, session cache and verifier).
    pub(super) fn new(
        full: &ServerConfig,
        mut rebuild: impl FnMut(Arc<CryptoProvider>) -> Result<ServerConfig, TlsError>,
    ) -> Result<ByGroup, TlsError> {
        let provider = full.crypto_provider();
        let groups = provider
            .kx_groups
            .split_last()
            .map_or(&[][..], |(_, first)| first);
        let pinned = groups
            .iter()
            .map(|group| {
                let only = CryptoProvider {
                    kx_groups: vec![*group],
                    ..(**provider).clone()
                };
                rebuild(Arc::new(only)).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(ByGroup(pinned))
    }

    /// The configuration to complete the handshake of `hello` with: the one offering only the
    /// first of `full`'s groups the client supports, unless rustls would choose that one from
    /// `full` anyway. A client offering no TLS 1.3 cipher suite speaks TLS 1.2, where only the
    /// groups usable in TLS 1.2 count.
    pub(super) fn choose(&self, full: &Arc<ServerConfig>, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        let provider = full.crypto_provider();
        let offered = hello.named_groups().unwrap_or_default();
        let tls13 = provider
            .cipher_suites
            .iter()
            .any(|s| s.tls13().is_some() && hello.cipher_suites().contains(&s.suite()));
        let version = if tls13 {
            ProtocolVersion::TLSv1_3
        } else {
            ProtocolVersion::TLSv1_2
        };
        let usable = |group: &dyn SupportedKxGroup| group.usable_for_version(version);
        let groups = &provider.kx_groups;
        let first_supported = groups
            .iter()
            .enumerate()
            .find(|(_, g)| usable(**g) && offered.contains(&g.name()));
        let Some((i, preferred)) = first_supported else {
            return Arc::clone(full);
        };
        // rustls's own choice from `full`: the client's first group that the listener has.
        let theirs = offered
            .iter()
            .find(|name| groups.iter().any(|g| usable(*g) && g.name() == **name));
        match self.0.get(i) {
            Some(pinned) if theirs != Some(&preferred.name()) => Arc::clone(pinned),
            _ => Arc::clone(full),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::ServerConfig;

    use crate::config::{KeyExchange, KxGroup, TlsConfig, TlsVersion};
    use crate::tls::server_config;

    fn groups(config: &ServerConfig) -> Vec<String> {
        let names = config.crypto_provider().kx_groups.iter();
        names.map(|g| format!("{:?}", g.name())).collect()
    }

    #[test]
    fn a_certificate_rebuilt_with_fetched_crls_keeps_its_key_exchange_order_and_single_group_configurations()
    {
        let dir = std::env::temp_dir().join(format!("fulcrum-kx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = crate::pki::Ca::new("kx CA").expect("CA");
        let server = ca.server(&[]).expect("server certificate");
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write CA");
        std::fs::write(dir.join("server.pem"), &server.cert).expect("write certificate");
        std::fs::write(dir.join("server.key"), &server.key).expect("write key");
        let tls = TlsConfig {
            client_ca: Some(dir.join("ca.pem")),
            key_exchange: KeyExchange::Configured(vec![
                KxGroup::Secp384r1,
                KxGroup::X25519,
                KxGroup::Secp256r1,
            ]),
            ..TlsConfig::new(dir.join("server.pem"), dir.join("server.key"))
        };
        let one_group = TlsConfig {
            key_exchange: KeyExchange::Configured(vec![KxGroup::X25519]),
            ..tls.clone()
        };
        let (loaded, one_group) = (server_config(&tls), server_config(&one_group));
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = loaded.expect("server config");
        assert!(one_group.expect("server config").by_group.0.is_empty());
        let verifier = Arc::clone(loaded.verifier.as_ref().expect("mTLS"));
        let rebuilt = loaded
            .with_verifier(verifier, Vec::new(), TlsVersion::Tls12)
            .expect("rebuilt");
        for tls in [&loaded, &rebuilt] {
            assert_eq!(groups(&tls.config), ["secp384r1", "X25519", "secp256r1"]);
            let single: Vec<Vec<String>> = tls.by_group.0.iter().map(|c| groups(c)).collect();
            assert_eq!(single, [vec!["secp384r1"], vec!["X25519"]]);
        }
    }
}
