//! OpenTelemetry traces (`[tracing]`), exported over OTLP/HTTP (protobuf) by the
//! `opentelemetry-otlp` exporter.
//!
//! Per request one server span (from arrival to the response head: API, stage, resource
//! template — never the raw path —, method, status, client address, key id, and the JWT
//! `sub` only when configured) and, when the request is forwarded, one client span for the
//! integration call (backend address, retry count), whose id is the parent id of the
//! `traceparent` the backend receives. Sampling is parent-based: an incoming sampled
//! `traceparent` is always followed, an unsampled one never; new traces are sampled at
//! `sample_ratio`.
//!
//! What is shared and why: the workers hand finished spans to one bounded queue
//! (`try_send`: a full queue drops the span and counts it, a request never waits); one
//! export thread, in the idle scheduling class (`export_priority`), batches them and calls
//! the exporter on a runtime of its own, so encoding and sending never run on a worker's
//! runtime. Unsampled requests never reach the SDK: the decision is made first
//! (`start_request`) and they carry only ids. While the queue is backlogged (a span found
//! it full and the export thread has not emptied it since: one shared flag, written only
//! on those two events), sampled requests are shed whole at their start — counted as
//! dropped, not built — so that an overloaded core spends nothing on spans it could not
//! export, and a trace loses both of its spans rather than one.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, Span as SdkSpan,
    SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec};

use crate::config::{ExportPriority, TracingConfig};

/// Spans per export call at most.
const MAX_BATCH: usize = 512;
/// A batch is sent at the latest this long after its first span.
const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// Attributes a server span can get (see `end_request`).
const SERVER_ATTRIBUTES: usize = 12;
/// How often the export thread drains the queue.
const DRAIN_TICK: Duration = Duration::from_millis(20);

pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    record_jwt_sub: bool,
    sample_ratio: f64,
    /// Set when a span finds the queue full, cleared when the export thread empties it.
    backlog: Arc<AtomicBool>,
    /// `apigw_trace_spans_dropped_total{reason="queue_full"}`.
    queue_full: IntCounter,
}

/// The trace of one request.
pub enum RequestTrace {
    /// Sampled: the server span, inside the context its children start from.
    Recording(Context),
    /// Not sampled: only the ids go on (no span data, no context): the trace id and flags
    /// of the request's span, for the `traceparent` the backend gets.
    NotRecording(SpanContext),
    /// Sampled, but shed because the export queue is backlogged: no span is built, each
    /// one the request would have had is counted as dropped.
    Shed(SpanContext),
}

impl RequestTrace {
    /// Sampled: there is a span to end.
    pub fn is_recording(&self) -> bool {
        matches!(self, Self::Recording(_))
    }
}

/// The client span of one integration call (sampled requests only).
pub struct ClientSpan {
    span: SdkSpan,
}

/// What the server span says of a request when it ends. Names are the snapshot's shared
/// strings: an attribute costs a reference count, not a copy.
pub struct ServerSummary<'a> {
    pub method: &'static str,
    pub route: Option<&'a Arc<str>>,
    pub status: u16,
    pub client_ip: std::net::IpAddr,
    /// `client_ip` as text when the connection already has it (the client is the hop's
    /// own address, nearly always): formatting an address costs more than the rest of the
    /// span's attributes.
    pub client_ip_text: Option<&'a str>,
    pub scheme: &'static str,
    pub api_id: Option<&'a Arc<str>>,
    pub stage: Option<&'a Arc<str>>,
    pub api_key_id: Option<&'a Arc<str>>,
    pub jwt_sub: Option<&'a str>,
    pub request_id: &'a str,
    pub error_code: Option<&'static str>,
}

/// What the client span says of an integration call when it ends.
pub struct ClientSummary {
    pub status: Option<u16>,
    pub error_code: Option<&'static str>,
    pub retried: bool,
}

