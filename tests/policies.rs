//! Issue 3 "done when": the access policies through the real gateway, in the order and with
//! the status codes of the request pipeline.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";

fn hs_secret_b64() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(b"policy-test-secret-policy-test-secret-0123456789")
}

fn hs_token(claims: Value, kid: Option<&str>) -> String {
    let header = jsonwebtoken::Header {
        kid: kid.map(str::to_owned),
        ..Default::default()
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(
            b"policy-test-secret-policy-test-secret-0123456789",
        ),
    )
    .unwrap()
}

/// Keys and tokens made by PyJWT (tests/scripts/jwt_interop.py).
fn interop_tokens() -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/jwt_interop.py");
    let out = Command::new("python3").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "PyJWT missing? {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Sets fields of method `verb` on resource `path` of deployment `d1`.
fn method_mut(doc: &mut Value, path: &str, verb: &str, f: impl FnOnce(&mut Value)) {
    let resources = doc["deployments"][0]["resources"].as_array_mut().unwrap();
    let r = resources
        .iter_mut()
        .find(|r| r["path"] == path)
        .expect("resource");
    let m = r["methods"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["method_type"] == verb)
        .expect("method");
    f(m);
}

/// Adds a stage that serves deployment `d1`.
fn add_stage(doc: &mut Value, stage: Value) {
    let mut st = stage;
    st["deployment_id"] = json!("d1");
    doc["stages"].as_array_mut().unwrap().push(st);
}

