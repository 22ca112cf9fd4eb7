//! The access log: one JSON line per closed connection, refused ones included.
//!
//! Connection tasks never touch the disk. Each builds an [`Entry`] as it goes and hands it to
//! [`AccessLog::send`], which only tries to put it on a bounded channel: when the channel is full
//! the entry is dropped and counted (`fulcrum_access_log_dropped_total`), never waited for. One
//! writer task ([`AccessLog::start`]) turns entries into lines, writes them through a buffer to
//! stdout or a file (tokio's file and stdout run the blocking writes on the blocking pool, so a
//! slow disk stalls no runtime thread), and flushes after every batch it takes off the channel.
//! Write errors are logged at most once per [`ERROR_LOG_INTERVAL`] and writing goes on. On
//! shutdown the writer drains what is queued, flushes and returns; `Server::run` waits for it.
//! SIGUSR1 ([`AccessLog::reopen`]) makes the writer flush and reopen the file at its path, for
//! `logrotate`: every line goes to the old file or the new one, none is lost. Connections open
//! longer than `[access_log] interim` send interim entries (outcome `interim`, bytes so far) when
//! their [`Interim`] checkpoint is due. This module owns the line format and when an interim
//! entry is due; it does not decide what a connection's outcome is.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::AccessLogConfig;
use crate::metrics::{Counter, Reason};

/// Entries that may wait for the writer before new ones are dropped.
pub(crate) const CHANNEL_CAPACITY: usize = 8192;
/// Most entries the writer takes off the channel before it writes and flushes.
const BATCH: usize = 512;
/// At most one write-error line per this interval (with the count of failures in between).
pub(crate) const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one connection did, filled in as it goes through its steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// When the connection ended.
    pub(crate) time: SystemTime,
    pub(crate) listener: String,
    pub(crate) client: SocketAddr,
    /// The verified client identity (mTLS listeners), once known.
    pub(crate) identity: Option<String>,
    /// The upstream chosen (SNI, ALPN or the listener's), once known.
    pub(crate) upstream: Option<String>,
    /// The protocol negotiated by ALPN, if any.
    pub(crate) alpn: Option<String>,
    /// The server name the client asked for (TLS SNI), if any.
    pub(crate) sni: Option<String>,
    /// The TLS version negotiated (`TLSv1.3`, `TLSv1.2`), on TLS listeners.
    pub(crate) tls_version: Option<&'static str>,
    /// The client certificate's serial (hex, colons) and `notAfter`, on mTLS listeners.
    pub(crate) client_serial: Option<String>,
    pub(crate) client_not_after: Option<SystemTime>,
    /// The backend's configured label, once one answered.
    pub(crate) backend: Option<String>,
    /// Bytes from the client to the backend.
    pub(crate) bytes_up: u64,
    /// Bytes from the backend to the client.
    pub(crate) bytes_down: u64,
    pub(crate) duration: Duration,
    /// How it ended: the `end` of the connection log line (`closed`, `client_reset`, ...), or
    /// `refused`; `interim` for an interim entry of a connection still open.
    pub(crate) outcome: &'static str,
    /// Whether fulcrum ended it with resets (a cut stream, or a peer's reset passed on).
    pub(crate) aborted: bool,
    /// Why it was refused, when `outcome` is `refused`.
    pub(crate) reason: Option<Reason>,
    /// What a shadow authorization table would have decided (`would_allow`, `would_deny`),
    /// only when it disagrees with the real one.
    pub(crate) shadow: Option<&'static str>,
}

