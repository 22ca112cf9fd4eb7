//! The pure core of `[rate_limit.shared] shared_concurrency`: `max_concurrent` counted over every
//! instance sharing a store, as slots each instance leases from it.
//!
//! Each instance records in the store (Redis, driven by `cluster::slots`) how many of a client's
//! slots it holds, with an expiry: the lease. It holds its open connections' slots and, for a
//! busy client, a small block of spare ones, so that most connections are admitted here from the
//! spare without a round trip. This module decides, per connection, one of: admit from the
//! slots held, ask the store (one request in flight per client; the client's other connections
//! wait for its answer), or refuse; it plans the refreshes and give-backs of the keeper task; and
//! it holds the arithmetic the store applies ([`granted`]). It does no I/O and reads no clock
//! (time is an argument); the keeper's wake-up is a [`Notify`], which only signals.
//!
//! # What the store records
//! A request carries an [`Ask`]: `hold`, the connections open here (recorded whatever the others
//! hold: they are open), `need` (1 for a connection asking, 0 for a refresh) and `spare`. The
//! store computes `room = max(0, max_concurrent - others)`, `others` being what the other
//! instances' unexpired records hold, and records [`granted`]: `hold + need` if it fits in
//! `room`, plus at most `spare` and at most half of what is left of `room` (so one instance's
//! spare never takes the last slots another needs), never less than `hold`. The record expires
//! `lease` after the store wrote it; the keeper refreshes every record every third of the lease.
//!
//! # The bound
//! While every instance's record is refreshed before it expires, the connections open over all
//! instances never exceed `max_concurrent`: each instance's open connections are at most its
//! record, and the records sum to at most `max_concurrent`.
//! - A record only changes through [`granted`]. Its result is at most `room` (the sum stays
//!   within the cap), or it is `hold`, which is at most the instance's previous record (below),
//!   so the sum does not grow.
//! - `hold` is the instance's open connections, and it admits locally only below `granted` here,
//!   which never exceeds its record: after an answer it is the record (the store applies an
//!   instance's requests in the order they were made and ignores an older one arriving late);
//!   when a request is sent it is lowered to what the store will record whatever the others hold
//!   (they hold at most `max_concurrent` minus this record, so `room` is at least the record, and
//!   [`granted`] only grows with `room`); a request without an answer leaves that lower bound,
//!   right whether the store applied it or not.
//!
//! The store answers the record, or the room the others leave if that is less ([`usable`]): the
//! two differ only for a record forced over the cap by `hold` after its lease ended (below),
//! whose excess must not admit anyone.
//!
//! When an instance cannot renew its lease in time (Redis unreachable from it for a whole lease),
//! its record expires and its open connections stop counting for the others: the total can then
//! exceed `max_concurrent` by at most the connections that were open on such an instance when
//! its lease ended. It admits nothing more from its slots once its lease may have ended (the
//! lease is taken to start when the request was sent, before the store started it), and its next
//! successful request records its open connections again. A killed instance's connections ended
//! with it, so its slots simply come back within one lease. A store that loses its records (a
//! restarted Redis) is the same as every lease ending at once. The property tests in
//! `slots/tests.rs` check both statements against a model of the store.
//!
//! After the store had no slot for a client, this instance refuses that client's connections
//! that find no slot here without asking again for a twentieth of the lease ([`FULL_FOR`]):
//! conservative, never over the cap, and it keeps a client at its cap from costing a round trip
//! per connection.
//!
//! # Memory
//! At most `max_clients` clients are tracked. A client with no connection open here, no request
//! in flight and no slot held is dropped; when a new client finds the table full, the clients
//! with no connection open here are dropped first (at most once per refresh interval; their spare
//! slots then expire in the store with their lease), and if the table is still full the new
//! client is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::key::ClientKey;

/// What an instance asks the store to record for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Slots of the connections open here: recorded whatever the other instances hold.
    pub hold: u32,
    /// Slots for connections asking now (1 for an admission, 0 for a refresh or a give-back).
    pub need: u32,
    /// Spare slots wanted on top, so that the next connections need no round trip.
    pub spare: u32,
}

