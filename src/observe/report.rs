//! Report aggregation (`operations.md`, "Reports"): per (API, stage, UTC day, resource,
//! method) the 2xx/4xx/5xx counts and mergeable latency sketches (DDSketch, 1% relative
//! accuracy). Requests add to their worker's deltas ([`series::RouteSeries::report`]); the
//! deltas are merged here before every flush (each second), fleet push and report query,
//! persisted in the state database every second and on stop, and reloaded at start. Keys
//! are stable ids, so aggregates survive reloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sketches_ddsketch::DDSketch;
use time::Date;

use super::series;
use crate::fleet::{Fleet, FleetError};
use crate::state_db::StateDb;

/// Reports may span at most this many days between start and end.
pub const MAX_RANGE_DAYS: i64 = 31;

const REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("report_aggregates");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// This gateway instance's id: made once at first start and kept in the state database.
fn instance_id(db: &StateDb) -> Result<String, String> {
    db.write(|tx| {
        let mut meta = tx.open_table(META)?;
        let existing = meta.get("instance_id")?.map(|v| v.value().to_owned());
        Ok(match existing {
            Some(id) => id,
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                meta.insert("instance_id", id.as_str())?;
                id
            }
        })
    })
}

fn sketch() -> DDSketch {
    series::latency_sketch()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    api: Arc<str>,
    stage: Arc<str>,
    /// Days since 1970-01-01 (UTC).
    day: i32,
    resource: Arc<str>,
    method: &'static str,
}

impl Key {
    fn encode(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.api, self.stage, self.day, self.resource, self.method
        )
    }

    fn decode(s: &str) -> Option<Key> {
        let mut it = s.split('\u{1f}');
        let (api, stage, day, resource, method) =
            (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        Some(Key {
            api: api.into(),
            stage: stage.into(),
            day: day.parse().ok()?,
            resource: resource.into(),
            method: static_method(method)?,
        })
    }
}

/// The bounded set of method labels, as `'static` strings.
pub fn static_method(m: &str) -> Option<&'static str> {
    Some(match m {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "CONNECT" => "CONNECT",
        "OTHER" => "OTHER",
        _ => return None,
    })
}

#[derive(Clone, Serialize, Deserialize)]
struct Agg {
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    #[serde(with = "sketch_serde")]
    latency: DDSketch,
    #[serde(with = "sketch_serde")]
    integration: DDSketch,
    #[serde(skip)]
    dirty: bool,
    /// Changed since the last push to the fleet's Redis.
    #[serde(skip)]
    shared_dirty: bool,
}

