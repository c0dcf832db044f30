//! Issue 5 "done when": a known traffic mix through the real gateway, then the reports API,
//! /metrics, the usage API and the access log tell the same story; counts survive a restart.

mod common;

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";

fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

async fn v1(gw: &Gateway, path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("http://{}{path}", gw.admin))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Sum of `apigw_requests_total` samples of (api, stage) with a status class.
fn metric_sum(metrics: &str, stage: &str, class: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apigw_requests_total{"))
        .filter(|l| {
            l.contains(r#"api_id="api1""#)
                && l.contains(&format!(r#"stage="{stage}""#))
                && l.contains(&format!(r#"status_class="{class}""#))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_usage_metrics_and_access_log_agree() {
    let b = Backend::start("b").await;
    let dead_port = dead_port();
    let dead = format!("http://127.0.0.1:{}/x", dead_port.port);
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/slow?ms=20"))])
        .resource("/items", &[("GET", &b.url("/items"))])
        .resource("/users", &[])
        .resource("/users/{user-id}", &[("GET", &b.url("/users/{user-id}"))])
        .resource("/health", &[("GET", &b.url("/health"))])
        .resource("/misc", &[("GET", &b.url("/misc"))])
        .resource("/limited", &[("GET", &b.url("/limited"))])
        .resource("/dead", &[("GET", &dead)])
        .build();
    let resources = doc["deployments"][0]["resources"].as_array_mut().unwrap();
    let limited = resources
        .iter_mut()
        .find(|r| r["path"] == "/limited")
        .unwrap();
    limited["methods"][0]["api_key_required"] = json!(true);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["stages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "slow", "deployment_id": "d1"}));
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 5, "rate": "day", "api_keys": [
        {"id": "k1", "name": "one", "key": "key-one-value"}, {"id": "k2", "name": "two", "key": "key-two-value"}]}]);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    write_json(&dir.path().join("snapshots/api1.json"), &doc);
    let extra = format!("[access_log]\nenabled = true\npath = {:?}\n", log_path);
    let gw = Gateway::start_with_args(dir, &extra, &[]);
    let c = client();

    // The mix: 300 × 2xx, 40 × 404, 25 × 429, 10 × 502 on stage prod.
    let mut plan: Vec<(&str, usize, Option<&str>)> = vec![
        ("/prod/orders", 150, None),
        ("/prod/items", 80, None),
        ("/prod/users/7", 40, None),
        ("/prod/health", 20, None),
        ("/prod/misc", 5, None),
        ("/prod/limited", 30, Some("key-one-value")), // 5 admitted, 25 × 429
        ("/prod/nothing", 40, None),                  // 404
        ("/prod/dead", 10, None),                     // 502
        ("/slow/orders", 20, None),                   // another stage, 20 ms backend
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for (path, n, key) in plan.drain(..) {
        for _ in 0..n {
            let mut r = gw.req(&c, reqwest::Method::GET, HOST, path);
            if let Some(k) = key {
                r = r.header("x-scp-apikey", k);
            }
            *statuses
                .entry(r.send().await.unwrap().status().as_u16())
                .or_insert(0) += 1;
        }
    }
    assert_eq!(
        statuses,
        [(200, 320), (404, 40), (429, 25), (502, 10)]
            .into_iter()
            .collect()
    );

    // Reports, within 2 s of the responses.
    let path = format!(
        "/v1/apis/api1/reports?stage_name=prod&start_date={}&end_date={}",
        today(),
        today()
    );
    let (status, rep) = v1(&gw, &path).await;
    assert_eq!(status, 200, "{rep}");
    assert_eq!(rep["count"], 1);
    let day = &rep["reports"][0];
    assert_eq!(day["date"], today());
    assert_eq!(
        (
            day["call_count"].as_u64(),
            day["error_4xx_count"].as_u64(),
            day["error_5xx_count"].as_u64()
        ),
        (Some(300), Some(65), Some(10))
    );
    let top: Vec<(String, String, String, u64)> = rep["top_resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["path"].as_str().unwrap().into(),
                t["type"].as_str().unwrap().into(),
                t["call_count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        top,
        vec![
            ("orders".into(), "/orders".into(), "GET".into(), 150),
            ("items".into(), "/items".into(), "GET".into(), 80),
            (
                "{user-id}".into(),
                "/users/{user-id}".into(),
                "GET".into(),
                40
            ),
            ("health".into(), "/health".into(), "GET".into(), 20),
            ("limited".into(), "/limited".into(), "GET".into(), 5),
        ]
    );
    let (_, slow) = v1(
        &gw,
        &format!(
            "/v1/apis/api1/reports?stage_name=slow&start_date={}&end_date={}",
            today(),
            today()
        ),
    )
    .await;
    let s = &slow["reports"][0];
    assert_eq!(s["call_count"], 20);
    let p50 = s["integration_latency"]["p50_ms"].as_f64().unwrap();
    assert!(
        (20.0 * 0.99..200.0).contains(&p50),
        "integration p50 {p50} ms for a 20 ms backend: {s}"
    );
    assert!(
        s["latency"]["p50_ms"].as_f64().unwrap() >= p50 * 0.99,
        "request latency includes the integration"
    );
    assert!(s["latency"]["max_ms"].as_f64().unwrap() >= s["latency"]["p99_ms"].as_f64().unwrap());

    // /metrics tells the same counts.
    let m = gw.metrics().await;
    assert_eq!(
        (
            metric_sum(&m, "prod", "2xx"),
            metric_sum(&m, "prod", "4xx"),
            metric_sum(&m, "prod", "5xx")
        ),
        (300, 65, 10)
    );

    // Usage per key per day.
    let (status, usage) = v1(
        &gw,
        &format!(
            "/v1/apis/api1/usage-plans/up1/usage?start_date={}&end_date={}",
            today(),
            today()
        ),
    )
    .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["items"]["k1"], json!([[5, 0]]));
    assert_eq!(usage["items"]["k2"], json!([[0, 5]]));
    let (_, one) = v1(
        &gw,
        &format!(
            "/v1/apis/api1/usage-plans/up1/usage?start_date={}&end_date={}&key_id=k2",
            today(),
            today()
        ),
    )
    .await;
    assert_eq!(one["items"], json!({"k2": [[0, 5]]}));
    assert_eq!(
        v1(
            &gw,
            "/v1/apis/api1/usage-plans/nope/usage?start_date=2026-01-01&end_date=2026-01-02"
        )
        .await
        .0,
        404
    );

    // Bad periods are 400s.
    for q in [
        "stage_name=prod&start_date=2026-01-01",
        "stage_name=prod&start_date=2026-13-01&end_date=2026-01-02",
        "stage_name=prod&start_date=2026-01-10&end_date=2026-01-01",
        "stage_name=prod&start_date=2026-01-01&end_date=2026-03-01",
        "start_date=2026-01-01&end_date=2026-01-02",
    ] {
        let (status, body) = v1(&gw, &format!("/v1/apis/api1/reports?{q}")).await;
        assert_eq!(status, 400, "{q}: {body}");
    }

    // The access log: one JSON line per request, no key values.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 395);
    assert!(!log.contains("key-one-value"));
    let limited_429 = lines.iter().find(|l| l["status"] == 429).unwrap();
    for field in [
        "time",
        "request_id",
        "client_ip",
        "api_id",
        "stage",
        "resource",
        "method",
        "latency_ms",
    ] {
        assert!(!limited_429[field].is_null(), "{field} in {limited_429}");
    }
    assert_eq!(limited_429["error_code"], "QUOTA_EXCEEDED");
    assert!(lines
        .iter()
        .any(|l| l["resource"] == "/users/{user-id}" && l["integration_latency_ms"].is_number()));

    // Counts survive a restart.
    let (exit, dir) = gw.terminate();
    assert!(exit.success());
    let gw = Gateway::start_in(dir, &extra);
    let (_, again) = v1(&gw, &path).await;
    assert_eq!(again["reports"][0]["call_count"], 300);
    assert_eq!(again["top_resources"], rep["top_resources"]);
    let (_, usage) = v1(
        &gw,
        &format!(
            "/v1/apis/api1/usage-plans/up1/usage?start_date={}&end_date={}",
            today(),
            today()
        ),
    )
    .await;
    assert_eq!(usage["items"]["k1"], json!([[5, 0]]));
}

/// Issue 13, item 3: every kind of aggregate (no resource, no method, preflight, refusals,
/// 2xx) is in the reports after a graceful restart, latency summaries included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_aggregate_survives_a_graceful_restart() {
    let b = Backend::start("b").await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .resource("/postonly", &[("POST", &b.url("/p"))])
        .resource("/keyed", &[("GET", &b.url("/k"))])
        .stage(|s| {
            s["cors_enabled"] = json!(true);
            s["allow_origins"] = json!(["https://app.example"]);
            s["allow_methods"] = json!(["GET"]);
            s["usage_plan_id"] = json!("up1");
        })
        .build();
    doc["deployments"][0]["resources"][3]["methods"][0]["api_key_required"] = json!(true);
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 1, "rate": "day",
        "api_keys": [{"id": "k1", "name": "one", "key": "key-one-value"}]}]);
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let mut statuses = Vec::new();
    let send = |r: reqwest::RequestBuilder| {
        let r = r.send();
        async { r.await.unwrap().status().as_u16() }
    };
    for _ in 0..3 {
        statuses.push(send(gw.req(&c, reqwest::Method::GET, HOST, "/prod/orders")).await);
    }
    for _ in 0..5 {
        statuses.push(send(gw.req(&c, reqwest::Method::GET, HOST, "/prod/nope")).await);
    }
    for _ in 0..2 {
        statuses.push(send(gw.req(&c, reqwest::Method::GET, HOST, "/prod/postonly")).await);
    }
    for _ in 0..2 {
        let r = gw
            .req(&c, reqwest::Method::OPTIONS, HOST, "/prod/orders")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET");
        statuses.push(send(r).await);
    }
    statuses.push(send(gw.req(&c, reqwest::Method::GET, HOST, "/prod/keyed")).await);
    for _ in 0..2 {
        let r = gw
            .req(&c, reqwest::Method::GET, HOST, "/prod/keyed")
            .header("x-scp-apikey", "key-one-value");
        statuses.push(send(r).await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 404, 404, 404, 404, 404, 405, 405, 204, 204, 403, 200, 429]
    );
    let path = format!(
        "/v1/apis/api1/reports?stage_name=prod&start_date={}&end_date={}",
        today(),
        today()
    );
    let (status, before) = v1(&gw, &path).await;
    assert_eq!(status, 200, "{before}");
    let day = &before["reports"][0];
    assert_eq!(
        (
            day["call_count"].as_u64(),
            day["error_4xx_count"].as_u64(),
            day["error_5xx_count"].as_u64()
        ),
        (Some(6), Some(9), Some(0)),
        "{before}"
    );
    let (exit, dir) = gw.terminate();
    assert!(exit.success());
    let gw = Gateway::start_in(dir, "");
    let (_, after) = v1(&gw, &path).await;
    assert_eq!(after, before, "the same report after a graceful restart");
    assert!(
        !gw.log().contains("unreadable"),
        "every aggregate was read back: {}",
        gw.log()
    );
}

/// Issue 13, item 4: reports of an API or stage that is not loaded are 404s, not an empty
/// list that reads as "no traffic".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_unknown_apis_and_stages_are_404() {
    let b = Backend::start("b").await;
    let doc = orders_api(&b).build();
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let q = |api: &str, stage: &str| {
        format!(
            "/v1/apis/{api}/reports?stage_name={stage}&start_date={}&end_date={}",
            today(),
            today()
        )
    };
    let (status, body) = v1(&gw, &q("api1", "prod")).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(0)), "{body}");
    let (status, body) = v1(&gw, &q("api1", "nope")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("STAGE_NOT_FOUND"))
    );
    let (status, body) = v1(&gw, &q("nope", "prod")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("API_NOT_FOUND"))
    );
}
