//! `[spiffe]`, where the SPIFFE Workload API is (`socket`, `startup_timeout`), and the
//! `source` / `svid` keys of `[listener.tls]` and `[upstream.tls]`: whether a TLS side's
//! certificate, key and trust come from files or from the Workload API. Pure: the socket is
//! checked for its form, never opened (`crate::workload` connects), and the environment's
//! `SPIFFE_ENDPOINT_SOCKET` is read there, not here.

use std::time::Duration;

use serde::Deserialize;

use super::values::{ConfigError, Validator};

/// Default `[spiffe] startup_timeout`: how long startup waits for the first X509-SVID.
pub const DEFAULT_SPIFFE_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// `[spiffe]`: the Workload API fulcrum takes SVIDs and bundles from, for every TLS side with
/// `source = "spiffe"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeConfig {
    /// `socket`: `unix:///path` or `tcp://ip:port`; `None`: `SPIFFE_ENDPOINT_SOCKET`.
    pub socket: Option<String>,
    /// `startup_timeout`: startup (and a reload that first needs the Workload API) fails if no
    /// X509-SVID came within this long.
    pub startup_timeout: Duration,
}

impl Default for SpiffeConfig {
    fn default() -> Self {
        SpiffeConfig {
            socket: None,
            startup_timeout: DEFAULT_SPIFFE_STARTUP_TIMEOUT,
        }
    }
}

/// Where a TLS side's certificate, key and trust come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsSource {
    /// `source = "files"` (the default): `cert`, `key`, `client_ca`, ... name files.
    #[default]
    Files,
    /// `source = "spiffe"`: the Workload API's X509-SVID (`svid`: the one with this SPIFFE ID;
    /// `None`: the first, the Workload API's default) and its bundles, one per trust domain.
    Spiffe { svid: Option<String> },
}

impl TlsSource {
    /// Whether the Workload API provides this side's certificate and trust.
    pub fn is_spiffe(&self) -> bool {
        matches!(self, TlsSource::Spiffe { .. })
    }

    /// The SPIFFE ID asked for with `svid`, if any.
    pub fn svid(&self) -> Option<&str> {
        match self {
            TlsSource::Spiffe { svid } => svid.as_deref(),
            TlsSource::Files => None,
        }
    }
}

/// `[spiffe]`: the SPIFFE Workload API of every TLS side with `source = "spiffe"`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpiffe {
    /// The Workload API endpoint, `unix:///absolute/path` or `tcp://ip:port`; default: the
    /// `SPIFFE_ENDPOINT_SOCKET` environment variable.
    socket: Option<String>,
    /// Duration, more than zero: how long startup (and `fulcrum check`, and a reload that first
    /// needs the Workload API) waits for the first X509-SVID.
    #[schemars(extend("default" = "30s"))]
    startup_timeout: Option<String>,
}

impl Validator<'_> {
    /// `[spiffe]`, defaults if absent.
    pub(super) fn spiffe(&self, raw: Option<RawSpiffe>) -> Result<SpiffeConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(SpiffeConfig::default());
        };
        let socket = match raw.socket {
            Some(socket) if !is_endpoint(&socket) => {
                return Err(self.invalid(
                    "spiffe.socket",
                    &socket,
                    "expected unix:///path/to/agent.sock or tcp://ip:port",
                ))
            }
            other => other,
        };
        let startup_timeout = match &raw.startup_timeout {
            Some(text) => match self.duration("spiffe.startup_timeout", text)? {
                d if d.is_zero() => {
                    return Err(self.invalid("spiffe.startup_timeout", text, "must be more than 0s"))
                }
                d => d,
            },
            None => DEFAULT_SPIFFE_STARTUP_TIMEOUT,
        };
        Ok(SpiffeConfig {
            socket,
            startup_timeout,
        })
    }

    /// `source` and `svid` of the TLS table at `key`.
    pub(super) fn tls_source(
        &self,
        key: &str,
        source: Option<&str>,
        svid: Option<String>,
    ) -> Result<TlsSource, ConfigError> {
        let source = match source {
            None | Some("files") => TlsSource::Files,
            Some("spiffe") => TlsSource::Spiffe { svid: None },
            Some(other) => {
                return Err(self.invalid(format!("{key}.source"), other, "expected \"files\" or \"spiffe\""))
            }
        };
        match (source, svid) {
            (TlsSource::Files, Some(svid)) => Err(self.invalid(
                format!("{key}.svid"),
                svid,
                "only means something with source = \"spiffe\"",
            )),
            (source, None) => Ok(source),
            (TlsSource::Spiffe { .. }, Some(svid)) => match crate::authz::Name::parse(&svid) {
                Ok(crate::authz::Name::Exact(id)) if id.starts_with("spiffe://") => Ok(TlsSource::Spiffe {
                    svid: Some(id.to_string()),
                }),
                _ => Err(self.invalid(
                    format!("{key}.svid"),
                    svid,
                    "expected a SPIFFE ID (spiffe://trust-domain/path), no pattern",
                )),
            },
        }
    }

    /// With `source = "spiffe"`, the file keys of the TLS table at `key` that were given
    /// anyway: an error naming the first (the Workload API provides what they would).
    pub(super) fn no_files_with_spiffe(&self, key: &str, given: &[(&str, bool)]) -> Result<(), ConfigError> {
        match given.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(self.invalid(
                format!("{key}.{field}"),
                "..",
                "not with source = \"spiffe\": the Workload API provides the certificate, key and trust bundles",
            )),
            None => Ok(()),
        }
    }
}

