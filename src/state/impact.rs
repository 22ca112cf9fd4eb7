//! What a candidate generation would do to the open mTLS connections: which of them it would
//! close, and why ([`Lost`]). One judgement (`State::would_close`) serves both the reload,
//! which cuts every connection it returns (`Live::swap`), and the reload preview
//! (`Live::impact`, behind `POST /impact` and `fulcrum ctl impact`), which only lists them: the
//! two can never disagree.
//!
//! The judgement reads the registry's grants and the two generations, and verifies a chain again
//! only where its listener's trust changed; it cuts nothing (the registry does). The preview
//! builds its candidate with the reload's own loading code, but on its own: it takes over nothing
//! from the running generation (pools, limiters, counters), binds nothing and starts nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::registry::{Entry, Grant};
use super::{build, Listener, Live, ServerError, State};
use crate::authz::{Decision, Denial};
use crate::config::Config;
use crate::metrics::HandshakeFailure;

/// Why a candidate generation would close an open connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lost {
    /// Its chain is revoked by one of the candidate's CRLs.
    Revoked,
    /// Its chain no longer verifies under the candidate's trust, for any other reason.
    Trust,
    /// No authorization entry grants its identity the upstream.
    Unauthorized,
    /// A deny entry matches its identity.
    Denied,
    /// Its source address is refused: by the listener's `allow_from` / `deny_from`, or by the
    /// `from` networks of the entry that grants the upstream.
    Source,
}

impl Lost {
    /// The name of the reason in the preview's answer.
    pub fn label(self) -> &'static str {
        match self {
            Lost::Revoked => "revoked",
            Lost::Trust => "trust",
            Lost::Unauthorized => "unauthorized",
            Lost::Denied => "denied",
            Lost::Source => "source",
        }
    }
}

/// An open connection a candidate would close, why, and in a sentence how.
pub(crate) struct Loss<'a> {
    pub(crate) entry: &'a Entry,
    pub(crate) lost: Lost,
    pub(crate) detail: String,
}

/// One open connection a candidate configuration would close, as the preview lists it. Ordered
/// by identity, listener, reason, then the rest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Closing {
    pub identity: String,
    pub listener: String,
    pub lost: Lost,
    pub upstream: String,
    /// The client's source address.
    pub client: IpAddr,
    /// The server name the client asked for (SNI).
    pub server_name: Option<String>,
    pub detail: String,
}

impl Closing {
    fn of(loss: &Loss<'_>) -> Closing {
        let grant = loss.entry.grant();
        Closing {
            identity: grant.identity.to_string(),
            listener: grant.listener.clone(),
            lost: loss.lost,
            upstream: grant.upstream.clone(),
            client: grant.source,
            server_name: grant.server_name.clone(),
            detail: loss.detail.clone(),
        }
    }
}

impl State {
    /// The connections of `open` this generation would close if it replaced `live`, judged at
    /// `now`. A connection whose listener or upstream this generation does not have is kept (it
    /// drains on the generation it started with). Every other one is judged in the order a new
    /// connection meets the rules: its source, its chain (only if the listener's trust changed
    /// from `live`: every open chain was verified under `live`'s, at its handshake or at the
    /// swap that made `live` live), then authorization.
    pub(crate) fn would_close<'a>(
        &self,
        open: &'a [Arc<Entry>],
        live: &State,
        now: SystemTime,
    ) -> Vec<Loss<'a>> {
        open.iter()
            .filter_map(|entry| {
                let (lost, detail) = self.judge(entry.grant(), live, now)?;
                Some(Loss { entry, lost, detail })
            })
            .collect()
    }

    /// Why this generation would close the connection granted `grant`; `None` if it keeps it.
    fn judge(&self, grant: &Grant, live: &State, now: SystemTime) -> Option<(Lost, String)> {
        let listener = self.listener(&grant.listener)?;
        self.upstream(&grant.upstream)?;
        let server_name = grant.server_name.as_deref();
        let source = grant.source;
        if !listener.admits_source(source) {
            let detail = format!("source {source} is refused by the listener's allow_from / deny_from");
            return Some((Lost::Source, detail));
        }
        if !same_trust(live.listener(&grant.listener), listener, server_name) {
            if let Some(Err(rejection)) = listener
                .tls_for(server_name)
                .map(|tls| tls.verify(&grant.chain, now))
            {
                let lost = match rejection.reason {
                    HandshakeFailure::Revoked => Lost::Revoked,
                    _ => Lost::Trust,
                };
                return Some((lost, rejection.to_string()));
            }
        }
        let (identity, upstream) = (&grant.identity, &grant.upstream);
        let verdict = listener
            .authorization_for(server_name)
            .judge(identity, upstream, source);
        let matched = verdict.matched;
        match verdict.decision {
            Decision::Allow => None,
            Decision::Deny(Denial::Unlisted) => Some((
                Lost::Unauthorized,
                format!("{identity} may not reach upstream {upstream:?} ({matched})"),
            )),
            Decision::Deny(Denial::Denied) => Some((Lost::Denied, format!("{identity} matches {matched}"))),
            Decision::Deny(Denial::Source) => Some((
                Lost::Source,
                format!("{matched} grants upstream {upstream:?} only from networks {source} is not in"),
            )),
        }
    }
}

/// Whether `next` judges the client certificates of a connection that asked for `server_name`
/// exactly as `live` did: the same verifier (anchors, intermediates, CRLs, trust domains), or
/// client authentication in neither.
fn same_trust(live: Option<&Arc<Listener>>, next: &Listener, server_name: Option<&str>) -> bool {
    let Some(live) = live else {
        return false;
    };
    let before = live.tls_for(server_name).map(|tls| tls.verifier.as_ref());
    let now = next.tls_for(server_name).map(|tls| tls.verifier.as_ref());
    match (before, now) {
        (Some(Some(before)), Some(Some(now))) => Arc::ptr_eq(before, now),
        (Some(None), Some(None)) => true,
        _ => false,
    }
}

impl Live {
    /// What making `candidate` live now would close: the open registered connections its
    /// generation would cut, judged exactly as a reload's sweep, sorted. Its files are loaded
    /// with the reload's code; the generation is assembled on its own (nothing is taken over
    /// from the live one, nothing is bound or started), so the live state is left as it was.
    /// A candidate read from a file always brings new trust, as a reload's does: every open
    /// chain is verified again.
    pub(crate) fn impact(&self, candidate: &Config) -> Result<Vec<Closing>, ServerError> {
        let live = self.state();
        let loaded = build::load_with(candidate, &live.fetched_crls, &live.workload)?;
        let next = State::assemble(
            candidate,
            loaded,
            Vec::new(),
            None,
            live.generation + 1,
            Arc::default(),
        );
        let open = self.registry.lock().entries();
        let losses = next.would_close(&open, &live, SystemTime::now());
        let mut closing: Vec<Closing> = losses.iter().map(Closing::of).collect();
        closing.sort();
        Ok(closing)
    }
}

#[cfg(test)]
mod tests;
