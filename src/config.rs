//! Configuration: TOML text -> raw serde structs -> a validated, fully typed [`Config`].
//!
//! This module owns every rule about what a valid configuration is, and the wording of the errors
//! an operator sees for a bad one (file, key, bad value). It is pure: it never opens sockets, never
//! resolves host names and reads no file except the one [`Config::load`] is given and the secret
//! files it names, `[rate_limit.shared] password_file` and `[admin] token_file`, each refused if
//! group or others may read it (certificate files are loaded by `tls`). `fulcrum
//! check` and `fulcrum run` both go through [`Config::load`], so they can never disagree. A Redis
//! password never leaves here in text: [`Secret`] and [`SharedRateLimitConfig`] redact it in Debug,
//! and errors echo a URL only with its password replaced.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default time a connection may take to reach a backend before the next one is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time open connections get to finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for a client's TLS handshake, from accept to the end of the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on `[runtime] workers`.
pub const MAX_WORKERS: usize = 1024;
/// Default `[[listener]] idle_timeout`: a connection silent both ways this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `[[listener]] max_handshakes_per_source`.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 32;
/// Default `[rate_limit] ipv4_prefix`: an IPv4 client is its whole address.
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
/// Default `[rate_limit] ipv6_prefix`: an IPv6 client is its /64 (what one host usually gets).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Default `[listener.tls] session_cache`: TLS sessions a listener remembers for resumption.
pub const DEFAULT_SESSION_CACHE: usize = 256;
/// Default `[listener.tls] session_timeout`: how long a session may be resumed.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `[reload] debounce`: quiet time after a watched file changes before reloading.
pub const DEFAULT_WATCH_DEBOUNCE: Duration = Duration::from_secs(1);
/// Default `[[upstream]] queue_timeout`: how long a client may wait for a backend below its cap.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `[[upstream]] queue_size`.
pub const MAX_QUEUE_SIZE: usize = 100_000;
/// The longest duration any key takes: 10 years. Longer is refused by `fulcrum check`.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Default `[[upstream]] discover_interval`: how often a `discover` name is resolved again.
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(10);
/// Default `[[upstream]] discover_max_backends`: the most backends one DNS answer makes.
pub const DEFAULT_DISCOVER_MAX_BACKENDS: usize = 256;
/// Default number of distinct backends tried for one client connection.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;
/// Default time between two health probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default deadline of one health probe (connect, send and expected reply together), capped at
/// the interval when only the interval is set.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes that bring a down backend back.
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default consecutive failures (probes or real connects) that take a backend out.
pub const DEFAULT_HEALTH_FALL: u32 = 3;

/// A validated configuration. Every field is typed and checked; the running server never meets
/// an unresolved name or an unparsed string.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from, for messages (a path, or `<inline>`).
    pub origin: String,
    /// The file it was loaded from, re-read on reload (`None` for configs built in code).
    pub path: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub admin: Option<AdminConfig>,
    /// How long open connections may keep running after a shutdown signal.
    pub drain_timeout: Duration,
    /// `[runtime] workers`: threads serving connections; `None` means one per core.
    pub workers: Option<std::num::NonZeroUsize>,
    /// Identity -> upstreams it may reach (default deny). Upstream names are validated.
    pub authorization: Vec<(String, Vec<String>)>,
    /// Global per-client limits; `None` means no limiting (unless a listener sets its own).
    pub rate_limit: Option<RateLimitConfig>,
    /// `[access_log]`: one JSON line per closed connection; `None` writes none.
    pub access_log: Option<AccessLogConfig>,
    /// `[access_log] interim`: an interim entry (bytes so far) for every this long a connection
    /// stays open; `None` (the default) writes none.
    pub access_log_interim: Option<Duration>,
    /// `[reload]`: reloading by itself when a file changes.
    pub reload: ReloadConfig,
    /// `max_connections`: open client connections for the whole process (the admin listener's
    /// excepted); `None` derives the cap from the open-file limit when the server binds.
    pub max_connections: Option<usize>,
    /// `[rate_limit] ipv4_prefix` / `ipv6_prefix`: how much of a source address names a client
    /// for every per-source key (rate limit, concurrency cap, handshake limit).
    pub source_prefixes: SourcePrefixes,
    /// `[dns]`: how `discover` names are resolved.
    pub dns: DnsConfig,
}

/// The prefix lengths that make a source address a client key: an IPv6 client usually holds a
/// whole /64, so keying on its full address would give it 2^64 keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePrefixes {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Default for SourcePrefixes {
    fn default() -> Self {
        SourcePrefixes {
            ipv4: DEFAULT_IPV4_PREFIX,
            ipv6: DEFAULT_IPV6_PREFIX,
        }
    }
}

impl SourcePrefixes {
    /// `ip` masked to its prefix (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn mask(&self, ip: std::net::IpAddr) -> std::net::IpAddr {
        use std::net::IpAddr;
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask_bits::<u32>(self.ipv4)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask_bits::<u128>(self.ipv6)).into()),
        }
    }
}

/// The netmask of `prefix` leading one bits, for a 32- or 128-bit address.
fn mask_bits<T>(prefix: u8) -> T
where
    T: std::ops::Not<Output = T> + std::ops::Shr<u32, Output = T> + From<u8> + Copy,
{
    let bits = (std::mem::size_of::<T>() * 8) as u32;
    let ones = !T::from(0u8);
    match u32::from(prefix) {
        0 => T::from(0u8),
        p if p >= bits => ones,
        p => !(ones >> p),
    }
}

/// A network, `address/prefix`: one entry of `trusted_proxies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (one host).
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| "expected an address or address/prefix, e.g. 10.0.0.0/8 or ::1/128".to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("the prefix length must be 0 to {max}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let mask = SourcePrefixes {
            ipv4: self.prefix,
            ipv6: self.prefix,
        };
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask.mask(ip) == mask.mask(self.addr)
    }
}

