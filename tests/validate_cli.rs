//! `scp-gateway validate`: each rejection carries the JSON path of the field; the spec's
//! complete example is accepted.

mod common;

use common::DiesWithTest;

use std::process::Command;

use serde_json::{json, Value};

fn spec_example() -> Value {
    serde_json::from_str(include_str!("fixtures/spec-example.json")).unwrap()
}

/// Runs `validate` on one document; returns (exit code, stdout).
fn validate(doc: &Value) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.json");
    common::write_json(&path, doc);
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn assert_rejected(doc: &Value, expected: &[&str]) {
    let (code, out) = validate(doc);
    assert_eq!(code, 1, "expected exit 1, output:\n{out}");
    for e in expected {
        assert!(out.contains(e), "expected `{e}` in:\n{out}");
    }
}

#[test]
fn accepts_the_spec_example() {
    let (code, out) = validate(&spec_example());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok (api 31e749b7b260868f441e862b, revision 7)"),
        "{out}"
    );
}

#[test]
fn accepts_the_shipped_example_config_snapshots() {
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/snapshots/orders-api.json"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn rejects_unknown_format() {
    let mut d = spec_example();
    d["format"] = json!("scp-apigw.snapshot/v9");
    assert_rejected(&d, &["format: unknown format `scp-apigw.snapshot/v9`"]);
}

#[test]
fn rejects_dangling_parent_id() {
    let mut d = spec_example();
    d["deployments"][0]["resources"][2]["parent_id"] = json!("r9");
    assert_rejected(
        &d,
        &["deployments[0].resources[2].parent_id: no resource with id `r9`"],
    );
}

#[test]
fn rejects_placeholder_naming_no_parameter() {
    let mut d = spec_example();
    d["deployments"][0]["resources"][2]["methods"][0]["endpoint_url"] =
        json!("http://orders.internal:8080/v1/orders/{id}");
    assert_rejected(
        &d,
        &["deployments[0].resources[2].methods[0].endpoint_url: placeholder {id} names no path parameter"],
    );
}

#[test]
fn rejects_conflicting_sibling_parameters() {
    let mut d = spec_example();
    d["deployments"][0]["resources"].as_array_mut().unwrap().push(json!({
        "id": "r3", "parent_id": "r1", "path": "/orders/{other-id}", "path_part": "{other-id}", "methods": []
    }));
    assert_rejected(
        &d,
        &["deployments[0].resources[3].path_part: conflicting parameter siblings `/orders/{order-id}` and `/orders/{other-id}`"],
    );
    // A greedy sibling conflicts the same way.
    let mut d = spec_example();
    d["deployments"][0]["resources"].as_array_mut().unwrap().push(json!({
        "id": "r3", "parent_id": "r1", "path": "/orders/{rest+}", "path_part": "{rest+}", "methods": []
    }));
    assert_rejected(&d, &["`/orders/{order-id}` and `/orders/{rest+}`"]);
}

#[test]
fn rejects_wildcard_origin_with_credentials() {
    let mut d = spec_example();
    d["stages"][0]["allow_origins"] = json!(["*"]);
    assert_rejected(
        &d,
        &["stages[0].allow_origins: `*` cannot be combined with allow_credentials: true"],
    );
}

