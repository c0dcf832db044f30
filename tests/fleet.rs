//! Issue 8 "done when": fleet mode (`quota.backend = "redis"`) against a real `redis-server`
//! started by each test on an ephemeral port: one quota across two gateway instances, reports
//! that agree, the failure mode while Redis is down, and counting that resumes by itself.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::redis::RedisNode;
use common::*;
use serde_json::Value;

/// A `redis-server` of the test's own (`common::redis`), without persistence; killed on drop.
struct Redis;

impl Redis {
    fn start() -> RedisNode {
        Self::start_on(closed_port())
    }

    fn start_on(port: u16) -> RedisNode {
        RedisNode::start(port, &[])
    }
}

fn url(redis: &RedisNode) -> String {
    format!("redis://127.0.0.1:{}/0", redis.port)
}

/// Fleet-mode configuration with the default 50 ms store timeout.
fn fleet_toml(url: &str, failure_mode: &str) -> String {
    fleet_toml_with_timeout(url, failure_mode, "50ms")
}

fn fleet_toml_with_timeout(url: &str, failure_mode: &str, timeout: &str) -> String {
    format!("[quota]\nbackend = \"redis\"\nredis_url = \"{url}\"\nfailure_mode = \"{failure_mode}\"\ntimeout = \"{timeout}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_quota_and_one_report() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 100);
    // A generous timeout here: this test is about exactness under 1,000 concurrent requests
    // on a busy 2-core CI machine (debug builds), not about the failure mode (tested below).
    let toml = fleet_toml_with_timeout(&url(&redis), "closed", "2s");
    let gws = [
        Gateway::start(&[("api1.json", &doc)], &toml),
        Gateway::start(&[("api1.json", &doc)], &toml),
    ];
    // Both instances connect in the background (a 503 before that: failure mode closed).
    for gw in &gws {
        wait_connected(gw).await;
    }
    let calls_before = common::redis::evalsha_calls(redis.port);
    one_exact_quota_for_two_instances(&gws, &b).await;
    // The admissions a worker had at one time went to Redis together: fewer script calls
    // than the 1,000 admissions, each one still exact (above).
    let calls = common::redis::evalsha_calls(redis.port) - calls_before;
    eprintln!("{calls} EVALSHA calls for 1,000 concurrent admissions");
    assert!(
        (1..1000).contains(&calls),
        "{calls} EVALSHA calls for 1,000 concurrent admissions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_applies_the_failure_mode_and_counting_resumes() {
    let mut redis = Redis::start();
    let port = redis.port;
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 1_000_000);
    let closed = Gateway::start(&[("api1.json", &doc)], &fleet_toml(&url(&redis), "closed"));
    let open = Gateway::start(&[("api1.json", &doc)], &fleet_toml(&url(&redis), "open"));
    let c = client();
    for gw in [&closed, &open] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while keyed_get(&c, gw).await.status() != 200 {
            assert!(Instant::now() < deadline, "never counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let r = keyed_get(&c, &closed).await;
    assert!(r.headers().contains_key("ratelimit-remaining"));

    // Redis hangs (SIGSTOP): a request waits for the store's 50 ms timeout, then gets the
    // failure mode; it is not held until Redis answers. (The 5 s bound below is far beyond
    // the timeout on purpose: it tells giving up after the timeout from waiting on the hung
    // store, not how fast this machine is.)
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &redis.pid().expect("running").to_string()])
            .status()
            .unwrap();
    };
    signal("-STOP");
    for gw in [&closed, &open] {
        let started = Instant::now();
        // Without the store's timeout the answer would wait for SIGCONT, that is forever.
        let r = tokio::time::timeout(Duration::from_secs(5), keyed_get(&c, gw))
            .await
            .expect("a hung store holds the request");
        let took = started.elapsed();
        assert!(matches!(r.status().as_u16(), 503 | 200), "{}", r.status());
        assert!(
            took >= Duration::from_millis(40),
            "answered before the store's timeout ran out: took {took:?}"
        );
        eprintln!("Redis hung: answered {} in {took:?}", r.status());
    }
    signal("-CONT");

    // Redis dies mid-run: the failure mode applies at once (a refused connection), and
    // never waits on the dead store.
    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let r = keyed_get(&c, &closed).await;
        let took = started.elapsed();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "QUOTA_STORE_UNAVAILABLE");
        assert!(took < Duration::from_secs(5), "answered in {took:?}");
        slowest = slowest.max(took);

        let started = Instant::now();
        let r = keyed_get(&c, &open).await;
        let took = started.elapsed();
        assert_eq!(r.status(), 200, "open mode admits");
        assert!(
            !r.headers().contains_key("ratelimit-remaining"),
            "no RateLimit-* headers while the store is down"
        );
        assert!(took < Duration::from_secs(5), "answered in {took:?}");
        slowest = slowest.max(took);
    }
    eprintln!("Redis down: slowest answer in failure mode {slowest:?} (timeout 50 ms)");
    for gw in [&closed, &open] {
        let m = gw.metrics().await;
        let errors: f64 = m
            .lines()
            .find(|l| l.starts_with("apigw_quota_store_errors_total{backend=\"redis\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        assert!(errors >= 5.0, "errors counted: {m}");
    }

    // Redis comes back on the same address: admissions are counted again, no restart.
    let _redis = Redis::start_on(port);
    let back = Instant::now();
    for gw in [&closed, &open] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = keyed_get(&c, gw).await;
            if r.status() == 200 && r.headers().contains_key("ratelimit-remaining") {
                break;
            }
            assert!(Instant::now() < deadline, "counting never resumed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "Redis back: both instances counting again after {:?}",
        back.elapsed()
    );
}

/// The keys an admission writes expire on their own: the window counter an hour after its
/// window (a day here) ends, the usage hour (written by the instance's push of its usage
/// counts) after the retention period. The counter's is set when the key is made and still
/// there after later admissions, a refused one included; the usage hour counts the
/// admitted requests of each key, not the refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_keys_expire_on_their_own() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let mut doc = keyed_api(&b, 3);
    doc["usage_plans"][0]["api_keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"id": "k2", "name": "two", "key": "fleet-key-value-0002"}));
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        &fleet_toml_with_timeout(&url(&redis), "closed", "2s"),
    );
    wait_connected(&gw).await;
    let c = client();
    for want in [200, 200, 200, 429] {
        assert_eq!(keyed_get(&c, &gw).await.status(), want);
    }
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "fleet-key-value-0002")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut conn = ::redis::Client::open(url(&redis))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The usage hour comes with the instance's next push (once a second: the spec's
    // "within 2 seconds"); the counters are there at once. (Report aggregates, pushed
    // too, are not the admissions' keys.)
    let mut keys: Vec<String> = Vec::new();
    for _ in 0..50 {
        keys = ::redis::cmd("KEYS")
            .arg("scpgw:*")
            .query_async::<Vec<String>>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .filter(|k| !k.starts_with("scpgw:reports:"))
            .collect();
        if keys.iter().any(|k| k.starts_with("scpgw:usage:")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keys.sort();
    let [k1_counter, k2_counter, usage] = <[String; 3]>::try_from(keys.clone())
        .unwrap_or_else(|_| panic!("two counters and one usage hour: {keys:?}"));
    assert!(k1_counter.starts_with("scpgw:quota:{up1}:k1:"), "{keys:?}");
    assert!(k2_counter.starts_with("scpgw:quota:{up1}:k2:"), "{keys:?}");
    assert!(usage.starts_with("scpgw:usage:{up1}:"), "{keys:?}");
    let get = |k: &str| ::redis::cmd("GET").arg(k).to_owned();
    let count: u64 = get(&k1_counter).query_async(&mut conn).await.unwrap();
    assert_eq!(count, 3, "the refused call is not counted");
    let hits: std::collections::HashMap<String, u64> = ::redis::cmd("HGETALL")
        .arg(&usage)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hits, [("k1".to_string(), 3), ("k2".to_string(), 1)].into());
    for (key, most) in [
        (&k1_counter, 86_400 + 3_600),
        (&k2_counter, 86_400 + 3_600),
        (&usage, 63 * 86_400),
    ] {
        let ttl: i64 = ::redis::cmd("TTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= most,
            "{key} expires in {ttl} s (at most {most})"
        );
    }
}

