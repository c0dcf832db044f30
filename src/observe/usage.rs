//! The usage API (`operations.md`, "Usage"), like AWS `GetUsage`: per key and UTC day of
//! the period, `[used, remaining]`, where `used` is what was admitted that day and
//! `remaining` what was left of the quota window in force at the day's end (for the current
//! day: now). Built from the hourly usage the quota store keeps.

use std::collections::{BTreeMap, HashMap};

use time::{Date, OffsetDateTime};

use crate::policy::quota::{UsageRow, Window};
use crate::snapshot::model::QuotaRate;

fn midnight(d: Date) -> i64 {
    d.midnight().assume_utc().unix_timestamp()
}

/// The first second the usage API needs rows from: month plans count from the first of
/// `start`'s month.
pub fn rows_from(rate: QuotaRate, start: Date) -> i64 {
    match rate {
        QuotaRate::Hour | QuotaRate::Day => midnight(start),
        QuotaRate::Month => {
            Window::containing(QuotaRate::Month, start.midnight().assume_utc()).start
        }
    }
}

/// `[used, remaining]` per day of `[start, end]` for each key in `keys`.
pub fn items(
    rows: &[UsageRow],
    keys: &[String],
    limit: u64,
    rate: QuotaRate,
    start: Date,
    end: Date,
    now: OffsetDateTime,
) -> BTreeMap<String, Vec<[u64; 2]>> {
    let mut by_key: HashMap<&str, BTreeMap<i64, u64>> = HashMap::new();
    for r in rows {
        *by_key
            .entry(r.key_id.as_str())
            .or_default()
            .entry(r.hour_start)
            .or_default() += r.count;
    }
    let empty = BTreeMap::new();
    let mut out = BTreeMap::new();
    for key in keys {
        let hours = by_key.get(key.as_str()).unwrap_or(&empty);
        let sum = |from: i64, to: i64| -> u64 { hours.range(from..to).map(|(_, c)| c).sum() };
        let mut days = Vec::new();
        let mut d = start;
        loop {
            let (day_start, day_end) = (midnight(d), midnight(d) + 86_400);
            let used = sum(day_start, day_end);
            // The instant whose window counts: the day's last second, or now for today.
            let at = (day_end - 1).min(now.unix_timestamp());
            let remaining = if at < day_start {
                limit
            } else {
                let w = Window::containing(
                    rate,
                    OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                );
                limit.saturating_sub(sum(w.start, w.end.min(at + 1)))
            };
            days.push([used, remaining]);
            if d >= end {
                break;
            }
            match d.next_day() {
                Some(n) => d = n,
                None => break,
            }
        }
        out.insert(key.clone(), days);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn row(key: &str, hour: &str, count: u64) -> UsageRow {
        UsageRow {
            key_id: key.into(),
            hour_start: at(hour).unix_timestamp(),
            count,
        }
    }

    fn date(s: &str) -> Date {
        crate::observe::report::parse_date(s).unwrap()
    }

    #[test]
    fn day_hour_and_month_plans() {
        let rows = vec![
            row("k1", "2026-11-20T10:00:00Z", 3),
            row("k1", "2026-11-20T23:00:00Z", 2),
            row("k1", "2026-11-21T01:00:00Z", 4),
            row("k2", "2026-11-21T05:00:00Z", 1),
        ];
        let keys = vec!["k1".to_owned(), "k2".to_owned()];
        let now = at("2026-11-21T12:30:00Z");
        let day = items(
            &rows,
            &keys,
            10,
            QuotaRate::Day,
            date("2026-11-20"),
            date("2026-11-22"),
            now,
        );
        assert_eq!(day["k1"], vec![[5, 5], [4, 6], [0, 10]]);
        assert_eq!(day["k2"], vec![[0, 10], [1, 9], [0, 10]]);
        let hour = items(
            &rows,
            &keys,
            10,
            QuotaRate::Hour,
            date("2026-11-20"),
            date("2026-11-21"),
            now,
        );
        assert_eq!(
            hour["k1"],
            vec![[5, 8], [4, 10]],
            "the 23:00 window of the 20th; the current hour of the 21st"
        );
        let month = items(
            &rows,
            &keys,
            100,
            QuotaRate::Month,
            date("2026-11-20"),
            date("2026-11-21"),
            now,
        );
        assert_eq!(month["k1"], vec![[5, 95], [4, 91]]);
    }
}
