//! Configuration: TOML text -> raw serde structs -> a validated, fully typed [`Config`].
//!
//! This module owns every rule about what a valid configuration is, and the wording of the errors
//! an operator sees for a bad one (file, key, bad value). It is pure: it never opens sockets, never
//! resolves host names and reads no file except the one [`Config::load`] is given. `fulcrum check`
//! and `fulcrum run` both go through [`Config::load`], so they can never disagree.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default time a connection may take to reach a backend before the next one is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time open connections get to finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of distinct backends tried for one client connection.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;

/// A validated configuration. Every field is typed and checked; the running server never meets
/// an unresolved name or an unparsed string.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from, for messages (a path, or `<inline>`).
    pub origin: String,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub admin: Option<AdminConfig>,
    /// How long open connections may keep running after a shutdown signal.
    pub drain_timeout: Duration,
}

/// One accepting socket and the upstream group its connections go to.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metric labels.
    pub name: String,
    pub bind: SocketAddr,
    /// Name of an upstream in [`Config::upstreams`] (validated to exist).
    pub upstream: String,
}

/// A group of interchangeable backends.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// Non-empty, no duplicates.
    pub backends: Vec<BackendAddr>,
    /// Deadline for one dial (name resolution included).
    pub connect_timeout: Duration,
    /// How many distinct backends one client connection may try before it is closed.
    pub connect_attempts: usize,
}

/// The admin HTTP listener (metrics).
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub bind: SocketAddr,
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
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
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
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { origin }.config(raw)
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    drain_timeout: Option<String>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    admin: Option<RawAdmin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    bind: String,
    upstream: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    backends: Vec<String>,
    connect_timeout: Option<String>,
    connect_attempts: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: String,
}

/// Turns raw structs into typed ones; carries the origin for error messages.
struct Validator<'a> {
    origin: &'a str,
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
        let drain_timeout = match &raw.drain_timeout {
            Some(text) => self.duration("drain_timeout", text)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let mut upstreams = Vec::with_capacity(raw.upstream.len());
        for (i, u) in raw.upstream.into_iter().enumerate() {
            let upstream = self.upstream(i, u)?;
            if upstreams
                .iter()
                .any(|o: &UpstreamConfig| o.name == upstream.name)
            {
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
            if !upstreams.iter().any(|u| u.name == l.upstream) {
                return Err(self.invalid(
                    key("upstream"),
                    &l.upstream,
                    "no [[upstream]] has this name",
                ));
            }
            listeners.push(ListenerConfig {
                name: l.name,
                bind,
                upstream: l.upstream,
            });
        }
        let admin = match raw.admin {
            Some(a) => Some(AdminConfig {
                bind: self.socket_addr("admin.bind", &a.bind)?,
            }),
            None => None,
        };
        Ok(Config {
            origin: self.origin.to_string(),
            listeners,
            upstreams,
            admin,
            drain_timeout,
        })
    }

    fn upstream(&self, i: usize, u: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let key = |field: &str| format!("upstream[{i}] ({:?}).{field}", u.name);
        self.name(&key("name"), &u.name)?;
        if u.backends.is_empty() {
            return Err(self.invalid(
                key("backends"),
                "[]",
                "an upstream needs at least one backend",
            ));
        }
        let mut backends: Vec<BackendAddr> = Vec::with_capacity(u.backends.len());
        for text in &u.backends {
            let addr = BackendAddr::parse(text)
                .map_err(|reason| self.invalid(key("backends"), text, reason))?;
            if backends.contains(&addr) {
                return Err(self.invalid(key("backends"), text, "backend listed twice"));
            }
            backends.push(addr);
        }
        let connect_timeout = match &u.connect_timeout {
            Some(text) => self.duration(&key("connect_timeout"), text)?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let connect_attempts = u.connect_attempts.unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
        if connect_attempts == 0 {
            return Err(self.invalid(key("connect_attempts"), 0, "must be at least 1"));
        }
        Ok(UpstreamConfig {
            name: u.name.clone(),
            backends,
            connect_timeout,
            connect_attempts,
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
        text.parse().map_err(|_| {
            self.invalid(
                key,
                text,
                "expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080",
            )
        })
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
        Ok(d)
    }
}

#[cfg(test)]
mod tests;
