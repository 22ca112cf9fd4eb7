//! The `[[listener]]` section: [`ListenerConfig`], the raw table it is read from, its defaults,
//! and every rule about a valid listener (unique name and address, known upstreams in
//! `upstream`, `sni`, `alpn` and `authorization`, PROXY header fronts, connection bounds).
//!
//! A listener key is added here (its raw field, its typed field, its rule), in the model that
//! uses it and in the README, nowhere else in `config`. This file must not validate another
//! section: `[listener.tls]` comes from `listener_tls.rs`, the global rate limit and the
//! listener's own from `ratelimit.rs`, value parsers from `values.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::authorization::{AuthorizationConfig, RawAuthorization};
use super::listener_tls::{RawTls, TlsConfig};
use super::ratelimit::{ListenerLimit, RateLimitConfig, RawRateLimitOverride};
use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Keepalive, RawKeepalive, Validator};
use crate::addr::IpNet;

/// Default deadline for a client's TLS handshake, from accept to the end of the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[[listener]] idle_timeout`: a connection silent both ways this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `[[listener]] max_handshakes_per_source`.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 32;

/// One accepting socket and the upstream group its connections go to.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metric labels.
    pub name: String,
    pub bind: SocketAddr,
    /// Name of an upstream in [`Config::upstreams`](super::Config::upstreams) (validated to exist).
    pub upstream: String,
    /// TLS termination; `None` is a plaintext listener.
    pub tls: Option<TlsConfig>,
    /// Server name (lowercase) -> upstream, for TLS listeners serving several upstreams.
    pub sni: Vec<(String, String)>,
    /// `[listener.alpn]`: negotiated protocol -> upstream (an SNI route wins over it).
    pub alpn_routes: Vec<(String, String)>,
    /// Deadline for the whole TLS handshake (not per read).
    pub handshake_timeout: Duration,
    /// The limit on this listener's clients (its own, else the global one); `None`: unlimited.
    pub rate_limit: Option<ListenerLimit>,
    /// Bytes written to a client refused by the rate limiter before closing (e.g. an HTTP 429).
    pub reject_response: Option<Vec<u8>>,
    /// Expect a PROXY protocol v1/v2 header from a trusted front; its source address is the
    /// client's for rate limits, logs and the header fulcrum sends on.
    pub accept_proxy_protocol: bool,
    /// `trusted_proxies`: with `accept_proxy_protocol` (which requires it in a config file), the
    /// fronts allowed to send a header; a connection from anywhere else is refused before its
    /// header is read. Empty: no peer may send one.
    pub trusted_proxies: Vec<IpNet>,
    /// No byte either way for this long closes the connection (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// After one side has sent FIN, the other direction may stay silent this long (`None`:
    /// only `idle_timeout` applies).
    pub half_closed_timeout: Option<Duration>,
    /// A connection is closed at an age in `[max_lifetime - max_lifetime_jitter, max_lifetime]`.
    pub max_lifetime: Option<Duration>,
    pub max_lifetime_jitter: Duration,
    /// TCP keepalive on the client leg (`None`: off).
    pub tcp_keepalive: Option<Keepalive>,
    /// Open connections on this listener at once; `None`: only the process cap applies.
    pub max_connections: Option<usize>,
    /// Connections from one source (its prefix) in the PROXY-header or TLS-handshake phase at
    /// once.
    pub max_handshakes_per_source: u32,
    /// `allow_from`: only clients from these networks are served (empty: any source). Checked at
    /// accept, before any handshake; with PROXY protocol the header's source is the client's.
    pub allow_from: Vec<IpNet>,
    /// `deny_from`: clients from these networks are refused at accept (beats `allow_from`).
    pub deny_from: Vec<IpNet>,
    /// `[listener.authorization]`: this listener's own identity -> upstreams table, in place of
    /// [`Config::authorization`](super::Config::authorization) (mTLS listeners only).
    pub authorization: Option<AuthorizationConfig>,
}

