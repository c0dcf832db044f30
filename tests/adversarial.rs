//! Issue 9: adversarial HTTP over raw TCP. Request smuggling variants, malformed framing,
//! oversize heads and URIs, invalid methods, host confusion and HTTP/2 floods, each with the
//! status the gateway must answer and proof that the backend received nothing ambiguous.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const HOST: &str = "api.test";

fn api(b: &Backend) -> Value {
    orders_api(b).build()
}

/// Sends `pieces` as separate writes, a moment apart, and reads the whole answer (the
/// gateway closes, or 2 s pass).
fn raw_in_pieces(addr: std::net::SocketAddr, pieces: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for p in pieces {
        s.write_all(p).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A POST head with extra header lines, then `body`.
fn post(extra: &str, body: &str) -> String {
    format!("POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n{body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_malformed_framing_are_refused() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    let cases: Vec<(&str, String, u16)> = vec![
        ("CL then TE", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), 400),
        ("TE then CL", post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"), 400),
        ("duplicated equal Content-Length", post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"), 400),
        ("CL then TE, other cases", post("CONTENT-LENGTH: 5\r\ntransfer-encoding: chunked\r\n", "0\r\n\r\n"), 400),
        ("duplicated Content-Length, other cases", post("content-length: 5\r\nCONTENT-LENGTH: 5\r\n", "hello"), 400),
        (
            "TE then CL, bare LF line ends",
            format!("POST /prod/orders HTTP/1.1\nHost: {HOST}\nTransfer-Encoding: chunked\nContent-Length: 5\n\n0\n\n"),
            400,
        ),
        ("conflicting Content-Length", post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"), 400),
        ("Content-Length list", post("Content-Length: 5, 5\r\n", "hello"), 400),
        ("signed Content-Length", post("Content-Length: +5\r\n", "hello"), 400),
        ("negative Content-Length", post("Content-Length: -1\r\n", "hello"), 400),
        ("hex Content-Length", post("Content-Length: 0x5\r\n", "hello"), 400),
        ("Content-Length with inner space", post("Content-Length: 5 5\r\n", "hello"), 400),
        ("TE xchunked", post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), 400),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), 400),
        ("TE twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), 400),
        ("TE gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"), 400),
        ("space before the colon", post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), 400),
        ("obs-fold", post("X-Folded: a\r\n b\r\nContent-Length: 0\r\n", ""), 400),
        ("NUL in a header value", post("X-Nul: a\0b\r\nContent-Length: 0\r\n", ""), 400),
        ("chunk size overflow", post("Transfer-Encoding: chunked\r\n", "fffffffffffffffffff\r\nx\r\n0\r\n\r\n"), 400),
        ("invalid chunk size", post("Transfer-Encoding: chunked\r\n", "zz\r\nx\r\n0\r\n\r\n"), 400),
        ("invalid method token", format!("G(T /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), 400),
        ("no Host", "GET /prod/orders HTTP/1.1\r\n\r\n".to_owned(), 400),
        ("two Hosts", format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nHost: evil.test\r\n\r\n"), 400),
        ("absolute URI, other host", format!("GET http://evil.test/prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), 400),
        ("HTTP/1.0 with TE", format!("POST /prod/orders HTTP/1.0\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
        ("unknown version", format!("GET /prod/orders HTTP/1.7\r\nHost: {HOST}\r\n\r\n"), 400),
    ];
    for (what, req, status) in &cases {
        let answer = raw(gw.addr, req.as_bytes());
        let got = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok());
        assert!(
            got == Some(*status) || (got.is_none() && *status == 400),
            "{what}: expected {status}, got {answer:?}"
        );
    }
    assert!(
        b.seen().is_empty(),
        "nothing ambiguous reached the backend: {:?}",
        b.seen()
    );
    // An ambiguous head after a clean request on the same connection, and one whose bytes
    // come in pieces (the second `Content-Length` split across writes): refused all the
    // same; only the clean request reaches the backend.
    let answer = raw(
        gw.addr,
        format!(
            "GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n\r\n{}",
            post(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n"
            )
        )
        .as_bytes(),
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    let head = post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello");
    let cut = head.find("Length: 5\r\n\r\n").unwrap() + 3;
    let answer = raw_in_pieces(gw.addr, &[&head.as_bytes()[..cut], &head.as_bytes()[cut..]]);
    assert_eq!(raw_status(&answer), 400, "{answer}");
    assert_eq!(b.seen().len(), 1, "{:?}", b.seen());
    // The gateway is still serving.
    let r = gw.get(&client(), HOST, "/prod/orders").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerated_framing_reaches_the_backend_normalised() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    // Bare LF line ends (RFC 9112 §2.2 lets a recipient accept them): parsed the same way
    // as CRLF, and forwarded re-serialised with CRLF, so the backend cannot read it otherwise.
    let answer = raw(
        gw.addr,
        format!("POST /prod/orders HTTP/1.1\nHost: {HOST}\nContent-Length: 5\nConnection: close\n\nhello").as_bytes(),
    );
    assert_eq!(raw_status(&answer), 200, "{answer}");
    // Chunked with an upper-case coding name and a chunk extension.
    let answer = raw(
        gw.addr,
        post(
            "Transfer-Encoding: CHUNKED\r\nConnection: close\r\n",
            "5;ext=1\r\nhello\r\n0\r\n\r\n",
        )
        .as_bytes(),
    );
    assert_eq!(raw_status(&answer), 200, "{answer}");
    // A pipelined second request after a complete first one is its own request.
    let answer = raw(
        gw.addr,
        format!(
            "POST /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\nGET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let seen = b.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!((seen[0].method.as_str(), seen[0].body_len), ("POST", 5));
    assert_eq!((seen[1].method.as_str(), seen[1].body_len), ("POST", 5));
    assert_eq!((seen[2].method.as_str(), seen[2].body_len), ("POST", 0));
    assert_eq!((seen[3].method.as_str(), seen[3].body_len), ("GET", 0));
    for s in &seen {
        assert!(
            !(s.headers.contains_key("transfer-encoding")
                && s.headers.contains_key("content-length")),
            "forwarded framing is unambiguous: {:?}",
            s.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_heads_uris_and_header_counts() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    let long_value = "a".repeat(20 * 1024);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_uri = format!("/prod/orders?q={}", "b".repeat(9 * 1024));
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "20 KiB header",
            format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {long_value}\r\n\r\n"),
            431,
        ),
        (
            "150 headers",
            format!("GET /prod/orders HTTP/1.1\r\nHost: {HOST}\r\n{many}\r\n"),
            431,
        ),
        (
            "9 KiB URI",
            format!("GET {long_uri} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            414,
        ),
    ];
    for (what, req, status) in &cases {
        let answer = raw(gw.addr, req.as_bytes());
        assert_eq!(raw_status(&answer), *status, "{what}: {answer}");
    }
    assert!(b.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_floods_and_rapid_reset() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &api(&b))],
        "[limits]\nmax_concurrent_streams = 50\n",
    );
    // Too many streams: the server's SETTINGS cap concurrency at 50 (h2 refuses streams
    // over the advertised limit with REFUSED_STREAM).
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn_task = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    // One complete exchange first, so that the server's SETTINGS have been received.
    let uri = format!("http://{HOST}/prod/orders");
    let (resp, _) = send
        .send_request(http::Request::get(&uri).body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(
        send.current_max_send_streams(),
        50,
        "the server caps concurrent streams at limits.max_concurrent_streams"
    );
    // Rapid reset (CVE-2023-44487): open and cancel streams as fast as possible.
    let started = Instant::now();
    let mut opened = 0;
    let mut refused = false;
    while opened < 20_000 && started.elapsed() < Duration::from_secs(20) {
        let req = http::Request::get(&uri).body(()).unwrap();
        match send.send_request(req, true) {
            Ok((resp, _)) => {
                drop(resp);
                opened += 1;
            }
            Err(_) => {
                refused = true;
                break;
            }
        }
        if opened % 100 == 0 {
            match send.clone().ready().await {
                Ok(s) => send = s,
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
    }
    // The server ends a rapid-reset connection (GOAWAY) long before 20,000 streams, and goes
    // on serving everyone else; the backend saw at most what was opened.
    assert!(refused, "rapid reset of {opened} streams was not stopped");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    let r = gw.get(&client(), HOST, "/prod/orders").await;
    assert_eq!(
        r.status(),
        200,
        "still serving after {opened} reset streams"
    );
    assert!(b.seen().len() <= opened + 2);
    eprintln!(
        "rapid reset: {opened} streams opened and reset in {:?}; connection ended by the server: {refused}",
        started.elapsed()
    );
}

/// HPACK "literal header field without indexing", new name (RFC 7541 §6.2.2); names and
/// values shorter than 127 bytes.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// HPACK literal without indexing whose name is static-table entry `index` (1–15).
fn hpack_indexed_name(out: &mut Vec<u8>, index: u8, value: &str) {
    out.push(index);
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads frames until one on `stream` says how the request ended: `Ok(error code)` for a
/// RST_STREAM (or GOAWAY), `Err(first HPACK byte)` for a response HEADERS frame.
fn h2_outcome(s: &mut std::net::TcpStream, stream: u32) -> Result<u32, u8> {
    use std::io::Read;
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).expect("the gateway answers");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        match head[3] {
            3 if id == stream => return Ok(u32::from_be_bytes(payload[..4].try_into().unwrap())),
            7 => return Ok(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            1 if id == stream => return Err(payload[0]),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_trailers_with_a_pseudo_header_are_refused() {
    // Issue 13, item 5: RFC 9113 §8.1 makes a request whose trailers carry a pseudo-header
    // malformed. The gateway used to drop the field and serve the request.
    use std::io::Write;
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &api(&b))], "");
    let send = |trailer_path: bool| -> Result<u32, u8> {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = vec![0x83, 0x86]; // :method POST, :scheme http
        hpack_indexed_name(&mut head, 4, "/prod/orders"); // :path
        hpack_indexed_name(&mut head, 1, HOST); // :authority
        let mut trailers = Vec::new();
        if trailer_path {
            hpack_indexed_name(&mut trailers, 4, "/prod/other"); // :path in trailers
        }
        hpack_literal(&mut trailers, "x-checksum", "abc");
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(h2_frame(4, 0, 0, &[])); // SETTINGS
        bytes.extend(h2_frame(1, 0x4, 1, &head)); // HEADERS, END_HEADERS
        bytes.extend(h2_frame(0, 0, 1, b"hello")); // DATA
        bytes.extend(h2_frame(1, 0x4 | 0x1, 1, &trailers)); // trailers, END_STREAM
        s.write_all(&bytes).unwrap();
        h2_outcome(&mut s, 1)
    };
    // Well-formed trailers: served (`:status: 200` is static entry 8, 0x88).
    assert_eq!(
        send(false),
        Err(0x88),
        "a request with plain trailers is served"
    );
    let served_before = b.seen().len();
    // A pseudo-header in the trailers: stream error PROTOCOL_ERROR (1).
    assert_eq!(send(true), Ok(1), "RST_STREAM with PROTOCOL_ERROR");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.seen().len(),
        served_before,
        "the backend never saw a complete request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_cookie_crumbs_are_joined_and_get_bodies_are_forwarded() {
    // Issue 13, item 5: RFC 9113 §8.2.3: cookie crumbs of an HTTP/2 request MUST be joined
    // with "; " before an HTTP/1.1 hop.
    let b = Backend::start("b").await;
    let doc = orders_api(&b)
        .resource("/any", &[("ANY", &b.url("/any"))])
        .build();
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let mut send = h2c_sender(gw.addr).await;
    let req = http::Request::builder()
        .uri(format!("http://{HOST}/prod/orders"))
        .version(http::Version::HTTP_2)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = b.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"], "one Cookie line");

    // A GET or HEAD with a chunked body keeps its body, as with Content-Length.
    for method in ["GET", "HEAD"] {
        for framing in [
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "Content-Length: 5\r\n\r\nhello",
        ] {
            let req = format!(
                "{method} /prod/any HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{framing}"
            );
            let answer = raw(gw.addr, req.as_bytes());
            assert_eq!(raw_status(&answer), 200, "{method} {framing:?}: {answer}");
            let seen = b.last();
            assert_eq!(
                (seen.method.as_str(), seen.body_len),
                (method, 5),
                "{method} {framing:?}"
            );
        }
    }
}
