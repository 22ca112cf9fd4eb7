//! The `[[listener]]` section: [`ListenerConfig`] and its `[listener.tls]` ([`TlsConfig`]), the
//! raw tables they are read from, their defaults, and every rule about a valid listener (unique
//! name and address, known upstreams in `upstream`, `sni`, `alpn` and `authorization`, PROXY
//! header fronts, connection bounds, TLS settings).
//!
//! A listener key is added here (its raw field, its typed field, its rule), in the model that
//! uses it and in the README, nowhere else in `config`. This file must not validate another
//! section: the global rate limit and the listener's own come from `ratelimit.rs`, value parsers
//! from `values.rs`, the `[[listener.tls.certificate]]` entries (and the client trust keys they
//! share with `[listener.tls]`) from `certificate.rs`, the CRL fetching keys from `crl_fetch.rs`,
//! `key_exchange` from `key_exchange.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::authorization::{AuthorizationConfig, RawAuthorization};
use super::certificate::{select, CertificateConfig, ClientTrust, RawCertificate, TrustFiles};
use super::crl_fetch::{CrlFetch, RawCrlFetch};
use super::key_exchange::KeyExchange;
use super::ratelimit::{ListenerLimit, RateLimitConfig, RawRateLimitOverride};
use super::spiffe::TlsSource;
use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Keepalive, RawKeepalive, Validator};
use crate::addr::IpNet;

/// Default deadline for a client's TLS handshake, from accept to the end of the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[[listener]] idle_timeout`: a connection silent both ways this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `[[listener]] max_handshakes_per_source`.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 32;
/// Default `[listener.tls] session_cache`: TLS sessions a listener remembers for resumption.
pub const DEFAULT_SESSION_CACHE: usize = 256;
/// Default `[listener.tls] session_timeout`: how long a session may be resumed.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

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

/// TLS settings of a listener. Paths are resolved against the config file's directory.
///
/// `cert`, `key`, `client_ca`, `trust_domains` and `crl` are the **fallback**: what a client
/// whose SNI names no `certificates` entry (or who sends none) is served and judged with. That
/// is `[listener.tls]`'s own, or, when an entry has `default = true`, that entry's (then also in
/// `certificates`). Every certificate of a listener verifies clients, or none does.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// `source`: files (the default) or the Workload API, whose X509-SVID is then the
    /// certificate and key and whose bundles, one per trust domain, the client trust (`cert`,
    /// `key`, `client_ca`, `trust_domains`, `crl` and certificate entries are then empty).
    pub source: TlsSource,
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
    pub trust_domains: BTreeMap<String, PathBuf>,
    pub min_version: TlsVersion,
    /// PEM file of CRLs (mTLS only): a client certificate they revoke is refused. Each CRL must
    /// be signed by a certificate of `client_ca`.
    pub crl: Option<PathBuf>,
    /// `[[listener.tls.certificate]]`: certificates chosen by the client's SNI, each with its
    /// client trust and maybe its own authorization, in config order (empty: one certificate).
    pub certificates: Vec<CertificateConfig>,
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
    /// `key_exchange`: the key exchange groups offered, in the listener's order of preference,
    /// which wins over the client's (every certificate entry uses it).
    pub key_exchange: KeyExchange,
    /// `crl_urls`, `crl_from_certificates` and their settings: CRLs fetched over HTTP for the
    /// fallback's client trust (and every entry sharing it), beside `crl`. `None`: no fetching.
    pub crl_fetch: Option<CrlFetch>,
}