async fn code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["code"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_access_control_and_client_address() {
    let b = Backend::start("b").await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/items", &[("GET", &b.url("/items"))])
        .build();
    doc["stages"] = json!([]);
    add_stage(
        &mut doc,
        json!({"name": "office", "ip_restriction_enabled": true}),
    );
    add_stage(
        &mut doc,
        json!({"name": "nobody", "ip_restriction_enabled": true}),
    );
    add_stage(
        &mut doc,
        json!({"name": "local", "ip_restriction_enabled": true}),
    );
    add_stage(&mut doc, json!({"name": "open"}));
    doc["access_controls"] = json!([
        {"id": "ac1", "name": "office", "allowed_ip_addr": ["203.0.113.0/24,198.51.100.7", "2001:db8::/32"], "connected_stages": ["office"]},
        {"id": "ac2", "name": "loopback", "allowed_ip_addr": ["127.0.0.1/24", "::1"], "connected_stages": ["local,elsewhere"]}
    ]);

    // An untrusted peer's X-Forwarded-For is ignored: the peer (127.0.0.1) is judged.
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/office/items")
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (403, "IP_NOT_ALLOWED".into()));
    assert_eq!(
        code(gw.get(&c, HOST, "/nobody/items").await).await,
        (403, "IP_NOT_ALLOWED".into()),
        "all deny by default"
    );
    assert_eq!(
        gw.get(&c, HOST, "/local/items").await.status(),
        200,
        "127.0.0.1 inside 127.0.0.1/24 (host bits)"
    );
    assert_eq!(gw.get(&c, HOST, "/open/items").await.status(), 200);
    // Denied before routing: an unknown resource is not revealed.
    assert_eq!(
        code(gw.get(&c, HOST, "/office/secret").await).await,
        (403, "IP_NOT_ALLOWED".into())
    );
    // The backend sees the peer appended to the client's X-Forwarded-For.
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/local/items")
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        b.last().headers["x-forwarded-for"],
        "203.0.113.5, 127.0.0.1"
    );
    drop(gw);

    // Behind a trusted proxy the right-most untrusted X-Forwarded-For hop is the client; the
    // listener is dual-stack, so the IPv4 peer arrives as ::ffff:127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    write_json(&dir.path().join("snapshots/api1.json"), &doc);
    let gw = Gateway::start_with_args(
        dir,
        "[network]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        &["--listen", "[::]:0"],
    );
    let v4 = format!("http://127.0.0.1:{}", gw.addr.port());
    let via = |xff: &str| {
        c.get(format!("{v4}/office/items"))
            .header("host", HOST)
            .header("x-forwarded-for", xff.to_owned())
            .send()
    };
    assert_eq!(via("1.1.1.1, 203.0.113.5").await.unwrap().status(), 200);
    assert_eq!(
        via("203.0.113.5, 1.1.1.1").await.unwrap().status(),
        403,
        "right-most untrusted hop"
    );
    assert_eq!(
        via("198.51.100.7, 127.0.0.1").await.unwrap().status(),
        200,
        "trusted hops are skipped"
    );
    // The backend sees the socket peer (the trusted proxy) appended, not the client address
    // derived from the list a second time (issue 13, item 2).
    assert_eq!(via("198.51.100.7").await.unwrap().status(), 200);
    assert_eq!(
        b.last().headers["x-forwarded-for"],
        "198.51.100.7, 127.0.0.1"
    );
    assert_eq!(
        via("::ffff:203.0.113.9").await.unwrap().status(),
        200,
        "mapped IPv4 matches IPv4 entries"
    );
    assert_eq!(
        via("2001:db8::42").await.unwrap().status(),
        200,
        "IPv6 entries"
    );
    assert_eq!(via("2001:db9::42").await.unwrap().status(), 403);
    assert_eq!(
        via("not-an-ip").await.unwrap().status(),
        403,
        "malformed XFF falls back to the peer"
    );
    // IPv6 peer on the dual-stack listener, ACL entry ::1.
    let v6 = format!("http://[::1]:{}", gw.addr.port());
    let r = c
        .get(format!("{v6}/local/items"))
        .header("host", HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = gw.metrics().await;
    assert!(
        m.contains(
            r#"apigw_rejections_total{api_id="api1",code="IP_NOT_ALLOWED",stage="office"} 3"#
        ),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_policy_deny_beats_allow_and_principals() {
    let b = Backend::start("b").await;
    let srn = "srn:e::acc:kr-west1::apigateway:method/api1/*/GET/items";
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource(
            "/items",
            &[("GET", &b.url("/items")), ("POST", &b.url("/items"))],
        )
        .resource("/admin", &[("GET", &b.url("/admin"))])
        .build();
    method_mut(&mut doc, "/items", "GET", |m| m["srn"] = json!(srn));
    method_mut(&mut doc, "/admin", "GET", |m| {
        m["srn"] = json!("srn:e::acc:kr-west1::apigateway:method/api1/*/GET/admin")
    });
    doc["stages"][0]["jwt_enabled"] = json!(true);
    doc["auths"] = json!([{"id": "au1", "name": "t", "connected_stages": ["prod"],
        "verification": {"alg": "HS256", "secret_base64": hs_secret_b64()}}]);
    doc["resource_policy"] = json!({"Version": "", "Statement": [
        {"Sid": "all", "Effect": "Allow", "Principal": "*", "Action": ["apigateway:InvokeApigatewayRegion"],
         "Condition": {"SrnLike": {"scp:RequestAttribute/body['method-srn']": ["srn:e::acc:kr-west1::apigateway:method/api1/prod/GET/items"]}}},
        {"Sid": "admins", "Effect": "Allow", "Principal": {"scp": ["srn:e::acc:::iam:user/admin"]}, "Action": "apigateway:*",
         "Condition": {"SrnLike": {"scp:RequestAttribute/body['method-srn']": ["*/GET/admin"]}}},
        {"Sid": "blocked", "Effect": "Deny", "Principal": "*", "Action": "*",
         "Condition": {"SrnLike": {"scp:RequestAttribute/body['method-srn']": ["*/GET/items"]},
                       "IpAddress": {"scp:SourceIp": ["127.0.0.0/8"]}}}
    ]});
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let token = |sub: &str| hs_token(json!({"sub": sub, "exp": now() + 300}), None);
    let call = |path: &'static str, sub: &str| {
        gw.req(&c, reqwest::Method::GET, HOST, path)
            .bearer_auth(token(sub))
            .send()
    };
    assert_eq!(
        code(call("/prod/items", "u1").await.unwrap()).await,
        (403, "ACCESS_DENIED".into()),
        "Deny beats Allow"
    );
    assert_eq!(
        call("/prod/admin", "srn:e::acc:::iam:user/admin")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        code(
            call("/prod/admin", "srn:e::acc:::iam:user/bob")
                .await
                .unwrap()
        )
        .await,
        (403, "ACCESS_DENIED".into())
    );
    let r = gw
        .req(&c, reqwest::Method::POST, HOST, "/prod/items")
        .bearer_auth(token("u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (403, "ACCESS_DENIED".into()),
        "no matching Allow"
    );
    // JWT (step 9) comes before the policy (9b).
    assert_eq!(
        code(gw.get(&c, HOST, "/prod/admin").await).await,
        (401, "UNAUTHORIZED".into())
    );
    assert_eq!(
        b.last().headers["x-scp-jwt-sub"],
        "srn:e::acc:::iam:user/admin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_rejections_are_401_invalid_token() {
    let b = Backend::start("b").await;
    let interop = interop_tokens();
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/whoami", &[("GET", &b.url("/whoami"))])
        .build();
    doc["stages"][0]["jwt_enabled"] = json!(true);
    doc["auths"] = json!([
        {"id": "au1", "name": "hs", "connected_stages": ["prod"],
         "verification": {"alg": "HS256", "secret_base64": hs_secret_b64(), "audience": ["orders", "billing"], "issuer": "idp", "leeway_seconds": 10}},
        {"id": "au-old", "name": "old", "connected_stages": ["prod"], "expired_at": "2020-01-01T00:00:00Z",
         "verification": {"alg": "HS256", "secret_base64": hs_secret_b64()}},
        {"id": "au-rs", "name": "rs", "connected_stages": ["rsonly"], "verification": interop["RS256"]["verification"].clone()}
    ]);
    add_stage(&mut doc, json!({"name": "rsonly", "jwt_enabled": true}));
    add_stage(&mut doc, json!({"name": "nojwt"}));
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let with = |path: &'static str, t: String| {
        gw.req(&c, reqwest::Method::GET, HOST, path)
            .bearer_auth(t)
            .send()
    };
    let good = json!({"sub": "alice", "exp": now() + 300, "aud": "orders", "iss": "idp"});

    let r = with("/prod/whoami", hs_token(good.clone(), None))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.last().headers["x-scp-jwt-sub"], "alice");
    assert_eq!(
        with("/prod/whoami", hs_token(good.clone(), Some("au1")))
            .await
            .unwrap()
            .status(),
        200
    );

    let r = gw.get(&c, HOST, "/prod/whoami").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(code(r).await, (401, "UNAUTHORIZED".into()));

    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&good.to_string())
    );
    let mut bad: Vec<(&str, &'static str, String)> = vec![
        ("alg none", "/prod/whoami", alg_none),
        (
            "wrong kid",
            "/prod/whoami",
            hs_token(good.clone(), Some("au-unknown")),
        ),
        (
            "expired beyond leeway",
            "/prod/whoami",
            hs_token(
                json!({"exp": now() - 60, "aud": "orders", "iss": "idp"}),
                None,
            ),
        ),
        (
            "future nbf",
            "/prod/whoami",
            hs_token(
                json!({"exp": now() + 300, "nbf": now() + 120, "aud": "orders", "iss": "idp"}),
                None,
            ),
        ),
        (
            "wrong aud",
            "/prod/whoami",
            hs_token(
                json!({"exp": now() + 300, "aud": "payments", "iss": "idp"}),
                None,
            ),
        ),
        (
            "wrong iss",
            "/prod/whoami",
            hs_token(
                json!({"exp": now() + 300, "aud": "orders", "iss": "other"}),
                None,
            ),
        ),
        (
            "auth past expired_at",
            "/prod/whoami",
            hs_token(json!({"exp": now() + 300}), Some("au-old")),
        ),
        (
            "HS256 signed with the RS256 public key",
            "/rsonly/whoami",
            interop["HS256_WITH_RS256_PUBLIC_KEY"]["token"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        ("garbage", "/prod/whoami", "not.a.token".to_owned()),
    ];
    // A token valid on another stage's auth is not valid here.
    bad.push((
        "unconnected auth",
        "/prod/whoami",
        interop["RS256"]["token"].as_str().unwrap().to_owned(),
    ));
    for (what, path, token) in bad {
        let r = with(path, token).await.unwrap();
        // (tests/refusal_reasons.rs checks each reason and its `error_description`.)
        let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{what}: {challenge}"
        );
        assert_eq!(code(r).await, (401, "INVALID_TOKEN".into()), "{what}");
    }
    assert_eq!(
        with(
            "/rsonly/whoami",
            interop["RS256"]["token"].as_str().unwrap().to_owned()
        )
        .await
        .unwrap()
        .status(),
        200
    );
    // A stage without JWT forwards no x-scp-jwt-sub, even when a valid token is sent.
    let r = with("/nojwt/whoami", hs_token(good.clone(), None))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!b.last().headers.contains_key("x-scp-jwt-sub"));

    // The auth removed by a reload stops verifying at once.
    let mut next = doc.clone();
    next["revision"] = json!(2);
    next["auths"] = json!([]);
    write_json(&gw.snapshot_dir().join("api1.json"), &next);
    gw.signal("HUP");
    let mut status = 0;
    for _ in 0..50 {
        status = with("/prod/whoami", hs_token(good.clone(), None))
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 401, "token of a removed auth after reload");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"apigw_rejections_total{api_id="api1",code="INVALID_TOKEN",stage="prod"}"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_another_library_verify_for_every_algorithm() {
    let b = Backend::start("b").await;
    let interop = interop_tokens();
    let algs = [
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
        "ES384", "EdDSA", "JWKS",
    ];
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/whoami", &[("GET", &b.url("/whoami"))])
        .build();
    doc["stages"] = json!([]);
    let mut auths = Vec::new();
    for alg in algs {
        let stage = alg.to_ascii_lowercase();
        add_stage(&mut doc, json!({"name": stage, "jwt_enabled": true}));
        auths.push(json!({"id": format!("au-{stage}"), "name": stage, "connected_stages": [stage], "verification": interop[alg]["verification"]}));
    }
    doc["auths"] = Value::Array(auths);
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    for alg in algs {
        let token = interop[alg]["token"].as_str().unwrap();
        let path = format!("/{}/whoami", alg.to_ascii_lowercase());
        let r = gw
            .req(&c, reqwest::Method::GET, HOST, &path)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{alg}: {}", r.text().await.unwrap());
        assert_eq!(
            b.last().headers["x-scp-jwt-sub"],
            format!("sub-{alg}").as_str()
        );
        // The same token on another algorithm's stage is refused.
        let other = if alg == "HS256" {
            "/rs256/whoami"
        } else {
            "/hs256/whoami"
        };
        let r = gw
            .req(&c, reqwest::Method::GET, HOST, other)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{alg} on {other}");
    }
}

