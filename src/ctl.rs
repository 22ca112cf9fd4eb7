//! `fulcrum ctl`: a client of the admin API, so operators need no curl recipes.
//!
//! [`run`] sends one request (hyper's HTTP/1.1 client, over TCP or the admin Unix socket, with
//! the token when one is given, under [`DEADLINE`]) and turns the answer into text for a person
//! or, with `--json`, the API's own JSON. [`CtlError`] says which exit code applies: 1 when the
//! admin API refused (401, 403, 404, 422, ...), 2 when it could not be reached or the command
//! could not be sent. This module is a client only; the rules it meets are `admin`'s.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::health::AdminState;

mod describe;
use describe::{describe_connections, describe_impact, describe_quarantines, describe_status};

/// Everything one `fulcrum ctl` call may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Pages of open connections `fulcrum ctl connections` follows at most (a thousand each).
pub const MAX_PAGES: usize = 100;

/// Where the admin API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Socket(PathBuf),
}

/// What to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Reload,
    /// Set a backend's admin state.
    Set {
        upstream: String,
        backend: String,
        state: AdminState,
    },
    /// Set a backend's weight (until a reload changes its configured weight).
    Weight {
        upstream: String,
        backend: String,
        weight: u32,
    },
    /// Preview a reload: which open connections the config file `config` would close.
    Impact {
        config: PathBuf,
    },
    /// List the open connections `filter` matches (every page, up to [`MAX_PAGES`]).
    Connections {
        filter: ConnectionFilter,
    },
    /// Close (or, `dry_run`, count) the open connections `filter` matches; it names at least one
    /// field.
    Close {
        filter: ConnectionFilter,
        dry_run: bool,
    },
    /// List the quarantines in force.
    Quarantines,
    /// Quarantine `subject` for `duration` (humantime; default the server's) with `reason`.
    Quarantine {
        subject: Subject,
        duration: Option<String>,
        reason: Option<String>,
    },
    /// End the quarantine of `subject`.
    Release {
        subject: Subject,
    },
}

/// What a quarantine names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Identity(String),
    Serial(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Identity(name) => write!(f, "identity {name}"),
            Subject::Serial(hex) => write!(f, "serial {hex}"),
        }
    }
}

impl Subject {
    /// `{"identity": ...}` or `{"serial": ...}`, with `extra` fields.
    fn body(&self, extra: serde_json::Map<String, Value>) -> String {
        let mut body = extra;
        match self {
            Subject::Identity(name) => body.insert("identity".into(), Value::from(name.as_str())),
            Subject::Serial(hex) => body.insert("serial".into(), Value::from(hex.as_str())),
        };
        Value::Object(body).to_string()
    }
}

/// Which open connections `connections` and `close` mean: every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionFilter {
    pub identity: Option<String>,
    pub listener: Option<String>,
    /// The backend's configured `host:port`.
    pub backend: Option<String>,
    /// A client certificate serial, hex (colons optional).
    pub serial: Option<String>,
}

impl ConnectionFilter {
    fn fields(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("identity", self.identity.as_deref()),
            ("listener", self.listener.as_deref()),
            ("backend", self.backend.as_deref()),
            ("serial", self.serial.as_deref()),
        ]
    }

    /// The query string's filters, each followed by `&`.
    fn query(&self) -> String {
        let mut query = String::new();
        for (key, value) in self.fields() {
            if let Some(value) = value {
                let _ = write!(query, "{key}={}&", encode(value));
            }
        }
        query
    }

    /// The body of `POST /connections/close`.
    fn body(&self, dry_run: bool) -> Result<String, CtlError> {
        let mut body = serde_json::Map::new();
        for (key, value) in self.fields() {
            if let Some(value) = value {
                body.insert(key.into(), Value::from(value));
            }
        }
        if body.is_empty() {
            return Err(CtlError::Usage(
                "close needs at least one of --identity, --listener, --backend, --serial".into(),
            ));
        }
        body.insert("dry_run".into(), Value::from(dry_run));
        Ok(Value::Object(body).to_string())
    }
}

/// Why a `fulcrum ctl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The admin API answered with an error status.
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    /// The admin API could not be reached (or the token file read).
    #[error("{0}")]
    Unreachable(String),
    /// The command could not be sent as given.
    #[error("{0}")]
    Usage(String),
}

impl CtlError {
    /// The process exit code: 1 refused, 2 unreachable or unusable.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused { .. } => 1,
            CtlError::Unreachable(_) | CtlError::Usage(_) => 2,
        }
    }
}

