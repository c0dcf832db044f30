//! Prometheus metrics with the names and labels of `operations.md` ("Metrics"), rendered by
//! the `prometheus` crate's text encoder.
//!
//! The per-request metrics (`apigw_requests_total`, the two latency histograms,
//! `apigw_rejections_total`, `apigw_integration_retries_total`) are the per-worker
//! [`series`], added up by a [`Collector`] when `/metrics` is scraped; the rest are ordinary
//! `prometheus` metrics, written off the request path.
//!
//! Label sets are bounded: unknown hosts and stages count under `""`, and request methods
//! outside the standard set under `OTHER`.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::series::{self, CLASSES, INTEGRATIONS, LATENCY_BUCKETS, METHODS};

pub struct Metrics {
    registry: Registry,
    pub quota_store_errors: IntCounterVec,
    pub snapshot_reloads: IntCounterVec,
    pub snapshot_revision: IntGaugeVec,
    pub access_log_dropped: prometheus::IntCounter,
    pub trace_spans_dropped: IntCounterVec,
}

/// `status_class` label of a status code.
pub fn status_class(status: u16) -> &'static str {
    CLASSES[series::class_index(status)]
}

/// `method` label of a request method (bounded).
pub fn method_label(m: &http::Method) -> &'static str {
    METHODS[series::method_index(m)]
}

const REQUESTS: &str = "apigw_requests_total";
const REQUEST_DURATION: &str = "apigw_request_duration_seconds";
const INTEGRATION_DURATION: &str = "apigw_integration_duration_seconds";
const REJECTIONS: &str = "apigw_rejections_total";
const RETRIES: &str = "apigw_integration_retries_total";
const AUTH_FAILURES: &str = "apigw_auth_failures_total";

/// Gathers the per-worker series when scraped.
struct SeriesCollector {
    descs: Vec<Desc>,
}

impl SeriesCollector {
    fn new() -> Self {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| (*l).to_owned()).collect(),
                Default::default(),
            )
            .expect("metric description")
        };
        Self {
            descs: vec![
                desc(
                    REQUESTS,
                    "Requests answered, by matched resource and status class",
                    &["api_id", "stage", "resource", "method", "status_class"],
                ),
                desc(
                    REQUEST_DURATION,
                    "From the request head received to the response head sent",
                    &["api_id", "stage"],
                ),
                desc(
                    INTEGRATION_DURATION,
                    "From the backend request sent to its response head received",
                    &["api_id", "stage", "integration"],
                ),
                desc(
                    REJECTIONS,
                    "Gateway-made error responses by code",
                    &["api_id", "stage", "code"],
                ),
                desc(
                    RETRIES,
                    "Requests sent to the backend a second time, on a new connection, after a \
                     reused connection failed before answering",
                    &["api_id", "stage"],
                ),
                desc(
                    AUTH_FAILURES,
                    "Refused tokens and API keys, by reason",
                    &["api_id", "stage", "reason"],
                ),
            ],
        }
    }
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

/// A metric with labels given in name order (the text format shows them as given).
fn metric(labels: &[(&str, &str)]) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels.iter().map(|(n, v)| label(n, v)).collect());
    m
}

fn counter(labels: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut m = metric(labels);
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}