fn keyed_api(b: &Backend, limit: u64) -> Value {
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource(
            "/orders",
            &[("GET", &b.url("/orders")), ("POST", &b.url("/orders"))],
        )
        .resource("/free", &[("GET", &b.url("/free"))])
        .build();
    method_mut(&mut doc, "/orders", "GET", |m| {
        m["api_key_required"] = json!(true)
    });
    method_mut(&mut doc, "/orders", "POST", |m| {
        m["api_key_required"] = json!(true);
        m["request_headers"] = json!({"x-tenant": true, "x-optional": false});
        m["query_strings"] = json!({"mode": true});
    });
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["stages"][0]["usage_plan_api_keys"] =
        json!([{"id": "k1", "name": "one"}, {"id": "k2", "name": "two"}]);
    add_stage(&mut doc, json!({"name": "dev", "usage_plan_id": "up1"}));
    doc["usage_plans"] = json!([{"id": "up1", "name": "basic", "limit": limit, "rate": "day", "api_keys": [
        {"id": "k1", "name": "one", "key": "key-one-value"},
        {"id": "k2", "name": "two", "key_sha256": "7a336e272192af4a2c17594309c9041425cb9ed3aa05fe3f4687dd6fbb8638a7"},
        {"id": "k3", "name": "three", "key": "key-three-value"}
    ]}]);
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_required_parameters() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &keyed_api(&b, 1000))], "");
    let c = client();
    let with_key = |path: &'static str, key: &'static str| {
        gw.req(&c, reqwest::Method::GET, HOST, path)
            .header("x-scp-apikey", key)
            .send()
    };
    assert_eq!(
        code(gw.get(&c, HOST, "/prod/orders").await).await,
        (403, "MISSING_API_KEY".into())
    );
    assert_eq!(
        code(with_key("/prod/orders", "wrong").await.unwrap()).await,
        (403, "INVALID_API_KEY".into())
    );
    assert_eq!(
        code(with_key("/prod/orders", "key-three-value").await.unwrap()).await,
        (403, "INVALID_API_KEY".into()),
        "not in the stage's key list"
    );
    assert_eq!(
        with_key("/dev/orders", "key-three-value")
            .await
            .unwrap()
            .status(),
        200,
        "no list: every key of the plan"
    );
    let r = with_key("/prod/orders", "mobile-app-key-0001")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-limit"], "1000");
    assert!(
        r.headers().contains_key("ratelimit-remaining")
            && r.headers().contains_key("ratelimit-reset")
    );
    let seen = b.last();
    assert_eq!(seen.headers["x-scp-api-key-id"], "k2");
    assert!(
        !seen.headers.contains_key("x-scp-apikey"),
        "the key value is never forwarded"
    );
    assert_eq!(
        gw.get(&c, HOST, "/prod/free").await.status(),
        200,
        "no key needed"
    );

    // Required header and query string: 400 naming the parameter (after the key check).
    let post = |headers: &[(&str, &str)], q: &str| {
        let mut r = gw
            .req(&c, reqwest::Method::POST, HOST, &format!("/prod/orders{q}"))
            .header("x-scp-apikey", "key-one-value");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let r = post(&[], "?mode=fast").await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "BAD_REQUEST");
    assert!(v["message"].as_str().unwrap().contains("x-tenant"), "{v}");
    let v: Value = post(&[("x-tenant", "t1")], "?other=1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["message"].as_str().unwrap().contains("mode"), "{v}");
    assert_eq!(
        post(&[("X-Tenant", "t1")], "?mode").await.unwrap().status(),
        200
    );
    assert!(!gw.log().contains("key-one-value") && !gw.log().contains("mobile-app-key-0001"));
    let m = gw.metrics().await;
    for code in ["MISSING_API_KEY", "INVALID_API_KEY", "BAD_REQUEST"] {
        assert!(
            m.contains(&format!(
                r#"apigw_rejections_total{{api_id="api1",code="{code}",stage="prod"}}"#
            )),
            "{code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_exact_under_concurrency_and_survives_restart() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &keyed_api(&b, 100))], "");
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .unwrap();
    let url = gw.url("/prod/orders");
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(url)
                .header("host", HOST)
                .header("x-scp-apikey", "key-one-value")
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let reset = r
                .headers()
                .get("ratelimit-reset")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry, reset)
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let (status, retry, reset) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(
                    retry.is_some() && retry == reset,
                    "Retry-After equals RateLimit-Reset"
                );
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((ok, limited), (100, 900));
    assert_eq!(b.seen().len(), 100, "exactly 100 reached the backend");
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "key-one-value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_eq!(code(r).await, (429, "QUOTA_EXCEEDED".into()));
    // Another key has its own count.
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "mobile-app-key-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-remaining"], "99");

    // Counts survive a restart (graceful stop flushes them).
    let (status, dir) = gw.terminate();
    assert!(status.success(), "{status:?}");
    let gw = Gateway::start_in(dir, "");
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "key-one-value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "still exhausted after the restart");
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "mobile-app-key-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["ratelimit-remaining"], "98");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"apigw_rejections_total{api_id="api1",code="QUOTA_EXCEEDED",stage="prod"} 1"#),
        "{m}"
    );

    // A crash loses at most the last second of counts: after 1.5 s everything is on disk.
    for _ in 0..10 {
        gw.req(&c, reqwest::Method::GET, HOST, "/prod/orders")
            .header("x-scp-apikey", "mobile-app-key-0001")
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, dir) = gw.stop_with("KILL");
    let gw = Gateway::start_in(dir, "");
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("x-scp-apikey", "mobile-app-key-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["ratelimit-remaining"],
        "87",
        "2 + 10 counted before the crash, this one is the 13th"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_stage_and_key_buckets() {
    let b = Backend::start("b").await;
    let mut doc = keyed_api(&b, 1000);
    doc["stages"][1]["throttle"] = json!({"rate_per_second": 0.2, "burst": 3});
    doc["usage_plans"][0]["throttle"] = json!({"rate_per_second": 0.2, "burst": 2});
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    // Stage bucket: 3 at once, then 429 with Retry-After.
    for _ in 0..3 {
        assert_eq!(gw.get(&c, HOST, "/dev/free").await.status(), 200);
    }
    let r = gw.get(&c, HOST, "/dev/free").await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    assert_eq!(code(r).await, (429, "THROTTLED".into()));
    // Key bucket (prod has no stage throttle): 2 per key, keys independent.
    let get = |key: &'static str| {
        gw.req(&c, reqwest::Method::GET, HOST, "/prod/orders")
            .header("x-scp-apikey", key)
            .send()
    };
    assert_eq!(get("key-one-value").await.unwrap().status(), 200);
    assert_eq!(get("key-one-value").await.unwrap().status(), 200);
    assert_eq!(
        code(get("key-one-value").await.unwrap()).await,
        (429, "THROTTLED".into())
    );
    assert_eq!(get("mobile-app-key-0001").await.unwrap().status(), 200);

    // A reload with new bursts: new, full buckets at the first request that sees them
    // (the old buckets are found and replaced without stalling that request).
    let mut next = doc.clone();
    next["revision"] = json!(2);
    next["stages"][1]["throttle"] = json!({"rate_per_second": 0.2, "burst": 5});
    next["usage_plans"][0]["throttle"] = json!({"rate_per_second": 0.2, "burst": 4});
    write_json(&gw.snapshot_dir().join("api1.json"), &next);
    gw.signal("HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        if gw.get(&c, HOST, "/dev/free").await.status() == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the stage's new bucket never admitted");
    for _ in 0..4 {
        assert_eq!(gw.get(&c, HOST, "/dev/free").await.status(), 200);
    }
    assert_eq!(gw.get(&c, HOST, "/dev/free").await.status(), 429);
    for _ in 0..4 {
        assert_eq!(get("key-one-value").await.unwrap().status(), 200);
    }
    assert_eq!(
        code(get("key-one-value").await.unwrap()).await,
        (429, "THROTTLED".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_response_headers() {
    let b = Backend::start("b").await;
    let mut doc = keyed_api(&b, 1000);
    let st = &mut doc["stages"][0];
    st["cors_enabled"] = json!(true);
    st["allow_origins"] = json!(["https://app.example.com"]);
    st["allow_methods"] = json!(["GET", "POST"]);
    st["allow_headers"] = json!(["Content-Type", "Authorization", "x-scp-apikey"]);
    st["expose_headers"] = json!(["x-scp-request-id"]);
    st["allow_credentials"] = json!(true);
    st["max_age"] = json!(600);
    st["jwt_enabled"] = json!(true);
    doc["auths"] = json!([{"id": "au1", "name": "t", "connected_stages": ["prod"], "verification": {"alg": "HS256", "secret_base64": hs_secret_b64()}}]);
    let gw = Gateway::start(&[("api1.json", &doc)], "");
    let c = client();
    let preflight = |origin: &'static str, method: &'static str| {
        gw.req(&c, reqwest::Method::OPTIONS, HOST, "/prod/orders")
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "x-scp-apikey, content-type",
            )
            .send()
    };
    // Answered without token or key.
    let r = preflight("https://app.example.com", "POST").await.unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "Content-Type, Authorization, x-scp-apikey"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "Origin");
    assert!(h.contains_key("x-scp-request-id"));
    for (origin, method) in [
        ("null", "GET"),
        ("https://app.example.com.evil.com", "GET"),
        ("https://app.example.com", "DELETE"),
    ] {
        let r = preflight(origin, method).await.unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());
        assert_eq!(
            code(r).await,
            (403, "CORS_REJECTED".into()),
            "{origin} {method}"
        );
    }
    assert!(b.seen().is_empty(), "preflights never reach the backend");

    // Actual requests: allowed origins get the stage's headers (also on errors); the
    // backend's CORS headers are replaced; other origins get none.
    let token = hs_token(json!({"sub": "s", "exp": now() + 300}), None);
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("origin", "https://app.example.com")
        .header("x-scp-apikey", "key-one-value")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        r.headers()["access-control-expose-headers"],
        "x-scp-request-id"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("origin", "https://app.example.com.evil.com")
        .header("x-scp-apikey", "key-one-value")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a disallowed origin is still served");
    assert!(
        r.headers().get("access-control-allow-origin").is_none(),
        "backend header removed too"
    );
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/orders")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com",
        "error responses are readable"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"apigw_rejections_total{api_id="api1",code="CORS_REJECTED",stage="prod"} 3"#),
        "{m}"
    );
}

