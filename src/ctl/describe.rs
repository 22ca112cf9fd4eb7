//! What `fulcrum ctl` prints for a person: the admin API's JSON answers (status, impact,
//! connections, quarantines) as lines and aligned columns. It reads values only; sending the
//! requests and choosing the exit code are the parent's.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// The quarantine table, one line per entry, then the cluster sync's state.
pub(super) fn describe_quarantines(value: &Value) -> String {
    let mut out = String::new();
    let entries = value["entries"].as_array().map(Vec::as_slice).unwrap_or_default();
    for entry in entries {
        let subject = match (entry["identity"].as_str(), entry["serial"].as_str()) {
            (Some(identity), _) => format!("identity {identity}"),
            (None, Some(serial)) => format!("serial {serial}"),
            _ => "?".to_string(),
        };
        let origin = match (entry["pending"].as_bool(), entry["cluster"].as_bool()) {
            (Some(true), _) => "this instance, not yet in the cluster",
            (_, Some(true)) => "cluster",
            _ => "this instance",
        };
        let _ = writeln!(
            out,
            "{subject}  until {}  ({origin})  {}",
            entry["until"].as_str().unwrap_or("?"),
            entry["reason"].as_str().unwrap_or("")
        );
    }
    if entries.is_empty() {
        out.push_str("nothing is quarantined\n");
    }
    match (value["cluster"].as_bool(), value["last_error"].as_str()) {
        (Some(true), Some(error)) => {
            let _ = write!(
                out,
                "cluster sync FAILING ({} errors so far): {error}; local quarantines still apply",
                value["sync_errors"]
            );
        }
        (Some(true), None) => {
            let _ = write!(out, "cluster sync ok ({} errors so far)", value["sync_errors"]);
        }
        _ => out.push_str("no cluster Redis ([rate_limit.shared]): quarantines apply to this instance only"),
    }
    out
}