/// TCP keepalive on one leg of a connection, with `TCP_USER_TIMEOUT` to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

impl Keepalive {
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged, the same budget the
    /// probes give a silent peer (`idle + interval * count`), so that a peer that vanishes while
    /// data is in flight is dropped as soon as one that vanishes while idle.
    pub fn user_timeout(&self) -> Duration {
        self.interval
            .checked_mul(self.count)
            .and_then(|probes| self.idle.checked_add(probes))
            .unwrap_or(Duration::MAX)
    }
}

/// `[reload]`: whether fulcrum reloads by itself when the config file or a file it names changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadConfig {
    /// `watch`: reload, exactly as SIGHUP does, when a watched file changes (default off).
    pub watch: bool,
    /// `debounce`: how long the files must stay unchanged before the reload, so that a set of
    /// files written one after the other is applied once.
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: false,
            debounce: DEFAULT_WATCH_DEBOUNCE,
        }
    }
}

/// `[access_log]`: where the per-connection JSON lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogConfig {
    /// `path = "stdout"`.
    Stdout,
    /// Any other `path`, resolved against the config file's directory; appended to, created if
    /// missing.
    File(PathBuf),
}

/// One accepting socket and the upstream group its connections go to.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metric labels.
    pub name: String,
    pub bind: SocketAddr,
    /// Name of an upstream in [`Config::upstreams`] (validated to exist).
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
    /// `[listener.authorization]`: this listener's own identity -> upstreams table, in place of
    /// [`Config::authorization`] (mTLS listeners only).
    pub authorization: Option<Vec<(String, Vec<String>)>>,
}

/// TLS settings of a listener. Paths are resolved against the config file's directory.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle; present means client certificates are required and verified (mTLS).
    /// Certificates of it issued by another of it are intermediates, the others anchors.
    pub client_ca: Option<PathBuf>,
    /// `[listener.tls.trust_domains]`: SPIFFE trust domain -> PEM bundle. A certificate whose
    /// identity is a SPIFFE ID of trust domain TD must chain to TD's bundle (mTLS, like
    /// `client_ca`, which it makes optional).
    pub trust_domains: std::collections::BTreeMap<String, PathBuf>,
    pub min_version: TlsVersion,
    /// PEM file of CRLs (mTLS only): a client certificate they revoke is refused. Each CRL must
    /// be signed by a certificate of `client_ca`.
    pub crl: Option<PathBuf>,
    /// Close an open mTLS connection when its client certificate expires (default true).
    pub close_on_expiry: bool,
    /// Whether a certificate without a spiffe URI or DNS SAN may be named by its Common Name
    /// (default true; see [`crate::identity`]).
    pub identity_from_cn: bool,
    /// Sessions remembered for resumption (0: no resumption, every handshake is a full one).
    pub session_cache: usize,
    /// How long after its full handshake a session may be resumed.
    pub session_timeout: Duration,
    /// `alpn`: the application protocols offered by ALPN, in order of preference (empty: no
    /// ALPN, as a plain L4 balancer must not promise a protocol its backends may not speak).
    pub alpn: Vec<String>,
    /// `alpn_required`: a client that offers no ALPN at all is refused (without it, it is served
    /// by the listener's own upstream).
    pub alpn_required: bool,
}

impl TlsConfig {
    /// TLS with `cert` and `key`, no client authentication, and every other setting at its
    /// default (as a `[listener.tls]` table with only those two keys).
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            trust_domains: std::collections::BTreeMap::new(),
            min_version: TlsVersion::Tls12,
            crl: None,
            close_on_expiry: true,
            identity_from_cn: true,
            session_cache: DEFAULT_SESSION_CACHE,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            alpn: Vec::new(),
            alpn_required: false,
        }
    }
}

/// Lowest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 (ECDHE key exchange with AEAD ciphers only) and TLS 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Default bound on clients tracked by a rate limiter.
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;

/// A per-client connection limit, as a limiter enforces it: the global `[rate_limit]`, or a
/// listener's own (its `capacity`/`window` over the global rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// New connections admitted per client per window. 0 rejects everything.
    pub capacity: u32,
    /// Length of one fixed window. Non-zero once validated; a limiter given a zero window treats
    /// it as one nanosecond rather than panicking.
    pub window: Duration,
    /// Open connections allowed per client at once; `None` means no concurrency cap.
    pub max_concurrent: Option<u32>,
    /// Upper bound on tracked client keys, so memory stays bounded under a flood of new clients.
    pub max_clients: usize,
    /// Identity -> capacity (`[rate_limit.clients]`), replacing `capacity` for that identity.
    /// Never applies to IP keys.
    pub overrides: HashMap<String, u32>,
}

/// The global `[rate_limit]`: its policy, and where it is counted.
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    pub policy: RateLimitPolicy,
    /// `[rate_limit.shared]`: count in Redis across instances; `None` counts per instance.
    pub shared: Option<SharedRateLimitConfig>,
}

/// How a listener's connections are limited, settled when the config is validated: a
/// `[listener.rate_limit]` of its own wins over the global `[rate_limit]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerLimit {
    /// Counted by the one global limiter, together with every other listener without a limit of
    /// its own (and across instances with `[rate_limit.shared]`). Holds the global policy.
    Global(RateLimitPolicy),
    /// Counted by a limiter of this listener alone, in this instance.
    Own(RateLimitPolicy),
}

impl ListenerLimit {
    /// The policy enforced on this listener's clients.
    pub fn policy(&self) -> &RateLimitPolicy {
        match self {
            ListenerLimit::Global(policy) | ListenerLimit::Own(policy) => policy,
        }
    }
}

/// Default `[rate_limit.shared] key_prefix`.
pub const DEFAULT_SHARED_KEY_PREFIX: &str = "fulcrum:rl:";
/// Default `[rate_limit.shared] timeout`: the budget for one limiter round trip to Redis.
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(50);

