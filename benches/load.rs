//! Load benchmark: a minimal backend direct, through nginx, and through scp-gateway (bare route,
//! full policy chain, 1,000 APIs × 300 resources), measured side by side in one run with wrk
//! over keep-alive connections.
//!
//! Run: `cargo bench --bench load` (needs `wrk`; the nginx rows need `nginx`, row 6 `oha`,
//! the instruction counts `valgrind`).
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
    start_gateway_with(dir, &["taskset", "-c", cpus], workers, access_log, "")
}

fn start_gateway_with(
    dir: &Path,
    prefix: &[&str],
    workers: u64,
    access_log: bool,
    extra: &str,
) -> (Proc, SocketAddr) {
    let mut cfg = format!("[runtime]\nworkers = {workers}\n[snapshots]\nwatch = false\n{extra}");
    if access_log {
        cfg.push_str(&format!(
            "[access_log]\nenabled = true\npath = {:?}\n",
            dir.join("access.log")
        ));
    }
    std::fs::write(dir.join("gw.toml"), cfg).unwrap();
    let mut child = Command::new(prefix[0])
        .args(&prefix[1..])
        .args([env!("CARGO_BIN_EXE_scp-gateway"), "run", "--config"])
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
    start_nginx_with(dir, &["taskset", "-c", cpus, "nginx"], workers, backend, "")
}

fn start_nginx_with(
    dir: &Path,
    command: &[&str],
    workers: u64,
    backend: SocketAddr,
    extra: &str,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "{extra}worker_processes {workers};\nerror_log {err} error;\npid {pid};\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  upstream backend {{ server {backend}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        err = dir.join("nginx-error.log").display(),
        pid = dir.join("nginx.pid").display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(command[0])
        .args(&command[1..])
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..1500 {
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

/// Stops a process with SIGTERM and waits (valgrind writes its counts on a normal exit).
fn stop_gracefully(mut p: Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status();
    let _ = p.0.wait();
}

/// `n` GET requests over one keep-alive connection, each answered in full before the next:
/// a fixed workload whose instruction count does not depend on timing.
fn fixed_requests(addr: SocketAddr, host: &str, n: usize) -> std::io::Result<()> {
    use std::io::{Error, Read, Write};
    let stream = std::net::TcpStream::connect(addr)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let req = format!("GET /prod/ping HTTP/1.1\r\nHost: {host}\r\n\r\n");
    for _ in 0..n {
        writer.write_all(req.as_bytes())?;
        let mut len = 0usize;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        if !status.contains(" 200 ") {
            return Err(Error::other(format!("fixed workload got {status:?}")));
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(Error::other("connection closed"));
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(Error::other)?;
                }
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
    }
    Ok(())
}

/// Instructions per proxied request under callgrind: two runs of `small` and `large`
/// requests, the difference divided by the difference (start-up and shutdown cancel out).
fn callgrind_per_request(
    dir: &Path,
    label: &str,
    host: &str,
    start: &dyn Fn(&[&str]) -> (Proc, SocketAddr),
) -> Option<f64> {
    let (small, large) = (1_000usize, 6_000usize);
    let mut totals = Vec::new();
    for n in [small, large] {
        let out = dir.join(format!("callgrind-{label}-{n}.out"));
        let out_arg = format!("--callgrind-out-file={}", out.display());
        let (p, addr) = start(&["valgrind", "--tool=callgrind", &out_arg]);
        let run = fixed_requests(addr, host, 1).and_then(|_| fixed_requests(addr, host, n));
        stop_gracefully(p);
        if let Err(e) = run {
            eprintln!("warning: callgrind run of {label} failed: {e}");
            return None;
        }
        let text = std::fs::read_to_string(&out).ok()?;
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))?
            .trim()
            .parse()
            .ok()?;
        totals.push(total);
    }
    Some((totals[1] - totals[0]) / (large - small) as f64)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Opens `n` keep-alive connections, each after one answered request, and returns the
/// gateway's RSS before and after (KiB), with the connections still open.
fn idle_connections(pid: u32, addr: SocketAddr, host: &str, n: usize) -> (u64, u64, usize) {
    use std::io::{Read, Write};
    let before = rss_kib(pid).unwrap_or(0);
    let req = format!("GET /prod/ping HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            break;
        };
        if s.write_all(req.as_bytes()).is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got.extend_from_slice(&buf[..k]),
            }
        }
        open.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid).unwrap_or(0);
    (before, after, open.len())
}

