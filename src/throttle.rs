//! A throttle for log lines that a peer can cause at will (refusals), so that a flood of bad
//! connections cannot flood the log. It counts what it holds back and reports it with the next
//! line let through. No I/O; it reads the monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lets at most [`LogThrottle::PER_SECOND`] lines through per second; reports how many it held
/// back since the last line it let through.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    /// Second (since the throttle's first use) of the current budget, and lines used in it.
    state: std::sync::Mutex<(u64, u32)>,
    suppressed: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl LogThrottle {
    const PER_SECOND: u32 = 10;

    /// A throttle that has let nothing through yet (for a `static`).
    pub(crate) const fn new() -> LogThrottle {
        LogThrottle {
            state: std::sync::Mutex::new((0, 0)),
            suppressed: AtomicU64::new(0),
            origin: std::sync::OnceLock::new(),
        }
    }

    /// `Some(suppressed_since_last)` if this line may be logged.
    pub(crate) fn admit(&self) -> Option<u64> {
        let second = self.origin.get_or_init(Instant::now).elapsed().as_secs();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != second {
            *state = (second, 0);
        }
        if state.1 < Self::PER_SECOND {
            state.1 += 1;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
