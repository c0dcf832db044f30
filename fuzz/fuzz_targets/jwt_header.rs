//! JWT handling of an arbitrary `Authorization` header against an HS256 auth: never a panic,
//! and nothing the fuzzer makes verifies (it does not know the secret).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scp_gateway::snapshot::CompiledApi;

fn api() -> &'static CompiledApi {
    static API: OnceLock<CompiledApi> = OnceLock::new();
    API.get_or_init(|| {
        scp_gateway_fuzz::api_with(
            serde_json::json!({"jwt_enabled": true}),
            serde_json::json!({"auths": [{"id": "au1", "name": "jwt", "connected_stages": ["prod"],
                "verification": {"alg": "HS256", "secret_base64": "ZnV6ei1zZWNyZXQtZnV6ei1zZWNyZXQtZnV6ei1zZWNyZXQ="}}]}),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, v);
    let jwt = &api().stage("prod").unwrap().jwt;
    assert!(jwt.verify(&headers).is_err(), "a token made without the secret verified");
});
