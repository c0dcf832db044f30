//! At most one log line per second for a failure that can repeat on every request (a quota
//! store that is down would otherwise write a line per request, burying everything else).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct LogThrottle {
    last_second: AtomicI64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub const fn new() -> Self {
        Self {
            last_second: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` otherwise.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let last = self.last_second.load(Ordering::Relaxed);
        if last != now
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_per_second() {
        let t = super::LogThrottle::new();
        assert_eq!(t.allow(), Some(0));
        let held: usize = (0..100).filter(|_| t.allow().is_none()).count();
        // All within the same second, unless the test straddles a second boundary.
        assert!(held >= 99, "{held}");
    }
}
