//! A listener's TLS session cache for resumption: in memory, bounded, stateful only (see `tls`).
//! It stores and hands back sessions; it must not verify anything (admission does, again, on a
//! resumed session).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::server::StoresServerSessions;

/// A listener's TLS session cache: at most `capacity` sessions, each resumable for `timeout`
/// after it was stored; the oldest goes first when full.
#[derive(Debug)]
pub struct SessionCache {
    capacity: usize,
    timeout: Duration,
    sessions: Mutex<Sessions>,
}

#[derive(Debug, Default)]
pub(super) struct Sessions {
    entries: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
    /// Keys in the order they were stored; may hold keys already taken (skipped on eviction).
    pub(super) order: VecDeque<Vec<u8>>,
}

impl SessionCache {
    pub fn new(capacity: usize, timeout: Duration) -> SessionCache {
        SessionCache {
            capacity: capacity.max(1),
            timeout,
            sessions: Mutex::default(),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // Map operations only; nothing panics while the lock is held.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, stored: Instant) -> bool {
        stored.elapsed() < self.timeout
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut sessions = self.lock();
        while sessions.entries.len() >= self.capacity {
            let Some(oldest) = sessions.order.pop_front() else {
                break;
            };
            sessions.entries.remove(&oldest);
        }
        if sessions.order.len() >= 2 * self.capacity {
            // Drop keys of sessions already taken, so the order list stays bounded too.
            let Sessions { entries, order } = &mut *sessions;
            order.retain(|k| entries.contains_key(k));
        }
        sessions.order.push_back(key.clone());
        sessions.entries.insert(key, (value, Instant::now()));
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let sessions = self.lock();
        let (value, stored) = sessions.entries.get(key)?;
        self.fresh(*stored).then(|| value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let (value, stored) = self.lock().entries.remove(key)?;
        self.fresh(stored).then_some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}