impl Entry {
    /// A connection that has just been accepted. Until a step says otherwise its outcome is
    /// `drain_deadline`: the only ways to end without a refusal or a relay result are the
    /// shutdown's abort during the handshake or the dial.
    pub(crate) fn new(listener: &str, client: SocketAddr) -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH,
            listener: listener.to_string(),
            client,
            identity: None,
            upstream: None,
            alpn: None,
            sni: None,
            tls_version: None,
            client_serial: None,
            client_not_after: None,
            backend: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            outcome: "drain_deadline",
            aborted: false,
            reason: None,
            shadow: None,
        }
    }

    /// Marks the connection refused for `reason`.
    pub(crate) fn refuse(&mut self, reason: Reason) {
        self.outcome = "refused";
        self.reason = Some(reason);
    }

    /// The JSON line for this entry, without the newline.
    pub(crate) fn to_line(&self) -> String {
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            listener: &self.listener,
            client: self.client,
            identity: self.identity.as_deref(),
            upstream: self.upstream.as_deref(),
            alpn: self.alpn.as_deref(),
            sni: self.sni.as_deref(),
            tls_version: self.tls_version,
            client_serial: self.client_serial.as_deref(),
            client_not_after: self
                .client_not_after
                .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
            backend: self.backend.as_deref(),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            outcome: self.outcome,
            aborted: self.aborted,
            reason: self.reason.map(Reason::label),
            shadow: self.shadow,
        };
        // Serializing plain strings and numbers cannot fail; fall back to an empty object anyway.
        serde_json::to_string(&line).unwrap_or_else(|_| "{}".to_string())
    }
}

/// When a long connection's next interim entry is due, and where it goes (`[access_log]
/// interim`): the relay's meter asks [`Interim::due`] and calls [`Interim::checkpoint`] then.
pub(crate) struct Interim<'a> {
    every: Duration,
    next: tokio::time::Instant,
    started: Instant,
    log: Arc<AccessLog>,
    /// The access log entry so far (the interim entries' fields).
    entry: &'a Entry,
}

impl<'a> Interim<'a> {
    /// Interim entries of `entry`, a connection that started at `started`, to `log` `every` so
    /// often; the first one `every` after `started`.
    pub(crate) fn new(
        log: &Arc<AccessLog>,
        every: Duration,
        started: Instant,
        entry: &'a Entry,
    ) -> Interim<'a> {
        Interim {
            every,
            next: crate::clock::later(tokio::time::Instant::from_std(started), every),
            started,
            log: Arc::clone(log),
            entry,
        }
    }

    /// When the next interim entry is due.
    pub(crate) fn due(&self) -> tokio::time::Instant {
        self.next
    }

    /// Sends the interim entry due: the entry so far with `up` and `down`, the bytes moved each
    /// way until now; the next one is due `every` later.
    pub(crate) fn checkpoint(&mut self, up: u64, down: u64) {
        let mut entry = self.entry.clone();
        entry.outcome = "interim";
        entry.bytes_up = up;
        entry.bytes_down = down;
        entry.duration = self.started.elapsed();
        self.log.send(entry);
        self.next = crate::clock::later(self.next, self.every);
    }
}

/// The JSON shape of a line. Field names are a public contract: keep them.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    listener: &'a str,
    client: SocketAddr,
    identity: Option<&'a str>,
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alpn: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_not_after: Option<String>,
    backend: Option<&'a str>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
    outcome: &'static str,
    aborted: bool,
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<&'static str>,
}

/// The sending half, shared by every listener, and the writer's pieces until it starts.
#[derive(Debug)]
pub(crate) struct AccessLog {
    target: AccessLogConfig,
    sender: mpsc::Sender<Entry>,
    /// Entries lost because the channel was full (or the writer gone).
    pub(crate) dropped: Counter,
    /// The receiver and the opened output, taken once by [`AccessLog::start`].
    writer: Mutex<Writer>,
    /// Asks the writer to reopen the file ([`AccessLog::reopen`]).
    reopen: std::sync::Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct Writer {
    receiver: Option<mpsc::Receiver<Entry>>,
    output: Option<Output>,
}

#[derive(Debug)]
enum Output {
    Stdout,
    File(std::fs::File),
}

impl AccessLog {
    /// A log to `target` with room for `capacity` waiting entries. Opens nothing yet.
    pub(crate) fn new(target: AccessLogConfig, capacity: usize) -> AccessLog {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        AccessLog {
            target,
            sender,
            dropped: Counter::default(),
            writer: Mutex::new(Writer {
                receiver: Some(receiver),
                output: None,
            }),
            reopen: Default::default(),
        }
    }

