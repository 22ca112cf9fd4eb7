//! Time arithmetic that cannot panic: deadlines made from durations a config file or a peer
//! supplied. `Instant + Duration` panics when the sum leaves the clock's range; every deadline in
//! fulcrum is made here instead, saturating at a far future (about thirty years on), which no
//! connection or probe lives to see; and how long to sleep toward a wall-clock time. Pure; it
//! reads no clock itself.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// How far ahead a deadline saturates: thirty years, as tokio's own "far future".
pub(crate) const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `at + d`, or `at + FAR` if that is sooner or the sum would overflow.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    // `at + FAR` is within range for any instant of a running system (tokio counts from boot).
    at.checked_add(d.min(FAR)).unwrap_or(at)
}

/// The longest a task waiting for a wall-clock time sleeps at a time: wall-clock deadlines are
/// slept on the monotonic clock, so a step of the wall clock is noticed within this.
pub(crate) const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(60);

/// How long from `now` until the wall-clock time `at` (zero if it has passed), at most
/// [`WALL_CLOCK_RECHECK`].
pub(crate) fn until_wall(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .unwrap_or(Duration::ZERO)
        .min(WALL_CLOCK_RECHECK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_from_any_duration_is_never_a_panic_and_at_most_far_ahead() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(later(now, Duration::MAX), now + FAR);
        assert_eq!(later(now, FAR + Duration::from_secs(1)), now + FAR);
    }

    #[test]
    fn a_wall_clock_wait_is_never_negative_and_at_most_the_recheck_period() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(until_wall(at(1_010), now), Duration::from_secs(10));
        assert_eq!(until_wall(at(10), now), Duration::ZERO);
        assert_eq!(until_wall(at(1_000_000), now), WALL_CLOCK_RECHECK);
    }
}
