//! `[listener.tls]`: [`TlsConfig`] (the fallback certificate, client trust, versions, sessions,
//! the certificate entries chosen by SNI, CRL fetching, key exchange), the raw table it is read
//! from, its defaults and its rules.
//!
//! This file must not load a certificate (`tls` does); the entries and the client trust keys
//! they share come from `certificate.rs`, the CRL fetching keys from `crl_fetch.rs`,
//! `key_exchange` from `key_exchange.rs`, value parsers from `values.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::certificate::{select, CertificateConfig, ClientTrust, RawCertificate, TrustFiles};
use super::crl_fetch::{CrlFetch, RawCrlFetch};
use super::key_exchange::KeyExchange;
use super::spiffe::TlsSource;
use super::upstream::UpstreamConfig;
use super::values::{ConfigError, Validator};

/// Default `[listener.tls] session_cache`: TLS sessions a listener remembers for resumption.
pub const DEFAULT_SESSION_CACHE: usize = 256;

/// Default `[listener.tls] session_timeout`: how long a session may be resumed.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

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

/// `[listener.tls]`: TLS terminated on the listener, and client certificates (mTLS).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
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
    /// `[listener.tls]` at `key`, its certificate entries naming only `upstreams`.
    pub(super) fn tls(
        &self,
        key: &str,
        raw: RawTls,
        upstreams: &[UpstreamConfig],
    ) -> Result<TlsConfig, ConfigError> {
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