    /// Opens (creates, appends to) the log file, so a bad path stops the server at startup.
    pub(crate) fn open(&self) -> io::Result<()> {
        let output = match &self.target {
            AccessLogConfig::Stdout => Output::Stdout,
            AccessLogConfig::File(path) => {
                Output::File(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).output = Some(output);
        Ok(())
    }

    /// Asks the writer to close and open the file again, after what it has taken so far is
    /// written (SIGUSR1, for `logrotate`). Nothing to do for stdout.
    pub(crate) fn reopen(&self) {
        self.reopen.notify_one();
    }

    /// Queues an entry without waiting; a full queue drops it and counts the drop.
    pub(crate) fn send(&self, mut entry: Entry) {
        entry.time = SystemTime::now();
        if self.sender.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }

    /// Spawns the writer (once; later calls return `None`, as does a log never [`open`]ed). It
    /// writes until `stop` is cancelled, then drains what is queued, flushes and returns.
    ///
    /// [`open`]: AccessLog::open
    pub(crate) fn start(&self, stop: CancellationToken) -> Option<JoinHandle<()>> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = writer.receiver.take()?;
        let output: Box<dyn AsyncWrite + Send + Unpin> = match writer.output.take()? {
            Output::Stdout => Box::new(tokio::io::stdout()),
            Output::File(file) => Box::new(tokio::fs::File::from_std(file)),
        };
        let path = match &self.target {
            AccessLogConfig::Stdout => None,
            AccessLogConfig::File(path) => Some(path.clone()),
        };
        let reopen = std::sync::Arc::clone(&self.reopen);
        Some(tokio::spawn(write_lines(receiver, output, path, reopen, stop)))
    }
}

/// The writer task: batches off the channel, one write and flush per batch; on a reopen request
/// (a file only), flushes and switches to a freshly opened file at the same path.
async fn write_lines(
    mut receiver: mpsc::Receiver<Entry>,
    output: Box<dyn AsyncWrite + Send + Unpin>,
    path: Option<std::path::PathBuf>,
    reopen: std::sync::Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let name = path
        .as_ref()
        .map_or_else(|| "stdout".to_string(), |p| p.display().to_string());
    let mut out = BufWriter::new(output);
    let mut errors = ErrorLog::default();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let taken = tokio::select! {
            _ = stop.cancelled() => break,
            _ = reopen.notified() => {
                if let Some(path) = &path {
                    reopen_file(&mut out, path, &name, &mut errors).await;
                }
                continue;
            }
            taken = receiver.recv_many(&mut batch, BATCH) => taken,
        };
        if taken == 0 {
            // Every sender is gone: nothing more can arrive.
            break;
        }
        write_batch(&mut out, &mut batch, &name, &mut errors).await;
    }
    // Shutdown: whatever is queued now (at most the channel's capacity) still gets written.
    receiver.close();
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        write_batch(&mut out, &mut batch, &name, &mut errors).await;
    }
}

/// Flushes what was written so far to the old file, then writes to a new one at `path`; if it
/// cannot be opened, the old one is kept (and the failure logged).
async fn reopen_file(
    out: &mut BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    path: &std::path::Path,
    name: &str,
    errors: &mut ErrorLog,
) {
    if let Err(e) = out.flush().await {
        errors.report(name, &e, Instant::now());
    }
    let opened = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await;
    match opened {
        Ok(file) => {
            *out = BufWriter::new(Box::new(file));
            tracing::info!(log = %name, "access log reopened");
        }
        Err(error) => warn!(log = %name, %error, "access log: cannot reopen; writing on to the old file"),
    }
}

async fn write_batch(
    out: &mut BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    batch: &mut Vec<Entry>,
    name: &str,
    errors: &mut ErrorLog,
) {
    for entry in batch.drain(..) {
        let mut line = entry.to_line();
        line.push('\n');
        if let Err(e) = out.write_all(line.as_bytes()).await {
            errors.report(name, &e, Instant::now());
        }
    }
    if let Err(e) = out.flush().await {
        errors.report(name, &e, Instant::now());
    }
}

