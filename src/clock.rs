//! Wall-clock seconds for the request path: a clock read and a division, where
//! `time::OffsetDateTime::now_utc` would also work out a calendar date on every request.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Days since the Unix epoch (UTC), the day of the reports.
pub fn unix_day() -> i32 {
    unix_day_of(SystemTime::now())
}

/// The day of the reports (days since the Unix epoch, UTC) of a time read earlier.
pub fn unix_day_of(t: SystemTime) -> i32 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        .div_euclid(86_400) as i32
}
