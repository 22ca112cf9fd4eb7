//! The ground floor of `config`: [`ConfigError`], the `Validator` (where the config came from,
//! the directory its paths are relative to, and the error it makes of a bad value), and the value
//! parsers every section shares: durations (bounded by [`MAX_DURATION`]), names, socket and
//! backend addresses, TCP keepalive, ALPN lists, client certificate pairs and secret files
//! ([`Secret`]).
//!
//! Each parser takes the key it reads, so that its error names the key and the bad value. This
//! file knows no section and imports none: it must not decide which key takes which value or what
//! its default is (the section files do), and it reads no file but a secret file a section hands
//! it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// Turns raw structs into typed ones; carries the origin for error messages.
pub(super) struct Validator<'a> {
    pub(super) origin: &'a str,
    /// The config file's directory: relative paths in it are resolved against it.
    pub(super) base: &'a Path,
}

/// The longest duration any key takes: 10 years. Longer is refused by `fulcrum check`.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

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

/// `tcp_keepalive = false` (or `true`), or a table of its settings.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub(super) enum RawKeepalive {
    Switch(bool),
    Settings(RawKeepaliveSettings),
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeepaliveSettings {
    /// Duration a connection stays idle before the first probe.
    #[schemars(extend("default" = "60s"))]
    idle: Option<String>,
    /// Duration between two probes.
    #[schemars(extend("default" = "10s"))]
    interval: Option<String>,
    /// Unanswered probes before the connection is dropped; at least 1.
    #[schemars(range(min = 1), extend("default" = 6))]
    count: Option<u32>,
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

impl Validator<'_> {
    /// The error for `key`'s bad `value`, saying why.
    pub(super) fn invalid(
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

    /// Names end up in metric labels and log fields: keep them plain.
    pub(super) fn name(&self, key: &str, name: &str) -> Result<(), ConfigError> {
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

    pub(super) fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse()
            .map_err(|_| self.invalid(key, text, "expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080"))
    }

    /// A duration where zero (`"0s"`) means "off".
    pub(super) fn duration_or_off(&self, key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
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

    pub(super) fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
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

    /// `tcp_keepalive`: absent or `true` is on with defaults, `false` is off, a table overrides.
    pub(super) fn keepalive(
        &self,
        key: &str,
        raw: Option<RawKeepalive>,
    ) -> Result<Option<Keepalive>, ConfigError> {
        let defaults = Keepalive::default();
        match raw {
            None | Some(RawKeepalive::Switch(true)) => Ok(Some(defaults)),
            Some(RawKeepalive::Switch(false)) => Ok(None),
            Some(RawKeepalive::Settings(t)) => {
                let duration = |field: &str, text: &Option<String>, default| match text {
                    Some(text) => self.duration(&format!("{key}.{field}"), text),
                    None => Ok(default),
                };
                // Linux's own bounds (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT), which would
                // otherwise refuse the socket option with no word to the operator.
                let seconds = |field: &str, text: &Option<String>, default| {
                    let d: Duration = duration(field, text, default)?;
                    match d.as_secs() {
                        1..=32_767 => Ok(d),
                        _ => Err(self.invalid(
                            format!("{key}.{field}"),
                            humantime::format_duration(d),
                            "must be 1s to 32767s (Linux's limit)",
                        )),
                    }
                };
                let count = match t.count {
                    Some(n @ 1..=127) => n,
                    Some(n) => {
                        return Err(self.invalid(
                            format!("{key}.count"),
                            n,
                            "must be 1 to 127 (Linux's limit)",
                        ))
                    }
                    None => defaults.count,
                };
                Ok(Some(Keepalive {
                    idle: seconds("idle", &t.idle, defaults.idle)?,
                    interval: seconds("interval", &t.interval, defaults.interval)?,
                    count,
                }))
            }
        }
    }

    /// ALPN protocol ids: 1 to 255 bytes each (RFC 7301), no duplicates.
    pub(super) fn alpn_list(&self, key: &str, list: Vec<String>) -> Result<Vec<String>, ConfigError> {
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

    /// A client certificate and its key, given together or not at all (`key` names the table).
    pub(super) fn client_cert(
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

    /// The secret (`what`) in the file `path` names for `key`, without trailing whitespace. A file
    /// [`too_open`](Validator::too_open) is refused, as ssh refuses a readable private key: the
    /// mode judged is the opened file's (fstat), not that of whatever the path names a moment later.
    pub(super) fn secret_file(&self, key: &str, path: &Path, what: &str) -> Result<Secret, ConfigError> {
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
    pub(super) fn too_open(mode: u32, owner: u32) -> bool {
        mode & 0o004 != 0 || (mode & 0o040 != 0 && owner != 0)
    }
}