impl Tracing {
    /// Starts the export thread; `None` when no endpoint is configured (tracing off).
    pub fn start(cfg: &TracingConfig, dropped: IntCounterVec) -> Option<Self> {
        let endpoint = endpoint_url(cfg.otlp_endpoint.as_deref()?);
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes(
                cfg.resource_attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_size);
        let backlog = Arc::new(AtomicBool::new(false));
        let export_backlog = backlog.clone();
        let export_timeout = cfg.export_timeout;
        let export_resource = resource.clone();
        let export_dropped = dropped.clone();
        let priority = cfg.export_priority;
        let spawned = std::thread::Builder::new()
            .name("scp-trace-export".into())
            .spawn(move || {
                match priority {
                    ExportPriority::Idle => {
                        if let Err(e) = crate::worker::idle_priority() {
                            tracing::warn!(
                                error = %e,
                                "the trace export thread cannot run in the idle scheduling class; it runs at nice 10 (export_priority = \"background\")"
                            );
                            crate::worker::lower_priority(10);
                        }
                    }
                    ExportPriority::Background => crate::worker::lower_priority(10),
                }
                export_loop(
                    rx,
                    &endpoint,
                    export_timeout,
                    &export_resource,
                    &export_dropped,
                    &export_backlog,
                );
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the trace export thread; tracing is off");
            return None;
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor {
                tx,
                dropped: dropped.with_label_values(&["queue_full"]),
                backlog: backlog.clone(),
            })
            // The decision is made in `start_request` (parent-based, then the ratio):
            // the SDK is only asked for spans that are sampled.
            .with_sampler(Sampler::AlwaysOn)
            // A new trace keeps the id its sampling decision was made on.
            .with_id_generator(DecidedTraceIds)
            .with_resource(resource)
            .build();
        tracing::info!(
            sample_ratio = cfg.sample_ratio,
            service_name = %cfg.service_name,
            "exporting traces over OTLP/HTTP"
        );
        Some(Self {
            tracer: provider.tracer("scp-gateway"),
            provider,
            propagator: TraceContextPropagator::new(),
            record_jwt_sub: cfg.record_jwt_sub,
            sample_ratio: cfg.sample_ratio,
            backlog,
            queue_full: dropped.with_label_values(&["queue_full"]),
        })
    }

    /// The server span of a request that just arrived, child of its `traceparent` if any.
    ///
    /// The sampling decision is made here, before the SDK is involved: a valid incoming
    /// `traceparent` is followed (sampled or not), a new trace is sampled at `sample_ratio`
    /// by the rule of OpenTelemetry's `TraceIdRatioBased` sampler applied to its new trace
    /// id. An unsampled request never reaches the SDK (whose span builder, id generator and
    /// sampler cost more than the rest of an unsampled request's tracing): it keeps only
    /// ids — the parent's trace id or a new one, and a new span id.
    pub fn start_request(&self, headers: &HeaderMap) -> RequestTrace {
        // No context at all for a request without a `traceparent` (the common case).
        let parent = headers.contains_key(&TRACEPARENT).then(|| {
            self.propagator
                .extract(&opentelemetry_http::HeaderExtractor(headers))
        });
        let remote = parent
            .as_ref()
            .map(|p| p.span().span_context().clone())
            .filter(SpanContext::is_valid);
        let (trace_id, span_id) = {
            let (t, s) = crate::request_id::random_ids();
            (TraceId::from(t.max(1)), SpanId::from(s.max(1)))
        };
        let sampled = match &remote {
            Some(r) => r.is_sampled(),
            None => ratio_admits(self.sample_ratio, trace_id),
        };
        if sampled && self.backlog.load(Ordering::Relaxed) {
            // The server span is dropped now; the client span, if any, in `start_client`.
            // The backend still learns the trace's own decision: a sampled parent stays
            // sampled (its trace exists upstream), a new trace is not (it has no root).
            self.queue_full.inc();
            let (trace_id, flags, state) = match remote {
                Some(r) => (r.trace_id(), r.trace_flags(), r.trace_state().clone()),
                None => (trace_id, TraceFlags::default(), TraceState::default()),
            };
            return RequestTrace::Shed(SpanContext::new(trace_id, span_id, flags, false, state));
        }
        if !sampled {
            let (trace_id, state) = match remote {
                Some(r) => (r.trace_id(), r.trace_state().clone()),
                None => (trace_id, TraceState::default()),
            };
            return RequestTrace::NotRecording(SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::default(),
                false,
                state,
            ));
        }
        if remote.is_none() {
            // The SDK starts a new trace: with the id the decision above was made on, so
            // that a collector applying the same ratio to it agrees.
            DECIDED_TRACE_ID.set(Some(trace_id));
        }
        let parent = parent.unwrap_or_default();
        let span = self
            .tracer
            .span_builder("HTTP")
            .with_kind(SpanKind::Server)
            .with_attributes(Vec::with_capacity(SERVER_ATTRIBUTES))
            .start_with_context(&self.tracer, &parent);
        if span.is_recording() {
            RequestTrace::Recording(parent.with_span(span))
        } else {
            // Only after a shutdown of the provider.
            RequestTrace::NotRecording(span.span_context().clone())
        }
    }

