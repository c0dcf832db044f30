//! Prometheus metrics with the names and labels of `operations.md` ("Metrics").
//! Label sets are bounded: unknown hosts and stages count under `""`, and request methods
//! outside the standard set under `OTHER`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub integration_duration: HistogramVec,
    pub rejections: IntCounterVec,
    pub integration_retries: IntCounterVec,
    pub quota_store_errors: IntCounterVec,
    pub snapshot_reloads: IntCounterVec,
    pub snapshot_revision: IntGaugeVec,
    pub access_log_dropped: prometheus::IntCounter,
}

/// `status_class` label of a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `method` label of a request method (bounded).
pub fn method_label(m: &http::Method) -> &str {
    match *m {
        http::Method::GET
        | http::Method::POST
        | http::Method::PUT
        | http::Method::DELETE
        | http::Method::PATCH
        | http::Method::HEAD
        | http::Method::OPTIONS
        | http::Method::TRACE
        | http::Method::CONNECT => m.as_str(),
        _ => "OTHER",
    }
}

/// What one answered request adds to the metrics.
pub struct RequestSample<'a> {
    pub api: &'a str,
    pub stage: &'a str,
    pub resource: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub latency: std::time::Duration,
    /// Time spent in the integration, and its kind label.
    pub integration: Option<(std::time::Duration, &'a str)>,
    /// The integration request was sent a second time.
    pub retried: bool,
}

impl Metrics {
    /// Counts one answered request and observes its latencies.
    pub fn record_request(&self, s: &RequestSample<'_>) {
        self.requests
            .with_label_values(&[s.api, s.stage, s.resource, s.method, status_class(s.status)])
            .inc();
        self.request_duration
            .with_label_values(&[s.api, s.stage])
            .observe(s.latency.as_secs_f64());
        if s.retried {
            self.integration_retries
                .with_label_values(&[s.api, s.stage])
                .inc();
        }
        if let Some((elapsed, kind)) = s.integration {
            self.integration_duration
                .with_label_values(&[s.api, s.stage, kind])
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "apigw_requests_total",
                "Requests answered, by matched resource and status class",
            ),
            &["api_id", "stage", "resource", "method", "status_class"],
        )
        .expect("metric definition");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "apigw_request_duration_seconds",
                "From the request head received to the response head sent",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["api_id", "stage"],
        )
        .expect("metric definition");
        let integration_duration = HistogramVec::new(
            HistogramOpts::new(
                "apigw_integration_duration_seconds",
                "From the backend request sent to its response head received",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["api_id", "stage", "integration"],
        )
        .expect("metric definition");
        let rejections = IntCounterVec::new(
            Opts::new(
                "apigw_rejections_total",
                "Gateway-made error responses by code",
            ),
            &["api_id", "stage", "code"],
        )
        .expect("metric definition");
        let integration_retries = IntCounterVec::new(
            Opts::new(
                "apigw_integration_retries_total",
                "Requests sent to the backend a second time, on a new connection, after a \
                 reused connection failed before answering",
            ),
            &["api_id", "stage"],
        )
        .expect("metric definition");
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
        for c in [
            Box::new(access_log_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(integration_duration.clone()),
            Box::new(rejections.clone()),
            Box::new(integration_retries.clone()),
            Box::new(quota_store_errors.clone()),
            Box::new(snapshot_reloads.clone()),
            Box::new(snapshot_revision.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            requests,
            request_duration,
            integration_duration,
            rejections,
            integration_retries,
            quota_store_errors,
            snapshot_reloads,
            snapshot_revision,
            access_log_dropped,
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
    use super::*;

    #[test]
    fn exposition_has_spec_names() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["a", "prod", "/orders", "GET", "2xx"])
            .inc();
        m.rejections
            .with_label_values(&["a", "prod", "API_NOT_FOUND"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "apigw_requests_total{api_id=\"a\",method=\"GET\",resource=\"/orders\",stage=\"prod\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains(
            "apigw_rejections_total{api_id=\"a\",code=\"API_NOT_FOUND\",stage=\"prod\"} 1"
        ));
        assert_eq!(status_class(504), "5xx");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "OTHER"
        );
    }
}
