//! Usage-plan quotas (`request-pipeline.md`, "API keys and usage-plan quotas"): requests
//! counted per (usage plan, API key) in UTC calendar windows, at admission, never above the
//! limit. [`QuotaStore`] is the seam for fleet mode: [`LocalQuotaStore`] keeps counters in
//! memory and persists them in an embedded redb database under `state.dir`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};
use time::{Date, OffsetDateTime, Time};

use crate::snapshot::model::QuotaRate;

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

    /// Writes what is only in memory to durable storage.
    fn flush(&self) -> Result<(), QuotaError>;

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

struct Counter {
    window_start: i64,
    count: u64,
    dirty: bool,
}

const COUNTERS: TableDefinition<&str, (i64, u64)> = TableDefinition::new("quota_counters");

/// In-memory counters (one lock per key, so admission is exact under any concurrency),
/// persisted to redb at least every second and on shutdown.
pub struct LocalQuotaStore {
    counters: DashMap<String, Counter>,
    db: Database,
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
    /// Opens (or creates) `dir/quota.redb` and loads its counters.
    pub fn open(dir: &Path) -> Result<Arc<Self>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("state.dir {}: {e}", dir.display()))?;
        let path = dir.join("quota.redb");
        let db =
            Database::create(&path).map_err(|e| format!("state.dir {}: {e}", path.display()))?;
        let counters = DashMap::new();
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
        }
        Ok(Arc::new(Self {
            counters,
            db,
            any_dirty: AtomicBool::new(false),
        }))
    }

    /// Flushes every second until the process ends.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let me = me.clone();
                let r = tokio::task::spawn_blocking(move || me.flush()).await;
                if let Ok(Err(e)) = r {
                    tracing::error!(error = %e, "quota counters could not be persisted");
                }
            }
        })
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
        Box::pin(std::future::ready(Ok((count, admitted))))
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
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = tx.open_table(COUNTERS).map_err(|e| err(&e))?;
            for (k, v) in &rows {
                table.insert(k.as_str(), v).map_err(|e| err(&e))?;
            }
        }
        tx.commit().map_err(|e| err(&e))?;
        Ok(())
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
        let store = LocalQuotaStore::open(dir.path()).unwrap();
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
        let again = LocalQuotaStore::open(dir.path()).unwrap();
        assert_eq!(again.admit("up", "k", 100, w).await.unwrap(), (100, false));
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