/// A sketch as stored (state database, fleet Redis): `null` when it holds no value.
///
/// An empty sketch's min and max are infinities, which JSON cannot carry (serde_json writes
/// `null`), so an aggregate without integration samples (a 404, a 405, a preflight, any
/// refusal) used to come back unreadable and was dropped at the next start. Rows written
/// that way are read as an empty sketch again.
mod sketch_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use sketches_ddsketch::DDSketch;

    pub fn serialize<S: Serializer>(s: &DDSketch, ser: S) -> Result<S::Ok, S::Error> {
        if s.count() == 0 {
            ser.serialize_none()
        } else {
            s.serialize(ser)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<DDSketch, D::Error> {
        let v = serde_json::Value::deserialize(de)?;
        // Absent, null, or an empty sketch written with `null` bounds.
        if v.is_null() || v.get("min").is_some_and(serde_json::Value::is_null) {
            return Ok(super::sketch());
        }
        serde_json::from_value(v).map_err(serde::de::Error::custom)
    }
}

impl Default for Agg {
    fn default() -> Self {
        Self {
            ok: 0,
            client_errors: 0,
            server_errors: 0,
            latency: sketch(),
            integration: sketch(),
            dirty: false,
            shared_dirty: false,
        }
    }
}

pub struct Reports {
    aggs: DashMap<Key, Agg>,
    db: Arc<StateDb>,
    any_dirty: AtomicBool,
    /// One flush at a time: a flush that finds nothing dirty must not return while another
    /// is still writing what it took (the final flush at shutdown would otherwise let the
    /// process exit before the periodic flush on the control thread had committed).
    flushing: std::sync::Mutex<()>,
    /// This instance's id in fleet reports (kept in the state database, so that a restarted
    /// instance goes on with its own aggregates instead of adding a second copy).
    instance: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DayReport {
    pub date: String,
    pub call_count: u64,
    pub error_4xx_count: u64,
    pub error_5xx_count: u64,
    pub latency: Summary,
    pub integration_latency: Summary,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TopResource {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub method: String,
    pub call_count: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ReportList {
    pub count: usize,
    pub reports: Vec<DayReport>,
    pub top_resources: Vec<TopResource>,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn summarize(s: &DDSketch) -> Summary {
    // A sketch answers with its bucket's representative value, which may lie up to the
    // relative accuracy outside the observed range: clamp to [min, max].
    let (min, max) = (s.min().unwrap_or(0.0), s.max().unwrap_or(0.0));
    let q = |p: f64| s.quantile(p).ok().flatten().unwrap_or(0.0).clamp(min, max);
    let count = s.count();
    Summary {
        avg_ms: if count == 0 {
            0.0
        } else {
            round2(s.sum().unwrap_or(0.0) / count as f64)
        },
        p50_ms: round2(q(0.5)),
        p90_ms: round2(q(0.9)),
        p99_ms: round2(q(0.99)),
        max_ms: round2(s.max().unwrap_or(0.0)),
    }
}

/// Days since the epoch of a UTC date.
pub fn day_number(d: Date) -> i32 {
    d.to_julian_day()
        - Date::from_calendar_date(1970, time::Month::January, 1).map_or(0, |e| e.to_julian_day())
}

fn date_of(day: i32) -> Date {
    let epoch =
        Date::from_calendar_date(1970, time::Month::January, 1).map_or(0, |e| e.to_julian_day());
    Date::from_julian_day(epoch + day).unwrap_or(Date::MIN)
}

/// `YYYY-MM-DD`.
pub fn format_date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Parses `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<Date> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).ok()
}

impl Reports {
    /// Loads persisted aggregates from the state database.
    pub fn open(db: Arc<StateDb>) -> Result<Arc<Self>, String> {
        let aggs = DashMap::new();
        db.read(|tx| {
            let table = match tx.open_table(REPORTS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            for row in table.iter()? {
                let (k, v) = row?;
                match (
                    Key::decode(k.value()),
                    serde_json::from_slice::<Agg>(v.value()),
                ) {
                    (Some(key), Ok(agg)) => {
                        aggs.insert(key, agg);
                    }
                    _ => tracing::warn!(key = k.value(), "skipping an unreadable report aggregate"),
                }
            }
            Ok(())
        })?;
        let instance = instance_id(&db)?;
        // Everything loaded is pushed once in fleet mode (the fleet may have lost it).
        for mut a in aggs.iter_mut() {
            a.shared_dirty = true;
        }
        Ok(Arc::new(Self {
            aggs,
            db,
            any_dirty: AtomicBool::new(false),
            flushing: std::sync::Mutex::new(()),
            instance,
        }))
    }

    /// Takes the workers' report deltas ([`series::RouteSeries::report`]) into the
    /// aggregates. Runs before every flush, push and report query.
    pub fn merge_deltas(&self) {
        let mut deltas = Vec::new();
        let mut merged = false;
        for r in series::all_routes() {
            r.take_report_deltas(&mut deltas);
            for d in deltas.drain(..) {
                let key = Key {
                    api: r.api.clone(),
                    stage: r.stage.clone(),
                    day: d.day,
                    resource: r.resource.clone(),
                    method: series::METHODS[d.method.min(series::METHODS.len() - 1)],
                };
                let mut agg = self.aggs.entry(key).or_default();
                agg.ok += d.ok;
                agg.client_errors += d.client_errors;
                agg.server_errors += d.server_errors;
                let _ = agg.latency.merge(&d.latency);
                let _ = agg.integration.merge(&d.integration);
                agg.dirty = true;
                agg.shared_dirty = true;
                merged = true;
            }
        }
        if merged {
            self.any_dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Writes changed aggregates to the database.
    pub fn flush(&self) -> Result<(), String> {
        let _one_at_a_time = self
            .flushing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.merge_deltas();
        if !self.any_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut rows = Vec::new();
        for mut a in self.aggs.iter_mut() {
            if a.dirty {
                a.dirty = false;
                let value = serde_json::to_vec(a.value()).map_err(|e| e.to_string());
                rows.push((a.key().clone(), value));
            }
        }
        let written = self.db.write(|tx| {
            let mut table = tx.open_table(REPORTS)?;
            for (k, v) in &rows {
                match v {
                    Ok(v) => {
                        table.insert(k.encode().as_str(), v.as_slice())?;
                    }
                    // Not seen: the aggregate stays as last written.
                    Err(e) => tracing::error!(api = %k.api, error = %e, "a report aggregate could not be encoded"),
                }
            }
            Ok(())
        });
        if written.is_err() {
            // Nothing of this flush was kept: the next one writes these again.
            for (k, _) in &rows {
                if let Some(mut a) = self.aggs.get_mut(k) {
                    a.dirty = true;
                }
            }
            self.any_dirty.store(true, Ordering::Relaxed);
        }
        written
    }

    /// Forgets aggregates of days before `min_day` (days since the epoch).
    pub fn prune(&self, min_day: i32) -> Result<(), String> {
        self.aggs.retain(|k, _| k.day >= min_day);
        self.db.write(|tx| {
            let mut table = tx.open_table(REPORTS)?;
            table.retain(|k, _| Key::decode(k).is_some_and(|key| key.day >= min_day))?;
            Ok(())
        })
    }

    /// The report of one stage for `[start, end]` (UTC days, inclusive).
    pub fn report(&self, api: &str, stage: &str, start: Date, end: Date) -> ReportList {
        self.merge_deltas();
        let (from, to) = (day_number(start), day_number(end));
        let mut b = ReportBuilder::default();
        for entry in self.aggs.iter() {
            let k = entry.key();
            if &*k.api != api || &*k.stage != stage || k.day < from || k.day > to {
                continue;
            }
            b.add(k.day, &k.resource, k.method, entry.value());
        }
        b.finish()
    }

    /// Fleet mode: writes this instance's changed aggregates to Redis, one hash per (API,
    /// stage, day) with a field per (instance, resource, method); the (API, stage) is the
    /// hash tag, so the days of one stage share a cluster slot and stages spread. Each instance writes only
    /// its own cumulative aggregates, so a reader merges them without double counting.
    pub async fn push(&self, fleet: &Fleet) -> Result<(), FleetError> {
        self.merge_deltas();
        let mut rows = Vec::new();
        for mut a in self.aggs.iter_mut() {
            if a.shared_dirty {
                a.shared_dirty = false;
                let k = a.key();
                rows.push((
                    fleet_key(&k.api, &k.stage, k.day),
                    format!("{}\u{1f}{}\u{1f}{}", self.instance, k.resource, k.method),
                    serde_json::to_vec(a.value()).unwrap_or_default(),
                    k.clone(),
                ));
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        // One pipeline per (API, stage): its days share a hash tag, so in a Redis Cluster
        // each pipeline goes to one master (a pipeline may not cross slots), and the
        // pipelines of different stages run concurrently.
        let mut groups: HashMap<(&str, &str), redis::Pipeline> = HashMap::new();
        for (key, field, value, k) in &rows {
            let pipe = groups.entry((&k.api, &k.stage)).or_insert_with(redis::pipe);
            pipe.hset(key, field, value.as_slice()).ignore();
            let expire_at = (i64::from(k.day) + 1 + FLEET_RETENTION_DAYS) * 86_400;
            pipe.expire_at(key, expire_at).ignore();
        }
        let results = futures_util::future::join_all(groups.into_values().map(|pipe| {
            fleet.call(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
        }))
        .await;
        let r = results.into_iter().find(Result::is_err).unwrap_or(Ok(()));
        if r.is_err() {
            // Written again on the next push.
            for (_, _, _, k) in &rows {
                if let Some(mut a) = self.aggs.get_mut(k) {
                    a.shared_dirty = true;
                }
            }
        }
        r
    }

    /// Fleet mode: the report of every instance's aggregates (this instance's pushed first,
    /// so that its own latest requests are in).
    pub async fn fleet_report(
        &self,
        fleet: &Fleet,
        api: &str,
        stage: &str,
        start: Date,
        end: Date,
    ) -> Result<ReportList, FleetError> {
        self.push(fleet).await?;
        let days: Vec<i32> = (day_number(start)..=day_number(end)).collect();
        let mut pipe = redis::pipe();
        for d in &days {
            pipe.hgetall(fleet_key(api, stage, *d));
        }
        let maps: Vec<HashMap<String, Vec<u8>>> = fleet
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut b = ReportBuilder::default();
        for (day, m) in days.iter().zip(maps) {
            for (field, value) in m {
                let mut it = field.split('\u{1f}');
                let (Some(_instance), Some(resource), Some(method)) =
                    (it.next(), it.next(), it.next().and_then(static_method))
                else {
                    continue;
                };
                match serde_json::from_slice::<Agg>(&value) {
                    Ok(agg) => b.add(*day, resource, method, &agg),
                    Err(_) => tracing::warn!("skipping an unreadable fleet report aggregate"),
                }
            }
        }
        Ok(b.finish())
    }
}

/// Days a fleet report aggregate is kept in Redis after its day.
const FLEET_RETENTION_DAYS: i64 = 62;

fn fleet_key(api: &str, stage: &str, day: i32) -> String {
    format!(
        "{}:reports:{{{}:{}}}:{day}",
        crate::fleet::PREFIX,
        crate::fleet::key_part(api),
        crate::fleet::key_part(stage)
    )
}

/// Merges aggregates into one report.
#[derive(Default)]
struct ReportBuilder {
    days: std::collections::BTreeMap<i32, Agg>,
    per_resource: HashMap<(String, &'static str), u64>,
}

impl ReportBuilder {
    fn add(&mut self, day: i32, resource: &str, method: &'static str, a: &Agg) {
        let d = self.days.entry(day).or_default();
        d.ok += a.ok;
        d.client_errors += a.client_errors;
        d.server_errors += a.server_errors;
        let _ = d.latency.merge(&a.latency);
        let _ = d.integration.merge(&a.integration);
        if a.ok > 0 && !resource.is_empty() {
            *self
                .per_resource
                .entry((resource.to_owned(), method))
                .or_default() += a.ok;
        }
    }

    fn finish(self) -> ReportList {
        let reports: Vec<DayReport> = self
            .days
            .into_iter()
            .map(|(day, a)| DayReport {
                date: format_date(date_of(day)),
                call_count: a.ok,
                error_4xx_count: a.client_errors,
                error_5xx_count: a.server_errors,
                latency: summarize(&a.latency),
                integration_latency: summarize(&a.integration),
            })
            .collect();
        let mut top: Vec<TopResource> = self
            .per_resource
            .into_iter()
            .map(|((path, method), calls)| TopResource {
                name: path
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("/")
                    .to_owned(),
                path: path.to_string(),
                method: method.to_owned(),
                call_count: calls,
            })
            .collect();
        top.sort_by(|a, b| {
            b.call_count
                .cmp(&a.call_count)
                .then_with(|| a.path.cmp(&b.path))
                .then_with(|| a.method.cmp(&b.method))
        });
        top.truncate(5);
        ReportList {
            count: reports.len(),
            reports,
            top_resources: top,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    #[test]
    fn a_stage_keeps_its_days_in_one_slot_and_stages_spread() {
        use redis::cluster_routing::get_slot;
        assert_eq!(
            fleet_key("api:1", "prod", 20_000),
            "scpgw:reports:{api%3A1:prod}:20000"
        );
        let mut thirds = [0; 3];
        for i in 0..100 {
            let api = format!("api-{i}");
            let slot = get_slot(fleet_key(&api, "prod", 20_000).as_bytes());
            assert_eq!(slot, get_slot(fleet_key(&api, "prod", 20_061).as_bytes()));
            thirds[usize::from(slot) * 3 / 16384] += 1;
        }
        assert!(thirds.iter().all(|n| *n >= 20), "{thirds:?}");
    }

    /// Report deltas are process-wide (every `Reports` merges every route's), so tests that
    /// record through them run one at a time.
    static SERIES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn series_lock() -> std::sync::MutexGuard<'static, ()> {
        SERIES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reports() -> (tempfile::TempDir, Arc<Reports>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(&dir.path().join("s.redb")).unwrap());
        (dir, Reports::open(db).unwrap())
    }

    /// The aggregates of `api` as the database holds them: calls counted.
    fn calls_on_disk(db: &StateDb, api: &str) -> u64 {
        db.read(|tx| {
            let Ok(table) = tx.open_table(REPORTS) else {
                return Ok(0);
            };
            let mut calls = 0;
            for row in table.iter()? {
                let (k, v) = row?;
                if Key::decode(k.value()).is_some_and(|key| &*key.api == api) {
                    let agg: Agg = serde_json::from_slice(v.value()).unwrap();
                    calls += agg.ok + agg.client_errors + agg.server_errors;
                }
            }
            Ok(calls)
        })
        .unwrap()
    }

    /// Two flushes at once (the periodic one and the final one at shutdown): neither
    /// returns before what was dirty when it was called is in the database. Without the
    /// flush lock, the flush that found nothing dirty returned while the other was still
    /// writing, and most runs of this test failed within a few rounds.
    #[test]
    fn a_flush_returns_once_what_was_dirty_is_written() {
        let _one_at_a_time = series_lock();
        let (_dir, r) = reports();
        let (api, stage, res): (Arc<str>, Arc<str>, Arc<str>) =
            ("flush-race".into(), "prod".into(), "/r".into());
        let day = day_number(OffsetDateTime::now_utc().date());
        for round in 1..=100u64 {
            series::route(&api, &stage, &res).report(&series::ReportSample {
                day,
                method: 0,
                status: 200,
                latency: std::time::Duration::from_millis(1),
                integration: None,
            });
            let other = crate::state_db::testing::flush_twice_at_once({
                let r = r.clone();
                move || r.flush().unwrap()
            });
            assert_eq!(calls_on_disk(&r.db, &api), round, "round {round}");
            other.join().unwrap();
        }
    }

    /// A flush that fails (a full disk) loses nothing: what it took is written by the next
    /// flush once the disk recovers, though no request came in between.
    #[test]
    fn what_a_failed_flush_took_is_written_by_the_next() {
        let _one_at_a_time = series_lock();
        let (db, failing) = crate::state_db::testing::flaky_db();
        let r = Reports::open(Arc::new(db)).unwrap();
        let (api, stage, res): (Arc<str>, Arc<str>, Arc<str>) =
            ("failed-flush".into(), "prod".into(), "/r".into());
        let sample = series::ReportSample {
            day: day_number(OffsetDateTime::now_utc().date()),
            method: 0,
            status: 200,
            latency: std::time::Duration::from_millis(1),
            integration: None,
        };
        series::route(&api, &stage, &res).report(&sample);
        r.flush().unwrap();
        series::route(&api, &stage, &res).report(&sample);
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(r.flush().is_err());
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        r.flush().unwrap();
        assert_eq!(calls_on_disk(&r.db, &api), 2);
    }

    #[test]
    fn dates() {
        let d = parse_date("2026-11-22").unwrap();
        assert_eq!(format_date(date_of(day_number(d))), "2026-11-22");
        assert!(parse_date("2026-13-01").is_none());
        assert!(parse_date("22-11-2026").is_none());
    }

    #[test]
    fn counts_percentiles_top_and_persistence() {
        let _one_at_a_time = series_lock();
        let (dir, r) = reports();
        let (api, stage): (Arc<str>, Arc<str>) = ("report-test".into(), "prod".into());
        let (orders, items, root): (Arc<str>, Arc<str>, Arc<str>) =
            ("/orders".into(), "/orders/{id}".into(), "/".into());
        let none: Arc<str> = Arc::from("");
        let today_n = day_number(OffsetDateTime::now_utc().date());
        let rec = |res: Option<&Arc<str>>, status, ms: u64| {
            series::route(&api, &stage, res.unwrap_or(&none)).report(&series::ReportSample {
                day: today_n,
                method: 0,
                status,
                latency: std::time::Duration::from_millis(ms),
                integration: Some(std::time::Duration::from_millis(ms)),
            })
        };
        for i in 1..=100 {
            rec(Some(&orders), 200, i);
        }
        for _ in 0..30 {
            rec(Some(&items), 200, 5);
        }
        rec(Some(&root), 200, 5);
        rec(None, 404, 1);
        rec(Some(&orders), 502, 1);
        let today = OffsetDateTime::now_utc().date();
        let rep = r.report("report-test", "prod", today, today);
        assert_eq!(rep.count, 1);
        let day = &rep.reports[0];
        assert_eq!(
            (day.call_count, day.error_4xx_count, day.error_5xx_count),
            (131, 1, 1)
        );
        // p50 of 1..100 ms plus 31 × 5 ms and two 1 ms: within 1% of the exact rank value.
        assert!(
            (day.latency.max_ms - 100.0).abs() <= 1.0,
            "{:?}",
            day.latency
        );
        assert!(
            day.latency.p99_ms >= 97.0 && day.latency.p99_ms <= 101.0,
            "{:?}",
            day.latency
        );
        let names: Vec<(&str, &str, u64)> = rep
            .top_resources
            .iter()
            .map(|t| (t.name.as_str(), t.path.as_str(), t.call_count))
            .collect();
        assert_eq!(
            names,
            vec![
                ("orders", "/orders", 100),
                ("{id}", "/orders/{id}", 30),
                ("/", "/", 1)
            ]
        );
        assert!(r
            .report("report-test", "dev", today, today)
            .reports
            .is_empty());
        r.flush().unwrap();
        let db = r.db.clone();
        drop(r);
        let again = Reports::open(db.clone()).unwrap();
        assert_eq!(
            again.report("report-test", "prod", today, today).reports[0].call_count,
            131
        );
        again.prune(day_number(today) + 1).unwrap();
        assert!(again
            .report("report-test", "prod", today, today)
            .reports
            .is_empty());
        let reopened = Reports::open(db).unwrap();
        assert!(
            reopened
                .report("report-test", "prod", today, today)
                .reports
                .is_empty(),
            "pruned on disk too"
        );
        drop(dir);
    }
}