/// Usage is counted by each worker and pushed once a second; a graceful stop pushes what
/// was counted since the last push, so none of it is lost. (The requests and the stop
/// come within a fraction of a second: most runs stop before the next periodic push.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_pushes_the_last_usage() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &keyed_api(&b, 100))],
        &fleet_toml_with_timeout(&url(&redis), "closed", "2s"),
    );
    wait_connected(&gw).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(keyed_get(&c, &gw).await.status(), 200);
    }
    let (status, _dir) = gw.terminate();
    assert!(status.success(), "{status:?}");
    let mut conn = ::redis::Client::open(url(&redis))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hours: Vec<String> = ::redis::cmd("KEYS")
        .arg("scpgw:usage:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut used = 0;
    for hour in &hours {
        let n: Option<u64> = ::redis::cmd("HGET")
            .arg(hour)
            .arg("k1")
            .query_async(&mut conn)
            .await
            .unwrap();
        used += n.unwrap_or(0);
    }
    assert_eq!(used, 5, "usage hours {hours:?}");
}

/// Once Redis has refused a key in its window, the instance refuses the key's next
/// requests of that window itself: a client hammering an exhausted key does not reach
/// Redis. A reload that raises the plan's limit asks Redis again, and the count goes on
/// from where it stood (the refused requests were not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_key_is_refused_without_asking_redis_until_a_reload() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 2);
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        &fleet_toml_with_timeout(&url(&redis), "closed", "2s"),
    );
    wait_connected(&gw).await;
    let c = client();
    for want in [200, 200, 429] {
        assert_eq!(keyed_get(&c, &gw).await.status(), want);
    }
    let calls = common::redis::evalsha_calls(redis.port);
    for _ in 0..5 {
        let r = keyed_get(&c, &gw).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    }
    assert_eq!(
        common::redis::evalsha_calls(redis.port),
        calls,
        "refused again without a call to Redis"
    );

    let mut next = doc.clone();
    next["revision"] = serde_json::json!(2);
    next["usage_plans"][0]["limit"] = serde_json::json!(3);
    write_json(&gw.snapshot_dir().join("api1.json"), &next);
    gw.signal("HUP");
    let reloaded = eventually(Duration::from_secs(10), async || {
        keyed_get(&c, &gw).await.status() == 200
    })
    .await;
    assert!(
        reloaded.is_some(),
        "the raised limit never admitted: {}",
        gw.log()
    );
    assert_eq!(keyed_get(&c, &gw).await.status(), 429, "3 admitted in all");
    assert!(common::redis::evalsha_calls(redis.port) > calls);
    let counters = common::redis::cli(redis.port, &["--scan", "--pattern", "scpgw:quota:*"]);
    let counter = counters.trim();
    assert_eq!(
        common::redis::cli(redis.port, &["GET", counter]).trim(),
        "3",
        "{counter}: the refused requests were not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_up_then_up() {
    // Held until Redis starts on it: no other test's listener can take the port meanwhile
    // (the gateway would then be talking to it instead of finding Redis down).
    let down = dead_port();
    let port = down.port;
    let b = Backend::start("b").await;
    let doc = keyed_api(&b, 10);
    let url = format!("redis://127.0.0.1:{port}/0");
    // Not connected answers at once whatever the timeout; a long one keeps a slow CI
    // machine from timing out the first admissions after Redis comes up, and tells an
    // answer given at once from one given when the timeout ran out.
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        &fleet_toml_with_timeout(&url, "closed", "10s"),
    );
    let c = client();
    let started = Instant::now();
    let r = keyed_get(&c, &gw).await;
    assert_eq!(
        r.status(),
        503,
        "started without Redis; failure mode closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not connected is answered at once, not after the store's 10 s timeout: took {:?}",
        started.elapsed()
    );
    drop(down);
    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = keyed_get(&c, &gw).await;
        if r.status() == 200 {
            assert_eq!(r.headers()["ratelimit-remaining"], "9");
            break;
        }
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_bad_redis_url_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        "[quota]\nbackend = \"redis\"\nredis_url = \"http://user:hunter2@nowhere/0\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--snapshot-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quota.redis_url"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the URL's password is never echoed: {err}"
    );
}