/// Logs the first write error, then at most one per [`ERROR_LOG_INTERVAL`] with how many failed
/// in between.
#[derive(Debug, Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn report(&mut self, name: &str, error: &io::Error, now: Instant) {
        if self.admit(now) {
            let suppressed = std::mem::take(&mut self.suppressed);
            warn!(log = %name, %error, suppressed, "access log write failed; lines are being lost");
        }
    }

    /// Whether an error at `now` may be logged; counts it as suppressed if not.
    fn admit(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.duration_since(last) < ERROR_LOG_INTERVAL => {
                self.suppressed += 1;
                false
            }
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxied() -> Entry {
        let mut entry = Entry::new("web", "127.0.0.1:40000".parse().expect("address"));
        entry.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        entry.identity = Some("alice".into());
        entry.upstream = Some("web".into());
        entry.backend = Some("10.0.0.1:80".into());
        entry.bytes_up = 12;
        entry.bytes_down = 3400;
        entry.duration = Duration::from_micros(25_900);
        entry.outcome = "closed";
        entry
    }

    #[test]
    fn a_proxied_connection_is_one_json_line_with_every_field() {
        let line = proxied().to_line();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect("line is JSON");
        assert_eq!(value["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(value["listener"], "web");
        assert_eq!(value["client"], "127.0.0.1:40000");
        assert_eq!(value["identity"], "alice");
        assert_eq!(value["upstream"], "web");
        assert_eq!(value["backend"], "10.0.0.1:80");
        assert_eq!(value["bytes_up"], 12);
        assert_eq!(value["bytes_down"], 3400);
        assert_eq!(value["duration_ms"], 25);
        assert_eq!(value["outcome"], "closed");
        assert!(value["reason"].is_null());
    }

    #[test]
    fn an_mtls_entry_carries_sni_tls_version_and_the_client_certificate_and_a_plain_one_does_not() {
        let plain: serde_json::Value = serde_json::from_str(&proxied().to_line()).expect("JSON");
        for field in ["sni", "tls_version", "client_serial", "client_not_after", "alpn"] {
            assert!(
                plain.get(field).is_none(),
                "{field} on a plain connection: {plain}"
            );
        }
        let mut entry = proxied();
        entry.sni = Some("api.example".into());
        entry.tls_version = Some("TLSv1.3");
        entry.client_serial = Some("01:ff".into());
        entry.client_not_after = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let value: serde_json::Value = serde_json::from_str(&entry.to_line()).expect("JSON");
        assert_eq!(value["sni"], "api.example");
        assert_eq!(value["tls_version"], "TLSv1.3");
        assert_eq!(value["client_serial"], "01:ff");
        assert_eq!(value["client_not_after"], "2027-01-15T08:00:00Z");
    }

    #[test]
    fn a_refused_connection_names_its_reason_and_has_no_backend() {
        let mut entry = Entry::new("web", "[::1]:5000".parse().expect("address"));
        entry.upstream = Some("web".into());
        entry.refuse(Reason::RateLimited);
        let value: serde_json::Value = serde_json::from_str(&entry.to_line()).expect("line is JSON");
        assert_eq!(value["outcome"], "refused");
        assert_eq!(value["reason"], "rate_limited");
        assert_eq!(value["client"], "[::1]:5000");
        assert!(value["backend"].is_null());
        assert!(value["identity"].is_null());
    }

    #[test]
    fn names_with_quotes_and_control_characters_stay_valid_json() {
        let mut entry = proxied();
        entry.identity = Some("spiffe://x/\"quoted\"\\\u{1}".into());
        let value: serde_json::Value = serde_json::from_str(&entry.to_line()).expect("line is JSON");
        assert_eq!(value["identity"], "spiffe://x/\"quoted\"\\\u{1}");
    }

    #[test]
    fn entries_beyond_the_channel_capacity_are_dropped_and_counted() {
        let log = AccessLog::new(AccessLogConfig::Stdout, 2);
        for _ in 0..5 {
            log.send(proxied());
        }
        assert_eq!(log.dropped.get(), 3);
    }

    #[test]
    fn write_errors_are_logged_once_per_interval() {
        let mut errors = ErrorLog::default();
        let start = Instant::now();
        assert!(errors.admit(start));
        assert!(!errors.admit(start + Duration::from_secs(1)));
        assert!(!errors.admit(start + Duration::from_secs(9)));
        assert_eq!(errors.suppressed, 2);
        assert!(errors.admit(start + ERROR_LOG_INTERVAL));
    }
}
