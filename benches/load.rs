//! Load benchmark: a minimal backend direct, through nginx, and through scp-gateway (bare route,
//! full policy chain, 1,000 APIs × 300 resources), measured side by side in one run with wrk
//! over keep-alive connections.
//!
//! Run: `cargo bench --bench load` (needs `wrk`; the nginx rows need `nginx`).
//! Environment: `LOAD_SECONDS` (per row, default 5), `LOAD_CONNECTIONS` (default 32),
//! `LOAD_APIS` (APIs for the many-APIs row, default 1000).
//!
//! Pinning on 2 cores: this process (the backend) and wrk share CPU 1; the proxy under test
//! (gateway or nginx) runs on CPU 0 with 1 worker, and on CPUs 0-1 with 2 workers.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The minimal backend: `200 ok`, keep-alive; counts accepted connections.
fn start_backend(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn snapshot(id: &str, host: &str, backend: SocketAddr, resources: usize) -> Value {
    let mut rs =
        vec![json!({"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []})];
    rs.push(json!({"id": "ping", "parent_id": "root", "path": "/ping", "path_part": "ping",
        "methods": [{"method_type": "GET", "integration_type": "HTTP", "endpoint_url": format!("http://{backend}/ping")}]}));
    for i in 0..resources.saturating_sub(2) {
        rs.push(json!({"id": format!("r{i}"), "parent_id": "root", "path": format!("/res{i:04}"), "path_part": format!("res{i:04}"),
            "methods": [{"method_type": "GET", "integration_type": "HTTP", "endpoint_url": format!("http://{backend}/r")}]}));
    }
    json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
        "api": {"id": id, "name": id, "account_id": "acc", "hosts": [host]},
        "deployments": [{"deployment_id": "d1", "resources": rs}],
        "stages": [{"name": "prod", "deployment_id": "d1"}]})
}

const SECRET: &[u8] = b"load-benchmark-secret-load-benchmark-secret!";

/// The full policy chain: IP ACL with 100 entries, HS256 JWT, API key with a large quota,
/// CORS (metrics and the access log are on for every gateway row of this kind).
fn full_chain(backend: SocketAddr) -> Value {
    use base64::Engine as _;
    let mut doc = snapshot("full", "full.test", backend, 2);
    doc["deployments"][0]["resources"][1]["methods"][0]["api_key_required"] = json!(true);
    let st = &mut doc["stages"][0];
    st["ip_restriction_enabled"] = json!(true);
    st["jwt_enabled"] = json!(true);
    st["cors_enabled"] = json!(true);
    st["allow_origins"] = json!(["https://app.example.com"]);
    st["allow_methods"] = json!(["GET"]);
    st["usage_plan_id"] = json!("up1");
    let mut entries: Vec<String> = (0..99).map(|i| format!("10.{i}.0.0/16")).collect();
    entries.push("127.0.0.1".into());
    doc["access_controls"] = json!([{"id": "ac1", "name": "acl", "allowed_ip_addr": entries, "connected_stages": ["prod"]}]);
    doc["auths"] = json!([{"id": "au1", "name": "jwt", "connected_stages": ["prod"],
        "verification": {"alg": "HS256", "secret_base64": base64::engine::general_purpose::STANDARD.encode(SECRET)}}]);
    doc["usage_plans"] = json!([{"id": "up1", "name": "big", "limit": 2_000_000_000u64, "rate": "month",
        "api_keys": [{"id": "k1", "name": "bench", "key": "load-benchmark-key"}]}]);
    doc
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(dir: &Path, cpus: &str, workers: u64, access_log: bool) -> (Proc, SocketAddr) {
    let mut cfg = format!("[runtime]\nworker_threads = {workers}\n[snapshots]\nwatch = false\n");
    if access_log {
        cfg.push_str(&format!(
            "[access_log]\nenabled = true\npath = {:?}\n",
            dir.join("access.log")
        ));
    }
    std::fs::write(dir.join("gw.toml"), cfg).unwrap();
    let mut child = Command::new("taskset")
        .args([
            "-c",
            cpus,
            env!("CARGO_BIN_EXE_scp-gateway"),
            "run",
            "--config",
        ])
        .arg(dir.join("gw.toml"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--snapshot-dir",
        ])
        .arg(dir.join("snapshots"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("data="))
        .and_then(|a| a.split(',').next()?.parse().ok())
        .expect("listening line");
    (Proc(child), addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nginx(dir: &Path, cpus: &str, workers: u64, backend: SocketAddr) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "worker_processes {workers};\nerror_log {err} error;\npid {pid};\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  upstream backend {{ server {backend}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        err = dir.join("nginx-error.log").display(),
        pid = dir.join("nginx.pid").display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("taskset")
        .args(["-c", cpus, "nginx", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), addr)
}

fn wait_ready(addr: SocketAddr, host: &str, headers: &[String]) {
    for _ in 0..500 {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
        ]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(format!("http://{addr}/prod/ping")).output();
        if out.is_ok_and(|o| o.stdout == b"200") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{host} on {addr} never answered 200");
}

#[derive(Debug, Default, Clone)]
struct Row {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    new_conns_per_1000: f64,
}

fn to_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

fn wrk(
    name: &str,
    url: &str,
    host: &str,
    headers: &[String],
    seconds: u64,
    conns: u64,
    accepted: &AtomicUsize,
) -> Row {
    let before = accepted.load(Ordering::Relaxed);
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "1",
        "wrk",
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{seconds}s"),
        "--latency",
        "-H",
        &format!("Host: {host}"),
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut row = Row {
        name: name.into(),
        ..Row::default()
    };
    let mut requests = 0.0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => row.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => row.p50_ms = to_ms(v),
            ["99%", v] => row.p99_ms = to_ms(v),
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
        if line.contains("Non-2xx") {
            eprintln!("warning: {name}: {line}");
        }
    }
    let new = accepted.load(Ordering::Relaxed) - before;
    row.new_conns_per_1000 = if requests > 0.0 {
        new as f64 * 1000.0 / requests
    } else {
        f64::NAN
    };
    row
}

fn main() {
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) skips the run.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for tool in ["wrk", "taskset", "curl"] {
        assert!(
            has(tool),
            "the load benchmark needs `{tool}` (apt-get install wrk util-linux curl)"
        );
    }
    let seconds = env_num("LOAD_SECONDS", 5);
    let conns = env_num("LOAD_CONNECTIONS", 32);
    let apis = env_num("LOAD_APIS", 1000) as usize;
    let _ = Command::new("taskset")
        .args(["-pc", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let accepted = Arc::new(AtomicUsize::new(0));
    let backend = start_backend(accepted.clone());
    let tmp = tempfile::tempdir().unwrap();
    let write = |dir: &Path, name: &str, v: &Value| {
        std::fs::create_dir_all(dir.join("snapshots")).unwrap();
        std::fs::write(
            dir.join("snapshots").join(name),
            serde_json::to_vec(v).unwrap(),
        )
        .unwrap();
    };
    let single = tmp.path().join("single");
    write(
        &single,
        "bare.json",
        &snapshot("bare", "bare.test", backend, 2),
    );
    write(&single, "full.json", &full_chain(backend));
    let many = tmp.path().join("many");
    for i in 0..apis {
        write(
            &many,
            &format!("api{i:04}.json"),
            &snapshot(
                &format!("api{i:04}"),
                &format!("api{i:04}.test"),
                backend,
                300,
            ),
        );
    }
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
    let token = jsonwebtoken::encode(
        &Default::default(),
        &json!({"sub": "bench", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let full_headers = vec![
        format!("Authorization: Bearer {token}"),
        "x-scp-apikey: load-benchmark-key".to_owned(),
        "Origin: https://app.example.com".to_owned(),
    ];

    let mut rows = Vec::new();
    rows.push(wrk(
        "direct to the backend",
        &format!("http://{backend}/ping"),
        "backend",
        &[],
        seconds,
        conns,
        &accepted,
    ));
    for (workers, cpus) in [(1u64, "0"), (2, "0,1")] {
        let w = format!("{workers}w");
        if has("nginx") {
            let (_ng, addr) = start_nginx(tmp.path(), cpus, workers, backend);
            wait_ready(addr, "bare.test", &[]);
            rows.push(wrk(
                &format!("nginx → backend ({w})"),
                &format!("http://{addr}/prod/ping"),
                "bare.test",
                &[],
                seconds,
                conns,
                &accepted,
            ));
        }
        let (_gw, addr) = start_gateway(&single, cpus, workers, false);
        wait_ready(addr, "bare.test", &[]);
        rows.push(wrk(
            &format!("gateway, bare route ({w})"),
            &format!("http://{addr}/prod/ping"),
            "bare.test",
            &[],
            seconds,
            conns,
            &accepted,
        ));
        drop(_gw);
        let (_gw, addr) = start_gateway(&single, cpus, workers, true);
        wait_ready(addr, "full.test", &full_headers);
        rows.push(wrk(
            &format!("gateway, full policy chain ({w})"),
            &format!("http://{addr}/prod/ping"),
            "full.test",
            &full_headers,
            seconds,
            conns,
            &accepted,
        ));
    }
    let started = std::time::Instant::now();
    let (gw, addr) = start_gateway(&many, "0", 1, false);
    let host = format!("api{:04}.test", apis / 2);
    wait_ready(addr, &host, &[]);
    let load_time = started.elapsed();
    let rss = std::fs::read_to_string(format!("/proc/{}/status", gw.0.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    rows.push(wrk(
        &format!("gateway, {apis} APIs × 300 resources (1w)"),
        &format!("http://{addr}/prod/ping"),
        &host,
        &[],
        seconds,
        conns,
        &accepted,
    ));
    drop(gw);

    let base = |name: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(name))
            .map(|r| r.rps)
    };
    println!();
    println!("load benchmark: wrk -t1 -c{conns} -d{seconds}s, keep-alive; backend + wrk pinned to CPU 1, proxy to CPU 0 (1w) or 0-1 (2w)");
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>10} {:>12}",
        "row", "req/s", "p50 ms", "p99 ms", "vs nginx", "new conn/1k"
    );
    for r in &rows {
        let w = if r.name.contains("(2w)") {
            "(2w)"
        } else {
            "(1w)"
        };
        let ng = base(&format!("nginx → backend {w}"))
            .map(|n| format!("{:.2}×", r.rps / n))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<44} {:>10.0} {:>9.3} {:>9.3} {:>10} {:>12.2}",
            r.name, r.rps, r.p50_ms, r.p99_ms, ng, r.new_conns_per_1000
        );
    }
    for w in ["1w", "2w"] {
        if let (Some(bare), Some(full)) = (
            base(&format!("gateway, bare route ({w})")),
            base(&format!("gateway, full policy chain ({w})")),
        ) {
            println!(
                "full chain costs {:.1}% of the bare route's req/s ({w})",
                (1.0 - full / bare) * 100.0
            );
        }
    }
    if let (Some(bare), Some(manyr)) = (
        base("gateway, bare route (1w)"),
        base(&format!("gateway, {apis} APIs")),
    ) {
        println!(
            "{apis} APIs: {:.1}% of the bare route's req/s; loaded in {load_time:.2?}; RSS {rss}",
            manyr / bare * 100.0
        );
    }
    println!("not measured yet: fixed-rate added latency (row 6, needs an open-loop generator such as wrk2 or oha), callgrind instruction counts");
}
