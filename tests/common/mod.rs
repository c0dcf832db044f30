//! Test harness: the real `scp-gateway` binary on ephemeral ports, real backends in the test
//! process, snapshots written into a temporary directory. Everything is cleaned up on drop.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};

pub mod fleet;
pub mod redis;

/// A child a test starts (a gateway, a Redis, a Prometheus) would outlive a test binary
/// killed from outside (a CI timeout, ^C on a hung run) and keep its ports and files.
/// [`DiesWithTest::dies_with_test`] has the kernel kill it (SIGKILL) when the thread that
/// started it ends (Linux `PR_SET_PDEATHSIG`): a test's own thread, or its runtime's, which
/// outlive the test's children; the children's own `Drop` still stops them first in a run
/// that ends normally.
pub trait DiesWithTest {
    fn dies_with_test(&mut self) -> &mut Self;
}

impl DiesWithTest for Command {
    fn dies_with_test(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure calls only `prctl`, which is
        // async-signal-safe, and allocates nothing.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body_len: usize,
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A backend in the test process. Paths it understands (anything else echoes):
/// - `/big?mb=N`: streams N MiB of body;
/// - `/slow?ms=N`: answers after N ms;
/// - a query with `own_fields=1`: the answer also carries fields the gateway writes on its
///   answers (`x-scp-request-id`, `RateLimit-*`, CORS) and a `Vary`, as a backend's own;
/// - every response carries `x-backend: <name>` and a JSON body with uri and body length.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_num(uri: &http::Uri, key: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (seen2, name2) = (seen.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, name) = (seen2.clone(), name2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, name) = (seen.clone(), name.clone());
                        async move { Ok::<_, Infallible>(respond(req, &seen, &name).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_owned(),
            seen,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the backend saw a request")
    }
}

async fn respond(
    req: http::Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<Seen>>,
    name: &str,
) -> http::Response<BoxBody> {
    let (parts, mut body) = req.into_parts();
    // Count the body without keeping it.
    let mut body_len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len,
    });
    if parts.uri.path().starts_with("/slow") {
        let ms = query_num(&parts.uri, "ms").unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body: BoxBody = if parts.uri.path().starts_with("/big") {
        let mb = query_num(&parts.uri, "mb").unwrap_or(1) as usize;
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::iter(
            (0..mb * 16).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
        );
        BoxBody::new(StreamBody::new(stream))
    } else {
        let v = json!({ "backend": name, "uri": parts.uri.to_string(), "body_len": body_len });
        BoxBody::new(Full::new(Bytes::from(v.to_string())))
    };
    let mut resp = http::Response::new(body);
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    resp.headers_mut()
        .insert("connection", "keep-alive".parse().unwrap());
    resp.headers_mut().insert(
        "access-control-allow-origin",
        "https://backend.example".parse().unwrap(),
    );
    if query_num(&parts.uri, "own_fields") == Some(1) {
        for (name, value) in [
            ("x-scp-request-id", "from-backend"),
            ("ratelimit-limit", "7"),
            ("ratelimit-remaining", "6"),
            ("ratelimit-reset", "5"),
            ("ratelimit-policy", "7;w=60"),
            ("access-control-expose-headers", "x-backend"),
            ("access-control-allow-credentials", "false"),
            ("vary", "Accept-Encoding"),
        ] {
            resp.headers_mut()
                .append(name, http::HeaderValue::from_static(value));
        }
    }
    resp
}

/// A snapshot document for tests: one API, one deployment, one stage `prod`.
pub struct SnapshotBuilder {
    pub doc: Value,
}

impl SnapshotBuilder {
    pub fn new(api_id: &str, hosts: &[&str]) -> Self {
        SnapshotBuilder {
            doc: json!({
                "format": "scp-apigw.snapshot/v1",
                "revision": 1,
                "api": { "id": api_id, "name": api_id, "account_id": "acc", "hosts": hosts },
                "deployments": [ { "deployment_id": "d1", "resources": [
                    { "id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": [] }
                ] } ],
                "stages": [ { "name": "prod", "deployment_id": "d1" } ]
            }),
        }
    }

    /// Adds a resource (the parent must exist) with `(method, endpoint_url)` methods.
    pub fn resource(mut self, path: &str, methods: &[(&str, &str)]) -> Self {
        self.resource_in("d1", path, methods);
        self
    }

