//! Usage-plan quotas (`request-pipeline.md`, "API keys and usage-plan quotas"): requests
//! counted per (usage plan, API key) in UTC calendar windows, at admission, never above the
//! limit. [`QuotaStore`] is the seam for fleet mode: [`LocalQuotaStore`] keeps counters in
//! memory and persists them in an embedded redb database under `state.dir`;
//! [`RedisQuotaStore`] shares them with the other instances of a fleet.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use redb::{ReadableTable, TableDefinition};
use time::{Date, OffsetDateTime, Time};

use crate::snapshot::model::QuotaRate;

mod fleet_usage;
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum QuotaError {
    #[error("quota store unavailable: {0}")]
    Unavailable(String),
}

/// Where quota counters live. One call per admitted-or-refused request; an admission that
/// would exceed `limit` in the window is refused and not counted.
pub trait QuotaStore: Send + Sync + 'static {
    /// `slot` is the compiled key's (see [`QuotaStore::admit_now`]); `now` is the caller's
    /// clock reading (Unix seconds), which picked `window`.
    fn admit<'a>(
        &'a self,
        slot: &'a CounterSlot,
        plan_id: &'a str,
        key_id: &'a str,
        limit: u64,
        window: Window,
        now: i64,
    ) -> AdmitFuture<'a>;

    /// The same admission without waiting, for stores that can answer at once (the local
    /// one); `None` means "use [`QuotaStore::admit`]". `slot` is the compiled key's: a store
    /// may keep there where the counter of (`plan_id`, `key_id`) is, and find it there on
    /// the key's next requests.
    fn admit_now(
        &self,
        _slot: &CounterSlot,
        _plan_id: &str,
        _key_id: &str,
        _limit: u64,
        _window: Window,
        _now: i64,
    ) -> Option<Result<(u64, bool), QuotaError>> {
        None
    }

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

    /// Shares with the fleet what only this instance holds (fleet mode: the usage its
    /// workers counted since the last push). Called once a second, when the gateway stops
    /// and (by the store itself) before a usage query; a failed push is retried by the next.
    fn push(&self) -> BoxFuture<'_, Result<(), QuotaError>> {
        Box::pin(async { Ok(()) })
    }

    /// Forgets windows that ended and usage hours older than `before` (Unix seconds).
    fn prune(&self, before: i64) -> Result<(), QuotaError>;

    /// The backend label of `apigw_quota_store_errors_total`.
    fn backend(&self) -> &'static str;
}

/// A plan's current window, kept so that a request needs no calendar arithmetic: shared by
/// the workers, written once per window.
#[derive(Debug, Default)]
pub struct WindowCache {
    start: AtomicI64,
    /// 0 until the first window is known.
    end: AtomicI64,
}

impl WindowCache {
    /// The window of `rate` containing `now` (Unix seconds).
    pub fn get(&self, rate: QuotaRate, now: i64) -> Window {
        // `end` is written last (Release) and read first (Acquire): a reader that sees a new
        // end sees its start; a stale pair never contains `now` wrongly (see below).
        let end = self.end.load(Ordering::Acquire);
        let start = self.start.load(Ordering::Relaxed);
        if start <= now && now < end {
            return Window { start, end };
        }
        let at = OffsetDateTime::from_unix_timestamp(now).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let w = Window::containing(rate, at);
        // Never shrink a newer window back (a late writer with an older `now`).
        if w.end >= end {
            self.end.store(0, Ordering::Release);
            self.start.store(w.start, Ordering::Relaxed);
            self.end.store(w.end, Ordering::Release);
        }
        w
    }
}

/// Admits one request of `key_id` under `plan_id` and builds the answer the pipeline needs.
///
/// Not an async function: its future is part of every keyed request's (see
/// `pipeline::handle`), and an async body would keep its arguments twice and the at-once
/// answer across the wait (168 bytes); this one is the store's boxed future and three
/// numbers, or the at-once answer.
pub fn admit<'a>(
    store: &'a dyn QuotaStore,
    slot: &'a CounterSlot,
    plan_id: &'a str,
    key_id: &'a str,
    limit: u64,
    window: Window,
    now: i64,
) -> impl std::future::Future<Output = Result<Admission, QuotaError>> + Send + 'a {
    use futures_util::future::{ready, Either, FutureExt};
    let answer = move |r: Result<(u64, bool), QuotaError>| {
        r.map(|(count, admitted)| Admission {
            admitted,
            limit,
            remaining: limit.saturating_sub(count),
            reset_secs: (window.end - now).max(1) as u64,
        })
    };
    match store.admit_now(slot, plan_id, key_id, limit, window, now) {
        Some(r) => Either::Left(ready(answer(r))),
        None => Either::Right(
            store
                .admit(slot, plan_id, key_id, limit, window, now)
                .map(answer),
        ),
    }
}

