//! CRLs fetched from their distribution points: one task per listener with `crl_urls` (or
//! `crl_from_certificates`), started and stopped with each generation like the probe and
//! discovery loops, so a reload restarts it with the new settings. With `crl_from_certificates`
//! its URLs grow as verified client certificates name new distribution points
//! (`tls::SeenPoints`, kept across generations): it reads them again at every round and wakes
//! when one is added.
//!
//! The task fetches each URL when its schedule says (`schedule`: at once the first time, then
//! before the CRL's `nextUpdate` and at least every `crl_refresh`, backing off after failures),
//! each fetch one HTTP GET (`http`) under `crl_timeout` and `crl_max_size`. The body (DER or
//! PEM, one CRL) is checked exactly as a `crl` file's CRL is (`tls::ClientVerifier::check_crl`),
//! then offered to the table every generation shares (`state::fetched_crls`), which holds it
//! only if it is not older than the one held. A CRL taken is written to `crl_cache_dir` and the
//! run loop is asked to rebuild the generation with it (`reload::Change::Refresh`), which closes
//! the open connections it revokes. A failed or refused fetch keeps the last good CRL; each
//! outcome is counted, and logged when the URL's state changes (failing, recovered, updated),
//! not at every retry. This module fetches and schedules; what a CRL revokes is `trust`'s.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::CrlFetch;
use crate::reload::Handle;
use crate::state::fetched_crls::{FetchedCrls, Outcome, Verdict};
use crate::state::State;
use crate::tls::{ClientVerifier, SeenPoints};

mod http;
mod schedule;

/// Starts the fetcher of every listener of `state` that fetches CRLs, until `stop` (the end of
/// the generation); forgets, in the shared table, the URLs no listener fetches any more.
pub(crate) fn spawn(state: &State, tracker: &TaskTracker, stop: &CancellationToken, handle: &Handle) {
    for l in &state.config.listeners {
        let fetch = l.tls.as_ref().and_then(|t| t.crl_fetch.clone());
        let verifier = state
            .listener(&l.name)
            .and_then(|listener| listener.tls_for(None)?.verifier.clone());
        let (Some(fetch), Some(verifier)) = (fetch, verifier) else {
            state.fetched_crls.forget(&l.name);
            continue;
        };
        let seen = fetch.from_certificates.then(|| state.fetched_crls.seen(&l.name));
        let (urls, _) = verifier.crl_urls(&fetch, seen.as_deref());
        state.fetched_crls.retain(&l.name, &urls);
        if urls.is_empty() {
            info!(listener = %l.name, "crl_from_certificates: no URL yet; the http:// distribution points of the client certificates seen will be fetched");
        }
        let fetcher = Fetcher {
            listener: l.name.clone(),
            fetch,
            verifier,
            seen,
            table: Arc::clone(&state.fetched_crls),
        };
        tracker.spawn(fetcher.run(handle.clone(), stop.clone()));
    }
}

/// One listener's fetcher.
struct Fetcher {
    listener: String,
    fetch: CrlFetch,
    /// `crl_from_certificates`: the points of the client certificates seen, which add URLs.
    seen: Option<Arc<SeenPoints>>,
    /// The generation's client trust, which a CRL must be signed by.
    verifier: Arc<ClientVerifier>,
    table: Arc<FetchedCrls>,
}

