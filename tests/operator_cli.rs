//! Issue 15, "what a newcomer hit": the command line says what is wrong and where, makes
//! the derived values of a snapshot without mistakes, resolves paths against the config
//! file, and the demo never writes into the checkout.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs the binary with `stdin` as standard input; (exit code, stdout, stderr).
fn run(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(bin())
        .dies_with_test()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn key_hash_and_secret_base64_take_the_value_without_its_line_break() {
    use sha2::Digest as _;
    let key = "my-api-key-0001";
    let digest: String = sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (args, stdin) in [
        (&["key-hash", key][..], &b""[..]),
        (&["key-hash"][..], b"my-api-key-0001\n"),
        (&["key-hash"][..], b"my-api-key-0001\r\n"),
        (&["key-hash"][..], b"my-api-key-0001"),
    ] {
        let (code, out, err) = run(args, stdin);
        assert_eq!((code, out.trim()), (0, digest.as_str()), "{args:?} {err}");
    }
    // `echo KEY | sha256sum` would have hashed the newline too: that is not the digest.
    let with_newline: String = sha2::Sha256::digest(b"my-api-key-0001\n")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_ne!(digest, with_newline);

    use base64::Engine as _;
    let secret = "an hmac secret";
    let expected = base64::engine::general_purpose::STANDARD.encode(secret);
    for (args, stdin) in [
        (&["secret-base64", secret][..], &b""[..]),
        (&["secret-base64"][..], b"an hmac secret\n"),
    ] {
        let (code, out, _) = run(args, stdin);
        assert_eq!((code, out.trim()), (0, expected.as_str()), "{args:?}");
    }
    // Nothing to hash is an error, not the digest of nothing.
    let (code, out, err) = run(&["key-hash"], b"\n");
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("empty"), "{err}");
}

fn snapshot_file(dir: &Path, doc: &Value) -> String {
    let p = dir.join("snap.json");
    write_json(&p, doc);
    p.display().to_string()
}