impl TlsConfig {
    /// TLS with `cert` and `key`, no client authentication, and every other setting at its
    /// default (as a `[listener.tls]` table with only those two keys).
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            source: TlsSource::Files,
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            trust_domains: BTreeMap::new(),
            min_version: TlsVersion::Tls12,
            crl: None,
            close_on_expiry: true,
            identity_from_cn: true,
            session_cache: DEFAULT_SESSION_CACHE,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            alpn: Vec::new(),
            alpn_required: false,
            key_exchange: KeyExchange::Default,
            certificates: Vec::new(),
            crl_fetch: None,
        }
    }

    /// The fallback's client trust (see [`TlsConfig`]).
    pub fn trust(&self) -> TrustFiles<'_> {
        TrustFiles::of(&self.client_ca, &self.trust_domains, &self.crl)
    }

    /// Whether clients must present a certificate (mTLS): the fallback's trust says, and every
    /// entry's agrees (config validation).
    pub fn verifies_clients(&self) -> bool {
        self.source.is_spiffe() || self.trust().verifies_clients()
    }

    /// The entry a client that sent `server_name` is served by ([`select`]); `None`: the
    /// fallback (which may be the default entry).
    pub fn certificate_for(&self, server_name: Option<&str>) -> Option<&CertificateConfig> {
        let names = self.certificates.iter().map(|c| c.server_names.as_slice());
        select(names, server_name).and_then(|i| self.certificates.get(i))
    }

    /// Every file these settings name: the fallback's, then each entry's.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        let from_files = !self.source.is_spiffe();
        let fallback = [
            Some(&self.cert).filter(|_| from_files),
            Some(&self.key).filter(|_| from_files),
            self.client_ca.as_ref(),
            self.crl.as_ref(),
        ];
        let entries = self.certificates.iter().flat_map(|c| {
            [Some(&c.cert), Some(&c.key), c.client_ca.as_ref(), c.crl.as_ref()]
                .into_iter()
                .flatten()
                .chain(c.trust_domains.values())
        });
        fallback
            .into_iter()
            .flatten()
            .chain(self.trust_domains.values())
            .chain(entries)
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

