//! The `[[upstream]]` section: [`UpstreamConfig`] with its backends ([`BackendConfig`]) or its
//! `discover` name (`[dns]`, the resolver that name is asked of, is `dns.rs`'s), its queue and
//! connect settings and `[upstream.tls]` ([`UpstreamTlsConfig`]), the raw tables they are read
//! from, their defaults and their rules; `[upstream.health_check]` is `health_check.rs`'s.
//!
//! An upstream key is added here, in the model that uses it and in the README. This file must not
//! resolve names, dial or probe anything (`discovery`, `net` and `health` do), nor validate
//! another section; value parsers come from `values.rs`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::health_check::HealthCheckConfig;
use super::health_check::RawHealthCheck;
use super::key_exchange::KeyExchange;
use super::spiffe::TlsSource;
use super::values::{BackendAddr, ConfigError, Keepalive, RawKeepalive, Validator};

/// Default time a connection may take to reach a backend before the next one is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default `[[upstream]] queue_timeout`: how long a client may wait for a backend below its cap.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `[[upstream]] queue_size`.
pub const MAX_QUEUE_SIZE: usize = 100_000;
/// Default `[[upstream]] discover_interval`: how often a `discover` name is resolved again.
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(10);
/// Default `[[upstream]] discover_max_backends`: the most backends one DNS answer makes.
pub const DEFAULT_DISCOVER_MAX_BACKENDS: usize = 256;
/// Default number of distinct backends tried for one client connection.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;

/// A group of interchangeable backends.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// No duplicates; empty exactly when the backends are discovered (`discover`).
    pub backends: Vec<BackendConfig>,
    /// `discover = "host:port"`: one backend per A/AAAA record of the name.
    pub discover: Option<Discover>,
    /// Callers that may wait for a backend below its `max_connections` (0: refuse at once).
    pub queue_size: usize,
    /// How long one may wait in that queue.
    pub queue_timeout: Duration,
    /// Deadline for one dial (name resolution included).
    pub connect_timeout: Duration,
    /// How many distinct backends one client connection may try before it is closed.
    pub connect_attempts: usize,
    /// Health checking. Always present: without a `[upstream.health_check]` table it holds the
    /// defaults with `active = false` (passive detection plus recovery probes only).
    pub health_check: HealthCheckConfig,
    /// Send a PROXY protocol header to backends before any client byte (off when `None`).
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Connect to backends over TLS (`[upstream.tls]`).
    pub tls: Option<UpstreamTlsConfig>,
    /// TCP keepalive on the backend leg (`None`: off).
    pub tcp_keepalive: Option<Keepalive>,
}

/// One configured backend: a plain `"host:port"` string, or a table with its weight, cap and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: BackendAddr,
    /// 1 to 256: its share of connections relative to the others (default 1).
    pub weight: u32,
    /// Connections it may hold at once (`None`: unlimited).
    pub max_connections: Option<u32>,
    /// A standby: receives connections only when no primary can take them.
    pub backup: bool,
}

impl BackendConfig {
    /// A backend with the defaults: weight 1, no cap, primary.
    pub fn new(addr: BackendAddr) -> BackendConfig {
        BackendConfig {
            addr,
            weight: 1,
            max_connections: None,
            backup: false,
        }
    }
}

/// `[[upstream]] discover`: backends are the addresses a name resolves to, re-resolved every
/// `interval` (sooner when the records' TTL is shorter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discover {
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    /// `discover_max_backends`: at most this many addresses of one answer become backends (the
    /// first in address order); at least 1.
    pub max_backends: usize,
}

