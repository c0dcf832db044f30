//! Issue 2 "done when": routing, forwarding rules, streaming, limits, failures, canary and
//! metrics, through the real gateway binary and real backends on ephemeral ports.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const HOST: &str = "api.test";

async fn body_json(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

/// The routing API used by most tests: static, parameter, greedy, ANY and a method-less
/// resource, all forwarding to `b`.
fn routing_api(b: &Backend) -> Value {
    SnapshotBuilder::new("api1", &[HOST])
        .resource(
            "/orders",
            &[
                ("GET", &b.url("/orders?src=gw")),
                ("POST", &b.url("/orders")),
            ],
        )
        .resource("/orders/latest", &[("GET", &b.url("/latest"))])
        .resource(
            "/orders/{order-id}",
            &[
                ("ANY", &b.url("/v1/orders/{order-id}")),
                ("DELETE", &b.url("/deleted/{order-id}")),
            ],
        )
        .resource("/files", &[])
        .resource("/files/{path+}", &[("GET", &b.url("/static/{path+}"))])
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_static_param_greedy_any_and_errors() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let c = client();

    // Static beats parameter.
    let r = gw.get(&c, HOST, "/prod/orders/latest").await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_json(r).await["uri"], "/latest");
    // Parameter substituted into endpoint_url; query merged after the URL's own.
    let r = gw.get(&c, HOST, "/prod/orders/42?page=2&x=y").await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_json(r).await["uri"], "/v1/orders/42?page=2&x=y");
    let r = gw.get(&c, HOST, "/prod/orders?page=3").await;
    assert_eq!(body_json(r).await["uri"], "/orders?src=gw&page=3");
    // Greedy keeps slashes.
    let r = gw.get(&c, HOST, "/prod/files/a/b/c.txt").await;
    assert_eq!(body_json(r).await["uri"], "/static/a/b/c.txt");
    // ANY answers what is not explicit; the explicit DELETE wins over ANY.
    let r = gw
        .req(&c, reqwest::Method::PUT, HOST, "/prod/orders/7")
        .send()
        .await
        .unwrap();
    assert_eq!(body_json(r).await["uri"], "/v1/orders/7");
    assert_eq!(b.last().method, "PUT");
    let r = gw
        .req(&c, reqwest::Method::DELETE, HOST, "/prod/orders/7")
        .send()
        .await
        .unwrap();
    assert_eq!(body_json(r).await["uri"], "/deleted/7");

    // 404s with their codes, each with a request id.
    for (host, path, code) in [
        ("nope.test", "/prod/orders", "API_NOT_FOUND"),
        (HOST, "/dev/orders", "STAGE_NOT_FOUND"),
        (HOST, "/", "STAGE_NOT_FOUND"),
        (HOST, "/prod/customers", "RESOURCE_NOT_FOUND"),
        (HOST, "/prod/orders/42/items", "RESOURCE_NOT_FOUND"),
    ] {
        let r = gw.get(&c, host, path).await;
        assert_eq!(r.status(), 404, "{host}{path}");
        let rid = r.headers()["x-scp-request-id"].to_str().unwrap().to_owned();
        let v = body_json(r).await;
        assert_eq!(v["code"], code, "{host}{path}");
        assert_eq!(v["request_id"], rid.as_str());
    }
    // Host matching ignores case, port and a trailing dot.
    let r = gw.get(&c, "API.Test.:8080", "/prod/orders").await;
    assert_eq!(r.status(), 200);

    // 405 with Allow; a resource without methods has an empty Allow.
    let r = gw
        .req(&c, reqwest::Method::PATCH, HOST, "/prod/orders")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");
    assert_eq!(body_json(r).await["code"], "METHOD_NOT_ALLOWED");
    let r = gw.get(&c, HOST, "/prod/files").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_headers_by_the_rules() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let r = client()
        .get(gw.url("/prod/orders/42"))
        .header("host", HOST)
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .header("x-scp-apikey", "the-key-value")
        .header("x_scp_apikey", "the-key-value")
        .header("x-scp-api-key-id", "forged")
        .header("x-scp-jwt-sub", "forged")
        .header("x-scp-stage", "forged")
        .header("x-forwarded-for", "198.51.100.23")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-scp-request-id"].to_str().unwrap().to_owned();
    // Hop-by-hop headers of the backend's response are not passed on.
    assert!(r
        .headers()
        .get("connection")
        .is_none_or(|v| v != "keep-alive"));
    let seen = b.last();
    let h = &seen.headers;
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "te",
        "proxy-connection",
        "x-scp-apikey",
        "x_scp_apikey",
        "x-scp-api-key-id",
        "x-scp-jwt-sub",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the backend");
    }
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-forwarded-for"], "198.51.100.23, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], HOST);
    assert_eq!(h["x-scp-stage"], "prod");
    assert_eq!(h["x-scp-api-id"], "api1");
    assert_eq!(h["x-scp-request-id"], rid.as_str());
    assert_eq!(h["host"], b.addr.to_string().as_str());
    assert!(h.contains_key("traceparent"));
    // Each header the gateway sets reaches the backend once (the ones new to the request
    // are written after the client's; a name must never be sent twice).
    for set in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-scp-stage",
        "x-scp-api-id",
        "x-scp-request-id",
        "traceparent",
    ] {
        assert_eq!(h.get_all(set).iter().count(), 1, "{set}: {h:?}");
    }

    // HTTP/2 has no Host header: the client's `:authority` is the forwarded host.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(HOST, gw.addr)
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://{HOST}:{}/prod/orders/42", gw.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let h = &b.last().headers;
    assert_eq!(
        h["x-forwarded-host"],
        format!("{HOST}:{}", gw.addr.port()).as_str()
    );
    assert_eq!(h["host"], b.addr.to_string().as_str());
    // The key value never shows up in the gateway's logs.
    assert!(!gw.log().contains("the-key-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_large_bodies_with_bounded_memory() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let c = client();
    // Warm up so the baseline includes the pools and buffers of a working gateway.
    gw.get(&c, HOST, "/prod/orders").await;
    let base_kib = gw.rss_kib();

    // 50 MiB response, read as a stream.
    let b2 = Backend::start("big").await;
    let big = SnapshotBuilder::new("api2", &["big.test"])
        .resource("/big", &[("GET", &b2.url("/big?mb=50"))])
        .build();
    let gw2 = Gateway::start(&[("api2.json", &big)], "");
    let r = gw2.get(&c, "big.test", "/prod/big").await;
    assert_eq!(r.status(), 200);
    let mut n = 0usize;
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        n += chunk.unwrap().len();
    }
    assert_eq!(n, 50 * 1024 * 1024);
    let peak2 = gw2.peak_rss_kib();

    // 9 MiB request body.
    let r = gw
        .req(&c, reqwest::Method::POST, HOST, "/prod/orders")
        .body(vec![b'y'; 9 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(body_json(r).await["body_len"], 9 * 1024 * 1024);
    let peak = gw.peak_rss_kib();
    eprintln!("gateway RSS: baseline {base_kib} KiB, peak after 9 MiB upload {peak} KiB; peak after 50 MiB download {peak2} KiB");
    assert!(
        peak < base_kib + 8 * 1024,
        "9 MiB upload grew the gateway from {base_kib} to {peak} KiB"
    );
    assert!(
        peak2 < 40 * 1024,
        "50 MiB download: gateway peak RSS {peak2} KiB"
    );

    // 11 MiB chunked body: 413 while streaming.
    let chunks = futures_util::stream::iter(
        (0..11).map(|_| Ok::<_, std::io::Error>(vec![b'z'; 1024 * 1024])),
    );
    let r = gw
        .req(&c, reqwest::Method::POST, HOST, "/prod/orders")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(body_json(r).await["code"], "PAYLOAD_TOO_LARGE");
    // A declared Content-Length over the limit is refused before any byte is forwarded.
    let answer = raw(
        gw.addr,
        format!("POST /prod/orders?marker=cl-over-limit HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 11534336\r\n\r\n").as_bytes(),
    );
    assert_eq!(raw_status(&answer), 413);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !b.seen().iter().any(|s| s.uri.contains("cl-over-limit")),
        "nothing was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failures_map_to_502_and_504() {
    let b = Backend::start("b").await;
    let dead_port = dead_port();
    let dead = format!("http://127.0.0.1:{}/x", dead_port.port);
    let doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/dead", &[("GET", &dead)])
        .resource("/slow", &[("GET", &b.url("/slow?ms=1500"))])
        .resource("/quick", &[("GET", &b.url("/slow?ms=10"))])
        .stage(|s| s["integration_timeout_ms"] = json!(300))
        .build();
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let r = gw.get(&c, HOST, "/prod/dead").await;
    assert_eq!(r.status(), 502);
    assert_eq!(body_json(r).await["code"], "INTEGRATION_FAILURE");
    let t = std::time::Instant::now();
    let r = gw.get(&c, HOST, "/prod/slow").await;
    assert_eq!(r.status(), 504);
    assert_eq!(body_json(r).await["code"], "INTEGRATION_TIMEOUT");
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "the stage timeout cut the wait"
    );
    let r = gw.get(&c, HOST, "/prod/quick").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_ambiguous_requests_with_400() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let cases: &[(&str, String)] = &[
        ("dot-dot above the stage", format!("GET /prod/../other/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n")),
        ("encoded dot-dot above the stage", format!("GET /prod/%2e%2e/%2E%2E/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n")),
        ("encoded slash", format!("GET /prod/orders%2F42 HTTP/1.1\r\nHost: {HOST}\r\n\r\n")),
        ("encoded backslash", format!("GET /prod/orders%5C42 HTTP/1.1\r\nHost: {HOST}\r\n\r\n")),
        (
            "CL + TE",
            format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE + CL (hyper keeps only TE in the parsed head)",
            format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE not exactly chunked",
            format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "conflicting Content-Length",
            format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
        ),
        ("absolute URI with another host", format!("GET http://evil.test/prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n")),
    ];
    for (what, req) in cases {
        let answer = raw(gw.addr, req.as_bytes());
        assert_eq!(raw_status(&answer), 400, "{what}: {answer}");
    }
    assert!(
        b.seen().is_empty(),
        "nothing ambiguous reached the backend: {:?}",
        b.seen()
    );
    // `..` inside the resource path resolves and is what gets matched and forwarded.
    let answer = raw(
        gw.addr,
        format!(
            "GET /prod/files/x/../orders/./7 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert_eq!(b.last().uri, "/static/orders/7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_follows_its_percentage() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    let mut sb = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &stable.url("/orders"))]);
    sb.doc["deployments"].as_array_mut().unwrap().push(json!({
        "deployment_id": "d2",
        "resources": [ { "id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": [] } ]
    }));
    sb.resource_in("d2", "/orders", &[("GET", &canary.url("/orders"))]);
    let doc = sb
        .stage(|s| s["canary"] = json!({ "deployment_id": "d2", "percent": 30 }))
        .build();
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let total = 2000;
    let mut canary_hits = 0;
    for _ in 0..total {
        let r = gw.get(&c, HOST, "/prod/orders").await;
        assert_eq!(r.status(), 200);
        if r.headers()["x-backend"] == "canary" {
            canary_hits += 1;
        }
    }
    let pct = canary_hits as f64 * 100.0 / total as f64;
    eprintln!("canary share: {pct:.1}% of {total}");
    assert!(
        (25.0..=35.0).contains(&pct),
        "canary share {pct}% not within 30 ± 5%"
    );
    assert_eq!(canary.seen().len() + stable.seen().len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_with_spec_labels() {
    let b = Backend::start("b").await;
    let dead_port = dead_port();
    let dead = format!("http://127.0.0.1:{}/x", dead_port.port);
    let doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .resource("/dead", &[("GET", &dead)])
        .build();
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    for (host, path, times) in [
        (HOST, "/prod/orders", 3),
        (HOST, "/prod/dead", 1),
        (HOST, "/prod/nothing", 1),
        (HOST, "/nostage/x", 1),
        ("unknown.test", "/prod/orders", 1),
    ] {
        for _ in 0..times {
            gw.get(&c, host, path).await;
        }
    }
    let m = gw.metrics().await;
    for line in [
        r#"apigw_requests_total{api_id="api1",method="GET",resource="/orders",stage="prod",status_class="2xx"} 3"#,
        r#"apigw_requests_total{api_id="api1",method="GET",resource="/dead",stage="prod",status_class="5xx"} 1"#,
        r#"apigw_requests_total{api_id="api1",method="GET",resource="",stage="prod",status_class="4xx"} 1"#,
        r#"apigw_requests_total{api_id="api1",method="GET",resource="",stage="",status_class="4xx"} 1"#,
        r#"apigw_requests_total{api_id="",method="GET",resource="",stage="",status_class="4xx"} 1"#,
        r#"apigw_rejections_total{api_id="api1",code="INTEGRATION_FAILURE",stage="prod"} 1"#,
        r#"apigw_rejections_total{api_id="api1",code="RESOURCE_NOT_FOUND",stage="prod"} 1"#,
        r#"apigw_rejections_total{api_id="api1",code="STAGE_NOT_FOUND",stage=""} 1"#,
        r#"apigw_rejections_total{api_id="",code="API_NOT_FOUND",stage=""} 1"#,
        r#"apigw_request_duration_seconds_count{api_id="api1",stage="prod"} 5"#,
        r#"apigw_integration_duration_seconds_count{api_id="api1",integration="HTTP",stage="prod"} 4"#,
        r#"apigw_snapshot_revision{api_id="api1"} 1"#,
        r#"apigw_snapshot_reloads_total{result="loaded"} 1"#,
    ] {
        assert!(m.contains(line), "missing `{line}` in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_admin_endpoints() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let (status, headers, body) = h2c_get(gw.addr, &format!("http://{HOST}/prod/orders/9")).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-scp-request-id"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["uri"], "/v1/orders/9");
    // An HTTP/2 request whose Host header contradicts :authority is malformed (RFC 9113 8.3.1).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(gw.url("/prod/orders/9"))
        .header("host", HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 400);

    let admin = |p: &str| format!("http://{}{p}", gw.admin);
    assert_eq!(reqwest::get(admin("/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(admin("/readyz")).await.unwrap().status(), 200);
    let v: Value = reqwest::get(admin("/admin/apis"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let apis = v["apis"].as_array().unwrap();
    assert_eq!(apis.len(), 1);
    assert_eq!(apis[0]["api_id"], "api1");
    assert_eq!(apis[0]["revision"], 1);
    assert_eq!(apis[0]["hosts"], json!([HOST]));
    assert_eq!(apis[0]["stages"], json!(["prod"]));
    assert!(apis[0]["loaded_at"].as_str().unwrap().starts_with("20"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_snapshot_file_is_skipped_and_others_load() {
    let b = Backend::start("b").await;
    let good = routing_api(&b);
    let mut bad = SnapshotBuilder::new("api2", &["bad.test"]).build();
    bad["format"] = json!("scp-apigw.snapshot/v2");
    let gw = Gateway::start(&[("a-bad.json", &bad), ("b-good.json", &good)], "");
    let c = client();
    let r = gw.get(&c, HOST, "/prod/orders").await;
    assert_eq!(r.status(), 200);
    let r = gw.get(&c, "bad.test", "/prod/orders").await;
    assert_eq!(r.status(), 404);
    let log = gw.log();
    assert!(
        log.contains("a-bad.json") && log.contains("format"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_head_timeouts_close_connections() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &routing_api(&b))],
        "[limits]\nidle_timeout = \"1500ms\"\nhead_read_timeout = \"500ms\"\n",
    );
    use std::io::{Read, Write};
    // A partial head is cut after the head timeout.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /prod/orders HTTP/1.1\r\nHo").unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );

    // An idle keep-alive connection survives the head timeout but not the idle timeout.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(900));
    s.write_all(req.as_bytes()).unwrap();
    let n = s.read(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "still open after 900 ms idle"
    );
    let t = std::time::Instant::now();
    // An error here is the client's 5 s read timeout: the gateway never closed.
    let n = s
        .read(&mut first)
        .expect("the gateway closes the idle connection");
    assert_eq!(n, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "closed after the idle timeout, not before: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_uri_limits() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    // 101 headers → 431.
    let mut req = format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n");
    for i in 0..100 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes())), 431);
    // A 17 KiB head → 431.
    let big = "v".repeat(17 * 1024);
    let req = format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nx-big: {big}\r\n\r\n");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes())), 431);
    // A 9 KiB URI → 414, with the JSON body.
    let long = "a".repeat(9 * 1024);
    let answer = raw(
        gw.addr,
        format!("GET /prod/orders?q={long} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(raw_status(&answer), 414);
    assert!(answer.contains("URI_TOO_LONG"), "{answer}");
    // A 7 KiB URI and 92 headers pass (the test backend, like hyper by default, takes at most
    // 100 headers, and the gateway adds 8).
    let mut req = format!(
        "GET /prod/orders?q={} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n",
        "a".repeat(7 * 1024)
    );
    for i in 0..90 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let answer = raw(gw.addr, req.as_bytes());
    assert_eq!(
        raw_status(&answer),
        200,
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(answer.contains("x-backend: b"));
    assert!(b.seen().iter().all(|s| !s.headers.contains_key("x-big")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_with_an_extra_ca_and_h2() {
    let (addr, ca_pem, _task) = tls_backend().await;
    let url = format!("https://localhost:{}/secure/{{item-id}}", addr.port());
    let doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/items", &[])
        .resource("/items/{item-id}", &[("GET", &url)])
        .build();
    // Without the CA the backend's certificate is not trusted: 502.
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let r = gw.get(&client(), HOST, "/prod/items/5").await;
    assert_eq!(r.status(), 502);
    assert_eq!(body_json(r).await["code"], "INTEGRATION_FAILURE");
    drop(gw);
    // With upstream.extra_ca_file the call succeeds, over HTTP/2 (ALPN).
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        &format!("[upstream]\nextra_ca_file = {:?}\n", ca_path),
    );
    let r = gw.get(&client(), HOST, "/prod/items/5").await;
    assert_eq!(r.status(), 200);
    let v = body_json(r).await;
    // Over HTTP/2 the backend sees the absolute URI (scheme and authority from the URL).
    assert!(v["uri"].as_str().unwrap().ends_with("/secure/5"), "{v}");
    assert_eq!(v["version"], "HTTP/2.0");
    // The headers the gateway adds reach an HTTP/2 backend too, once each (they travel in
    // the request's map there, not after it as for a plain `http` backend).
    let h = &v["headers"];
    assert_eq!(h["x-scp-stage"], serde_json::json!(["prod"]), "{v}");
    assert_eq!(h["x-scp-api-id"], serde_json::json!(["api1"]), "{v}");
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]), "{v}");
    assert_eq!(
        h["x-forwarded-for"],
        serde_json::json!(["127.0.0.1"]),
        "{v}"
    );
    assert_eq!(h["x-forwarded-host"], serde_json::json!([HOST]), "{v}");
    assert_eq!(
        h["x-scp-request-id"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    assert_eq!(h["traceparent"].as_array().map(Vec::len), Some(1), "{v}");
}

/// The `Date` of the gateway's own answers is the current second, on a connection that
/// stays open across seconds (hyper's date cache, brought up to date as each answer is
/// written: `vendor/hyper/PATCHED.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_the_current_date() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &routing_api(&b))], "");
    let c = client();
    let date_of = |r: &reqwest::Response| {
        let v = r.headers()["date"].to_str().unwrap().to_owned();
        httpdate::parse_http_date(&v).unwrap_or_else(|e| panic!("Date {v:?}: {e}"))
    };
    let near_now = |d: std::time::SystemTime| {
        let now = std::time::SystemTime::now();
        // The Date has whole seconds: it may be up to a second behind now.
        d <= now && now.duration_since(d).unwrap() < Duration::from_secs(2)
    };
    let first = gw.get(&c, HOST, "/prod/customers").await;
    assert_eq!(first.status(), 404);
    let d1 = date_of(&first);
    assert!(near_now(d1), "{d1:?}");
    // The same keep-alive connection, seconds later.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = gw.get(&c, HOST, "/prod/customers").await;
    let d2 = date_of(&second);
    assert!(near_now(d2), "{d2:?}");
    assert!(d2 > d1, "the Date did not move: {d1:?} then {d2:?}");
}