/// `[rate_limit.shared]`: the global limit counted in Redis, summed over every instance.
/// Its Debug output shows the URL with any password replaced, and never `password`.
#[derive(Clone)]
pub struct SharedRateLimitConfig {
    /// A `redis://` or `rediss://` (TLS) URL: host, port, database, optional user name, and the
    /// password unless `password` is set. Validated to parse.
    pub redis: String,
    /// Read from `password_file`; given, the URL carries no password (validated).
    pub password: Option<Secret>,
    /// `[rate_limit.shared.tls]`; only with `rediss://` (validated). `rediss://` without it
    /// verifies Redis against the system's roots.
    pub tls: Option<RedisTlsConfig>,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Budget for one round trip (dial included); past it `on_unavailable` applies.
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// Where `password` was read from (watched with `[reload] watch`).
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for SharedRateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRateLimitConfig")
            .field("redis", &redact_url(&self.redis))
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// `[rate_limit.shared.tls]`: how fulcrum verifies Redis, and the certificate it presents.
/// Paths resolve against the config file's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTlsConfig {
    /// PEM CA bundle trusted instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for a Redis with `tls-auth-clients yes` (both or neither).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A credential read from a file. Debug prints `<redacted>`; only [`Secret::expose`] gives the
/// text, for the one place that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret text itself: pass it to the peer that asks for it, nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `url` with the password of its `user:password@` part, if any, replaced by `***`: the form in
/// which a Redis URL may appear in errors and Debug output. Works on unparsable text too: a
/// password may hold `/`, `?`, `#` or `@`, so the user information is taken to end at the
/// *last* `@` (and the authority at the first `/`, `?` or `#` after it); a URL with an `@` in
/// its path or query is then redacted further than needed, never less.
pub fn redact_url(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    let password_start = after_scheme + colon + 1;
    format!("{}***{}", &url[..password_start], &url[after_scheme + at..])
}

/// What the shared limiter does when Redis is unreachable, slow or failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Fall back to this instance's own limiter (same capacity, counted locally).
    Local,
    /// Admit the connection (concurrency caps still apply).
    Allow,
    /// Refuse the connection as rate limited.
    Deny,
}

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

/// `[dns]`: the resolver used by `discover`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (empty: the system's, from `/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
}

/// `[upstream.tls]`: TLS to the backends, verifying them. Paths resolve like the listener's.
#[derive(Clone, Debug)]
pub struct UpstreamTlsConfig {
    /// PEM CA bundle the backends' certificates must chain to.
    pub ca: PathBuf,
    /// Client certificate and key for mTLS to the backends (both or neither).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name checked in the backends' certificates (and sent as SNI); default: the backend's host.
    pub server_name: Option<String>,
    /// What is offered by ALPN to the backends.
    pub alpn: UpstreamAlpn,
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

/// `[upstream.health_check]`: how backends are probed and when they change state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Whether the table was given: healthy backends are probed too. When false, only backends
    /// that passive detection took out are probed, to bring them back.
    pub active: bool,
    /// Time between the starts of two probes of one backend (jittered by +-10%).
    pub interval: Duration,
    /// Deadline of one whole probe: connect, `send` and the `expect`ed reply.
    pub timeout: Duration,
    /// Consecutive successful probes that mark a down backend up.
    pub rise: u32,
    /// Consecutive failures (probes or real connects) that mark an up backend down.
    pub fall: u32,
    /// Bytes written after connecting; empty means none.
    pub send: Vec<u8>,
    /// Bytes the reply must start with; empty means a connect (and `send`) is enough.
    pub expect: Vec<u8>,
    /// What happens to connections already open to a backend when it is marked down.
    pub on_down: OnDown,
    /// Ramp-in period for a backend that comes back up; `None` gives it full share at once.
    pub slow_start: Option<Duration>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            active: false,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
            send: Vec::new(),
            expect: Vec::new(),
            on_down: OnDown::Keep,
            slow_start: None,
        }
    }
}

/// `on_down`: the fate of open connections to a backend that is marked down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDown {
    /// They run to their natural end (default): a backend failing probes may still serve them.
    Keep,
    /// They are closed at once (both sides reset).
    Close,
}

/// `[admin]`: the admin HTTP API, on a TCP address, a Unix socket, or both.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// `bind`: a TCP address (loopback recommended).
    pub bind: Option<SocketAddr>,
    /// `socket`: a Unix socket path, created mode 0660: the file's permissions are the
    /// authentication of requests that come through it.
    pub socket: Option<PathBuf>,
    /// From `token_file`: the bearer token every endpoint but `/healthz` (and `/metrics`
    /// unless `metrics_auth`) requires over TCP. Never printed.
    pub token: Option<Secret>,
    /// Where the token was read from (watched with `[reload] watch`).
    pub token_file: Option<PathBuf>,
    /// `metrics_auth`: `/metrics` needs the token too.
    pub metrics_auth: bool,
    /// `allowed_hosts`: host names (lowercase) a request's `Host` may name, besides IP literals
    /// and `localhost` (DNS rebinding protection).
    pub allowed_hosts: Vec<String>,
}

impl AdminConfig {
    /// Whether the TCP listener is reachable from other machines (not loopback).
    pub fn is_exposed(&self) -> bool {
        self.bind.is_some_and(|a| !a.ip().to_canonical().is_loopback())
    }
}

/// A backend address as configured: `ip:port` or `host:port`. The configured text is kept as
/// the backend's identity in logs and metric labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    /// An IP literal: dialed directly.
    Ip(SocketAddr),
    /// A host name: resolved at dial time, inside the connect deadline.
    Name { host: String, port: u16 },
}

