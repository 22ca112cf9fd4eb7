//! The `[admin]` section: [`AdminConfig`] (TCP address and/or Unix socket, the token read from
//! `token_file`, `metrics_auth`, `allowed_hosts`), its raw table and its rules.
//!
//! This file says what a valid admin section is; it must not judge requests (`admin::guard`
//! does) nor bind anything (`admin` and `server` do).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::values::{ConfigError, Secret, Validator};

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

/// `[admin]`: the admin API (/status, /metrics, /healthz, POST /reload, backend states); needs
/// `bind`, `socket` or both.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// TCP address of the admin API, `ip:port`.
    bind: Option<String>,
    /// Unix socket path of the admin API.
    socket: Option<PathBuf>,
    /// File holding the bearer token the API requires; not readable by others, nor by its group
    /// unless root owns it.
    token_file: Option<PathBuf>,
    /// `true` requires the token on /metrics too; needs `token_file`.
    #[serde(default)]
    metrics_auth: bool,
    /// Host names (no port, no scheme) accepted in the Host header besides IP literals and
    /// `localhost`.
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn admin(&self, a: RawAdmin) -> Result<AdminConfig, ConfigError> {
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
}
