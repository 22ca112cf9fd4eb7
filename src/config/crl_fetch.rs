//! `[listener.tls]`'s CRL fetching keys (`crl_urls`, `crl_from_certificates`, `crl_refresh`,
//! `crl_max_size`, `crl_timeout`, `crl_cache_dir`): [`CrlFetch`], their defaults and bounds, and
//! the rule of a valid CRL URL ([`crl_url`], which the fetcher applies to distribution points
//! found in certificates too). Pure: it fetches nothing (`crl_fetch` does) and must not decide
//! the other `[listener.tls]` keys (`listener.rs` does, and hands these over).

use std::path::PathBuf;
use std::time::Duration;

use super::values::{ConfigError, Validator};

/// Default `[listener.tls] crl_refresh`: the longest wait between two fetches of a CRL URL.
pub const DEFAULT_CRL_REFRESH: Duration = Duration::from_secs(3600);
/// The shortest `crl_refresh` accepted.
pub const MIN_CRL_REFRESH: Duration = Duration::from_secs(1);
/// Default `[listener.tls] crl_max_size`: a CRL body larger than this is refused (10 MiB).
pub const DEFAULT_CRL_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Default `[listener.tls] crl_timeout`: the deadline of one fetch, connect to last byte.
pub const DEFAULT_CRL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most CRL URLs a listener fetches (`crl_urls` and, after them, those found with
/// `crl_from_certificates`).
pub const MAX_CRL_URLS: usize = 16;

/// CRLs fetched from their distribution points (mTLS only; see `crl_fetch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlFetch {
    /// `crl_urls`: `http://` URLs, in config order, at most [`MAX_CRL_URLS`], no duplicates.
    pub urls: Vec<String>,
    /// `crl_from_certificates`: also fetch the HTTP CRL distribution points of the `client_ca`
    /// certificates (after `urls`, within [`MAX_CRL_URLS`]).
    pub from_certificates: bool,
    /// `crl_refresh`: the longest wait between two fetches of one URL (sooner near the CRL's
    /// `nextUpdate`); at least [`MIN_CRL_REFRESH`].
    pub refresh: Duration,
    /// `crl_max_size`: bytes; a larger body is refused without being read whole.
    pub max_size: u64,
    /// `crl_timeout`: the deadline of one fetch.
    pub timeout: Duration,
    /// `crl_cache_dir`: where each good CRL is kept, read at start before the first fetch.
    pub cache_dir: Option<PathBuf>,
}

/// Checks a CRL URL: `http://host[:port]/path`, no user information. `https` is refused: RFC
/// 5280 distribution points are HTTP, and a CRL is signed, so TLS would add nothing to trust.
pub fn crl_url(text: &str) -> Result<hyper::Uri, &'static str> {
    let uri: hyper::Uri = text
        .parse()
        .map_err(|_| "expected an http:// URL, e.g. \"http://pki.example/ca.crl\"")?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(
            "https is not supported: CRLs are signed, fetch them over http:// (RFC 5280 distribution points)",
        ),
        _ => return Err("expected an http:// URL, e.g. \"http://pki.example/ca.crl\""),
    }
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => Err("user information (user@) is not allowed in a CRL URL"),
        Some(a) if !a.host().is_empty() => Ok(uri),
        _ => Err("the URL names no host"),
    }
}

/// `[listener.tls]`'s CRL fetching keys, as written.
pub(super) struct RawCrlFetch {
    pub(super) urls: Option<Vec<String>>,
    pub(super) from_certificates: Option<bool>,
    pub(super) refresh: Option<String>,
    pub(super) max_size: Option<u64>,
    pub(super) timeout: Option<String>,
    pub(super) cache_dir: Option<PathBuf>,
}

impl Validator<'_> {
    /// The CRL fetching keys of the `[listener.tls]` table at `key` (`mutual`: whether its
    /// fallback verifies clients); `None` without `crl_urls` or `crl_from_certificates`.
    pub(super) fn crl_fetch(
        &self,
        key: &str,
        raw: RawCrlFetch,
        mutual: bool,
    ) -> Result<Option<CrlFetch>, ConfigError> {
        let key = |field: &str| format!("{key}.{field}");
        let from_certificates = raw.from_certificates.unwrap_or(false);
        let urls_given = raw.urls.as_ref().map(|u| format!("{u:?}"));
        let urls = raw.urls.unwrap_or_default();
        if urls.is_empty() && !from_certificates {
            let settings = [
                ("crl_urls", urls_given),
                ("crl_refresh", raw.refresh.clone()),
                ("crl_max_size", raw.max_size.map(|n| n.to_string())),
                ("crl_timeout", raw.timeout.clone()),
                (
                    "crl_cache_dir",
                    raw.cache_dir.as_ref().map(|p| p.display().to_string()),
                ),
            ];
            if let Some((field, Some(value))) = settings.into_iter().find(|(_, v)| v.is_some()) {
                return Err(self.invalid(
                    key(field),
                    value,
                    "needs crl_urls (non-empty) or crl_from_certificates = true",
                ));
            }
            return Ok(None);
        }
        let first = if from_certificates {
            "crl_from_certificates"
        } else {
            "crl_urls"
        };
        if !mutual {
            return Err(self.invalid(key(first), "..", "needs client_ca or trust_domains (mutual TLS)"));
        }
        if urls.len() > MAX_CRL_URLS {
            return Err(self.invalid(
                key("crl_urls"),
                format!("[{} URLs]", urls.len()),
                format!("at most {MAX_CRL_URLS} CRL URLs per listener"),
            ));
        }
        for (i, url) in urls.iter().enumerate() {
            crl_url(url).map_err(|why| self.invalid(key("crl_urls"), url, why))?;
            if urls[..i].contains(url) {
                return Err(self.invalid(key("crl_urls"), url, "listed twice"));
            }
        }
        let refresh = match &raw.refresh {
            Some(text) => {
                let refresh = self.duration(&key("crl_refresh"), text)?;
                if refresh < MIN_CRL_REFRESH {
                    return Err(self.invalid(key("crl_refresh"), text, "must be at least 1s"));
                }
                refresh
            }
            None => DEFAULT_CRL_REFRESH,
        };
        let max_size = match raw.max_size {
            Some(0) => return Err(self.invalid(key("crl_max_size"), 0, "must be at least 1 (bytes)")),
            Some(n) => n,
            None => DEFAULT_CRL_MAX_SIZE,
        };
        let timeout = match &raw.timeout {
            Some(text) => self.duration(&key("crl_timeout"), text)?,
            None => DEFAULT_CRL_TIMEOUT,
        };
        let cache_dir = match raw.cache_dir {
            Some(dir) if dir.as_os_str().is_empty() => {
                return Err(self.invalid(key("crl_cache_dir"), "", "expected a directory"))
            }
            other => other.map(|dir| self.base.join(dir)),
        };
        Ok(Some(CrlFetch {
            urls,
            from_certificates,
            refresh,
            max_size,
            timeout,
            cache_dir,
        }))
    }
}
