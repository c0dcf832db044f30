//! The documentation cannot rot: the tutorial's commands run as written and print what it
//! shows, and every snapshot in `config/` and `docs/` loads.

mod common;

use common::DiesWithTest;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A fenced code block of a Markdown file: its info string and its text.
struct Block {
    info: String,
    text: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in markdown.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => {
                current = Some(Block {
                    info: info.trim().to_owned(),
                    text: String::new(),
                })
            }
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some(b), None) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    out
}

/// A command the tutorial needs; its absence fails the test (it never passes silently).
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the tutorial needs `{tool}`: install it (.ci/run does) to run this test"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines with trailing blanks removed, without leading and trailing empty lines.
fn normalized(s: &str) -> String {
    s.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_matches('\n')
        .to_owned()
}

#[test]
fn the_tutorial_runs_as_written() {
    for tool in ["bash", "curl", "openssl", "python3", "sed", "grep"] {
        require(tool);
    }
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/tutorial.md")).unwrap();
    // `sh` blocks run, in order, in one shell; a `text` block right after one is its
    // expected output. `shell` blocks (building) are for readers only.
    let all = blocks(&doc);
    let mut steps: Vec<(String, Option<String>)> = Vec::new();
    for (i, b) in all.iter().enumerate() {
        if b.info == "sh" {
            let expected = all
                .get(i + 1)
                .filter(|n| n.info == "text")
                .map(|n| normalized(&n.text));
            steps.push((b.text.clone(), expected));
        }
    }
    assert!(steps.len() >= 10, "the tutorial lost its commands");

    const MARK: &str = "@@tutorial-step@@";
    let mut script = String::from("set -euo pipefail\n");
    for (commands, _) in &steps {
        script.push_str(&format!("echo {MARK}\n{commands}\n"));
    }
    script.push_str(&format!("echo {MARK}\n"));

    let work = tempfile::tempdir().unwrap();
    let bin_dir = PathBuf::from(common::bin()).parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .dies_with_test()
        .arg("-c")
        .arg(&script)
        .current_dir(ROOT)
        .env("PATH", path)
        .env("GW", format!("127.0.0.1:{}", free_port()))
        .env("ADMIN", format!("127.0.0.1:{}", free_port()))
        .env("BACKEND", format!("127.0.0.1:{}", free_port()))
        .env("WORK", work.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // Whatever happens, nothing the script started outlives the test.
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                // `--`: procps-ng's kill reads `-TERM -N` as `kill(-1)`, every process.
                .args(["-s", "TERM", "--", &format!("-{}", self.0)])
                .status();
        }
    }
    let _group = Group(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let out = std::io::read_to_string(stdout).unwrap();
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    let gateway_log = std::fs::read_to_string(work.path().join("gateway.log")).unwrap_or_default();

    let outputs: Vec<&str> = out.split(&format!("{MARK}\n")).skip(1).collect();
    for (n, ((commands, expected), output)) in steps.iter().zip(&outputs).enumerate() {
        if let Some(expected) = expected {
            assert_eq!(
                normalized(output),
                *expected,
                "tutorial step {n}:\n{commands}\nstderr:\n{err}\ngateway log:\n{gateway_log}"
            );
        }
    }
    assert!(
        status.success() && outputs.len() == steps.len() + 1,
        "the tutorial stopped after {} of {} steps ({status}):\n{out}\nstderr:\n{err}\ngateway log:\n{gateway_log}",
        outputs.len().saturating_sub(1),
        steps.len()
    );
    // No secret of the tutorial reached the gateway's log.
    for secret in ["tutorial-key-change-me-0001", "tutorial-hmac-secret"] {
        assert!(!gateway_log.contains(secret), "{secret} logged");
    }
}

#[test]
fn the_tutorial_shows_the_shipped_snapshot() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/tutorial.md")).unwrap();
    let shown: Vec<Value> = blocks(&doc)
        .iter()
        .filter(|b| b.info == "json")
        .map(|b| serde_json::from_str(&b.text).unwrap())
        .collect();
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("config/snapshots/tutorial.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shown, [shipped]);
}

/// Every snapshot file in `config/` and every complete snapshot shown in `docs/`.
fn shipped_snapshots(scratch: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![Path::new(ROOT).join("config")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            // config/grafana holds a dashboard, not snapshots.
            if p.is_dir() && !p.ends_with("grafana") {
                dirs.push(p);
            } else if p.is_dir() {
                continue;
            } else if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
    }
    for e in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for (i, b) in blocks(&text).iter().enumerate() {
            let is_snapshot = b.info == "json"
                && serde_json::from_str::<Value>(&b.text)
                    .is_ok_and(|v| v.get("format").is_some() && v.get("api").is_some());
            if is_snapshot {
                let name = format!("{}-{i}.json", p.file_stem().unwrap().to_string_lossy());
                let out = scratch.join(name);
                std::fs::write(&out, &b.text).unwrap();
                files.push(out);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_snapshot_in_config_and_docs_loads() {
    let scratch = tempfile::tempdir().unwrap();
    let files = shipped_snapshots(scratch.path());
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["orders-api.json", "tutorial.json", "tutorial-"] {
        assert!(
            names.iter().any(|n| n.starts_with(expected)),
            "{expected} not found among {names:?}"
        );
    }
    // Valid, and without a warning.
    let out = Command::new(common::bin())
        .args(["validate", "--strict"])
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(": ok (api ").count(), files.len(), "{text}");

    // And a gateway serves every file of config/snapshots at once (no host shared).
    let snapshots = Path::new(ROOT).join("config/snapshots");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    let mut ids = Vec::new();
    for f in std::fs::read_dir(&snapshots).unwrap() {
        let f = f.unwrap().path();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        ids.push(doc["api"]["id"].as_str().unwrap().to_owned());
        std::fs::copy(
            &f,
            dir.path().join("snapshots").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    let gw = common::Gateway::start_in(dir, "");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let apis = rt.block_on(common::get_json(
        &common::client(),
        &format!("http://{}/admin/apis", gw.admin),
    ));
    let mut loaded: Vec<&str> = apis["apis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["api_id"].as_str().unwrap())
        .collect();
    loaded.sort();
    ids.sort();
    assert_eq!(loaded, ids, "{}", gw.log());
}
