//! Fleet-mode test helpers shared by `tests/fleet.rs` (standalone Redis) and
//! `tests/fleet_cluster.rs` (Redis Cluster, TLS): one keyed API, and the check that two
//! gateway instances hold one exact quota and answer the same reports and usage.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Backend, Gateway, SnapshotBuilder};

pub const HOST: &str = "api.test";
pub const KEY: &str = "fleet-key-value-0001";

/// `api1` with `GET /prod/orders` requiring an API key of plan `up1` (key id `k1`).
pub fn keyed_api(b: &Backend, limit: u64) -> Value {
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .build();
    doc["deployments"][0]["resources"][1]["methods"][0]["api_key_required"] = json!(true);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["usage_plans"] = json!([{"id": "up1", "name": "fleet", "limit": limit, "rate": "day",
        "api_keys": [{"id": "k1", "name": "one", "key": KEY}]}]);
    doc
}

pub async fn keyed_get(c: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    gw.req(c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", KEY)
        .send()
        .await
        .unwrap()
}

pub async fn admin_json(c: &reqwest::Client, admin: SocketAddr, path: &str) -> (u16, Value) {
    let r = c.get(format!("http://{admin}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

pub fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Waits until the gateway logged its connection to the fleet's Redis.
pub async fn wait_connected(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gw.log().contains("connected to the fleet's Redis") {
        assert!(Instant::now() < deadline, "never connected: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 1,000 concurrent keyed requests spread over two instances sharing a quota of 100:
/// exactly 100 admitted (by both instances), 900 answered 429, 100 reached the backend;
/// then both instances answer the same reports and usage for the fleet.
pub async fn one_exact_quota_for_two_instances(gws: &[Gateway; 2], b: &Backend) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (c, url) = (c.clone(), gws[i % 2].url("/prod/orders"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(url)
                .header("host", HOST)
                .header("x-scp-apikey", KEY)
                .send()
                .await
                .unwrap();
            (i % 2, r.status().as_u16())
        }));
    }
    let (mut ok, mut limited) = ([0; 2], [0; 2]);
    for t in tasks {
        match t.await.unwrap() {
            (g, 200) => ok[g] += 1,
            (g, 429) => limited[g] += 1,
            (_, s) => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok[0] + ok[1], 100, "exactly 100 admitted: {ok:?}");
    assert_eq!(limited[0] + limited[1], 900);
    assert!(ok[0] > 0 && ok[1] > 0, "both instances admitted: {ok:?}");
    assert_eq!(b.seen().len(), 100, "exactly 100 reached the backend");

    // Reports and usage: any instance answers for the fleet (within 2 s of the responses).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let day = today();
    let reports = format!("/v1/apis/api1/reports?stage_name=prod&start_date={day}&end_date={day}");
    let usage = format!("/v1/apis/api1/usage-plans/up1/usage?start_date={day}&end_date={day}");
    let (s0, r0) = admin_json(&c, gws[0].admin, &reports).await;
    let (s1, r1) = admin_json(&c, gws[1].admin, &reports).await;
    assert_eq!((s0, s1), (200, 200), "{r0} {r1}");
    assert_eq!(r0["reports"][0]["call_count"], 100, "{r0}");
    assert_eq!(r0["reports"][0]["error_4xx_count"], 900, "{r0}");
    assert_eq!(r0, r1, "both instances report the same");
    let (_, u0) = admin_json(&c, gws[0].admin, &usage).await;
    let (_, u1) = admin_json(&c, gws[1].admin, &usage).await;
    assert_eq!(u0["items"]["k1"][0], json!([100, 0]), "{u0}");
    assert_eq!(u0, u1);
}