/// An open-loop run at a fixed rate with oha, latencies corrected for coordinated omission.
#[derive(Debug, Clone)]
struct Fixed {
    name: String,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

#[allow(clippy::too_many_arguments)]
fn oha_fixed(
    name: &str,
    url: &str,
    host: &str,
    headers: &[String],
    rate: u64,
    seconds: u64,
    conns: u64,
) -> Option<Fixed> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "oha", "--no-tui", "--output-format", "json"])
        .args(["--latency-correction", "-q", &rate.to_string()])
        .args(["-z", &format!("{seconds}s"), "-c", &conns.to_string()])
        .args(["-H", &format!("Host: {host}")]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let p = |k: &str| v["latencyPercentiles"][k].as_f64().map(|s| s * 1000.0);
    Some(Fixed {
        name: name.into(),
        achieved: v["summary"]["requestsPerSec"].as_f64()?,
        p50_ms: p("p50")?,
        p99_ms: p("p99")?,
        p999_ms: p("p99.9")?,
    })
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
    // 10,000 idle connections need as many descriptors in this process.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
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
    // Fleet mode: the full chain with quotas in Redis (redis-server pinned with the backend).
    if has("redis-server") {
        let port = free_port();
        let _redis = Proc(
            Command::new("taskset")
                .args(["-c", "1", "redis-server", "--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("start redis-server"),
        );
        let fleet_cfg =
            format!("[quota]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}/0\"\nfailure_mode = \"closed\"\n");
        let (_gw, addr) = start_gateway_with(&single, &["taskset", "-c", "0"], 1, true, &fleet_cfg);
        wait_ready(addr, "full.test", &full_headers);
        rows.push(wrk(
            "gateway, full chain, fleet mode/Redis (1w)",
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
    if let (Some(local), Some(redis)) = (
        base("gateway, full policy chain (1w)"),
        base("gateway, full chain, fleet mode"),
    ) {
        println!(
            "fleet mode: full chain with the Redis quota store at {:.2}× the local store's req/s (1w)",
            redis / local
        );
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

    // Row 6: open-loop runs at half the bare route's maximum (1 worker).
    let bare_1w = base("gateway, bare route (1w)").unwrap_or(0.0);
    let rate = (bare_1w / 2.0).round() as u64;
    let mut fixed = Vec::new();
    if has("oha") && rate > 0 {
        fixed.extend(oha_fixed(
            "direct to the backend",
            &format!("http://{backend}/ping"),
            "backend",
            &[],
            rate,
            seconds,
            conns,
        ));
        if has("nginx") {
            let (_ng, addr) = start_nginx(tmp.path(), "0", 1, backend);
            wait_ready(addr, "bare.test", &[]);
            fixed.extend(oha_fixed(
                "nginx → backend (1w)",
                &format!("http://{addr}/prod/ping"),
                "bare.test",
                &[],
                rate,
                seconds,
                conns,
            ));
        }
        for (name, host, headers, log) in [
            ("gateway, bare route (1w)", "bare.test", &[][..], false),
            (
                "gateway, full policy chain (1w)",
                "full.test",
                &full_headers[..],
                true,
            ),
        ] {
            let (_gw, addr) = start_gateway(&single, "0", 1, log);
            wait_ready(addr, host, headers);
            fixed.extend(oha_fixed(
                name,
                &format!("http://{addr}/prod/ping"),
                host,
                headers,
                rate,
                seconds,
                conns,
            ));
        }
    }

    // 10,000 idle keep-alive client connections.
    let idle = {
        let (gw, addr) = start_gateway(&single, "0", 1, false);
        wait_ready(addr, "bare.test", &[]);
        let r = idle_connections(gw.0.id(), addr, "bare.test", IDLE_CONNECTIONS);
        drop(gw);
        r
    };

    // Instructions per proxied request (bare route, 1 worker), gateway and nginx.
    let callgrind = if has("valgrind") && std::env::var("LOAD_CALLGRIND").as_deref() != Ok("0") {
        let gw = callgrind_per_request(tmp.path(), "gateway", "bare.test", &|prefix| {
            start_gateway_with(&single, prefix, 1, false, "")
        });
        let ng = has("nginx")
            .then(|| {
                callgrind_per_request(tmp.path(), "nginx", "bare.test", &|prefix| {
                    let mut cmd = prefix.to_vec();
                    cmd.push("nginx");
                    start_nginx_with(tmp.path(), &cmd, 1, backend, "master_process off;\n")
                })
            })
            .flatten();
        Some((gw, ng))
    } else {
        None
    };

    println!();
    match fixed.first() {
        Some(direct) => {
            println!(
                "row 6, open loop: oha -q {rate} (half the bare route's 1w maximum) -c{conns} -z{seconds}s --latency-correction, oha on CPU 1"
            );
            println!(
                "{:<44} {:>10} {:>9} {:>9} {:>9} {:>14}",
                "row", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms"
            );
            for f in &fixed {
                println!(
                    "{:<44} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>14.3}",
                    f.name,
                    f.achieved,
                    f.p50_ms,
                    f.p99_ms,
                    f.p999_ms,
                    f.p99_ms - direct.p99_ms
                );
            }
        }
        None => println!("row 6 (open loop) skipped: needs `oha` (cargo install oha)"),
    }
    let (before, after, opened) = idle;
    println!(
        "{opened} idle keep-alive connections: gateway RSS {before} KiB → {after} KiB, {:.1} MiB in all, {:.2} KiB each",
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / opened.max(1) as f64
    );
    match callgrind {
        Some((gw, ng)) => {
            let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "instructions per proxied request (callgrind, bare route, 1 worker, 1 keep-alive connection, 6,000 − 1,000 requests): gateway {} nginx {}{}",
                show(gw),
                show(ng),
                match (gw, ng) {
                    (Some(g), Some(n)) => format!(" ({:.2}× nginx)", g / n),
                    _ => String::new(),
                }
            );
        }
        None => {
            println!("instruction counts skipped: needs `valgrind` (LOAD_CALLGRIND=0 skips them)")
        }
    }
}

/// Idle keep-alive connections opened for the memory row.
const IDLE_CONNECTIONS: usize = 10_000;
