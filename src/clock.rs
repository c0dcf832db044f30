//! Wall-clock seconds for the request path, without a clock read per request.
//!
//! A request reads the monotonic clock as it starts and as its answer comes; the wall
//! clock (a JWT's `exp`, the quota window, the report's day) is then worked out from those
//! instants: each thread keeps the second of the wall clock it saw last, as the span of
//! instants it covers, and reads the wall clock again only for an instant outside it (about
//! once a second under load). A step of the wall clock (an operator setting the time) is
//! seen within a second; `time::OffsetDateTime::now_utc` would also work out a calendar
//! date on every request.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One wall-clock second: the instants `from..until` and its seconds since the epoch.
#[derive(Clone, Copy)]
struct Second {
    from: Instant,
    until: Instant,
    secs: i64,
}

thread_local! {
    /// The second this thread last worked out (see the module docs).
    static SECOND: Cell<Option<Second>> = const { Cell::new(None) };
}

/// Seconds since the Unix epoch (0 before it) at `t`, an instant this thread read earlier
/// (a request's start, or when its answer came): no clock read while `t` is in the second
/// the thread worked out last.
pub fn unix_secs_at(t: Instant) -> i64 {
    SECOND.with(|c| match c.get() {
        Some(s) if s.from <= t && t < s.until => s.secs,
        _ => {
            let s = second_of(t, Instant::now(), SystemTime::now());
            c.set(Some(s));
            s.secs
        }
    })
}

/// The report day (days since the Unix epoch, UTC) at `t`, as [`unix_secs_at`].
pub fn unix_day_at(t: Instant) -> i32 {
    unix_day_of_secs(unix_secs_at(t))
}

/// The wall-clock second holding `t`, from the clocks read at `now` (`wall`).
fn second_of(t: Instant, now: Instant, wall: SystemTime) -> Second {
    let since_epoch = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    let at_t = match t.checked_duration_since(now) {
        Some(ahead) => since_epoch + ahead,
        None => since_epoch.saturating_sub(now.duration_since(t)),
    };
    let into = Duration::from_nanos(u64::from(at_t.subsec_nanos()));
    let from = t.checked_sub(into).unwrap_or(t);
    Second {
        from,
        until: from + Duration::from_secs(1),
        secs: at_t.as_secs() as i64,
    }
}

/// The day of the reports (days since the Unix epoch, UTC) of seconds since the epoch.
fn unix_day_of_secs(secs: i64) -> i32 {
    secs.div_euclid(86_400) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_day_starts_at_utc_midnight() {
        let at = unix_day_of_secs;
        assert_eq!(at(0), 0);
        assert_eq!(at(86_399), 0);
        assert_eq!(at(86_400), 1);
        // 2026-11-29T23:59:59Z and the next second.
        assert_eq!(at(1_795_996_799), 20_786);
        assert_eq!(at(1_795_996_800), 20_787);
    }

    #[test]
    fn the_second_of_an_instant_is_the_wall_clocks_then() {
        let now = Instant::now();
        // The wall clock read at `now` says 2026-11-29T23:59:59.250Z.
        let wall = UNIX_EPOCH + Duration::from_millis(1_795_996_799_250);
        // Read just then: that second, from 250 ms before `now` to 750 ms after.
        let s = second_of(now, now, wall);
        assert_eq!(s.secs, 1_795_996_799);
        assert_eq!(now.duration_since(s.from), Duration::from_millis(250));
        assert_eq!(s.until.duration_since(now), Duration::from_millis(750));
        // A request that started 400 ms before `now` started in the second before, at .850.
        let earlier = now.checked_sub(Duration::from_millis(400)).unwrap();
        let s = second_of(earlier, now, wall);
        assert_eq!(s.secs, 1_795_996_798);
        assert_eq!(earlier.duration_since(s.from), Duration::from_millis(850));
        assert_eq!(unix_day_of_secs(s.secs), 20_786);
    }

    #[test]
    fn the_threads_second_follows_the_wall_clock() {
        let t = Instant::now();
        let before = unix_secs();
        let secs = unix_secs_at(t);
        let after = unix_secs();
        assert!(
            before <= secs && secs <= after,
            "{before} <= {secs} <= {after}"
        );
        // Asked again for the same instant: the same second, from the thread's cache.
        assert_eq!(unix_secs_at(t), secs);
        // An instant two seconds later is in a later second.
        let later = t + Duration::from_secs(2);
        assert!(unix_secs_at(later) >= secs + 2);
        assert_eq!(unix_day_at(t), unix_day_of_secs(secs));
    }
}