/// [`QuotaStore::admit`]'s future: the count after the admission and whether it was
/// admitted. Not a box for all: a fleet admission that waits for its worker's next call
/// to Redis (most of them under load) is a few words, and a box each, with many in flight
/// (beyond glibc's per-thread cache of 7 blocks of a size), cost malloc's and free's slow
/// paths (the load bench's 16-connection count of fleet mode: 38,375-38,642 → 37,827
/// instructions per request).
pub enum AdmitFuture<'a> {
    Boxed(BoxFuture<'a, Result<(u64, bool), QuotaError>>),
    /// Waits for the answer of a call that carries it (see `redis::Batches`).
    Queued(redis::Queued<'a>),
}

impl std::future::Future for AdmitFuture<'_> {
    type Output = Result<(u64, bool), QuotaError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Self::Boxed(f) => f.as_mut().poll(cx),
            Self::Queued(q) => std::pin::Pin::new(q).poll(cx),
        }
    }
}

/// Requests admitted for one key in one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key_id: String,
    pub hour_start: i64,
    pub count: u64,
}

/// Where a compiled key (one per plan and key, in each snapshot) finds its counter, filled
/// on the key's first admission by the store in use. In the local store: the counter, so
/// that the next admissions lock that counter alone instead of joining `plan␟key`, hashing
/// it and locking a shard of the store's map; tagged with the store it came from (a
/// snapshot outlives no store in the gateway, but tests build several). In Redis: the
/// key names' fixed parts, so that an admission does not encode the ids again.
#[derive(Default)]
pub struct CounterSlot {
    local: OnceLock<(u64, Arc<Mutex<Counter>>)>,
    fleet: OnceLock<redis::FleetKeys>,
}

impl std::fmt::Debug for CounterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            if self.local.get().is_some() || self.fleet.get().is_some() {
                "CounterSlot(resolved)"
            } else {
                "CounterSlot(empty)"
            },
        )
    }
}

/// The counter of one (plan, key): its window, and the admissions of each UTC hour (for
/// the usage API), newest last.
struct Counter {
    window_start: i64,
    count: u64,
    dirty: bool,
    /// (hour start, admitted, changed since the last flush).
    hours: Vec<(i64, u64, bool)>,
}

impl Counter {
    fn new(window_start: i64) -> Self {
        Self {
            window_start,
            count: 0,
            dirty: false,
            hours: Vec::new(),
        }
    }
}

const COUNTERS: TableDefinition<&str, (i64, u64)> = TableDefinition::new("quota_counters");
/// (plan, key, hour start) → admitted requests, for the usage API.
const USAGE: TableDefinition<(&str, &str, i64), u64> = TableDefinition::new("usage_hours");

/// In-memory counters (one lock per key, so admission is exact under any concurrency),
/// persisted to redb at least every second and on shutdown. One map entry per (plan, key)
/// holds its window count and its hourly usage; a compiled key keeps the entry's counter
/// in its [`CounterSlot`], so an admission is one lock and no lookup or allocation.
pub struct LocalQuotaStore {
    /// Tells this store's slots from another's.
    id: u64,
    counters: DashMap<Box<str>, Arc<Mutex<Counter>>, rustc_hash::FxBuildHasher>,
    db: Arc<crate::state_db::StateDb>,
    any_dirty: AtomicBool,
    /// One flush at a time: a flush that finds nothing dirty must not return while another
    /// is still writing what it took (the final flush at shutdown would otherwise let the
    /// process exit before the periodic flush on the control thread had committed).
    flushing: Mutex<()>,
}

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

/// A counter's lock (a panic while holding it leaves a counter that is still whole).
fn lock(c: &Mutex<Counter>) -> std::sync::MutexGuard<'_, Counter> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The map key of (plan, key): both ids joined by a separator no id holds.
const SEP: char = '\u{1f}';

fn split_key(k: &str) -> (&str, &str) {
    k.split_once(SEP).unwrap_or((k, ""))
}

/// Runs `f` with `plan␟key` as a `&str`, built on the stack when it is short.
fn with_key<R>(plan_id: &str, key_id: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf: smallvec::SmallVec<[u8; 96]> = smallvec::SmallVec::new();
    buf.extend_from_slice(plan_id.as_bytes());
    let mut sep = [0u8; 4];
    buf.extend_from_slice(SEP.encode_utf8(&mut sep).as_bytes());
    buf.extend_from_slice(key_id.as_bytes());
    f(std::str::from_utf8(&buf).unwrap_or(""))
}

