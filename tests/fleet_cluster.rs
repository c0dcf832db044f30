//! Issue 16: fleet mode on the Redis that operators run — a Redis Cluster (3 masters, and 3
//! masters with a replica each for failover), and a TLS Redis with an ACL user. Every server
//! is a real `redis-server` started by the test on ephemeral ports.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::*;
use common::redis::{keys, tls_files, RedisCluster, RedisNode};
use common::*;
use serde_json::Value;

fn cluster_toml(seed: &str, failure_mode: &str, timeout: &str) -> String {
    format!("[quota]\nbackend = \"redis\"\nredis_url = \"{seed}\"\nredis_cluster = true\nfailure_mode = \"{failure_mode}\"\ntimeout = \"{timeout}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_masters_holds_one_exact_quota_for_two_instances() {
    let cluster = RedisCluster::start(3, 0);
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 100);
    // A generous timeout: exactness under 1,000 concurrent requests on a busy 2-core machine
    // (debug builds) is the point here, not the failure mode.
    let toml = cluster_toml(&cluster.seed_url(), "closed", "2s");
    let gws = [
        Gateway::start(&[("api1.json", &doc)], &toml),
        Gateway::start(&[("api1.json", &doc)], &toml),
    ];
    for gw in &gws {
        wait_connected(gw).await;
        assert!(gw.log().contains("Redis Cluster"), "{}", gw.log());
    }
    let calls = || -> u64 {
        cluster
            .masters()
            .into_iter()
            .map(common::redis::evalsha_calls)
            .sum()
    };
    let calls_before = calls();
    one_exact_quota_for_two_instances(&gws, &b).await;
    // The admissions a worker had at one time went together (one plan: one slot).
    let made = calls() - calls_before;
    assert!(
        (1..1000).contains(&made),
        "{made} EVALSHA calls for 1,000 concurrent admissions"
    );

    // Key layout: the counter and the usage hour of the plan share one slot (the `{up1}`
    // tag), so one master holds both; the stage's report key has a tag of its own.
    let held: Vec<(u16, Vec<String>)> = cluster
        .masters()
        .into_iter()
        .map(|p| (p, keys(p)))
        .collect();
    let holder = |prefix: &str| {
        held.iter()
            .find(|(_, ks)| ks.iter().any(|k| k.starts_with(prefix)))
            .map(|(p, _)| *p)
            .unwrap_or_else(|| panic!("no {prefix}* key: {held:?}"))
    };
    assert_eq!(
        holder("scpgw:quota:{up1}:k1:"),
        holder("scpgw:usage:{up1}:")
    );
    assert_eq!(
        holder("scpgw:reports:{api1:prod}:"),
        cluster.master_of("{api1:prod}").unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_dies_is_replaced_and_counting_resumes_without_a_restart() {
    let mut cluster = RedisCluster::start(3, 1);
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 1_000_000);
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        &cluster_toml(&cluster.seed_url(), "closed", "250ms"),
    );
    wait_connected(&gw).await;
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while keyed_get(&c, &gw).await.status() != 200 {
        assert!(Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: 4 clients in a loop, each answer recorded with its time.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (c, url, stop, seen) = (
            c.clone(),
            gw.url("/prod/orders"),
            stop.clone(),
            seen.clone(),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .get(&url)
                    .header("host", HOST)
                    .header("x-scp-apikey", KEY)
                    .send()
                    .await
                    .unwrap();
                seen.lock()
                    .unwrap()
                    .push((Instant::now(), r.status().as_u16()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cluster.master_of("{up1}").unwrap();
    let killed_at = Instant::now();
    cluster.kill(victim);

    // Until the replica is promoted: 503 (closed); then 200 again, same gateway process.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let recent: Vec<u16> = {
            let s = seen.lock().unwrap();
            s.iter()
                .rev()
                .take_while(|(t, _)| t.elapsed() < Duration::from_secs(1))
                .map(|(_, st)| *st)
                .collect()
        };
        let failed_over = cluster.master_of("{up1}").is_some_and(|p| p != victim);
        if failed_over && recent.len() >= 10 && recent.iter().all(|s| *s == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counting never resumed: {recent:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(_, s)| matches!(s, 200 | 503)),
        "only 200 and 503 (closed mode): {:?}",
        seen.iter()
            .map(|(_, s)| s)
            .collect::<std::collections::BTreeSet<_>>()
    );
    let refused: Vec<Instant> = seen
        .iter()
        .filter(|(_, s)| *s == 503)
        .map(|(t, _)| *t)
        .collect();
    let last_refusal = refused.last().copied().unwrap_or(killed_at);
    let resumed = seen
        .iter()
        .find(|(t, s)| *t > last_refusal && *s == 200)
        .map(|(t, _)| *t)
        .expect("a 200 after the failover");
    eprintln!(
        "failover: {} requests, {} answered 503; counting again {:.2} s after the master was killed (new master on port {})",
        seen.len(),
        refused.len(),
        resumed.duration_since(killed_at).as_secs_f64(),
        cluster.master_of("{up1}").unwrap()
    );
    assert!(
        seen.iter()
            .filter(|(t, _)| *t > resumed)
            .all(|(_, s)| *s == 200),
        "no 503 once counting resumed"
    );

    // Counting, not merely admitting: the remaining count goes down by one per request.
    let r1 = keyed_get(&c, &gw).await;
    let r2 = keyed_get(&c, &gw).await;
    let remaining = |r: &reqwest::Response| -> u64 {
        r.headers()["ratelimit-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(remaining(&r1) - 1, remaining(&r2));
}

/// A TLS-only `redis-server` (private CA) whose default user is off and whose one user is
/// `gw` with `password`.
fn tls_redis(dir: &std::path::Path, password: &str) -> (RedisNode, u16) {
    tls_files(dir);
    let tls_port = closed_port();
    let node = RedisNode::start(
        closed_port(),
        &[
            "port 0".into(),
            format!("tls-port {tls_port}"),
            format!("tls-cert-file {}", dir.join("server.crt").display()),
            format!("tls-key-file {}", dir.join("server.key").display()),
            format!("tls-ca-cert-file {}", dir.join("ca.pem").display()),
            "tls-auth-clients no".into(),
            "user default off".into(),
            format!("user gw on >{password} ~* &* +@all"),
        ],
    );
    (node, tls_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_an_acl_user_admit_and_count_and_bad_credentials_are_the_failure_mode() {
    let certs = tempfile::tempdir().unwrap();
    let password = "s3cret-Redis-pw-4711";
    let (_redis, port) = tls_redis(certs.path(), password);
    let ca = certs.path().join("ca.pem");
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 10);
    let toml = |url: String, ca: Option<&std::path::Path>| {
        let ca = ca.map_or(String::new(), |p| {
            format!("redis_ca_file = \"{}\"\n", p.display())
        });
        format!("[quota]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{ca}failure_mode = \"closed\"\ntimeout = \"2s\"\n")
    };
    let good = Gateway::start(
        &[("api1.json", &doc)],
        &toml(
            format!("rediss://gw:{password}@127.0.0.1:{port}/0"),
            Some(&ca),
        ),
    );
    let wrong_password = "not-the-Redis-pw-0815";
    let bad_pw = Gateway::start(
        &[("api1.json", &doc)],
        &toml(
            format!("rediss://gw:{wrong_password}@127.0.0.1:{port}/0"),
            Some(&ca),
        ),
    );
    let untrusted = Gateway::start(
        &[("api1.json", &doc)],
        &toml(format!("rediss://gw:{password}@127.0.0.1:{port}/0"), None),
    );
    let c = client();
    wait_connected(&good).await;
    let r = keyed_get(&c, &good).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-remaining"], "9");
    let r = keyed_get(&c, &good).await;
    assert_eq!(r.headers()["ratelimit-remaining"], "8", "counted in Redis");

    for (gw, what) in [
        (&bad_pw, "a wrong password"),
        (&untrusted, "an untrusted certificate"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gw.log().contains("cannot connect to the fleet's Redis") {
            assert!(
                Instant::now() < deadline,
                "{what}: no warning: {}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = keyed_get(&c, gw).await;
        assert_eq!(r.status(), 503, "{what}: failure mode closed");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "QUOTA_STORE_UNAVAILABLE");
        let m = gw.metrics().await;
        assert!(
            m.contains("apigw_quota_store_errors_total{backend=\"redis\"}"),
            "{m}"
        );
        eprintln!(
            "{what}: {}",
            gw.log()
                .lines()
                .find(|l| l.contains("cannot connect"))
                .unwrap()
        );
    }
    for gw in [&good, &bad_pw, &untrusted] {
        let log = gw.log();
        assert!(!log.contains(password), "password in a log line: {log}");
        assert!(
            !log.contains(wrong_password),
            "password in a log line: {log}"
        );
    }
    // Still serving: a failure of the store is not a crash.
    for gw in [good, bad_pw, untrusted] {
        let (status, _) = gw.terminate();
        assert!(status.success(), "{status:?}");
    }
}

#[test]
fn cluster_and_tls_settings_are_checked_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "redis_url = \"redis://u:hunter2@127.0.0.1:7000/3\"\nredis_cluster = true\n",
            "config key `quota.redis_url`: a Redis Cluster has only database 0",
        ),
        (
            "redis_url = \"redis://u:hunter2@127.0.0.1:7000\"\nredis_cluster = [\"10.0.0.2:7000\", \"nowhere\"]\n",
            "config key `quota.redis_cluster[1]`: \"nowhere\" is not a \"host:port\" address",
        ),
        (
            "redis_url = \"rediss://u:hunter2@127.0.0.1:7000\"\nredis_ca_file = \"missing-ca.pem\"\n",
            "config key `quota.redis_ca_file`:",
        ),
        (
            "redis_url = \"redis://u:hunter2@127.0.0.1:7000\"\nredis_cluster = \"yes\"\n",
            "`true`, `false` or a list of \"host:port\" seed nodes",
        ),
    ];
    for (i, (quota, expected)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("gw{i}.toml"));
        std::fs::write(&config, format!("[quota]\nbackend = \"redis\"\n{quota}")).unwrap();
        let out = std::process::Command::new(bin())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--snapshot-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{quota}: {err}");
        assert!(err.contains(expected), "{quota}: {err}");
        assert!(!err.contains("hunter2"), "password echoed: {err}");
    }
}