    /// The client span of an integration call (sampled requests), and the `traceparent`
    /// the backend gets: it names the client span, or, unsampled, a new span id of the
    /// same trace.
    pub fn start_client(
        &self,
        request: &RequestTrace,
        method: &'static str,
        backend: Option<(&Arc<str>, u16)>,
    ) -> (Option<Box<ClientSpan>>, HeaderValue) {
        match request {
            RequestTrace::NotRecording(sc) | RequestTrace::Shed(sc) => {
                if let RequestTrace::Shed(_) = request {
                    // The client span this request would have had.
                    self.queue_full.inc();
                }
                let span_id = ID_GENERATOR.with(|g| g.new_span_id());
                (None, traceparent(sc, span_id))
            }
            RequestTrace::Recording(cx) => {
                let mut attributes = Vec::with_capacity(6);
                attributes.push(KeyValue::new("http.request.method", method));
                if let Some((host, port)) = backend {
                    attributes.push(KeyValue::new("server.address", host.clone()));
                    attributes.push(KeyValue::new("server.port", i64::from(port)));
                }
                let span = self
                    .tracer
                    .span_builder(method)
                    .with_kind(SpanKind::Client)
                    .with_attributes(attributes)
                    .start_with_context(&self.tracer, cx);
                let value = traceparent(span.span_context(), span.span_context().span_id());
                (Some(Box::new(ClientSpan { span })), value)
            }
        }
    }

