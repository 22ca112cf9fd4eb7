//! Quarantine: identities and certificate serials refused at admission until a time or until
//! released, whatever the configuration grants them; the operator's lever when a certificate
//! leaks, quicker than a CRL and shared by every instance through the cluster's Redis.
//!
//! This module owns the table ([`Quarantines`], pure, the wall-clock time passed in) and the
//! handle the live model and the admin side share ([`QuarantineStore`], which outlives reloads).
//! Entries are either this instance's own (added here, written to Redis when it can) or the
//! cluster's (read from Redis): the view is their union; a release removes both. It must not do
//! I/O: the Redis sync loop and closing open connections are the server's (`server::quarantine`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::metrics::Counter;

/// Default `--for` of a quarantine.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest quarantine: longer is what a deny entry or a CRL is for.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Entries at most (own and the cluster's together).
pub const MAX_ENTRIES: usize = 10_000;
/// The longest reason kept, in bytes.
pub const MAX_REASON: usize = 512;

/// What is quarantined: a client identity (exact) or a certificate serial.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Identity(String),
    /// Lowercase hex without colons or leading zeros ([`Subject::serial`]).
    Serial(String),
}

/// Why a subject cannot be quarantined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuarantineError {
    #[error("an identity is not empty and has no control characters")]
    Identity,
    #[error("a serial is hexadecimal, optionally with colons (as the access log writes it)")]
    Serial,
    #[error("a quarantine lasts from 1s to {} days", MAX_DURATION.as_secs() / 86_400)]
    Duration,
    #[error("the reason is at most {MAX_REASON} bytes")]
    Reason,
    #[error("{MAX_ENTRIES} entries are quarantined already: release some, or use a deny entry or a CRL")]
    Full,
}

impl Subject {
    /// An identity, exactly as `fulcrum` names clients.
    pub fn identity(name: &str) -> Result<Subject, QuarantineError> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(QuarantineError::Identity);
        }
        Ok(Subject::Identity(name.to_string()))
    }

    /// A serial written as hex (`01:A2:ff`, `1a2ff`, `0x1a2ff`): compared without colons, case
    /// or leading zeros, so every spelling of one serial is one subject.
    pub fn serial(text: &str) -> Result<Subject, QuarantineError> {
        let text = text.strip_prefix("0x").unwrap_or(text);
        let hex: String = text.chars().filter(|c| *c != ':').collect();
        if hex.is_empty() || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(QuarantineError::Serial);
        }
        let trimmed = hex.trim_start_matches('0');
        let normal = if trimmed.is_empty() { "0" } else { trimmed };
        Ok(Subject::Serial(normal.to_ascii_lowercase()))
    }

    /// The subject as one string, `identity:NAME` or `serial:HEX` (the Redis member).
    pub fn key(&self) -> String {
        match self {
            Subject::Identity(name) => format!("identity:{name}"),
            Subject::Serial(hex) => format!("serial:{hex}"),
        }
    }

    /// The subject of a [`key`](Subject::key).
    pub fn from_key(key: &str) -> Option<Subject> {
        match key.split_once(':')? {
            ("identity", name) => Subject::identity(name).ok(),
            ("serial", hex) => Subject::serial(hex).ok(),
            _ => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Identity(name) => write!(f, "identity {}", crate::identity::Escaped(name)),
            Subject::Serial(hex) => write!(f, "serial {hex}"),
        }
    }
}

/// One quarantine: until when, why, and whether the cluster has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub until: SystemTime,
    pub reason: String,
    /// Added on this instance and not yet written to Redis (or no Redis is configured).
    pub pending: bool,
    /// Read from, or written to, the cluster's Redis.
    pub shared: bool,
}

/// The quarantine table. Pure: every time is passed in.
#[derive(Debug, Default)]
pub struct Quarantines {
    entries: BTreeMap<Subject, Entry>,
    /// Released here, not yet removed from Redis.
    releases: Vec<Subject>,
}

impl Quarantines {
    /// Quarantines `subject` from `now` for `duration`. A subject already quarantined takes the
    /// later end and the new reason.
    pub fn add(
        &mut self,
        subject: Subject,
        now: SystemTime,
        duration: Duration,
        reason: &str,
    ) -> Result<SystemTime, QuarantineError> {
        if duration < Duration::from_secs(1) || duration > MAX_DURATION {
            return Err(QuarantineError::Duration);
        }
        if reason.len() > MAX_REASON {
            return Err(QuarantineError::Reason);
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.expire(now);
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&subject) {
            return Err(QuarantineError::Full);
        }
        let until = now + duration;
        self.releases.retain(|s| *s != subject);
        let entry = self.entries.entry(subject).or_insert(Entry {
            until,
            reason: String::new(),
            pending: true,
            shared: false,
        });
        entry.until = entry.until.max(until);
        entry.reason = reason.to_string();
        entry.pending = true;
        Ok(entry.until)
    }

    /// Ends the quarantine of `subject`; whether there was one.
    pub fn release(&mut self, subject: &Subject) -> bool {
        let known = self.entries.remove(subject).is_some();
        if !self.releases.contains(subject) {
            self.releases.push(subject.clone());
        }
        known
    }