#[test]
fn validate_warns_of_stages_that_admit_no_one_and_strict_fails_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = SnapshotBuilder::new("api1", &["api.test"])
        .resource("/orders", &[("GET", "http://127.0.0.1:9/orders")])
        .stage(|s| {
            s["jwt_enabled"] = json!(true);
            s["ip_restriction_enabled"] = json!(true);
        })
        .build();
    doc["deployments"][0]["resources"][1]["methods"][0]["api_key_required"] = json!(true);
    let file = snapshot_file(dir.path(), &doc);

    let (code, out, _) = run(&["validate", &file], b"");
    assert_eq!(code, 0, "warnings alone do not fail: {out}");
    for (path, words) in [
        ("stages[0].jwt_enabled", "no auth is connected"),
        ("stages[0].usage_plan_id", "no usage plan"),
        ("stages[0].ip_restriction_enabled", "no access control"),
    ] {
        let line = format!("{file}: {path}: warning: ");
        let found = out
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("no `{line}` in:\n{out}"));
        assert!(found.contains(words), "{found}");
    }
    assert!(
        out.contains("ok (api api1, revision 1, 3 warning(s))"),
        "{out}"
    );
    let (code, out, _) = run(&["validate", "--strict", &file], b"");
    assert_eq!(code, 1, "{out}");

    // The same snapshot with an auth, a plan and an access control: no warning.
    doc["auths"] = json!([{"id": "au1", "connected_stages": ["prod"],
        "verification": {"alg": "HS256", "secret_base64": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ=="}}]);
    doc["stages"][0]["usage_plan_id"] = json!("up1");
    doc["usage_plans"] = json!([{"id": "up1", "limit": 10, "rate": "day",
        "api_keys": [{"id": "k1", "key": "k1-value"}]}]);
    doc["access_controls"] =
        json!([{"id": "ac1", "allowed_ip_addr": ["10.0.0.0/8"], "connected_stages": ["prod"]}]);
    let file = snapshot_file(dir.path(), &doc);
    let (code, out, _) = run(&["validate", "--strict", &file], b"");
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[test]
fn validate_refuses_a_secret_used_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = SnapshotBuilder::new("api1", &["api.test"]).build();
    doc["usage_plans"] = json!([{"id": "up1", "limit": 10, "rate": "day", "api_keys": [
        {"id": "k1", "key": "same-value"},
        {"id": "k2", "key": "other-value", "secondary_key": "same-value"}]}]);
    let file = snapshot_file(dir.path(), &doc);
    let (code, out, _) = run(&["validate", &file], b"");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("usage_plans[0].api_keys[1].secondary_key"),
        "{out}"
    );
    assert!(
        !out.contains("same-value"),
        "a key value is never echoed: {out}"
    );
}

#[test]
fn a_json_syntax_error_names_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.json");
    std::fs::write(
        &p,
        "{\n  \"format\": \"scp-apigw.snapshot/v1\",\n  \"revision\": 1,,\n}\n",
    )
    .unwrap();
    let file = p.display().to_string();
    let (code, out, _) = run(&["validate", &file], b"");
    assert_eq!(code, 1);
    assert!(out.contains("line 3, column 17: invalid JSON"), "{out}");
    assert!(!out.contains('?'), "{out}");
}

/// Starts `run` with `args` from `cwd` and expects a refusal: (exit code, stderr).
fn refused(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).starts_with("listening"),
        "it started"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn start_up_errors_are_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[snapshots]\ndir = \"no-such-dir\"\n[state]\ndir = \"st\"\n",
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let ports = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let (code, err) = refused(
        dir.path(),
        &[&["run", "--config", &cfg][..], &ports].concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line, printed once:\n{err}");
    assert!(err.contains("`snapshots.dir`"), "{err}");
    assert!(
        err.contains(&dir.path().join("no-such-dir").display().to_string()),
        "the resolved path: {err}"
    );
    assert!(!err.contains("No path was found"), "{err}");

    // A bad duration: where, which key, and the accepted form.
    std::fs::write(
        dir.path().join("gw.toml"),
        "[limits]\nidle_timeout = \"60\"\n",
    )
    .unwrap();
    let (code, err) = refused(
        dir.path(),
        &[&["run", "--config", &cfg][..], &ports].concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("line 2, column 16: `limits.idle_timeout`:") && err.contains("\"500ms\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_in_the_config_follow_the_config_file() {
    let b = Backend::start("b").await;
    let conf_dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(conf_dir.path().join("snaps")).unwrap();
    write_json(
        &conf_dir.path().join("snaps/api1.json"),
        &orders_api(&b).build(),
    );
    let cfg = conf_dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[runtime]\nworkers = 1\n[snapshots]\ndir = \"snaps\"\n[state]\ndir = \"st\"\n\
         [access_log]\nenabled = true\npath = \"logs/access.log\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(conf_dir.path().join("logs")).unwrap();
    // Started from another directory, with relative paths only in the file.
    let mut child = Command::new(bin())
        .dies_with_test()
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .current_dir(elsewhere.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let (addr, _) = parse_listening(&line).unwrap_or_else(|| panic!("{line}"));
    let r = client()
        .get(format!("http://{addr}/prod/orders"))
        .header("host", "api.test")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = child.wait().unwrap();
    assert_eq!(
        status, 200,
        "the snapshot of the config's directory is served"
    );
    assert!(exit.success());
    assert!(conf_dir.path().join("st/state.redb").is_file(), "state");
    assert!(
        std::fs::read_to_string(conf_dir.path().join("logs/access.log"))
            .unwrap()
            .contains("\"status\":200"),
        "access log"
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "nothing written in the working directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_store_error_series_exists_in_local_mode() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&[("api1.json", &orders_api(&b).build())], "");
    let m = gw.metrics().await;
    assert!(
        m.lines()
            .any(|l| l == r#"apigw_quota_store_errors_total{backend="local"} 0"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_the_shipped_snapshots_and_writes_outside_the_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let shipped = Path::new(ROOT).join("config/snapshots");
    let before: Vec<_> = std::fs::read_dir(&shipped)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.clone(), std::fs::read(&p).unwrap())
        })
        .collect();
    let mut child = Command::new(bin())
        .dies_with_test()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backend-listen",
            "127.0.0.1:0",
        ])
        .current_dir(ROOT)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let stop = |mut child: std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let Some((_, admin)) = parse_listening(&line) else {
        stop(child);
        panic!("the demo did not start: {line:?}");
    };
    let c = client();
    let apis = get_json(&c, &format!("http://{admin}/admin/apis")).await;
    let mut ids: Vec<&str> = apis["apis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["api_id"].as_str().unwrap())
        .collect();
    ids.sort();
    // A new revision of the tutorial API, pushed through the admin API.
    let mut tutorial: Value =
        serde_json::from_slice(&std::fs::read(shipped.join("tutorial.json")).unwrap()).unwrap();
    tutorial["revision"] = json!(2);
    let put = c
        .put(format!("http://{admin}/admin/apis/tutorial-api"))
        .body(tutorial.to_string())
        .send()
        .await
        .unwrap()
        .status();
    stop(child);

    assert_eq!(ids, ["31e749b7b260868f441e862b", "tutorial-api"]);
    assert_eq!(put, 200);
    let runtime = tmp.path().join("scp-gateway-demo");
    let pushed: Value =
        serde_json::from_slice(&std::fs::read(runtime.join("snapshots/tutorial.json")).unwrap())
            .unwrap();
    assert_eq!(
        pushed["revision"], 2,
        "the push went to the demo's directory"
    );
    assert!(runtime.join("state").is_dir(), "state beside it");
    let after: Vec<_> = std::fs::read_dir(&shipped)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.clone(), std::fs::read(&p).unwrap())
        })
        .collect();
    assert!(before == after, "config/snapshots changed");

    // Its help says what it reads.
    let (_, help, _) = run(&["demo", "--help"], b"");
    assert!(help.contains("config/gateway.toml"), "{help}");
}