impl fmt::Display for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `[upstream.tls]`: TLS to the backends, verifying them. Paths resolve like the listener's.
#[derive(Clone, Debug)]
pub struct UpstreamTlsConfig {
    /// `source`: files (`ca`, `cert`, `key`) or the Workload API's SVID and bundles, a
    /// backend's chain then verified against the bundle of its SPIFFE ID's trust domain.
    pub source: TlsSource,
    /// PEM CA bundle the backends' certificates must chain to (empty with the Workload API).
    pub ca: PathBuf,
    /// Client certificate and key for mTLS to the backends (both or neither).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name sent as SNI and, without `server_identity`, checked in the backends' certificates;
    /// default: the backend's host.
    pub server_name: Option<String>,
    /// `server_identity`: the backends' certificates are checked for one of these identities
    /// (SPIFFE IDs, DNS names or patterns) instead of for `server_name`, for backends whose
    /// certificates carry only a SPIFFE ID. Never empty.
    pub server_identity: Option<Vec<crate::authz::Name>>,
    /// What is offered by ALPN to the backends.
    pub alpn: UpstreamAlpn,
    /// `key_exchange`: the key exchange groups offered to the backends, most preferred first
    /// (a key share is sent for the first).
    pub key_exchange: KeyExchange,
}

/// `[upstream.tls] alpn`: what fulcrum offers the backends by ALPN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum UpstreamAlpn {
    /// Nothing (the default).
    #[default]
    None,
    /// `"client"`: the protocol the client negotiated with fulcrum (nothing if it negotiated none).
    Client,
    /// A fixed list, in order of preference.
    Fixed(Vec<String>),
}

/// `[[upstream]]`: a group of interchangeable backends.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    /// 1-64 characters of `A-Z a-z 0-9 - _ .`, unique.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    name: String,
    /// The backends, at least one, none twice, at least one primary: `"host:port"` strings or
    /// tables; required unless `discover`.
    #[schemars(length(min = 1))]
    backends: Option<Vec<RawBackend>>,
    /// `"host:port"` of a name to resolve (not an address): one backend per A/AAAA record;
    /// not together with `backends`.
    discover: Option<String>,
    /// Duration between two lookups of `discover` (a shorter record TTL brings one forward, not
    /// under 1s); only with `discover`.
    #[schemars(extend("default" = "10s"))]
    discover_interval: Option<String>,
    /// The most backends one DNS answer makes, at least 1; only with `discover`.
    #[schemars(range(min = 1), extend("default" = 256))]
    discover_max_backends: Option<usize>,
    /// Clients that may wait for a backend below its cap, 0 to 100000 (0: refused at once).
    #[schemars(range(max = 100000), extend("default" = 0))]
    queue_size: Option<usize>,
    /// Duration one client may wait in the queue.
    #[schemars(extend("default" = "5s"))]
    queue_timeout: Option<String>,
    /// Duration: deadline per dial, name resolution included.
    #[schemars(extend("default" = "3s"))]
    connect_timeout: Option<String>,
    /// Distinct backends tried per client connection, at least 1.
    #[schemars(range(min = 1), extend("default" = 3))]
    connect_attempts: Option<usize>,
    /// `[upstream.health_check]`: active probes of every backend.
    health_check: Option<RawHealthCheck>,
    /// PROXY protocol header written to the backends before any client byte; default off.
    #[schemars(extend("enum" = ["v1", "v2"]))]
    proxy_protocol: Option<String>,
    /// `[upstream.tls]`: TLS to the backends, verifying them.
    tls: Option<RawUpstreamTls>,
    /// TCP keepalive on backend connections: `true`, `false` or a table, as on listeners.
    #[schemars(extend("default" = true))]
    tcp_keepalive: Option<RawKeepalive>,
}

/// A backend: `"host:port"` or `{ addr = "host:port", weight, max_connections, backup }`.
#[derive(schemars::JsonSchema)]
#[schemars(untagged)]
enum RawBackend {
    Addr(String),
    Table(RawBackendTable),
}

/// A backend as a table.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    /// `"host:port"` (or `"ip:port"`).
    addr: String,
    /// Share of connections relative to the other backends, 1 to 256.
    #[schemars(range(min = 1, max = 256), extend("default" = 1))]
    weight: Option<u32>,
    /// Cap on this backend's open connections, at least 1; default none.
    #[schemars(range(min = 1))]
    max_connections: Option<u32>,
    /// `true`: gets connections only when no primary can take them.
    #[serde(default)]
    backup: bool,
}