/// The slots the store records for an instance sending `ask` when `room` slots are not held by
/// the other instances (`max_concurrent` minus what they hold, at least 0). The Redis script in
/// `cluster::slots` applies exactly this; the two must stay the same.
pub fn granted(ask: Ask, room: u32) -> u32 {
    let wanted = ask.hold.saturating_add(ask.need);
    let base = wanted.min(room);
    let extra = ask.spare.min(room.saturating_sub(wanted) / 2);
    // `base + extra` is at most `room`.
    ask.hold.max(base + extra)
}

/// What the store answers an instance whose record is now `recorded` while the others leave
/// `room`: the slots it may hand out. Less than the record only when the record was forced over
/// the cap by `hold` (open connections recorded again after the lease ended): those connections
/// are counted, but they make no room for more.
pub fn usable(recorded: u32, room: u32) -> u32 {
    recorded.min(room)
}

/// After the store had no slot for a client, its connections that find no slot here are refused
/// without asking again for this fraction of the lease: a client hammering at its cap costs
/// Redis one round trip per instance per twentieth of the lease, not one per connection.
pub const FULL_FOR: u32 = 20;

/// The spare slots a busy client is given at most: a tenth of `max_concurrent`, at least 1.
pub fn block(max_concurrent: u32) -> u32 {
    (max_concurrent / 10).max(1)
}

/// One request to the store for one client: its [`Ask`] and the terms it is recorded on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub key: ClientKey,
    /// Grows with every request of this instance: the store ignores a request older than the
    /// last one of this instance it applied.
    pub seq: u64,
    pub ask: Ask,
    /// `max_concurrent`.
    pub cap: u32,
    /// How long the record lives in the store after the store wrote it.
    pub lease: Duration,
    /// When the request was made: here, the lease is taken to end `lease` after this.
    pub sent: Instant,
}

/// What [`Slots::acquire`] says to do with one connection.
#[derive(Debug)]
pub enum Acquire {
    /// Admitted from the slots this instance holds: no round trip.
    Admit(Slot),
    /// Send `Request` to the store, then give its answer to [`Slots::answer`].
    Ask(Request),
    /// A request of this client is in flight: wait for its answer, then ask again.
    Wait,
    /// The client has `max_concurrent` connections open over the instances (as far as known).
    Full,
    /// A new client, and the table of clients is full.
    TooManyClients,
}

/// What [`Slots::answer`] made of the store's answer.
#[derive(Debug)]
pub enum Answer {
    /// The connection that asked is admitted.
    Admit(Slot),
    /// The connection that asked is refused: the store had no slot for it.
    Full,
    /// No answer: the store could not be asked in time.
    Unavailable,
    /// A refresh or give-back was answered (or not): nothing to admit.
    Recorded,
}

/// A leased slot of one client, held by one open connection. Dropping it gives it back here;
/// the keeper gives it back to the store when this instance holds more spare than it keeps.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.key);
    }
}

/// The slots this instance holds, per client. Thread-safe through `&self`; one lock, held for a
/// few map operations (a sweep at most once per refresh interval).
#[derive(Debug)]
pub struct Slots {
    /// This instance's name in the store's records: unique per process and per `Slots`.
    instance: String,
    table: Mutex<Table>,
    /// Wakes the keeper when a client holds more spare than it keeps.
    wake: Notify,
}

#[derive(Debug)]
struct Table {
    cap: u32,
    lease: Duration,
    max_clients: usize,
    entries: HashMap<ClientKey, Entry>,
    /// The last request's `seq`.
    seq: u64,
    /// A keeper task is running (or about to).
    keeper: bool,
    last_sweep: Option<Instant>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Connections open here holding one of these slots.
    open: u32,
    /// At most this instance's record in the store, while `valid_until` has not passed.
    granted: u32,
    valid_until: Option<Instant>,
    /// The `seq` of the request in flight, if any.
    flight: Option<u64>,
    /// A connection was admitted since the last refresh was made: the client keeps a spare.
    busy: bool,
    /// More spare than a block is held: the keeper gives the excess back at once.
    dirty: bool,
    /// The store last had no slot for this client: until then, refuse without asking again.
    full_until: Option<Instant>,
}