#[test]
fn rejects_more_than_300_resources() {
    let mut d = spec_example();
    let resources = d["deployments"][0]["resources"].as_array_mut().unwrap();
    resources.truncate(1);
    for i in 0..300 {
        resources.push(json!({
            "id": format!("x{i}"), "parent_id": "r0", "path": format!("/res{i:03}"),
            "path_part": format!("res{i:03}"), "methods": []
        }));
    }
    assert_eq!(resources.len(), 301);
    assert_rejected(
        &d,
        &["deployments[0].resources: 301 resources, at most 300 allowed"],
    );
    // Exactly 300 is fine.
    d["deployments"][0]["resources"]
        .as_array_mut()
        .unwrap()
        .pop();
    let (code, out) = validate(&d);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn wrong_types_and_many_problems_are_all_reported() {
    let mut d = spec_example();
    d["revision"] = json!("seven");
    assert_rejected(&d, &["revision: invalid type: string \"seven\""]);
    let mut d = spec_example();
    d["deployments"][0]["resources"][1]["methods"][0]["method_type"] = json!("FETCH");
    assert_rejected(
        &d,
        &["deployments[0].resources[1].methods[0].method_type: unknown variant `FETCH`"],
    );
    // Several semantic problems in one file: every one is printed.
    let mut d = spec_example();
    d["stages"][0]["integration_timeout_ms"] = json!(10);
    d["stages"][0]["deployment_id"] = json!("nope");
    d["usage_plans"][0]["limit"] = json!(0);
    d["deployments"][0]["resources"][1]["path_part"] = json!("Orders");
    assert_rejected(
        &d,
        &[
            "stages[0].integration_timeout_ms: 10 is outside 50–300000",
            "stages[0].deployment_id: no deployment with id `nope`",
            "usage_plans[0].limit: must be between 1 and 2000000000",
            "deployments[0].resources[1].path_part:",
        ],
    );
}

#[test]
fn rejects_placeholders_outside_the_path() {
    let mut d = spec_example();
    d["deployments"][0]["resources"][2]["methods"][0]["endpoint_url"] =
        json!("http://{order-id}.internal/v1");
    assert_rejected(&d, &["placeholders are allowed in the path only"]);
}

#[test]
fn several_files_exit_1_when_any_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    let bad = dir.path().join("bad.json");
    common::write_json(&good, &spec_example());
    std::fs::write(&bad, b"{ not json").unwrap();
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("good.json: ok"), "{text}");
    assert!(text.contains("bad.json: "), "{text}");
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(&cfg, "[limits]\nmax_body_bytes = \"lots\"\n").unwrap();
    let out = Command::new(common::bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_bytes"), "{err}");
    let out = Command::new(common::bin())
        .args(["run", "--config", "/nonexistent/gw.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs the binary with stdout and stderr connected to pipes whose reading ends are already
/// closed (as `scp-gateway ... 2>&1 | head -1` leaves them once `head` has exited).
fn run_with_closed_pipes(args: &[&str]) -> std::process::ExitStatus {
    use std::process::Stdio;
    let mut child = Command::new(common::bin())
        .dies_with_test()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading ends before the process writes anything.
    drop(child.stdout.take());
    drop(child.stderr.take());
    child.wait().unwrap()
}

#[test]
fn a_closed_pipe_never_changes_the_exit_code() {
    // Issue 13, item 6: `run --config broken.toml 2>&1 | head -5` exited 101 (a panic
    // writing the error to a closed stderr) instead of the documented 2.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("broken.toml");
    std::fs::write(&cfg, "[server\n").unwrap();
    let cfg = cfg.display().to_string();
    assert_eq!(
        run_with_closed_pipes(&["run", "--config", &cfg]).code(),
        Some(2)
    );
    // `validate` writes its findings to stdout: exit 1 for an invalid file, 0 for a good one.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{").unwrap();
    let good = dir.path().join("good.json");
    common::write_json(&good, &spec_example());
    let (bad, good) = (bad.display().to_string(), good.display().to_string());
    assert_eq!(run_with_closed_pipes(&["validate", &bad]).code(), Some(1));
    assert_eq!(run_with_closed_pipes(&["validate", &good]).code(), Some(0));
    assert_eq!(run_with_closed_pipes(&["--help"]).code(), Some(0));
    assert_eq!(run_with_closed_pipes(&["--no-such-flag"]).code(), Some(2));
}

/// Starts `scp-gateway` with `args` and expects it to refuse to start: returns its exit
/// code and stderr. A gateway that starts serving instead (its `listening` line) is
/// stopped and the test fails.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let mut child = Command::new(common::bin())
        .dies_with_test()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    if line.starts_with("listening") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the gateway started serving: {line}");
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (child.wait().unwrap().code(), err)
}

#[test]
fn an_open_admin_api_is_refused_unless_allowed() {
    // Issue 13, item 7: a non-loopback admin address without a token is a start-up error
    // naming `admin.token` (exit 2), unless `admin.allow_unauthenticated = true`.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(&cfg, "[admin]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let cfg = cfg.display().to_string();
    let state = dir.path().join("state").display().to_string();
    let snapshots = dir.path().display().to_string();
    let common = [
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--snapshot-dir",
        &snapshots,
    ];
    let (code, err) = refused_start(&[&["run", "--config", &cfg], &common[..]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("admin.token"), "{err}");
    // The override is judged too.
    let (code, err) =
        refused_start(&[&["run", "--admin-listen", "0.0.0.0:0"], &common[..]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("admin.token"), "{err}");

    // Allowed explicitly: it starts, serves, and says so in a warning.
    let gw = common::Gateway::start_with_args(
        tempfile::tempdir().unwrap(),
        "[admin]\nallow_unauthenticated = true\n",
        &["--admin-listen", "0.0.0.0:0"],
    );
    assert!(gw.log().contains("served without a token"), "{}", gw.log());
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], gw.admin.port()));
    let answer = common::raw(
        local,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(common::raw_status(&answer), 200, "{answer}");
}