    pub fn resource_in(&mut self, deployment: &str, path: &str, methods: &[(&str, &str)]) {
        let deps = self.doc["deployments"].as_array_mut().unwrap();
        let dep = deps
            .iter_mut()
            .find(|d| d["deployment_id"] == deployment)
            .expect("deployment");
        let resources = dep["resources"].as_array_mut().unwrap();
        let (parent_path, part) = path.rsplit_once('/').unwrap();
        let parent_path = if parent_path.is_empty() {
            "/"
        } else {
            parent_path
        };
        let parent_id = resources
            .iter()
            .find(|r| r["path"] == parent_path)
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("parent of {path} must be added first"));
        let id = format!("r{}", resources.len());
        let methods: Vec<Value> = methods
            .iter()
            .map(|(m, url)| json!({ "method_type": m, "integration_type": "HTTP", "endpoint_url": url }))
            .collect();
        resources.push(json!({ "id": id, "parent_id": parent_id, "path": path, "path_part": part, "methods": methods }));
    }

    pub fn stage(mut self, f: impl FnOnce(&mut Value)) -> Self {
        f(&mut self.doc["stages"][0]);
        self
    }

    pub fn build(self) -> Value {
        self.doc
    }
}

/// The gateway binary, started on ephemeral ports with its own temporary directories.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The first PROXY-protocol listener, when configured.
    pub proxy_addr: Option<SocketAddr>,
    /// The first TLS listener, when configured.
    pub tls_addr: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway binary under test; `SCP_GATEWAY_BIN` points the tests at another build
/// (for example `target/release/scp-gateway` for the soak figures).
pub fn bin() -> String {
    std::env::var("SCP_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_scp-gateway").to_owned())
}

impl Gateway {
    /// Starts the gateway with these snapshot files (name → document) and extra TOML.
    pub fn start(snapshots: &[(&str, &Value)], extra_toml: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let snap_dir = dir.path().join("snapshots");
        std::fs::create_dir_all(&snap_dir).unwrap();
        for (name, doc) in snapshots {
            std::fs::write(snap_dir.join(name), serde_json::to_vec_pretty(doc).unwrap()).unwrap();
        }
        Self::start_in(dir, extra_toml)
    }

    pub fn start_in(dir: tempfile::TempDir, extra_toml: &str) -> Gateway {
        Self::start_with_args(dir, extra_toml, &[])
    }

    /// Starts the gateway in `dir` with extra TOML and extra `run` arguments (overrides).
    pub fn start_with_args(dir: tempfile::TempDir, extra_toml: &str, args: &[&str]) -> Gateway {
        // Addresses and directories go in as command-line overrides (which they test), so that
        // `extra_toml` may hold any table.
        // Two workers unless the test says otherwise.
        let config = if extra_toml.contains("[runtime]") {
            format!("{extra_toml}\n")
        } else {
            format!("[runtime]\nworkers = 2\n{extra_toml}\n")
        };
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut overrides: Vec<String> = Vec::new();
        if !args.contains(&"--listen") {
            overrides.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !args.contains(&"--admin-listen") {
            overrides.extend(["--admin-listen".into(), "127.0.0.1:0".into()]);
        }
        overrides.extend([
            "--snapshot-dir".into(),
            dir.path().join("snapshots").display().to_string(),
        ]);
        overrides.extend([
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
        ]);
        std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let mut child = Command::new(bin())
            .dies_with_test()
            .args(["run", "--config"])
            .arg(&config_path)
            .args(&overrides)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let first = |key: &str| -> Option<SocketAddr> {
            listening_fields(&line)?
                .get(key)?
                .split(',')
                .next()?
                .parse()
                .ok()
        };
        let (proxy_addr, tls_addr) = (first("proxy"), first("tls"));
        let (addr, admin) = parse_listening(&line).unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
            panic!("gateway did not start: {line:?}\n{log}")
        });
        Gateway {
            child,
            addr,
            admin,
            proxy_addr,
            tls_addr,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to the data plane addressed to the API of `host`.
    pub fn req(
        &self,
        c: &reqwest::Client,
        method: reqwest::Method,
        host: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        c.request(method, self.url(path)).header("host", host)
    }

    /// `GET` through the gateway; panics only when no response arrives.
    pub async fn get(&self, c: &reqwest::Client, host: &str, path: &str) -> reqwest::Response {
        self.req(c, reqwest::Method::GET, host, path)
            .send()
            .await
            .unwrap()
    }

    /// Sends a signal to the gateway (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name}");
    }

