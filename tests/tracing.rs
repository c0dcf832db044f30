//! Issue 17: OpenTelemetry traces over OTLP/HTTP. A real OTLP receiver (Python, decoding with
//! the official protobuf definitions of `opentelemetry-proto`) collects what the gateway
//! exports: per request a server span and a client span, linked, with the attributes the
//! docs promise, and the backend gets the client span's id in `traceparent`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The OTLP/HTTP receiver of `tests/scripts/otlp_receiver.py`; killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let check = Command::new("python3")
            .args([
                "-c",
                "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
            ])
            .output()
            .expect("python3");
        assert!(
            check.status.success(),
            "this test needs the OTLP protobuf definitions: python3 -m pip install opentelemetry-proto (.ci/run installs them): {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/otlp_receiver.py"
        );
        let mut child = Command::new("python3")
            .dies_with_test()
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first.strip_prefix("listening ").unwrap().parse().unwrap();
        let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Receiver { child, port, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `n` spans arrived (or the deadline), and returns all of them.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyed_api(b: &Backend) -> Value {
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[])
        .resource(
            "/orders/{order-id}",
            &[("GET", &b.url("/v1/orders/{order-id}"))],
        )
        .build();
    doc["deployments"][0]["resources"][2]["methods"][0]["api_key_required"] = json!(true);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 1000, "rate": "day",
        "api_keys": [{"id": "key-7", "name": "k", "key": "trace-test-key-000001"}]}]);
    doc
}

/// A GET of the keyed resource with the plan's key.
fn keyed(gw: &Gateway, c: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
    gw.req(c, reqwest::Method::GET, HOST, path)
        .header("x-scp-apikey", "trace-test-key-000001")
}

