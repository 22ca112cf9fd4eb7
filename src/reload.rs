//! Asking for a reload: the handle that asks, the request it sends, and the result it reports.
//!
//! The reload itself (bind new sockets, build the next generation, swap, restart probes, revoke
//! lost access) is run by the server's run loop, one at a time, so two reloads never interleave;
//! this module only carries requests to it (from SIGHUP, `POST /reload`, the file watch, a
//! changed `discover` set, a fetched CRL or library code) and reads the live state for its
//! callers. It never touches sockets.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ConfigError};
use crate::state::{Live, ServerError, State};

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

/// What a request asks the run loop to do.
pub(crate) enum Change {
    /// Re-read the config file.
    Reread,
    /// Apply a config built in code.
    Apply(Box<Config>),
    /// Build the running config again with the backends `discover` found (no file is read).
    Rediscover,
    /// Build the running config again with the in-memory material fetched since it was loaded
    /// (CRLs from their distribution points; no file is read), closing the open connections it
    /// no longer allows, as a reload does.
    Refresh,
}

/// One request, and where its result goes.
pub(crate) struct Request {
    pub(crate) change: Change,
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
        self.send(Change::Reread).await
    }

    /// Applies a configuration built in code.
    pub async fn reload_with(&self, config: Config) -> Result<u64, ReloadError> {
        self.send(Change::Apply(Box::new(config))).await
    }

    /// Builds the running configuration again with the discovered backends now on record.
    pub(crate) async fn rediscover(&self) -> Result<u64, ReloadError> {
        self.send(Change::Rediscover).await
    }

    /// Builds the running configuration again with the in-memory material now on record (the
    /// fetched CRLs).
    pub(crate) async fn refresh(&self) -> Result<u64, ReloadError> {
        self.send(Change::Refresh).await
    }

    async fn send(&self, change: Change) -> Result<u64, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { change, reply })
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        answer.await.map_err(|_| ReloadError::NotRunning)?
    }

    /// The current generation's state.
    pub fn state(&self) -> Arc<State> {
        self.live.state()
    }
}