    /// The entry refusing a client with `identity` and certificate `serial` (as the access log
    /// writes it) at `now`, if any.
    pub fn refusing(&self, identity: &str, serial: &str, now: SystemTime) -> Option<(&Subject, &Entry)> {
        let by_identity = self
            .entries
            .get_key_value(&Subject::Identity(identity.to_string()));
        let by_serial = || {
            let serial = Subject::serial(serial).ok()?;
            self.entries.get_key_value(&serial)
        };
        by_identity.or_else(by_serial).filter(|(_, e)| e.until > now)
    }

    /// Drops the entries that ended by `now`.
    pub fn expire(&mut self, now: SystemTime) {
        self.entries.retain(|_, e| e.until > now);
    }

    /// Every entry in force at `now`, by subject.
    pub fn list(&self, now: SystemTime) -> impl Iterator<Item = (&Subject, &Entry)> {
        self.entries.iter().filter(move |(_, e)| e.until > now)
    }

    /// What this instance owes Redis: entries added here and not yet written, and releases.
    pub fn unsynced(&self) -> (Vec<(Subject, Entry)>, Vec<Subject>) {
        let pending = self.entries.iter().filter(|(_, e)| e.pending);
        let pending = pending.map(|(s, e)| (s.clone(), e.clone())).collect();
        (pending, self.releases.clone())
    }

    /// Redis now has `written` (as it was then) and none of `released`.
    pub fn synced(&mut self, written: &[(Subject, Entry)], released: &[Subject]) {
        for (subject, sent) in written {
            if let Some(entry) = self.entries.get_mut(subject) {
                // Not if it was changed again meanwhile: that change is still owed.
                if entry.until == sent.until && entry.reason == sent.reason {
                    entry.pending = false;
                    entry.shared = true;
                }
            }
        }
        self.releases.retain(|s| !released.contains(s));
    }

    /// The cluster's entries as read from Redis at `now` replace the shared ones; entries
    /// still owed to Redis stay as they are. Returns the subjects that are new here (their open
    /// connections are to be closed).
    pub fn merge_cluster(
        &mut self,
        cluster: Vec<(Subject, SystemTime, String)>,
        now: SystemTime,
    ) -> Vec<Subject> {
        let mut new = Vec::new();
        let before: BTreeSet<Subject> = self.entries.keys().cloned().collect();
        self.entries.retain(|_, e| e.pending || !e.shared);
        for (subject, until, reason) in cluster {
            if until <= now || self.releases.contains(&subject) {
                continue;
            }
            let room = self.entries.len() < MAX_ENTRIES;
            match self.entries.get_mut(&subject) {
                Some(own) if own.pending => {}
                Some(own) => {
                    own.until = until;
                    own.reason = reason;
                    own.shared = true;
                }
                None if room => {
                    let entry = Entry {
                        until,
                        reason,
                        pending: false,
                        shared: true,
                    };
                    if !before.contains(&subject) {
                        new.push(subject.clone());
                    }
                    self.entries.insert(subject, entry);
                }
                None => {}
            }
        }
        new
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The table as the live model, admission and the admin side share it, over every reload, with
/// the state of its Redis sync.
#[derive(Debug, Default)]
pub struct QuarantineStore {
    table: Mutex<Quarantines>,
    /// Whether the table may hold an entry: admission skips the lock when it does not.
    any: AtomicBool,
    /// Failed Redis round trips of the sync (`fulcrum_quarantine_sync_errors_total`).
    pub sync_errors: Counter,
    /// The last sync error, for `ctl`.
    last_error: Mutex<Option<String>>,
    /// Wakes the sync loop when an operator adds or releases an entry.
    pub wake: tokio::sync::Notify,
}

impl QuarantineStore {
    /// The table, locked for a change or a read; the lock is never held across an await.
    pub fn lock(&self) -> StoreGuard<'_> {
        StoreGuard {
            table: self.table.lock().unwrap_or_else(|p| p.into_inner()),
            any: &self.any,
        }
    }

    /// The entry refusing `identity` / `serial` at `now`: its subject, end and reason.
    pub fn refusing(
        &self,
        identity: &str,
        serial: &str,
        now: SystemTime,
    ) -> Option<(Subject, SystemTime, String)> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let table = self.lock();
        let (subject, entry) = table.refusing(identity, serial, now)?;
        Some((subject.clone(), entry.until, entry.reason.clone()))
    }

    /// Records the outcome of a sync round: `None` when it succeeded.
    pub fn sync_result(&self, error: Option<String>) {
        if error.is_some() {
            self.sync_errors.inc();
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// The error of the last sync round, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A locked table; on drop, the store's "may hold an entry" flag follows it.
pub struct StoreGuard<'a> {
    table: MutexGuard<'a, Quarantines>,
    any: &'a AtomicBool,
}

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Quarantines;
    fn deref(&self) -> &Quarantines {
        &self.table
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Quarantines {
        &mut self.table
    }
}

impl Drop for StoreGuard<'_> {
    fn drop(&mut self) {
        self.any.store(!self.table.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
