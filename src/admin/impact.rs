//! `POST /impact`, the reload preview: the request's candidate config file, loaded as a reload
//! would load it, and the answer naming the open connections it would close (at most
//! [`MAX_LISTED`] listed, all counted), with their count per identity, listener and reason.
//!
//! The judgement is the live model's ([`Live::impact`], the one a reload's sweep runs); this file
//! reads the request and renders the answer. It never makes the candidate live. The path comes
//! from the request, so an error about a file that is not TOML quotes none of its lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{Config, ConfigError};
use crate::state::impact::{Closing, Lost};
use crate::state::Live;

/// Connections listed one by one at most; `would_close` and `groups` count them all.
pub(crate) const MAX_LISTED: usize = 1000;

/// The candidate's path from a request body: absolute, UTF-8, a trailing newline ignored.
pub(crate) fn candidate(body: &[u8]) -> Result<PathBuf, &'static str> {
    const EXPECTED: &str = "expected the absolute path of a candidate config file as the body";
    let text = std::str::from_utf8(body).map_err(|_| EXPECTED)?;
    let path = Path::new(text.trim_end_matches(['\r', '\n']));
    match path.is_absolute() {
        true => Ok(path.to_path_buf()),
        false => Err(EXPECTED),
    }
}

/// Loads the config file at `path` (the reload's code) and judges it against the open
/// connections; the error is the sentence for the answer.
pub(crate) fn preview(live: &Live, path: &Path) -> Result<Vec<Closing>, String> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let config = Config::load(path).map_err(|e| match e {
        ConfigError::Syntax { origin, .. } => format!(
            "{origin}: not a TOML config file (`fulcrum check --config {origin}` shows where it fails)"
        ),
        e => e.to_string(),
    })?;
    live.impact(&config).map_err(|e| e.to_string())
}

/// The answer: `{"would_close", "connections", "groups"}`, both lists in a stable order
/// (identity, listener, reason first).
pub(crate) fn render(closing: &[Closing]) -> String {
    let connections: Vec<Value> = closing
        .iter()
        .take(MAX_LISTED)
        .map(|c| {
            json!({
                "listener": c.listener,
                "upstream": c.upstream,
                "identity": c.identity,
                "client": c.client.to_string(),
                "server_name": c.server_name,
                "reason": c.lost.label(),
                "detail": c.detail,
            })
        })
        .collect();
    let mut groups: BTreeMap<(&str, &str, Lost), usize> = BTreeMap::new();
    for c in closing {
        *groups.entry((&c.identity, &c.listener, c.lost)).or_default() += 1;
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|((identity, listener, lost), count)| {
            json!({"identity": identity, "listener": listener, "reason": lost.label(), "count": count})
        })
        .collect();
    json!({"would_close": closing.len(), "connections": connections, "groups": groups}).to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closing(identity: &str, lost: Lost) -> Closing {
        Closing {
            identity: identity.into(),
            listener: "tls".into(),
            lost,
            upstream: "web".into(),
            client: std::net::Ipv4Addr::LOCALHOST.into(),
            server_name: None,
            detail: "why".into(),
        }
    }

    #[test]
    fn the_answer_lists_at_most_the_cap_and_counts_every_connection_per_group() {
        let mut all = vec![closing("bob", Lost::Unauthorized); MAX_LISTED + 5];
        all.push(closing("carol", Lost::Revoked));
        let answer: Value = serde_json::from_str(&render(&all)).expect("JSON");
        assert_eq!(answer["would_close"], MAX_LISTED + 6);
        assert_eq!(answer["connections"].as_array().map(Vec::len), Some(MAX_LISTED));
        assert_eq!(
            answer["groups"],
            json!([
                {"identity": "bob", "listener": "tls", "reason": "unauthorized", "count": MAX_LISTED + 5},
                {"identity": "carol", "listener": "tls", "reason": "revoked", "count": 1},
            ])
        );
        assert_eq!(
            answer["connections"][0],
            json!({"listener": "tls", "upstream": "web", "identity": "bob", "client": "127.0.0.1",
                   "server_name": null, "reason": "unauthorized", "detail": "why"})
        );
    }

    #[test]
    fn a_body_that_is_not_an_absolute_utf8_path_is_refused() {
        assert_eq!(
            candidate(b"/etc/fulcrum/next.toml\n"),
            Ok(PathBuf::from("/etc/fulcrum/next.toml"))
        );
        for refused in [
            &b"next.toml"[..],
            b"",
            b"{\"config\": \"/x.toml\"}",
            b"/x\xff.toml",
        ] {
            assert!(candidate(refused).is_err(), "{refused:?}");
        }
    }
}