/// Runs `command` against `target`, with the token in `token_file` if given; returns what to
/// print: the API's JSON with `json`, else text for a person.
pub async fn run(
    target: &Target,
    token_file: Option<&PathBuf>,
    command: &Command,
    json: bool,
) -> Result<String, CtlError> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CtlError::Unreachable(format!("cannot read the token file {}: {e}", path.display()))
            })?;
            Some(text.trim_end().to_string())
        }
        None => None,
    };
    let (method, path, body) = match command {
        Command::Status => ("GET", "/status".to_string(), None),
        Command::Reload => ("POST", "/reload".to_string(), Some(String::new())),
        Command::Set {
            upstream,
            backend,
            state,
        } => backend_call(upstream, backend, serde_json::json!({ "state": state.label() })),
        Command::Weight {
            upstream,
            backend,
            weight,
        } => backend_call(upstream, backend, serde_json::json!({ "weight": weight })),
        Command::Impact { config } => ("POST", "/impact".to_string(), Some(candidate(config)?)),
        Command::Connections { filter } => return connections(target, token.as_deref(), filter, json).await,
        Command::Close { filter, dry_run } => (
            "POST",
            "/connections/close".to_string(),
            Some(filter.body(*dry_run)?),
        ),
        Command::Quarantines => ("GET", "/quarantine".to_string(), None),
        Command::Quarantine {
            subject,
            duration,
            reason,
        } => {
            let mut extra = serde_json::Map::new();
            if let Some(duration) = duration {
                extra.insert("for".into(), Value::from(duration.as_str()));
            }
            if let Some(reason) = reason {
                extra.insert("reason".into(), Value::from(reason.as_str()));
            }
            ("POST", "/quarantine".to_string(), Some(subject.body(extra)))
        }
        Command::Release { subject } => (
            "POST",
            "/quarantine/release".to_string(),
            Some(subject.body(serde_json::Map::new())),
        ),
    };
    let text = call(target, token.as_deref(), method, &path, body).await?;
    if json {
        return Ok(text.trim_end().to_string());
    }
    let value = parse(&text)?;
    Ok(match command {
        Command::Status => describe_status(&value),
        Command::Reload => format!("reloaded: generation {}", value["generation"]),
        Command::Set {
            upstream, backend, ..
        } => format!(
            "upstream {upstream} backend {backend}: {} (was {})",
            value["state"].as_str().unwrap_or("?"),
            value["previous"].as_str().unwrap_or("?")
        ),
        Command::Weight {
            upstream, backend, ..
        } => format!(
            "upstream {upstream} backend {backend}: weight {} (was {})",
            value["weight"], value["previous_weight"]
        ),
        Command::Impact { .. } => describe_impact(&value),
        Command::Connections { .. } => describe_connections(&value),
        Command::Close { dry_run, .. } => {
            let (verb, key) = match dry_run {
                true => ("would close", "would_close"),
                false => ("closed", "closed"),
            };
            let count = value[key].as_u64().unwrap_or(0);
            format!("{verb} {count} connection{}", if count == 1 { "" } else { "s" })
        }
        Command::Quarantines => describe_quarantines(&value),
        Command::Quarantine { subject, .. } => format!(
            "{subject} quarantined until {}; {} open connection(s) closed",
            value["until"].as_str().unwrap_or("?"),
            value["closed"]
        ),
        Command::Release { subject } => match value["released"].as_bool() {
            Some(true) => format!("{subject} released"),
            _ => format!("{subject} was not quarantined here (released in the cluster if it was there)"),
        },
    })
}

/// One request under [`DEADLINE`]; the body of a 2xx answer, else the API's refusal.
async fn call(
    target: &Target,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<String, CtlError> {
    let (status, text) = tokio::time::timeout(DEADLINE, request(target, token, method, path, body))
        .await
        .map_err(|_| CtlError::Unreachable(format!("no answer within {DEADLINE:?}")))??;
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        return Err(CtlError::Refused { status, message });
    }
    Ok(text)
}

fn parse(text: &str) -> Result<Value, CtlError> {
    serde_json::from_str(text)
        .map_err(|e| CtlError::Unreachable(format!("the admin API answered something other than JSON: {e}")))
}

