//! The table of every open connection, plain and TLS, of every listener and every generation,
//! from accept to close ([`Connections`]): what `GET /connections` lists and what
//! `POST /connections/close` (and a quarantine, through [`Connections::close_matching`]) cuts; the
//! signal a cut connection watches ([`CutSignal`]) and why it was cut ([`Cut`]); the filter both
//! select with ([`ConnectionFilter`], pure).
//!
//! The table holds each connection's record behind [`OpenConnection`]: the record (what it shows,
//! set once per phase, and its byte and activity counters) is the connection room's, which sits
//! above this one. A connection is in the table while its [`Tracked`] handle lives (RAII): no path
//! can leave one behind. The table is bounded by the process's `max_connections` (a connection is
//! tracked only once it holds its places). Locks are held only to insert, remove, or clone the
//! records' `Arc`s; nothing is read, formatted or cut under one. It does not close sockets: a cut
//! connection's task does, watching its signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

/// Why an open connection was cut: the `end` of its log line and access log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// A reload took its access away (identity, CA, CRL).
    AccessRevoked,
    /// Its client certificate expired (`close_on_expiry`).
    CertExpired,
    /// An operator closed it (`POST /connections/close`, `fulcrum ctl close`).
    ClosedByOperator,
    /// Its identity or certificate serial was quarantined.
    Quarantined,
}

/// The signal a connection watches: set once, with the reason it was cut. No allocation: it
/// lives inline in what owns it.
#[derive(Debug, Default)]
pub struct CutSignal {
    reason: OnceLock<Cut>,
    notify: Notify,
}

impl CutSignal {
    /// Cuts the connection for `reason`; the first reason stands. Whether this call cut it.
    pub(crate) fn cut(&self, reason: Cut) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.notify.notify_waiters();
        }
        first
    }

    /// Completes when the connection is cut (at once if it already was).
    pub async fn cancelled(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the check: a cut in between still wakes this waiter.
        notified.as_mut().enable();
        if self.reason.get().is_none() {
            notified.await;
        }
    }

    /// Why the connection was cut, once it has been.
    pub fn reason(&self) -> Option<Cut> {
        self.reason.get().copied()
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// From accept through the PROXY header, the TLS handshake and admission.
    Handshake,
    /// Admitted, waiting for a backend: the rate limit, the upstream's queue and the dial.
    Queued,
    /// A backend answered: bytes are relayed.
    Proxied,
}

impl Phase {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Queued => "queued",
            Phase::Proxied => "proxied",
        }
    }
}

/// What a filter compares of a connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Seen<'a> {
    pub(crate) listener: &'a str,
    /// The client identity (mTLS), once admitted.
    pub(crate) identity: Option<&'a str>,
    /// The client certificate's serial as the access log writes it (mTLS), once admitted.
    pub(crate) serial: Option<&'a str>,
    /// The backend's configured `host:port`, once one answered.
    pub(crate) backend: Option<&'a str>,
}

/// One open connection as the table lists it, read from its record at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConnectionView {
    pub(crate) id: u64,
    pub(crate) listener: String,
    /// The client's address (the PROXY header's, when one was accepted).
    pub(crate) client: SocketAddr,
    pub(crate) identity: Option<String>,
    /// Hex with colons, as the access log writes it.
    pub(crate) serial: Option<String>,
    pub(crate) not_after: Option<SystemTime>,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<String>,
    pub(crate) upstream: Option<String>,
    pub(crate) backend: Option<String>,
    /// Since accept.
    pub(crate) age: Duration,
    /// Since a byte last moved either way (or since accept).
    pub(crate) idle: Duration,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) phase: Phase,
}

/// What the table needs of an open connection's record. The record itself belongs to the
/// connection room (above this one), which fills it in as the connection goes.
pub(crate) trait OpenConnection: Send + Sync {
    /// Its id in the table.
    fn id(&self) -> u64;
    /// What filters compare.
    fn seen(&self) -> Seen<'_>;
    /// Everything the listing shows, read at `now`.
    fn view(&self, now: Instant) -> ConnectionView;
    /// The signal the connection watches.
    fn signal(&self) -> &CutSignal;
}

/// Which open connections an operator means: every field given must match (none given: every
/// connection, which [`ConnectionFilter::is_empty`] lets callers refuse).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnectionFilter {
    /// The client identity, exactly.
    pub(crate) identity: Option<String>,
    /// The listener's name.
    pub(crate) listener: Option<String>,
    /// The backend's configured `host:port`, as the access log and `/status` show it.
    pub(crate) backend: Option<String>,
    /// The client certificate's serial: hex, colons optional, any case, leading zeros and a
    /// `0x` prefix ignored.
    pub(crate) serial: Option<String>,
}

impl ConnectionFilter {
    /// Whether it names nothing (and so matches every connection).
    pub(crate) fn is_empty(&self) -> bool {
        self == &ConnectionFilter::default()
    }

    /// Whether a connection showing `seen` matches. A connection not yet admitted (or not
    /// connected) matches no identity or serial (no backend) filter.
    pub(crate) fn matches(&self, seen: &Seen<'_>) -> bool {
        let exactly = |wanted: &Option<String>, shown: Option<&str>| {
            wanted.as_deref().is_none_or(|wanted| shown == Some(wanted))
        };
        exactly(&self.listener, Some(seen.listener))
            && exactly(&self.identity, seen.identity)
            && exactly(&self.backend, seen.backend)
            && self.serial.as_deref().is_none_or(|wanted| {
                seen.serial
                    .is_some_and(|shown| serial_digits(wanted).eq(serial_digits(shown)))
            })
    }
}

