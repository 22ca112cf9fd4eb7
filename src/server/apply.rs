//! Applying a change to the running server: a reload (load with the same code as startup, bind
//! what is new, swap, stop what is gone) and an in-memory rebuild (the discovered backends, the
//! fetched CRLs, the Workload API's material). It decides nothing about connections; the swap
//! closes the ones a new generation no longer allows (`state`).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{error, info};

use super::listen::{bind_all, configured_same};
use super::Tasks;
use crate::config::Config;
use crate::reload::ReloadError;
use crate::state::build::{load_with, Loaded};
use crate::state::State;

impl Tasks {
    /// Applies a reload: load (the same code as startup), bind what is new, swap, then stop what
    /// is gone. Any failure before the swap leaves the running generation untouched.
    pub(super) async fn reload(&mut self, config: Option<Config>) -> Result<u64, ReloadError> {
        self.notifier.reloading();
        let result = match config {
            Some(config) => Ok(config),
            None => {
                Config::load(self.live.path.as_deref().ok_or(ReloadError::NoFile)?).map_err(ReloadError::from)
            }
        };
        let result = match result {
            Ok(config) => {
                // A name the running generation does not discover yet is resolved first.
                crate::discovery::resolve_new(&config, &self.live.state().discovered).await;
                let uses_spiffe = config.uses_spiffe();
                match self.ensure_workload(&config).await {
                    Ok(()) => self.try_reload(config).inspect(|_| {
                        if !uses_spiffe {
                            self.stop_workload();
                        }
                    }),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(generation) => {
                self.live.state().reloads.ok.inc();
                info!(generation, "configuration reloaded");
                self.notifier.ready(&format!("generation {generation} reloaded"));
            }
            Err(e) => {
                self.live.state().reloads.failed.inc();
                error!(error = %e, "reload refused; the running configuration stays");
                self.notifier
                    .ready(&format!("reload refused, the running configuration stays: {e}"));
            }
        }
        result
    }

    /// Builds the running configuration again, reading no file, with what `loaded` takes from
    /// it and the material on record now (the backends `discover` found: `Loaded::reuse`; the
    /// fetched CRLs too: `Loaded::refresh`): a change takes effect the way a reload's would,
    /// closing the open connections it no longer allows.
    pub(super) fn rebuild(&mut self, loaded: fn(&State) -> Loaded, what: &str) -> u64 {
        let current = self.live.state();
        let generation = current.generation + 1;
        let addrs = current.listeners().map(|l| (l.name.clone(), l.bind)).collect();
        let next = State::assemble(
            &current.config,
            loaded(&current),
            addrs,
            Some(&current),
            generation,
            Arc::clone(&current.discovered),
        );
        let next = Arc::new(next);
        self.start_generation(&next);
        let revoked = self.live.swap(next);
        info!(generation, revoked, "{what}");
        generation
    }

    fn try_reload(&mut self, config: Config) -> Result<u64, ReloadError> {
        let current = self.live.state();
        let tls = load_with(&config, &current.fetched_crls, &current.workload)?;
        // A listener keeps its sockets if its name and configured address are unchanged; one
        // serving a socket systemd passed keeps it while its configured `bind` is unchanged.
        let mut fresh = Vec::new();
        let mut addrs = Vec::new();
        let mut inherited = Vec::new();
        for l in &config.listeners {
            let passed = self.inherited.iter().find(|(name, _)| *name == l.name);
            let kept = current
                .listener(&l.name)
                .filter(|old| match passed {
                    Some((_, bind)) => *bind == l.bind,
                    None => configured_same(old, l.bind),
                })
                .map(|old| old.bind);
            if kept.is_some() && passed.is_some() {
                inherited.push((l.name.clone(), l.bind));
            }
            match kept {
                Some(addr) => addrs.push((l.name.clone(), addr)),
                None => {
                    let sockets = bind_all(l, l.bind, self.workers)?;
                    let addr = sockets
                        .first()
                        .and_then(|(_, s)| s.local_addr().ok())
                        .unwrap_or(l.bind);
                    addrs.push((l.name.clone(), addr));
                    fresh.extend(sockets);
                }
            }
        }
        let generation = current.generation + 1;
        let discovered = Arc::clone(&current.discovered);
        let next = State::assemble(&config, tls, addrs, Some(&current), generation, discovered);
        // Stop accept loops of listeners that are gone or moved, then start the new ones.
        let keep: Vec<(String, SocketAddr)> = next.listeners().map(|l| (l.name.clone(), l.bind)).collect();
        self.accepting.retain(|(name, addr, stop)| {
            let stays = keep.iter().any(|(n, a)| n == name && a == addr);
            if !stays {
                stop.cancel();
            }
            stays
        });
        let next = Arc::new(next);
        self.start_generation(&next);
        let revoked = self.live.swap(Arc::clone(&next));
        if revoked > 0 {
            info!(
                revoked,
                "closed connections whose access the new configuration removes"
            );
        }
        for (name, socket) in fresh {
            self.accept(name, socket, 1);
        }
        self.inherited = inherited;
        Ok(generation)
    }
}
