//! `[log]`: how the process's own log lines are written ([`LogConfig`]: `format`, text or JSON).
//!
//! This file says what a valid `[log]` section is; it must not set up logging (`crate::logging`
//! does, once, at startup: a reload does not change the format).

use serde::Deserialize;

use super::values::{ConfigError, Validator};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `"text"` (the default): one human-readable line per event, with the span fields as
    /// `key=value`; coloured only on a terminal.
    #[default]
    Text,
    /// `"json"`: one JSON object per line, the span fields as top-level keys.
    Json,
}

impl LogFormat {
    /// The names `[log] format` and `--log-format` take.
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    /// The format called `name` (one of [`LogFormat::NAMES`]).
    pub fn from_name(name: &str) -> Option<LogFormat> {
        match name {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// `[log]`: the process's log lines (not the access log, `[access_log]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// `format`: text or JSON lines; `--log-format` wins over it.
    pub format: LogFormat,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    /// "text" (the default: human-readable lines) or "json" (one JSON object per line, for a log
    /// collector). Read at startup; `--log-format` wins over it and a reload does not change it.
    #[schemars(extend("enum" = ["text", "json"]))]
    format: Option<String>,
}

impl Validator<'_> {
    /// `[log]`, defaults if absent.
    pub(super) fn log(&self, raw: Option<RawLog>) -> Result<LogConfig, ConfigError> {
        let format = match raw.and_then(|r| r.format) {
            None => LogFormat::default(),
            Some(name) => match LogFormat::from_name(&name) {
                Some(format) => format,
                None => return Err(self.invalid("log.format", &name, "expected \"text\" or \"json\"")),
            },
        };
        Ok(LogConfig { format })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, LogFormat};

    const MINIMAL: &str = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\n\
                           [[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:80\"]\n";

    fn format(log: &str) -> Result<LogFormat, String> {
        Config::from_toml(&format!("{MINIMAL}\n{log}"), "test.toml")
            .map(|c| c.log.format)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_log_format_is_text_unless_the_log_section_says_json() {
        assert_eq!(format(""), Ok(LogFormat::Text));
        assert_eq!(format("[log]\n"), Ok(LogFormat::Text));
        assert_eq!(format("[log]\nformat = \"text\"\n"), Ok(LogFormat::Text));
        assert_eq!(format("[log]\nformat = \"json\"\n"), Ok(LogFormat::Json));
    }

    #[test]
    fn an_unknown_log_format_is_refused_naming_the_key_and_the_value() {
        let error = format("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(
            error.contains("log.format") && error.contains("\"xml\""),
            "{error}"
        );
    }
}
