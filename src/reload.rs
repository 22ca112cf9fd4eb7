//! What a live reload needs besides the new state: the handle that asks for one, the result it
//! reports, and the registry of open mTLS connections whose access a reload may take away.
//!
//! The reload itself (bind new sockets, build the next generation, swap, restart probes) is run
//! by the server's run loop, one at a time, so two reloads never interleave; this module only
//! carries requests to it and decides which connections lose access. It never touches sockets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::authz::Decision;
use crate::config::{Config, ConfigError};
use crate::identity::ClientIdentity;
use crate::metrics::Counter;
use crate::server::{ServerError, State};

/// Why a reload was refused. The old configuration keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not loaded from a file, so there is nothing to re-read")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("the server is not running")]
    NotRunning,
}

/// One reload request: re-read the file (`None`) or apply the given config.
pub(crate) struct Request {
    pub(crate) config: Option<Config>,
    pub(crate) reply: oneshot::Sender<Result<u64, ReloadError>>,
}

/// Asks a running [`Server`](crate::Server) to reload and reads its current state. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    pub(crate) requests: mpsc::Sender<Request>,
    pub(crate) live: Arc<Live>,
}

impl Handle {
    /// Re-reads the config file (and every certificate file it names) and applies it. Returns
    /// the new generation, or why the reload was refused.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        self.send(None).await
    }

    /// Applies a configuration built in code.
    pub async fn reload_with(&self, config: Config) -> Result<u64, ReloadError> {
        self.send(Some(config)).await
    }

    async fn send(&self, config: Option<Config>) -> Result<u64, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { config, reply })
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        answer.await.map_err(|_| ReloadError::NotRunning)?
    }

    /// The current generation's state.
    pub fn state(&self) -> Arc<State> {
        self.live.state()
    }
}

/// The current generation of state, and what outlives generations.
pub struct Live {
    current: Mutex<Arc<State>>,
    /// The file to re-read on reload, if the config came from one.
    pub(crate) path: Option<PathBuf>,
}

/// Reload outcomes, carried from generation to generation.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub ok: Counter,
    pub failed: Counter,
}

impl Live {
    pub(crate) fn new(state: State, path: Option<PathBuf>) -> Live {
        Live {
            current: Mutex::new(Arc::new(state)),
            path,
        }
    }

    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.lock())
    }

    pub(crate) fn swap_arc(&self, state: Arc<State>) -> Arc<State> {
        std::mem::replace(&mut *self.lock(), state)
    }

    fn lock(&self) -> MutexGuard<'_, Arc<State>> {
        // Only an Arc is swapped under this lock; nothing can panic while it is held.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Open mTLS connections, with what their access was granted on.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    listener: String,
    upstream: String,
    identity: ClientIdentity,
    chain: Vec<CertificateDer<'static>>,
    revoke: CancellationToken,
}

/// Keeps a connection in the registry; removes it on drop.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    /// Cancelled when a reload takes this connection's access away.
    pub revoked: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("open", &self.len()).finish()
    }
}

impl Registry {
    /// Registers an authorized connection.
    pub fn register(
        self: &Arc<Self>,
        listener: &str,
        upstream: &str,
        identity: &ClientIdentity,
        chain: &[CertificateDer<'_>],
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.lock().insert(
            id,
            Entry {
                listener: listener.to_string(),
                upstream: upstream.to_string(),
                identity: identity.clone(),
                chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
                revoke: revoked.clone(),
            },
        );
        Registration {
            registry: Arc::clone(self),
            id,
            revoked,
        }
    }

    /// Revokes every connection that `next` no longer allows: its identity lost the upstream in
    /// `[authorization]`, or its certificate no longer verifies under the listener's client CA.
    /// Connections whose listener or upstream is gone keep running (they drain). Returns how
    /// many were revoked.
    pub fn revoke_lost_access(&self, next: &State) -> usize {
        let open = self.lock();
        let mut revoked = 0;
        for entry in open.values() {
            let Some(listener) = next.listener(&entry.listener) else {
                continue;
            };
            if next.upstream(&entry.upstream).is_none() {
                continue;
            }
            let authorized =
                listener.authorization.check(&entry.identity, &entry.upstream) == Decision::Allow;
            let trusted = listener.tls.as_ref().is_none_or(|tls| tls.accepts(&entry.chain));
            if !(authorized && trusted) {
                entry.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    /// Open registered connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Inserts and removes only; nothing can panic while the lock is held.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}