impl Fetcher {
    /// Fetches each URL when due until `stop`; asks for a rebuild when a CRL was taken.
    async fn run(self, handle: Handle, stop: CancellationToken) {
        let mut added = self.seen.as_ref().map(|s| s.subscribe());
        loop {
            // Marked seen before the URLs are read: a point recorded after this wakes the wait.
            if let Some(added) = &mut added {
                added.borrow_and_update();
            }
            let (urls, _) = self.verifier.crl_urls(&self.fetch, self.seen.as_deref());
            let due = urls
                .iter()
                .map(|url| {
                    let history = self.table.history(&self.listener, url);
                    (url, schedule::next_fetch(&history, self.fetch.refresh))
                })
                .collect::<Vec<_>>();
            let at = due
                .iter()
                .map(|(_, at)| at.unwrap_or(SystemTime::UNIX_EPOCH))
                .min();
            let now = SystemTime::now();
            let wait = match at {
                Some(at) if at <= now => None,
                Some(at) => Some(crate::clock::until_wall(at, now)),
                // Nothing to fetch yet: only a point seen can change that.
                None if added.is_some() => Some(self.fetch.refresh),
                None => return,
            };
            if let Some(wait) = wait {
                let seen = async {
                    match &mut added {
                        Some(added) => drop(added.changed().await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = seen => {}
                }
                continue;
            }
            let mut updated = Vec::new();
            for (url, at) in &due {
                if at.is_some_and(|at| at > now) {
                    continue;
                }
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    result = self.take(url) => result,
                };
                match result {
                    Ok(Outcome::Updated) => updated.push(url),
                    Ok(outcome) => self.record(url, outcome, None),
                    Err((outcome, problem)) => self.record(url, outcome, Some(problem)),
                }
            }
            if updated.is_empty() {
                continue;
            }
            // The rebuild stops this generation's tasks, this one included; the next
            // generation's fetcher carries on from the table.
            if let Err(e) = handle.refresh().await {
                error!(listener = %self.listener, error = %e, "the rebuild with the fetched CRLs failed");
            }
            // Counted once applied: a scrape that sees `updated` sees a generation with it.
            for url in updated {
                self.record(url, Outcome::Updated, None);
            }
        }
    }

    /// Records a fetch of `url` and logs it if the URL's state changed (see the module doc).
    fn record(&self, url: &str, outcome: Outcome, problem: Option<String>) {
        let listener = self.listener.as_str();
        let failures_before = self.table.record(listener, url, outcome, SystemTime::now());
        match (&problem, failures_before) {
            (Some(problem), 0) => {
                warn!(listener, url, outcome = outcome.label(), error = %problem, "CRL fetch failed; the last good CRL stays (logged again when it recovers)");
            }
            (Some(problem), _) => {
                debug!(listener, url, outcome = outcome.label(), error = %problem, "CRL fetch failed again")
            }
            (None, failures) if failures > 0 => {
                info!(listener, url, failures, "CRL fetch recovered");
            }
            (None, _) => debug!(listener, url, outcome = outcome.label(), "CRL fetched"),
        }
    }

    /// One fetch: `Ok` with `updated` or `unchanged`, or the outcome and why it failed.
    async fn take(&self, url: &str) -> Result<Outcome, (Outcome, String)> {
        let failed = |why: String| (Outcome::Failed, why);
        let refused = |why: String| (Outcome::Refused, why);
        let uri = crate::config::crl_url(url).map_err(|why| failed(why.to_string()))?;
        let body = match tokio::time::timeout(self.fetch.timeout, http::get(&uri, self.fetch.max_size)).await
        {
            Err(_) => {
                return Err(failed(format!(
                    "no CRL within crl_timeout ({:?})",
                    self.fetch.timeout
                )))
            }
            Ok(Err(e @ http::FetchError::TooLarge(_))) => return Err(refused(e.to_string())),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Ok(Ok(body)) => body,
        };
        let der = crl_der(&body).map_err(refused)?;
        let crl = self
            .verifier
            .check_crl(&der)
            .map_err(|e| refused(e.to_string()))?;
        let next_update = crl.next_update;
        match self.table.offer(&self.listener, url, der.clone(), crl, Some(SystemTime::now())) {
            Verdict::Same => Ok(Outcome::Unchanged),
            Verdict::Older => Err(refused(
                "the CRL is older than the one held (a lower CRL number, or an earlier thisUpdate): a replay?".into(),
            )),
            Verdict::Replace => {
                let next_update = next_update.map(humantime::format_rfc3339_seconds);
                info!(listener = %self.listener, url, next_update = ?next_update.map(|t| t.to_string()), "CRL updated");
                if let Some(dir) = &self.fetch.cache_dir {
                    if let Err(e) = crate::tls::crl_cache::write(dir, url, &der) {
                        warn!(listener = %self.listener, url, dir = %dir.display(), error = %e, "the CRL cannot be written to crl_cache_dir");
                    }
                }
                Ok(Outcome::Updated)
            }
        }
    }
}

/// The one CRL of a body: PEM (`-----BEGIN X509 CRL-----`) or DER.
fn crl_der(body: &[u8]) -> Result<CertificateRevocationListDer<'static>, String> {
    let text = body.trim_ascii_start();
    if !text.starts_with(b"-----BEGIN") {
        return Ok(CertificateRevocationListDer::from(body.to_vec()));
    }
    let mut crls = CertificateRevocationListDer::pem_slice_iter(text);
    match (crls.next(), crls.next()) {
        (Some(Ok(der)), None) => Ok(CertificateRevocationListDer::from(der.as_ref().to_vec())),
        (None, _) => Err("the PEM body holds no CRL (-----BEGIN X509 CRL-----)".into()),
        (Some(Err(e)), _) => Err(format!("the PEM body cannot be read: {e}")),
        (Some(Ok(_)), Some(_)) => Err("the body holds more than one CRL; a URL serves one".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_taken_as_der_or_as_one_pem_crl() {
        assert_eq!(crl_der(&[0x30, 1, 2]).unwrap().as_ref(), &[0x30, 1, 2]);
        let pem = "\n-----BEGIN X509 CRL-----\nMAEC\n-----END X509 CRL-----\n";
        assert_eq!(crl_der(pem.as_bytes()).unwrap().as_ref(), &[0x30, 1, 2]);
        let two = format!("{pem}{pem}");
        assert!(crl_der(two.as_bytes()).unwrap_err().contains("more than one"));
        let none = "-----BEGIN CERTIFICATE-----\nMAEC\n-----END CERTIFICATE-----\n";
        assert!(crl_der(none.as_bytes()).unwrap_err().contains("no CRL"));
    }
}
