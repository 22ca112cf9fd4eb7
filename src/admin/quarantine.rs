//! `GET /quarantine`, `POST /quarantine` and `POST /quarantine/release`: the quarantine table as
//! an operator sees and changes it. Adding one refuses its subject's new connections at once and
//! closes its open ones (`end="quarantined"`); the sync loop then writes it to the cluster.
//!
//! The table and its rules are `quarantine`'s, the closing is the live model's
//! (`Live::close_quarantined`); this file reads requests and renders answers.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::quarantine::{Subject, DEFAULT_DURATION};
use crate::state::Live;

/// `{"identity": ...}` or `{"serial": ...}`, with `for` and `reason` when adding.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    identity: Option<String>,
    serial: Option<String>,
    #[serde(rename = "for")]
    duration: Option<String>,
    reason: Option<String>,
}

impl Request {
    /// The subject named: exactly one of `identity` and `serial`.
    fn subject(&self) -> Result<Subject, String> {
        match (&self.identity, &self.serial) {
            (Some(identity), None) => Subject::identity(identity).map_err(|e| e.to_string()),
            (None, Some(serial)) => Subject::serial(serial).map_err(|e| e.to_string()),
            _ => Err("name exactly one of \"identity\" and \"serial\"".to_string()),
        }
    }
}

/// Reads a request body.
pub(crate) fn request(body: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("expected {{\"identity\" or \"serial\", \"for\", \"reason\"}}: {e}"))
}

/// Quarantines what `request` names; the answer's JSON, or why not.
pub(crate) fn add(live: &Live, request: &Request) -> Result<Value, String> {
    let subject = request.subject()?;
    let duration = match &request.duration {
        Some(text) => humantime::parse_duration(text).map_err(|e| format!("\"for\": {e}"))?,
        None => DEFAULT_DURATION,
    };
    let reason = request.reason.as_deref().unwrap_or("");
    let store = Arc::clone(&live.state().quarantine);
    let until = store
        .lock()
        .add(subject.clone(), SystemTime::now(), duration, reason)
        .map_err(|e| e.to_string())?;
    store.wake.notify_one();
    let closed = live.close_quarantined(&subject);
    Ok(json!({"result": "ok", "until": rfc3339(until), "closed": closed}))
}

/// Releases what `request` names; the answer's JSON, or why not.
pub(crate) fn release(live: &Live, request: &Request) -> Result<Value, String> {
    if request.duration.is_some() || request.reason.is_some() {
        return Err("a release takes only \"identity\" or \"serial\"".to_string());
    }
    let subject = request.subject()?;
    let store = Arc::clone(&live.state().quarantine);
    let released = store.lock().release(&subject);
    store.wake.notify_one();
    Ok(json!({"result": "ok", "released": released}))
}

/// The table in force, and the state of its cluster sync.
pub(crate) fn list(live: &Live) -> Value {
    let state = live.state();
    let now = SystemTime::now();
    let entries: Vec<Value> = {
        let table = state.quarantine.lock();
        table
            .list(now)
            .map(|(subject, entry)| {
                let (kind, value) = match subject {
                    Subject::Identity(name) => ("identity", name.as_str()),
                    Subject::Serial(hex) => ("serial", hex.as_str()),
                };
                json!({
                    kind: value,
                    "until": rfc3339(entry.until),
                    "until_seconds": entry.until.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    "reason": entry.reason,
                    "cluster": entry.shared,
                    "pending": entry.pending,
                })
            })
            .collect()
    };
    let cluster = matches!(state.global_limiter, Some(crate::ratelimit::Limiter::Cluster(_)));
    json!({
        "entries": entries,
        "cluster": cluster,
        "sync_errors": state.quarantine.sync_errors.get(),
        "last_error": state.quarantine.last_error(),
    })
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
