//! Issue 6 (integrations): SCF functions and PRIVATELINK endpoints through the real gateway.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Either, Full};
use serde_json::{json, Value};

const HOST: &str = "api.test";

/// A function host: records each event and answers according to the path.
async fn function_host() -> (std::net::SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = events.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let ct = req.headers().get("content-type").cloned();
                            // The function endpoint's own Host, never the client's.
                            assert_eq!(
                                req.headers()
                                    .get("host")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                                Some(addr.to_string())
                            );
                            let raw = req.into_body().collect().await.unwrap().to_bytes();
                            let event: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                            assert_eq!(
                                ct.as_ref().map(|v| v.to_str().unwrap()),
                                Some("application/json")
                            );
                            seen.lock().unwrap().push(event);
                            let (status, body): (u16, Vec<u8>) = match path.as_str() {
                            "/ok" => (
                                200,
                                json!({
                                    "status_code": 201,
                                    "headers": {"x-fn": "yes", "content-type": "application/octet-stream"},
                                    "multi_value_headers": {"set-cookie": ["a=1", "b=2"]},
                                    "body": base64::engine::general_purpose::STANDARD.encode([0u8, 1, 2, 255, 254]),
                                    "is_base64_encoded": true
                                })
                                .to_string()
                                .into_bytes(),
                            ),
                            "/text" => (200, br#"{"status_code": 200, "body": "plain text"}"#.to_vec()),
                            "/endpoint-500" => (500, br#"{"status_code": 200}"#.to_vec()),
                            "/not-json" => (200, b"<html>".to_vec()),
                            "/bad-code" => (200, br#"{"status_code": 700}"#.to_vec()),
                            "/bad-base64" => (200, br#"{"status_code": 200, "body": "%%%", "is_base64_encoded": true}"#.to_vec()),
                            "/stalls" => (200, Vec::new()),
                            "/too-big" => {
                                let big = "x".repeat(7 * 1024 * 1024);
                                (200, json!({"status_code": 200, "body": big}).to_string().into_bytes())
                            }
                            _ => (404, Vec::new()),
                        };
                            // `/stalls`: the head and a first chunk, then nothing, the
                            // connection left open.
                            let body = if path == "/stalls" {
                                let first = futures_util::stream::once(async {
                                    Ok::<_, Infallible>(hyper::body::Frame::data(
                                        Bytes::from_static(b"{\"status_code\":"),
                                    ))
                                });
                                Either::Right(http_body_util::StreamBody::new(
                                    first.chain(futures_util::stream::pending()),
                                ))
                            } else {
                                Either::Left(Full::new(Bytes::from(body)))
                            };
                            let mut resp = http::Response::new(body);
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (addr, events)
}

fn scf(function_id: &str) -> Value {
    json!({"method_type": "POST", "integration_type": "SCF", "function_id": function_id, "function_name": function_id})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_events_and_answers() {
    let (fh, events) = function_host().await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[])
        .resource("/orders/{order-id}", &[])
        .build();
    let paths = [
        "ok",
        "text",
        "endpoint-500",
        "not-json",
        "bad-code",
        "bad-base64",
        "too-big",
    ];
    doc["functions"] = Value::Array(paths.iter().map(|p| json!({"function_id": p, "function_name": p, "invoke_url": format!("http://{fh}/{p}")})).collect());
    {
        let resources = doc["deployments"][0]["resources"].as_array_mut().unwrap();
        resources
            .iter_mut()
            .find(|r| r["path"] == "/orders/{order-id}")
            .unwrap()["methods"] = json!([scf("ok"), {"method_type": "PUT", "integration_type": "SCF", "function_id": "text"}]);
        for p in &paths[2..] {
            resources.push(json!({"id": format!("fn-{p}"), "parent_id": "root", "path": format!("/{p}"), "path_part": p, "methods": [scf(p)]}));
        }
    }
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["usage_plans"] = json!([{"id": "up1", "name": "p", "limit": 100, "rate": "day", "api_keys": [{"id": "k1", "name": "k", "key": "fn-key-value"}]}]);
    doc["deployments"][0]["resources"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["path"] == "/orders/{order-id}")
        .unwrap()["methods"][0]["api_key_required"] = json!(true);
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();

    // A text body: the event carries exactly the request; the answer reaches the client byte for byte.
    let r = gw
        .req(
            &c,
            reqwest::Method::POST,
            HOST,
            "/prod/orders/42?page=1&page=2&q=a%20b",
        )
        .header("x-scp-apikey", "fn-key-value")
        .header("x-multi", "one")
        .header("X-Multi", "two")
        .header("content-type", "text/plain")
        .body("hello function")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-fn"], "yes");
    let cookies: Vec<_> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(cookies, vec!["a=1", "b=2"]);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &[0u8, 1, 2, 255, 254]);
    let e = events.lock().unwrap().last().cloned().unwrap();
    assert_eq!(e["version"], "1.0");
    assert_eq!(e["api_id"], "api1");
    assert_eq!(e["stage"], "prod");
    assert_eq!(e["deployment_id"], "d1");
    assert_eq!(e["resource_path"], "/orders/{order-id}");
    assert_eq!(e["path"], "/orders/42");
    assert_eq!(e["http_method"], "POST");
    assert_eq!(e["path_parameters"], json!({"order-id": "42"}));
    assert_eq!(
        e["query_string_parameters"],
        json!({"page": "2", "q": "a b"})
    );
    assert_eq!(
        e["multi_value_query_string_parameters"],
        json!({"page": ["1", "2"], "q": ["a b"]})
    );
    assert_eq!(e["headers"]["x-multi"], "two");
    assert_eq!(e["multi_value_headers"]["x-multi"], json!(["one", "two"]));
    assert_eq!(e["headers"]["content-type"], "text/plain");
    assert!(
        e["headers"].get("x-scp-apikey").is_none(),
        "the key is never passed on"
    );
    assert_eq!(e["headers"]["x-scp-api-key-id"], "k1");
    assert_eq!(e["body"], "hello function");
    assert_eq!(e["is_base64_encoded"], false);
    assert_eq!(e["request_context"]["source_ip"], "127.0.0.1");
    assert_eq!(e["request_context"]["api_key_id"], "k1");
    assert!(
        e["request_context"]["request_time_epoch_ms"]
            .as_i64()
            .unwrap()
            > 1_700_000_000_000
    );
    assert_eq!(e["request_id"].as_str().unwrap().len(), 32);

    // A binary body is base64 with is_base64_encoded; no body is null.
    let r = gw
        .req(&c, reqwest::Method::PUT, HOST, "/prod/orders/7")
        .body(vec![0xffu8, 0x00, 0x80])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "plain text");
    let e = events.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (e["body"].as_str(), e["is_base64_encoded"].as_bool()),
        (Some("/wCA"), Some(true))
    );
    assert!(e["request_context"]["api_key_id"].is_null());
    gw.req(&c, reqwest::Method::PUT, HOST, "/prod/orders/7")
        .send()
        .await
        .unwrap();
    assert!(events.lock().unwrap().last().unwrap()["body"].is_null());

    // Every malformed answer is a 502.
    for p in &paths[2..] {
        let r = gw
            .req(&c, reqwest::Method::POST, HOST, &format!("/prod/{p}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{p}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "INTEGRATION_FAILURE",
            "{p}"
        );
    }
    let m = gw.metrics().await;
    assert!(m.contains(r#"apigw_integration_duration_seconds_count{api_id="api1",integration="SCF",stage="prod"}"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_answer_that_stops_coming_is_a_504() {
    let (fh, events) = function_host().await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .stage(|s| s["integration_timeout_ms"] = json!(300))
        .build();
    doc["functions"] = json!([{"function_id": "stalls", "function_name": "stalls", "invoke_url": format!("http://{fh}/stalls")}]);
    doc["deployments"][0]["resources"].as_array_mut().unwrap().push(json!({"id": "fn-stalls", "parent_id": "root", "path": "/stalls", "path_part": "stalls", "methods": [scf("stalls")]}));
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    // The head and a first chunk arrive at once, the rest never: the integration timeout
    // covers the whole answer of a function, not only its head.
    let r = gw
        .req(&client(), reqwest::Method::POST, HOST, "/prod/stalls")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "INTEGRATION_TIMEOUT"
    );
    assert_eq!(events.lock().unwrap().len(), 1, "the function was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privatelink_connects_to_the_target() {
    let b = Backend::start("private").await;
    let (tls_addr, ca_pem, _task) = tls_backend().await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/items", &[])
        .resource("/items/{item-id}", &[])
        .resource("/secure", &[])
        .resource("/down", &[])
        .build();
    {
        let resources = doc["deployments"][0]["resources"].as_array_mut().unwrap();
        let pl = |endpoint: &str, url: &str| json!([{"method_type": "ANY", "integration_type": "PRIVATELINK", "privatelink_endpoint_id": endpoint, "endpoint_url": url}]);
        resources
            .iter_mut()
            .find(|r| r["path"] == "/items/{item-id}")
            .unwrap()["methods"] = pl(
            "pl-http",
            "http://orders.internal.invalid:8080/v1/items/{item-id}?src=pl",
        );
        resources
            .iter_mut()
            .find(|r| r["path"] == "/secure")
            .unwrap()["methods"] = pl("pl-tls", "https://localhost:9443/secure");
        resources.iter_mut().find(|r| r["path"] == "/down").unwrap()["methods"] =
            pl("pl-rejected", "http://down.internal.invalid/x");
    }
    doc["privatelink_endpoints"] = json!([
        {"id": "pl-http", "name": "orders", "status": "Active", "target": b.addr.to_string()},
        {"id": "pl-tls", "name": "secure", "status": "Active", "target": tls_addr.to_string()},
        {"id": "pl-rejected", "name": "down", "status": "Rejected", "target": b.addr.to_string()}
    ]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    write_json(&dir.path().join("snapshots/api1.json"), &doc);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let gw = Gateway::start_with_args(dir, &format!("[upstream]\nextra_ca_file = {ca:?}\n"), &[]);
    let c = client();

    // endpoint_url names a host that does not resolve: the request still reaches the target.
    let r = gw
        .req(&c, reqwest::Method::DELETE, HOST, "/prod/items/5?x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = b.last();
    assert_eq!(seen.method, "DELETE");
    assert_eq!(seen.uri, "/v1/items/5?src=pl&x=1");
    assert_eq!(seen.headers["host"], "orders.internal.invalid:8080");
    assert_eq!(seen.headers["x-scp-stage"], "prod");
    // https: TLS to the target with the URL's host as server name (certificate for localhost).
    let r = gw.get(&c, HOST, "/prod/secure").await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // Only Active endpoints carry traffic.
    let before = b.seen().len();
    let r = gw.get(&c, HOST, "/prod/down").await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "ENDPOINT_UNAVAILABLE"
    );
    assert_eq!(b.seen().len(), before);
}

fn proxy_header(endpoint: Option<&str>) -> Vec<u8> {
    use ppp::v2::{Builder, Command, IPv4, Protocol, Version};
    let addrs: ppp::v2::Addresses = IPv4::new([198, 51, 100, 20], [10, 0, 0, 1], 40000, 443).into();
    let mut b = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addrs);
    if let Some(id) = endpoint {
        b = b.write_tlv(0xE0u8, id.as_bytes()).unwrap();
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_api_through_proxy_protocol() {
    let b = Backend::start("private").await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/items", &[("GET", &b.url("/items"))])
        .build();
    doc["api"]["endpoint_type"] = json!("PRIVATE");
    doc["connected_endpoints"] = json!([{"id": "ep-active", "status": "Active"}, {"id": "ep-gone", "status": "Disconnected"}]);
    // JWT is enforced for PRIVATE APIs even with jwt_enabled off; access controls do not apply.
    doc["stages"][0]["ip_restriction_enabled"] = json!(true);
    let secret = b"private-api-secret-private-api-secret-0123";
    doc["auths"] = json!([{"id": "au1", "name": "a", "connected_stages": ["prod"],
        "verification": {"alg": "HS256", "secret_base64": base64::engine::general_purpose::STANDARD.encode(secret)}}]);
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        "[server]\nproxy_protocol_listen = [\"127.0.0.1:0\"]\n",
    );
    let proxy = gw.proxy_addr.expect("a PROXY listener");
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
    let token = jsonwebtoken::encode(
        &Default::default(),
        &json!({"sub": "consumer", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    let request = |auth: bool| {
        let mut r = format!("GET /prod/items HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n");
        if auth {
            r.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    };
    let via = |endpoint: Option<&str>, auth: bool| {
        let mut bytes = proxy_header(endpoint);
        bytes.extend(request(auth));
        raw(proxy, &bytes)
    };

    let answer = via(Some("ep-active"), true);
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert_eq!(
        b.last().headers["x-forwarded-for"],
        "198.51.100.20",
        "the PROXY source is the client address"
    );
    assert_eq!(b.last().headers["x-scp-jwt-sub"], "consumer");
    for (endpoint, auth, status, code) in [
        (Some("ep-unknown"), true, 403, "ENDPOINT_NOT_ALLOWED"),
        (Some("ep-gone"), true, 403, "ENDPOINT_NOT_ALLOWED"),
        (None, true, 403, "ENDPOINT_NOT_ALLOWED"),
        (Some("ep-active"), false, 401, "UNAUTHORIZED"),
    ] {
        let answer = via(endpoint, auth);
        assert_eq!(
            raw_status(&answer),
            status,
            "{endpoint:?} auth={auth}: {answer}"
        );
        assert!(answer.contains(code), "{answer}");
    }
    // No PROXY header on a PROXY listener: closed without an answer.
    assert_eq!(raw(proxy, &request(true)), "");
    // The plain listener carries no endpoint id: refused; a forged header changes nothing.
    let answer = raw(gw.addr, &request(true));
    assert_eq!(raw_status(&answer), 403);
    assert!(answer.contains("ENDPOINT_NOT_ALLOWED"));
    let forged = String::from_utf8(request(true)).unwrap().replace(
        "\r\n\r\n",
        "\r\nx-scp-privatelink-endpoint-id: ep-active\r\n\r\n",
    );
    assert_eq!(
        raw_status(&raw(gw.addr, forged.as_bytes())),
        403,
        "untrusted peers cannot name an endpoint"
    );
    drop(gw);
    // From a trusted proxy, the header names the endpoint.
    let gw = Gateway::start(
        &[("api1.json", &doc)],
        "[network]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    assert_eq!(raw_status(&raw(gw.addr, forged.as_bytes())), 200);
    let gone = forged.replace("ep-active", "ep-gone");
    assert_eq!(raw_status(&raw(gw.addr, gone.as_bytes())), 403);
}
