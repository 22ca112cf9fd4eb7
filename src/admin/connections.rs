//! `GET /connections` and `POST /connections/close`: the table of open connections, listed a
//! page at a time ([`listing`], [`list`]) and closed by filter ([`closing`], [`close`]).
//!
//! The table, its filter and the cut are the live model's (`state::registry`); this file reads
//! requests (the query string, the JSON body) into them and renders the answers. Closing needs
//! at least one filter: an empty one would close every connection, which is what a shutdown is
//! for. It never touches a socket: a cut connection's own task resets it.

use std::time::{Instant, SystemTime};

use serde_json::{json, Value};

use crate::state::registry::{is_serial, ConnectionFilter, ConnectionView, Cut, Page};
use crate::state::Live;

/// Connections on one page at most, and when the request names no `limit`.
pub(crate) const MAX_PAGE: usize = 1000;

/// What `GET /connections` asks for: a filter and a page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Listing {
    pub(crate) filter: ConnectionFilter,
    /// The cursor: only connections with a greater id.
    pub(crate) after: u64,
    pub(crate) limit: usize,
}

/// What `POST /connections/close` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Closing {
    pub(crate) filter: ConnectionFilter,
    /// Count the matches instead of closing them.
    pub(crate) dry_run: bool,
}

/// The request of `GET /connections` from its query string: `identity`, `listener`, `backend`,
/// `serial`, `after`, `limit` (at most [`MAX_PAGE`], the default), percent-encoded; anything
/// else is refused (a misspelt filter must not list what it did not mean).
pub(crate) fn listing(query: Option<&str>) -> Result<Listing, String> {
    let mut listing = Listing {
        limit: MAX_PAGE,
        ..Listing::default()
    };
    let mut seen: Vec<String> = Vec::new();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key).ok_or("the query string is not valid percent-encoded UTF-8")?;
        let value = decode(value).ok_or_else(|| format!("{key}: not valid percent-encoded UTF-8"))?;
        if seen.contains(&key) {
            return Err(format!("{key} is given twice"));
        }
        match key.as_str() {
            "after" => {
                listing.after = value
                    .parse()
                    .map_err(|_| format!("after: expected a connection id, not {value:?}"))?;
            }
            "limit" => {
                let limit: usize = value
                    .parse()
                    .ok()
                    .filter(|limit| *limit > 0)
                    .ok_or_else(|| format!("limit: expected 1 to {MAX_PAGE}, not {value:?}"))?;
                listing.limit = limit.min(MAX_PAGE);
            }
            _ => set(&mut listing.filter, &key, value)?,
        }
        seen.push(key);
    }
    Ok(listing)
}

/// The request of `POST /connections/close` from its JSON body: the filters of
/// [`listing`] (at least one) and `dry_run`.
pub(crate) fn closing(body: &[u8]) -> Result<Closing, String> {
    const EXPECTED: &str = "expected a JSON body with at least one of \"identity\", \"listener\", \
                            \"backend\", \"serial\" (strings), and optionally \"dry_run\": true";
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        identity: Option<String>,
        listener: Option<String>,
        backend: Option<String>,
        serial: Option<String>,
        #[serde(default)]
        dry_run: bool,
    }
    let body: Body = match body {
        [] => return Err(EXPECTED.to_string()),
        body => serde_json::from_slice(body).map_err(|_| EXPECTED)?,
    };
    let mut filter = ConnectionFilter::default();
    let given = [
        ("identity", body.identity),
        ("listener", body.listener),
        ("backend", body.backend),
        ("serial", body.serial),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            set(&mut filter, key, value)?;
        }
    }
    if filter.is_empty() {
        return Err(EXPECTED.to_string());
    }
    Ok(Closing {
        filter,
        dry_run: body.dry_run,
    })
}

/// Sets the filter field `key` to `value`, which must not be empty (a serial must be one).
fn set(filter: &mut ConnectionFilter, key: &str, value: String) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{key} is empty"));
    }
    let field = match key {
        "identity" => &mut filter.identity,
        "listener" => &mut filter.listener,
        "backend" => &mut filter.backend,
        "serial" if is_serial(&value) => &mut filter.serial,
        "serial" => {
            return Err(format!(
                "serial: expected hex, colons optional (as the access log writes it), not {value:?}"
            ))
        }
        other => {
            return Err(format!(
                "unknown parameter {other:?}: expected identity, listener, backend, serial, after, limit"
            ))
        }
    };
    *field = Some(value);
    Ok(())
}

/// Decodes one `application/x-www-form-urlencoded` component (`%XX`, `+` for a space).
fn decode(component: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(component.len());
    let mut rest = component.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        bytes.push(match byte {
            b'+' => b' ',
            b'%' => {
                let hex = std::str::from_utf8(rest.get(..2)?).ok()?;
                rest = &rest[2..];
                u8::from_str_radix(hex, 16).ok()?
            }
            other => other,
        });
    }
    String::from_utf8(bytes).ok()
}

/// The answer to `GET /connections`: `{"total", "connections", "next"}`.
pub(crate) fn list(live: &Live, listing: &Listing) -> String {
    let connections = live.registry.connections();
    let page = connections.page(&listing.filter, listing.after, listing.limit, Instant::now());
    render(&page, SystemTime::now()).to_string() + "\n"
}

