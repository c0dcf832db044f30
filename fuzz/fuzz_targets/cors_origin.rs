//! CORS origin matching on arbitrary `Origin` values: never a panic, and an
//! `Access-Control-Allow-Origin` is only ever the request's origin when it is the configured
//! one (case-insensitively, as host names compare).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scp_gateway::snapshot::CompiledApi;

fn api() -> &'static CompiledApi {
    static API: OnceLock<CompiledApi> = OnceLock::new();
    API.get_or_init(|| {
        scp_gateway_fuzz::api_with(
            serde_json::json!({"cors_enabled": true, "allow_origins": ["https://app.example.com"],
                "allow_methods": ["GET", "POST"], "allow_credentials": true}),
            serde_json::json!({}),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(origin) = http::HeaderValue::from_bytes(data) else { return };
    let cors = api().stage("prod").unwrap().cors.as_ref().unwrap();
    let mut resp = http::HeaderMap::new();
    cors.apply(Some(&origin), &mut resp);
    if let Some(allowed) = resp.get("access-control-allow-origin") {
        // The request's own origin is echoed (browsers compare byte for byte), and only the
        // configured one is allowed (scheme and host compare case-insensitively).
        assert_eq!(allowed, &origin);
        assert!(
            origin.as_bytes().eq_ignore_ascii_case(b"https://app.example.com"),
            "{origin:?} allowed"
        );
    }
    let mut pre = http::HeaderMap::new();
    pre.insert("origin", origin.clone());
    pre.insert("access-control-request-method", http::HeaderValue::from_static("GET"));
    let _ = cors.preflight(&pre);
});
