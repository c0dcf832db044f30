//! Issue 9: slow and hostile clients. 10,000 slowloris connections while a well-behaved
//! client keeps getting 200s with bounded memory; slow bodies and slow readers; the
//! connection cap.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const HOST: &str = "api.test";

fn api(b: &Backend) -> Value {
    orders_api(b)
        .resource("/big", &[("GET", &b.url("/big"))])
        .stage(|s| s["integration_timeout_ms"] = serde_json::json!(1500))
        .build()
}

const SLOWLORIS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_slowloris_connections() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &api(&b))],
        "[limits]\nhead_read_timeout = \"30s\"\n",
    );
    let c = client();
    let baseline = gw.rss_kib();
    // Each connection sends an incomplete head, then one more byte now and then.
    let mut socks = Vec::with_capacity(SLOWLORIS);
    let head = format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ");
    for _ in 0..SLOWLORIS {
        let mut s = TcpStream::connect(gw.addr).expect("connect");
        s.write_all(head.as_bytes()).unwrap();
        socks.push(s);
    }
    let mut ok = 0;
    let mut peak = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        for s in socks.iter_mut().step_by(7) {
            let _ = s.write_all(b"a");
        }
        let r = gw.get(&c, HOST, "/prod/orders").await;
        assert_eq!(r.status(), 200, "a well-behaved client is served");
        ok += 1;
        peak = peak.max(gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The slow connections are still open (the head timeout has not passed).
    let mut probe = socks.pop().unwrap();
    probe.write_all(b"b").unwrap();
    eprintln!(
        "{SLOWLORIS} slowloris connections: {ok} requests of a normal client served, gateway RSS {baseline} KiB → peak {peak} KiB"
    );
    assert!(ok >= 10);
    assert!(
        peak < 300 * 1024,
        "RSS {peak} KiB with {SLOWLORIS} slowloris connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_head_timeout() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &api(&b))],
        "[limits]\nhead_read_timeout = \"1s\"\n",
    );
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    // One header byte every 300 ms: each byte arrives well within any per-read timeout,
    // but the head as a whole is not complete in time.
    let head = format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: aaaaaaaaaaaaaaaa");
    let mut closed = false;
    for byte in head.as_bytes() {
        if s.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    // By now (2 s, twice the head timeout) the gateway has closed its side: the read ends
    // at once instead of waiting.
    let mut buf = [0u8; 1024];
    let read = s.read(&mut buf);
    let n = read.as_ref().map_or(0, |n| *n);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        closed || matches!(read, Ok(0)) || answer.starts_with("HTTP/1.1 408"),
        "the slow head is cut: {read:?} {answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(b.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_and_slow_reader() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    let c = client();

    // Slow body: 1 KiB promised, a byte every 200 ms. The stage's integration timeout
    // (1.5 s) ends it with 504; meanwhile others are served.
    let addr = gw.addr;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        s.write_all(
            format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1024\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut answer = Vec::new();
        for _ in 0..40 {
            if s.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1024];
            if let Ok(n) = s.read(&mut buf) {
                answer.extend_from_slice(&buf[..n]);
                if n == 0 || !answer.is_empty() {
                    break;
                }
            }
            s.set_nonblocking(false).unwrap();
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    for _ in 0..5 {
        assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    }
    let (answer, took) = slow.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 504"),
        "slow body ends at the integration timeout: {answer:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // Slow reader: asks for 50 MiB and reads nothing. Backpressure keeps the gateway's
    // memory flat; others are served.
    let before = gw.rss_kib();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(format!("GET /prod/big?mb=50 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        assert_eq!(gw.get(&c, HOST, "/prod/orders").await.status(), 200);
    }
    let during = gw.rss_kib();
    drop(s);
    eprintln!("slow reader of 50 MiB: gateway RSS {before} KiB → {during} KiB");
    assert!(
        during < before + 16 * 1024,
        "a slow reader must not make the gateway buffer the body: {before} → {during} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_closes_connections_over_it() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &api(&b))],
        "[limits]\nmax_connections = 50\n",
    );
    let held: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(gw.addr).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The 51st is accepted and closed at once.
    let answer = raw(
        gw.addr,
        format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert!(answer.is_empty(), "over the cap: {answer:?}");
    assert!(gw.log().contains("connection cap reached"));
    // Slots come back when connections close.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = raw(
            gw.addr,
            format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
