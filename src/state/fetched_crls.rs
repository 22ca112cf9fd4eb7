//! CRLs fetched from their distribution points (`[listener.tls] crl_urls`,
//! `crl_from_certificates`): per listener and URL, the last good CRL, when it was last asked
//! for and how that went, and the fetches counted by outcome. Shared by every generation, so a
//! reload or a rebuild keeps what was fetched, and a restarted fetcher carries on from the
//! table instead of fetching again at once.
//!
//! A CRL enters the table only after its signature was checked against the listener's client
//! trust (`tls::ClientVerifier::check_crl`), and replaces the one held for its URL only by the
//! replace rule ([`judge`]): a replayed older CRL never takes a newer one's place. This is a table
//! and nothing more: fetching, the schedule and the cache files live in `crl_fetch` and
//! `tls::crl_cache`; what a CRL revokes is `trust`'s. Time is passed in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rustls::pki_types::CertificateRevocationListDer;

use crate::metrics::Counter;
use crate::tls::{CheckedCrl, SeenPoints};

/// The fetched CRLs, by listener name, then URL.
#[derive(Debug, Default)]
pub(crate) struct FetchedCrls {
    listeners: Mutex<HashMap<String, ListenerCrls>>,
}

#[derive(Debug, Default)]
struct ListenerCrls {
    urls: BTreeMap<String, Slot>,
    outcomes: Arc<FetchOutcomes>,
    /// `crl_from_certificates`: the distribution points of the client certificates seen.
    seen: Arc<SeenPoints>,
}

/// One URL of a listener.
#[derive(Debug, Default)]
struct Slot {
    held: Option<Held>,
    /// When it was last fetched (`None`: never, so at once).
    attempted: Option<SystemTime>,
    /// Failed or refused fetches since the last good one.
    failures: u32,
}

/// A CRL held for a URL, its signature checked.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub(crate) der: CertificateRevocationListDer<'static>,
    pub(crate) crl: CheckedCrl,
}

/// Fetches of one listener's CRL URLs by outcome (`fulcrum_crl_fetches_total`).
#[derive(Debug, Default)]
pub(crate) struct FetchOutcomes {
    /// A CRL was taken: the first for its URL, or a newer one.
    updated: Counter,
    /// The CRL served is the one held (same bytes, or same number and `thisUpdate`).
    unchanged: Counter,
    /// No CRL came back: connection error, HTTP error status, timeout.
    failed: Counter,
    /// A body came back but was not taken: larger than `crl_max_size`, not a CRL, not signed by
    /// a CA of the listener's client trust, or older than the CRL held.
    refused: Counter,
}

impl FetchOutcomes {
    /// The counter of `outcome`.
    pub(crate) fn of(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Updated => &self.updated,
            Outcome::Unchanged => &self.unchanged,
            Outcome::Failed => &self.failed,
            Outcome::Refused => &self.refused,
        }
    }
}

/// How one fetch went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Updated,
    Unchanged,
    Failed,
    Refused,
}

impl Outcome {
    /// The `outcome` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }

    /// Every outcome, in the metric's order.
    pub(crate) const ALL: [Outcome; 4] = [
        Outcome::Updated,
        Outcome::Unchanged,
        Outcome::Failed,
        Outcome::Refused,
    ];
}

/// What the replace rule says of a CRL offered for a URL, against the one held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Take it: none held, another issuer's, a higher CRL number, or at an equal number (or
    /// without numbers) a later `thisUpdate`.
    Replace,
    /// The one held again (same bytes, or same number and `thisUpdate`): nothing changes.
    Same,
    /// Older than the one held (a lower CRL number, or at an equal one an earlier
    /// `thisUpdate`): refused, as a replay would be.
    Older,
}

/// The replace rule: whether `offered` (its bytes `same_bytes` as the held one's or not)
/// replaces `held`. The CRL number decides (RFC 5280 makes it grow with every CRL of an issuer);
/// at an equal number, or when either CRL has none, the later `thisUpdate` does.
pub(crate) fn judge(held: Option<&CheckedCrl>, offered: &CheckedCrl, same_bytes: bool) -> Verdict {
    use std::cmp::Ordering;
    let Some(held) = held else {
        return Verdict::Replace;
    };
    if same_bytes {
        return Verdict::Same;
    }
    if held.issuer != offered.issuer {
        return Verdict::Replace;
    }
    let by_number = match (&held.number, &offered.number) {
        (Some(old), Some(new)) => number_order(new, old),
        _ => Ordering::Equal,
    };
    match by_number.then(offered.this_update.cmp(&held.this_update)) {
        Ordering::Greater => Verdict::Replace,
        Ordering::Equal => Verdict::Same,
        Ordering::Less => Verdict::Older,
    }
}