/// `[listener.tls]`: TLS terminated on the listener, and client certificates (mTLS).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// "files" (the keys below name PEM files) or "spiffe" (certificate, key and client trust
    /// from the SPIFFE Workload API; then no cert, key, client_ca, trust_domains, crl, crl_*
    /// keys nor certificate entries).
    #[schemars(extend("default" = "files", "enum" = ["files", "spiffe"]))]
    source: Option<String>,
    /// With `source = "spiffe"` only: the SPIFFE ID (no pattern) of the SVID to serve; default
    /// the Workload API's first.
    svid: Option<String>,
    /// PEM certificate chain, leaf first; required unless a certificate entry has
    /// `default = true` (then refused).
    cert: Option<PathBuf>,
    /// PEM key (PKCS#8, PKCS#1 or SEC1) matching `cert`.
    key: Option<PathBuf>,
    /// PEM file of CA certificates: with it (or `trust_domains`) client certificates are required
    /// and verified (mTLS).
    client_ca: Option<PathBuf>,
    /// Trust domain -> PEM bundle: a client's SPIFFE ID of that trust domain must chain to it.
    #[serde(default)]
    trust_domains: BTreeMap<String, PathBuf>,
    /// Lowest TLS version accepted.
    #[schemars(extend("default" = "1.2", "enum" = ["1.2", "1.3"]))]
    min_version: Option<String>,
    /// PEM file of CRLs; revoked clients are refused; needs `client_ca` or `trust_domains`.
    crl: Option<PathBuf>,
    /// Close a connection when its client certificate expires; needs `client_ca` or
    /// `trust_domains`.
    #[schemars(extend("default" = true))]
    close_on_expiry: Option<bool>,
    /// A client certificate without a SPIFFE or DNS SAN is named by its CN; needs `client_ca` or
    /// `trust_domains`.
    #[schemars(extend("default" = true))]
    identity_from_cn: Option<bool>,
    /// Sessions kept for resumption; 0 turns resumption off.
    #[schemars(extend("default" = 256))]
    session_cache: Option<usize>,
    /// Duration: how long a session may be resumed.
    #[schemars(extend("default" = "5m"))]
    session_timeout: Option<String>,
    /// Protocol ids offered by ALPN (1 to 255 bytes, none twice), preferred first; default none.
    alpn: Option<Vec<String>>,
    /// `true` refuses clients that offer no ALPN at all; needs `alpn`.
    #[schemars(extend("default" = false))]
    alpn_required: Option<bool>,
    /// Key exchange groups offered, most preferred first, the listener's order winning:
    /// X25519MLKEM768 (hybrid post-quantum, not in a ring build), X25519, secp256r1 (P-256),
    /// secp384r1 (P-384), in any case; at least one, none twice. A ring build's default lacks
    /// the first.
    #[schemars(length(min = 1), extend("default" = ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]))]
    key_exchange: Option<Vec<String>>,
    /// CRLs fetched from these `http://host[:port]/path` URLs (no https, no user@), none twice,
    /// at most 16; needs `client_ca` or `trust_domains`.
    #[schemars(length(max = 16))]
    crl_urls: Option<Vec<String>>,
    /// `true` also fetches the http:// CRL distribution points of the `client_ca` certificates,
    /// after `crl_urls`, up to 16 URLs in all; needs `client_ca` or `trust_domains`.
    #[schemars(extend("default" = false))]
    crl_from_certificates: Option<bool>,
    /// Duration, at least "1s": the longest wait between two fetches of one CRL URL; needs
    /// `crl_urls` or `crl_from_certificates`, as do `crl_max_size`, `crl_timeout` and
    /// `crl_cache_dir`.
    #[schemars(extend("default" = "1h"))]
    crl_refresh: Option<String>,
    /// Bytes, at least 1: a larger CRL body is refused.
    #[schemars(range(min = 1), extend("default" = 10485760))]
    crl_max_size: Option<u64>,
    /// Duration: the deadline of one CRL fetch, connect to last byte.
    #[schemars(extend("default" = "10s"))]
    crl_timeout: Option<String>,
    /// Directory (created, mode 0700) keeping the last good CRL of each URL, read at start.
    crl_cache_dir: Option<PathBuf>,
    /// `[[listener.tls.certificate]]`: more certificates, chosen by the client's SNI.
    #[serde(default)]
    certificate: Vec<RawCertificate>,
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

    /// `[listener.tls]` at `key`, its certificate entries naming only `upstreams`.
    fn tls(&self, key: &str, raw: RawTls, upstreams: &[UpstreamConfig]) -> Result<TlsConfig, ConfigError> {
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => TlsVersion::Tls12,
            Some("1.3") => TlsVersion::Tls13,
            Some(other) => {
                return Err(self.invalid(format!("{key}.min_version"), other, "expected \"1.2\" or \"1.3\""))
            }
        };
        let source = self.tls_source(key, raw.source.as_deref(), raw.svid.clone())?;
        if source.is_spiffe() {
            let files = [
                ("cert", raw.cert.is_some()),
                ("key", raw.key.is_some()),
                ("client_ca", raw.client_ca.is_some()),
                ("trust_domains", !raw.trust_domains.is_empty()),
                ("crl", raw.crl.is_some()),
                ("crl_urls", raw.crl_urls.is_some()),
                ("crl_from_certificates", raw.crl_from_certificates.is_some()),
                ("certificate", !raw.certificate.is_empty()),
            ];
            self.no_files_with_spiffe(key, &files)?;
        }
        let listener_trust = ClientTrust {
            client_ca: raw.client_ca.map(|p| self.base.join(p)),
            trust_domains: self.trust_domains(&format!("{key}.trust_domains"), raw.trust_domains)?,
            crl: raw.crl.map(|p| self.base.join(p)),
        };
        if let Some(crl) = listener_trust
            .crl
            .as_ref()
            .filter(|_| !listener_trust.files().verifies_clients())
        {
            return Err(self.invalid(
                format!("{key}.crl"),
                crl.display(),
                "needs client_ca or trust_domains (mutual TLS)",
            ));
        }
        let crl_fetch = RawCrlFetch {
            urls: raw.crl_urls,
            from_certificates: raw.crl_from_certificates,
            refresh: raw.crl_refresh,
            max_size: raw.crl_max_size,
            timeout: raw.crl_timeout,
            cache_dir: raw.crl_cache_dir,
        };
        let certificates = self.certificates(key, raw.certificate, &listener_trust, upstreams)?;
        let (cert, private_key, fallback) = match source.is_spiffe() {
            false => self.fallback(key, (raw.cert, raw.key), &listener_trust, &certificates)?,
            true => (PathBuf::new(), PathBuf::new(), listener_trust.clone()),
        };
        let crl_fetch = self.crl_fetch(key, crl_fetch, fallback.files().verifies_clients())?;
        if !fallback.files().verifies_clients() && !source.is_spiffe() {
            // Settings of client authentication, given without it: surely a mistake.
            let mtls_only = [
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
        let key_exchange = self.key_exchange(&format!("{key}.key_exchange"), raw.key_exchange)?;
        Ok(TlsConfig {
            source,
            cert,
            key: private_key,
            client_ca: fallback.client_ca,
            trust_domains: fallback.trust_domains,
            min_version,
            crl: fallback.crl,
            close_on_expiry: raw.close_on_expiry.unwrap_or(true),
            identity_from_cn: raw.identity_from_cn.unwrap_or(true),
            session_cache: raw.session_cache.unwrap_or(DEFAULT_SESSION_CACHE),
            session_timeout,
            alpn,
            alpn_required,
            key_exchange,
            certificates,
            crl_fetch,
        })
    }
}
