//! The process's log lines (tracing, to stderr), written off the connection path.
//!
//! A line is formatted on the task that logs it and handed to a bounded queue; one thread writes
//! the queue to stderr. When the queue is full the line is dropped and counted
//! (`fulcrum_log_dropped_total`): a slow or blocked stderr never stalls a connection. A stderr
//! whose reader has gone loses lines, nothing else. This module sets the subscriber up; what is
//! logged is decided where it happens.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines that may wait for the writer thread before new ones are dropped.
pub const QUEUED_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber: `level` (an `EnvFilter` directive; `RUST_LOG` wins) to
/// stderr through the non-blocking writer. Keep the guard until exit: dropping it writes what
/// is queued. A second call installs nothing (the first subscriber stays).
pub fn init(level: &str) -> WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("fulcrum-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // A closed stderr (its reader gone) must not stop the balancer: by default the subscriber
        // reports a failed write with eprintln!, which panics on that same closed stderr.
        .log_internal_errors(false)
        .try_init();
    guard
}

/// Log lines dropped so far because the writer fell behind (0 before [`init`]).
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
