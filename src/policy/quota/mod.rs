//! Usage-plan quotas (`request-pipeline.md`, "API keys and usage-plan quotas"): requests
//! counted per (usage plan, API key) in UTC calendar windows, at admission, never above the
//! limit. [`QuotaStore`] is the seam for fleet mode: [`LocalQuotaStore`] keeps counters in
//! memory and persists them in an embedded redb database under `state.dir`;
//! [`RedisQuotaStore`] shares them with the other instances of a fleet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};
use time::{Date, OffsetDateTime, Time};

use crate::snapshot::model::QuotaRate;

mod redis;
pub use self::redis::RedisQuotaStore;

/// The calendar window containing an instant: `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

impl Window {
    pub fn containing(rate: QuotaRate, now: OffsetDateTime) -> Window {
        let now = now.to_offset(time::UtcOffset::UTC);
        let day = now.date();
        let (start, end) = match rate {
            QuotaRate::Hour => {
                let s = day
                    .with_hms(now.hour(), 0, 0)
                    .unwrap_or(day.midnight())
                    .assume_utc();
                (s, s + time::Duration::HOUR)
            }
            QuotaRate::Day => {
                let s = day.midnight().assume_utc();
                (s, s + time::Duration::DAY)
            }
            QuotaRate::Month => {
                let first = Date::from_calendar_date(day.year(), day.month(), 1).unwrap_or(day);
                let next = if day.month() == time::Month::December {
                    Date::from_calendar_date(day.year() + 1, time::Month::January, 1)
                } else {
                    Date::from_calendar_date(day.year(), day.month().next(), 1)
                }
                .unwrap_or(day);
                (
                    first.with_time(Time::MIDNIGHT).assume_utc(),
                    next.with_time(Time::MIDNIGHT).assume_utc(),
                )
            }
        };
        Window {
            start: start.unix_timestamp(),
            end: end.unix_timestamp(),
        }
    }

    /// Whole seconds from `now` until the window ends (at least 1).
    pub fn reset_secs(&self, now: OffsetDateTime) -> u64 {
        (self.end - now.unix_timestamp()).max(1) as u64
    }
}

/// The outcome of one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota store unavailable: {0}")]
    Unavailable(String),
}

/// Where quota counters live. One call per admitted-or-refused request; an admission that
/// would exceed `limit` in the window is refused and not counted.
pub trait QuotaStore: Send + Sync + 'static {
    fn admit<'a>(
        &'a self,
        plan_id: &'a str,
        key_id: &'a str,
        limit: u64,
        window: Window,
    ) -> BoxFuture<'a, Result<(u64, bool), QuotaError>>;

    /// Requests admitted per key and UTC hour for `plan_id`, hours in `[from, to)` (Unix
    /// seconds of hour starts).
    fn usage<'a>(
        &'a self,
        plan_id: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, QuotaError>>;

    /// Writes what is only in memory to durable storage.
    fn flush(&self) -> Result<(), QuotaError>;

    /// Forgets windows that ended and usage hours older than `before` (Unix seconds).
    fn prune(&self, before: i64) -> Result<(), QuotaError>;

    /// The backend label of `apigw_quota_store_errors_total`.
    fn backend(&self) -> &'static str;
}

/// Admits one request and builds the answer the pipeline needs.
pub async fn admit(
    store: &dyn QuotaStore,
    plan_id: &str,
    key_id: &str,
    limit: u64,
    rate: QuotaRate,
) -> Result<Admission, QuotaError> {
    let now = OffsetDateTime::now_utc();
    let window = Window::containing(rate, now);
    let (count, admitted) = store.admit(plan_id, key_id, limit, window).await?;
    Ok(Admission {
        admitted,
        limit,
        remaining: limit.saturating_sub(count),
        reset_secs: window.reset_secs(now),
    })
}

/// Requests admitted for one key in one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key_id: String,
    pub hour_start: i64,
    pub count: u64,
}

/// (plan, key, UTC hour start).
type UsageKey = (Arc<str>, Arc<str>, i64);
/// (admitted requests, changed since the last flush).
type UsageCount = (u64, bool);