impl<'de> Deserialize<'de> for RawBackend {
    // By hand rather than `untagged`, so that a mistyped table says which field is wrong.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"host:port\" or a table { addr = \"host:port\", weight, max_connections, backup }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Addr(text.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                RawBackendTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawBackend::Table)
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// `[upstream.tls]`: TLS to the backends, verifying them.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    /// PEM file of the CA the backends' certificates must chain to; required with
    /// `source = "files"`.
    ca: Option<PathBuf>,
    /// "files" or "spiffe": the Workload API's SVID presented to the backends, each verified
    /// against its trust domain's bundle (then no ca, cert nor key, and `server_identity` is
    /// required).
    #[schemars(extend("default" = "files", "enum" = ["files", "spiffe"]))]
    source: Option<String>,
    /// With `source = "spiffe"` only: the SPIFFE ID of the SVID to present; default the first.
    svid: Option<String>,
    /// PEM client certificate chain for mTLS to the backends, with `key`.
    cert: Option<PathBuf>,
    /// PEM key of `cert`.
    key: Option<PathBuf>,
    /// Name verified and sent as SNI; default the backend's host or IP.
    server_name: Option<String>,
    /// Verify this identity instead of `server_name`: a SPIFFE ID, DNS name or pattern, or a
    /// non-empty list of them; default none.
    server_identity: Option<RawServerIdentity>,
    /// ALPN offered to the backends: "client" (the protocol the client negotiated) or a list of
    /// protocol ids; default none.
    alpn: Option<RawUpstreamAlpn>,
    /// Key exchange groups offered to the backends, most preferred first, as `[listener.tls]
    /// key_exchange` (same names, rules and default).
    #[schemars(length(min = 1), extend("default" = ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]))]
    key_exchange: Option<Vec<String>>,
}

/// `server_identity = "spiffe://..."` or a list of such.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(
    untagged,
    expecting = "a SPIFFE ID or DNS name (or pattern), or a list of them"
)]
enum RawServerIdentity {
    One(String),
    Many(Vec<String>),
}

/// `alpn = "client"` or `alpn = ["h2", ...]`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum RawUpstreamAlpn {
    #[schemars(extend("const" = "client"))]
    Client(String),
    Fixed(Vec<String>),
}