/// `[[listener]]`: an address fulcrum accepts connections on and the upstream it serves.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    /// 1-64 characters of `A-Z a-z 0-9 - _ .`, unique; the `listener` label in metrics.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    name: String,
    /// Address to listen on, `ip:port` (`[::1]:8080` for IPv6); no two listeners on one address.
    bind: String,
    /// The name of the `[[upstream]]` this listener serves.
    upstream: String,
    /// `[listener.tls]`: terminate TLS on this listener.
    tls: Option<RawTls>,
    /// Server name -> upstream, on TLS listeners; each upstream must exist.
    #[serde(default)]
    sni: BTreeMap<String, String>,
    /// Negotiated ALPN protocol -> upstream (an SNI route wins); the protocol must be one
    /// `[listener.tls] alpn` offers; each upstream must exist.
    #[serde(default)]
    alpn: BTreeMap<String, String>,
    /// Duration: one deadline, from accept, for the PROXY header and the TLS handshake together.
    #[schemars(extend("default" = "10s"))]
    handshake_timeout: Option<String>,
    /// `[listener.rate_limit]`: this listener's own capacity and window.
    rate_limit: Option<RawRateLimitOverride>,
    /// Bytes written to a rate-limited client before it is closed; default none.
    reject_response: Option<String>,
    /// `true`: a PROXY protocol v1/v2 header comes first; needs `trusted_proxies`.
    #[serde(default)]
    accept_proxy_protocol: bool,
    /// Addresses or networks (`"10.0.0.0/8"`, `"::1/128"`) allowed to send a PROXY header; only
    /// with `accept_proxy_protocol = true`.
    trusted_proxies: Option<Vec<String>>,
    /// Duration or "0s" (never): no byte either way this long closes the connection.
    #[schemars(extend("default" = "1h"))]
    idle_timeout: Option<String>,
    /// Duration or "0s" (never): after one side's FIN, the other side's silence this long
    /// closes; default `idle_timeout`.
    half_closed_timeout: Option<String>,
    /// Duration: a connection is closed at this age (minus up to `max_lifetime_jitter`);
    /// default none.
    max_lifetime: Option<String>,
    /// Duration or "0s", at most half of `max_lifetime` (needed): default a tenth of it.
    max_lifetime_jitter: Option<String>,
    /// TCP keepalive on client connections: `true`, `false` or a table (missing fields take the
    /// defaults: idle "60s", interval "10s", count 6).
    #[schemars(extend("default" = true))]
    tcp_keepalive: Option<RawKeepalive>,
    /// This listener's open connections at once, at least 1; default none.
    #[schemars(range(min = 1))]
    max_connections: Option<usize>,
    /// Connections of one source in their handshake at once; at least 1.
    #[schemars(range(min = 1), extend("default" = 32))]
    max_handshakes_per_source: Option<u32>,
    /// Addresses or networks clients may come from, not empty; others are refused at accept,
    /// before any handshake. Default: any source.
    #[schemars(length(min = 1))]
    allow_from: Option<Vec<String>>,
    /// Addresses or networks refused at accept; beats `allow_from`.
    deny_from: Option<Vec<String>>,
    /// `[listener.authorization]`: this listener's own table, in place of `[authorization]` (whose
    /// `deny` still applies); needs client certificates.
    #[schemars(with = "Option<super::authorization::AuthorizationTable>")]
    authorization: Option<RawAuthorization>,
}