impl Entry {
    /// The slots held, or 0 once the lease may have ended.
    fn granted_at(&self, now: Instant) -> u32 {
        match self.valid_until {
            Some(until) if now < until => self.granted,
            _ => 0,
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.open == 0 && self.flight.is_none() && self.granted_at(now) == 0
    }

    /// Makes request `seq` for `ask`, lowering `granted` to what the store records for it
    /// whatever the other instances hold (see the module's bound).
    fn send(&mut self, key: &ClientKey, seq: u64, ask: Ask, table: (u32, Duration), now: Instant) -> Request {
        let held = self.granted_at(now);
        self.granted = held.min(granted(ask, held));
        self.flight = Some(seq);
        let (cap, lease) = table;
        Request {
            key: key.clone(),
            seq,
            ask,
            cap,
            lease,
            sent: now,
        }
    }

    /// Whether this entry holds more spare than it keeps; marks it for a give-back if so.
    fn mark_excess(&mut self, block: u32) -> bool {
        let excess = self.granted.saturating_sub(self.open) > block;
        let newly = excess && !self.dirty;
        self.dirty |= excess;
        newly
    }
}

impl Slots {
    /// The slots of `instance` (its unique name in the store) for a cap of `max_concurrent`
    /// per client, leased for `lease`, tracking at most `max_clients` clients.
    pub fn new(instance: String, max_concurrent: u32, lease: Duration, max_clients: usize) -> Slots {
        Slots {
            instance,
            table: Mutex::new(Table {
                cap: max_concurrent,
                lease,
                max_clients,
                entries: HashMap::new(),
                seq: 0,
                keeper: false,
                last_sweep: None,
            }),
            wake: Notify::new(),
        }
    }

    /// Applies a reloaded configuration: the slots held stay held.
    pub fn reconfigure(&self, max_concurrent: u32, lease: Duration, max_clients: usize) {
        let mut table = self.lock();
        table.cap = max_concurrent;
        table.lease = lease;
        table.max_clients = max_clients;
    }

    /// This instance's name in the store's records.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How often the keeper refreshes every record: a third of the lease.
    pub fn refresh_interval(&self) -> Duration {
        self.lock().lease / 3
    }

    /// Signalled when a client holds more spare than it keeps.
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Decides for one connection of `key` at `now`.
    pub fn acquire(self: &Arc<Self>, key: &ClientKey, now: Instant) -> Acquire {
        let mut guard = self.lock();
        let table = &mut *guard;
        if table.cap == 0 {
            return Acquire::Full;
        }
        if !table.entries.contains_key(key) && table.entries.len() >= table.max_clients {
            let interval = table.lease / 3;
            if table.last_sweep.is_none_or(|at| now >= at + interval) {
                table.last_sweep = Some(now);
                table.entries.retain(|_, e| e.open > 0 || e.flight.is_some());
            }
            if table.entries.len() >= table.max_clients {
                return Acquire::TooManyClients;
            }
        }
        let terms = (table.cap, table.lease);
        let ask = Ask {
            hold: 0,
            need: 1,
            spare: block(table.cap),
        };
        let entry = table.entries.entry(key.clone()).or_default();
        if entry.open < entry.granted_at(now) {
            entry.open += 1;
            entry.busy = true;
            return Acquire::Admit(self.slot(key));
        }
        if entry.full_until.is_some_and(|until| now < until) {
            return Acquire::Full;
        }
        if entry.flight.is_some() {
            return Acquire::Wait;
        }
        table.seq += 1;
        let ask = Ask {
            hold: entry.open,
            ..ask
        };
        Acquire::Ask(entry.send(key, table.seq, ask, terms, now))
    }

