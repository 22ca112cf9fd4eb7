//! The registry of open connections, over every generation: the table of every connection
//! ([`Connections`], in `connections`), and for mTLS ones what their access was granted on, the
//! signal that cuts them, and one ordered table of certificate expiries with the one task that
//! closes connections at expiry. It holds and cuts; judging a connection against a new generation
//! is the live model's (`state`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::identity::ClientIdentity;

mod connections;

pub(crate) use connections::{
    is_serial, ConnectionFilter, ConnectionView, Connections, OpenConnection, Page, Phase, Seen, Tracked,
};
pub use connections::{Cut, CutSignal};

/// What an admitted mTLS connection is registered with: what its access was granted on.
pub(crate) struct Grant {
    pub(crate) listener: String,
    pub(crate) upstream: String,
    pub(crate) identity: ClientIdentity,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The server name the client asked for (SNI): which of the listener's certificates, trust
    /// and authorization it was admitted under.
    pub(crate) server_name: Option<String>,
    /// The client's source address (the PROXY header's, when one was accepted).
    pub(crate) source: std::net::IpAddr,
    /// When to close it (the earliest `notAfter` of its chain), with `close_on_expiry`.
    pub(crate) expires: Option<SystemTime>,
}

/// Every open connection (`Registry::connections`); the mTLS ones with what their access was
/// granted on, and when their certificates expire.
#[derive(Default)]
pub struct Registry {
    /// Every open connection, plain and TLS.
    connections: Arc<Connections>,
    next: AtomicU64,
    open: Mutex<Open>,
    /// Told when a registration's expiry comes before every other one (the expiry task then
    /// sleeps less).
    pub(crate) earlier_expiry: Notify,
}

#[derive(Default)]
pub(crate) struct Open {
    entries: HashMap<u64, Arc<Entry>>,
    /// (expiry, id) of registrations with `close_on_expiry`: one ordered timer structure for
    /// the whole process, not a timer per connection.
    expiries: BTreeSet<(SystemTime, u64)>,
}

pub(crate) struct Entry {
    grant: Grant,
    cut: Arc<CutSignal>,
}

impl Entry {
    /// What its access was granted on.
    pub(crate) fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Cuts the connection for `reason`.
    pub(crate) fn cut(&self, reason: Cut) {
        self.cut.cut(reason);
    }
}

/// Keeps a connection in the registry; removes it on drop.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    expires: Option<SystemTime>,
    /// Cancelled when a reload takes this connection's access away or its certificate expires.
    pub cut: Arc<CutSignal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.registry.lock();
        open.entries.remove(&self.id);
        if let Some(at) = self.expires {
            open.expiries.remove(&(at, self.id));
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("open", &self.len()).finish()
    }
}

impl Registry {
    /// Registers `grant` under the registry's lock (taken by the caller with [`Registry::lock`]).
    pub(crate) fn insert(self: &Arc<Self>, open: &mut Open, grant: Grant) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(CutSignal::default());
        let expires = grant.expires;
        if let Some(at) = expires {
            let earliest = open.expiries.first().is_none_or(|(first, _)| at < *first);
            open.expiries.insert((at, id));
            if earliest {
                self.earlier_expiry.notify_one();
            }
        }
        open.entries.insert(
            id,
            Arc::new(Entry {
                grant,
                cut: Arc::clone(&cut),
            }),
        );
        Registration {
            registry: Arc::clone(self),
            id,
            expires,
            cut,
        }
    }

    /// Cuts the connections whose certificate expired by `now`; returns how many, and the next
    /// expiry still ahead.
    pub(crate) fn expire(&self, now: SystemTime) -> (usize, Option<SystemTime>) {
        let mut open = self.lock();
        let mut expired = 0;
        while let Some(&(at, id)) = open.expiries.first() {
            if at > now {
                return (expired, Some(at));
            }
            open.expiries.pop_first();
            if let Some(entry) = open.entries.get(&id) {
                entry.cut.cut(Cut::CertExpired);
                expired += 1;
            }
        }
        (expired, None)
    }

    /// The table of every open connection.
    pub(crate) fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// Open registered (mTLS) connections.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Open> {
        // Map and set updates only; nothing can panic while the lock is held.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Open {
    /// Every open registered connection.
    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries.values().cloned().collect()
    }
}

/// Closes registered mTLS connections when their client certificate expires
/// (`close_on_expiry`): one task for the process, sleeping until the earliest expiry in the
/// registry's ordered set, woken early when a registration brings an earlier one.
pub(crate) async fn close_at_expiry(registry: Arc<Registry>, stop: CancellationToken) {
    loop {
        let (expired, next) = registry.expire(SystemTime::now());
        if expired > 0 {
            info!(expired, "closed connections whose client certificate expired");
        }
        let wait = next.map_or(crate::clock::WALL_CLOCK_RECHECK, |at| {
            crate::clock::until_wall(at, SystemTime::now())
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = registry.earlier_expiry.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
