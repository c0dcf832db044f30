//! Wall-clock seconds for the request path: a clock read and a division, where
//! `time::OffsetDateTime::now_utc` would also work out a calendar date on every request.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The day of the reports (days since the Unix epoch, UTC) of a time read earlier.
pub fn unix_day_of(t: SystemTime) -> i32 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        .div_euclid(86_400) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_report_day_starts_at_utc_midnight() {
        let at = |secs: u64| unix_day_of(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), 0);
        assert_eq!(at(86_399), 0);
        assert_eq!(at(86_400), 1);
        // 2026-11-29T23:59:59Z and the next second.
        assert_eq!(at(1_795_996_799), 20_786);
        assert_eq!(at(1_795_996_800), 20_787);
        assert_eq!(unix_day_of(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
