//! Time arithmetic that cannot panic: deadlines made from durations a config file or a peer
//! supplied. `Instant + Duration` panics when the sum leaves the clock's range; every deadline in
//! fulcrum is made here instead, saturating at a far future (about thirty years on), which no
//! connection or probe lives to see. Pure; it reads no clock itself.

use std::time::Duration;

use tokio::time::Instant;

/// How far ahead a deadline saturates: thirty years, as tokio's own "far future".
pub const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `at + d`, or `at + FAR` if that is sooner or the sum would overflow.
pub fn later(at: Instant, d: Duration) -> Instant {
    // `at + FAR` is within range for any instant of a running system (tokio counts from boot).
    at.checked_add(d.min(FAR)).unwrap_or(at)
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
}