struct Counter {
    window_start: i64,
    count: u64,
    dirty: bool,
}

const COUNTERS: TableDefinition<&str, (i64, u64)> = TableDefinition::new("quota_counters");
/// (plan, key, hour start) → admitted requests, for the usage API.
const USAGE: TableDefinition<(&str, &str, i64), u64> = TableDefinition::new("usage_hours");

/// In-memory counters (one lock per key, so admission is exact under any concurrency),
/// persisted to redb at least every second and on shutdown.
pub struct LocalQuotaStore {
    counters: DashMap<String, Counter>,
    usage: DashMap<UsageKey, UsageCount>,
    db: Arc<Database>,
    any_dirty: AtomicBool,
}

fn counter_key(plan_id: &str, key_id: &str) -> String {
    let mut k = String::with_capacity(plan_id.len() + key_id.len() + 1);
    k.push_str(plan_id);
    k.push('\u{1f}');
    k.push_str(key_id);
    k
}

impl LocalQuotaStore {
    /// Loads the counters kept in the state database.
    pub fn open(db: Arc<Database>) -> Result<Arc<Self>, String> {
        let counters = DashMap::new();
        let usage = DashMap::new();
        {
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            match tx.open_table(COUNTERS) {
                Ok(table) => {
                    for row in table.iter().map_err(|e| e.to_string())? {
                        let (k, v) = row.map_err(|e| e.to_string())?;
                        let (window_start, count) = v.value();
                        counters.insert(
                            k.value().to_owned(),
                            Counter {
                                window_start,
                                count,
                                dirty: false,
                            },
                        );
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            match tx.open_table(USAGE) {
                Ok(table) => {
                    for row in table.iter().map_err(|e| e.to_string())? {
                        let (k, v) = row.map_err(|e| e.to_string())?;
                        let (plan, key, hour) = k.value();
                        usage.insert((Arc::from(plan), Arc::from(key), hour), (v.value(), false));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(Arc::new(Self {
            counters,
            usage,
            db,
            any_dirty: AtomicBool::new(false),
        }))
    }
}

impl QuotaStore for LocalQuotaStore {
    fn admit<'a>(
        &'a self,
        plan_id: &'a str,
        key_id: &'a str,
        limit: u64,
        window: Window,
    ) -> BoxFuture<'a, Result<(u64, bool), QuotaError>> {
        let mut c = self
            .counters
            .entry(counter_key(plan_id, key_id))
            .or_insert(Counter {
                window_start: window.start,
                count: 0,
                dirty: false,
            });
        if c.window_start != window.start {
            // A new window: the quota is restored.
            c.window_start = window.start;
            c.count = 0;
        }
        let admitted = c.count < limit;
        if admitted {
            c.count += 1;
            c.dirty = true;
            self.any_dirty.store(true, Ordering::Relaxed);
        }
        let count = c.count;
        drop(c);
        if admitted {
            let hour = OffsetDateTime::now_utc().unix_timestamp().div_euclid(3600) * 3600;
            let mut u = self
                .usage
                .entry((Arc::from(plan_id), Arc::from(key_id), hour))
                .or_insert((0, false));
            u.0 += 1;
            u.1 = true;
        }
        Box::pin(std::future::ready(Ok((count, admitted))))
    }

    fn usage<'a>(
        &'a self,
        plan_id: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, QuotaError>> {
        let rows = self
            .usage
            .iter()
            .filter(|e| &*e.key().0 == plan_id && (from..to).contains(&e.key().2))
            .map(|e| UsageRow {
                key_id: e.key().1.to_string(),
                hour_start: e.key().2,
                count: e.value().0,
            })
            .collect();
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn flush(&self) -> Result<(), QuotaError> {
        if !self.any_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| QuotaError::Unavailable(e.to_string());
        let mut rows = Vec::new();
        for mut c in self.counters.iter_mut() {
            if c.dirty {
                c.dirty = false;
                rows.push((c.key().clone(), (c.window_start, c.count)));
            }
        }
        let mut usage_rows = Vec::new();
        for mut u in self.usage.iter_mut() {
            if u.1 {
                u.1 = false;
                usage_rows.push((u.key().clone(), u.0));
            }
        }
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = tx.open_table(COUNTERS).map_err(|e| err(&e))?;
            for (k, v) in &rows {
                table.insert(k.as_str(), v).map_err(|e| err(&e))?;
            }
            let mut table = tx.open_table(USAGE).map_err(|e| err(&e))?;
            for ((plan, key, hour), n) in &usage_rows {
                table
                    .insert((&**plan, &**key, *hour), n)
                    .map_err(|e| err(&e))?;
            }
        }
        tx.commit().map_err(|e| err(&e))?;
        Ok(())
    }

    fn prune(&self, before: i64) -> Result<(), QuotaError> {
        let err = |e: &dyn std::fmt::Display| QuotaError::Unavailable(e.to_string());
        self.usage.retain(|k, _| k.2 >= before);
        // A counter whose window started before `before` (at least 32 days ago) has ended.
        self.counters.retain(|_, c| c.window_start >= before);
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut usage = tx.open_table(USAGE).map_err(|e| err(&e))?;
            usage
                .retain(|(_, _, hour), _| hour >= before)
                .map_err(|e| err(&e))?;
            let mut counters = tx.open_table(COUNTERS).map_err(|e| err(&e))?;
            counters
                .retain(|_, (window_start, _)| window_start >= before)
                .map_err(|e| err(&e))?;
        }
        tx.commit().map_err(|e| err(&e))
    }

    fn backend(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn calendar_windows_in_utc() {
        let t = at("2026-12-31T23:59:30+09:00");
        let h = Window::containing(QuotaRate::Hour, t);
        assert_eq!(h.start, at("2026-12-31T14:00:00Z").unix_timestamp());
        assert_eq!(h.end, at("2026-12-31T15:00:00Z").unix_timestamp());
        let d = Window::containing(QuotaRate::Day, at("2026-12-31T23:59:30Z"));
        assert_eq!(d.reset_secs(at("2026-12-31T23:59:30Z")), 30);
        let m = Window::containing(QuotaRate::Month, at("2026-12-15T10:00:00Z"));
        assert_eq!(m.start, at("2026-12-01T00:00:00Z").unix_timestamp());
        assert_eq!(m.end, at("2027-01-01T00:00:00Z").unix_timestamp());
        let feb = Window::containing(QuotaRate::Month, at("2028-02-29T10:00:00Z"));
        assert_eq!(feb.end, at("2028-03-01T00:00:00Z").unix_timestamp());
    }

    #[tokio::test]
    async fn exact_under_concurrency_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let store = LocalQuotaStore::open(db.clone()).unwrap();
        let w = Window {
            start: 100,
            end: 200,
        };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                for _ in 0..100 {
                    if s.admit("up", "k", 100, w).await.unwrap().1 {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert_eq!(admitted, 100);
        store.flush().unwrap();
        drop(store);
        let again = LocalQuotaStore::open(db.clone()).unwrap();
        assert_eq!(again.admit("up", "k", 100, w).await.unwrap(), (100, false));
        let hour = OffsetDateTime::now_utc().unix_timestamp().div_euclid(3600) * 3600;
        let usage = again.usage("up", hour, hour + 3600).await.unwrap();
        assert_eq!(
            usage,
            vec![UsageRow {
                key_id: "k".into(),
                hour_start: hour,
                count: 100
            }],
            "persisted usage"
        );
        // Pruning forgets old hours and ended windows, in memory and on disk.
        again.flush().unwrap();
        again.prune(hour + 1).unwrap();
        assert!(again.usage("up", 0, i64::MAX).await.unwrap().is_empty());
        let reopened = LocalQuotaStore::open(db.clone()).unwrap();
        assert!(reopened.usage("up", 0, i64::MAX).await.unwrap().is_empty());
        assert_eq!(
            reopened.admit("up", "k", 100, w).await.unwrap(),
            (1, true),
            "the ended window was forgotten"
        );
        // The next window restores the quota.
        assert_eq!(
            again
                .admit(
                    "up",
                    "k",
                    100,
                    Window {
                        start: 200,
                        end: 300
                    }
                )
                .await
                .unwrap(),
            (1, true)
        );
    }
}