/// One answer of a raw HTTP/1 exchange: its status, its fields as (lowercase name, value)
/// in the order written, and its body.
type RawAnswer = (u16, Vec<(String, String)>, String);

/// The answers of a raw HTTP/1 exchange, in order (bodies framed by `Content-Length`).
fn raw_answers(mut raw: &str) -> Vec<RawAnswer> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let (head, rest) = raw.split_once("\r\n\r\n").expect("a whole head");
        let mut lines = head.split("\r\n");
        let status = raw_status(lines.next().unwrap());
        let fields: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("a field line");
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = fields
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .expect("a Content-Length");
        out.push((status, fields, rest[..len].to_owned()));
        raw = &rest[len..];
    }
    out
}

fn values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The fields the gateway writes on its answers (`x-scp-request-id`, `RateLimit-*`, the
/// stage's CORS fields) replace a backend's own of the same name: each is written once,
/// with the gateway's value, over HTTP/1 (where they follow the answer's other fields,
/// see `pipeline::finish`) as over HTTP/2; other fields of the backend stay, and its
/// `Vary` is kept next to the gateway's. Each answer of a connection has its own request
/// id, gateway-made answers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_answer_fields_replace_a_backends_own_once_each() {
    let b = Backend::start("b").await;
    let mut doc = keyed_api(&b, 1000);
    let st = &mut doc["stages"][0];
    st["cors_enabled"] = json!(true);
    st["allow_origins"] = json!(["https://app.example.com"]);
    st["allow_methods"] = json!(["GET"]);
    st["expose_headers"] = json!(["x-scp-request-id"]);
    st["allow_credentials"] = json!(true);
    let gw = Gateway::start(&[("api1.json", &doc)], "");

    // HTTP/1: two answers from the backend and a gateway-made one (an unknown key), on
    // one connection.
    let request = |key: &str, last: bool| {
        format!(
            "GET /prod/orders?own_fields=1 HTTP/1.1\r\nHost: {HOST}\r\n\
             Origin: https://app.example.com\r\nx-scp-apikey: {key}\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let sent = [
        request("key-one-value", false),
        request("key-one-value", false),
        request("not-a-key", true),
    ]
    .concat();
    let raw = tokio::task::spawn_blocking({
        let addr = gw.addr;
        move || raw(addr, sent.as_bytes())
    })
    .await
    .unwrap();
    let answers = raw_answers(&raw);
    assert_eq!(
        answers.iter().map(|a| a.0).collect::<Vec<_>>(),
        [200, 200, 403],
        "{raw}"
    );
    let mut ids = Vec::new();
    for (i, (status, fields, body)) in answers.iter().enumerate() {
        let id = values(fields, "x-scp-request-id");
        assert_eq!(id.len(), 1, "answer {i}: one request id: {fields:?}");
        assert_ne!(id[0], "from-backend", "answer {i}");
        ids.push(id[0].to_owned());
        assert_eq!(
            values(fields, "access-control-allow-origin"),
            ["https://app.example.com"],
            "answer {i}"
        );
        assert_eq!(
            values(fields, "access-control-expose-headers"),
            ["x-scp-request-id"],
            "answer {i}"
        );
        assert_eq!(
            values(fields, "access-control-allow-credentials"),
            ["true"],
            "answer {i}"
        );
        if *status == 200 {
            assert_eq!(values(fields, "x-backend"), ["b"], "answer {i}");
            assert_eq!(values(fields, "ratelimit-limit"), ["1000"], "answer {i}");
            assert_eq!(values(fields, "ratelimit-remaining").len(), 1, "answer {i}");
            assert_eq!(values(fields, "ratelimit-reset").len(), 1, "answer {i}");
            assert_ne!(values(fields, "ratelimit-reset"), ["5"], "answer {i}");
            assert_eq!(
                values(fields, "ratelimit-policy"),
                ["7;w=60"],
                "answer {i}: a field the gateway does not write passes"
            );
            assert_eq!(
                values(fields, "vary"),
                ["Accept-Encoding", "Origin"],
                "answer {i}"
            );
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["backend"], "b", "answer {i}");
        } else {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["request_id"], id[0], "answer {i}: the body names its id");
            assert_eq!(values(fields, "vary"), ["Origin"], "answer {i}");
        }
    }
    assert_eq!(
        values(&answers[0].1, "ratelimit-remaining"),
        ["999"],
        "{raw}"
    );
    assert_eq!(
        values(&answers[1].1, "ratelimit-remaining"),
        ["998"],
        "{raw}"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each answer its own id: {ids:?}");

    // HTTP/2 (h2c): the same fields, in the answer's map.
    let mut send = h2c_sender(gw.addr).await;
    let req = http::Request::builder()
        .uri(format!("http://{HOST}/prod/orders?own_fields=1"))
        .version(http::Version::HTTP_2)
        .header("origin", "https://app.example.com")
        .header("x-scp-apikey", "key-one-value")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let all = |name: &str| -> Vec<&str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-scp-request-id").len(), 1, "{h:?}");
    assert_ne!(all("x-scp-request-id"), ["from-backend"]);
    assert_eq!(all("ratelimit-limit"), ["1000"]);
    assert_eq!(all("ratelimit-remaining"), ["997"]);
    assert_eq!(all("ratelimit-policy"), ["7;w=60"]);
    assert_eq!(
        all("access-control-allow-origin"),
        ["https://app.example.com"]
    );
    assert_eq!(all("access-control-allow-credentials"), ["true"]);
    assert_eq!(all("vary"), ["Accept-Encoding", "Origin"]);
}

