//! Who may do what on the admin API: authentication, CSRF and DNS rebinding rules (pure).
//!
//! [`check`] takes what a request says about itself (method, path, `Host`, `Origin`,
//! `Authorization`, `Content-Type`) and how it arrived, and returns a [`Verdict`]. The rules:
//! - **Unix socket**: the socket file's permissions are the authentication; no token, `Host` or
//!   `Origin` rule applies (a browser cannot reach a Unix socket).
//! - **Host** (DNS rebinding): over TCP, a `Host` must be an IP literal, `localhost`, or a name
//!   in `allowed_hosts`; anything else is 403. `/healthz` (which says only "ok") is open to all.
//! - **Origin** (CSRF): a request with an `Origin` header is served only when that origin is the
//!   admin listener's own, `http://` + the request's (allowed) `Host`; anything else is 403.
//! - **Token**: with `token_file`, every endpoint but `/healthz` (and `/metrics`, unless
//!   `metrics_auth`) needs `Authorization: Bearer <token>` (or HTTP Basic with the token as the
//!   password, which a browser can send for the status page); compared in constant time; 401.
//! - **Mutating endpoints** (`POST`) need `Content-Type: application/json`, which no HTML form
//!   can send without a CORS preflight (that this listener never answers); 403 otherwise. On a
//!   non-loopback address without a token they are refused (403): anyone on the network could
//!   reload or drain.
//!
//! This module decides; it does not read sockets or log (the admin listener does).

use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::config::AdminConfig;

/// How a request reached the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Over TCP.
    Tcp,
    /// Over the Unix socket.
    Socket,
}

/// What a request says about itself, as far as the rules go.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

/// Who a served request is, for the log line of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// It presented the token.
    Token,
    /// It came through the Unix socket.
    Socket,
    /// No token is configured (loopback TCP).
    Anyone,
}

impl Who {
    pub fn label(self) -> &'static str {
        match self {
            Who::Token => "token",
            Who::Socket => "socket",
            Who::Anyone => "unauthenticated",
        }
    }
}

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(Who),
    /// 401, with the reason for the body.
    Unauthorized(&'static str),
    /// 403, with the reason for the body.
    Forbidden(&'static str),
}

/// Whether `path` is reachable without the token.
fn is_open(path: &str, admin: &AdminConfig) -> bool {
    path == "/healthz" || (path == "/metrics" && !admin.metrics_auth)
}

/// Applies the rules above to `request`, which arrived `via`, under `admin`'s settings.
pub fn check(admin: &AdminConfig, via: Via, request: &Request<'_>) -> Verdict {
    let mutating = request.method == "POST";
    if mutating && !is_json(request.content_type) {
        return Verdict::Forbidden("mutating requests need Content-Type: application/json");
    }
    if via == Via::Socket {
        return Verdict::Allow(Who::Socket);
    }
    if request.path == "/healthz" {
        // Says nothing but "ok": open to any probe, whatever it calls the host.
        return Verdict::Allow(Who::Anyone);
    }
    if let Some(host) = request.host {
        if !host_allowed(host, &admin.allowed_hosts) {
            return Verdict::Forbidden("Host is not an IP address, localhost, or in [admin] allowed_hosts");
        }
    }
    if let Some(origin) = request.origin {
        let own = request.host.map(|host| format!("http://{host}"));
        if own.as_deref().is_none_or(|own| !origin.eq_ignore_ascii_case(own)) {
            return Verdict::Forbidden("cross-origin requests are refused");
        }
    }
    match &admin.token {
        Some(token) if !is_open(request.path, admin) => {
            if presented(request.authorization)
                .is_some_and(|given| ct_eq(given.as_bytes(), token.expose().as_bytes()))
            {
                Verdict::Allow(Who::Token)
            } else {
                Verdict::Unauthorized("this endpoint needs the admin token")
            }
        }
        Some(_) => Verdict::Allow(Who::Anyone),
        None if mutating && admin.is_exposed() => {
            Verdict::Forbidden("on a non-loopback address, mutating endpoints need [admin] token_file")
        }
        None => Verdict::Allow(Who::Anyone),
    }
}

/// The token an `Authorization` header presents: `Bearer <token>`, or HTTP Basic with the token
/// as the password (any user name).
fn presented(authorization: Option<&str>) -> Option<String> {
    let (scheme, value) = authorization?.trim().split_once(' ')?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, password)| password.to_string());
    }
    None
}

/// Constant-time equality (the length may show; the bytes do not).
fn ct_eq(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && bool::from(given.ct_eq(token))
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether a `Host` value (with or without a port) names this listener acceptably.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6] or [v6]:port
        Some(rest) => match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests;