impl Validator<'_> {
    /// Every `[[upstream]]`, names unique.
    pub(super) fn upstreams(&self, raw: Vec<RawUpstream>) -> Result<Vec<UpstreamConfig>, ConfigError> {
        let mut upstreams = Vec::with_capacity(raw.len());
        for (i, u) in raw.into_iter().enumerate() {
            let upstream = self.upstream(i, u)?;
            if upstreams.iter().any(|o: &UpstreamConfig| o.name == upstream.name) {
                return Err(self.invalid(
                    format!("upstream[{i}].name"),
                    &upstream.name,
                    "duplicate upstream name",
                ));
            }
            upstreams.push(upstream);
        }
        Ok(upstreams)
    }

    fn upstream(&self, i: usize, u: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let key = |field: &str| format!("upstream[{i}] ({:?}).{field}", u.name);
        self.name(&key("name"), &u.name)?;
        let (backends, discover) = match (u.backends, &u.discover) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    key("discover"),
                    u.discover.as_deref().unwrap_or_default(),
                    "an upstream has either backends or discover, not both",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    key("backends"),
                    "(missing)",
                    "an upstream needs backends = [...] or discover = \"host:port\"",
                ))
            }
            (Some(list), None) => (self.backends(&key("backends"), list)?, None),
            (None, Some(target)) => (
                Vec::new(),
                Some(self.discover(&key, target, u.discover_interval.as_deref())?),
            ),
        };
        if u.discover_interval.is_some() && discover.is_none() {
            return Err(self.invalid(
                key("discover_interval"),
                u.discover_interval.as_deref().unwrap_or_default(),
                "only means something with discover",
            ));
        }
        let discover = match (discover, u.discover_max_backends) {
            (_, Some(0)) => {
                return Err(self.invalid(key("discover_max_backends"), 0, "must be at least 1"));
            }
            (None, Some(max)) => {
                return Err(self.invalid(
                    key("discover_max_backends"),
                    max,
                    "only means something with discover",
                ));
            }
            (Some(discover), Some(max_backends)) => Some(Discover {
                max_backends,
                ..discover
            }),
            (discover, None) => discover,
        };
        let queue_size = u.queue_size.unwrap_or(0);
        if queue_size > MAX_QUEUE_SIZE {
            return Err(self.invalid(
                key("queue_size"),
                queue_size,
                format!("must be at most {MAX_QUEUE_SIZE}"),
            ));
        }
        let queue_timeout = match &u.queue_timeout {
            Some(text) => self.duration(&key("queue_timeout"), text)?,
            None => DEFAULT_QUEUE_TIMEOUT,
        };
        if queue_timeout.is_zero() {
            return Err(self.invalid(key("queue_timeout"), "0s", "must be longer than zero"));
        }
        let connect_timeout = match &u.connect_timeout {
            Some(text) => self.duration(&key("connect_timeout"), text)?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let connect_attempts = u.connect_attempts.unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
        if connect_attempts == 0 {
            return Err(self.invalid(key("connect_attempts"), 0, "must be at least 1"));
        }
        let health_check = match u.health_check {
            Some(raw) => self.health_check(&key("health_check"), raw)?,
            None => HealthCheckConfig::default(),
        };
        let proxy_protocol = match u.proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(crate::proxy_protocol::Version::V1),
            Some("v2") => Some(crate::proxy_protocol::Version::V2),
            Some(other) => {
                return Err(self.invalid(key("proxy_protocol"), other, "expected \"v1\" or \"v2\""))
            }
        };
        let tls = match u.tls {
            None => None,
            Some(t) => Some(UpstreamTlsConfig {
                source: self.upstream_tls_source(&key("tls"), &t)?,
                ca: t.ca.map(|ca| self.base.join(ca)).unwrap_or_default(),
                client_cert: self.client_cert(&key("tls"), t.cert, t.key)?,
                server_name: t.server_name,
                server_identity: t
                    .server_identity
                    .map(|raw| self.server_identity(&key("tls.server_identity"), raw))
                    .transpose()?,
                alpn: match t.alpn {
                    None => UpstreamAlpn::None,
                    Some(RawUpstreamAlpn::Client(word)) if word == "client" => UpstreamAlpn::Client,
                    Some(RawUpstreamAlpn::Client(word)) => {
                        return Err(self.invalid(
                            key("tls.alpn"),
                            word,
                            "expected \"client\" or a list of protocols",
                        ))
                    }
                    Some(RawUpstreamAlpn::Fixed(list)) => {
                        UpstreamAlpn::Fixed(self.alpn_list(&key("tls.alpn"), list)?)
                    }
                },
                key_exchange: self.key_exchange(&key("tls.key_exchange"), t.key_exchange)?,
            }),
        };
        let tcp_keepalive = self.keepalive(&key("tcp_keepalive"), u.tcp_keepalive)?;
        Ok(UpstreamConfig {
            tcp_keepalive,
            name: u.name.clone(),
            backends,
            discover,
            queue_size,
            queue_timeout,
            connect_timeout,
            connect_attempts,
            health_check,
            proxy_protocol,
            tls,
        })
    }

    /// `source` of `[upstream.tls]`: with files, `ca` is required; with the Workload API, no
    /// file is named and `server_identity` is (an SVID names no host to check).
    fn upstream_tls_source(&self, key: &str, t: &RawUpstreamTls) -> Result<TlsSource, ConfigError> {
        let source = self.tls_source(key, t.source.as_deref(), t.svid.clone())?;
        if !source.is_spiffe() {
            if t.ca.is_none() {
                return Err(self.invalid(
                    format!("{key}.ca"),
                    "",
                    "required: the CA bundle the backends' certificates must chain to (or source = \"spiffe\")",
                ));
            }
            return Ok(source);
        }
        let files = [
            ("ca", t.ca.is_some()),
            ("cert", t.cert.is_some()),
            ("key", t.key.is_some()),
        ];
        self.no_files_with_spiffe(key, &files)?;
        if t.server_identity.is_none() {
            return Err(self.invalid(
                format!("{key}.server_identity"),
                "",
                "required with source = \"spiffe\": the backends' SPIFFE IDs (or patterns) to verify",
            ));
        }
        Ok(source)
    }

    fn backends(&self, key: &str, list: Vec<RawBackend>) -> Result<Vec<BackendConfig>, ConfigError> {
        if list.is_empty() {
            return Err(self.invalid(key, "[]", "an upstream needs at least one backend"));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(list.len());
        for raw in list {
            let backend = match raw {
                RawBackend::Addr(text) => BackendConfig::new(
                    BackendAddr::parse(&text).map_err(|reason| self.invalid(key, &text, reason))?,
                ),
                RawBackend::Table(t) => {
                    let addr =
                        BackendAddr::parse(&t.addr).map_err(|reason| self.invalid(key, &t.addr, reason))?;
                    let weight = t.weight.unwrap_or(1);
                    if !(1..=crate::balancer::MAX_WEIGHT).contains(&weight) {
                        let k = format!("{key} ({:?}).weight", t.addr);
                        return Err(self.invalid(
                            k,
                            weight,
                            format!("must be 1 to {}", crate::balancer::MAX_WEIGHT),
                        ));
                    }
                    if t.max_connections == Some(0) {
                        let k = format!("{key} ({:?}).max_connections", t.addr);
                        return Err(self.invalid(k, 0, "must be at least 1 (leave it out for no cap)"));
                    }
                    BackendConfig {
                        addr,
                        weight,
                        max_connections: t.max_connections,
                        backup: t.backup,
                    }
                }
            };
            if backends.iter().any(|b| b.addr == backend.addr) {
                return Err(self.invalid(key, backend.addr.to_string(), "backend listed twice"));
            }
            backends.push(backend);
        }
        if backends.iter().all(|b| b.backup) {
            return Err(self.invalid(
                key,
                "[..]",
                "every backend is a backup: at least one must be a primary",
            ));
        }
        Ok(backends)
    }

    fn discover(
        &self,
        key: &impl Fn(&str) -> String,
        target: &str,
        interval: Option<&str>,
    ) -> Result<Discover, ConfigError> {
        let (host, port) = match BackendAddr::parse(target) {
            Ok(BackendAddr::Name { host, port }) => (host, port),
            Ok(BackendAddr::Ip(_)) => {
                return Err(self.invalid(
                    key("discover"),
                    target,
                    "expected a name to resolve; list addresses in backends",
                ))
            }
            Err(reason) => return Err(self.invalid(key("discover"), target, reason)),
        };
        let interval = match interval {
            Some(text) => self.duration(&key("discover_interval"), text)?,
            None => DEFAULT_DISCOVER_INTERVAL,
        };
        if interval.is_zero() {
            return Err(self.invalid(key("discover_interval"), "0s", "must be longer than zero"));
        }
        Ok(Discover {
            host,
            port,
            interval,
            max_backends: DEFAULT_DISCOVER_MAX_BACKENDS,
        })
    }

    /// `[upstream.tls] server_identity`: at least one entry, each an exact identity or a
    /// well-formed pattern, none a URI other than a SPIFFE ID (no certificate identity could
    /// match it).
    fn server_identity(
        &self,
        key: &str,
        raw: RawServerIdentity,
    ) -> Result<Vec<crate::authz::Name>, ConfigError> {
        let list = match raw {
            RawServerIdentity::One(text) => vec![text],
            RawServerIdentity::Many(list) => list,
        };
        if list.is_empty() {
            return Err(self.invalid(
                key,
                "[]",
                "list at least one SPIFFE ID or DNS name, or leave server_identity out",
            ));
        }
        let entry = |text: &String| {
            if text.is_empty() {
                return Err(self.invalid(key, "\"\"", "an empty name matches no backend"));
            }
            if text.contains("://") && !text.starts_with("spiffe://") {
                return Err(self.invalid(
                    key,
                    text,
                    "a backend's identities are its SPIFFE ID (spiffe://...) and DNS names",
                ));
            }
            crate::authz::Name::parse(text).map_err(|e| self.invalid(key, text, e.to_string()))
        };
        list.iter().map(entry).collect()
    }
}

#[cfg(test)]
mod tests;
