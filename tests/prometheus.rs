//! Issue 17: the metrics the way operators consume them. A real Prometheus (Debian package
//! `prometheus`) scrapes a gateway's admin listener; the series arrive with the values the
//! traffic implies, every query of the shipped Grafana dashboard returns data, and the
//! shipped alert rules load. `promtool` checks the exposition and the rules, and runs the
//! rules' unit tests. Without `prometheus`/`promtool` these tests say they are skipped
//! (`.ci/run` installs them).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";
const KEY: &str = "prometheus-test-key-0001";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `false` (and a message saying the test is skipped) when `tool` is not installed.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!(
            "SKIPPED: `{tool}` is not installed (apt-get install prometheus; .ci/run installs it)"
        );
    }
    found
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(ROOT).join("config/prometheus"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    if !have("promtool") {
        return;
    }
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 4 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert!(ok, "{out}");
}

/// A `prometheus` server of the test's own, scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = Path::new(ROOT).join("config/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: scp-gateway\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = closed_port();
        let child = Command::new("prometheus")
            .dies_with_test()
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// Waits until the server answers `/-/ready` (it answers 503 while it starts).
    async fn wait_ready(&self, c: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c
                .get(format!("http://127.0.0.1:{}/-/ready", self.port))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn query(&self, c: &reqwest::Client, q: &str) -> Vec<Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("http://127.0.0.1:{}/api/v1/query", self.port),
            [("query", q)],
        )
        .unwrap();
        let r = get_json(c, url.as_str()).await;
        assert_eq!(r["status"], "success", "{q}: {r}");
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The one value of an instant query (0 when it has no result yet).
    async fn value(&self, c: &reqwest::Client, q: &str) -> f64 {
        self.query(c, q)
            .await
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API the dashboards are checked with; `/broken` goes to `dead`.
fn api(b: &Backend, dead: &DeadPort) -> Value {
    let broken = format!("http://127.0.0.1:{}/down", dead.port);
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .resource("/open", &[("GET", &b.url("/open"))])
        .resource("/broken", &[("GET", &broken)])
        .build();
    doc["deployments"][0]["resources"][1]["methods"][0]["api_key_required"] = json!(true);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["stages"][0]["throttle"] = json!({"rate_per_second": 20, "burst": 40});
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 5, "rate": "day",
        "api_keys": [{"id": "k1", "name": "k", "key": KEY}]}]);
    doc
}

/// Every `expr` of the shipped dashboard, with its variables set to "all" and Grafana's
/// rate interval to one Prometheus can answer after a few 1 s scrapes.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("config/grafana/scp-gateway.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "10s")
                .replace("$api_id", ".*")
                .replace("$stage", ".*");
            out.push((p["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_and_every_dashboard_query_has_data() {
    if !have("prometheus") || !have("promtool") {
        return;
    }
    let b = Backend::start("b").await;
    let dead = dead_port();
    let gw = Gateway::start(&[("api1.json", &api(&b, &dead))], "");
    let prom = Prometheus::start(&gw.admin.to_string());
    let c = client();
    prom.wait_ready(&c).await;

    // The exposition passes promtool's lint.
    let exposition = gw.metrics().await;
    let (ok, out) = promtool(&["check", "metrics"], Some(&exposition));
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");

    // Counted traffic: 5 admitted, 3 over the quota, 3 without a key.
    let keyed = || {
        gw.req(&c, reqwest::Method::GET, HOST, "/prod/orders")
            .header("x-scp-apikey", KEY)
    };
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(keyed().send().await.unwrap().status().as_u16());
    }
    for _ in 0..3 {
        statuses.push(gw.get(&c, HOST, "/prod/orders").await.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429, 403, 403, 403]
    );

    // The series arrive with those values (scraped every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let two_xx = r#"sum(apigw_requests_total{api_id="api1",stage="prod",resource="/orders",status_class="2xx"})"#;
    while prom.value(&c, two_xx).await != 5.0 {
        assert!(
            Instant::now() < deadline,
            "the 2xx count never reached Prometheus"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (q, expected) in [
        (
            r#"sum(apigw_requests_total{api_id="api1",stage="prod",status_class="4xx"})"#,
            6.0,
        ),
        (
            r#"sum(apigw_rejections_total{api_id="api1",stage="prod",code="QUOTA_EXCEEDED"})"#,
            3.0,
        ),
        (
            r#"sum(apigw_rejections_total{api_id="api1",stage="prod",code="MISSING_API_KEY"})"#,
            3.0,
        ),
        (
            r#"sum(apigw_auth_failures_total{api_id="api1",stage="prod",reason="missing_key"})"#,
            3.0,
        ),
        (
            r#"sum(apigw_request_duration_seconds_count{api_id="api1",stage="prod"})"#,
            11.0,
        ),
        (
            r#"sum(apigw_integration_duration_seconds_count{api_id="api1",stage="prod"})"#,
            5.0,
        ),
        (r#"apigw_snapshot_revision{api_id="api1"}"#, 1.0),
        (r#"sum(apigw_snapshot_reloads_total{result="loaded"})"#, 1.0),
        (
            r#"sum(apigw_quota_store_errors_total{backend="local"})"#,
            0.0,
        ),
        (r#"count(apigw_trace_spans_dropped_total)"#, 2.0),
        (r#"up{job="scp-gateway"}"#, 1.0),
    ] {
        assert_eq!(prom.value(&c, q).await, expected, "{q}");
    }

    // Mixed traffic while the dashboard's queries run: admitted, refused, throttled and
    // failing requests, so that every panel has something to show.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, flag) = (gw.url(""), stop.clone());
    let load = tokio::spawn(async move {
        let c = client();
        let mut i = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let path =
                ["/prod/open", "/prod/broken", "/prod/orders", "/prod/open"][(i % 4) as usize];
            let mut r = c.get(format!("{url}{path}")).header("host", HOST);
            if i % 3 == 0 {
                r = r.header("x-scp-apikey", KEY);
            }
            let _ = r.send().await;
            i += 1;
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let throttled = r#"sum(apigw_rejections_total{api_id="api1",stage="prod",code="THROTTLED"})"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    while prom.value(&c, throttled).await == 0.0 {
        assert!(Instant::now() < deadline, "never throttled");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 12, "{queries:?}");
    for (title, q) in &queries {
        let result = prom.query(&c, q).await;
        assert!(
            !result.is_empty(),
            "dashboard panel {title:?}: no data for {q}"
        );
        let numbers = result
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .count();
        assert!(
            numbers > 0,
            "dashboard panel {title:?}: only NaN for {q}: {result:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();

    // The shipped alert rules load and evaluate against the real series.
    let rules = get_json(&c, &format!("http://127.0.0.1:{}/api/v1/rules", prom.port)).await;
    let rules = rules["data"]["groups"][0]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rules.len(), 4, "{rules:?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{r}");
    }
}