/// Every open connection `filter` matches, following the pages' cursor (at most [`MAX_PAGES`]
/// pages): one JSON answer of them all with `json` (`next` set when pages were left), else a
/// table.
async fn connections(
    target: &Target,
    token: Option<&str>,
    filter: &ConnectionFilter,
    json: bool,
) -> Result<String, CtlError> {
    let (mut listed, mut total, mut after) = (Vec::new(), Value::from(0), None);
    for _ in 0..MAX_PAGES {
        let cursor = after.map_or(String::new(), |id: u64| format!("after={id}"));
        let path = format!("/connections?{}{cursor}", filter.query());
        let mut page = parse(&call(target, token, "GET", &path, None).await?)?;
        total = page["total"].take();
        listed.extend(
            page["connections"]
                .as_array_mut()
                .map(std::mem::take)
                .unwrap_or_default(),
        );
        after = page["next"].as_u64();
        if after.is_none() {
            break;
        }
    }
    let all = serde_json::json!({"total": total, "connections": listed, "next": after});
    Ok(match json {
        true => all.to_string(),
        false => describe_connections(&all),
    })
}

/// One HTTP/1.1 exchange; the status and the body.
async fn request(
    target: &Target,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), CtlError> {
    let unreachable = |what: String| CtlError::Unreachable(what);
    let host = match target {
        Target::Tcp(addr) => addr.to_string(),
        Target::Socket(_) => "localhost".to_string(),
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| unreachable(format!("cannot build the request: {e}")))?;
    let response = match target {
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(format!("cannot connect to the admin API at {addr}: {e}")))?;
            exchange(stream, request).await?
        }
        Target::Socket(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                unreachable(format!(
                    "cannot connect to the admin socket {}: {e}",
                    path.display()
                ))
            })?;
            exchange(stream, request).await?
        }
    };
    Ok(response)
}

async fn exchange<S>(stream: S, request: hyper::Request<Full<Bytes>>) -> Result<(u16, String), CtlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let broken = |e: hyper::Error| CtlError::Unreachable(format!("the admin API connection failed: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(broken)?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(broken)?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(broken)?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The call that changes one backend's runtime state or weight.
fn backend_call(
    upstream: &str,
    backend: &str,
    body: serde_json::Value,
) -> (&'static str, String, Option<String>) {
    let path = format!(
        "/upstreams/{}/backends/{}/state",
        encode(upstream),
        encode(backend)
    );
    ("POST", path, Some(body.to_string()))
}

/// The body of `POST /impact`: the candidate's path made absolute (the balancer runs in a
/// directory of its own), as UTF-8.
fn candidate(config: &Path) -> Result<String, CtlError> {
    let absolute = std::path::absolute(config)
        .map_err(|e| CtlError::Usage(format!("cannot make {} absolute: {e}", config.display())))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|path| CtlError::Usage(format!("{} is not a UTF-8 path", Path::new(&path).display())))
}

/// Percent-encodes a path segment (backend labels hold `:` and, for IPv6, brackets).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_labels_are_percent_encoded_as_path_segments() {
        assert_eq!(encode("127.0.0.1:8080"), "127.0.0.1%3A8080");
        assert_eq!(encode("[::1]:80"), "%5B%3A%3A1%5D%3A80");
        assert_eq!(encode("app-0.app:8080"), "app-0.app%3A8080");
    }

    #[test]
    fn an_impact_candidate_is_sent_as_an_absolute_path() {
        let sent = candidate(Path::new("next.toml")).expect("a UTF-8 path");
        let expected = std::env::current_dir()
            .expect("a working directory")
            .join("next.toml");
        assert_eq!(Path::new(&sent), expected);
        assert_eq!(
            candidate(Path::new("/etc/next.toml")).expect("UTF-8"),
            "/etc/next.toml"
        );
    }

    #[test]
    fn a_connection_filter_is_sent_percent_encoded_and_closing_needs_one_of_its_fields() {
        let filter = ConnectionFilter {
            identity: Some("spiffe://example.org/bob".into()),
            serial: Some("01:a2".into()),
            ..ConnectionFilter::default()
        };
        assert_eq!(
            filter.query(),
            "identity=spiffe%3A%2F%2Fexample.org%2Fbob&serial=01%3Aa2&"
        );
        let body: Value = serde_json::from_str(&filter.body(true).expect("a filter")).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"identity": "spiffe://example.org/bob", "serial": "01:a2", "dry_run": true})
        );
        let refused = ConnectionFilter::default().body(false);
        assert!(matches!(refused, Err(CtlError::Usage(_))), "{refused:?}");
        assert_eq!(ConnectionFilter::default().query(), "");
    }
}