impl LocalQuotaStore {
    /// Loads the counters kept in the state database.
    pub fn open(db: Arc<crate::state_db::StateDb>) -> Result<Arc<Self>, String> {
        let counters: DashMap<Box<str>, Arc<Mutex<Counter>>, rustc_hash::FxBuildHasher> =
            DashMap::default();
        db.read(|tx| {
            match tx.open_table(COUNTERS) {
                Ok(table) => {
                    for row in table.iter()? {
                        let (k, v) = row?;
                        let (window_start, count) = v.value();
                        let mut c = Counter::new(window_start);
                        c.count = count;
                        counters.insert(k.value().into(), Arc::new(Mutex::new(c)));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            match tx.open_table(USAGE) {
                Ok(table) => {
                    for row in table.iter()? {
                        let (k, v) = row?;
                        let (plan, key, hour) = k.value();
                        let joined = format!("{plan}{SEP}{key}");
                        let c = counters
                            .entry(joined.into_boxed_str())
                            .or_insert_with(|| Arc::new(Mutex::new(Counter::new(i64::MIN))));
                        lock(&c).hours.push((hour, v.value(), false));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(())
        })?;
        for c in counters.iter() {
            lock(&c).hours.sort_unstable_by_key(|h| h.0);
        }
        Ok(Arc::new(Self {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            counters,
            db,
            any_dirty: AtomicBool::new(false),
            flushing: Mutex::new(()),
        }))
    }

    /// The counter of (`plan_id`, `key_id`), made (with `window_start`) if there is none.
    fn counter(&self, plan_id: &str, key_id: &str, window_start: i64) -> Arc<Mutex<Counter>> {
        if let Some(c) = with_key(plan_id, key_id, |k| self.counters.get(k).map(|c| c.clone())) {
            return c;
        }
        let joined = format!("{plan_id}{SEP}{key_id}").into_boxed_str();
        self.counters
            .entry(joined)
            .or_insert_with(|| Arc::new(Mutex::new(Counter::new(window_start))))
            .clone()
    }

    /// Admits on the counter of `key`.
    fn admit_on(c: &mut Counter, limit: u64, window: Window, now: i64) -> (u64, bool) {
        if c.window_start != window.start {
            // A new window: the quota is restored.
            c.window_start = window.start;
            c.count = 0;
        }
        let admitted = c.count < limit;
        if admitted {
            c.count += 1;
            c.dirty = true;
            let hour = now.div_euclid(3600) * 3600;
            match c.hours.last_mut() {
                Some(h) if h.0 == hour => {
                    h.1 += 1;
                    h.2 = true;
                }
                _ => c.hours.push((hour, 1, true)),
            }
        }
        (c.count, admitted)
    }
}

impl QuotaStore for LocalQuotaStore {
    fn admit<'a>(
        &'a self,
        _slot: &'a CounterSlot,
        plan_id: &'a str,
        key_id: &'a str,
        limit: u64,
        window: Window,
        now: i64,
    ) -> AdmitFuture<'a> {
        let r = self.admit_now(&CounterSlot::default(), plan_id, key_id, limit, window, now);
        AdmitFuture::Boxed(Box::pin(std::future::ready(r.unwrap_or(Ok((0, false))))))
    }

    fn admit_now(
        &self,
        slot: &CounterSlot,
        plan_id: &str,
        key_id: &str,
        limit: u64,
        window: Window,
        now: i64,
    ) -> Option<Result<(u64, bool), QuotaError>> {
        let (store, counter) = slot
            .local
            .get_or_init(|| (self.id, self.counter(plan_id, key_id, window.start)));
        let r = if *store == self.id {
            Self::admit_on(&mut lock(counter), limit, window, now)
        } else {
            let c = self.counter(plan_id, key_id, window.start);
            let r = Self::admit_on(&mut lock(&c), limit, window, now);
            r
        };
        // Read first: once set, requests leave the flag's cache line alone (it is shared
        // by every worker) until the next flush clears it.
        if r.1 && !self.any_dirty.load(Ordering::Relaxed) {
            self.any_dirty.store(true, Ordering::Relaxed);
        }
        Some(Ok(r))
    }

    fn usage<'a>(
        &'a self,
        plan_id: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, QuotaError>> {
        let mut rows = Vec::new();
        for e in self.counters.iter() {
            let (plan, key) = split_key(e.key());
            if plan != plan_id {
                continue;
            }
            rows.extend(
                lock(e.value())
                    .hours
                    .iter()
                    .filter(|h| (from..to).contains(&h.0))
                    .map(|h| UsageRow {
                        key_id: key.to_owned(),
                        hour_start: h.0,
                        count: h.1,
                    }),
            );
        }
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn flush(&self) -> Result<(), QuotaError> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.any_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut rows = Vec::new();
        let mut usage_rows = Vec::new();
        for e in self.counters.iter() {
            let key = e.key().clone();
            let mut c = lock(e.value());
            if c.dirty {
                c.dirty = false;
                rows.push((key.clone(), (c.window_start, c.count)));
            }
            for h in c.hours.iter_mut().filter(|h| h.2) {
                h.2 = false;
                usage_rows.push((key.clone(), h.0, h.1));
            }
        }
        let written = self.db.write(|tx| {
            let mut table = tx.open_table(COUNTERS)?;
            for (k, v) in &rows {
                table.insert(&**k, v)?;
            }
            let mut table = tx.open_table(USAGE)?;
            for (k, hour, n) in &usage_rows {
                let (plan, key) = split_key(k);
                table.insert((plan, key, *hour), n)?;
            }
            Ok(())
        });
        if written.is_err() {
            // Nothing of this flush was kept: the next one writes these again (with the
            // counts they have by then).
            for (k, _) in &rows {
                if let Some(c) = self.counters.get(k) {
                    lock(&c).dirty = true;
                }
            }
            for (k, hour, _) in &usage_rows {
                if let Some(c) = self.counters.get(k) {
                    if let Some(h) = lock(&c).hours.iter_mut().find(|h| h.0 == *hour) {
                        h.2 = true;
                    }
                }
            }
            self.any_dirty.store(true, Ordering::Relaxed);
        }
        written.map_err(QuotaError::Unavailable)
    }

    fn prune(&self, before: i64) -> Result<(), QuotaError> {
        // Hours older than `before` go; a counter whose window started before `before` (at
        // least 32 days ago) has ended, and goes with its usage once that is empty too.
        // A counter a compiled key still holds stays (its next admissions must be seen by
        // flushes and the usage API): the map's shard lock, held here, keeps a key from
        // resolving it meanwhile.
        self.counters.retain(|_, shared| {
            let mut c = lock(shared);
            c.hours.retain(|h| h.0 >= before);
            if c.window_start < before {
                c.window_start = i64::MIN;
                c.count = 0;
            }
            c.window_start != i64::MIN || !c.hours.is_empty() || Arc::strong_count(shared) > 1
        });
        self.db
            .write(|tx| {
                let mut usage = tx.open_table(USAGE)?;
                usage.retain(|(_, _, hour), _| hour >= before)?;
                let mut counters = tx.open_table(COUNTERS)?;
                counters.retain(|_, (window_start, _)| window_start >= before)?;
                Ok(())
            })
            .map_err(QuotaError::Unavailable)
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

    use crate::state_db::StateDb;

    fn store() -> (tempfile::TempDir, Arc<StateDb>, Arc<LocalQuotaStore>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(&dir.path().join("s.redb")).unwrap());
        let store = LocalQuotaStore::open(db.clone()).unwrap();
        (dir, db, store)
    }

    const W: Window = Window {
        start: 100,
        end: 200,
    };

    fn now_admit(s: &LocalQuotaStore, slot: &CounterSlot, limit: u64, w: Window) -> (u64, bool) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        s.admit_now(slot, "up", "k", limit, w, now)
            .unwrap()
            .unwrap()
    }

    /// One admission of key `k` of plan `up` without a compiled key's slot, now.
    async fn admit_slotless(
        s: &impl QuotaStore,
        limit: u64,
        window: Window,
    ) -> Result<(u64, bool), QuotaError> {
        let slot = CounterSlot::default();
        s.admit(&slot, "up", "k", limit, window, crate::clock::unix_secs())
            .await
    }

    #[tokio::test]
    async fn a_keys_slot_counts_on_the_one_counter_of_its_plan_and_key() {
        let (_dir, _db, s) = store();
        let (a, b) = (CounterSlot::default(), CounterSlot::default());
        assert_eq!(now_admit(&s, &a, 4, W), (1, true));
        assert_eq!(now_admit(&s, &b, 4, W), (2, true), "another snapshot's key");
        assert_eq!(
            admit_slotless(&*s, 4, W).await.unwrap(),
            (3, true),
            "no slot"
        );
        assert_eq!(now_admit(&s, &a, 4, W), (4, true));
        assert_eq!(now_admit(&s, &a, 4, W), (4, false));
        assert_eq!(admit_slotless(&*s, 4, W).await.unwrap(), (4, false));
        let usage = s.usage("up", 0, i64::MAX).await.unwrap();
        assert_eq!(usage.iter().map(|r| r.count).sum::<u64>(), 4);
    }

    /// Two flushes at once (the periodic one and the final one at shutdown): neither
    /// returns before what was dirty when it was called is in the database (without the
    /// flush lock, the one that found nothing dirty returned while the other was writing).
    #[test]
    fn a_flush_returns_once_what_was_dirty_is_written() {
        let (_dir, db, s) = store();
        let slot = CounterSlot::default();
        for round in 1..=200u64 {
            assert_eq!(now_admit(&s, &slot, 1000, W), (round, true));
            let other = crate::state_db::testing::flush_twice_at_once({
                let s = s.clone();
                move || s.flush().unwrap()
            });
            assert_eq!(count_on_disk(&db), Some(round), "round {round}");
            other.join().unwrap();
        }
    }

    /// The window count of (`up`, `k`) as the database holds it.
    fn count_on_disk(db: &StateDb) -> Option<u64> {
        db.read(|tx| {
            Ok(tx
                .open_table(COUNTERS)?
                .get(format!("up{SEP}k").as_str())?
                .map(|v| v.value().1))
        })
        .unwrap()
    }

    /// A flush that fails (a full disk) loses nothing: what it took is written by the next
    /// flush once the disk recovers, counter and usage hour alike, though nothing was
    /// admitted in between.
    #[tokio::test]
    async fn what_a_failed_flush_took_is_written_by_the_next() {
        let (db, failing) = crate::state_db::testing::flaky_db();
        let db = Arc::new(db);
        let s = LocalQuotaStore::open(db.clone()).unwrap();
        let slot = CounterSlot::default();
        assert_eq!(now_admit(&s, &slot, 10, W), (1, true));
        s.flush().unwrap();
        assert_eq!(now_admit(&s, &slot, 10, W), (2, true));
        failing.store(true, Ordering::SeqCst);
        assert!(s.flush().is_err());
        failing.store(false, Ordering::SeqCst);
        s.flush().unwrap();
        assert_eq!(count_on_disk(&db), Some(2));
        drop(s);
        let again = LocalQuotaStore::open(db).unwrap();
        assert_eq!(again.usage("up", 0, i64::MAX).await.unwrap()[0].count, 2);
    }

    #[tokio::test]
    async fn a_slot_of_another_store_counts_on_this_ones() {
        let (_d1, _db1, one) = store();
        let (_d2, _db2, two) = store();
        let slot = CounterSlot::default();
        assert_eq!(now_admit(&one, &slot, 10, W), (1, true));
        assert_eq!(now_admit(&two, &slot, 10, W), (1, true));
        assert_eq!(now_admit(&two, &slot, 10, W), (2, true));
        assert_eq!(now_admit(&one, &slot, 10, W), (2, true));
    }

    #[tokio::test]
    async fn pruning_keeps_a_counter_a_key_still_holds() {
        let (_dir, db, s) = store();
        let slot = CounterSlot::default();
        assert_eq!(now_admit(&s, &slot, 10, W), (1, true));
        s.flush().unwrap();
        // Everything ended: the window and every usage hour.
        s.prune(i64::MAX).unwrap();
        assert!(s.usage("up", 0, i64::MAX).await.unwrap().is_empty());
        // The key goes on admitting through its slot, in a new window: what it admits is
        // still the store's (usage, persistence), not a counter the store forgot.
        let next = Window {
            start: 200,
            end: 300,
        };
        assert_eq!(now_admit(&s, &slot, 10, next), (1, true));
        assert_eq!(admit_slotless(&*s, 10, next).await.unwrap(), (2, true));
        assert_eq!(s.usage("up", 0, i64::MAX).await.unwrap()[0].count, 2);
        s.flush().unwrap();
        drop(s);
        let again = LocalQuotaStore::open(db).unwrap();
        assert_eq!(admit_slotless(&*again, 10, next).await.unwrap(), (3, true));
    }

    #[tokio::test]
    async fn exact_under_concurrency_and_persisted() {
        let (_dir, db, store) = store();
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
                    if admit_slotless(&*s, 100, w).await.unwrap().1 {
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
        assert_eq!(admit_slotless(&*again, 100, w).await.unwrap(), (100, false));
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
            admit_slotless(&*reopened, 100, w).await.unwrap(),
            (1, true),
            "the ended window was forgotten"
        );
        // The next window restores the quota.
        assert_eq!(
            admit_slotless(
                &*again,
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