/// Orders two CRL numbers given as big-endian bytes.
fn number_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let trim = |n: &[u8]| -> Vec<u8> { n.iter().copied().skip_while(|b| *b == 0).collect() };
    let (a, b) = (trim(a), trim(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

/// A URL's fetch history, for the schedule.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    pub(crate) attempted: Option<SystemTime>,
    pub(crate) failures: u32,
    /// The CRL held, if any.
    pub(crate) held: Option<CheckedCrl>,
}

impl FetchedCrls {
    /// Offers a CRL whose signature was checked, fetched for `url` of `listener` at `at` (`None`:
    /// read from the cache); holds it if the replace rule ([`judge`]) says so. Does not count:
    /// the fetcher records the outcome ([`FetchedCrls::record`]), maybe later, but the fetch's
    /// time is noted now so that no fetcher asks again meanwhile.
    pub(crate) fn offer(
        &self,
        listener: &str,
        url: &str,
        der: CertificateRevocationListDer<'static>,
        crl: CheckedCrl,
        at: Option<SystemTime>,
    ) -> Verdict {
        let mut listeners = self.lock();
        let slot = listeners
            .entry(listener.to_string())
            .or_default()
            .urls
            .entry(url.to_string())
            .or_default();
        let held = slot.held.as_ref();
        let same_bytes = held.is_some_and(|h| h.der.as_ref() == der.as_ref());
        let verdict = judge(held.map(|h| &h.crl), &crl, same_bytes);
        if verdict == Verdict::Replace {
            slot.held = Some(Held { der, crl });
        }
        if at.is_some() {
            slot.attempted = at;
        }
        verdict
    }

    /// Records a fetch of `url` at `at` and counts its outcome. Returns how many fetches had
    /// failed in a row before this one (0: it was not failing).
    pub(crate) fn record(&self, listener: &str, url: &str, outcome: Outcome, at: SystemTime) -> u32 {
        let mut listeners = self.lock();
        let crls = listeners.entry(listener.to_string()).or_default();
        crls.outcomes.of(outcome).inc();
        let slot = crls.urls.entry(url.to_string()).or_default();
        let before = slot.failures;
        slot.attempted = Some(at);
        slot.failures = match outcome {
            Outcome::Updated | Outcome::Unchanged => 0,
            Outcome::Failed | Outcome::Refused => before.saturating_add(1),
        };
        before
    }

    /// The fetch history of `url` of `listener`.
    pub(crate) fn history(&self, listener: &str, url: &str) -> History {
        self.lock()
            .get(listener)
            .and_then(|l| l.urls.get(url))
            .map(|slot| History {
                attempted: slot.attempted,
                failures: slot.failures,
                held: slot.held.as_ref().map(|h| h.crl.clone()),
            })
            .unwrap_or_default()
    }

    /// Whether a CRL is held for `url` of `listener`.
    pub(crate) fn holds(&self, listener: &str, url: &str) -> bool {
        self.lock()
            .get(listener)
            .and_then(|l| l.urls.get(url))
            .is_some_and(|slot| slot.held.is_some())
    }

    /// The CRLs held for `listener`'s `urls`, in that order.
    pub(crate) fn held(&self, listener: &str, urls: &[String]) -> Vec<(String, Held)> {
        let listeners = self.lock();
        let Some(crls) = listeners.get(listener) else {
            return Vec::new();
        };
        urls.iter()
            .filter_map(|url| {
                let held = crls.urls.get(url)?.held.clone()?;
                Some((url.clone(), held))
            })
            .collect()
    }

    /// Forgets every URL of `listener` not in `urls` (a reload stopped fetching them); its
    /// counters and the points seen stay.
    pub(crate) fn retain(&self, listener: &str, urls: &[String]) {
        if let Some(crls) = self.lock().get_mut(listener) {
            crls.urls.retain(|url, _| urls.contains(url));
        }
    }

    /// Forgets everything of `listener`, which fetches nothing any more.
    pub(crate) fn forget(&self, listener: &str) {
        self.lock().remove(listener);
    }

    /// Where `listener`'s verifiers record the distribution points of client certificates.
    pub(crate) fn seen(&self, listener: &str) -> Arc<SeenPoints> {
        let mut listeners = self.lock();
        Arc::clone(&listeners.entry(listener.to_string()).or_default().seen)
    }

    /// The fetch counters of `listener` (zero if it never fetched).
    pub(crate) fn outcomes(&self, listener: &str) -> Arc<FetchOutcomes> {
        self.lock()
            .get(listener)
            .map(|l| Arc::clone(&l.outcomes))
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ListenerCrls>> {
        // Short, await-free sections that cannot panic.
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn crl(issuer: &str, number: Option<&[u8]>, this_update: u64) -> CheckedCrl {
        CheckedCrl {
            issuer: issuer.to_string(),
            number: number.map(<[u8]>::to_vec),
            this_update: UNIX_EPOCH + Duration::from_secs(this_update),
            next_update: None,
        }
    }

    #[test]
    fn the_first_crl_of_a_url_is_taken() {
        assert_eq!(judge(None, &crl("CA", Some(&[1]), 10), false), Verdict::Replace);
    }

    #[test]
    fn a_higher_crl_number_replaces_even_with_an_earlier_this_update() {
        let held = crl("CA", Some(&[1]), 100);
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[2]), 50), false),
            Verdict::Replace
        );
        let wide = crl("CA", Some(&[1, 0]), 50);
        assert_eq!(
            judge(Some(&crl("CA", Some(&[0, 0xff]), 100)), &wide, false),
            Verdict::Replace,
            "256 is above 255 whatever the leading zeros"
        );
    }

    #[test]
    fn a_lower_crl_number_is_refused_as_older_even_with_a_later_this_update() {
        let held = crl("CA", Some(&[5]), 100);
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[4]), 200), false),
            Verdict::Older
        );
    }

    #[test]
    fn at_an_equal_number_the_later_this_update_wins_and_an_equal_one_changes_nothing() {
        let held = crl("CA", Some(&[5]), 100);
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[5]), 101), false),
            Verdict::Replace
        );
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[5]), 100), false),
            Verdict::Same
        );
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[5]), 99), false),
            Verdict::Older
        );
    }

    #[test]
    fn without_numbers_this_update_decides() {
        let held = crl("CA", None, 100);
        assert_eq!(
            judge(Some(&held), &crl("CA", Some(&[1]), 101), false),
            Verdict::Replace
        );
        assert_eq!(judge(Some(&held), &crl("CA", None, 99), false), Verdict::Older);
    }

    #[test]
    fn the_same_bytes_are_the_same_crl_and_another_issuers_crl_replaces() {
        let held = crl("CA", Some(&[5]), 100);
        assert_eq!(judge(Some(&held), &held, true), Verdict::Same);
        assert_eq!(
            judge(Some(&held), &crl("Other CA", Some(&[1]), 1), false),
            Verdict::Replace
        );
    }

    #[test]
    fn an_older_crl_offered_to_the_table_leaves_the_newer_one_held() {
        let table = FetchedCrls::default();
        let der = |b: u8| CertificateRevocationListDer::from(vec![b]);
        let at = Some(UNIX_EPOCH);
        assert_eq!(
            table.offer("l", "u", der(1), crl("CA", Some(&[2]), 10), at),
            Verdict::Replace
        );
        assert_eq!(
            table.offer("l", "u", der(2), crl("CA", Some(&[1]), 20), at),
            Verdict::Older
        );
        let held = table.held("l", &["u".to_string()]);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1.der.as_ref(), &[1]);
    }

    #[test]
    fn failures_count_until_a_good_fetch_and_each_outcome_is_counted() {
        let table = FetchedCrls::default();
        let at = UNIX_EPOCH;
        assert_eq!(table.record("l", "u", Outcome::Failed, at), 0);
        assert_eq!(table.record("l", "u", Outcome::Refused, at), 1);
        assert_eq!(table.history("l", "u").failures, 2);
        assert_eq!(table.record("l", "u", Outcome::Unchanged, at), 2);
        assert_eq!(table.history("l", "u").failures, 0);
        let outcomes = table.outcomes("l");
        assert_eq!(
            (
                outcomes.failed.get(),
                outcomes.refused.get(),
                outcomes.unchanged.get()
            ),
            (1, 1, 1)
        );
    }
}