    /// Stops the gateway with SIGTERM, waits for it, and hands back its directory.
    pub fn terminate(self) -> (std::process::ExitStatus, tempfile::TempDir) {
        self.stop_with("TERM")
    }

    /// Stops the gateway with `signal`, waits for it, and hands back its directory.
    pub fn stop_with(self, signal: &str) -> (std::process::ExitStatus, tempfile::TempDir) {
        self.signal(signal);
        self.wait_exit()
    }

    /// Waits for the gateway to exit by itself and hands back its directory.
    pub fn wait_exit(mut self) -> (std::process::ExitStatus, tempfile::TempDir) {
        let status = self.child.wait().unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status, dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.path().join("snapshots")
    }

    /// `VmHWM` (peak resident set) of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// `listening data=A[,B] admin=C proxy=[D]` → (first data address, admin address).
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let fields = listening_fields(line)?;
    Some((
        fields.get("data")?.split(',').next()?.parse().ok()?,
        fields.get("admin")?.parse().ok()?,
    ))
}

fn listening_fields(line: &str) -> Option<std::collections::HashMap<String, String>> {
    let rest = line.trim().strip_prefix("listening ")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// A client that sends `Host: <host>` and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(16)
        .build()
        .unwrap()
}

/// GETs `url` and reads its JSON body (panics on a transport error or a body that is not
/// JSON: the test needs the document).
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// Sends raw bytes and reads the whole answer (the gateway closes, or 2 s pass).
pub fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of the first response in a raw answer.
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// API `api1` on host `api.test` with `GET` and `POST /orders` forwarded to `b`: the common
/// start of the hardening suites' snapshots.
pub fn orders_api(b: &Backend) -> SnapshotBuilder {
    SnapshotBuilder::new("api1", &["api.test"]).resource(
        "/orders",
        &[("GET", &b.url("/orders")), ("POST", &b.url("/orders"))],
    )
}

/// A free TCP port (bound, then released) for a server the test starts on it. Another
/// test running alongside may be given the same port first; for a port that must stay
/// unanswered, use [`dead_port`].
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A local TCP port that refuses connections for as long as the value lives: a socket is
/// bound to it without listening and without `SO_REUSEADDR`, so the kernel gives the port
/// to no other socket meanwhile. (A port only bound and released, as [`closed_port`] gives,
/// can go to the next listener a test running alongside binds: a gateway told to export to
/// a "dead" collector once reached another test's backend, which then saw a request it did
/// not expect, and the exports that should have failed succeeded.)
pub struct DeadPort {
    _socket: socket2::Socket,
    pub port: u16,
}

pub fn dead_port() -> DeadPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an IPv4 address")
        .port();
    DeadPort {
        _socket: socket,
        port,
    }
}

pub fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`, driven in the background:
/// its sender, for requests with empty bodies.
pub async fn h2c_sender(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// One HTTP/2 prior-knowledge (h2c) request whose `:authority` is the URI's authority,
/// sent over a TCP connection to `addr`.
pub async fn h2c_get(addr: SocketAddr, uri: &str) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let mut send = h2c_sender(addr).await;
    let req = http::Request::builder()
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// A TLS backend with a certificate for `localhost` signed by a test CA.
pub async fn tls_backend() -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        // The version, the URI, and every header as a list of values.
                        let mut headers = serde_json::Map::new();
                        for (name, value) in req.headers() {
                            let values = headers
                                .entry(name.as_str())
                                .or_insert_with(|| serde_json::json!([]));
                            if let Some(list) = values.as_array_mut() {
                                list.push(String::from_utf8_lossy(value.as_bytes()).into());
                            }
                        }
                        let body = serde_json::json!({
                            "version": format!("{:?}", req.version()),
                            "uri": req.uri().to_string(),
                            "headers": headers,
                        })
                        .to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    (addr, ca.pem(), task)
}

/// Polls until `f` holds (every 20 ms) or `limit` passes; returns how long it took.
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