/// `apigw_trace_spans_dropped_total{reason}` in an exposition (0 when absent).
fn dropped(metrics: &str, reason: &str) -> f64 {
    let series = format!("apigw_trace_spans_dropped_total{{reason=\"{reason}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn tracing_toml(endpoint: &str, ratio: &str) -> String {
    format!("[tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = {ratio}\nservice_name = \"gw-under-test\"\nresource_attributes = {{ \"deployment.environment\" = \"test\" }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_exports_a_server_and_a_client_span_and_the_backend_gets_the_client_span() {
    let receiver = Receiver::start();
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &keyed_api(&b))],
        &tracing_toml(&receiver.endpoint(), "0.0"),
    );
    let c = client();
    // Sampling ratio 0, but the incoming traceparent is sampled: parent-based, followed.
    let r = keyed(&gw, &c, "/prod/orders/42")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    let request_id = r.headers()["x-scp-request-id"].to_str().unwrap().to_owned();
    let spans = receiver.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans
        .iter()
        .find(|s| s["kind"] == 2)
        .expect("a SERVER span");
    let client = spans
        .iter()
        .find(|s| s["kind"] == 3)
        .expect("a CLIENT span");

    assert_eq!(server["path"], "/v1/traces");
    assert_eq!(server["content_type"], "application/x-protobuf");
    assert_eq!(server["trace_id"], TRACE);
    assert_eq!(
        server["parent_span_id"], PARENT,
        "child of the incoming traceparent"
    );
    assert_eq!(client["trace_id"], TRACE);
    assert_eq!(
        client["parent_span_id"], server["span_id"],
        "the client span is the server span's child"
    );
    assert_eq!(server["name"], "GET /orders/{order-id}");
    assert_eq!(server["resource"]["service.name"], "gw-under-test");
    assert_eq!(server["resource"]["deployment.environment"], "test");
    let a = &server["attributes"];
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["http.route"], "/orders/{order-id}");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["client.address"], "127.0.0.1");
    assert_eq!(a["scp.api_id"], "api1");
    assert_eq!(a["scp.stage"], "prod");
    assert_eq!(a["scp.api_key_id"], "key-7");
    assert_eq!(a["scp.request_id"], request_id.as_str());
    assert!(
        a.get("enduser.id").is_none(),
        "no JWT sub unless configured"
    );
    let everything = serde_json::to_string(&spans).unwrap();
    assert!(
        !everything.contains("/orders/42"),
        "never the raw path: {everything}"
    );
    assert!(
        !everything.contains("trace-test-key-000001"),
        "never the key"
    );
    let ca = &client["attributes"];
    assert_eq!(client["name"], "GET");
    assert_eq!(ca["server.address"], "127.0.0.1", "{client:#}");
    assert_eq!(ca["server.port"], b.addr.port());
    assert_eq!(ca["http.response.status_code"], 200);

    // The backend got the client span's id in traceparent.
    let seen = b.last();
    assert_eq!(
        seen.headers["traceparent"].to_str().unwrap(),
        format!("00-{TRACE}-{}-01", client["span_id"].as_str().unwrap())
    );

    // Not sampled (flags 00, ratio 0): nothing is exported, the trace id still goes on with
    // the client span's id, unsampled.
    let r = keyed(&gw, &c, "/prod/orders/43")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-00"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tp = b.last().headers["traceparent"].to_str().unwrap().to_owned();
    assert!(
        tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    assert_ne!(&tp[36..52], PARENT, "a new span id: {tp}");
    for _ in 0..20 {
        keyed(&gw, &c, "/prod/orders/44").send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.spans.lock().unwrap().len(),
        2,
        "sampling off sends nothing"
    );
    let m = gw.metrics().await;
    assert!(m.contains("apigw_trace_spans_dropped_total"), "{m}");
    assert_eq!(dropped(&m, "queue_full"), 0.0, "{m}");
    assert_eq!(dropped(&m, "export_failed"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_traced_at_ratio_one_and_a_rejection_has_its_code() {
    let receiver = Receiver::start();
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &keyed_api(&b))],
        &tracing_toml(&receiver.endpoint(), "1.0"),
    );
    let c = client();
    // Refused (no key): a server span only, no client span; its code is on it.
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders/42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let spans = receiver.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0]["kind"], 2);
    assert_eq!(spans[0]["attributes"]["scp.error_code"], "MISSING_API_KEY");
    assert_eq!(spans[0]["attributes"]["http.response.status_code"], 403);
    assert_eq!(spans[0]["status_code"], 0, "a 4xx is not a server error");
    assert_eq!(spans[0]["parent_span_id"], "", "a new trace: a root span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_request_and_is_counted() {
    let b = Backend::start("b").await;
    let dead = dead_port();
    let endpoint = format!("http://127.0.0.1:{}", dead.port);
    let gw = Gateway::start(
        &[("api1.json", &keyed_api(&b))],
        &tracing_toml(&endpoint, "1.0"),
    );
    let c = client();
    for _ in 0..10 {
        let r = keyed(&gw, &c, "/prod/orders/1").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = gw.metrics().await;
        let failed = dropped(&m, "export_failed");
        if failed >= 20.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "export failures not counted: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gw.log().contains("trace export failed"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_export_queue_drops_spans_and_counts_them_without_slowing_requests() {
    let receiver = Receiver::start();
    let b = Backend::start("b").await;
    // One queue slot: the export thread drains every 20 ms, a request ends two spans within
    // microseconds, so the second of them finds the queue full; until the export thread has
    // emptied the queue, the next requests are shed whole (no span built, both counted).
    let toml = format!(
        "{}queue_size = 1\n",
        tracing_toml(&receiver.endpoint(), "1.0")
    );
    let gw = Gateway::start(&[("api1.json", &keyed_api(&b))], &toml);
    let c = client();
    // Requests until one was shed (its backend call carries an unsampled traceparent: the
    // gateway started its trace and recorded nothing of it); almost always the second.
    let mut sent = 0;
    while sent < 20 || !b.seen().iter().any(|s| traceparent_flags(s) == "00") {
        assert!(sent < 2000, "no request was shed behind a full queue");
        let r = keyed(&gw, &c, &format!("/prod/orders/{sent}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        sent += 1;
    }
    let spans = 2.0 * sent as f64;
    let deadline = Instant::now() + Duration::from_secs(15);
    let full = loop {
        let m = gw.metrics().await;
        let dropped = dropped(&m, "queue_full");
        let exported = receiver.spans.lock().unwrap().len() as f64;
        if dropped >= 1.0 && dropped + exported >= spans {
            assert_eq!(
                dropped + exported,
                spans,
                "every span exported or counted, once"
            );
            break dropped;
        }
        assert!(
            Instant::now() < deadline,
            "{spans} spans neither exported nor counted as dropped: {dropped} dropped, {exported} exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(full < spans, "some spans got through");
    // A shed trace has no span at the collector; a sampled one went on sampled.
    let exported: Vec<Value> = receiver.spans.lock().unwrap().clone();
    for seen in b.seen() {
        let tp = seen.headers["traceparent"].to_str().unwrap().to_owned();
        let trace_id = &tp[3..35];
        let recorded = exported.iter().any(|s| s["trace_id"] == trace_id);
        if traceparent_flags(&seen) == "00" {
            assert!(!recorded, "a shed trace was exported: {tp}");
        } else {
            assert_eq!(traceparent_flags(&seen), "01", "{tp}");
        }
    }
}

/// The flags of the `traceparent` a backend got.
fn traceparent_flags(seen: &Seen) -> String {
    let tp = seen.headers["traceparent"].to_str().unwrap();
    tp[tp.len() - 2..].to_owned()
}

/// Scheduling policy and nice value of the gateway's thread named `name` (Linux
/// `/proc/PID/task/TID/stat`: fields 41 and 19).
#[cfg(target_os = "linux")]
fn thread_sched(pid: u32, name: &str) -> (u32, i32) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        let (head, rest) = stat.rsplit_once(')').unwrap();
        if !head.ends_with(&format!("({name}")) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        return (
            fields[41 - 3].parse().unwrap(),
            fields[19 - 3].parse().unwrap(),
        );
    }
    panic!("no thread named {name} in process {pid}");
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_thread_yields_the_core_to_the_workers() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;
    let receiver = Receiver::start();
    let b = Backend::start("b").await;
    let api = keyed_api(&b);
    // The thread sets its class when it starts, which may be just after the listener's.
    let settled = |gw: &Gateway, want: (u32, i32)| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // The thread's name as the kernel keeps it (15 bytes).
            let got = thread_sched(gw.pid(), "scp-trace-expor");
            if got == want || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let idle = Gateway::start(
        &[("api1.json", &api)],
        &tracing_toml(&receiver.endpoint(), "1.0"),
    );
    assert_eq!(settled(&idle, (SCHED_IDLE, 0)), (SCHED_IDLE, 0));
    let toml = format!(
        "{}export_priority = \"background\"\n",
        tracing_toml(&receiver.endpoint(), "1.0")
    );
    let background = Gateway::start(&[("api1.json", &api)], &toml);
    assert_eq!(settled(&background, (SCHED_OTHER, 10)), (SCHED_OTHER, 10));
    // Either way the spans of a request arrive.
    let c = client();
    for gw in [&idle, &background] {
        let r = keyed(gw, &c, "/prod/orders/1").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while receiver.spans.lock().unwrap().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "spans of both gateways not exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `TraceIdRatioBased` at `ratio` samples this trace id (hex): its lower 64 bits,
/// shifted right by one, below `ratio × 2⁶³` (the OpenTelemetry specification's rule).
fn ratio_samples(ratio: f64, trace_id: &str) -> bool {
    let low = u64::from_str_radix(&trace_id[16..32], 16).unwrap();
    (low >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_trace_is_sampled_by_its_own_trace_id() {
    let receiver = Receiver::start();
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &keyed_api(&b))],
        &tracing_toml(&receiver.endpoint(), "0.5"),
    );
    let c = client();
    for i in 0..60 {
        let r = keyed(&gw, &c, &format!("/prod/orders/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Every trace the backend saw: sampled exactly when the ratio rule says so for its id,
    // so a collector sampling by the same ratio keeps the same traces.
    let seen = b.seen();
    let mut sampled = Vec::new();
    for s in &seen {
        let tp = s.headers["traceparent"].to_str().unwrap().to_owned();
        let trace_id = tp[3..35].to_owned();
        let flagged = tp.ends_with("-01");
        assert_eq!(flagged, ratio_samples(0.5, &trace_id), "{tp}");
        if flagged {
            sampled.push(trace_id);
        }
    }
    assert!(
        !sampled.is_empty() && sampled.len() < seen.len(),
        "60 requests at 0.5: {} sampled",
        sampled.len()
    );
    // The exported spans carry those trace ids.
    let spans = receiver.wait_for(2 * sampled.len()).await;
    for id in &sampled {
        assert!(
            spans.iter().any(|s| s["trace_id"] == id.as_str()),
            "no span of sampled trace {id}"
        );
    }
    assert_eq!(spans.len(), 2 * sampled.len());
}
