//! Issue 4 "done when": hot reload through the admin API, the directory and SIGHUP, with
//! no failed request while snapshots swap; graceful shutdown.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";

fn api(revision: u64, backend: &Backend) -> Value {
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/items", &[("GET", &backend.url("/items"))])
        .build();
    doc["revision"] = json!(revision);
    doc
}

async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut r = client().request(method, format!("http://{}{path}", gw.admin));
    if let Some(b) = body {
        r = r.body(serde_json::to_vec(b).unwrap());
    }
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn put(gw: &Gateway, id: &str, doc: &Value) -> (u16, Value) {
    admin(
        gw,
        reqwest::Method::PUT,
        &format!("/admin/apis/{id}"),
        Some(doc),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_statuses_persistence_and_redaction() {
    let a = Backend::start("a").await;
    let gw = Gateway::start(&[], "");
    let c = client();
    assert_eq!(gw.get(&c, HOST, "/prod/items").await.status(), 404);

    let mut doc = api(1, &a);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 10, "rate": "day", "api_keys": [{"id": "k1", "name": "k", "key": "secret-key-value"}]}]);
    doc["auths"] = json!([{"id": "au1", "name": "a", "connected_stages": ["prod"], "verification": {"alg": "HS256", "secret_base64": "c2VjcmV0LXNlY3JldC1zZWNyZXQ="}},
                          {"id": "au2", "name": "b", "connected_stages": [], "verification": {"jwks": {"keys": [{"kty": "oct", "kid": "o1", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldA"}]}}}]);
    assert_eq!(
        put(&gw, "api1", &doc).await,
        (200, json!({"api_id": "api1", "revision": 1}))
    );
    assert_eq!(gw.get(&c, HOST, "/prod/items").await.status(), 200);
    assert!(
        gw.snapshot_dir().join("api1.json").exists(),
        "pushed snapshots are persisted"
    );
    let (status, shown) = admin(&gw, reqwest::Method::GET, "/admin/apis/api1", None, None).await;
    assert_eq!(status, 200);
    let text = shown.to_string();
    for secret in [
        "secret-key-value",
        "c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
        "c2VjcmV0LXNlY3JldA",
        "key_sha256",
        "secret_base64",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(shown["usage_plans"][0]["api_keys"][0]["id"], "k1");

    // 409: equal or older revision; 422: id mismatch; 400: invalid, with JSON paths.
    assert_eq!(put(&gw, "api1", &doc).await.0, 409);
    let (status, body) = put(&gw, "other", &doc).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("API_ID_MISMATCH"))
    );
    let mut bad = api(2, &a);
    bad["deployments"][0]["resources"][1]["methods"][0]["endpoint_url"] = json!("http://x/{nope}");
    let (status, body) = put(&gw, "api1", &bad).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["errors"][0]["path"],
        "deployments[0].resources[1].methods[0].endpoint_url"
    );
    let (status, _) = admin(
        &gw,
        reqwest::Method::PUT,
        "/admin/apis/api1",
        Some(&json!("not a snapshot")),
        None,
    )
    .await;
    assert_eq!(status, 400);
    // 400: a host held by another API.
    let mut other = SnapshotBuilder::new("api2", &[HOST, "b.test"]).build();
    other["revision"] = json!(1);
    let (status, body) = put(&gw, "api2", &other).await;
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("api1"),
        "{body}"
    );
    assert!(
        !gw.snapshot_dir().join("api2.json").exists(),
        "a refused push is not persisted"
    );
    assert_eq!(
        gw.get(&c, HOST, "/prod/items").await.status(),
        200,
        "the old snapshot keeps serving"
    );

    // DELETE unloads and removes the file; 404 when unknown.
    assert_eq!(
        admin(&gw, reqwest::Method::DELETE, "/admin/apis/api1", None, None).await,
        (200, json!({"api_id": "api1"}))
    );
    assert_eq!(
        admin(&gw, reqwest::Method::DELETE, "/admin/apis/api1", None, None)
            .await
            .0,
        404
    );
    assert_eq!(
        admin(&gw, reqwest::Method::GET, "/admin/apis/api1", None, None)
            .await
            .0,
        404
    );
    assert!(!gw.snapshot_dir().join("api1.json").exists());
    let r = gw.get(&c, HOST, "/prod/items").await;
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "API_NOT_FOUND");
    let m = gw.metrics().await;
    for line in [
        r#"apigw_snapshot_reloads_total{result="loaded"} 1"#,
        r#"apigw_snapshot_reloads_total{result="rejected"} 5"#,
        r#"apigw_snapshot_reloads_total{result="unloaded"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
    assert!(
        !m.contains(r#"apigw_snapshot_revision{api_id="api1"}"#),
        "unloaded APIs leave the gauge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_admin_and_v1() {
    let gw = Gateway::start(&[], "[admin]\ntoken = \"s3cret-admin-token\"\n");
    assert_eq!(
        admin(&gw, reqwest::Method::GET, "/admin/apis", None, None)
            .await
            .0,
        401
    );
    let (status, body) = admin(
        &gw,
        reqwest::Method::GET,
        "/admin/apis",
        None,
        Some("wrong"),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("UNAUTHORIZED")));
    assert_eq!(
        admin(&gw, reqwest::Method::GET, "/v1/apis/x/reports", None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        admin(
            &gw,
            reqwest::Method::GET,
            "/admin/apis",
            None,
            Some("s3cret-admin-token")
        )
        .await
        .0,
        200
    );
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            reqwest::get(format!("http://{}{open}", gw.admin))
                .await
                .unwrap()
                .status(),
            200,
            "{open}"
        );
    }
    assert!(!gw.log().contains("s3cret-admin-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_while_swapping_every_50ms() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let never = Backend::start("never").await;
    let gw = Arc::new(Gateway::start(&[("api1.json", &api(1, &a))], ""));
    let total = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Swaps done so far: the load goes on until both the request target and 20 swaps are
    // reached, whatever the machine's speed (no timing assumption).
    let swaps = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    const TARGET: usize = 20_000;

    let mut workers = Vec::new();
    for _ in 0..8 {
        let (gw, total, failures, swaps, sent) = (
            gw.clone(),
            total.clone(),
            failures.clone(),
            swaps.clone(),
            sent.clone(),
        );
        workers.push(tokio::spawn(async move {
            // One keep-alive connection per worker.
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            while total.fetch_add(1, Ordering::Relaxed) < TARGET
                || swaps.load(Ordering::Relaxed) < 20
            {
                sent.fetch_add(1, Ordering::Relaxed);
                match c
                    .get(gw.url("/prod/items"))
                    .header("host", HOST)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        eprintln!("non-2xx during reload: {}", r.status());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("failed during reload: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let pusher = {
        let (gw, done, swaps) = (gw.clone(), done.clone(), swaps.clone());
        let (a_url, b_url, never_url) = (a.url("/items"), b.url("/items"), never.url("/items"));
        tokio::spawn(async move {
            let (mut ok, mut rejected, mut revision) = (0, 0, 1u64);
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                let mut doc = SnapshotBuilder::new("api1", &[HOST])
                    .resource(
                        "/items",
                        &[("GET", if i % 2 == 0 { &a_url } else { &b_url })],
                    )
                    .build();
                if i % 10 == 0 {
                    // Invalid: points at `never`, with a placeholder naming no parameter.
                    doc["deployments"][0]["resources"][1]["methods"][0]["endpoint_url"] =
                        json!(format!("{never_url}/{{nope}}"));
                    doc["revision"] = json!(revision + 1);
                    let (status, _) = put(&gw, "api1", &doc).await;
                    assert_eq!(status, 400);
                    rejected += 1;
                } else {
                    revision += 1;
                    doc["revision"] = json!(revision);
                    let (status, body) = put(&gw, "api1", &doc).await;
                    assert_eq!(status, 200, "{body}");
                    ok += 1;
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, rejected)
        })
    };
    let started = Instant::now();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (ok, rejected) = pusher.await.unwrap();
    let (seen_a, seen_b) = (a.seen().len(), b.seen().len());
    let sent = sent.load(Ordering::Relaxed);
    eprintln!("{sent} requests in {elapsed:?} during {ok} swaps and {rejected} rejected pushes; backend a {seen_a}, b {seen_b}");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(
        ok >= 20,
        "at least 20 swaps happened during the load ({ok})"
    );
    assert!(rejected >= 2);
    assert!(seen_a > 0 && seen_b > 0, "both backends observed");
    assert!(sent >= TARGET);
    assert_eq!(seen_a + seen_b, sent, "every request reached one backend");
    assert!(
        never.seen().is_empty(),
        "an invalid snapshot is never served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_watch_restart_and_removal() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[], "");
    let c = client();
    // A file written into the directory (temporary name, then rename) is served within 2 s.
    let dir = gw.snapshot_dir();
    write_json(&dir.join(".orders.json.tmp"), &api(1, &a));
    let t = Instant::now();
    std::fs::rename(dir.join(".orders.json.tmp"), dir.join("orders.json")).unwrap();
    let took = eventually(Duration::from_secs(2), async || {
        gw.get(&c, HOST, "/prod/items").await.status() == 200
    })
    .await;
    assert!(took.is_some(), "served within 2 s");
    eprintln!("file picked up after {:?}", t.elapsed());
    // Rewritten in place with a newer revision: the new backend serves.
    write_json(&dir.join("orders.json"), &api(2, &b));
    let switched = eventually(Duration::from_secs(2), async || {
        gw.get(&c, HOST, "/prod/items")
            .await
            .headers()
            .get("x-backend")
            .is_some_and(|v| v == "b")
    })
    .await;
    assert!(switched.is_some());
    // An older revision in the file is rejected and the loaded one keeps serving.
    write_json(&dir.join("orders.json"), &api(1, &a));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        gw.get(&c, HOST, "/prod/items").await.headers()["x-backend"],
        "b"
    );
    // A push goes into the file the API came from, and survives a restart.
    assert_eq!(put(&gw, "api1", &api(5, &a)).await.0, 200);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "one file per API"
    );
    let (status, tmp) = gw.terminate();
    assert!(status.success());
    let gw = Gateway::start_in(tmp, "");
    let r = gw.get(&c, HOST, "/prod/items").await;
    assert_eq!(r.headers()["x-backend"], "a");
    let (_, apis) = admin(&gw, reqwest::Method::GET, "/admin/apis", None, None).await;
    assert_eq!(apis["apis"][0]["revision"], 5);
    // A removed file unloads its API.
    std::fs::remove_file(gw.snapshot_dir().join("orders.json")).unwrap();
    let gone = eventually(Duration::from_secs(2), async || {
        gw.get(&c, HOST, "/prod/items").await.status() == 404
    })
    .await;
    assert!(gone.is_some(), "unloaded within 2 s");
    let r = gw.get(&c, HOST, "/prod/items").await;
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "API_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_when_watch_is_off() {
    let a = Backend::start("a").await;
    let gw = Gateway::start(&[], "[snapshots]\nwatch = false\n");
    let c = client();
    write_json(&gw.snapshot_dir().join("api1.json"), &api(1, &a));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        gw.get(&c, HOST, "/prod/items").await.status(),
        404,
        "not watched"
    );
    gw.signal("HUP");
    let loaded = eventually(Duration::from_secs(2), async || {
        gw.get(&c, HOST, "/prod/items").await.status() == 200
    })
    .await;
    assert!(loaded.is_some(), "SIGHUP re-reads the directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let a = Backend::start("a").await;
    let doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/slow", &[("GET", &a.url("/slow?ms=2000"))])
        .build();
    let gw = Gateway::start(&[("api1.json", &doc)], "[server]\ndrain_timeout = \"8s\"\n");
    let url = gw.url("/prod/slow");
    let mut inflight = Vec::new();
    for _ in 0..20 {
        let url = url.clone();
        inflight.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let r = c.get(url).header("host", HOST).send().await.unwrap();
            let close = r
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), close, r.text().await.is_ok())
        }));
    }
    // Let every request reach the backend, then stop the gateway.
    let reached = eventually(Duration::from_secs(2), async || a.seen().len() == 20).await;
    assert!(reached.is_some());
    let data_addr = gw.addr;
    let t = Instant::now();
    gw.signal("TERM");
    // Readiness turns 503 and new connections are refused once the listeners close.
    let refused = eventually(Duration::from_secs(1), async || {
        std::net::TcpStream::connect(data_addr).is_err()
    })
    .await;
    assert!(refused.is_some(), "new connections refused while draining");
    for t in inflight {
        let (status, close, body_ok) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(body_ok);
        assert_eq!(
            close.as_deref(),
            Some("close"),
            "HTTP/1.1 responses while draining carry Connection: close"
        );
    }
    let (status, _) = gw.wait_exit();
    assert!(status.success(), "exit 0: {status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "exited before the drain deadline ({:?})",
        t.elapsed()
    );
}

/// 10,000 reloads of a 300-resource snapshot: resident memory after the last is within 5% of
/// what it was after the first fifth. The baseline comes after a warm-up: the allocator's
/// arenas and caches settle over the first ~2,000 (a release build grew 10.8% from the
/// 100th reload to the 2,000th, then 0.1–0.7% to the 10,000th). A leak of 160 bytes per
/// reload, put in to check this test, showed as +6.8% over the last 8,000 and failed it.
/// Set `RELOAD_SOAK=N` for another count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reloads_do_not_grow_memory() {
    let a = Backend::start("a").await;
    let count: u64 = std::env::var("RELOAD_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut sb = SnapshotBuilder::new("api1", &[HOST]);
    for i in 0..99 {
        sb = sb.resource(&format!("/col{i:03}"), &[("GET", &a.url("/c"))]);
        sb = sb.resource(
            &format!("/col{i:03}/{{item-id}}"),
            &[
                ("GET", &a.url("/c/{item-id}")),
                ("DELETE", &a.url("/c/{item-id}")),
            ],
        );
        sb = sb.resource(
            &format!("/col{i:03}/{{item-id}}/details"),
            &[("GET", &a.url("/c/{item-id}/d"))],
        );
    }
    let mut doc = sb.build();
    let n = doc["deployments"][0]["resources"].as_array().unwrap().len();
    assert!((298..=300).contains(&n), "{n} resources");
    let gw = Gateway::start(&[], "");
    // Serialised once; each push only swaps the revision digits.
    doc["revision"] = json!(123456789);
    let template = serde_json::to_string(&doc).unwrap();
    let c = reqwest::Client::new();
    let put_url = format!("http://{}/admin/apis/api1", gw.admin);
    let warm = (count / 5).max(1);
    let mut after_warm = 0;
    let t = Instant::now();
    for rev in 1..=count {
        let body = template.replacen("123456789", &rev.to_string(), 1);
        let r = c.put(&put_url).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if rev == warm {
            after_warm = gw.rss_kib();
        }
        if rev % 2000 == 0 {
            eprintln!("after {rev} reloads: RSS {} KiB", gw.rss_kib());
        }
    }
    let end = gw.rss_kib();
    eprintln!(
        "{count} reloads of a {n}-resource snapshot in {:?}: RSS after {warm} = {after_warm} KiB, after {count} = {end} KiB ({:+.1}%)",
        t.elapsed(),
        (end as f64 - after_warm as f64) * 100.0 / after_warm as f64
    );
    assert!(
        end as f64 <= after_warm as f64 * 1.05,
        "RSS grew from {after_warm} KiB after {warm} reloads to {end} KiB after {count}"
    );
    assert_eq!(
        client()
            .get(gw.url("/prod/col042/7/details"))
            .header("host", HOST)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
