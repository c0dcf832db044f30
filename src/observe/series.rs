//! What requests write: per-worker counters, latency histograms and report deltas, kept
//! per label set and resolved once (with the snapshot, or at a route's first request)
//! instead of per request.
//!
//! A [`StageSeries`] belongs to one (API, stage) pair: request and integration latency
//! histograms, rejections by code, retries. A [`RouteSeries`] belongs to one (API, stage,
//! resource): request counts by method and status class, and the report aggregates'
//! deltas. Both hold one shard per worker ([`crate::worker`]): a worker writes only its own
//! shard, with a plain load and store (no locked instruction, no shared cache line); the
//! extra shard of non-worker threads uses atomic adds. Readers (the `/metrics` scrape, the
//! report merge) add the shards up.
//!
//! Series are kept in process-wide registries keyed by their labels, so a reloaded snapshot
//! finds the same series again and counts go on (a counter must not restart on a reload).
//! They are never removed, like the label sets of a Prometheus vector.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use sketches_ddsketch::{Config as SketchConfig, DDSketch};

/// `method` label values; a request method outside the standard set counts as `OTHER`.
pub const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "OTHER",
];

/// `status_class` label values.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `integration` label values, in [`crate::snapshot::model::IntegrationType`] order.
pub const INTEGRATIONS: [&str; 3] = ["HTTP", "SCF", "PRIVATELINK"];

/// Upper bounds of the latency histograms, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The bounds above in nanoseconds.
const BUCKETS_NS: [u64; 16] = {
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// The index of a method in [`METHODS`].
pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::PATCH => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        http::Method::TRACE => 7,
        http::Method::CONNECT => 8,
        _ => 9,
    }
}

/// The index of a status code's class in [`CLASSES`].
pub fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Relative accuracy of the report latency sketches (the contract asks for 5%).
const SKETCH_ALPHA: f64 = 0.01;

/// An empty latency sketch (milliseconds), as every report aggregate uses.
pub fn latency_sketch() -> DDSketch {
    DDSketch::new(SketchConfig::new(SKETCH_ALPHA, 4096, 1e-3))
}

/// Adds `n` to a counter. A worker's own shard has one writer: a plain load and store
/// suffices; the shared extra shard needs an atomic add.
#[inline]
fn add(c: &AtomicU64, n: u64, exclusive: bool) {
    if exclusive {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    } else {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// The shard of the current thread, and whether it is a worker's own.
#[inline]
fn shard<T>(shards: &[T]) -> (&T, bool) {
    let i = crate::worker::index();
    let exclusive = i < crate::worker::count();
    (&shards[i.min(shards.len() - 1)], exclusive)
}

fn shards<T>(make: impl Fn() -> T) -> Box<[T]> {
    (0..crate::worker::shards().max(1))
        .map(|_| make())
        .collect()
}

/// A latency histogram: counts per bucket (the last one is +Inf), sum in nanoseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration, exclusive: bool) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.iter().position(|b| ns <= *b).unwrap_or(16);
        add(&self.buckets[i], 1, exclusive);
        add(&self.sum_ns, ns, exclusive);
    }
}

/// A histogram's totals over all shards.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HistogramTotals {
    /// Per bucket, not cumulative; the last one is +Inf.
    pub buckets: [u64; 17],
    pub sum_seconds: f64,
}

