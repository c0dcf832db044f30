//! Route lookup on the compiled state: host → API → stage → resource trie → method.
//!
//! Run: `cargo bench --bench route_lookup` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

/// A snapshot with `n` resources: 100 static collections, each with a parameter child and
/// a static child under it, plus a greedy resource.
fn snapshot(n: usize) -> Vec<u8> {
    let mut resources =
        vec![json!({"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []})];
    let method = |url: &str| json!([{ "method_type": "GET", "integration_type": "HTTP", "endpoint_url": url }]);
    let mut i = 0;
    while resources.len() < n {
        let col = format!("/col{i:03}");
        resources.push(json!({"id": format!("c{i}"), "parent_id": "root", "path": col, "path_part": format!("col{i:03}"), "methods": method("http://b/x")}));
        resources.push(json!({"id": format!("p{i}"), "parent_id": format!("c{i}"), "path": format!("{col}/{{item-id}}"), "path_part": "{item-id}", "methods": method("http://b/x/{item-id}")}));
        resources.push(json!({"id": format!("s{i}"), "parent_id": format!("p{i}"), "path": format!("{col}/{{item-id}}/details"), "path_part": "details", "methods": method("http://b/x/{item-id}/d")}));
        i += 1;
    }
    resources.truncate(n - 1);
    resources.push(json!({"id": "g", "parent_id": "root", "path": "/files", "path_part": "files", "methods": []}));
    let doc = json!({
        "format": "scp-apigw.snapshot/v1", "revision": 1,
        "api": {"id": "bench", "name": "bench", "hosts": ["api.bench"]},
        "deployments": [{"deployment_id": "d1", "resources": resources}],
        "stages": [{"name": "prod", "deployment_id": "d1"}]
    });
    serde_json::to_vec(&doc).unwrap()
}

fn bench(c: &mut Criterion) {
    let api = scp_gateway::snapshot::build(&snapshot(300)).expect("bench snapshot is valid");
    let state = scp_gateway::state::GatewayState::default()
        .with_api(std::sync::Arc::new(api))
        .unwrap();
    let routes = &state
        .api_for_host("api.bench")
        .unwrap()
        .stage("prod")
        .unwrap()
        .deployment
        .routes;
    let mut g = c.benchmark_group("route_lookup_300");
    for (name, path) in [
        ("static", "/col050"),
        ("param", "/col050/42"),
        ("param_static", "/col050/42/details"),
        ("miss", "/nope/x"),
    ] {
        g.bench_function(name, |b| b.iter(|| black_box(routes.find(black_box(path)))));
    }
    g.bench_function("host_stage_resource_method", |b| {
        b.iter(|| {
            let api = state.api_for_host(black_box("api.bench:8080")).unwrap();
            let stage = api.stage(black_box("prod")).unwrap();
            let (id, params) = stage
                .deployment
                .routes
                .find(black_box("/col050/42/details"))
                .unwrap();
            black_box((
                stage
                    .deployment
                    .routes
                    .route(id)
                    .methods
                    .get(&http::Method::GET),
                params,
            ))
        })
    });
    g.finish();
    c.bench_function("normalize_path", |b| {
        b.iter(|| {
            black_box(scp_gateway::path::normalize(black_box(
                "/prod/col050/42/details",
            )))
        })
    });
    c.bench_function("compile_300_resource_snapshot", |b| {
        let doc = snapshot(300);
        b.iter(|| black_box(scp_gateway::snapshot::build(black_box(&doc)).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
