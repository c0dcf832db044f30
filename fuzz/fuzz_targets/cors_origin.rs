//! CORS origin matching on arbitrary `Origin` values: never a panic, and an
//! `Access-Control-Allow-Origin` is only ever the configured origin, echoed exactly.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scp_gateway::snapshot::CompiledApi;

fn api() -> &'static CompiledApi {
    static API: OnceLock<CompiledApi> = OnceLock::new();
    API.get_or_init(|| {
        let doc = serde_json::json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
            "api": {"id": "f", "name": "f", "hosts": ["f.test"]},
            "deployments": [{"deployment_id": "d1", "resources": [
                {"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []}]}],
            "stages": [{"name": "prod", "deployment_id": "d1", "cors_enabled": true,
                "allow_origins": ["https://app.example.com"], "allow_methods": ["GET", "POST"],
                "allow_credentials": true}]});
        scp_gateway::snapshot::build(&serde_json::to_vec(&doc).unwrap()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(origin) = http::HeaderValue::from_bytes(data) else { return };
    let cors = api().stage("prod").unwrap().cors.as_ref().unwrap();
    let mut resp = http::HeaderMap::new();
    cors.apply(Some(&origin), &mut resp);
    if let Some(allowed) = resp.get("access-control-allow-origin") {
        assert_eq!(allowed, "https://app.example.com");
        assert_eq!(origin, "https://app.example.com", "only the exact origin is allowed");
    }
    let mut pre = http::HeaderMap::new();
    pre.insert("origin", origin.clone());
    pre.insert("access-control-request-method", http::HeaderValue::from_static("GET"));
    let _ = cors.preflight(&pre);
});
