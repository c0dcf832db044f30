//! Issue 9: backend faults. A backend that resets mid-body, cuts a chunked body short,
//! answers garbage, closes before answering or never answers: the client gets a clean
//! 502/504 or a stream that ends in an error, never a hang, and the gateway keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const HOST: &str = "api.test";

/// A raw backend: reads a request head and misbehaves as its path says.
fn faulty_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                match path.as_str() {
                    "/reset-mid-body" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                        let _ = s.write_all(&[b'x'; 1000]);
                        std::thread::sleep(Duration::from_millis(300));
                        // SO_LINGER 0: the close is a reset.
                        let sock = reset_on_close(s);
                        drop(sock);
                    }
                    "/truncated-chunked" => {
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                        );
                        std::thread::sleep(Duration::from_millis(50));
                        drop(s);
                    }
                    "/garbage" => {
                        let _ = s.write_all(b"HTTP/1.1 banana\r\n\r\n");
                    }
                    "/close" => drop(s),
                    "/never" => std::thread::sleep(Duration::from_secs(30)),
                    _ => {
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
    });
    addr
}

/// Closes with RST instead of FIN (SO_LINGER 0).
fn reset_on_close(s: TcpStream) -> TcpStream {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    s
}

fn api(backend: SocketAddr) -> Value {
    let url = |p: &str| format!("http://{backend}{p}");
    let mut b = SnapshotBuilder::new("api1", &[HOST]);
    for p in [
        "/reset-mid-body",
        "/truncated-chunked",
        "/garbage",
        "/close",
        "/never",
        "/fine",
    ] {
        b = b.resource(p, &[("GET", &url(p))]);
    }
    b.stage(|s| s["integration_timeout_ms"] = serde_json::json!(1000))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_faults_end_cleanly() {
    let backend = faulty_backend();
    let gw = Gateway::start(&[("api1.json", &api(backend))], "");
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    for (path, status) in [("/garbage", 502), ("/close", 502), ("/never", 504)] {
        let started = Instant::now();
        let r = gw.get(&c, HOST, &format!("/prod{path}")).await;
        assert_eq!(r.status(), status, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
        let v: Value = r.json().await.unwrap();
        assert!(v["code"].is_string(), "{path}: a JSON error body");
    }
    // Faults after the head was forwarded: the status is already sent, so the stream must
    // end in an error (not a hang, not a clean short body that looks complete).
    for path in ["/reset-mid-body", "/truncated-chunked"] {
        let started = Instant::now();
        let r = gw.get(&c, HOST, &format!("/prod{path}")).await;
        assert_eq!(r.status(), 200, "{path}: the head was already forwarded");
        let body = r.bytes().await;
        assert!(
            body.is_err(),
            "{path}: the client sees the stream fail, got {body:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    // The gateway keeps serving.
    for _ in 0..3 {
        let r = gw.get(&c, HOST, "/prod/fine").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
}
