//! Shared by the fuzz targets: a compiled API with one stage `prod`.

use scp_gateway::snapshot::CompiledApi;
use serde_json::{json, Value};

/// API `f` whose stage `prod` has the given extra fields, plus the given top-level fields
/// (auths, access controls, ...).
pub fn api_with(stage: Value, top: Value) -> CompiledApi {
    let mut doc = json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
        "api": {"id": "f", "name": "f", "hosts": ["f.test"]},
        "deployments": [{"deployment_id": "d1", "resources": [
            {"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []}]}],
        "stages": [{"name": "prod", "deployment_id": "d1"}]});
    for (k, v) in stage.as_object().into_iter().flatten() {
        doc["stages"][0][k] = v.clone();
    }
    for (k, v) in top.as_object().into_iter().flatten() {
        doc[k] = v.clone();
    }
    scp_gateway::snapshot::build(&serde_json::to_vec(&doc).unwrap()).expect("fuzz fixture")
}
