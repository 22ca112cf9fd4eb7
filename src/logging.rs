//! The process's log lines (tracing, to stderr), written off the connection path.
//!
//! A line is formatted on the task that logs it and handed to a bounded queue; one thread writes
//! the queue to stderr. When the queue is full the line is dropped and counted
//! (`fulcrum_log_dropped_total`): a slow or blocked stderr never stalls a connection. A stderr
//! whose reader has gone loses lines, nothing else. This module sets the subscriber up and owns
//! the two line formats: text (coloured only on a terminal without `NO_COLOR`) and JSON (one
//! object per line, the span fields as top-level keys). What is logged is decided where it
//! happens.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::sync::OnceLock;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Lines that may wait for the writer thread before new ones are dropped.
pub const QUEUED_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber: `level` (an `EnvFilter` directive; `RUST_LOG` wins) to
/// stderr through the non-blocking writer, as `format` says. Keep the guard until exit: dropping
/// it writes what is queued. A second call installs nothing (the first subscriber stays).
pub fn init(level: &str, format: LogFormat) -> WorkerGuard {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = coloured(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("fulcrum-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // A closed stderr (its reader gone) must not stop the balancer: by default the subscriber
        // reports a failed write with eprintln!, which panics on that same closed stderr.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour).try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
    };
    guard
}

/// Log lines dropped so far because the writer fell behind (0 before [`init`]).
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Whether text lines carry colour: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
fn coloured(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The keys every JSON line starts with; a field of the same name is written as `fields.NAME`.
const FIXED_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// The JSON line format: `timestamp`, `level`, `target`, `message`, then the fields of the
/// event's spans (outermost first, an inner span's field replacing an outer one's) and of the
/// event itself, each a top-level key. Needs [`JsonFields`] as the span field formatter, so that
/// a span's recorded fields are a JSON object.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = EventFields::default();
        for span in ctx.event_scope().into_iter().flat_map(|scope| scope.from_root()) {
            let extensions = span.extensions();
            let Some(recorded) = extensions.get::<FormattedFields<N>>() else {
                continue;
            };
            // Empty when the span has no field with a value yet.
            if let Ok(Value::Object(object)) = serde_json::from_str::<Value>(recorded) {
                fields.values.extend(object);
            }
        }
        event.record(&mut fields);
        let metadata = event.metadata();
        let target = fields.log_target.as_deref().unwrap_or(metadata.target());
        let message = fields.values.remove("message").unwrap_or_default();
        write!(
            writer,
            "{{\"timestamp\":{},\"level\":{},\"target\":{},\"message\":{message}",
            Value::from(humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()),
            Value::from(metadata.level().as_str()),
            Value::from(target),
        )?;
        for (key, value) in fields.values {
            let key = match FIXED_KEYS.contains(&key.as_str()) {
                true => format!("fields.{key}"),
                false => key,
            };
            write!(writer, ",{}:{value}", Value::from(key))?;
        }
        writeln!(writer, "}}")
    }
}

/// An event's fields as JSON values; a `log` crate record's `log.*` fields are its metadata, of
/// which only the target is kept (as the line's `target`).
#[derive(Default)]
struct EventFields {
    values: BTreeMap<String, Value>,
    log_target: Option<String>,
}

impl EventFields {
    fn insert(&mut self, field: &Field, value: Value) {
        match field.name().strip_prefix("log.") {
            Some("target") => self.log_target = value.as_str().map(str::to_string),
            Some(_) => {}
            None => {
                self.values.insert(field.name().to_string(), value);
            }
        }
    }
}

impl Visit for EventFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn colour_is_used_only_on_a_terminal_without_a_non_empty_no_color() {
        assert!(coloured(true, None));
        assert!(coloured(true, Some(OsStr::new(""))));
        assert!(!coloured(true, Some(OsStr::new("1"))));
        assert!(!coloured(true, Some(OsStr::new("0"))));
        assert!(!coloured(false, None));
        assert!(!coloured(false, Some(OsStr::new(""))));
    }

    /// What the subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `log` writes, each parsed.
    fn json_lines(log: impl FnOnce()) -> Vec<serde_json::Map<String, Value>> {
        let buffer = Buffer::default();
        let written = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || written.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(object)) => object,
                other => panic!("not a JSON object: {line}: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_json_line_carries_the_span_fields_as_top_level_keys_with_those_recorded_later() {
        let lines = json_lines(|| {
            let span = tracing::info_span!(
                "conn",
                client.addr = "192.0.2.7:5000",
                listener = "web",
                upstream = tracing::field::Empty
            );
            let _entered = span.enter();
            tracing::Span::current().record("upstream", "pool");
            tracing::info!(bytes = 42_u64, "connection closed");
        });
        let [line] = &lines[..] else {
            panic!("one line expected: {lines:?}");
        };
        assert_eq!(line["message"], "connection closed");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["client.addr"], "192.0.2.7:5000");
        assert_eq!(line["listener"], "web");
        assert_eq!(line["upstream"], "pool");
        assert_eq!(line["bytes"], 42);
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line:?}"
        );
        assert!(
            !line.contains_key("span") && !line.contains_key("fields"),
            "{line:?}"
        );
    }

    #[test]
    fn a_json_line_outside_any_span_has_the_fixed_keys_and_a_field_named_like_one_is_kept_aside() {
        let lines = json_lines(|| tracing::warn!(level = "custom", "alone"));
        let [line] = &lines[..] else {
            panic!("one line expected: {lines:?}");
        };
        assert_eq!(line["message"], "alone");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields.level"], "custom");
    }
}
