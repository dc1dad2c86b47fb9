//! Rate-limited logging for errors that can repeat thousands of times a second.
//!
//! An error that follows the load (accept failing with EMFILE, an admin listener out of descriptors) would
//! otherwise write a line per occurrence, filling the disk and hiding everything else in the log exactly when
//! an operator reads it. A [`LogLimit`] lets one line through per interval and counts the ones it held back,
//! so the line that does get through says how many were suppressed.
//!
//! ```ignore
//! // (Not run as a doctest: the module is crate-private. The unit tests below use it the same way.)
//! use crate::ratelog::LogLimit;
//! static ACCEPT: LogLimit = LogLimit::per_second();
//! if let Some(suppressed) = ACCEPT.check() {
//!     tracing::error!(suppressed, "accept failed");
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One log site's budget: one line per `every`.
pub struct LogLimit {
    every_ms: u64,
    /// Milliseconds since [`epoch`] of the last line let through, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

/// The process-wide zero for the limits' clocks (a `static` cannot hold an `Instant`).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimit {
    pub const fn new(every: Duration) -> LogLimit {
        LogLimit {
            every_ms: every.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub const fn per_second() -> LogLimit {
        LogLimit::new(Duration::from_secs(1))
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the last one;
    /// `None` (and one more held back) otherwise. Lock-free: any thread, any rate.
    pub fn check(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.every_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Of several threads that find the interval over, one wins the line.
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let limit = LogLimit::new(Duration::from_millis(200));
        assert_eq!(limit.check(), Some(0));
        for _ in 0..50 {
            assert_eq!(limit.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.check(), Some(50));
        assert_eq!(limit.check(), None);
    }
}
