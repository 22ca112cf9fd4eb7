//! When to fetch a CRL URL next (pure: the history and the settings come in, a wall-clock time
//! goes out).
//!
//! After a good fetch: `crl_refresh` later, or sooner, a margin before the held CRL's
//! `nextUpdate` (a tenth of its validity, at most an hour), so that the next CRL is in hand
//! before this one goes stale; once that point has passed (the issuer is late), every
//! [`STALE_INTERVAL`]. After failures: [`MIN_INTERVAL`], doubling with each one, up to
//! [`MAX_BACKOFF`]. Never sooner than [`MIN_INTERVAL`] after the last fetch, and never later than
//! `crl_refresh` (which caps every wait: a `crl_refresh` shorter than `MIN_INTERVAL` is the floor).

use std::time::{Duration, SystemTime};

use crate::state::fetched_crls::History;

/// The shortest wait between two fetches of one URL (unless `crl_refresh` is shorter).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// The longest wait after a failed fetch (unless `crl_refresh` is shorter).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a CRL at or past its margin before `nextUpdate` is asked for again.
pub(crate) const STALE_INTERVAL: Duration = Duration::from_secs(60);
/// The most fetched before `nextUpdate`.
const MAX_MARGIN: Duration = Duration::from_secs(3600);

/// When to fetch a URL with this `history` next under `crl_refresh` = `refresh`; `None`: at
/// once (it was never fetched).
pub(crate) fn next_fetch(history: &History, refresh: Duration) -> Option<SystemTime> {
    let attempted = history.attempted?;
    let floor = MIN_INTERVAL.min(refresh);
    let wait = if history.failures > 0 {
        let doublings = (history.failures - 1).min(16);
        MIN_INTERVAL.saturating_mul(1 << doublings).min(MAX_BACKOFF)
    } else {
        match &history.held {
            Some(held) => match held.next_update {
                Some(next_update) => {
                    let validity = next_update.duration_since(held.this_update).unwrap_or_default();
                    let margin = (validity / 10).min(MAX_MARGIN);
                    let target = next_update.checked_sub(margin).unwrap_or(next_update);
                    match target.duration_since(attempted) {
                        Ok(until) if !until.is_zero() => until,
                        _ => STALE_INTERVAL,
                    }
                }
                None => refresh,
            },
            None => refresh,
        }
    };
    Some(attempted + wait.min(refresh).max(floor))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::tls::CheckedCrl;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn history(attempted: SystemTime, failures: u32, valid: Option<(u64, u64)>) -> History {
        History {
            attempted: Some(attempted),
            failures,
            held: valid.map(|(this_update, next_update)| CheckedCrl {
                issuer: "CA".into(),
                number: Some(vec![1]),
                this_update: at(this_update),
                next_update: Some(at(next_update)),
            }),
        }
    }

    #[test]
    fn a_url_never_fetched_is_fetched_at_once() {
        assert_eq!(next_fetch(&History::default(), HOUR), None);
    }

    #[test]
    fn a_good_fetch_waits_crl_refresh_when_next_update_is_far() {
        let h = history(at(0), 0, Some((0, 7 * 24 * 3600)));
        assert_eq!(next_fetch(&h, HOUR), Some(at(3600)));
    }

    #[test]
    fn a_near_next_update_brings_the_fetch_forward_by_a_tenth_of_the_validity() {
        // Valid 1000 s from 0: fetched again at 900, whatever crl_refresh allows beyond.
        let h = history(at(100), 0, Some((0, 1000)));
        assert_eq!(next_fetch(&h, HOUR), Some(at(900)));
    }

    #[test]
    fn a_crl_past_its_margin_is_asked_for_every_stale_interval_not_in_a_loop() {
        let h = history(at(950), 0, Some((0, 1000)));
        assert_eq!(next_fetch(&h, HOUR), Some(at(950) + STALE_INTERVAL));
        let h = history(at(5000), 0, Some((0, 1000)));
        assert_eq!(next_fetch(&h, HOUR), Some(at(5000) + STALE_INTERVAL));
    }

    #[test]
    fn failures_back_off_doubling_from_the_floor_up_to_the_cap() {
        let waits: Vec<_> = (1..=7)
            .map(|failures| next_fetch(&history(at(0), failures, None), HOUR))
            .map(|due| due.and_then(|d| d.duration_since(at(0)).ok()))
            .collect();
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(
            waits,
            [
                secs(10),
                secs(20),
                secs(40),
                secs(80),
                secs(160),
                secs(300),
                secs(300)
            ]
        );
        assert_eq!(
            next_fetch(&history(at(0), u32::MAX, None), HOUR),
            Some(at(300)),
            "any number of failures stays within the cap"
        );
    }

    #[test]
    fn crl_refresh_caps_every_wait_and_a_short_one_is_the_floor() {
        let second = Duration::from_secs(1);
        assert_eq!(next_fetch(&history(at(0), 3, None), second), Some(at(1)));
        assert_eq!(
            next_fetch(&history(at(0), 0, Some((0, 10_000))), second),
            Some(at(1))
        );
        assert_eq!(next_fetch(&history(at(0), 0, Some((0, 1))), second), Some(at(1)));
    }
}