/// Many HTTP/1 connections at once on one worker: each answer carries, once, the request
/// id of its own request, the one its backend received. (An HTTP/1 answer's own fields are
/// handed to hyper's server on the worker's thread, see `pipeline::finish`: they must
/// never reach another connection's answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_each_carry_their_own_request_id() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(
        &[("api1.json", &orders_api(&b).build())],
        "[runtime]\nworkers = 1\n",
    );
    let (connections, each) = (32, 20);
    let mut tasks = Vec::new();
    for conn in 0..connections {
        // One client per task: its own keep-alive connection.
        let (c, url) = (client(), gw.url("/prod/orders"));
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..each {
                let n = format!("{conn}-{i}");
                let r = c
                    .get(&url)
                    .header("host", HOST)
                    .query(&[("n", &n)])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.version(), reqwest::Version::HTTP_11);
                let ids: Vec<String> = r
                    .headers()
                    .get_all("x-scp-request-id")
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                assert_eq!(ids.len(), 1, "request {n}: {ids:?}");
                answers.push((n, ids[0].clone()));
            }
            answers
        }));
    }
    let mut answered = std::collections::HashMap::new();
    for t in tasks {
        answered.extend(t.await.unwrap());
    }
    assert_eq!(answered.len(), connections * each);
    // What the backend received: each request's `n` and the id forwarded with it.
    let seen: std::collections::HashMap<String, String> = b
        .seen()
        .iter()
        .map(|s| {
            let n = s.uri.split("n=").nth(1).unwrap().to_owned();
            let id = s.headers["x-scp-request-id"].to_str().unwrap().to_owned();
            (n, id)
        })
        .collect();
    assert_eq!(seen.len(), connections * each);
    for (n, id) in &answered {
        assert_eq!(
            Some(id),
            seen.get(n),
            "request {n}: the answer's id is another's"
        );
    }
}
