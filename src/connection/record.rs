//! A connection's record in the table of open connections ([`Record`]): what `GET
//! /connections` shows of it and the signal that cuts it, filled in as the connection goes.
//!
//! One allocation at accept (the record, with its signal inline); each phase sets its facts once
//! (the PROXY header's source, what admission established, the backend); the relay adds to the
//! byte and activity counters (atomics) where it counts bytes for the metrics. Readers (the admin
//! side) read it without a lock. It decides nothing: the phases decide, the table lists and cuts
//! (`state::registry`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::accesslog::Entry;
use crate::state::registry::{ConnectionView, OpenConnection, Phase, Seen};
use crate::state::{Backend, CutSignal, Listener, Upstream};

/// What the table shows of one open connection.
pub(super) struct Record {
    id: u64,
    /// The listener that accepted it (its name is the same in every generation that has it).
    listener: Arc<Listener>,
    /// The peer that connected.
    peer: SocketAddr,
    started: Instant,
    /// The PROXY header's source, when the listener accepts one.
    client: OnceLock<SocketAddr>,
    admitted: OnceLock<Admitted>,
    backend: OnceLock<Arc<Backend>>,
    phase: AtomicU8,
    up: AtomicU64,
    down: AtomicU64,
    /// When a byte last moved, in milliseconds after `started`.
    active: AtomicU64,
    /// Cut by an operator or a quarantine; watched by every phase (see `refusal::Stop`).
    pub(super) cut: CutSignal,
}

/// What admission established.
struct Admitted {
    upstream: Arc<Upstream>,
    /// Boxed: a plain connection has none of it.
    tls: Option<Box<Tls>>,
}

/// The TLS facts of an admitted connection, as its access log entry has them.
struct Tls {
    identity: Option<String>,
    serial: Option<String>,
    not_after: Option<SystemTime>,
    sni: Option<String>,
    alpn: Option<String>,
}

impl Record {
    /// The record of a connection `listener` accepted from `peer` at `started`, in its handshake.
    pub(super) fn new(id: u64, listener: &Arc<Listener>, peer: SocketAddr, started: Instant) -> Record {
        Record {
            id,
            listener: Arc::clone(listener),
            peer,
            started,
            client: OnceLock::new(),
            admitted: OnceLock::new(),
            backend: OnceLock::new(),
            phase: AtomicU8::new(Phase::Handshake as u8),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            active: AtomicU64::new(0),
            cut: CutSignal::default(),
        }
    }

    /// The front named the client (a PROXY header's source).
    pub(super) fn front(&self, client: SocketAddr) {
        let _ = self.client.set(client);
    }

    /// Admission passed: to `upstream`, with the TLS facts `entry` holds by now (on TLS
    /// listeners). The connection now waits for a backend.
    pub(super) fn admitted(&self, upstream: &Arc<Upstream>, entry: &Entry) {
        let tls = entry.tls_version.is_some().then(|| {
            Box::new(Tls {
                identity: entry.identity.clone(),
                serial: entry.client_serial.clone(),
                not_after: entry.client_not_after,
                sni: entry.sni.clone(),
                alpn: entry.alpn.clone(),
            })
        });
        let upstream = Arc::clone(upstream);
        let _ = self.admitted.set(Admitted { upstream, tls });
        self.phase.store(Phase::Queued as u8, Ordering::Relaxed);
    }

    /// `backend` answered: bytes may flow.
    pub(super) fn proxied(&self, backend: &Arc<Backend>) {
        let _ = self.backend.set(Arc::clone(backend));
        self.phase.store(Phase::Proxied as u8, Ordering::Relaxed);
    }

    /// Bytes moved, `up` to the backend and `down` to the client.
    pub(super) fn moved(&self, up: u64, down: u64) {
        self.up.fetch_add(up, Ordering::Relaxed);
        self.down.fetch_add(down, Ordering::Relaxed);
        let since = self.started.elapsed().as_millis();
        self.active
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn tls(&self) -> Option<&Tls> {
        self.admitted.get()?.tls.as_deref()
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            p if p == Phase::Proxied as u8 => Phase::Proxied,
            p if p == Phase::Queued as u8 => Phase::Queued,
            _ => Phase::Handshake,
        }
    }
}

impl OpenConnection for Record {
    fn id(&self) -> u64 {
        self.id
    }

    fn seen(&self) -> Seen<'_> {
        let tls = self.tls();
        Seen {
            listener: &self.listener.name,
            identity: tls.and_then(|t| t.identity.as_deref()),
            serial: tls.and_then(|t| t.serial.as_deref()),
            backend: self.backend.get().map(|b| b.label.as_str()),
        }
    }

    fn view(&self, now: Instant) -> ConnectionView {
        let tls = self.tls();
        let text = |field: fn(&Tls) -> &Option<String>| tls.and_then(|t| field(t).clone());
        let age = now.saturating_duration_since(self.started);
        let active = Duration::from_millis(self.active.load(Ordering::Relaxed));
        ConnectionView {
            id: self.id,
            listener: self.listener.name.clone(),
            client: self.client.get().copied().unwrap_or(self.peer),
            identity: text(|t| &t.identity),
            serial: text(|t| &t.serial),
            not_after: tls.and_then(|t| t.not_after),
            sni: text(|t| &t.sni),
            alpn: text(|t| &t.alpn),
            upstream: self.admitted.get().map(|a| a.upstream.name.clone()),
            backend: self.backend.get().map(|b| b.label.clone()),
            age,
            idle: age.saturating_sub(active),
            bytes_up: self.up.load(Ordering::Relaxed),
            bytes_down: self.down.load(Ordering::Relaxed),
            phase: self.phase(),
        }
    }

    fn signal(&self) -> &CutSignal {
        &self.cut
    }
}
