//! Load benchmark: a minimal backend direct, through nginx, HAProxy, the floor (a minimal
//! proxy built the way the data plane is built, `support/floor.rs`; with 1 worker also as
//! it adds the contract's headers) and scp-gateway (bare
//! route, full policy chain, fleet mode, the full chain locally and in fleet mode over 64
//! API keys, 1,000 APIs × 300 resources), measured side by side
//! in one run with wrk over keep-alive connections, rounds interleaved (rows in a shuffled
//! order per round), medians reported, with the proxy's CPU time per request (its
//! processes' user and system time over the run, per request).
//! Then open-loop latency (oha), the memory of idle connections, and instructions per
//! request (callgrind) for the floor (also adding the contract's headers), the gateway (also its
//! bare route among the 1,000 APIs) and nginx, and system calls per request (strace).
//!
//! Run: `cargo bench --bench load` (needs `wrk`, `taskset`, `curl`; the reference rows need
//! `nginx` and `haproxy`, row 6 `oha`, the instruction counts `valgrind`, the fleet rows
//! `redis-server` (the Redis Cluster row also `redis-cli`); a missing tool skips its rows
//! with a message).
//! Environment: `LOAD_SECONDS` (per round and row, default 5), `LOAD_ROUNDS` (default 3),
//! `LOAD_CONNECTIONS` (default 64), `LOAD_APIS` (default 1000), `LOAD_IDLE` (idle
//! connections, default 10000), `LOAD_ROWS` (comma-separated parts of row names: only those
//! rows are measured, e.g. `LOAD_ROWS=fleet,full chain (1w)`), `LOAD_CALLGRIND` (`0`: no
//! instruction counts; or the counts to take, of `floor,bare,full,apis,fleet,trace,nginx`; a
//! name takes the counts whose label starts with it: `bare` also takes `bare-ka`, the bare
//! route behind a backend answering with nginx's head, and `bare@16`), `LOAD_KEEP`
//! (a directory the callgrind profiles are copied to, for `callgrind_annotate`),
//! `LOAD_CALLGRIND_ARGS` (more callgrind options, space-separated, e.g. `--dump-instr=yes`
//! to find a cost's call site by address), `LOAD_OPEN` (`0`: no open-loop runs), `LOAD_SYSCALLS` (`0`: no system call counts; or
//! the counts to take, of `floor,bare,full,nginx`; they need `strace`),
//! `LOAD_GATEWAY` (the gateway executable to measure instead of this build's, e.g. the
//! profile-guided build of `benches/pgo.sh`, which also trains with this bench),
//! `LOAD_GATEWAY_B` (a second gateway executable, measured on the 1-worker bare route, full
//! chain and fleet rows in the same rounds as the first: an A/B of two builds in one run).
//!
//! Pinning on 2 cores: this process (the backend) and the load generator share CPU 1; the
//! proxy under test runs on CPU 0 with 1 worker, and on CPUs 0-1 with 2 workers. Every
//! proxy is started once and stays up (idle) while the others are measured; before each
//! row the bench waits for CPUs 0-1 to go quiet (what the previous row left running must
//! not fall on this one). Every process this bench starts is stopped, with its children,
//! when it ends.

#[path = "support/floor.rs"]
mod floor;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The bench's working directory (configurations, snapshots, logs), `scp-load-<pid>.*` in
/// the temporary directory, removed when the run ends. A run that was killed leaves its
/// own behind (no `Drop` runs): those of bench processes no longer running are removed
/// here first.
fn work_dir() -> tempfile::TempDir {
    const PREFIX: &str = "scp-load-";
    let base = std::env::temp_dir();
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}.", std::process::id()))
        .tempdir()
        .expect("a working directory in the temporary directory")
}

/// The minimal backend: `200 ok`, keep-alive; counts accepted connections.
fn start_backend(accepted: Arc<AtomicUsize>) -> SocketAddr {
    start_backend_answering(accepted, false)
}

/// The answer head nginx 1.22 writes for `return 200 "ok"` (hyper adds `Date` and
/// `Content-Length`): what most real backends send, `Connection: keep-alive` included,
/// which the minimal backend's head (hyper's) does not have.
const NGINX_LIKE_HEAD: [(&str, &str); 3] = [
    ("server", "nginx/1.22.1"),
    ("content-type", "text/plain"),
    ("connection", "keep-alive"),
];

/// A backend answering `200 ok` on keep-alive connections, with an nginx-like answer
/// head ([`NGINX_LIKE_HEAD`]) if `nginx_like`; counts accepted connections.
fn start_backend_answering(accepted: Arc<AtomicUsize>, nginx_like: bool) -> SocketAddr {
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
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let mut answer = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                        if nginx_like {
                            for (name, value) in NGINX_LIKE_HEAD {
                                answer.headers_mut().insert(
                                    http::HeaderName::from_static(name),
                                    http::HeaderValue::from_static(value),
                                );
                            }
                        }
                        Ok::<_, Infallible>(answer)
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
        "api_keys": (0..=ROTATED_KEYS)
            .map(|i| match i {
                0 => json!({"id": "k1", "name": "bench", "key": "load-benchmark-key"}),
                i => json!({"id": format!("k-rotated-{i}"), "name": "bench", "key": rotated_key(i)}),
            })
            .collect::<Vec<_>>()}]);
    doc
}

/// The rows of the second gateway executable, `LOAD_GATEWAY_B`, are named with this.
const GATEWAY_B: &str = "gateway B";

/// API keys the "many keys" rows spread their requests over (round robin; each key's quota
/// counter is its own, so a Redis call carries admissions of many counters, not of one).
const ROTATED_KEYS: usize = 64;

/// The [`ROTATED_KEYS`] keys are this and a number from 1.
const ROTATED_KEY_PREFIX: &str = "load-benchmark-key-";

/// The `i`-th (from 1) of the [`ROTATED_KEYS`] keys.
fn rotated_key(i: usize) -> String {
    format!("{ROTATED_KEY_PREFIX}{i}")
}

/// A wrk script that sends each request with the next of the [`ROTATED_KEYS`] keys as its
/// `x-scp-apikey` (the other headers as given with `-H`), written into `dir`.
fn rotating_keys(dir: &Path) -> PathBuf {
    let path = dir.join("rotating-keys.lua");
    let script = format!(
        "local i = 0\nrequest = function()\n  i = i % {ROTATED_KEYS} + 1\n  wrk.headers[\"x-scp-apikey\"] = \"{ROTATED_KEY_PREFIX}\" .. i\n  return wrk.format()\nend\n"
    );
    std::fs::write(&path, script).expect("write the wrk script");
    path
}

/// The gateway executable under test: `LOAD_GATEWAY`, or the one this build made.
fn gateway_bin() -> String {
    std::env::var("LOAD_GATEWAY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_scp-gateway").into())
}

/// A process this bench started, in its own process group: stopped with its children
/// (nginx's workers, valgrind's client) when dropped, so that nothing is left running.
/// The second field is a gateway's admin listener.
struct Proc(Child, Option<SocketAddr>);

impl Proc {
    /// Starts `cmd` in a process group of its own, and has the kernel send it SIGTERM if
    /// the bench dies first (Linux `PR_SET_PDEATHSIG`): ^C on a long run reaches only the
    /// bench's own group, and a killed bench runs no `Drop`; SIGTERM stops each of these
    /// servers with its children (nginx's master its workers, valgrind its client). Every
    /// `Proc` is started from the main thread, which lives as long as the bench.
    fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
        // SAFETY: between fork and exec the closure calls only `prctl`, which is
        // async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.process_group(0).spawn().map(|c| Proc(c, None))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal_group(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM to the group, then waits (a graceful exit: valgrind writes its counts).
    fn stop(mut self) {
        self.signal_group("TERM");
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            self.signal_group("KILL"); // children may outlive their leader
            return;
        }
        self.signal_group("TERM");
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                self.signal_group("KILL");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group("KILL");
        let _ = self.0.wait();
    }
}

/// Reads the first line of a child's stdout (`listening ...`).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    line
}

