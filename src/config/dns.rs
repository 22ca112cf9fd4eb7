//! `[dns]`: the resolver `discover` names are asked of ([`DnsConfig`]), the raw table it is
//! read from and its rule. This file must not resolve anything (`discovery` does).

use std::net::SocketAddr;

use serde::Deserialize;

use super::values::{ConfigError, Validator};

/// `[dns]`: the resolver used by `discover`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (empty: the system's, from `/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
}

/// `[dns]`: how `discover` names are resolved.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    /// Resolvers, `ip:port` or a bare IP for port 53; default the system's (/etc/resolv.conf).
    #[serde(default)]
    servers: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn dns(&self, raw: Option<RawDns>) -> Result<DnsConfig, ConfigError> {
        let mut servers = Vec::new();
        for text in raw.map(|d| d.servers).unwrap_or_default() {
            // A bare address means port 53.
            let addr = match text.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 53),
                Err(_) => self.socket_addr("dns.servers", &text)?,
            };
            servers.push(addr);
        }
        Ok(DnsConfig { servers })
    }
}
