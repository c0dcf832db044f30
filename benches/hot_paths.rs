//! The request path's hot functions, one criterion group each, on compiled snapshots built
//! the way the gateway builds them: route lookup among 1,000 APIs × 300 resources, the IP
//! ACL with 100 entries, JWT verification per algorithm (first sight and cached), API-key
//! lookup, quota admission on the local store, CORS header building and metrics recording.
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --quick` for a short run, or a group name
//! such as `-- jwt` for one group). Route lookup on one API is in `benches/route_lookup.rs`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use scp_gateway::snapshot::{CompiledApi, CompiledStage};
use serde_json::{json, Value};

const SECRET: &[u8] = b"hot-path-benchmark-secret-hot-path-benchmark!";
const KEY: &str = "hot-path-benchmark-api-key";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/benches/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("benches/fixtures")
}

fn resources(n: usize, backend: &str) -> Vec<Value> {
    let mut rs =
        vec![json!({"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []})];
    for i in 0..n.saturating_sub(1) {
        rs.push(
            json!({"id": format!("r{i}"), "parent_id": "root", "path": format!("/res{i:04}"),
            "path_part": format!("res{i:04}"), "methods": [{"method_type": "GET",
            "integration_type": "HTTP", "api_key_required": true,
            "endpoint_url": format!("{backend}/r{i}")}]}),
        );
    }
    rs
}

/// One API with every policy of the load benchmark's full chain on stage `prod`: IP ACL
/// with 100 entries, the given JWT verification, CORS, a usage plan with one key.
fn full_chain(verification: Value) -> CompiledApi {
    let mut entries: Vec<String> = (0..99).map(|i| format!("10.{i}.0.0/16")).collect();
    entries.push("127.0.0.1".into());
    let doc = json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
        "api": {"id": "full", "name": "full", "hosts": ["full.test"]},
        "deployments": [{"deployment_id": "d1", "resources": resources(3, "http://127.0.0.1:9")}],
        "stages": [{"name": "prod", "deployment_id": "d1", "ip_restriction_enabled": true,
            "jwt_enabled": true, "cors_enabled": true,
            "allow_origins": ["https://app.example.com"], "allow_methods": ["GET"],
            "usage_plan_id": "up1"}],
        "access_controls": [{"id": "ac1", "name": "acl", "allowed_ip_addr": entries,
            "connected_stages": ["prod"]}],
        "auths": [{"id": "au1", "name": "jwt", "connected_stages": ["prod"],
            "verification": verification}],
        "usage_plans": [{"id": "up1", "name": "big", "limit": 2_000_000_000u64, "rate": "month",
            "api_keys": [{"id": "k1", "name": "bench", "key": KEY}]}]});
    scp_gateway::snapshot::build(&serde_json::to_vec(&doc).unwrap()).expect("valid snapshot")
}

fn prod(api: &CompiledApi) -> &CompiledStage {
    api.stage("prod").expect("stage prod")
}

fn route_lookup_1000_apis(c: &mut Criterion) {
    let mut state = scp_gateway::state::GatewayState::default();
    for i in 0..1000 {
        let doc = json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
            "api": {"id": format!("api{i:04}"), "name": "a", "hosts": [format!("api{i:04}.test")]},
            "deployments": [{"deployment_id": "d1", "resources": resources(300, "http://b")}],
            "stages": [{"name": "prod", "deployment_id": "d1"}]});
        let api = scp_gateway::snapshot::build(&serde_json::to_vec(&doc).unwrap()).unwrap();
        state = state.with_api(Arc::new(api)).unwrap();
    }
    c.bench_function(
        "route_lookup_1000_apis_x_300/host_stage_resource_method",
        |b| {
            b.iter(|| {
                let api = state.api_for_host(black_box("api0500.test")).unwrap();
                let routes = &api.stage(black_box("prod")).unwrap().deployment.routes;
                let (id, params) = routes.find(black_box("/res0150")).unwrap();
                black_box((routes.route(id).methods.get(&http::Method::GET), params))
            })
        },
    );
}

fn acl_100_entries(c: &mut Criterion) {
    let api = full_chain(json!({"alg": "HS256", "secret_base64": "c2VjcmV0"}));
    let acl = &prod(&api).acl;
    let allowed: IpAddr = "127.0.0.1".parse().unwrap();
    let denied: IpAddr = "192.0.2.77".parse().unwrap();
    assert!(acl.admits(allowed) && !acl.admits(denied));
    let mut g = c.benchmark_group("acl_100_entries");
    g.bench_function("allowed_last_entry", |b| {
        b.iter(|| black_box(acl.admits(black_box(allowed))))
    });
    g.bench_function("denied", |b| {
        b.iter(|| black_box(acl.admits(black_box(denied))))
    });
    g.finish();
}

fn jwt_verify(c: &mut Criterion) {
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let hmac = |alg: &str| json!({"alg": alg, "secret_base64": b64(SECRET)});
    let pem = |alg: &str, public: &str| json!({"alg": alg, "public_key_pem": fixture(public)});
    let secret = EncodingKey::from_secret(SECRET);
    let rsa = EncodingKey::from_rsa_pem(fixture("rsa.key").as_bytes()).unwrap();
    let cases: Vec<(&str, Algorithm, Value, &EncodingKey)> = vec![
        ("HS256", Algorithm::HS256, hmac("HS256"), &secret),
        ("HS384", Algorithm::HS384, hmac("HS384"), &secret),
        ("HS512", Algorithm::HS512, hmac("HS512"), &secret),
        ("RS256", Algorithm::RS256, pem("RS256", "rsa.pub"), &rsa),
        ("PS256", Algorithm::PS256, pem("PS256", "rsa.pub"), &rsa),
    ];
    let p256 = EncodingKey::from_ec_pem(fixture("p256.key").as_bytes()).unwrap();
    let p384 = EncodingKey::from_ec_pem(fixture("p384.key").as_bytes()).unwrap();
    let ed = EncodingKey::from_ed_pem(fixture("ed25519.key").as_bytes()).unwrap();
    let cases = cases.into_iter().chain([
        ("ES256", Algorithm::ES256, pem("ES256", "p256.pub"), &p256),
        ("ES384", Algorithm::ES384, pem("ES384", "p384.pub"), &p384),
        ("EdDSA", Algorithm::EdDSA, pem("EdDSA", "ed25519.pub"), &ed),
    ]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut g = c.benchmark_group("jwt_verify");
    for (name, alg, verification, key) in cases {
        let api = full_chain(verification);
        let jwt = &prod(&api).jwt;
        let token = jsonwebtoken::encode(
            &Header::new(alg),
            &json!({"sub": "bench", "exp": now + 86_400, "iat": now}),
            key,
        )
        .unwrap();
        let authorization = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        assert!(
            jwt.verify(Some(&authorization), now).is_ok(),
            "{name} token verifies"
        );
        g.bench_function(format!("{name}/first_sight"), |b| {
            b.iter(|| black_box(jwt.verify_token(black_box(&token), now).is_ok()))
        });
        g.bench_function(format!("{name}/cached"), |b| {
            b.iter(|| black_box(jwt.verify(black_box(Some(&authorization)), now).is_ok()))
        });
    }
    g.finish();
}

fn apikey_lookup(c: &mut Criterion) {
    let api = full_chain(json!({"alg": "HS256", "secret_base64": "c2VjcmV0"}));
    let keys = &prod(&api).keys;
    let good = HeaderValue::from_static(KEY);
    let bad = HeaderValue::from_static("not-a-key-not-a-key-xx");
    assert!(keys.check(Some(&good)).is_ok() && keys.check(Some(&bad)).is_err());
    let mut g = c.benchmark_group("apikey_lookup");
    g.bench_function("known", |b| {
        b.iter(|| black_box(keys.check(black_box(Some(&good))).is_ok()))
    });
    g.bench_function("unknown", |b| {
        b.iter(|| black_box(keys.check(black_box(Some(&bad))).is_ok()))
    });
    g.finish();
}

fn quota_admission_local(c: &mut Criterion) {
    use scp_gateway::policy::quota::{self, LocalQuotaStore};
    let dir = tempfile::tempdir().unwrap();
    let db =
        Arc::new(scp_gateway::state_db::StateDb::open(&dir.path().join("state.redb")).unwrap());
    let store = LocalQuotaStore::open(db).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let windows = quota::WindowCache::default();
    // A compiled key's slot: resolved on the first admission, as in the gateway.
    let slot = quota::CounterSlot::default();
    c.bench_function("quota_admission_local", |b| {
        b.to_async(&rt).iter(|| async {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let window = windows.get(scp_gateway::snapshot::model::QuotaRate::Month, now);
            let a = quota::admit(
                &*store,
                &slot,
                black_box("up1"),
                black_box("k1"),
                u64::MAX / 2,
                window,
                now,
            )
            .await
            .unwrap();
            black_box(a.admitted)
        })
    });
}

fn cors(c: &mut Criterion) {
    let api = full_chain(json!({"alg": "HS256", "secret_base64": "c2VjcmV0"}));
    let cors = prod(&api).cors.as_ref().expect("CORS on");
    let origin = HeaderValue::from_static("https://app.example.com");
    let mut preflight = HeaderMap::new();
    preflight.insert("origin", origin.clone());
    preflight.insert(
        "access-control-request-method",
        HeaderValue::from_static("GET"),
    );
    let mut g = c.benchmark_group("cors");
    g.bench_function("response_headers", |b| {
        b.iter(|| {
            let mut h = HeaderMap::new();
            cors.apply(Some(black_box(&origin)), &mut h);
            black_box(h)
        })
    });
    g.bench_function("preflight", |b| {
        b.iter(|| black_box(cors.preflight(black_box(&preflight))))
    });
    g.finish();
}

fn metrics_recording(c: &mut Criterion) {
    use scp_gateway::observe::series;
    let (api, stage, resource): (Arc<str>, Arc<str>, Arc<str>) =
        ("api0500".into(), "prod".into(), "/orders/{order-id}".into());
    let st = series::stage(&api, &stage);
    let rt = series::route(&api, &stage, &resource);
    c.bench_function("metrics_record_request", |b| {
        b.iter(|| {
            rt.count(black_box(0), black_box(200));
            st.record(
                black_box(Duration::from_micros(850)),
                Some((Duration::from_micros(600), 0)),
                None,
                None,
                false,
            );
        })
    });
    c.bench_function("report_record_request", |b| {
        b.iter(|| {
            rt.report(black_box(&series::ReportSample {
                day: 20_000,
                method: 0,
                status: 200,
                latency: Duration::from_micros(850),
                integration: Some(Duration::from_micros(600)),
            }))
        })
    });
}

criterion_group!(
    benches,
    route_lookup_1000_apis,
    acl_100_entries,
    jwt_verify,
    apikey_lookup,
    quota_admission_local,
    cors,
    metrics_recording
);
criterion_main!(benches);