/// Starts the gateway executable `bin` (see [`gateway_bin`]) on `dir`'s snapshots with its
/// own state directory `name`.
fn start_gateway(
    bin: &str,
    dir: &Path,
    name: &str,
    prefix: &[&str],
    workers: u64,
    access_log: bool,
    extra: &str,
) -> (Proc, SocketAddr) {
    let mut cfg = format!("[runtime]\nworkers = {workers}\n[snapshots]\nwatch = false\n{extra}");
    if access_log {
        cfg.push_str(&format!(
            "[access_log]\nenabled = true\npath = {:?}\n",
            dir.join(format!("access-{name}.log"))
        ));
    }
    let conf = dir.join(format!("gw-{name}.toml"));
    std::fs::write(&conf, cfg).unwrap();
    let mut p = Proc::spawn(
        Command::new(prefix[0])
            .args(&prefix[1..])
            .arg(bin)
            .args(["run", "--config"])
            .arg(&conf)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--snapshot-dir")
            .arg(dir.join("snapshots"))
            .arg("--state-dir")
            .arg(dir.join(format!("state-{name}")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .expect("start the gateway");
    let line = first_line(&mut p.0);
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("data="))
        .and_then(|a| a.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("gateway {name} did not start: {line:?}"));
    p.1 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("admin="))
        .and_then(|a| a.parse().ok());
    (p, addr)
}

/// The row of the floor that adds the contract's headers (see `start_floor`).
const FLOOR_HEADERS: &str = "floor adding the contract's headers";

/// Starts the floor proxy (this executable with `--floor-proxy`); with `headers`, the
/// floor that adds the contract's headers.
fn start_floor(
    prefix: &[&str],
    workers: u64,
    backend: SocketAddr,
    headers: bool,
) -> (Proc, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .arg(exe)
        .args([
            "--floor-proxy",
            "127.0.0.1:0",
            &backend.to_string(),
            &workers.to_string(),
        ])
        .args(headers.then_some("headers"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut p = Proc::spawn(&mut cmd).expect("start the floor proxy");
    let line = first_line(&mut p.0);
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("floor did not start: {line:?}"));
    (p, addr)
}

/// One Redis Cluster node on CPU 1, answering `PING`. Its ports are picked free just
/// before it binds them, so another process may take one first: a node that exits or does
/// not answer within 5 s is started again on other ports (one run waited forever on a node
/// that had exited).
fn start_cluster_node(d: &Path) -> (Proc, String) {
    for _ in 0..5 {
        let (port, bus) = (free_port(), free_port());
        let mut node = Proc::spawn(
            Command::new("taskset")
                .args(["-c", "1", "redis-server", "--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(d)
                .stdout(Stdio::null()),
        )
        .expect("start redis-server");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = node.0.try_wait() {
                break;
            }
            let pong = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "ping"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"));
            if pong {
                return (node, format!("127.0.0.1:{port}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: a Redis Cluster node on port {port} did not start; trying other ports");
    }
    panic!("no Redis Cluster node could be started (5 tries)");
}

/// A standalone Redis on CPU 1 (no persistence) and the gateway configuration that keeps
/// quotas in it.
/// `EVALSHA` calls Redis has served and its time in them (µs), from `INFO commandstats`.
fn redis_script_stats(port: u16) -> Option<(u64, u64)> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("cmdstat_evalsha:"))?;
    let field = |name: &str| -> Option<u64> {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((field("calls")?, field("usec")?))
}

fn start_redis() -> (Proc, String, u16) {
    let port = free_port();
    let redis = Proc::spawn(
        Command::new("taskset")
            .args(["-c", "1", "redis-server", "--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null()),
    )
    .expect("start redis-server");
    let cfg = format!("[quota]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}/0\"\nfailure_mode = \"closed\"\n");
    (redis, cfg, port)
}

/// A Redis Cluster of `masters` masters on CPU 1, made by `redis-cli --cluster create`;
/// returns the processes and one node's `host:port`.
fn start_redis_cluster(dir: &Path, masters: usize) -> (Vec<Proc>, String) {
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..masters {
        let d = dir.join(format!("redis-cluster-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let (node, addr) = start_cluster_node(&d);
        nodes.push(node);
        addrs.push(addr);
    }
    let ok = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .arg("--cluster-yes")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "redis-cli --cluster create failed");
    let port = addrs[0].rsplit(':').next().unwrap().to_owned();
    let started = Instant::now();
    while !Command::new("redis-cli")
        .args(["-p", &port, "cluster", "info"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the Redis Cluster did not reach cluster_state:ok within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (nodes, addrs[0].clone())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr) -> bool {
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// nginx as a reverse proxy with upstream keep-alive, access log off, the same worker count.
fn start_nginx(
    dir: &Path,
    name: &str,
    prefix: &[&str],
    workers: u64,
    backend: SocketAddr,
    extra: &str,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "{extra}worker_processes {workers};\nerror_log {err} error;\npid {pid};\nevents {{ worker_connections 16384; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  upstream backend {{ server {backend}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        err = dir.join(format!("nginx-{name}-error.log")).display(),
        pid = dir.join(format!("nginx-{name}.pid")).display(),
    );
    let path = dir.join(format!("nginx-{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    let p = Proc::spawn(
        Command::new(prefix[0])
            .args(&prefix[1..])
            .arg("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join(format!("nginx-{name}.stderr")))
                    .map_or(Stdio::null(), Stdio::from),
            ),
    )
    .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    if !wait_listening(addr) {
        let err =
            std::fs::read_to_string(dir.join(format!("nginx-{name}.stderr"))).unwrap_or_default();
        panic!("nginx {name} did not listen on {addr}: {err}");
    }
    (p, addr)
}

/// HAProxy in HTTP mode with server-side keep-alive (`http-reuse always`), no logging.
fn start_haproxy(
    dir: &Path,
    name: &str,
    cpus: &str,
    workers: u64,
    backend: SocketAddr,
) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "global\n  nbthread {workers}\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n  option http-keep-alive\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  server s1 {backend}\n"
    );
    let path = dir.join(format!("haproxy-{name}.cfg"));
    std::fs::write(&path, conf).unwrap();
    let p = Proc::spawn(
        Command::new("taskset")
            .args(["-c", cpus, "haproxy", "-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_listening(addr),
        "haproxy {name} did not listen on {addr}"
    );
    (p, addr)
}

/// The tracing rows: sample ratio and the export thread's priority.
const TRACING_ROWS: [(&str, &str); 3] = [("0.01", "idle"), ("1.0", "idle"), ("1.0", "background")];

/// A tracing row's name; the default priority is not named.
fn tracing_row(ratio: &str, priority: &str) -> String {
    match priority {
        "idle" => format!("gateway, bare route, tracing {ratio} (1w)"),
        other => format!("gateway, bare route, tracing {ratio} {other} (1w)"),
    }
}

/// Spans dropped (any reason) and requests answered so far, from a gateway's `/metrics`.
fn span_counts(admin: SocketAddr) -> Option<(f64, f64)> {
    let out = Command::new("curl")
        .args(["-s", &format!("http://{admin}/metrics")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        sum("apigw_trace_spans_dropped_total{"),
        sum("apigw_requests_total{"),
    ))
}

/// "N % of spans dropped" between two [`span_counts`] readings of a tracing row (its name
/// says its sample ratio; a sampled, forwarded request makes two spans: server and client).
fn dropped_share(row: &str, before: (f64, f64), after: (f64, f64)) -> String {
    let ratio: f64 = row
        .split_once("tracing ")
        .and_then(|(_, r)| r.split(' ').next()?.parse().ok())
        .unwrap_or(1.0);
    let (dropped, requests) = (after.0 - before.0, after.1 - before.1);
    if requests * ratio <= 0.0 {
        return "no spans".into();
    }
    format!(
        "{:.1} % of spans dropped",
        100.0 * dropped / (2.0 * requests * ratio)
    )
}

fn wait_ready(addr: SocketAddr, host: &str, headers: &[String]) {
    let mut last = String::new();
    for _ in 0..1500 {
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
        match out {
            Ok(o) if o.stdout == b"200" => return,
            Ok(o) => last = String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{host} on {addr} never answered 200 (last: {last:?})");
}

/// Connections at once for the second instruction count (see [`callgrind_per_request`]).
const CONCURRENT: usize = 16;

/// One keep-alive connection sending the same GET, each answered in full before the next:
/// a fixed workload whose instruction count does not depend on timing.
struct FixedClient {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    req: Vec<u8>,
}

impl FixedClient {
    fn connect(addr: SocketAddr, host: &str, headers: &[String]) -> std::io::Result<Self> {
        let stream = std::net::TcpStream::connect(addr)?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut req = format!("GET /prod/ping HTTP/1.1\r\nHost: {host}\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        Ok(Self {
            reader,
            writer: stream,
            req: req.into_bytes(),
        })
    }

    /// `n` requests, each answered `200` in full before the next.
    fn run(&mut self, n: usize) -> std::io::Result<()> {
        use std::io::{Error, Read, Write};
        for _ in 0..n {
            self.writer.write_all(&self.req)?;
            let mut len = 0usize;
            let mut status = String::new();
            self.reader.read_line(&mut status)?;
            if !status.contains(" 200 ") {
                return Err(Error::other(format!("fixed workload got {status:?}")));
            }
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line)? == 0 {
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
            self.reader.read_exact(&mut body)?;
        }
        Ok(())
    }
}

/// `n` requests over one new keep-alive connection (see [`FixedClient`]).
fn fixed_requests(
    addr: SocketAddr,
    host: &str,
    headers: &[String],
    n: usize,
) -> std::io::Result<()> {
    FixedClient::connect(addr, host, headers)?.run(n)
}

/// `n` requests on each of `clients` at once, a thread per connection (one connection:
/// on this thread).
fn fixed_requests_on(clients: &mut [FixedClient], n: usize) -> std::io::Result<()> {
    if let [one] = clients {
        return one.run(n);
    }
    std::thread::scope(|s| {
        let runs: Vec<_> = clients
            .iter_mut()
            .map(|c| s.spawn(move || c.run(n)))
            .collect();
        runs.into_iter().try_for_each(|r| {
            r.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("client panicked")))
        })
    })
}

/// The count `label` is wanted by the list in `var` (comma-separated label prefixes;
/// unset or empty: every count).
fn wanted(var: &str, label: &str) -> bool {
    let list = std::env::var(var).unwrap_or_default();
    list.is_empty() || list.split(',').any(|w| label.starts_with(w))
}

/// Starts a proxy under a command prefix (valgrind) with a name for its files.
type Starter<'a> = dyn Fn(&[&str], &str) -> (Proc, SocketAddr) + 'a;

/// Instructions per proxied request under callgrind, counted between two points of one
/// run: 200 requests first (the backend connections, caches, the state directory), then the
/// counters are zeroed (`callgrind_control -z`), 2,500 requests, and the counters are
/// dumped (`callgrind_control -d`). Start-up and shutdown are outside the count; the
/// gateway's state flush (once a second on the control thread, a matter of time, not of
/// requests) is taken out.
///
/// `conns` keep-alive connections carry the requests, each its share one after another;
/// all of them are opened before the warm-up. One connection is the strictest count (the
/// proxy waits between requests: every wait for the kernel, timer and wake-up is paid once
/// per request). Several at once are closer to a loaded proxy: the proxy, slowed down by
/// callgrind, finds several requests ready at each wake-up and shares what a wake-up costs,
/// and fleet mode sends several admissions in one Redis call. How much is shared depends on
/// timing, so that count moves a little from one run to the next.
fn callgrind_per_request(
    dir: &Path,
    label: &str,
    conns: usize,
    host: &str,
    headers: &[String],
    start: &Starter<'_>,
) -> Option<f64> {
    const WARM_UP: usize = 200;
    const COUNTED: usize = 2_500;
    if !wanted("LOAD_CALLGRIND", label) {
        return None;
    }
    let out = dir.join(format!("callgrind-{label}.out"));
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let extra = std::env::var("LOAD_CALLGRIND_ARGS").unwrap_or_default();
    let mut prefix = vec!["valgrind", "--tool=callgrind", &out_arg];
    prefix.extend(extra.split_whitespace());
    let (p, addr) = start(&prefix, &format!("cg-{label}"));
    let control = |what: &str| {
        Command::new("callgrind_control")
            .args([what, &p.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Work a request leaves to a background thread (the trace export thread, which runs on
    // idle CPU time and batches every 500 ms) is counted with the request: the window
    // opens after the warm-up's has been done and closes after the counted requests' has.
    let settle = || {
        if label.starts_with("trace") && label != "trace-0" {
            std::thread::sleep(Duration::from_millis(2_000));
        }
    };
    let each = COUNTED / conns;
    let counted = (0..conns)
        .map(|_| FixedClient::connect(addr, host, headers))
        .collect::<std::io::Result<Vec<_>>>()
        .and_then(|mut clients| {
            fixed_requests_on(&mut clients, WARM_UP.div_ceil(conns)).map(|()| clients)
        })
        .map_err(|e| e.to_string())
        .and_then(|mut clients| {
            settle();
            if !control("-z") {
                return Err("callgrind_control -z failed".into());
            }
            fixed_requests_on(&mut clients, each).map_err(|e| e.to_string())?;
            settle();
            if !control("-d") {
                return Err("callgrind_control -d failed".into());
            }
            Ok(())
        });
    p.stop();
    if let Err(e) = counted {
        eprintln!("warning: callgrind run of {label} failed: {e}");
        return None;
    }
    let dump = dir.join(format!("callgrind-{label}.out.1"));
    if let Some(keep) = std::env::var_os("LOAD_KEEP").map(std::path::PathBuf::from) {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&dump, keep.join(format!("cg-{label}.out")));
    }
    let text = std::fs::read_to_string(&dump).ok()?;
    let total: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))?
        .trim()
        .parse()
        .ok()?;
    Some((total - state_flush(&dump)) / (each * conns) as f64)
}

/// System calls per proxied request: `strace -c` attached to every thread of the proxy
/// after 200 warm-up requests, detached after 2,500 more over one keep-alive connection
/// (the same sequence as the instruction counts). Half a proxy's time goes to the kernel:
/// a system call more per request (an extra read that finds nothing, a write split in
/// two) costs more than hundreds of instructions. The total per request and the calls
/// that make it up, most frequent first.
fn syscalls_per_request(
    dir: &Path,
    label: &str,
    host: &str,
    headers: &[String],
    start: &Starter<'_>,
) -> Option<(f64, Vec<(String, f64)>)> {
    const COUNTED: usize = 2_500;
    if !wanted("LOAD_SYSCALLS", label) {
        return None;
    }
    let (p, addr) = start(&["taskset", "-c", "0"], &format!("sc-{label}"));
    if let Err(e) = fixed_requests(addr, host, headers, 200) {
        eprintln!("warning: syscall count of {label} failed: {e}");
        return None;
    }
    let out = dir.join(format!("strace-{label}.txt"));
    let mut cmd = Command::new("strace");
    cmd.args(["-c", "-f", "-o"]).arg(&out);
    // Every thread the proxy has now (a worker's thread and the control threads).
    for task in std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .ok()?
        .flatten()
    {
        cmd.arg("-p").arg(task.file_name());
    }
    let strace = Proc::spawn(cmd.stdout(Stdio::null()).stderr(Stdio::null())).ok()?;
    // strace attaches to each thread in turn: wait until the last is traced.
    std::thread::sleep(Duration::from_millis(500));
    let counted = fixed_requests(addr, host, headers, COUNTED);
    // SIGINT: strace detaches and writes its summary.
    strace.signal_group("INT");
    let mut strace = strace;
    let _ = strace.0.wait();
    p.stop();
    if let Err(e) = counted {
        eprintln!("warning: syscall count of {label} failed: {e}");
        return None;
    }
    // `strace -c`: `% time  seconds  usecs/call  calls  [errors]  syscall` per line.
    let text = std::fs::read_to_string(&out).ok()?;
    let mut calls: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[0].parse::<f64>().is_err() {
                return None;
            }
            let n: f64 = f[3].parse().ok()?;
            Some((f.last()?.to_string(), n / COUNTED as f64))
        })
        .collect();
    let total = calls.iter().find(|(n, _)| n == "total")?.1;
    calls.retain(|(n, per)| n != "total" && *per >= 0.01);
    calls.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some((total, calls))
}

/// Instructions of the gateway's state flush in a callgrind profile (inclusive, from
/// `callgrind_annotate`; 0 for the floor and nginx).
fn state_flush(profile: &Path) -> f64 {
    let Ok(out) = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--auto=no", "--threshold=100"])
        .arg(profile)
        .output()
    else {
        return 0.0;
    };
    // A function appears once per source file its inlined code came from; its own entry,
    // the largest, includes the others.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(":scp_gateway::app::App::flush_state ["))
        .filter_map(|l| l.split_whitespace().next()?.replace(',', "").parse().ok())
        .fold(0.0, f64::max)
}

/// Resident memory of a process, in KiB.
/// Busy and total jiffies of CPUs 0 and 1 so far (`/proc/stat`; iowait counts as idle).
fn cpu01_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let (mut busy, mut total) = (0, 0);
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        if !matches!(f.next(), Some("cpu0" | "cpu1")) {
            continue;
        }
        let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
        let all: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        busy += all - idle;
        total += all;
    }
    Some((busy, total))
}

/// Waits (at most 5 s) until CPUs 0 and 1 have been nearly idle (under 5 % busy) for 200 ms,
/// so that what a row leaves behind (a tracing gateway's exporter still sending the spans of
/// its row, a Redis save) does not run during the next row.
fn settle(row: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let Some(a) = cpu01_jiffies() else { return };
        std::thread::sleep(Duration::from_millis(200));
        let Some(b) = cpu01_jiffies() else { return };
        let (busy, total) = (b.0 - a.0, b.1 - a.1);
        if total > 0 && busy * 20 < total {
            if started.elapsed() > Duration::from_millis(700) {
                eprintln!(
                    "{row}: waited {:.1} s for CPUs 0-1 to go quiet",
                    started.elapsed().as_secs_f64()
                );
            }
            return;
        }
    }
    eprintln!("warning: {row}: CPUs 0-1 still busy after 5 s; measuring anyway");
}

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

/// CPU time used so far by every live process of the process group `pgid` (a proxy this
/// bench started, with nginx's workers and valgrind's client), in clock ticks
/// (`/proc/<pid>/stat`): user and system together, and user alone.
fn group_cpu_ticks(pgid: u32) -> CpuTicks {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return CpuTicks::default();
    };
    let mut ticks = CpuTicks::default();
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name (field 2) is in parentheses and may hold spaces: the fields
        // that follow it are state, ppid, pgrp, ... utime (14th), stime (15th).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks.all += field(11) + field(12);
        ticks.user += field(11);
    }
    ticks
}

/// CPU time in clock ticks: user and system together, and user alone.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTicks {
    all: u64,
    user: u64,
}

impl CpuTicks {
    fn since(self, before: CpuTicks) -> CpuTicks {
        CpuTicks {
            all: self.all.saturating_sub(before.all),
            user: self.user.saturating_sub(before.user),
        }
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Opens `n` keep-alive connections, each after one answered request, and returns the
/// process's RSS before and after (KiB) with the connections still open, and how many
/// connections were opened.
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
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

fn oha_fixed(
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
        achieved: v["summary"]["requestsPerSec"].as_f64()?,
        p50_ms: p("p50")?,
        p99_ms: p("p99")?,
        p999_ms: p("p99.9")?,
    })
}

/// One wrk run.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
    new_conns: usize,
    /// CPU time the proxy's processes used during the run, in clock ticks (0 without a
    /// proxy process), and the user-space part of it.
    cpu_ticks: u64,
    user_ticks: u64,
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

/// How each closed-loop run loads its row: for how long, over how many connections, and
/// the backend's count of accepted connections (new backend connections per run).
struct Load<'a> {
    seconds: u64,
    conns: u64,
    accepted: &'a AtomicUsize,
}

/// One closed-loop wrk run against `url`; `proxy` is the process group of the proxy in
/// front of the backend, whose CPU time is taken.
fn wrk(
    name: &str,
    url: &str,
    host: &str,
    headers: &[String],
    script: Option<&Path>,
    load: &Load<'_>,
    proxy: Option<u32>,
) -> Run {
    let Load {
        seconds,
        conns,
        accepted,
    } = *load;
    settle(name);
    let before = accepted.load(Ordering::Relaxed);
    let cpu_before = proxy.map_or(CpuTicks::default(), group_cpu_ticks);
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
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => run.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => run.p50_ms = to_ms(v),
            ["99%", v] => run.p99_ms = to_ms(v),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
        if line.contains("Non-2xx") || line.contains("Socket errors") {
            eprintln!("warning: {name}: {line}");
        }
    }
    run.new_conns = accepted.load(Ordering::Relaxed) - before;
    let used = proxy.map_or(CpuTicks::default(), |p| {
        group_cpu_ticks(p).since(cpu_before)
    });
    run.cpu_ticks = used.all;
    run.user_ticks = used.user;
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A proxy under load: where to send requests and what its rounds measured.
struct Row {
    name: String,
    addr: SocketAddr,
    host: String,
    headers: Vec<String>,
    /// A wrk script that makes each request (`-s`), if the requests differ.
    script: Option<PathBuf>,
    runs: Vec<Run>,
    _proc: Option<Proc>,
}

impl Row {
    fn rps(&self) -> f64 {
        median(self.runs.iter().map(|r| r.rps).collect())
    }
    fn p50(&self) -> f64 {
        median(self.runs.iter().map(|r| r.p50_ms).collect())
    }
    fn p99(&self) -> f64 {
        median(self.runs.iter().map(|r| r.p99_ms).collect())
    }
    fn range(&self) -> (f64, f64) {
        let v: Vec<f64> = self.runs.iter().map(|r| r.rps).collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    }
    /// The proxy's CPU time per request (user and system, all its threads and processes),
    /// in microseconds: what a request costs the proxy, less sensitive than req/s to the
    /// load generator's share of this machine.
    fn cpu_us_per_request(&self, ticks_per_second: f64) -> f64 {
        self.us_per_request(ticks_per_second, |r| r.cpu_ticks)
    }
    /// The user-space part of [`Row::cpu_us_per_request`]: with the instruction counts, the
    /// time an instruction of the proxy's own code takes under load (a larger code or data
    /// footprint shows as more time per instruction, not as more instructions).
    fn user_us_per_request(&self, ticks_per_second: f64) -> f64 {
        self.us_per_request(ticks_per_second, |r| r.user_ticks)
    }
    /// The median over runs of `ticks` (clock ticks of a run) per request, in µs.
    fn us_per_request(&self, ticks_per_second: f64, ticks: fn(&Run) -> u64) -> f64 {
        median(
            self.runs
                .iter()
                .filter(|r| r.cpu_ticks > 0 && r.requests > 0.0)
                .map(|r| ticks(r) as f64 * 1e6 / ticks_per_second / r.requests)
                .collect(),
        )
    }
    fn new_conns_per_1000(&self) -> f64 {
        let (n, req): (usize, f64) = self
            .runs
            .iter()
            .fold((0, 0.0), |(n, r), x| (n + x.new_conns, r + x.requests));
        if req > 0.0 {
            n as f64 * 1000.0 / req
        } else {
            f64::NAN
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The floor proxy runs as this executable: `--floor-proxy LISTEN BACKEND WORKERS
    // [headers]`.
    if args.get(1).map(String::as_str) == Some("--floor-proxy") {
        let arg = |i: usize| args.get(i).expect("--floor-proxy LISTEN BACKEND WORKERS");
        floor::main(
            arg(2).parse().unwrap(),
            arg(3).parse().unwrap(),
            arg(4).parse().unwrap(),
            args.get(5).is_some_and(|a| a == "headers"),
        );
        return;
    }
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) skips the run.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    for tool in ["wrk", "taskset", "curl"] {
        assert!(
            has(tool),
            "the load benchmark needs `{tool}` (apt-get install wrk util-linux curl)"
        );
    }
    for (tool, what) in [
        ("nginx", "the nginx rows"),
        ("haproxy", "the HAProxy rows"),
        ("redis-server", "the fleet rows"),
        ("redis-cli", "the Redis Cluster fleet row"),
        ("oha", "row 6 (open loop; cargo install oha)"),
        ("valgrind", "the instruction counts"),
    ] {
        if !has(tool) {
            println!("note: `{tool}` is not installed: {what} are skipped");
        }
    }
    // 10,000 idle connections need as many descriptors in this process.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let seconds = env_num("LOAD_SECONDS", 5);
    let rounds = env_num("LOAD_ROUNDS", 3) as usize;
    let conns = env_num("LOAD_CONNECTIONS", 64);
    let apis = env_num("LOAD_APIS", 1000) as usize;
    let idle_n = env_num("LOAD_IDLE", 10_000) as usize;
    let _ = Command::new("taskset")
        .args(["-pc", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let accepted = Arc::new(AtomicUsize::new(0));
    let backend = start_backend(accepted.clone());
    let tmp = work_dir();
    let write = |dir: &Path, name: &str, v: &Value| {
        std::fs::create_dir_all(dir.join("snapshots")).unwrap();
        std::fs::write(
            dir.join("snapshots").join(name),
            serde_json::to_vec(v).unwrap(),
        )
        .unwrap();
    };
    // The gateway executable under test.
    let gw = gateway_bin();
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

    // Every proxy, started once.
    let mut rows: Vec<Row> = Vec::new();
    // `LOAD_ROWS=fleet,full chain (1w)`: measure only rows whose name contains one of these.
    let only: Vec<String> = std::env::var("LOAD_ROWS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    // `script`: a wrk script that makes each request (see `rotating_keys`); without one,
    // every request is the same.
    let mut add = |name: String,
                   (p, addr): (Proc, SocketAddr),
                   host: &str,
                   headers: &[String],
                   script: Option<&Path>| {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            return;
        }
        wait_ready(addr, host, headers);
        rows.push(Row {
            name,
            addr,
            host: host.into(),
            headers: headers.to_vec(),
            script: script.map(Path::to_path_buf),
            runs: Vec::new(),
            _proc: Some(p),
        });
    };
    let gateway_b = std::env::var("LOAD_GATEWAY_B").ok();
    for (workers, cpus) in [(1u64, "0"), (2, "0,1")] {
        let w = format!("{workers}w");
        let pin = ["taskset", "-c", cpus];
        if has("nginx") {
            let p = start_nginx(tmp.path(), &w, &pin, workers, backend, "");
            add(format!("nginx ({w})"), p, "bare.test", &[], None);
        }
        if has("haproxy") {
            let p = start_haproxy(tmp.path(), &w, cpus, workers, backend);
            add(format!("HAProxy ({w})"), p, "bare.test", &[], None);
        }
        add(
            format!("floor ({w})"),
            start_floor(&pin, workers, backend, false),
            "bare.test",
            &[],
            None,
        );
        // The floor doing what the contract has every proxy do to each request and answer
        // (the gateway's headers, values made once): what of the gap to the floor is the
        // contract's rather than the gateway's own work. One worker: the comparison is made
        // there.
        if workers == 1 {
            add(
                format!("{FLOOR_HEADERS} ({w})"),
                start_floor(&pin, workers, backend, true),
                "bare.test",
                &[],
                None,
            );
        }
        let p = start_gateway(&gw, &single, &format!("bare-{w}"), &pin, workers, false, "");
        add(
            format!("gateway, bare route ({w})"),
            p,
            "bare.test",
            &[],
            None,
        );
        let p = start_gateway(&gw, &single, &format!("full-{w}"), &pin, workers, true, "");
        add(
            format!("gateway, full chain ({w})"),
            p,
            "full.test",
            &full_headers,
            None,
        );
        // A second gateway executable (another build of the same or other sources), on the
        // same rows in the same rounds: an A/B that this shared machine's drift between
        // runs does not blur. One worker.
        if let (1, Some(b)) = (workers, gateway_b.as_deref()) {
            let p = start_gateway(b, &single, "b-bare-1w", &pin, 1, false, "");
            add(
                format!("{GATEWAY_B}, bare route ({w})"),
                p,
                "bare.test",
                &[],
                None,
            );
            let p = start_gateway(b, &single, "b-full-1w", &pin, 1, true, "");
            add(
                format!("{GATEWAY_B}, full chain ({w})"),
                p,
                "full.test",
                &full_headers,
                None,
            );
        }
    }
    // Tracing on the bare route: the OTLP exporter sends to the backend (it answers 200 to
    // anything), which shares CPU 1 with the load generator, as a local collector would.
    // The export thread runs on idle CPU time (the default) or at nice 10 ("background").
    for (ratio, priority) in TRACING_ROWS {
        let cfg = format!(
            "[tracing]\notlp_endpoint = \"http://{backend}\"\nsample_ratio = {ratio}\nexport_priority = \"{priority}\"\n"
        );
        let p = start_gateway(
            &gw,
            &single,
            &format!("trace-{ratio}-{priority}"),
            &["taskset", "-c", "0"],
            1,
            false,
            &cfg,
        );
        add(tracing_row(ratio, priority), p, "bare.test", &[], None);
    }
    // The full chain with its requests spread over many keys (a counter each), locally and
    // in fleet mode: the comparison of the one-key rows (one hot key) for a crowd of
    // clients. Each request's key comes from a wrk script, in both rows.
    let rotating = rotating_keys(tmp.path());
    let keys = |store: &str| format!("gateway, full chain{store}, {ROTATED_KEYS} keys (1w)");
    let p = start_gateway(
        &gw,
        &single,
        "full-keys",
        &["taskset", "-c", "0"],
        1,
        true,
        "",
    );
    add(keys(""), p, "full.test", &full_headers, Some(&rotating));
    // Fleet mode: the full chain with quotas in Redis (redis-server pinned with the backend),
    // with one key and with the many.
    // The standalone Redis of the fleet rows: its script calls are counted per row.
    let mut redis_port = None;
    let _redis = has("redis-server").then(|| {
        let (redis, cfg, port) = start_redis();
        redis_port = has("redis-cli").then_some(port);
        // `LOAD_GATEWAY_B`'s executable on the same rows too (same Redis: the plan's limit
        // is far above what a run admits).
        let bins = std::iter::once(("gateway", gw.as_str()))
            .chain(gateway_b.as_deref().map(|b| (GATEWAY_B, b)));
        for (who, bin) in bins {
            for (state, row, script) in [
                ("fleet", "full chain, fleet/Redis (1w)".to_owned(), None),
                (
                    "fleet-keys",
                    keys(", fleet/Redis").replacen("gateway, ", "", 1),
                    Some(rotating.as_path()),
                ),
            ] {
                let state = format!("{state}-{}", who.replace(' ', "-"));
                let p = start_gateway(bin, &single, &state, &["taskset", "-c", "0"], 1, true, &cfg);
                add(
                    format!("{who}, {row}"),
                    p,
                    "full.test",
                    &full_headers,
                    script,
                );
            }
        }
        redis
    });
    // The same against a Redis Cluster of 3 masters (pinned with the backend).
    let _cluster = (has("redis-server") && has("redis-cli")).then(|| {
        let (nodes, seed) = start_redis_cluster(tmp.path(), 3);
        let cfg = format!("[quota]\nbackend = \"redis\"\nredis_url = \"redis://{seed}\"\nredis_cluster = true\nfailure_mode = \"closed\"\n");
        let p = start_gateway(&gw, &single, "fleet-cluster", &["taskset", "-c", "0"], 1, true, &cfg);
        add("gateway, full chain, fleet/Redis Cluster (1w)".into(), p, "full.test", &full_headers, None);
        nodes
    });
    let started = Instant::now();
    let host = format!("api{:04}.test", apis / 2);
    let p = start_gateway(&gw, &many, "many", &["taskset", "-c", "0"], 1, false, "");
    let many_rss = rss_kib(p.0.pid()).unwrap_or(0);
    add(
        format!("gateway, {apis} APIs × 300 resources (1w)"),
        p,
        &host,
        &[],
        None,
    );
    let load_time = started.elapsed();
    let many_rss = rss_kib(
        rows.last()
            .and_then(|r| r._proc.as_ref())
            .map_or(0, Proc::pid),
    )
    .unwrap_or(many_rss);

    // Rounds, interleaved: each round measures every row once, so that a slow phase of this
    // shared machine spreads over all rows instead of one. The rows' order changes from
    // round to round (a fixed shuffle per round, the same in every run): in a fixed order,
    // a disturbance that recurs at the same point of each round, or that one row leaves
    // behind for the next, would fall on the same row every time (one run had the bare
    // route 10 % below the tracing rows that run the same path and more).
    let direct = format!("http://{backend}/ping");
    let mut direct_runs = Vec::new();
    let load = Load {
        seconds,
        conns,
        accepted: &accepted,
    };
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let ticks = clock_ticks_per_second();
    // Fleet rows: (script calls per 1,000 requests, Redis µs per request) per round.
    let mut redis_runs: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        direct_runs.push(wrk("direct", &direct, "backend", &[], None, &load, None));
        {
            use rand::{seq::SliceRandom, SeedableRng};
            order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(round as u64));
        }
        for &i in &order {
            let r = &mut rows[i];
            let url = format!("http://{}/prod/ping", r.addr);
            let proxy = r._proc.as_ref().map(Proc::pid);
            let fleet_row = r.name.contains("fleet/Redis,") || r.name.contains("fleet/Redis (");
            let redis_before = redis_port
                .filter(|_| fleet_row)
                .and_then(redis_script_stats);
            let run = wrk(
                &r.name,
                &url,
                &r.host,
                &r.headers,
                r.script.as_deref(),
                &load,
                proxy,
            );
            // Each row's figure per round on stderr: a row that drifts over the run (or
            // one disturbed round) shows there, where the medians hide it.
            let per_request = |t: u64| {
                if run.requests > 0.0 {
                    t as f64 * 1e6 / ticks / run.requests
                } else {
                    0.0
                }
            };
            eprintln!(
                "  {:<52} {:>8.0} req/s {:>6.2} µs/req ({:.2} user)",
                r.name,
                run.rps,
                per_request(run.cpu_ticks),
                per_request(run.user_ticks)
            );
            if let (Some((calls, usec)), Some(port)) = (redis_before, redis_port) {
                if let Some((calls_after, usec_after)) = redis_script_stats(port) {
                    let per_1k = |n: u64| n as f64 * 1000.0 / run.requests.max(1.0);
                    redis_runs.entry(r.name.clone()).or_default().push((
                        per_1k(calls_after.saturating_sub(calls)),
                        per_1k(usec_after.saturating_sub(usec)) / 1000.0,
                    ));
                }
            }
            r.runs.push(run);
        }
    }
    let direct_rps = median(direct_runs.iter().map(|r| r.rps).collect());
    let find = |name: &str| rows.iter().find(|r| r.name.starts_with(name)).map(Row::rps);

    println!();
    println!("load benchmark: wrk -t1 -c{conns}, {rounds} interleaved rounds × {seconds}s per row, medians (range); keep-alive; backend + wrk on CPU 1, proxy on CPU 0 (1w) or 0-1 (2w)");
    if let Ok(bin) = std::env::var("LOAD_GATEWAY") {
        println!("gateway under test: {bin} (LOAD_GATEWAY)");
    }
    if let Some(bin) = &gateway_b {
        println!("{GATEWAY_B}: {bin} (LOAD_GATEWAY_B)");
    }
    let per_request = |name: &str, of: fn(&Row, f64) -> f64| {
        rows.iter()
            .find(|r| r.name.starts_with(name))
            .map(|r| of(r, ticks))
    };
    let cpu = |name: &str| per_request(name, Row::cpu_us_per_request);
    let user = |name: &str| per_request(name, Row::user_us_per_request);
    println!(
        "{:<50} {:>9} {:>13} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>5}",
        "row",
        "req/s",
        "range",
        "p50 ms",
        "p99 ms",
        "/nginx",
        "/floor",
        "conn/1k",
        "cpu µs/req",
        "user"
    );
    println!(
        "{:<50} {:>9.0} {:>13} {:>8.3} {:>8.3} {:>8} {:>8} {:>9} {:>10} {:>5}",
        "direct to the backend",
        direct_rps,
        "",
        median(direct_runs.iter().map(|r| r.p50_ms).collect()),
        median(direct_runs.iter().map(|r| r.p99_ms).collect()),
        "",
        "",
        "",
        "",
        ""
    );
    for r in &rows {
        let w = if r.name.contains("(2w)") {
            "(2w)"
        } else {
            "(1w)"
        };
        let ratio =
            |base: Option<f64>| base.map_or("-".to_owned(), |b| format!("{:.2}×", r.rps() / b));
        let (lo, hi) = r.range();
        println!(
            "{:<50} {:>9.0} {:>13} {:>8.3} {:>8.3} {:>8} {:>8} {:>9.2} {:>10.2} {:>5.2}",
            r.name,
            r.rps(),
            format!("{lo:.0}–{hi:.0}"),
            r.p50(),
            r.p99(),
            ratio(find(&format!("nginx {w}"))),
            ratio(find(&format!("floor {w}"))),
            r.new_conns_per_1000(),
            r.cpu_us_per_request(ticks),
            r.user_us_per_request(ticks)
        );
    }
    println!();
    // One row's req/s over another's: the ratio of their medians, and in parentheses the
    // median of the per-round ratios (rounds are interleaved: a slow stretch of this shared
    // machine that falls on both rows of a round cancels out there).
    let vs = |a: &str, b: &str| -> Option<String> {
        let row = |name: &str| rows.iter().find(|r| r.name.starts_with(name));
        let (a, b) = (row(a)?, row(b)?);
        let paired = median(
            a.runs
                .iter()
                .zip(&b.runs)
                .map(|(x, y)| x.rps / y.rps)
                .collect(),
        );
        Some(format!(
            "{:.2}× (paired by round {paired:.2}×)",
            a.rps() / b.rps()
        ))
    };
    for w in ["1w", "2w"] {
        let bare_row = format!("gateway, bare route ({w})");
        let headers_row = format!("{FLOOR_HEADERS} ({w})");
        if let Some(to_floor) = vs(&bare_row, &format!("floor ({w})")) {
            print!("{w}: bare route {to_floor} the floor");
            if let Some(to_nginx) = vs(&bare_row, &format!("nginx ({w})")) {
                print!(", {to_nginx} nginx");
            }
            if let Some(to_bare) = vs(&format!("gateway, full chain ({w})"), &bare_row) {
                print!("; full chain {to_bare} the bare route");
            }
            println!();
            // The gap split: the contract's part (the floor adding its headers, against the
            // floor) and the gateway's own (the bare route against that floor).
            if let (Some(contract), Some(own)) = (
                vs(&headers_row, &format!("floor ({w})")),
                vs(&bare_row, &headers_row),
            ) {
                println!(
                    "{w}: the floor adding the contract's headers {contract} the floor; bare route {own} that floor"
                );
            }
            // The same comparison in the proxy's CPU time per request (lower is better).
            if let (Some(bare), Some(floor)) = (
                cpu(&format!("gateway, bare route ({w})")),
                cpu(&format!("floor ({w})")),
            ) {
                print!(
                    "{w}: CPU per request: bare route {:.2}× the floor's",
                    bare / floor
                );
                // User space alone: the part of the CPU time the instruction counts describe.
                let user_of =
                    |row: &str| user(&format!("{row} ({w})")).zip(user(&format!("floor ({w})")));
                if let Some((b, f)) = user_of("gateway, bare route") {
                    print!(" (user space {:.2}×)", b / f);
                }
                if let Some(ng) = cpu(&format!("nginx ({w})")) {
                    print!(", {:.2}× nginx's", bare / ng);
                }
                if let Some(h) = cpu(&headers_row) {
                    print!(
                        " (the floor adding the contract's headers {:.2}× the floor's)",
                        h / floor
                    );
                }
                if let Some(full) = cpu(&format!("gateway, full chain ({w})")) {
                    print!("; full chain {:.2}× the bare route's", full / bare);
                    if let Some((u, f)) = user_of("gateway, full chain") {
                        print!(" (user space {:.2}× the floor's)", u / f);
                    }
                }
                println!();
            }
        }
    }
    let fleet_keys_row = format!("full chain, fleet/Redis, {ROTATED_KEYS} keys");
    for row in [
        "bare route",
        "full chain",
        "full chain, fleet/Redis",
        &fleet_keys_row,
    ] {
        let (a, b) = (
            format!("gateway, {row} (1w)"),
            format!("{GATEWAY_B}, {row} (1w)"),
        );
        if let (Some(ratio), Some(cpu_a), Some(cpu_b)) = (vs(&b, &a), cpu(&a), cpu(&b)) {
            println!(
                "LOAD_GATEWAY_B: {row} {ratio} this build's (1w); CPU per request {:.3}× this build's",
                cpu_b / cpu_a
            );
        }
    }
    // Redis runs on CPU 1 with the backend and wrk: its time per admission slows the load
    // generator too, so the fleet rows' req/s understate the gateway's own rate. The
    // gateway's CPU per request is the figure Redis's load does not move.
    let fleet_cpu = |name: &str| {
        cpu(name)
            .zip(cpu("gateway, full chain (1w)"))
            .map_or(String::new(), |(f, l)| {
                format!("; CPU per request {:.2}× the local store's", f / l)
            })
    };
    if let Some(to_local) = vs(
        "gateway, full chain, fleet/Redis (1w)",
        "gateway, full chain (1w)",
    ) {
        println!(
            "fleet mode: full chain with the Redis quota store {to_local} the local store (1w){}",
            fleet_cpu("gateway, full chain, fleet/Redis (1w)")
        );
    }
    if let Some(to_local) = vs(
        &format!("gateway, full chain, fleet/Redis, {ROTATED_KEYS} keys (1w)"),
        &format!("gateway, full chain, {ROTATED_KEYS} keys (1w)"),
    ) {
        let cpu_ratio = cpu(&format!(
            "gateway, full chain, fleet/Redis, {ROTATED_KEYS} keys (1w)"
        ))
        .zip(cpu(&format!(
            "gateway, full chain, {ROTATED_KEYS} keys (1w)"
        )))
        .map_or(String::new(), |(f, l)| {
            format!("; CPU per request {:.2}× the local store's", f / l)
        });
        println!(
            "fleet mode, requests spread over {ROTATED_KEYS} keys: full chain with the Redis quota store {to_local} the local store (1w){cpu_ratio}"
        );
    }
    // How well a worker's admissions share calls under load, and what they cost Redis
    // (its time counts against CPU 1, which the load generator and the backend share).
    for (name, runs) in &redis_runs {
        let calls = median(runs.iter().map(|r| r.0).collect());
        let usec = median(runs.iter().map(|r| r.1).collect());
        println!(
            "fleet mode: {name}: {calls:.0} script calls per 1,000 requests ({:.1} admissions a call), Redis {usec:.2} µs per request",
            1000.0 / calls.max(f64::MIN_POSITIVE)
        );
    }
    if let Some(bare) = find("gateway, bare route (1w)") {
        for (ratio, priority) in TRACING_ROWS {
            let name = tracing_row(ratio, priority);
            if let Some(t) = find(&name) {
                // Spans dropped over the closed-loop rounds (a saturated core: the export
                // thread gets what the worker leaves, see `tracing.export_priority`).
                let dropped = rows
                    .iter()
                    .find(|r| r.name == name)
                    .and_then(|r| r._proc.as_ref()?.1)
                    .and_then(span_counts)
                    .map_or(String::new(), |after| {
                        format!("; {}", dropped_share(&name, (0.0, 0.0), after))
                    });
                println!(
                    "tracing: bare route with sample_ratio {ratio}, export_priority {priority}: {:.3}× tracing off (1w){dropped}",
                    t / bare
                );
            }
        }
    }
    if let Some(to_local) = vs(
        "gateway, full chain, fleet/Redis Cluster",
        "gateway, full chain (1w)",
    ) {
        println!(
            "fleet mode: full chain with a 3-master Redis Cluster {to_local} the local store (1w){}",
            fleet_cpu("gateway, full chain, fleet/Redis Cluster")
        );
    }
    if let (Some(bare), Some(m)) = (
        find("gateway, bare route (1w)"),
        find(&format!("gateway, {apis} APIs")),
    ) {
        println!(
            "{apis} APIs × 300 resources: {:.2}× the bare route; loaded in {load_time:.2?}; RSS {many_rss} KiB",
            m / bare
        );
    }

    // Row 6: open-loop runs at half nginx's maximum (1 worker; without an nginx row, not
    // installed or left out by `LOAD_ROWS`, the floor's), latency corrected for coordinated
    // omission. In interleaved rounds, as the closed-loop rows (a p99 over a few seconds is
    // what a slow stretch of this shared machine moves most): each round runs the backend
    // directly and then every row, in a shuffled order; a row's added p99 is the median
    // over rounds of its p99 less the same round's direct p99.
    let (rate_of, max) = match find("nginx (1w)") {
        Some(r) => ("nginx", Some(r)),
        None => ("the floor", find("floor (1w)")),
    };
    let rate = (max.unwrap_or(0.0) / 2.0).round() as u64;
    if has("oha") && rate > 0 && std::env::var("LOAD_OPEN").as_deref() != Ok("0") {
        let targets: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.name.ends_with("(1w)")
                    && r.script.is_none()
                    && !r.name.contains("fleet")
                    && !r.name.contains("APIs")
                    && !r.name.starts_with(FLOOR_HEADERS)
            })
            .collect();
        let spans_before: Vec<_> = targets
            .iter()
            .map(|r| {
                r._proc
                    .as_ref()
                    .and_then(|p| p.1)
                    .filter(|_| r.name.contains("tracing"))
                    .and_then(span_counts)
            })
            .collect();
        let mut direct_runs: Vec<Option<Fixed>> = Vec::new();
        let mut runs: Vec<Vec<Option<Fixed>>> = vec![Vec::new(); targets.len()];
        let mut order: Vec<usize> = (0..targets.len()).collect();
        for round in 0..rounds {
            eprintln!("open loop, round {}/{rounds}", round + 1);
            let d = oha_fixed(&direct, "backend", &[], rate, seconds, conns);
            eprintln!(
                "  {:<52} p99 {:>7.3} ms",
                "direct to the backend",
                d.as_ref().map_or(f64::NAN, |f| f.p99_ms)
            );
            direct_runs.push(d);
            {
                use rand::{seq::SliceRandom, SeedableRng};
                order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(round as u64));
            }
            for &i in &order {
                let r = targets[i];
                let url = format!("http://{}/prod/ping", r.addr);
                let f = oha_fixed(&url, &r.host, &r.headers, rate, seconds, conns);
                eprintln!(
                    "  {:<52} p99 {:>7.3} ms",
                    r.name,
                    f.as_ref().map_or(f64::NAN, |f| f.p99_ms)
                );
                runs[i].push(f);
            }
        }
        println!();
        println!("row 6, open loop: oha -q {rate} (half {rate_of}'s 1w maximum) -c{conns} -z{seconds}s --latency-correction, oha on CPU 1, {rounds} interleaved rounds, medians; added p99: median over rounds of (row p99 − that round's direct p99)");
        println!(
            "{:<50} {:>9} {:>8} {:>8} {:>9} {:>13}",
            "row", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms"
        );
        let med = |v: &[Option<Fixed>], f: fn(&Fixed) -> f64| {
            let xs: Vec<f64> = v.iter().flatten().map(f).collect();
            (!xs.is_empty()).then(|| median(xs))
        };
        let line = |name: &str, v: &[Option<Fixed>], added: Option<f64>| {
            if let (Some(rps), Some(p50), Some(p99), Some(p999)) = (
                med(v, |f| f.achieved),
                med(v, |f| f.p50_ms),
                med(v, |f| f.p99_ms),
                med(v, |f| f.p999_ms),
            ) {
                println!(
                    "{:<50} {:>9.0} {:>8.3} {:>8.3} {:>9.3} {:>13}",
                    name,
                    rps,
                    p50,
                    p99,
                    p999,
                    added.map_or("-".to_string(), |a| format!("{a:.3}"))
                );
            }
        };
        line("direct to the backend", &direct_runs, Some(0.0));
        for (r, v) in targets.iter().zip(&runs) {
            let added: Vec<f64> = v
                .iter()
                .zip(&direct_runs)
                .filter_map(|(f, d)| Some(f.as_ref()?.p99_ms - d.as_ref()?.p99_ms))
                .collect();
            line(&r.name, v, (!added.is_empty()).then(|| median(added)));
        }
        for (r, before) in targets.iter().zip(spans_before) {
            let admin = r._proc.as_ref().and_then(|p| p.1);
            if let (Some(before), Some(after)) = (before, admin.and_then(span_counts)) {
                let share = dropped_share(&r.name, before, after);
                println!("open loop, {}: {share}", r.name);
            }
        }
    }

    // Idle keep-alive connections: memory per connection, gateway and floor (1 worker);
    // `LOAD_IDLE=0` skips them.
    println!();
    let idle_rows: &[&str] = if idle_n == 0 {
        &[]
    } else {
        &["floor (1w)", "gateway, bare route (1w)"]
    };
    for &name in idle_rows {
        let Some(r) = rows.iter().find(|r| r.name == name) else {
            continue;
        };
        let pid = r._proc.as_ref().map_or(0, Proc::pid);
        let (before, after, opened) = idle_connections(pid, r.addr, &r.host, idle_n);
        println!(
            "{opened} idle keep-alive connections, {name}: RSS {before} KiB → {after} KiB, {:.2} KiB each",
            after.saturating_sub(before) as f64 / opened.max(1) as f64
        );
    }
    // The load rows are done: stop their proxies before callgrind runs.
    drop(rows);
    drop(_redis);
    drop(_cluster);

    // System calls per proxied request (1 worker, one keep-alive connection).
    if has("strace") && std::env::var("LOAD_SYSCALLS").as_deref() != Ok("0") {
        let dir = tmp.path();
        let counts = [
            syscalls_per_request(dir, "floor", "bare.test", &[], &|prefix, _| {
                start_floor(prefix, 1, backend, false)
            }),
            syscalls_per_request(dir, "bare", "bare.test", &[], &|prefix, name| {
                start_gateway(&gw, &single, name, prefix, 1, false, "")
            }),
            syscalls_per_request(dir, "full", "full.test", &full_headers, &|prefix, name| {
                start_gateway(&gw, &single, name, prefix, 1, true, "")
            }),
            has("nginx")
                .then(|| {
                    syscalls_per_request(dir, "nginx", "bare.test", &[], &|prefix, name| {
                        start_nginx(dir, name, prefix, 1, backend, "master_process off;\n")
                    })
                })
                .flatten(),
        ];
        println!();
        println!("system calls per proxied request (strace -c, 1 worker, 2,500 requests on one keep-alive connection after 200 uncounted):");
        let names = [
            "floor",
            "gateway, bare route",
            "gateway, full chain",
            "nginx",
        ];
        for (name, count) in names.iter().zip(counts) {
            match count {
                Some((total, calls)) => {
                    let each: Vec<String> =
                        calls.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
                    println!("  {name} {total:.2} ({})", each.join(", "));
                }
                None => println!("  {name} -"),
            }
        }
    }

    // Instructions per proxied request (1 worker, one keep-alive connection).
    if has("valgrind") && std::env::var("LOAD_CALLGRIND").as_deref() != Ok("0") {
        let dir = tmp.path();
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        let fl = callgrind_per_request(dir, "floor", 1, "bare.test", &[], &|prefix, _| {
            start_floor(prefix, 1, backend, false)
        });
        let fl_headers =
            callgrind_per_request(dir, "floor-headers", 1, "bare.test", &[], &|prefix, _| {
                start_floor(prefix, 1, backend, true)
            });
        // The floor given the full chain's request (its token, key and `Origin`, ~250
        // bytes more): what parsing and forwarding those bytes costs the stack alone.
        let fl_full = callgrind_per_request(
            dir,
            "floor-full-request",
            1,
            "full.test",
            &full_headers,
            &|prefix, _| start_floor(prefix, 1, backend, false),
        );
        let bare = callgrind_per_request(dir, "bare", 1, "bare.test", &[], &|prefix, name| {
            start_gateway(&gw, &single, name, prefix, 1, false, "")
        });
        let full = callgrind_per_request(
            dir,
            "full",
            1,
            "full.test",
            &full_headers,
            &|prefix, name| start_gateway(&gw, &single, name, prefix, 1, true, ""),
        );
        // The bare route's API among many (the 1,000 APIs row's snapshots): what a large
        // route table and host map cost per request, free of the throughput rows' noise.
        let many_count = callgrind_per_request(dir, "apis", 1, &host, &[], &|prefix, name| {
            start_gateway(&gw, &many, name, prefix, 1, false, "")
        });
        // Fleet mode: the full chain with its quota in Redis (a round trip per request;
        // Redis's own work is not counted, it is another process). One connection, and
        // CONCURRENT at once (admissions share a call).
        let [fleet, fleet_at] = if has("redis-server") {
            let (redis, cfg, _) = start_redis();
            let count = |label: &str, conns: usize| {
                callgrind_per_request(
                    dir,
                    label,
                    conns,
                    "full.test",
                    &full_headers,
                    &|prefix, name| {
                        let (p, addr) = start_gateway(&gw, &single, name, prefix, 1, true, &cfg);
                        // Connected to Redis in the background: the first requests may
                        // meet the failure mode (503).
                        let started = Instant::now();
                        while fixed_requests(addr, "full.test", &full_headers, 1).is_err()
                            && started.elapsed() < Duration::from_secs(60)
                        {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        (p, addr)
                    },
                )
            };
            let v = [
                count("fleet", 1),
                count(&format!("fleet@{CONCURRENT}"), CONCURRENT),
            ];
            drop(redis);
            v
        } else {
            [None, None]
        };
        // The floor, the bare route and the full chain with CONCURRENT connections at once.
        let fl_at = callgrind_per_request(
            dir,
            &format!("floor@{CONCURRENT}"),
            CONCURRENT,
            "bare.test",
            &[],
            &|prefix, _| start_floor(prefix, 1, backend, false),
        );
        let bare_at = callgrind_per_request(
            dir,
            &format!("bare@{CONCURRENT}"),
            CONCURRENT,
            "bare.test",
            &[],
            &|prefix, name| start_gateway(&gw, &single, name, prefix, 1, false, ""),
        );
        let full_at = callgrind_per_request(
            dir,
            &format!("full@{CONCURRENT}"),
            CONCURRENT,
            "full.test",
            &full_headers,
            &|prefix, name| start_gateway(&gw, &single, name, prefix, 1, true, ""),
        );
        // Tracing on, every request unsampled (ratio 0) and every request sampled (ratio
        // 1, the export thread's work included): the exporter sends to the backend.
        let traced = ["0", "1"].map(|ratio| {
            let cfg = format!(
                "[tracing]\notlp_endpoint = \"http://{backend}\"\nsample_ratio = {ratio}\n"
            );
            callgrind_per_request(
                dir,
                &format!("trace-{ratio}"),
                1,
                "bare.test",
                &[],
                &|prefix, name| start_gateway(&gw, &single, name, prefix, 1, false, &cfg),
            )
        });
        // The floor and the bare route behind a backend whose answer head is nginx's
        // (`Server`, `Content-Type`, `Connection: keep-alive`): the answer's hop-by-hop
        // handling and its larger head, which the minimal backend's answer does not have.
        let nginx_like = start_backend_answering(Arc::new(AtomicUsize::new(0)), true);
        let single_ka = tmp.path().join("single-nginx-like");
        write(
            &single_ka,
            "bare.json",
            &snapshot("bare", "bare.test", nginx_like, 2),
        );
        let fl_ka = callgrind_per_request(dir, "floor-ka", 1, "bare.test", &[], &|prefix, _| {
            start_floor(prefix, 1, nginx_like, false)
        });
        let bare_ka =
            callgrind_per_request(dir, "bare-ka", 1, "bare.test", &[], &|prefix, name| {
                start_gateway(&gw, &single_ka, name, prefix, 1, false, "")
            });
        let ng = has("nginx")
            .then(|| {
                callgrind_per_request(dir, "nginx", 1, "bare.test", &[], &|prefix, name| {
                    start_nginx(dir, name, prefix, 1, backend, "master_process off;\n")
                })
            })
            .flatten();
        println!();
        println!("instructions per proxied request (callgrind, 1 worker, 2,500 requests on one keep-alive connection after 200 uncounted):");
        // `count (1.23× the floor), 1.234× the <base>`, with what was taken.
        let times_floor = |v: Option<f64>, floor: Option<f64>| match (v, floor) {
            (Some(v), Some(f)) => format!(" ({:.2}× the floor)", v / f),
            _ => String::new(),
        };
        let ratio_to = |v: Option<f64>, base: Option<f64>, name: &str| match (v, base) {
            (Some(v), Some(b)) => format!(", {:.3}× the {name}", v / b),
            _ => String::new(),
        };
        let line = |name: &str, v: Option<f64>, floor: Option<f64>, base: Option<f64>, of: &str| {
            println!(
                "  {name} {}{}{}",
                show(v),
                times_floor(v, floor),
                ratio_to(v, base, of)
            );
        };
        println!("  floor {}", show(fl));
        line(
            "floor adding the contract's 8 headers (values made once)",
            fl_headers,
            fl,
            None,
            "",
        );
        line(
            "floor given the full chain's request (token, key, Origin)",
            fl_full,
            fl,
            None,
            "",
        );
        line("gateway, bare route", bare, fl, None, "");
        let full_line = "gateway, full chain";
        line(full_line, full, fl, fl_full, "floor given its request");
        let fleet_line = "gateway, full chain, fleet/Redis";
        line(fleet_line, fleet, fl, full, "full chain");
        line(
            &format!("gateway, bare route among {apis} APIs × 300 resources"),
            many_count,
            fl,
            bare,
            "bare route",
        );
        for (ratio, v) in ["0 (unsampled)", "1 (every request)"].iter().zip(traced) {
            line(
                &format!("gateway, bare route, tracing sample_ratio {ratio}"),
                v,
                fl,
                bare,
                "bare route",
            );
        }
        line("nginx", ng, fl, None, "");
        line(
            "floor, backend answering with nginx's head (Connection: keep-alive ...)",
            fl_ka,
            fl,
            None,
            "",
        );
        println!(
            "  gateway, bare route, backend answering with nginx's head {}{}{}",
            show(bare_ka),
            match (bare_ka, fl_ka) {
                (Some(v), Some(f)) => format!(" ({:.2}× that floor)", v / f),
                _ => String::new(),
            },
            ratio_to(bare_ka, bare, "bare route")
        );
        println!();
        println!(
            "instructions per proxied request, {CONCURRENT} keep-alive connections at once (callgrind, 1 worker, {} requests on each after {} uncounted):",
            2_500 / CONCURRENT,
            200usize.div_ceil(CONCURRENT)
        );
        println!("  floor {}", show(fl_at));
        line("gateway, bare route", bare_at, fl_at, None, "");
        line(full_line, full_at, fl_at, None, "");
        line(fleet_line, fleet_at, fl_at, full_at, "full chain");
    }
}