/// Whether `text` is a certificate serial as a filter takes it: hex digits, optionally with
/// colons and a `0x` prefix, at most 20 bytes' worth (RFC 5280).
pub(crate) fn is_serial(text: &str) -> bool {
    let hex = text.strip_prefix("0x").unwrap_or(text);
    let digits = hex.bytes().filter(|b| *b != b':').count();
    (1..=64).contains(&digits) && hex.bytes().all(|b| b == b':' || b.is_ascii_hexdigit())
}

/// A serial's significant digits, lowercase: without a `0x` prefix, colons and leading zeros.
/// Compared as iterators, so matching allocates nothing.
fn serial_digits(text: &str) -> impl Iterator<Item = u8> + '_ {
    text.strip_prefix("0x")
        .unwrap_or(text)
        .bytes()
        .filter(|b| *b != b':')
        .skip_while(|b| *b == b'0')
        .map(|b| b.to_ascii_lowercase())
}

/// One page of the listing: the matching connections after a cursor, in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Page {
    /// Matching connections in all (on every page).
    pub(crate) total: usize,
    pub(crate) connections: Vec<ConnectionView>,
    /// The cursor for the next page (the last id listed), when more match.
    pub(crate) next: Option<u64>,
}

/// Shards of the table: accepts and closes on different cores rarely meet on one lock.
const SHARDS: usize = 16;

/// Every open connection, by id. Ids count up from 1 and are never reused.
pub(crate) struct Connections {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<dyn OpenConnection>>>; SHARDS],
}

impl Default for Connections {
    fn default() -> Connections {
        Connections {
            next: AtomicU64::new(1),
            shards: Default::default(),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("open", &self.len()).finish()
    }
}

/// A connection's place in the table: its record, listed until this handle drops.
pub(crate) struct Tracked<C: OpenConnection + 'static> {
    table: Arc<Connections>,
    record: Arc<C>,
}

impl<C: OpenConnection + 'static> Tracked<C> {
    /// The record, shared (for a borrower that outlives a borrow of the handle).
    pub(crate) fn record(&self) -> &Arc<C> {
        &self.record
    }
}

impl<C: OpenConnection + 'static> Deref for Tracked<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.record
    }
}

impl<C: OpenConnection + 'static> Drop for Tracked<C> {
    fn drop(&mut self) {
        let id = self.record.id();
        self.table.shard(id).remove(&id);
    }
}

impl Connections {
    /// Lists the record `make` builds with a fresh id, until the returned handle drops.
    pub(crate) fn track<C: OpenConnection + 'static>(
        self: &Arc<Self>,
        make: impl FnOnce(u64) -> C,
    ) -> Tracked<C> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(make(id));
        let listed: Arc<dyn OpenConnection> = Arc::clone(&record) as Arc<dyn OpenConnection>;
        self.shard(id).insert(id, listed);
        Tracked {
            table: Arc::clone(self),
            record,
        }
    }

    /// Open connections now.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// The matching connections with an id above `after`, at most `limit` of them, in id order,
    /// read at `now`.
    pub(crate) fn page(&self, filter: &ConnectionFilter, after: u64, limit: usize, now: Instant) -> Page {
        let mut matching = self.matching(filter);
        matching.sort_unstable_by_key(|c| c.id());
        let total = matching.len();
        let start = matching.partition_point(|c| c.id() <= after);
        let connections: Vec<ConnectionView> = matching[start..]
            .iter()
            .take(limit)
            .map(|c| c.view(now))
            .collect();
        let next = match connections.last() {
            Some(last) if start + connections.len() < total => Some(last.id),
            _ => None,
        };
        Page {
            total,
            connections,
            next,
        }
    }

    /// Open connections matching `filter` that are not cut yet: what
    /// [`Connections::close_matching`] would close now.
    pub(crate) fn count_matching(&self, filter: &ConnectionFilter) -> usize {
        self.matching(filter)
            .iter()
            .filter(|c| c.signal().reason().is_none())
            .count()
    }

    /// Cuts every open connection matching `filter` for `reason` (each one's task then resets
    /// it and logs `end=` the reason's label, and its counts are given back as it ends). Returns
    /// how many this call cut (not those cut before, for this or another reason).
    ///
    /// The seam for closing connections by policy: `POST /connections/close` calls it with
    /// [`Cut::ClosedByOperator`], a quarantine with [`Cut::Quarantined`].
    pub(crate) fn close_matching(&self, filter: &ConnectionFilter, reason: Cut) -> usize {
        self.matching(filter)
            .iter()
            .filter(|c| c.signal().cut(reason))
            .count()
    }

    /// The records matching `filter`: their `Arc`s cloned under each shard's lock in turn, then
    /// judged with no lock held.
    fn matching(&self, filter: &ConnectionFilter) -> Vec<Arc<dyn OpenConnection>> {
        let mut all: Vec<Arc<dyn OpenConnection>> = Vec::new();
        for shard in &self.shards {
            all.extend(lock(shard).values().cloned());
        }
        all.retain(|c| filter.matches(&c.seen()));
        all
    }

    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Arc<dyn OpenConnection>>> {
        lock(&self.shards[(id % SHARDS as u64) as usize])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Map updates and `Arc` clones only; nothing can panic while a shard is locked.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