/// `/status` as text: the generation, then each listener, then each upstream and its backends.
pub(super) fn describe_status(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "generation {}, up {}, {} active connection(s){}",
        status["generation"],
        humantime::format_duration(Duration::from_secs(
            status["uptime_seconds"].as_u64().unwrap_or(0)
        )),
        status["active_connections"],
        if status["draining"].as_bool() == Some(true) {
            ", draining"
        } else {
            ", serving"
        }
    );
    for l in status["listeners"].as_array().into_iter().flatten() {
        let refused: Vec<String> = l["rejected"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let binds: Vec<&str> = l["bind"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "listener {} {} -> {}{}, accepted {}, refused {}",
            l["name"].as_str().unwrap_or("?"),
            binds.join(","),
            l["upstream"].as_str().unwrap_or("?"),
            match (l["mtls"].as_bool(), l["tls"].as_bool()) {
                (Some(true), _) => " (mTLS)",
                (_, Some(true)) => " (TLS)",
                _ => "",
            },
            l["accepted"],
            if refused.is_empty() {
                "0".to_string()
            } else {
                refused.join(", ")
            }
        );
    }
    for u in status["upstreams"].as_array().into_iter().flatten() {
        let queue = match u["queue_size"].as_u64() {
            Some(size) if size > 0 => format!(", {} of {size} queued", u["queue_length"]),
            _ => String::new(),
        };
        let discover = match u["discover"]["name"].as_str() {
            Some(name) => format!(" (from DNS: {name})"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "upstream {}{discover}: {} active{queue}",
            u["name"].as_str().unwrap_or("?"),
            u["active"]
        );
        for b in u["backends"].as_array().into_iter().flatten() {
            let mut extra = String::new();
            if b["weight"].as_u64().is_some_and(|w| w != 1) {
                let _ = write!(extra, ", weight {}", b["weight"]);
            }
            if let Some(max) = b["max_connections"].as_u64() {
                let _ = write!(extra, ", max {max}");
            }
            if b["backup"].as_bool() == Some(true) {
                extra.push_str(", backup");
            }
            let _ = writeln!(
                out,
                "  {:<24} {:<5} {:<6} {} active, {} connections, {} connect failures{extra}",
                b["address"].as_str().unwrap_or("?"),
                b["health"].as_str().unwrap_or("?"),
                b["admin_state"].as_str().unwrap_or("?"),
                b["active"],
                b["connections_total"],
                b["connect_failures_total"]
            );
        }
    }
    out.trim_end().to_string()
}

/// `/impact` as text: a table of the connections that would be closed per identity, listener
/// and reason, then the total.
pub(super) fn describe_impact(impact: &Value) -> String {
    let field = |group: &Value, key: &str| match &group[key] {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![["IDENTITY", "LISTENER", "REASON", "CONNECTIONS"].map(String::from)];
    for group in impact["groups"].as_array().into_iter().flatten() {
        rows.push(["identity", "listener", "reason", "count"].map(|key| field(group, key)));
    }
    let mut out = String::new();
    if rows.len() > 1 {
        out = columns(&rows);
    }
    let total = impact["would_close"].as_u64().unwrap_or(0);
    let plural = if total == 1 { "" } else { "s" };
    let _ = write!(out, "{total} connection{plural} would be closed");
    out
}

/// `GET /connections` (all pages) as text: one row per connection, then the count.
pub(super) fn describe_connections(all: &Value) -> String {
    const HEAD: [&str; 12] = [
        "ID", "LISTENER", "CLIENT", "IDENTITY", "UPSTREAM", "BACKEND", "PHASE", "AGE", "IDLE", "UP", "DOWN",
        "SERIAL",
    ];
    let text = |c: &Value, key: &str| match &c[key] {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let listed = all["connections"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut rows = vec![HEAD.map(String::from)];
    for c in listed {
        let since = |key: &str| compact(c[key].as_u64().unwrap_or(0));
        rows.push([
            text(c, "id"),
            text(c, "listener"),
            text(c, "client"),
            text(c, "identity"),
            text(c, "upstream"),
            text(c, "backend"),
            text(c, "phase"),
            since("age_ms"),
            since("idle_ms"),
            text(c, "bytes_up"),
            text(c, "bytes_down"),
            text(c, "serial"),
        ]);
    }
    let mut out = String::new();
    if !listed.is_empty() {
        out = columns(&rows);
    }
    let total = all["total"].as_u64().unwrap_or(0);
    let plural = if total == 1 { "" } else { "s" };
    let _ = write!(out, "{total} open connection{plural}");
    if (listed.len() as u64) < total {
        let _ = write!(out, ", the first {} listed", listed.len());
    }
    out
}

/// A duration in milliseconds as a short whole-second text: `42s`, `5m07s`, `3h02m`, `2d04h`.
fn compact(millis: u64) -> String {
    let s = millis / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Rows as left-aligned columns two spaces apart (the last one unpadded), a line each.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            match i + 1 == N {
                true => line.push_str(cell),
                false => {
                    let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impact_reads_as_a_table_per_identity_listener_and_reason_then_the_total() {
        let impact = serde_json::json!({
            "would_close": 3,
            "groups": [{"identity": "bob", "listener": "tls", "reason": "unauthorized", "count": 2},
                       {"identity": "carol", "listener": "tls", "reason": "revoked", "count": 1}]
        });
        assert_eq!(
            describe_impact(&impact),
            "IDENTITY  LISTENER  REASON        CONNECTIONS\n\
             bob       tls       unauthorized  2\n\
             carol     tls       revoked       1\n\
             3 connections would be closed"
        );
        let none = serde_json::json!({"would_close": 0, "groups": []});
        assert_eq!(describe_impact(&none), "0 connections would be closed");
    }

    #[test]
    fn a_status_reads_as_one_line_per_listener_and_backend() {
        let status = serde_json::json!({
            "generation": 2, "uptime_seconds": 61, "active_connections": 1, "draining": false,
            "listeners": [{"name": "web", "bind": ["127.0.0.1:8443"], "upstream": "web", "tls": true,
                           "mtls": true, "accepted": 5, "rejected": {"rate_limited": 2, "unauthorized": 0}}],
            "upstreams": [{"name": "web", "active": 1, "backends": [{"address": "127.0.0.1:9001",
                           "health": "up", "admin_state": "drain", "active": 1, "connections_total": 4,
                           "connect_failures_total": 0}]}]
        });
        let text = describe_status(&status);
        assert!(
            text.starts_with("generation 2, up 1m 1s, 1 active connection(s), serving"),
            "{text}"
        );
        assert!(
            text.contains("listener web 127.0.0.1:8443 -> web (mTLS), accepted 5, refused rate_limited 2"),
            "{text}"
        );
        assert!(
            text.contains("127.0.0.1:9001") && text.contains("drain"),
            "{text}"
        );
    }

    #[test]
    fn open_connections_read_as_a_table_then_the_count() {
        let all = serde_json::json!({"total": 3, "next": 2, "connections": [
            {"id": 1, "listener": "tls", "client": "127.0.0.1:5000", "identity": "alice",
             "upstream": "web", "backend": "127.0.0.1:9001", "phase": "proxied", "age_ms": 65_000,
             "idle_ms": 999, "bytes_up": 12, "bytes_down": 34, "serial": "01:a2"},
            {"id": 2, "listener": "plain", "client": "127.0.0.1:5001", "identity": null,
             "upstream": null, "backend": null, "phase": "handshake", "age_ms": 90_061_000,
             "idle_ms": 3_700_000, "bytes_up": 0, "bytes_down": 0, "serial": null},
        ]});
        assert_eq!(
            describe_connections(&all),
            "ID  LISTENER  CLIENT          IDENTITY  UPSTREAM  BACKEND         PHASE      AGE    IDLE   UP  DOWN  SERIAL\n\
             1   tls       127.0.0.1:5000  alice     web       127.0.0.1:9001  proxied    1m05s  0s     12  34    01:a2\n\
             2   plain     127.0.0.1:5001  -         -         -               handshake  1d01h  1h01m  0   0     -\n\
             3 open connections, the first 2 listed"
        );
        let none = serde_json::json!({"total": 0, "next": null, "connections": []});
        assert_eq!(describe_connections(&none), "0 open connections");
    }
}
