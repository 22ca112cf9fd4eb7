//! A connection's end: how a proxied connection ended ([`End`], whose label is the `end` field of
//! the closing log line and the access log's `outcome`), the relay's [`Tally`] of the bytes it
//! moved (on the listener, the backend and the connection's record), and the lines that report
//! it ([`close`], [`cut_short`] for one cut before its relay, [`log`]).
//!
//! The relay classifies its result with [`End`]'s rules; this file says nothing about when to
//! stop relaying, and writes no access log line itself (the entry goes to `accesslog`'s queue).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::record::Record;
use crate::accesslog::{AccessLog, Entry, Interim};
use crate::proxy::{Meter, Progress, Side};
use crate::state::{Backend, Cut, Listener};

/// How a proxied connection ended: the `end` field of its log line and the access log's
/// `outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Both sides finished cleanly.
    Closed,
    /// Shutdown's drain deadline passed while it was open.
    DrainDeadline,
    /// A reload took the client's access away.
    AccessRevoked,
    /// The client's certificate expired (`close_on_expiry`).
    CertExpired,
    /// No byte either way for `idle_timeout`.
    IdleTimeout,
    /// Half-closed, and the other direction silent for `half_closed_timeout`.
    HalfClosedTimeout,
    /// Older than `max_lifetime` (less its jitter).
    MaxLifetime,
    /// Its backend was marked down with `on_down = "close"`.
    BackendDown,
    /// An operator put its backend in `maint`.
    BackendMaint,
    /// An operator closed it (`POST /connections/close`).
    ClosedByOperator,
    /// Its identity or certificate serial was quarantined.
    Quarantined,
    ClientReset,
    ClientError,
    BackendReset,
    BackendError,
}

impl End {
    pub(super) fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::DrainDeadline => "drain_deadline",
            End::AccessRevoked => "access_revoked",
            End::CertExpired => "cert_expired",
            End::IdleTimeout => "idle_timeout",
            End::HalfClosedTimeout => "half_closed_timeout",
            End::MaxLifetime => "max_lifetime",
            End::BackendDown => "backend_down",
            End::BackendMaint => "backend_maint",
            End::ClosedByOperator => "closed_by_operator",
            End::Quarantined => "quarantined",
            End::ClientReset => "client_reset",
            End::ClientError => "client_error",
            End::BackendReset => "backend_reset",
            End::BackendError => "backend_error",
        }
    }

    /// Whether fulcrum ended the connection itself on a timer (a timeout, the lifetime, the
    /// drain deadline), which with nothing in flight is a clean close.
    pub(super) fn is_cut(self) -> bool {
        matches!(
            self,
            End::IdleTimeout | End::HalfClosedTimeout | End::MaxLifetime | End::DrainDeadline
        )
    }

    /// Whether `e` means the peer reset the connection (`ENOTCONN` from a write or shutdown
    /// before our own FIN included).
    pub(super) fn is_reset(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
        )
    }

    /// The end for an I/O error on `side`.
    pub(super) fn failed(side: Side, e: &io::Error) -> End {
        match (side, End::is_reset(e)) {
            (Side::Client, true) => End::ClientReset,
            (Side::Client, false) => End::ClientError,
            (Side::Backend, true) => End::BackendReset,
            (Side::Backend, false) => End::BackendError,
        }
    }
}

impl From<Cut> for End {
    fn from(cut: Cut) -> End {
        match cut {
            Cut::AccessRevoked => End::AccessRevoked,
            Cut::CertExpired => End::CertExpired,
            Cut::ClosedByOperator => End::ClosedByOperator,
            Cut::Quarantined => End::Quarantined,
        }
    }
}

/// The relay's [`Meter`]: bytes counted on the listener, the backend and the connection's record
/// as they move, and the interim access log entries of a long connection (`[access_log]
/// interim`).
pub(super) struct Tally<'a> {
    progress: Progress,
    /// Of `progress`, the bytes written to a peer after its FIN (see [`Meter::late`]). Boxed:
    /// rare, and every idle connection's task carries this struct.
    late: Option<Box<Progress>>,
    // Owned (shared), not borrowed: the relay's future then keeps one pointer each.
    listener: Arc<Listener>,
    backend: Arc<Backend>,
    record: Arc<Record>,
    /// Boxed: most connections have none, and should not carry its size.
    interim: Option<Box<Interim<'a>>>,
}