    /// Records the store's answer to `request`: `granted` is what this instance may now hand
    /// out (its record, or the room the others leave if less; see [`usable`]), `None` when the
    /// store could not be asked in time. For an admission, admits or refuses the connection that
    /// asked.
    pub fn answer(self: &Arc<Self>, request: &Request, granted: Option<u32>, now: Instant) -> Answer {
        let mut guard = self.lock();
        let block = block(guard.cap);
        let Some(entry) = guard.entries.get_mut(&request.key) else {
            // Not reached: an entry with a request in flight is never dropped.
            return Answer::Unavailable;
        };
        let current = entry.flight == Some(request.seq);
        if current {
            entry.flight = None;
            if let Some(granted) = granted {
                entry.granted = granted;
                entry.valid_until = Some(request.sent + request.lease);
            }
        }
        let answer = match granted {
            _ if request.ask.need == 0 => Answer::Recorded,
            None => Answer::Unavailable,
            Some(_) if entry.open < entry.granted_at(now) => {
                entry.open += 1;
                entry.busy = true;
                Answer::Admit(self.slot(&request.key))
            }
            Some(_) => {
                entry.full_until = Some(now + request.lease / FULL_FOR);
                Answer::Full
            }
        };
        let wake = entry.mark_excess(block);
        drop(guard);
        if wake {
            self.wake.notify_one();
        }
        answer
    }

    /// The keeper's round at `now`: drops idle clients and returns the requests to make, every
    /// client's refresh when `all` (a tick), else only the give-backs due. `None` when no client
    /// is left: the keeper stops (and [`Slots::start_keeper`] starts one again when needed).
    pub fn due(&self, now: Instant, all: bool) -> Option<Vec<Request>> {
        let mut guard = self.lock();
        let table = &mut *guard;
        table.entries.retain(|_, e| !e.is_idle(now));
        if table.entries.is_empty() {
            table.keeper = false;
            return None;
        }
        let terms = (table.cap, table.lease);
        let block = block(table.cap);
        let mut requests = Vec::new();
        for (key, entry) in &mut table.entries {
            if entry.flight.is_some() || !(all || entry.dirty) {
                continue;
            }
            let ask = Ask {
                hold: entry.open,
                need: 0,
                spare: if entry.busy { block } else { 0 },
            };
            entry.busy = false;
            entry.dirty = false;
            table.seq += 1;
            requests.push(entry.send(key, table.seq, ask, terms, now));
        }
        Some(requests)
    }

    /// Whether a keeper task must be started now (it is marked started): some client is tracked
    /// and no keeper runs.
    pub fn start_keeper(&self) -> bool {
        let mut table = self.lock();
        let start = !table.keeper && !table.entries.is_empty();
        table.keeper |= start;
        start
    }

    /// Connections of `key` open here holding a slot.
    pub fn open(&self, key: &ClientKey) -> u32 {
        self.lock().entries.get(key).map_or(0, |e| e.open)
    }

    /// Slots of `key` this instance may hand out at `now` (open ones included).
    pub fn held(&self, key: &ClientKey, now: Instant) -> u32 {
        self.lock().entries.get(key).map_or(0, |e| e.granted_at(now))
    }

    /// Clients tracked (for tests and metrics).
    pub fn tracked_clients(&self) -> usize {
        self.lock().entries.len()
    }

    fn slot(self: &Arc<Self>, key: &ClientKey) -> Slot {
        Slot {
            slots: Arc::clone(self),
            key: key.clone(),
        }
    }

    fn release(&self, key: &ClientKey) {
        let mut table = self.lock();
        let block = block(table.cap);
        let wake = table.entries.get_mut(key).is_some_and(|entry| {
            // Each slot added one to `open`, and an entry with open slots is never dropped.
            entry.open = entry.open.saturating_sub(1);
            entry.mark_excess(block)
        });
        drop(table);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Locks ignoring poisoning: the sections assign plain values and cannot panic midway.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