    /// Ends a client span with the call's result.
    pub fn end_client(&self, mut client: Box<ClientSpan>, s: &ClientSummary) {
        let span = &mut client.span;
        if let Some(status) = s.status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(""));
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
            }
        } else {
            span.set_status(Status::error(""));
            if let Some(code) = s.error_code {
                span.set_attribute(KeyValue::new("error.type", code));
            }
        }
        if s.retried {
            span.set_attribute(KeyValue::new("http.request.resend_count", 1i64));
        }
        span.end();
    }

    /// Ends a request's server span when its response head is ready.
    pub fn end_request(&self, request: &RequestTrace, s: &ServerSummary<'_>) {
        let RequestTrace::Recording(cx) = request else {
            return;
        };
        let span = cx.span();
        span.update_name(match s.route {
            Some(route) => {
                // `format!` costs several times this.
                let mut name = String::with_capacity(s.method.len() + 1 + route.len());
                name.push_str(s.method);
                name.push(' ');
                name.push_str(route);
                name
            }
            None => s.method.to_owned(),
        });
        let kv = |key: &'static str, v: Option<&Arc<str>>| v.map(|v| KeyValue::new(key, v.clone()));
        let server_error = s.status >= 500;
        // A server span is an error for 5xx only (a 4xx is the client's).
        if server_error {
            span.set_status(Status::error(""));
        }
        let attributes: [Option<KeyValue>; SERVER_ATTRIBUTES] = [
            Some(KeyValue::new("http.request.method", s.method)),
            Some(KeyValue::new(
                "http.response.status_code",
                i64::from(s.status),
            )),
            Some(KeyValue::new("url.scheme", s.scheme)),
            Some(KeyValue::new(
                "client.address",
                s.client_ip_text
                    .map_or_else(|| s.client_ip.to_string(), str::to_owned),
            )),
            (!s.request_id.is_empty())
                .then(|| KeyValue::new("scp.request_id", s.request_id.to_owned())),
            kv("http.route", s.route),
            kv("scp.api_id", s.api_id),
            kv("scp.stage", s.stage),
            kv("scp.api_key_id", s.api_key_id),
            s.jwt_sub
                .filter(|_| self.record_jwt_sub)
                .map(|v| KeyValue::new("enduser.id", v.to_owned())),
            s.error_code.map(|c| KeyValue::new("scp.error_code", c)),
            server_error.then(|| KeyValue::new("error.type", s.status.to_string())),
        ];
        span.set_attributes(attributes.into_iter().flatten());
        span.end();
    }

    /// Sends what is queued (on a graceful stop).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "traces not flushed");
        }
    }
}

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Whether a new trace with this id is sampled at `ratio`: the rule of OpenTelemetry's
/// `TraceIdRatioBased` sampler (the id's lower 64 bits, shifted right by one, below
/// `ratio × 2⁶³`), so that the decision reads the same from the id everywhere.
fn ratio_admits(ratio: f64, trace_id: TraceId) -> bool {
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or([0; 8]));
    (low >> 1) < bound
}