fn histogram(labels: &[(&str, &str)], h: &series::HistogramTotals) -> proto::Metric {
    let mut m = metric(labels);
    let mut p = proto::Histogram::default();
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
    for (bound, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
        cumulative += n;
        let mut b = proto::Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    p.set_bucket(buckets);
    p.set_sample_count(h.count());
    p.set_sample_sum(h.sum_seconds);
    m.set_histogram(p);
    m
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl Collector for SeriesCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut requests = Vec::new();
        for r in series::all_routes() {
            let counts = r.counts();
            for (i, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                let (m, c) = (i / CLASSES.len(), i % CLASSES.len());
                requests.push(counter(
                    &[
                        ("api_id", &r.api),
                        ("method", METHODS[m]),
                        ("resource", &r.resource),
                        ("stage", &r.stage),
                        ("status_class", CLASSES[c]),
                    ],
                    *n,
                ));
            }
        }
        let (mut durations, mut integrations, mut rejections, mut retries, mut auth_failures) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in series::all_stages() {
            let t = s.totals();
            if t.duration.count() > 0 {
                durations.push(histogram(
                    &[("api_id", &t.api), ("stage", &t.stage)],
                    &t.duration,
                ));
            }
            for (kind, h) in INTEGRATIONS.iter().zip(&t.integration) {
                if h.count() > 0 {
                    integrations.push(histogram(
                        &[
                            ("api_id", &t.api),
                            ("integration", kind),
                            ("stage", &t.stage),
                        ],
                        h,
                    ));
                }
            }
            for (code, n) in crate::rejection::CODES.iter().zip(&t.rejections) {
                if *n > 0 {
                    rejections.push(counter(
                        &[("api_id", &t.api), ("code", code), ("stage", &t.stage)],
                        *n,
                    ));
                }
            }
            // From a stage's first answer on, at 0 until a retry: a ratio or an alert on
            // retries has a series to work with.
            if t.retries > 0 || t.duration.count() > 0 {
                retries.push(counter(
                    &[("api_id", &t.api), ("stage", &t.stage)],
                    t.retries,
                ));
            }
            for (reason, n) in crate::rejection::AUTH_FAILURES.iter().zip(&t.auth_failures) {
                if *n > 0 {
                    auth_failures.push(counter(
                        &[("api_id", &t.api), ("reason", reason), ("stage", &t.stage)],
                        *n,
                    ));
                }
            }
        }
        let d = &self.descs;
        vec![
            family(&d[0], MetricType::COUNTER, requests),
            family(&d[1], MetricType::HISTOGRAM, durations),
            family(&d[2], MetricType::HISTOGRAM, integrations),
            family(&d[3], MetricType::COUNTER, rejections),
            family(&d[4], MetricType::COUNTER, retries),
            family(&d[5], MetricType::COUNTER, auth_failures),
        ]
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let quota_store_errors = IntCounterVec::new(
            Opts::new(
                "apigw_quota_store_errors_total",
                "Failed or timed-out quota store calls",
            ),
            &["backend"],
        )
        .expect("metric definition");
        let snapshot_reloads = IntCounterVec::new(
            Opts::new(
                "apigw_snapshot_reloads_total",
                "Snapshot arrivals by result",
            ),
            &["result"],
        )
        .expect("metric definition");
        let snapshot_revision = IntGaugeVec::new(
            Opts::new(
                "apigw_snapshot_revision",
                "Revision of the loaded snapshot per API",
            ),
            &["api_id"],
        )
        .expect("metric definition");
        let access_log_dropped = prometheus::IntCounter::new(
            "apigw_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )
        .expect("metric definition");
        let trace_spans_dropped = IntCounterVec::new(
            Opts::new(
                "apigw_trace_spans_dropped_total",
                "Finished spans not exported: the export queue was full, or the export failed",
            ),
            &["reason"],
        )
        .expect("metric definition");
        // Both reasons exist (at 0) from the start, so that a dashboard and an alert see
        // a series before the first drop.
        for reason in ["queue_full", "export_failed"] {
            trace_spans_dropped.with_label_values(&[reason]);
        }
        for c in [
            Box::new(access_log_dropped.clone()) as Box<dyn Collector>,
            Box::new(trace_spans_dropped.clone()),
            Box::new(SeriesCollector::new()),
            Box::new(quota_store_errors.clone()),
            Box::new(snapshot_reloads.clone()),
            Box::new(snapshot_revision.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            quota_store_errors,
            snapshot_reloads,
            snapshot_revision,
            access_log_dropped,
            trace_spans_dropped,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn exposition_has_spec_names() {
        let m = Metrics::new();
        let (a, s, r): (Arc<str>, Arc<str>, Arc<str>) =
            ("metrics-test".into(), "prod".into(), "/orders".into());
        series::route(&a, &s, &r).count(0, 200);
        series::stage(&a, &s).record(
            Duration::from_millis(3),
            Some((Duration::from_millis(2), 0)),
            Some(4),
            Some(crate::rejection::AuthFailure::Expired),
            false,
        );
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "apigw_requests_total{api_id=\"metrics-test\",method=\"GET\",resource=\"/orders\",stage=\"prod\",status_class=\"2xx\"} 1"
        ), "{text}");
        assert!(text.contains(
            "apigw_rejections_total{api_id=\"metrics-test\",code=\"API_NOT_FOUND\",stage=\"prod\"} 1"
        ));
        assert!(text.contains(
            "apigw_auth_failures_total{api_id=\"metrics-test\",reason=\"expired\",stage=\"prod\"} 1"
        ), "{text}");
        assert!(text.contains(
            "apigw_request_duration_seconds_bucket{api_id=\"metrics-test\",stage=\"prod\",le=\"0.005\"} 1"
        ), "{text}");
        assert!(text.contains(
            "apigw_integration_duration_seconds_count{api_id=\"metrics-test\",integration=\"HTTP\",stage=\"prod\"} 1"
        ), "{text}");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "OTHER"
        );
    }
}