impl HistogramTotals {
    fn add(&mut self, h: &Histogram) {
        for (t, b) in self.buckets.iter_mut().zip(&h.buckets) {
            *t += b.load(Ordering::Relaxed);
        }
        self.sum_seconds += h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One worker's share of a stage's series.
#[repr(align(64))]
#[derive(Debug, Default)]
struct StageShard {
    duration: Histogram,
    integration: [Histogram; 3],
    rejections: [AtomicU64; crate::rejection::CODES.len()],
    auth_failures: [AtomicU64; crate::rejection::AUTH_FAILURES.len()],
    retries: AtomicU64,
}

/// The series of one (API, stage) pair.
#[derive(Debug)]
pub struct StageSeries {
    pub api: Arc<str>,
    pub stage: Arc<str>,
    shards: Box<[StageShard]>,
}

/// Totals of a stage's series, for the exposition.
pub struct StageTotals {
    pub api: Arc<str>,
    pub stage: Arc<str>,
    pub duration: HistogramTotals,
    pub integration: [HistogramTotals; 3],
    pub rejections: [u64; crate::rejection::CODES.len()],
    pub auth_failures: [u64; crate::rejection::AUTH_FAILURES.len()],
    pub retries: u64,
}

impl StageSeries {
    /// Records a request's latency, integration latency, rejection code, refused
    /// credentials and retry.
    pub fn record(
        &self,
        latency: Duration,
        integration: Option<(Duration, usize)>,
        rejection: Option<usize>,
        auth_failure: Option<crate::rejection::AuthFailure>,
        retried: bool,
    ) {
        let (s, x) = shard(&self.shards);
        s.duration.observe(latency, x);
        if let Some((d, kind)) = integration {
            if let Some(h) = s.integration.get(kind) {
                h.observe(d, x);
            }
        }
        if let Some(code) = rejection.and_then(|c| s.rejections.get(c)) {
            add(code, 1, x);
        }
        if let Some(reason) = auth_failure.and_then(|r| s.auth_failures.get(r.index())) {
            add(reason, 1, x);
        }
        if retried {
            add(&s.retries, 1, x);
        }
    }

    pub fn totals(&self) -> StageTotals {
        let mut t = StageTotals {
            api: self.api.clone(),
            stage: self.stage.clone(),
            duration: HistogramTotals::default(),
            integration: Default::default(),
            rejections: [0; crate::rejection::CODES.len()],
            auth_failures: [0; crate::rejection::AUTH_FAILURES.len()],
            retries: 0,
        };
        for s in self.shards.iter() {
            t.duration.add(&s.duration);
            for (ti, h) in t.integration.iter_mut().zip(&s.integration) {
                ti.add(h);
            }
            for (tr, r) in t.rejections.iter_mut().zip(&s.rejections) {
                *tr += r.load(Ordering::Relaxed);
            }
            for (ta, a) in t.auth_failures.iter_mut().zip(&s.auth_failures) {
                *ta += a.load(Ordering::Relaxed);
            }
            t.retries += s.retries.load(Ordering::Relaxed);
        }
        t
    }
}

/// What one (day, method) of a route adds to its report aggregate since the last merge.
pub struct ReportDelta {
    /// Days since 1970-01-01 (UTC).
    pub day: i32,
    /// Index into [`METHODS`].
    pub method: usize,
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    /// Milliseconds.
    pub latency: DDSketch,
    pub integration: DDSketch,
}

/// One worker's share of a route's series.
#[repr(align(64))]
struct RouteShard {
    requests: [AtomicU64; METHODS.len() * CLASSES.len()],
    /// Report deltas since the last merge; locked by its worker per request and by the
    /// merge once a second (never contended in practice).
    report: Mutex<Vec<ReportDelta>>,
    report_dirty: AtomicBool,
}

impl Default for RouteShard {
    fn default() -> Self {
        Self {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            report: Mutex::new(Vec::new()),
            report_dirty: AtomicBool::new(false),
        }
    }
}

/// The series of one (API, stage, resource): `resource` is `""` when no resource matched.
pub struct RouteSeries {
    pub api: Arc<str>,
    pub stage: Arc<str>,
    pub resource: Arc<str>,
    shards: Box<[RouteShard]>,
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RouteSeries({}, {}, {})",
            self.api, self.stage, self.resource
        )
    }
}

/// What one request adds to its route's report aggregate.
pub struct ReportSample {
    pub day: i32,
    pub method: usize,
    pub status: u16,
    pub latency: Duration,
    pub integration: Option<Duration>,
}

impl RouteSeries {
    /// Counts a request by method and status class.
    pub fn count(&self, method: usize, status: u16) {
        let (s, x) = shard(&self.shards);
        add(
            &s.requests[method * CLASSES.len() + class_index(status)],
            1,
            x,
        );
    }