/// Whether `socket` has the form of a Workload API address.
fn is_endpoint(socket: &str) -> bool {
    let path = socket
        .strip_prefix("unix://")
        .or_else(|| socket.strip_prefix("unix:"));
    match path {
        Some(path) => path.starts_with('/') && path.len() > 1,
        None => socket
            .strip_prefix("tcp://")
            .is_some_and(|addr| addr.parse::<std::net::SocketAddr>().is_ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const UPSTREAM: &str = "[[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9000\"]\n";

    /// A config with one listener whose `[listener.tls]` holds `tls`, and `rest`.
    fn load(tls: &str, rest: &str) -> Result<Config, String> {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n[listener.tls]\n{tls}\n{UPSTREAM}{rest}"
        );
        Config::from_toml(&text, "test").map_err(|e| e.to_string())
    }

    #[test]
    fn a_spiffe_listener_needs_no_file_and_is_mutual_tls_with_the_default_timeout() {
        let config = load("source = \"spiffe\"\nsvid = \"spiffe://a.test/lb\"", "").expect("valid");
        let tls = config.listeners[0].tls.as_ref().expect("tls");
        assert_eq!(tls.source.svid(), Some("spiffe://a.test/lb"));
        assert!(
            tls.verifies_clients(),
            "the Workload API's bundles verify clients"
        );
        assert!(config.uses_spiffe());
        assert_eq!(config.spiffe, SpiffeConfig::default());
        assert_eq!(config.spiffe.startup_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_spiffe_listener_naming_a_file_is_refused_naming_the_key() {
        for (key, line) in [
            ("cert", "cert = \"c.pem\""),
            ("client_ca", "client_ca = \"ca.pem\""),
            ("crl_urls", "crl_urls = [\"http://pki.test/ca.crl\"]"),
        ] {
            let error = load(&format!("source = \"spiffe\"\n{line}"), "").expect_err(key);
            assert!(
                error.contains(&format!("tls.{key}")) && error.contains("Workload API"),
                "{error}"
            );
        }
    }

    #[test]
    fn svid_without_the_spiffe_source_and_a_pattern_svid_are_refused() {
        let error = load(
            "cert = \"c.pem\"\nkey = \"k.pem\"\nsvid = \"spiffe://a.test/lb\"",
            "",
        )
        .expect_err("svid");
        assert!(error.contains("only means something with source"), "{error}");
        let error = load("source = \"spiffe\"\nsvid = \"spiffe://a.test/*\"", "").expect_err("pattern");
        assert!(error.contains("no pattern"), "{error}");
        let error = load("source = \"vault\"", "").expect_err("source");
        assert!(error.contains("expected \"files\" or \"spiffe\""), "{error}");
    }

    #[test]
    fn a_bad_socket_or_a_zero_timeout_is_refused() {
        let tls = "source = \"spiffe\"";
        let error = load(tls, "[spiffe]\nsocket = \"/run/agent.sock\"\n").expect_err("socket");
        assert!(error.contains("spiffe.socket"), "{error}");
        let error = load(tls, "[spiffe]\nstartup_timeout = \"0s\"\n").expect_err("timeout");
        assert!(error.contains("spiffe.startup_timeout"), "{error}");
        let config = load(
            tls,
            "[spiffe]\nsocket = \"unix:///run/spire/agent.sock\"\nstartup_timeout = \"5s\"\n",
        )
        .expect("valid");
        assert_eq!(
            config.spiffe.socket.as_deref(),
            Some("unix:///run/spire/agent.sock")
        );
        assert_eq!(config.spiffe.startup_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_spiffe_upstream_needs_server_identity_and_no_ca_while_a_files_upstream_needs_ca() {
        let listener = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"app\"\n";
        let upstream = |tls: &str| {
            let text = format!("{listener}{UPSTREAM}[upstream.tls]\n{tls}\n");
            Config::from_toml(&text, "test").map_err(|e| e.to_string())
        };
        let error = upstream("source = \"spiffe\"").expect_err("no server_identity");
        assert!(
            error.contains("server_identity") && error.contains("required"),
            "{error}"
        );
        let error =
            upstream("source = \"spiffe\"\nserver_identity = \"spiffe://a.test/db\"\nca = \"ca.pem\"")
                .expect_err("ca");
        assert!(error.contains("tls.ca"), "{error}");
        let error = upstream("server_name = \"db\"").expect_err("files without ca");
        assert!(error.contains("tls.ca") && error.contains("required"), "{error}");
        let config =
            upstream("source = \"spiffe\"\nserver_identity = \"spiffe://a.test/db\"").expect("valid");
        assert!(config.uses_spiffe());
        assert!(
            !config.files().iter().any(|f| f.as_os_str().is_empty()),
            "no empty path is watched"
        );
    }

    #[test]
    fn a_unix_path_or_a_tcp_address_is_an_endpoint_and_nothing_else_is() {
        assert!(is_endpoint("unix:///run/spire/agent.sock"));
        assert!(is_endpoint("unix:/run/spire/agent.sock"));
        assert!(is_endpoint("tcp://127.0.0.1:8081"));
        assert!(!is_endpoint("unix://relative.sock"));
        assert!(!is_endpoint("/run/spire/agent.sock"));
        assert!(!is_endpoint("tcp://agent:8081"));
        assert!(!is_endpoint("http://127.0.0.1:8081"));
    }
}
