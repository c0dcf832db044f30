//! Issue 13, item 1: backends that close pooled keep-alive connections. Raw-socket backends
//! whose closing the test controls: the race must never reach the client, within the
//! contract's rule (idempotent or never-written requests are sent once more on a new
//! connection; others get 502), and an announced `Keep-Alive: timeout` is honoured.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "api.test";

/// Backend pools are per worker: with one worker, every request of a test borrows from the
/// same pool whichever client connection it comes on.
const ONE_WORKER: &str = "[runtime]\nworkers = 1\n";

/// How a raw backend treats its connections.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers the first request of each connection, then reads the next one and closes
    /// the connection without answering.
    AnswerFirstThenDrop,
    /// Answers every request with `Keep-Alive: timeout=N` but never closes by itself.
    Announces(u64),
    /// Answers every request and closes a connection idle for this long, announcing nothing.
    ClosesIdleAfter(Duration),
    /// Reads requests and never answers: the connection stays open until the gateway
    /// closes it.
    NeverAnswers,
}

struct RawBackend {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// `METHOD path` of every request read, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// The whole head of every request read, in order.
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections the gateway closed (read to their end).
    ended: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn start(behaviour: Behaviour) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let ended = Arc::new(AtomicUsize::new(0));
        let (acc, reqs, hds, end) = (
            accepted.clone(),
            requests.clone(),
            heads.clone(),
            ended.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (reqs, hds, end) = (reqs.clone(), hds.clone(), end.clone());
                tokio::spawn(async move {
                    if serve(stream, behaviour, reqs, hds).await {
                        end.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            requests,
            heads,
            ended,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Reads one request (head and Content-Length body): its `METHOD path` and its head; `None`
/// when the connection ended.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split(' ');
            let summary = format!(
                "{} {}",
                parts.next().unwrap_or(""),
                parts.next().unwrap_or("")
            );
            return Some((summary, head));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves one connection; true when the gateway closed it (read to its end).
async fn serve(
    mut s: TcpStream,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<String>>>,
    heads: Arc<Mutex<Vec<String>>>,
) -> bool {
    let mut buf = Vec::new();
    let mut answered = 0usize;
    loop {
        let next = match behaviour {
            Behaviour::ClosesIdleAfter(idle) => {
                match tokio::time::timeout(idle, read_request(&mut s, &mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return false, // idle too long: close, announcing nothing
                }
            }
            _ => read_request(&mut s, &mut buf).await,
        };
        let Some((request, head)) = next else {
            return true;
        };
        seen.lock().unwrap().push(request);
        heads.lock().unwrap().push(head);
        if matches!(behaviour, Behaviour::AnswerFirstThenDrop) && answered == 1 {
            return false; // read, never answered: the connection closes
        }
        if matches!(behaviour, Behaviour::NeverAnswers) {
            continue;
        }
        let extra = match behaviour {
            Behaviour::Announces(n) => format!("Keep-Alive: timeout={n}\r\n"),
            _ => String::new(),
        };
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{extra}\r\nok");
        if s.write_all(answer.as_bytes()).await.is_err() {
            return false;
        }
        answered += 1;
    }
}

fn api(b: &RawBackend) -> serde_json::Value {
    SnapshotBuilder::new("api1", &[HOST])
        .resource(
            "/orders",
            &[("GET", &b.url("/orders")), ("POST", &b.url("/orders"))],
        )
        .build()
}

fn retries(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"apigw_integration_retries_total{api_id="api1",stage="prod"} "#)
        })
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_reused_connection_is_retried_for_idempotent_requests_only() {
    let b = RawBackend::start(Behaviour::AnswerFirstThenDrop).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    write_json(&dir.path().join("snapshots/api1.json"), &api(&b));
    let gw = Gateway::start_with_args(
        dir,
        &format!("{ONE_WORKER}[access_log]\nenabled = true\npath = {log:?}\n"),
        &[],
    );
    let c = client();
    // The first request opens a connection, which the gateway pools.
    assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    // The second reuses it; the backend reads it and closes without answering. A GET is
    // sent once more, on a new connection, exactly as it was sent the first time.
    let r = gw
        .req(
            &c,
            reqwest::Method::GET,
            HOST,
            "/prod/orders?page=2&q=a%20b",
        )
        .header("x-client", "one")
        .header("accept", "text/plain")
        .header("x-client", "two")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        b.requests(),
        [
            "GET /orders",
            "GET /orders?page=2&q=a%20b",
            "GET /orders?page=2&q=a%20b"
        ],
        "the backend saw the second GET twice"
    );
    let heads = b.heads();
    assert_eq!(heads[2], heads[1], "the retry repeats the first try's head");
    // ... with the headers the gateway adds (written after the client's on HTTP/1.1).
    for added in [
        "x-forwarded-for: ",
        "x-scp-request-id: ",
        "x-scp-stage: prod\r\n",
    ] {
        assert_eq!(heads[2].matches(added).count(), 1, "{added}: {}", heads[2]);
    }
    assert!(
        heads[2].contains("x-client: one\r\n") && heads[2].contains("x-client: two\r\n"),
        "{}",
        heads[2]
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(retries(&gw.metrics().await), 1);

    // A POST on the reused connection was written and may not be repeated: 502, and the
    // backend saw it once.
    let r = gw
        .req(&c, reqwest::Method::POST, HOST, "/prod/orders")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let posts = b
        .requests()
        .iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 1, "{:?}", b.requests());
    assert_eq!(retries(&gw.metrics().await), 1, "the POST was not retried");

    // The access log says which request was retried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let retried: Vec<(u64, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["status"].as_u64().unwrap(),
                l["retried"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(retried, [(200, false), (200, true), (502, false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_keep_alive_timeout_is_honoured() {
    let b = RawBackend::start(Behaviour::Announces(1)).await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], ONE_WORKER);
    let c = client();
    assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "reused within the announced time"
    );
    // 1.5 s idle is past `timeout=1`: the gateway must not reuse that connection, even
    // though this backend has not closed it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2, "a new connection");
    assert_eq!(retries(&gw.metrics().await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_against_a_backend_closing_idle_connections() {
    // Many clients, each calling about once a second, through a backend that closes
    // connections idle for 1 s without saying so: the closing race is hit over and over,
    // and no client may see it.
    const CLIENTS: usize = 64;
    const ROUNDS: usize = 10;
    let b = RawBackend::start(Behaviour::ClosesIdleAfter(Duration::from_secs(1))).await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    let url = gw.url("/prod/orders");
    // All clients call at about the same moment, every 996 to 1,004 ms, so the gateway
    // keeps about one backend connection per client, each idle for just about the 1 s after
    // which the backend closes it: reuse and close race every round.
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            for round in 0..ROUNDS {
                let offset = (round * 1000 + (i + round) % 5) as u64;
                let at = start + Duration::from_millis(offset);
                tokio::time::sleep_until(at).await;
                let r = c.get(&url).header("host", HOST).send().await;
                statuses.push(r.map_or(0, |r| r.status().as_u16()));
            }
            statuses
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in tasks {
        for s in t.await.unwrap() {
            *counts.entry(s).or_insert(0usize) += 1;
        }
    }
    let m = gw.metrics().await;
    println!(
        "soak: {counts:?}; backend accepted {} connections; gateway retried {} requests",
        b.accepted.load(Ordering::SeqCst),
        retries(&m)
    );
    assert_eq!(
        counts,
        [(200u16, CLIENTS * ROUNDS)].into_iter().collect(),
        "every request answered 200"
    );
    // Every head the backend read carries the gateway's headers once, whichever way it went:
    // first try, again from the bytes a failed try wrote, or again unwritten (its fields
    // taken back from the connection it was not written on).
    for head in b.heads() {
        for added in [
            "x-forwarded-for: ",
            "x-scp-request-id: ",
            "x-scp-stage: prod\r\n",
        ] {
            assert_eq!(head.matches(added).count(), 1, "{added}: {head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_its_request_waits_cancels_the_backend_call() {
    // The gateway notices a client's end while the client's request waits on the backend
    // (hyper's read for the end of the connection, made while a request is in flight; the
    // vendored hyper makes it without growing the read buffer, vendor/hyper/PATCHED.md),
    // and drops the backend call: the backend connection, which could not be reused with
    // an answer outstanding, is closed long before the integration timeout.
    let b = RawBackend::start(Behaviour::NeverAnswers).await;
    let api = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .stage(|s| s["integration_timeout_ms"] = serde_json::json!(60_000))
        .build();
    let gw = Gateway::start(&[("api1.json", &api)], ONE_WORKER);
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || b.requests().len() == 1)
            .await
            .is_some(),
        "the backend got the request"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.ended.load(Ordering::SeqCst),
        0,
        "the backend connection stays open while the client waits"
    );
    drop(client);
    assert!(
        eventually(Duration::from_secs(20), async || b
            .ended
            .load(Ordering::SeqCst)
            == 1)
        .await
        .is_some(),
        "the gateway closed the backend connection after the client left (the integration \
         timeout is 60 s)"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}