    /// Adds a request to the route's report deltas (known API and stage only).
    pub fn report(&self, r: &ReportSample) {
        let (s, _) = shard(&self.shards);
        let mut deltas = s.report.lock().unwrap_or_else(|p| p.into_inner());
        let d = match deltas
            .iter()
            .position(|d| d.day == r.day && d.method == r.method)
        {
            Some(i) => &mut deltas[i],
            None => {
                deltas.push(ReportDelta {
                    day: r.day,
                    method: r.method,
                    ok: 0,
                    client_errors: 0,
                    server_errors: 0,
                    latency: latency_sketch(),
                    integration: latency_sketch(),
                });
                let last = deltas.len() - 1;
                &mut deltas[last]
            }
        };
        match r.status {
            200..=299 => d.ok += 1,
            400..=499 => d.client_errors += 1,
            500..=599 => d.server_errors += 1,
            _ => {}
        }
        d.latency.add(r.latency.as_secs_f64() * 1000.0);
        if let Some(i) = r.integration {
            d.integration.add(i.as_secs_f64() * 1000.0);
        }
        drop(deltas);
        if !s.report_dirty.load(Ordering::Relaxed) {
            s.report_dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Request counts over all shards, by method and class (`[method * 5 + class]`).
    pub fn counts(&self) -> [u64; METHODS.len() * CLASSES.len()] {
        let mut out = [0u64; METHODS.len() * CLASSES.len()];
        for s in self.shards.iter() {
            for (o, c) in out.iter_mut().zip(&s.requests) {
                *o += c.load(Ordering::Relaxed);
            }
        }
        out
    }

    /// Takes every shard's report deltas.
    pub fn take_report_deltas(&self, out: &mut Vec<ReportDelta>) {
        for s in self.shards.iter() {
            if !s.report_dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let mut deltas = s.report.lock().unwrap_or_else(|p| p.into_inner());
            out.append(&mut deltas);
        }
    }
}

type StageKey = (Arc<str>, Arc<str>);
type RouteKey = (Arc<str>, Arc<str>, Arc<str>);

#[derive(Default)]
struct Registry {
    stages: Mutex<HashMap<StageKey, Arc<StageSeries>>>,
    routes: Mutex<HashMap<RouteKey, Arc<RouteSeries>>>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);

/// The series of (API, stage); `""` for an unknown host or stage.
pub fn stage(api: &Arc<str>, stage: &Arc<str>) -> Arc<StageSeries> {
    let mut m = REGISTRY.stages.lock().unwrap_or_else(|p| p.into_inner());
    m.entry((api.clone(), stage.clone()))
        .or_insert_with(|| {
            Arc::new(StageSeries {
                api: api.clone(),
                stage: stage.clone(),
                shards: shards(StageShard::default),
            })
        })
        .clone()
}

/// The series of (API, stage, resource).
pub fn route(api: &Arc<str>, stage: &Arc<str>, resource: &Arc<str>) -> Arc<RouteSeries> {
    let mut m = REGISTRY.routes.lock().unwrap_or_else(|p| p.into_inner());
    m.entry((api.clone(), stage.clone(), resource.clone()))
        .or_insert_with(|| {
            Arc::new(RouteSeries {
                api: api.clone(),
                stage: stage.clone(),
                resource: resource.clone(),
                shards: shards(RouteShard::default),
            })
        })
        .clone()
}

/// Every stage series, for the exposition.
pub fn all_stages() -> Vec<Arc<StageSeries>> {
    let m = REGISTRY.stages.lock().unwrap_or_else(|p| p.into_inner());
    m.values().cloned().collect()
}

/// Every route series, for the exposition and the report merge.
pub fn all_routes() -> Vec<Arc<RouteSeries>> {
    let m = REGISTRY.routes.lock().unwrap_or_else(|p| p.into_inner());
    m.values().cloned().collect()
}

/// A series resolved at its first use and kept (in a compiled snapshot).
pub struct Lazy<T>(OnceLock<Arc<T>>);

impl<T> Default for Lazy<T> {
    fn default() -> Self {
        Lazy(OnceLock::new())
    }
}

impl<T> Lazy<T> {
    pub fn get_or_init(&self, f: impl FnOnce() -> Arc<T>) -> &Arc<T> {
        self.0.get_or_init(f)
    }
}

impl<T> std::fmt::Debug for Lazy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lazy")
    }
}

/// The series of requests whose host names no API.
pub fn unknown_host() -> (&'static Arc<StageSeries>, &'static Arc<RouteSeries>) {
    static S: OnceLock<(Arc<StageSeries>, Arc<RouteSeries>)> = OnceLock::new();
    let (s, r) = S.get_or_init(|| {
        let empty: Arc<str> = Arc::from("");
        (stage(&empty, &empty), route(&empty, &empty, &empty))
    });
    (s, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_histograms_add_up_over_shards() {
        let (a, s, r): (Arc<str>, Arc<str>, Arc<str>) =
            ("series-test".into(), "prod".into(), "/x".into());
        let st = stage(&a, &s);
        let rt = route(&a, &s, &r);
        assert!(Arc::ptr_eq(&st, &stage(&a, &s)), "one series per label set");
        rt.count(0, 200);
        rt.count(0, 200);
        rt.count(9, 503);
        let c = rt.counts();
        assert_eq!(c[class_index(200)], 2);
        assert_eq!(c[9 * CLASSES.len() + 4], 1);
        st.record(
            Duration::from_micros(700),
            Some((Duration::from_micros(400), 0)),
            Some(3),
            Some(crate::rejection::AuthFailure::Signature),
            true,
        );
        st.record(Duration::from_secs(100), None, None, None, false);
        let t = st.totals();
        assert_eq!(t.duration.count(), 2);
        assert_eq!(t.duration.buckets[1], 1, "0.7 ms ≤ 1 ms");
        assert_eq!(t.duration.buckets[16], 1, "+Inf");
        assert_eq!(t.integration[0].buckets[0], 1);
        assert_eq!((t.rejections[3], t.retries), (1, 1));
        assert_eq!(t.auth_failures[4], 1);
        assert!((t.duration.sum_seconds - 100.0007).abs() < 1e-9);
    }
}
