//! Issue 15: every refused token and API key says why — in the answer where that tells
//! nothing secret (RFC 6750 `error_description`), in the access log's `reason`, in
//! `apigw_auth_failures_total{api_id,stage,reason}` and in a log line with the request id —
//! and never shows the token or key. Key rotation: a key's primary and secondary secrets are
//! one key (one quota, one usage row).

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{json, Value};

const HOST: &str = "api.test";
const SECRET: &[u8] = b"refusal-test-secret-refusal-test-secret-0123";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token(claims: Value, kid: Option<&str>, secret: &[u8]) -> String {
    let header = jsonwebtoken::Header {
        kid: kid.map(str::to_owned),
        ..Default::default()
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn b64url(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// The access log's lines by request id, once `want` lines are there.
async fn access_log(path: &std::path::Path, want: usize) -> HashMap<String, Value> {
    let mut lines = HashMap::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| (v["request_id"].as_str().unwrap().to_owned(), v))
            .collect();
        if lines.len() >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    lines
}

fn auth_failures(metrics: &str, stage: &str, reason: &str) -> u64 {
    let series =
        format!(r#"apigw_auth_failures_total{{api_id="api1",reason="{reason}",stage="{stage}"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.parse().unwrap())
}

/// One refused request: what is sent and what must be seen.
struct Case {
    what: &'static str,
    path: &'static str,
    token: Option<String>,
    key: Option<&'static str>,
    status: u16,
    code: &'static str,
    reason: &'static str,
    /// The `WWW-Authenticate` value, for 401s.
    challenge: Option<&'static str>,
}

fn start_with_access_log(doc: &Value) -> (Gateway, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    write_json(&dir.path().join("snapshots/api1.json"), doc);
    let extra = format!("[access_log]\nenabled = true\npath = {log:?}\n");
    (Gateway::start_with_args(dir, &extra, &[]), log)
}

/// Sends every case, then checks the answer, the access log, the metric and the log.
async fn check(gw: &Gateway, log: &std::path::Path, cases: &[Case]) {
    let c = client();
    let mut ids = Vec::new();
    for case in cases {
        let mut r = gw.req(&c, reqwest::Method::GET, HOST, case.path);
        if let Some(t) = &case.token {
            r = r.bearer_auth(t);
        }
        if let Some(k) = case.key {
            r = r.header("x-scp-apikey", k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status().as_u16(), case.status, "{}", case.what);
        assert_eq!(
            r.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            case.challenge,
            "{}",
            case.what
        );
        let id = r.headers()["x-scp-request-id"].to_str().unwrap().to_owned();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], case.code, "{}", case.what);
        ids.push(id);
    }

    let lines = access_log(log, cases.len()).await;
    let mut expected: HashMap<(&str, &str), u64> = HashMap::new();
    for (case, id) in cases.iter().zip(&ids) {
        let line = &lines[id];
        assert_eq!(line["reason"], case.reason, "{}: {line}", case.what);
        assert_eq!(line["error_code"], case.code, "{}", case.what);
        let stage = case.path.split('/').nth(1).unwrap();
        *expected.entry((stage, case.reason)).or_default() += 1;
    }
    let m = gw.metrics().await;
    for ((stage, reason), n) in expected {
        assert_eq!(auth_failures(&m, stage, reason), n, "{stage} {reason}\n{m}");
    }

    // The first refusal is logged at info with its request id (later ones within the same
    // second go to debug); no token or key value is ever written anywhere.
    let text = gw.log();
    let first = text
        .lines()
        .find(|l| l.contains("credentials refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(first.contains(&ids[0]), "{first}");
    assert!(first.contains(cases[0].reason), "{first}");
    let access = std::fs::read_to_string(log).unwrap();
    for case in cases {
        for secret in case.token.iter().map(String::as_str).chain(case.key) {
            assert!(!text.contains(secret), "{} logged", case.what);
            assert!(!access.contains(secret), "{} in the access log", case.what);
            assert!(!m.contains(secret), "{} in the metrics", case.what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_refusal_says_why() {
    use base64::Engine as _;
    let b = Backend::start("b").await;
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/whoami", &[("GET", &b.url("/whoami"))])
        .stage(|s| s["jwt_enabled"] = json!(true))
        .build();
    doc["stages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "noauth", "deployment_id": "d1", "jwt_enabled": true}));
    let secret = base64::engine::general_purpose::STANDARD.encode(SECRET);
    doc["auths"] = json!([
        {"id": "au1", "name": "hs", "connected_stages": ["prod"],
         "verification": {"alg": "HS256", "secret_base64": secret, "audience": "orders",
                          "issuer": "idp", "leeway_seconds": 10}},
        {"id": "au-old", "name": "old", "connected_stages": ["prod"],
         "expired_at": "2020-01-01T00:00:00Z",
         "verification": {"alg": "HS256", "secret_base64": secret}}
    ]);
    let (gw, log) = start_with_access_log(&doc);

    let good = |extra: Value| {
        let mut claims = json!({"sub": "alice", "exp": now() + 300, "aud": "orders", "iss": "idp"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let invalid = |what, token: String, reason, challenge| Case {
        what,
        path: "/prod/whoami",
        token: Some(token),
        key: None,
        status: 401,
        code: "INVALID_TOKEN",
        reason,
        challenge: Some(challenge),
    };
    const PLAIN: &str = "Bearer error=\"invalid_token\"";
    let cases = [
        Case {
            what: "no token",
            path: "/prod/whoami",
            token: None,
            key: None,
            status: 401,
            code: "UNAUTHORIZED",
            reason: "missing_token",
            challenge: Some("Bearer"),
        },
        invalid(
            "expired beyond the leeway",
            token(good(json!({"exp": now() - 120})), None, SECRET),
            "expired",
            "Bearer error=\"invalid_token\", error_description=\"token expired\"",
        ),
        invalid(
            "nbf in the future",
            token(good(json!({"nbf": now() + 120})), None, SECRET),
            "not_yet_valid",
            "Bearer error=\"invalid_token\", error_description=\"token not yet valid\"",
        ),
        invalid(
            "iat in the future",
            token(good(json!({"iat": now() + 120})), None, SECRET),
            "not_yet_valid",
            "Bearer error=\"invalid_token\", error_description=\"token not yet valid\"",
        ),
        invalid(
            "not a JWT",
            "not-a-token".into(),
            "malformed",
            "Bearer error=\"invalid_token\", error_description=\"malformed token\"",
        ),
        invalid(
            "wrong secret",
            token(
                good(json!({})),
                None,
                b"another-secret-another-secret-0123456789",
            ),
            "signature",
            PLAIN,
        ),
        invalid(
            "expired and a wrong secret: the signature decides",
            token(
                good(json!({"exp": now() - 60})),
                None,
                b"another-secret-another-secret-0123456789",
            ),
            "signature",
            PLAIN,
        ),
        invalid(
            "alg none",
            format!(
                "{}.{}.",
                b64url(r#"{"alg":"none","typ":"JWT"}"#),
                b64url(&good(json!({})).to_string())
            ),
            "algorithm",
            PLAIN,
        ),
        invalid(
            "HS512 where the auth pins HS256",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
                &good(json!({})),
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
            )
            .unwrap(),
            "algorithm",
            PLAIN,
        ),
        invalid(
            "kid of no auth",
            token(good(json!({})), Some("au-unknown"), SECRET),
            "unknown_kid",
            PLAIN,
        ),
        invalid(
            "no exp",
            token(good(json!({"exp": null})), None, SECRET),
            "missing_claim",
            PLAIN,
        ),
        invalid(
            "no aud",
            token(good(json!({"aud": null})), Some("au1"), SECRET),
            "missing_claim",
            PLAIN,
        ),
        invalid(
            "wrong issuer",
            token(good(json!({"iss": "other"})), Some("au1"), SECRET),
            "issuer",
            PLAIN,
        ),
        invalid(
            "wrong audience",
            token(good(json!({"aud": "billing"})), Some("au1"), SECRET),
            "audience",
            PLAIN,
        ),
        invalid(
            "an auth past its expired_at",
            token(json!({"exp": now() + 300}), Some("au-old"), SECRET),
            "auth_expired",
            PLAIN,
        ),
        Case {
            what: "a JWT stage without a connected auth, no token",
            path: "/noauth/whoami",
            token: None,
            key: None,
            status: 401,
            code: "UNAUTHORIZED",
            reason: "no_auth",
            challenge: Some("Bearer"),
        },
        Case {
            what: "a JWT stage without a connected auth, a good token",
            path: "/noauth/whoami",
            token: Some(token(good(json!({})), None, SECRET)),
            key: None,
            status: 401,
            code: "INVALID_TOKEN",
            reason: "no_auth",
            challenge: Some(PLAIN),
        },
    ];
    check(&gw, &log, &cases).await;

    // A token that verifies has no reason.
    let c = client();
    let r = gw
        .req(&c, reqwest::Method::GET, HOST, "/prod/whoami")
        .bearer_auth(token(good(json!({})), None, SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-scp-request-id"].to_str().unwrap().to_owned();
    let lines = access_log(&log, cases.len() + 1).await;
    assert!(lines[&id]["reason"].is_null(), "{}", lines[&id]);
}

fn keyed_api(b: &Backend, limit: u64) -> Value {
    let mut doc = SnapshotBuilder::new("api1", &[HOST])
        .resource("/orders", &[("GET", &b.url("/orders"))])
        .build();
    doc["deployments"][0]["resources"][1]["methods"][0]["api_key_required"] = json!(true);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["stages"][0]["usage_plan_api_keys"] = json!([{"id": "k1", "name": "one"}]);
    doc["stages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "noplan", "deployment_id": "d1"}));
    doc["usage_plans"] = json!([{"id": "up1", "name": "basic", "limit": limit, "rate": "day",
    "api_keys": [
        {"id": "k1", "name": "one", "key": "key-one-primary",
         "secondary_key_sha256": sha256_hex(b"key-one-secondary")},
        {"id": "k2", "name": "two", "key": "key-two-value"}
    ]}]);
    doc
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_refusal_says_why() {
    let b = Backend::start("b").await;
    let (gw, log) = start_with_access_log(&keyed_api(&b, 1000));
    let key = |what, path, key, status, code, reason| Case {
        what,
        path,
        token: None,
        key,
        status,
        code,
        reason,
        challenge: None,
    };
    let cases = [
        key(
            "no key",
            "/prod/orders",
            None,
            403,
            "MISSING_API_KEY",
            "missing_key",
        ),
        key(
            "no such key",
            "/prod/orders",
            Some("key-nobody-has"),
            403,
            "INVALID_API_KEY",
            "unknown_key",
        ),
        key(
            "a key of the plan the stage does not list",
            "/prod/orders",
            Some("key-two-value"),
            403,
            "INVALID_API_KEY",
            "key_not_allowed",
        ),
        key(
            "a stage without a usage plan, no key",
            "/noplan/orders",
            None,
            403,
            "MISSING_API_KEY",
            "no_usage_plan",
        ),
        key(
            "a stage without a usage plan, a key",
            "/noplan/orders",
            Some("key-one-primary"),
            403,
            "INVALID_API_KEY",
            "no_usage_plan",
        ),
    ];
    check(&gw, &log, &cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_primary_and_secondary_secret_share_one_quota_and_one_usage_row() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &keyed_api(&b, 4))], "");
    let c = client();
    let send = |key: &'static str| {
        gw.req(&c, reqwest::Method::GET, HOST, "/prod/orders")
            .header("x-scp-apikey", key)
            .send()
    };
    let mut seen = Vec::new();
    for key in [
        "key-one-primary",
        "key-one-secondary",
        "key-one-primary",
        "key-one-secondary",
        "key-one-secondary",
        "key-one-primary",
    ] {
        let r = send(key).await.unwrap();
        let remaining = r
            .headers()
            .get("ratelimit-remaining")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((r.status().as_u16(), remaining));
    }
    let s = |n: &str| Some(n.to_owned());
    assert_eq!(
        seen,
        [
            (200, s("3")),
            (200, s("2")),
            (200, s("1")),
            (200, s("0")),
            (429, s("0")),
            (429, s("0"))
        ],
        "one quota of 4 for both secrets"
    );
    // The backend sees one key id, whichever secret was sent.
    let ids: Vec<String> = b
        .seen()
        .iter()
        .map(|r| r.headers["x-scp-api-key-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["k1"; 4]);

    let today = time::OffsetDateTime::now_utc().date().to_string();
    let r = c
        .get(format!(
            "http://{}/v1/apis/api1/usage-plans/up1/usage?start_date={today}&end_date={today}",
            gw.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let usage: Value = r.json().await.unwrap();
    // One row per key id of the plan: the secondary secret has none of its own.
    assert_eq!(
        usage["items"],
        json!({"k1": [[4, 0]], "k2": [[0, 4]]}),
        "{usage}"
    );
}