impl<'a> Tally<'a> {
    /// The meter of a connection of `listener` to `backend` (its `record` in the table of open
    /// connections) that started at `started`; `entry`: its access log entry so far, with an
    /// access log (the interim entries' fields).
    pub(super) fn new(
        listener: &Arc<Listener>,
        backend: &Arc<Backend>,
        record: &Arc<Record>,
        started: Instant,
        entry: Option<&'a Entry>,
    ) -> Tally<'a> {
        let interim = match (&listener.access_log, listener.access_log_interim, entry) {
            (Some(log), Some(every), Some(entry)) => Some(Box::new(Interim::new(log, every, started, entry))),
            _ => None,
        };
        Tally {
            progress: Progress::default(),
            late: None,
            listener: Arc::clone(listener),
            backend: Arc::clone(backend),
            record: Arc::clone(record),
            interim,
        }
    }

    /// The record of the connection it counts for.
    pub(super) fn record(&self) -> &Record {
        &self.record
    }

    /// The bytes delivered, once the relay ended with `end`: what was written to a peer after
    /// its FIN counts only if that peer did not reset (it refused them), here and in the
    /// metrics.
    pub(super) fn settle(&mut self, end: End) -> Progress {
        let Some(mut late) = self.late.take().map(|late| *late) else {
            return self.progress;
        };
        if end == End::BackendReset {
            self.progress.client_to_backend = self
                .progress
                .client_to_backend
                .saturating_sub(late.client_to_backend);
            late.client_to_backend = 0;
        }
        if end == End::ClientReset {
            self.progress.backend_to_client = self
                .progress
                .backend_to_client
                .saturating_sub(late.backend_to_client);
            late.backend_to_client = 0;
        }
        if late != Progress::default() {
            self.moved(late.client_to_backend, late.backend_to_client);
        }
        self.progress
    }
}

impl Meter for Tally<'_> {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn moved(&mut self, up: u64, down: u64) {
        self.listener.figures.bytes.add(up, down);
        self.backend.bytes.add(up, down);
        self.record.moved(up, down);
    }

    fn late(&mut self, up: u64, down: u64) {
        let late = self.late.get_or_insert_with(Box::default);
        late.client_to_backend += up;
        late.backend_to_client += down;
    }

    fn next_checkpoint(&self) -> Option<tokio::time::Instant> {
        self.interim.as_ref().map(|i| i.due())
    }

    fn checkpoint(&mut self) {
        if let Some(interim) = &mut self.interim {
            interim.checkpoint(self.progress.client_to_backend, self.progress.backend_to_client);
        }
    }
}

/// How the relay ended: what [`close`] reports.
pub(super) struct Ended {
    pub(super) end: End,
    /// Whether fulcrum reset the legs.
    pub(super) aborted: bool,
    /// The bytes delivered ([`Tally::settle`]).
    pub(super) progress: Progress,
}

/// The end of a proxied connection of `listener` (as the generation that admitted it has it):
/// the connection-duration histogram, then its [`report`].
pub(super) fn close(ended: Ended, listener: &Listener, started: Instant, entry: Option<&mut Entry>) {
    listener.figures.duration.observe(started.elapsed());
    report(ended, started, entry);
}

/// The end of a connection cut (`why`) before its relay started, its client reset: reported as
/// a relay's would be, with no bytes moved.
pub(super) fn cut_short(why: Cut, started: Instant, entry: &mut Entry) {
    let ended = Ended {
        end: End::from(why),
        aborted: true,
        progress: Progress::default(),
    };
    report(ended, started, Some(entry));
}

/// The closing log line (bytes each way, duration, how it ended) and, with an access log, the
/// entry's bytes and outcome.
fn report(ended: Ended, started: Instant, entry: Option<&mut Entry>) {
    let Ended {
        end,
        aborted,
        progress,
    } = ended;
    info!(
        bytes_up = progress.client_to_backend,
        bytes_down = progress.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = end.label(),
        aborted,
        "connection closed"
    );
    if let Some(entry) = entry {
        entry.bytes_up = progress.client_to_backend;
        entry.bytes_down = progress.backend_to_client;
        entry.outcome = end.label();
        entry.aborted = aborted;
    }
}

/// Every connection's access log entry, refused ones included, with its duration: queued on
/// `log`, the listener's access log (none: nothing to do).
pub(super) fn log(log: Option<&AccessLog>, entry: Option<Box<Entry>>, started: Instant) {
    if let (Some(log), Some(mut entry)) = (log, entry) {
        entry.duration = started.elapsed();
        log.send(*entry);
    }
}