thread_local! {
    /// Span ids of unsampled client calls (the SDK's generator, per thread: no lock).
    static ID_GENERATOR: RandomIdGenerator = RandomIdGenerator::default();
    /// The trace id `start_request` sampled a new trace on, for the SDK to take.
    static DECIDED_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// The SDK's ids: a new trace takes the id `start_request` decided on (the SDK would
/// otherwise draw another), everything else is random.
#[derive(Debug)]
struct DecidedTraceIds;

impl IdGenerator for DecidedTraceIds {
    fn new_trace_id(&self) -> TraceId {
        DECIDED_TRACE_ID
            .take()
            .unwrap_or_else(|| ID_GENERATOR.with(|g| g.new_trace_id()))
    }

    fn new_span_id(&self) -> SpanId {
        ID_GENERATOR.with(|g| g.new_span_id())
    }
}

/// `00-<trace id>-<span id>-<flags>` (W3C Trace Context) of `sc` with `span_id`.
fn traceparent(sc: &SpanContext, span_id: SpanId) -> HeaderValue {
    crate::request_id::traceparent(
        &sc.trace_id().to_bytes(),
        &span_id.to_bytes(),
        sc.trace_flags().to_u8(),
    )
}

/// `http://host:port` gets the OTLP/HTTP traces path; a URL with a path is used as is.
fn endpoint_url(e: &str) -> String {
    let after_scheme = e.split_once("://").map_or(e, |(_, rest)| rest);
    match after_scheme.find('/') {
        Some(i) if after_scheme.len() > i + 1 => e.to_owned(),
        _ => format!("{}/v1/traces", e.trim_end_matches('/')),
    }
}

/// Span data travels in the queue by value: a box would be one more allocation on the worker
/// and one more free on the export thread per span (the queue's slots, 352 bytes each, are
/// allocated once).
#[allow(clippy::large_enum_variant)]
enum Msg {
    Span(SpanData),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Hands finished (sampled) spans to the export thread without ever waiting.
#[derive(Debug)]
struct QueueProcessor {
    tx: SyncSender<Msg>,
    dropped: prometheus::IntCounter,
    backlog: Arc<AtomicBool>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut SdkSpan, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(span)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
                self.backlog.store(true, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.tx
            .send(Msg::Flush(done_tx))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        done_rx
            .recv_timeout(Duration::from_secs(15))
            .map_err(|_| OTelSdkError::Timeout(Duration::from_secs(15)))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.force_flush()
    }
}

fn export_loop(
    rx: Receiver<Msg>,
    endpoint: &str,
    timeout: Duration,
    resource: &Resource,
    dropped: &IntCounterVec,
    backlog: &AtomicBool,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "trace export runtime; spans are dropped");
            return;
        }
    };
    let exporter = {
        let _guard = rt.enter();
        use opentelemetry_otlp::WithExportConfig;
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()
    };
    let mut exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the OTLP exporter; spans are dropped");
            return;
        }
    };
    exporter.set_resource(resource);
    let failed = dropped.with_label_values(&["export_failed"]);
    let mut last_warning: Option<Instant> = None;
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut first_at: Option<Instant> = None;
    let mut export = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        let r = rt.block_on(async {
            tokio::time::timeout(timeout, exporter.export(spans))
                .await
                .unwrap_or(Err(OTelSdkError::Timeout(timeout)))
        });
        if let Err(e) = r {
            failed.inc_by(n);
            // One warning a minute at most: a collector that is down must not fill the log.
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_warning = Some(Instant::now());
                tracing::warn!(error = %e, spans = n, "trace export failed; spans dropped (apigw_trace_spans_dropped_total)");
            }
        }
    };
    // The thread sleeps on a tick and drains the queue, rather than blocking in `recv`: a
    // worker's `try_send` then never has a sleeping receiver to wake (a futex call and a
    // context switch on the worker's core per span, the access log's lesson).
    loop {
        std::thread::sleep(DRAIN_TICK);
        let mut waiting = Vec::new();
        let mut disconnected = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Span(s)) => {
                    batch.push(s);
                    first_at.get_or_insert_with(Instant::now);
                    if batch.len() >= MAX_BATCH {
                        export(&mut batch);
                        first_at = None;
                    }
                }
                Ok(Msg::Flush(done)) => waiting.push(done),
                Err(TryRecvError::Empty) => {
                    // Read only when it was set: the flag's line stays with the workers.
                    if backlog.load(Ordering::Relaxed) {
                        backlog.store(false, Ordering::Relaxed);
                    }
                    break;
                }
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if !waiting.is_empty()
            || disconnected
            || first_at.is_some_and(|t| t.elapsed() >= EXPORT_INTERVAL)
        {
            export(&mut batch);
            first_at = None;
        }
        for done in waiting {
            let _ = done.send(());
        }
        if disconnected {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ratio_decides_as_the_sdk_sampler_does() {
        use super::{Sampler, SpanKind, TraceId};
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
        for ratio in [0.0, 0.01, 0.25, 0.5, 0.999, 1.0] {
            let sdk = Sampler::TraceIdRatioBased(ratio);
            let mut sampled = 0;
            for _ in 0..4_000 {
                let id = TraceId::from(crate::request_id::random_ids().0.max(1));
                let decision = sdk
                    .should_sample(None, id, "HTTP", &SpanKind::Server, &[], &[])
                    .decision;
                let ours = super::ratio_admits(ratio, id);
                assert_eq!(
                    ours,
                    decision == SamplingDecision::RecordAndSample,
                    "{ratio} {id}"
                );
                sampled += usize::from(ours);
            }
            let expected = 4_000.0 * ratio;
            assert!(
                (sampled as f64 - expected).abs() <= 4_000.0 * 0.05,
                "{ratio}: {sampled}"
            );
        }
    }

    #[test]
    fn traceparent_is_w3c() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let id = SpanId::from_hex("a1b2c3d4e5f60718").unwrap();
        assert_eq!(
            super::traceparent(&sc, id),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-a1b2c3d4e5f60718-01"
        );
    }

    #[test]
    fn a_base_endpoint_gets_the_traces_path() {
        assert_eq!(
            super::endpoint_url("http://c:4318"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::endpoint_url("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::endpoint_url("http://c:4318/custom/traces"),
            "http://c:4318/custom/traces"
        );
    }
}