/// A TCP relay in front of Redis whose open connections can go silent at once (no data,
/// no FIN, no RST: what a vanished host or a dropped route looks like), while connections
/// opened later are relayed as before.
struct Relay {
    addr: std::net::SocketAddr,
    silence: std::sync::Arc<tokio::sync::Notify>,
    /// The port new connections are relayed to (a DNS name or a virtual IP that a
    /// failover moves).
    to: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silence = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = silence.clone();
        let to = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(to));
        let target = to.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let silenced = notify.clone().notified_owned();
                let to = target.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = silenced => {
                            // Both sockets stay open and unread until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Relay { addr, silence, to }
    }

    /// Connections opened from now on go to `port`; open ones stay where they are.
    fn move_to(&self, port: u16) {
        self.to.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every connection open now goes silent.
    fn silence_open_connections(&self) {
        self.silence.notify_waiters();
    }
}

/// A gateway in fleet mode (closed) whose Redis is reached through `relay`, once it has
/// counted 20 admissions (on every worker's own connection: each request may land on
/// either worker).
async fn counting_through(relay: &Relay, b: &Backend) -> Gateway {
    let doc = keyed_api(b, 1_000_000);
    let url = format!("redis://{}/0", relay.addr);
    let gw = Gateway::start(&[("api1.json", &doc)], &fleet_toml(&url, "closed"));
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut counted = 0;
    while counted < 20 {
        if keyed_get(&c, &gw).await.status() == 200 {
            counted += 1;
        }
        assert!(Instant::now() < deadline, "never counted: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw
}

/// Waits (at most `within`) for 20 counted admissions in a row, each on a new client
/// connection (spread over the workers' listeners by the kernel): every worker counts.
async fn counts_on_every_worker(gw: &Gateway, within: Duration, failure: &str) {
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let deadline = Instant::now() + within;
    let mut in_a_row = 0;
    while in_a_row < 20 {
        let r = keyed_get(&fresh, gw).await;
        in_a_row = if r.status() == 200 && r.headers().contains_key("ratelimit-remaining") {
            in_a_row + 1
        } else {
            0
        };
        assert!(Instant::now() < deadline, "{failure}: {}", gw.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_is_replaced() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let b = Backend::start("b").await;
    let gw = counting_through(&relay, &b).await;
    let c = client();

    // The connections go silent: the kernel would take ~15 minutes to give up on them.
    relay.silence_open_connections();
    let silent = Instant::now();
    let r = keyed_get(&c, &gw).await;
    assert_eq!(r.status(), 503, "failure mode closed while nothing answers");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = keyed_get(&c, &gw).await;
        if r.status() == 200 && r.headers().contains_key("ratelimit-remaining") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still not counting 20 s after the connections went silent: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "counting again {:?} after the connections went silent",
        silent.elapsed()
    );
    // Every worker counts again, not just the one that answered first: a new client
    // connection per request, spread over the workers' listeners by the kernel.
    counts_on_every_worker(&gw, Duration::from_secs(10), "some worker is not counting").await;
    // The shared connection (report pushes, the admin API) is replaced too, and each
    // replacement is logged.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.log().matches("connected to the fleet's Redis").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the shared connection was not replaced: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log();
    assert!(
        log.contains("reconnecting store=\"Redis\" shared=false"),
        "{log}"
    );
    assert!(
        log.contains("reconnecting store=\"Redis\" shared=true"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_behind_its_address_is_left_for_the_new_one() {
    let old = Redis::start();
    let new = Redis::start();
    let relay = Relay::start(old.port).await;
    let b = Backend::start("b").await;
    let gw = counting_through(&relay, &b).await;

    // A failover behind the address: it now names the new master, and the old one became
    // a replica of it (its open connections answer READONLY to every admission).
    relay.move_to(new.port);
    let answer = common::redis::cli(old.port, &["REPLICAOF", "127.0.0.1", &new.port.to_string()]);
    assert!(answer.contains("OK"), "{answer}");
    let moved = Instant::now();
    counts_on_every_worker(
        &gw,
        Duration::from_secs(15),
        "not counting on the new master 15 s after the failover",
    )
    .await;
    eprintln!(
        "counting on the new master {:?} after the failover",
        moved.elapsed()
    );
    assert!(
        common::redis::keys(new.port)
            .iter()
            .any(|k| k.starts_with("scpgw:quota:")),
        "the admissions are counted on the new master"
    );
    assert!(gw.log().contains("answered READONLY"), "{}", gw.log());
}