impl BackendAddr {
    /// Parses `ip:port`, `[v6]:port` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err("port 0 cannot be dialed".into());
            }
            return Ok(BackendAddr::Ip(addr));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| "expected host:port".to_string())?;
        let port: u16 = port.parse().map_err(|_| format!("invalid port {port:?}"))?;
        if port == 0 {
            return Err("port 0 cannot be dialed".into());
        }
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid_host {
            return Err(format!("invalid host {host:?}"));
        }
        Ok(BackendAddr::Name {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Ip(addr) => write!(f, "{addr}"),
            BackendAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {key}: invalid value {value:?}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Reads and validates a TOML file. The single entry point of `fulcrum run` and `fulcrum check`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut config = Config::parse(&text, &path.display().to_string(), base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in error messages. Relative file paths
    /// in it are taken as they are (relative to the working directory).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse(text, origin, Path::new(""))
    }

    fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_string(),
            message: syntax_message(text, &e),
        })?;
        Validator { origin, base }.config(raw)
    }

    /// Worker threads to run: `[runtime] workers`, else one per available core.
    pub fn workers(&self) -> usize {
        self.workers
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, |n| n.get())
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Every file this configuration is made of: the config file itself and each file it names
    /// (certificates, keys, CAs, CRLs, the Redis password file), each once, in config order.
    /// `[reload] watch` watches these. The access log is output, not configuration.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.path.iter().cloned().collect();
        for l in &self.listeners {
            if let Some(t) = &l.tls {
                files.extend(
                    [Some(&t.cert), Some(&t.key), t.client_ca.as_ref(), t.crl.as_ref()]
                        .into_iter()
                        .flatten()
                        .chain(t.trust_domains.values())
                        .cloned(),
                );
            }
        }
        for u in &self.upstreams {
            if let Some(t) = &u.tls {
                files.push(t.ca.clone());
                if let Some((cert, key)) = &t.client_cert {
                    files.extend([cert.clone(), key.clone()]);
                }
            }
        }
        if let Some(shared) = self.rate_limit.as_ref().and_then(|r| r.shared.as_ref()) {
            files.extend(shared.password_file.iter().cloned());
            if let Some(t) = &shared.tls {
                files.extend(t.ca.iter().cloned());
                if let Some((cert, key)) = &t.client_cert {
                    files.extend([cert.clone(), key.clone()]);
                }
            }
        }
        if let Some(admin) = &self.admin {
            files.extend(admin.token_file.iter().cloned());
        }
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(f.clone()));
        files
    }
}