impl Validator<'_> {
    /// Every `[[listener]]` (at least one), each naming only `upstreams`, its rate limit settled
    /// against the global one (`rate_limit`).
    pub(super) fn listeners(
        &self,
        raw: Vec<RawListener>,
        upstreams: &[UpstreamConfig],
        rate_limit: &Option<RateLimitConfig>,
    ) -> Result<Vec<ListenerConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.invalid("listener", "[]", "at least one [[listener]] is required"));
        }
        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.len());
        for (i, l) in raw.into_iter().enumerate() {
            let listener = self.listener(i, l, &listeners, upstreams, rate_limit)?;
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Listener `i`, unique among the `earlier` ones.
    fn listener(
        &self,
        i: usize,
        l: RawListener,
        earlier: &[ListenerConfig],
        upstreams: &[UpstreamConfig],
        rate_limit: &Option<RateLimitConfig>,
    ) -> Result<ListenerConfig, ConfigError> {
        let key = |field: &str| format!("listener[{i}] ({:?}).{field}", l.name);
        self.name(&key("name"), &l.name)?;
        if earlier.iter().any(|o| o.name == l.name) {
            return Err(self.invalid(key("name"), &l.name, "duplicate listener name"));
        }
        let bind = self.socket_addr(&key("bind"), &l.bind)?;
        if bind.port() != 0 && earlier.iter().any(|o| o.bind == bind) {
            return Err(self.invalid(
                key("bind"),
                &l.bind,
                "another listener already binds this address",
            ));
        }
        let known = |name: &str| upstreams.iter().any(|u| u.name == name);
        if !known(&l.upstream) {
            return Err(self.invalid(key("upstream"), &l.upstream, "no [[upstream]] has this name"));
        }
        let tls = match l.tls {
            Some(t) => Some(self.tls(&key("tls"), t, upstreams)?),
            None => None,
        };
        if !l.sni.is_empty() && tls.is_none() {
            return Err(self.invalid(key("sni"), "{..}", "SNI routing needs [listener.tls]"));
        }
        let mut sni = Vec::with_capacity(l.sni.len());
        for (server_name, upstream) in l.sni {
            if !known(&upstream) {
                let k = key(&format!("sni.{server_name:?}"));
                return Err(self.invalid(k, &upstream, "no [[upstream]] has this name"));
            }
            sni.push((server_name.to_ascii_lowercase(), upstream));
        }
        let mut alpn_routes = Vec::with_capacity(l.alpn.len());
        for (protocol, upstream) in l.alpn {
            let k = key(&format!("alpn.{protocol:?}"));
            let offered = tls.as_ref().is_some_and(|t| t.alpn.contains(&protocol));
            if !offered {
                return Err(self.invalid(
                    k,
                    &upstream,
                    "routes a protocol that [listener.tls] alpn does not offer",
                ));
            }
            if !known(&upstream) {
                return Err(self.invalid(k, &upstream, "no [[upstream]] has this name"));
            }
            alpn_routes.push((protocol, upstream));
        }
        let handshake_timeout = match &l.handshake_timeout {
            Some(text) => self.duration(&key("handshake_timeout"), text)?,
            None => DEFAULT_HANDSHAKE_TIMEOUT,
        };
        let rate_limit = match (l.rate_limit, rate_limit) {
            (Some(own), global) => Some(ListenerLimit::Own(self.listener_rate_limit(&key, own, global)?)),
            (None, Some(global)) => Some(ListenerLimit::Global(global.policy.clone())),
            (None, None) => None,
        };
        let trusted_proxies = match &l.trusted_proxies {
            None if l.accept_proxy_protocol => {
                return Err(self.invalid(
                    key("accept_proxy_protocol"),
                    "true",
                    "needs trusted_proxies: the fronts allowed to send a PROXY header (their addresses or \
                     networks, e.g. [\"10.0.0.0/8\"]); [\"0.0.0.0/0\", \"::/0\"] trusts any peer to name any source",
                ))
            }
            None => Vec::new(),
            Some(_) if !l.accept_proxy_protocol => {
                return Err(self.invalid(
                    key("trusted_proxies"),
                    "[..]",
                    "only means something with accept_proxy_protocol = true",
                ))
            }
            Some(list) => self.network_list(&key("trusted_proxies"), list)?,
        };
        let allow_from = match &l.allow_from {
            Some(list) if list.is_empty() => {
                return Err(self.invalid(
                    key("allow_from"),
                    "[]",
                    "admits no source; leave allow_from out to admit every source",
                ))
            }
            Some(list) => self.network_list(&key("allow_from"), list)?,
            None => Vec::new(),
        };
        let deny_from = match &l.deny_from {
            Some(list) => self.network_list(&key("deny_from"), list)?,
            None => Vec::new(),
        };
        let idle_timeout = match &l.idle_timeout {
            Some(text) => self.duration_or_off(&key("idle_timeout"), text)?,
            None => Some(DEFAULT_IDLE_TIMEOUT),
        };
        let half_closed_timeout = match &l.half_closed_timeout {
            Some(text) => self.duration_or_off(&key("half_closed_timeout"), text)?,
            None => idle_timeout,
        };
        let max_lifetime = match &l.max_lifetime {
            Some(text) => Some(self.duration(&key("max_lifetime"), text)?),
            None => None,
        };
        let max_lifetime_jitter = match (&l.max_lifetime_jitter, max_lifetime) {
            (None, Some(lifetime)) => lifetime / 10,
            (None, None) => Duration::ZERO,
            (Some(text), None) => {
                return Err(self.invalid(key("max_lifetime_jitter"), text, "needs max_lifetime"))
            }
            (Some(text), Some(lifetime)) => {
                let jitter = self
                    .duration_or_off(&key("max_lifetime_jitter"), text)?
                    .unwrap_or_default();
                if jitter > lifetime / 2 {
                    return Err(self.invalid(
                        key("max_lifetime_jitter"),
                        text,
                        "must be at most half of max_lifetime",
                    ));
                }
                jitter
            }
        };
        let tcp_keepalive = self.keepalive(&key("tcp_keepalive"), l.tcp_keepalive)?;
        let max_connections = match l.max_connections {
            Some(0) => return Err(self.invalid(key("max_connections"), 0, "must be at least 1")),
            other => other,
        };
        let max_handshakes_per_source = match l.max_handshakes_per_source {
            Some(0) => return Err(self.invalid(key("max_handshakes_per_source"), 0, "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        };
        let mutual_tls = tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some() || !t.trust_domains.is_empty());
        let authorization = match l.authorization {
            Some(_) if !mutual_tls => {
                return Err(self.invalid(
                    key("authorization"),
                    "{..}",
                    "needs client certificates ([listener.tls] client_ca or trust_domains)",
                ))
            }
            Some(table) => Some(self.authorization(&key("authorization"), table, upstreams)?),
            None => None,
        };
        Ok(ListenerConfig {
            name: l.name,
            authorization,
            allow_from,
            deny_from,
            bind,
            upstream: l.upstream,
            tls,
            sni,
            alpn_routes,
            handshake_timeout,
            rate_limit,
            reject_response: l.reject_response.map(String::into_bytes),
            accept_proxy_protocol: l.accept_proxy_protocol,
            trusted_proxies,
            idle_timeout,
            half_closed_timeout,
            max_lifetime,
            max_lifetime_jitter,
            tcp_keepalive,
            max_connections,
            max_handshakes_per_source,
        })
    }

    /// A list of networks (`10.0.0.0/8`, `::1`, a bare address is one host).
    fn network_list(&self, key: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .map(|text| IpNet::parse(text).map_err(|reason| self.invalid(key, text, reason)))
            .collect()
    }
}
