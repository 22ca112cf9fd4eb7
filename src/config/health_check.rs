//! `[upstream.health_check]`: how backends are probed and when they change state
//! ([`HealthCheckConfig`], `on_down`), the raw table it is read from, its defaults and its rules.
//!
//! This file must not probe anything (`probe` and `health` do); value parsers come from
//! `values.rs`.

use std::time::Duration;

use serde::Deserialize;

use super::values::{ConfigError, Validator};

/// Default time between two health probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Default deadline of one health probe (connect, send and expected reply together), capped at
/// the interval when only the interval is set.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Default consecutive successes that bring a down backend back.
pub const DEFAULT_HEALTH_RISE: u32 = 2;

/// Default consecutive failures (probes or real connects) that take a backend out.
pub const DEFAULT_HEALTH_FALL: u32 = 3;

/// `[upstream.health_check]`: how backends are probed and when they change state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Whether the table was given: healthy backends are probed too. When false, only backends
    /// that passive detection took out are probed, to bring them back.
    pub active: bool,
    /// Time between the starts of two probes of one backend (jittered by +-10%).
    pub interval: Duration,
    /// Deadline of one whole probe: connect, `send` and the `expect`ed reply.
    pub timeout: Duration,
    /// Consecutive successful probes that mark a down backend up.
    pub rise: u32,
    /// Consecutive failures (probes or real connects) that mark an up backend down.
    pub fall: u32,
    /// Bytes written after connecting; empty means none.
    pub send: Vec<u8>,
    /// Bytes the reply must start with; empty means a connect (and `send`) is enough.
    pub expect: Vec<u8>,
    /// What happens to connections already open to a backend when it is marked down.
    pub on_down: OnDown,
    /// Ramp-in period for a backend that comes back up; `None` gives it full share at once.
    pub slow_start: Option<Duration>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            active: false,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
            send: Vec::new(),
            expect: Vec::new(),
            on_down: OnDown::Keep,
            slow_start: None,
        }
    }
}

/// `on_down`: the fate of open connections to a backend that is marked down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDown {
    /// They run to their natural end (default): a backend failing probes may still serve them.
    Keep,
    /// They are closed at once (both sides reset).
    Close,
}

/// `[upstream.health_check]`: active probes of every backend; without it only a backend taken
/// out by failed dials is probed, with the defaults.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    /// Duration between probe starts, per backend (jittered +-10%).
    #[schemars(extend("default" = "2s"))]
    interval: Option<String>,
    /// Duration: deadline of one whole probe (connect, send, expected reply); at most
    /// `interval`; default "1s", or `interval` if that is shorter.
    #[schemars(extend("default" = "1s"))]
    timeout: Option<String>,
    /// Consecutive successful probes that bring a down backend back, at least 1.
    #[schemars(range(min = 1), extend("default" = 2))]
    rise: Option<u32>,
    /// Consecutive failures (probes or real connects) that take a backend out, at least 1.
    #[schemars(range(min = 1), extend("default" = 3))]
    fall: Option<u32>,
    /// Bytes written after connect (TOML escapes work); empty: a plain TCP connect.
    #[schemars(extend("default" = ""))]
    send: Option<String>,
    /// Bytes the reply must start with.
    #[schemars(extend("default" = ""))]
    expect: Option<String>,
    /// Open connections to a backend marked down: "keep" (they run on) or "close" (reset).
    #[schemars(extend("default" = "keep", "enum" = ["keep", "close"]))]
    on_down: Option<String>,
    /// Duration over which a backend that comes back is ramped in; default none.
    slow_start: Option<String>,
}

impl Validator<'_> {
    pub(super) fn health_check(
        &self,
        key: &str,
        raw: RawHealthCheck,
    ) -> Result<HealthCheckConfig, ConfigError> {
        let key = |field: &str| format!("{key}.{field}");
        let interval = match &raw.interval {
            Some(text) => self.duration(&key("interval"), text)?,
            None => DEFAULT_HEALTH_INTERVAL,
        };
        let timeout = match &raw.timeout {
            Some(text) => {
                let timeout = self.duration(&key("timeout"), text)?;
                if timeout > interval {
                    return Err(self.invalid(
                        key("timeout"),
                        text,
                        format!(
                            "must not exceed interval ({})",
                            humantime::format_duration(interval)
                        ),
                    ));
                }
                timeout
            }
            None => DEFAULT_HEALTH_TIMEOUT.min(interval),
        };
        let count = |field: &str, value: Option<u32>, default: u32| match value {
            Some(0) => Err(self.invalid(key(field), 0, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let on_down = match raw.on_down.as_deref() {
            None | Some("keep") => OnDown::Keep,
            Some("close") => OnDown::Close,
            Some(other) => return Err(self.invalid(key("on_down"), other, "expected \"keep\" or \"close\"")),
        };
        let slow_start = match &raw.slow_start {
            Some(text) => Some(self.duration(&key("slow_start"), text)?),
            None => None,
        };
        Ok(HealthCheckConfig {
            active: true,
            interval,
            timeout,
            rise: count("rise", raw.rise, DEFAULT_HEALTH_RISE)?,
            fall: count("fall", raw.fall, DEFAULT_HEALTH_FALL)?,
            send: raw.send.map(String::into_bytes).unwrap_or_default(),
            expect: raw.expect.map(String::into_bytes).unwrap_or_default(),
            on_down,
            slow_start,
        })
    }
}