/// The message for a TOML syntax error: toml's own, which quotes the offending line, unless that
/// line may hold a secret (a URL with a password, a `password`/`token`/`secret` key): then only
/// where and what, so that no secret reaches a terminal, a log or a `POST /reload` answer.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let full = e.to_string().trim_end().to_string();
    let Some(span) = e.span() else {
        return full;
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[start..end];
    let lower = line.to_ascii_lowercase();
    let secret = (lower.contains("://") && lower.contains('@'))
        || ["password", "token", "secret"].iter().any(|k| lower.contains(k));
    if !secret {
        return full;
    }
    let line_number = text[..start].matches('\n').count() + 1;
    format!(
        "TOML parse error at line {line_number}: {} (the line is not shown: it may hold a secret)",
        e.message().trim_end()
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    drain_timeout: Option<String>,
    runtime: Option<RawRuntime>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    authorization: std::collections::BTreeMap<String, Vec<String>>,
    rate_limit: Option<RawRateLimit>,
    access_log: Option<RawAccessLog>,
    reload: Option<RawReload>,
    max_connections: Option<usize>,
    dns: Option<RawDns>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    servers: Vec<String>,
}

/// A backend: `"host:port"` or `{ addr = "host:port", weight, max_connections, backup }`.
enum RawBackend {
    Addr(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    addr: String,
    weight: Option<u32>,
    max_connections: Option<u32>,
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

/// `tcp_keepalive = false` (or `true`), or a table of its settings.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawKeepalive {
    Switch(bool),
    Settings(RawKeepaliveSettings),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepaliveSettings {
    idle: Option<String>,
    interval: Option<String>,
    count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    debounce: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: String,
    interim: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    bind: String,
    upstream: String,
    tls: Option<RawTls>,
    #[serde(default)]
    sni: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    alpn: std::collections::BTreeMap<String, String>,
    handshake_timeout: Option<String>,
    rate_limit: Option<RawRateLimitOverride>,
    reject_response: Option<String>,
    #[serde(default)]
    accept_proxy_protocol: bool,
    trusted_proxies: Option<Vec<String>>,
    idle_timeout: Option<String>,
    half_closed_timeout: Option<String>,
    max_lifetime: Option<String>,
    max_lifetime_jitter: Option<String>,
    tcp_keepalive: Option<RawKeepalive>,
    max_connections: Option<usize>,
    max_handshakes_per_source: Option<u32>,
    authorization: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    trust_domains: std::collections::BTreeMap<String, PathBuf>,
    min_version: Option<String>,
    crl: Option<PathBuf>,
    close_on_expiry: Option<bool>,
    identity_from_cn: Option<bool>,
    session_cache: Option<usize>,
    session_timeout: Option<String>,
    alpn: Option<Vec<String>>,
    alpn_required: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    // Optional only so that a lone `[rate_limit.shared]` gets a clear message.
    capacity: Option<u32>,
    window: Option<String>,
    max_concurrent: Option<u32>,
    max_clients: Option<usize>,
    #[serde(default)]
    clients: HashMap<String, u32>,
    shared: Option<RawSharedRateLimit>,
    ipv4_prefix: Option<u8>,
    ipv6_prefix: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedRateLimit {
    redis: String,
    password_file: Option<PathBuf>,
    tls: Option<RawRedisTls>,
    key_prefix: Option<String>,
    timeout: Option<String>,
    on_unavailable: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedisTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimitOverride {
    capacity: Option<u32>,
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    backends: Option<Vec<RawBackend>>,
    discover: Option<String>,
    discover_interval: Option<String>,
    discover_max_backends: Option<usize>,
    queue_size: Option<usize>,
    queue_timeout: Option<String>,
    connect_timeout: Option<String>,
    connect_attempts: Option<usize>,
    health_check: Option<RawHealthCheck>,
    proxy_protocol: Option<String>,
    tls: Option<RawUpstreamTls>,
    tcp_keepalive: Option<RawKeepalive>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: PathBuf,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    alpn: Option<RawUpstreamAlpn>,
}

/// `alpn = "client"` or `alpn = ["h2", ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawUpstreamAlpn {
    Client(String),
    Fixed(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    send: Option<String>,
    expect: Option<String>,
    on_down: Option<String>,
    slow_start: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Option<String>,
    socket: Option<PathBuf>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    metrics_auth: bool,
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

/// Turns raw structs into typed ones; carries the origin for error messages.
struct Validator<'a> {
    origin: &'a str,
    base: &'a Path,
}

impl Validator<'_> {
    fn invalid(
        &self,
        key: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let workers = match raw.runtime.as_ref().and_then(|r| r.workers) {
            Some(n) if !(1..=MAX_WORKERS).contains(&n) => {
                return Err(self.invalid("runtime.workers", n, format!("must be 1 to {MAX_WORKERS}")))
            }
            Some(n) => std::num::NonZeroUsize::new(n),
            None => None,
        };
        let drain_timeout = match &raw.drain_timeout {
            Some(text) => self.duration("drain_timeout", text)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let source_prefixes = match &raw.rate_limit {
            Some(r) => self.source_prefixes(r)?,
            None => SourcePrefixes::default(),
        };
        let rate_limit = match raw.rate_limit {
            Some(r) => Some(self.rate_limit(r)?),
            None => None,
        };
        let dns = self.dns(raw.dns)?;
        let mut upstreams = Vec::with_capacity(raw.upstream.len());
        for (i, u) in raw.upstream.into_iter().enumerate() {
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
        if raw.listener.is_empty() {
            return Err(self.invalid("listener", "[]", "at least one [[listener]] is required"));
        }
        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listener.len());
        for (i, l) in raw.listener.into_iter().enumerate() {
            let key = |field: &str| format!("listener[{i}] ({:?}).{field}", l.name);
            self.name(&key("name"), &l.name)?;
            if listeners.iter().any(|o| o.name == l.name) {
                return Err(self.invalid(key("name"), &l.name, "duplicate listener name"));
            }
            let bind = self.socket_addr(&key("bind"), &l.bind)?;
            if bind.port() != 0 && listeners.iter().any(|o| o.bind == bind) {
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
                Some(t) => Some(self.tls(&key("tls"), t)?),
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
            let rate_limit = match (l.rate_limit, &rate_limit) {
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
                Some(list) => list
                    .iter()
                    .map(|text| {
                        IpNet::parse(text)
                            .map_err(|reason| self.invalid(key("trusted_proxies"), text, reason))
                    })
                    .collect::<Result<_, _>>()?,
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
                Some(0) => {
                    return Err(self.invalid(key("max_handshakes_per_source"), 0, "must be at least 1"))
                }
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
                Some(table) => Some(self.authorization(&key("authorization"), table, &upstreams)?),
                None => None,
            };
            listeners.push(ListenerConfig {
                name: l.name,
                authorization,
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
            });
        }
        let authorization = self.authorization("authorization", raw.authorization, &upstreams)?;
        let admin = match raw.admin {
            Some(a) => Some(self.admin(a)?),
            None => None,
        };
        let access_log_interim = match raw.access_log.as_ref().and_then(|a| a.interim.as_deref()) {
            Some(text) => match self.duration_or_off("access_log.interim", text)? {
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(self.invalid(
                        "access_log.interim",
                        text,
                        "must be at least 1s (or \"0s\" for none)",
                    ))
                }
                other => other,
            },
            None => None,
        };
        let access_log = match raw.access_log {
            Some(a) => Some(self.access_log(a)?),
            None => None,
        };
        let reload = match raw.reload {
            Some(r) => ReloadConfig {
                watch: r.watch.unwrap_or(false),
                debounce: match &r.debounce {
                    Some(text) => self.duration("reload.debounce", text)?,
                    None => DEFAULT_WATCH_DEBOUNCE,
                },
            },
            None => ReloadConfig::default(),
        };
        let max_connections = match raw.max_connections {
            Some(0) => return Err(self.invalid("max_connections", 0, "must be at least 1")),
            other => other,
        };
        Ok(Config {
            origin: self.origin.to_string(),
            path: None,
            listeners,
            upstreams,
            admin,
            drain_timeout,
            workers,
            authorization,
            rate_limit,
            access_log,
            access_log_interim,
            reload,
            max_connections,
            source_prefixes,
            dns,
        })
    }

    fn admin(&self, a: RawAdmin) -> Result<AdminConfig, ConfigError> {
        if a.bind.is_none() && a.socket.is_none() {
            return Err(self.invalid(
                "admin",
                "[admin]",
                "give bind (a TCP address), socket (a Unix socket path), or both",
            ));
        }
        let bind = match &a.bind {
            Some(text) => Some(self.socket_addr("admin.bind", text)?),
            None => None,
        };
        let (token, token_file) = match a.token_file {
            Some(path) => {
                let path = self.base.join(path);
                (
                    Some(self.secret_file("admin.token_file", &path, "token")?),
                    Some(path),
                )
            }
            None => (None, None),
        };
        if a.metrics_auth && token.is_none() {
            return Err(self.invalid("admin.metrics_auth", "true", "needs token_file"));
        }
        let mut allowed_hosts = Vec::with_capacity(a.allowed_hosts.len());
        for host in a.allowed_hosts {
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .split('.')
                    .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            if !valid {
                return Err(self.invalid(
                    "admin.allowed_hosts",
                    &host,
                    "expected a host name (no port, no scheme)",
                ));
            }
            allowed_hosts.push(host.to_ascii_lowercase());
        }
        Ok(AdminConfig {
            bind,
            socket: a.socket.map(|p| self.base.join(p)),
            token,
            token_file,
            metrics_auth: a.metrics_auth,
            allowed_hosts,
        })
    }

    fn source_prefixes(&self, r: &RawRateLimit) -> Result<SourcePrefixes, ConfigError> {
        let prefix = |key: &str, value: Option<u8>, max: u8, default: u8| match value {
            Some(p) if p == 0 || p > max => Err(self.invalid(key, p, format!("must be 1 to {max}"))),
            Some(p) => Ok(p),
            None => Ok(default),
        };
        Ok(SourcePrefixes {
            ipv4: prefix("rate_limit.ipv4_prefix", r.ipv4_prefix, 32, DEFAULT_IPV4_PREFIX)?,
            ipv6: prefix("rate_limit.ipv6_prefix", r.ipv6_prefix, 128, DEFAULT_IPV6_PREFIX)?,
        })
    }

    /// `tcp_keepalive`: absent or `true` is on with defaults, `false` is off, a table overrides.
    fn keepalive(&self, key: &str, raw: Option<RawKeepalive>) -> Result<Option<Keepalive>, ConfigError> {
        let defaults = Keepalive::default();
        match raw {
            None | Some(RawKeepalive::Switch(true)) => Ok(Some(defaults)),
            Some(RawKeepalive::Switch(false)) => Ok(None),
            Some(RawKeepalive::Settings(t)) => {
                let duration = |field: &str, text: &Option<String>, default| match text {
                    Some(text) => self.duration(&format!("{key}.{field}"), text),
                    None => Ok(default),
                };
                let count = match t.count {
                    Some(0) => return Err(self.invalid(format!("{key}.count"), 0, "must be at least 1")),
                    Some(n) => n,
                    None => defaults.count,
                };
                Ok(Some(Keepalive {
                    idle: duration("idle", &t.idle, defaults.idle)?,
                    interval: duration("interval", &t.interval, defaults.interval)?,
                    count,
                }))
            }
        }
    }

    fn rate_limit(&self, r: RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
        let capacity = match (r.capacity, &r.shared, &r.window) {
            (Some(c), _, _) => c,
            (None, Some(_), None) => {
                return Err(self.invalid(
                    "rate_limit.shared",
                    "[rate_limit.shared]",
                    "needs [rate_limit] with capacity and window",
                ))
            }
            (None, _, _) => return Err(self.invalid("rate_limit.capacity", "", "required")),
        };
        let window = match &r.window {
            Some(text) => self.duration("rate_limit.window", text)?,
            None => return Err(self.invalid("rate_limit.window", "", "required")),
        };
        let max_clients = match r.max_clients {
            Some(0) => return Err(self.invalid("rate_limit.max_clients", 0, "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_CLIENTS,
        };
        Ok(RateLimitConfig {
            policy: RateLimitPolicy {
                capacity,
                window,
                max_concurrent: r.max_concurrent,
                max_clients,
                overrides: r.clients,
            },
            shared: match r.shared {
                Some(shared) => Some(self.shared_rate_limit(shared)?),
                None => None,
            },
        })
    }

    /// A listener's own policy: its `capacity`/`window` over the global rest (or, without a
    /// global `[rate_limit]`, a 1 s window and no other limit).
    fn listener_rate_limit(
        &self,
        key: &dyn Fn(&str) -> String,
        own: RawRateLimitOverride,
        global: &Option<RateLimitConfig>,
    ) -> Result<RateLimitPolicy, ConfigError> {
        let base = match global {
            Some(global) => global.policy.clone(),
            None if own.capacity.is_none() => {
                return Err(self.invalid(
                    key("rate_limit.capacity"),
                    "(missing)",
                    "required when there is no global [rate_limit]",
                ))
            }
            None => RateLimitPolicy {
                capacity: 0,
                window: Duration::from_secs(1),
                max_concurrent: None,
                max_clients: DEFAULT_MAX_CLIENTS,
                overrides: HashMap::new(),
            },
        };
        let window = match &own.window {
            Some(text) => self.duration(&key("rate_limit.window"), text)?,
            None => base.window,
        };
        Ok(RateLimitPolicy {
            capacity: own.capacity.unwrap_or(base.capacity),
            window,
            ..base
        })
    }

    fn shared_rate_limit(&self, raw: RawSharedRateLimit) -> Result<SharedRateLimitConfig, ConfigError> {
        const KEY: &str = "rate_limit.shared.redis";
        // Echoed in errors only without its password.
        let shown = redact_url(&raw.redis);
        let is_tls = raw.redis.starts_with("rediss://");
        if !is_tls && !raw.redis.starts_with("redis://") {
            return Err(self.invalid(KEY, &shown, "expected a redis:// or rediss:// (TLS) URL"));
        }
        let info = match redis::IntoConnectionInfo::into_connection_info(raw.redis.as_str()) {
            Ok(info) => info,
            Err(e) => return Err(self.invalid(KEY, &shown, e.to_string())),
        };
        if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            return Err(self.invalid(
                KEY,
                &shown,
                "#insecure (no certificate verification) is not supported; trust a private CA with \
                 [rate_limit.shared.tls] ca",
            ));
        }
        let password = match raw.password_file {
            None => None,
            Some(_) if info.redis_settings().password().is_some() => {
                return Err(self.invalid(
                    "rate_limit.shared.password_file",
                    &shown,
                    "give the password in the URL or in password_file, not both",
                ))
            }
            Some(path) => Some((self.password_file(&self.base.join(&path))?, self.base.join(path))),
        };
        let (password, password_file) = match password {
            Some((secret, path)) => (Some(secret), Some(path)),
            None => (None, None),
        };
        let tls = match raw.tls {
            None => None,
            Some(_) if !is_tls => {
                return Err(self.invalid(
                    "rate_limit.shared.tls",
                    &shown,
                    "[rate_limit.shared.tls] needs a rediss:// URL",
                ))
            }
            Some(t) => Some(RedisTlsConfig {
                ca: t.ca.map(|ca| self.base.join(ca)),
                client_cert: self.client_cert("rate_limit.shared.tls", t.cert, t.key)?,
            }),
        };
        let timeout = match &raw.timeout {
            Some(text) => self.duration("rate_limit.shared.timeout", text)?,
            None => DEFAULT_SHARED_TIMEOUT,
        };
        let on_unavailable = match raw.on_unavailable.as_deref() {
            None | Some("local") => OnUnavailable::Local,
            Some("allow") => OnUnavailable::Allow,
            Some("deny") => OnUnavailable::Deny,
            Some(other) => {
                return Err(self.invalid(
                    "rate_limit.shared.on_unavailable",
                    other,
                    "expected \"local\", \"allow\" or \"deny\"",
                ))
            }
        };
        Ok(SharedRateLimitConfig {
            redis: raw.redis,
            password,
            tls,
            key_prefix: raw
                .key_prefix
                .unwrap_or_else(|| DEFAULT_SHARED_KEY_PREFIX.to_owned()),
            timeout,
            on_unavailable,
            password_file,
        })
    }

    /// The password in `path`, without trailing whitespace (a final newline above all).
    fn password_file(&self, path: &Path) -> Result<Secret, ConfigError> {
        self.secret_file("rate_limit.shared.password_file", path, "password")
    }

    /// The secret (`what`) in the file `path` names for `key`, without trailing whitespace. A file
    /// [`too_open`](Validator::too_open) is refused, as ssh refuses a readable private key: the
    /// mode judged is the opened file's (fstat), not that of whatever the path names a moment later.
    fn secret_file(&self, key: &str, path: &Path, what: &str) -> Result<Secret, ConfigError> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let unreadable =
            |e: std::io::Error| self.invalid(key, path.display(), format!("cannot read the file: {e}"));
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let meta = file.metadata().map_err(unreadable)?;
        let mode = meta.mode() & 0o7777;
        if Validator::too_open(mode, meta.uid()) {
            return Err(self.invalid(
                key,
                path.display(),
                format!(
                    "the file is readable by group or others (mode {mode:04o}); chmod 600 it \
                     (only a file owned by root may keep group read, 640)"
                ),
            ));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(unreadable)?;
        let secret = text.trim_end();
        if secret.is_empty() {
            return Err(self.invalid(key, path.display(), format!("the file holds no {what}")));
        }
        Ok(Secret(secret.to_owned()))
    }

    /// Whether a secret file of `mode` owned by user `owner` is readable by more than it should
    /// be: by others, always; by its group, unless root owns it. A group-readable file of one's
    /// own is usually a umask accident (002, 027), whereas root handing a file to a service's
    /// group is deliberate: Kubernetes mounts a Secret root-owned, 0440, group `fsGroup`
    /// (deploy/kubernetes), as Debian's `ssl-cert` group does for keys (PostgreSQL's rule).
    fn too_open(mode: u32, owner: u32) -> bool {
        mode & 0o004 != 0 || (mode & 0o040 != 0 && owner != 0)
    }

    /// A client certificate and its key, given together or not at all (`key` names the table).
    fn client_cert(
        &self,
        key: &str,
        cert: Option<PathBuf>,
        private_key: Option<PathBuf>,
    ) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
        match (cert, private_key) {
            (Some(cert), Some(private_key)) => Ok(Some((self.base.join(cert), self.base.join(private_key)))),
            (None, None) => Ok(None),
            _ => Err(self.invalid(key, "cert/key", "give both cert and key, or neither")),
        }
    }

    fn access_log(&self, raw: RawAccessLog) -> Result<AccessLogConfig, ConfigError> {
        match raw.path.as_str() {
            "" => Err(self.invalid("access_log.path", "", "expected \"stdout\" or a file path")),
            "stdout" => Ok(AccessLogConfig::Stdout),
            path => Ok(AccessLogConfig::File(self.base.join(path))),
        }
    }

    fn tls(&self, key: &str, raw: RawTls) -> Result<TlsConfig, ConfigError> {
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => TlsVersion::Tls12,
            Some("1.3") => TlsVersion::Tls13,
            Some(other) => {
                return Err(self.invalid(format!("{key}.min_version"), other, "expected \"1.2\" or \"1.3\""))
            }
        };
        for (domain, path) in &raw.trust_domains {
            if let Err(why) = trust_domain_name(domain) {
                return Err(self.invalid(format!("{key}.trust_domains"), domain, why));
            }
            if path.as_os_str().is_empty() {
                return Err(self.invalid(
                    format!("{key}.trust_domains.{domain:?}"),
                    "",
                    "expected a PEM bundle file",
                ));
            }
        }
        if raw.client_ca.is_none() && raw.trust_domains.is_empty() {
            // Settings of client authentication, given without it: surely a mistake.
            let mtls_only = [
                ("crl", raw.crl.as_ref().map(|p| p.display().to_string())),
                ("close_on_expiry", raw.close_on_expiry.map(|b| b.to_string())),
                ("identity_from_cn", raw.identity_from_cn.map(|b| b.to_string())),
            ];
            if let Some((field, Some(value))) = mtls_only.into_iter().find(|(_, v)| v.is_some()) {
                return Err(self.invalid(
                    format!("{key}.{field}"),
                    value,
                    "needs client_ca or trust_domains (mutual TLS)",
                ));
            }
        }
        let session_timeout = match &raw.session_timeout {
            Some(text) => self.duration(&format!("{key}.session_timeout"), text)?,
            None => DEFAULT_SESSION_TIMEOUT,
        };
        let alpn = self.alpn_list(&format!("{key}.alpn"), raw.alpn.unwrap_or_default())?;
        let alpn_required = raw.alpn_required.unwrap_or(false);
        if alpn_required && alpn.is_empty() {
            return Err(self.invalid(
                format!("{key}.alpn_required"),
                "true",
                "needs alpn (the protocols to offer)",
            ));
        }
        Ok(TlsConfig {
            cert: self.base.join(raw.cert),
            key: self.base.join(raw.key),
            client_ca: raw.client_ca.map(|p| self.base.join(p)),
            trust_domains: raw
                .trust_domains
                .into_iter()
                .map(|(domain, path)| (domain, self.base.join(path)))
                .collect(),
            min_version,
            crl: raw.crl.map(|p| self.base.join(p)),
            close_on_expiry: raw.close_on_expiry.unwrap_or(true),
            identity_from_cn: raw.identity_from_cn.unwrap_or(true),
            session_cache: raw.session_cache.unwrap_or(DEFAULT_SESSION_CACHE),
            session_timeout,
            alpn,
            alpn_required,
        })
    }

    /// `[authorization]` or a listener's own: every upstream named must exist.
    fn authorization(
        &self,
        key: &str,
        raw: std::collections::BTreeMap<String, Vec<String>>,
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut authorization = Vec::with_capacity(raw.len());
        for (identity, allowed) in raw {
            if let Some(missing) = allowed.iter().find(|a| !upstreams.iter().any(|u| u.name == **a)) {
                return Err(self.invalid(
                    format!("{key}.{identity:?}"),
                    missing,
                    "no [[upstream]] has this name",
                ));
            }
            authorization.push((identity, allowed));
        }
        Ok(authorization)
    }

    /// ALPN protocol ids: 1 to 255 bytes each (RFC 7301), no duplicates.
    fn alpn_list(&self, key: &str, list: Vec<String>) -> Result<Vec<String>, ConfigError> {
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        for id in list {
            if id.is_empty() || id.len() > 255 {
                return Err(self.invalid(key, &id, "an ALPN protocol id is 1 to 255 bytes"));
            }
            if out.contains(&id) {
                return Err(self.invalid(key, &id, "listed twice"));
            }
            out.push(id);
        }
        Ok(out)
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
                ca: self.base.join(t.ca),
                client_cert: self.client_cert(&key("tls"), t.cert, t.key)?,
                server_name: t.server_name,
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

    fn dns(&self, raw: Option<RawDns>) -> Result<DnsConfig, ConfigError> {
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

    fn health_check(&self, key: &str, raw: RawHealthCheck) -> Result<HealthCheckConfig, ConfigError> {
        let key = |field: &str| format!("{key}.{field}");
        let interval = match &raw.interval {
            Some(text) => self.duration(&key("interval"), text)?,
            None => DEFAULT_HEALTH_INTERVAL,
        };
        let timeout = match &raw.timeout {
            Some(text) => {
                let timeout = self.duration(&key("timeout"), text)?;
                if timeout > interval {
                    return Err(self.invalid(
                        key("timeout"),
                        text,
                        format!(
                            "must not exceed interval ({})",
                            humantime::format_duration(interval)
                        ),
                    ));
                }
                timeout
            }
            None => DEFAULT_HEALTH_TIMEOUT.min(interval),
        };
        let count = |field: &str, value: Option<u32>, default: u32| match value {
            Some(0) => Err(self.invalid(key(field), 0, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let on_down = match raw.on_down.as_deref() {
            None | Some("keep") => OnDown::Keep,
            Some("close") => OnDown::Close,
            Some(other) => return Err(self.invalid(key("on_down"), other, "expected \"keep\" or \"close\"")),
        };
        let slow_start = match &raw.slow_start {
            Some(text) => Some(self.duration(&key("slow_start"), text)?),
            None => None,
        };
        Ok(HealthCheckConfig {
            active: true,
            interval,
            timeout,
            rise: count("rise", raw.rise, DEFAULT_HEALTH_RISE)?,
            fall: count("fall", raw.fall, DEFAULT_HEALTH_FALL)?,
            send: raw.send.map(String::into_bytes).unwrap_or_default(),
            expect: raw.expect.map(String::into_bytes).unwrap_or_default(),
            on_down,
            slow_start,
        })
    }

    /// Names end up in metric labels and log fields: keep them plain.
    fn name(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(())
        } else {
            Err(self.invalid(key, name, "names are 1-64 characters of A-Z a-z 0-9 - _ ."))
        }
    }

    fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse()
            .map_err(|_| self.invalid(key, text, "expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080"))
    }

    /// A duration where zero (`"0s"`) means "off".
    fn duration_or_off(&self, key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
        let d = humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                text,
                format!("{e} (expected e.g. \"30s\", \"1h\", or \"0s\" for off)"),
            )
        })?;
        self.at_most_max(key, text, d)?;
        Ok((!d.is_zero()).then_some(d))
    }

    /// Every duration key is bounded, so that no deadline made from one is out of any clock's
    /// range.
    fn at_most_max(&self, key: &str, text: &str, d: Duration) -> Result<(), ConfigError> {
        if d > MAX_DURATION {
            return Err(self.invalid(key, text, "must be at most 10 years (\"3650d\")"));
        }
        Ok(())
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                text,
                format!("{e} (expected e.g. \"250ms\", \"2s\", \"1m\")"),
            )
        })?;
        if d.is_zero() {
            return Err(self.invalid(key, text, "must be greater than zero"));
        }
        self.at_most_max(key, text, d)?;
        Ok(d)
    }
}

/// Checks a SPIFFE trust domain name: lowercase letters, digits, `.`, `-` and `_` (the SPIFFE
/// ID specification), 1 to 255 characters.
fn trust_domain_name(name: &str) -> Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if name.is_empty() || name.len() > 255 {
        return Err("a trust domain name is 1 to 255 characters");
    }
    if !name.chars().all(allowed) {
        return Err(
            "a trust domain name has only lowercase letters, digits, '.', '-' and '_' (no scheme, no path)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