/// Closes (or, dry, counts) the open connections `closing` matches: `{"closed": N}` or
/// `{"would_close": N}`.
pub(crate) fn close(live: &Live, closing: &Closing) -> Value {
    let connections = live.registry.connections();
    match closing.dry_run {
        true => json!({"would_close": connections.count_matching(&closing.filter)}),
        false => json!({"closed": connections.close_matching(&closing.filter, Cut::ClosedByOperator)}),
    }
}

/// A page as JSON; `now`: the wall-clock time the page was read at (for `started`).
fn render(page: &Page, now: SystemTime) -> Value {
    let connections: Vec<Value> = page.connections.iter().map(|c| connection(c, now)).collect();
    json!({"total": page.total, "connections": connections, "next": page.next})
}

fn connection(c: &ConnectionView, now: SystemTime) -> Value {
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let started = now.checked_sub(c.age).unwrap_or(now);
    json!({
        "id": c.id,
        "listener": c.listener,
        "client": c.client.to_string(),
        "identity": c.identity,
        "serial": c.serial,
        "not_after": c.not_after.map(|at| humantime::format_rfc3339_seconds(at).to_string()),
        "sni": c.sni,
        "alpn": c.alpn,
        "upstream": c.upstream,
        "backend": c.backend,
        "phase": c.phase.label(),
        "started": humantime::format_rfc3339_millis(started).to_string(),
        "age_ms": millis(c.age),
        "idle_ms": millis(c.idle),
        "bytes_up": c.bytes_up,
        "bytes_down": c.bytes_down,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::state::registry::Phase;

    fn filter(identity: Option<&str>, serial: Option<&str>) -> ConnectionFilter {
        ConnectionFilter {
            identity: identity.map(str::to_string),
            serial: serial.map(str::to_string),
            ..ConnectionFilter::default()
        }
    }

    #[test]
    fn a_listing_reads_percent_encoded_filters_a_cursor_and_a_limit_capped_at_a_thousand() {
        assert_eq!(
            listing(None),
            Ok(Listing {
                limit: MAX_PAGE,
                ..Listing::default()
            })
        );
        let read = listing(Some(
            "identity=spiffe%3A%2F%2Fexample.org%2Fbob&serial=7F%3A00&after=12&limit=5000",
        ))
        .expect("a valid query");
        assert_eq!(
            read.filter,
            filter(Some("spiffe://example.org/bob"), Some("7F:00"))
        );
        assert_eq!((read.after, read.limit), (12, MAX_PAGE));
        let read = listing(Some("listener=tls&backend=10.0.0.1%3A80&limit=1")).expect("valid");
        assert_eq!(
            (
                read.filter.listener.as_deref(),
                read.filter.backend.as_deref(),
                read.limit
            ),
            (Some("tls"), Some("10.0.0.1:80"), 1)
        );
    }

    #[test]
    fn a_listing_with_an_unknown_repeated_empty_or_malformed_parameter_is_refused() {
        for query in [
            "identiy=bob",
            "identity=bob&identity=alice",
            "identity=",
            "serial=xyz",
            "limit=0",
            "limit=-1",
            "after=first",
            "identity=%ZZ",
            "identity=%ff",
        ] {
            assert!(listing(Some(query)).is_err(), "{query}");
        }
    }

    #[test]
    fn closing_needs_at_least_one_filter_and_takes_dry_run() {
        assert_eq!(
            closing(br#"{"identity": "bob"}"#),
            Ok(Closing {
                filter: filter(Some("bob"), None),
                dry_run: false
            })
        );
        assert_eq!(
            closing(br#"{"serial": "01:a2", "dry_run": true}"#),
            Ok(Closing {
                filter: filter(None, Some("01:a2")),
                dry_run: true
            })
        );
        for refused in [
            &b""[..],
            b"{}",
            br#"{"dry_run": true}"#,
            br#"{"identity": ""}"#,
            br#"{"identity": "bob", "everyone": true}"#,
            br#"{"serial": "not hex"}"#,
            b"identity=bob",
        ] {
            assert!(closing(refused).is_err(), "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn a_page_renders_every_field_with_the_cursor() {
        let view = ConnectionView {
            id: 7,
            listener: "tls".into(),
            client: "192.0.2.7:4000".parse().expect("address"),
            identity: Some("alice".into()),
            serial: Some("01:a2".into()),
            not_after: Some(UNIX_EPOCH + Duration::from_secs(86_400)),
            sni: Some("localhost".into()),
            alpn: None,
            upstream: Some("web".into()),
            backend: Some("10.0.0.1:80".into()),
            age: Duration::from_millis(2500),
            idle: Duration::from_millis(500),
            bytes_up: 3,
            bytes_down: 4,
            phase: Phase::Proxied,
        };
        let page = Page {
            total: 9,
            connections: vec![view],
            next: Some(7),
        };
        let now = UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(
            render(&page, now),
            json!({"total": 9, "next": 7, "connections": [{
                "id": 7, "listener": "tls", "client": "192.0.2.7:4000", "identity": "alice",
                "serial": "01:a2", "not_after": "1970-01-02T00:00:00Z", "sni": "localhost",
                "alpn": null, "upstream": "web", "backend": "10.0.0.1:80", "phase": "proxied",
                "started": "1970-01-01T00:00:07.500Z", "age_ms": 2500, "idle_ms": 500,
                "bytes_up": 3, "bytes_down": 4,
            }]})
        );
    }
}
