//! Gateway configuration (TOML), parsed once at start-up.
//!
//! The required keys and their names are fixed by `operations.md`; the rest are ours and
//! documented in `config/gateway.toml`. Unknown keys are errors (a typo must not silently
//! fall back to a default), and every error names the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub tracing: TracingConfig,
}

/// OpenTelemetry traces, exported over OTLP/HTTP (protobuf). Off without an endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP endpoint, e.g. `http://collector:4318` (`/v1/traces` is
    /// appended when the URL has no path).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces that are sampled (0 to 1); a request whose incoming
    /// `traceparent` is sampled is always followed.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// More resource attributes (`deployment.environment = "prod"`, ...).
    #[serde(default)]
    pub resource_attributes: std::collections::BTreeMap<String, String>,
    /// Put the JWT `sub` claim on the server span (`enduser.id`); off by default (it may be
    /// personal data).
    #[serde(default)]
    pub record_jwt_sub: bool,
    /// Finished spans waiting for export; a span that finds the queue full is dropped and
    /// counted (`apigw_trace_spans_dropped_total`), never waited for.
    #[serde(default = "default_trace_queue")]
    pub queue_size: usize,
    /// Bound of one export call.
    #[serde(default = "default_export_timeout", with = "duration")]
    pub export_timeout: Duration,
    /// How the export thread competes with the workers for a core.
    #[serde(default)]
    pub export_priority: ExportPriority,
}

/// The export thread's scheduling class: what gives when a core is saturated, requests or
/// spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPriority {
    /// Linux `SCHED_IDLE`: the thread runs only on CPU time no worker wants, so tracing
    /// never slows requests; on a saturated core most spans are dropped (and counted).
    #[default]
    Idle,
    /// `nice 10`: about a tenth of a contended core, so more spans are exported at
    /// saturation, at the cost of requests per second.
    Background,
}

fn default_sample_ratio() -> f64 {
    0.01
}
fn default_service_name() -> String {
    "scp-gateway".to_owned()
}
fn default_trace_queue() -> usize {
    16384
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: default_sample_ratio(),
            service_name: default_service_name(),
            resource_attributes: Default::default(),
            record_jwt_sub: false,
            queue_size: default_trace_queue(),
            export_timeout: default_export_timeout(),
            export_priority: ExportPriority::default(),
        }
    }
}

/// One JSON line per request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default)]
    pub enabled: bool,
    /// File to append to; empty or absent: stderr.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain HTTP/1.1 + h2c listeners.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Listeners that expect a PROXY protocol v2 header before HTTP (PrivateLink traffic).
    #[serde(default)]
    pub proxy_protocol_listen: Vec<SocketAddr>,
    /// TLS listeners (HTTP/1.1 and HTTP/2 by ALPN), each with its certificates.
    #[serde(default)]
    pub tls: Vec<TlsListenerConfig>,
    /// How long in-flight requests may run after SIGTERM/SIGINT before connections are cut.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
}

/// One TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    pub listen: SocketAddr,
    /// The first certificate also answers clients without (or with an unknown) SNI name.
    pub certificates: Vec<CertificateConfig>,
}

/// A certificate chain and its key (PEM files), for the host names it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// SNI names (`api.example.com`, `*.example.com`).
    #[serde(default)]
    pub server_names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// When non-empty, `/admin/*` and `/v1/*` need `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: String,
    /// Serve the admin API without a token on an address that is not loopback (refused at
    /// start unless this is true, as Redis's protected mode does).
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

impl AdminConfig {
    /// The admin API is reachable from other hosts and asks for no token.
    pub fn is_open(&self) -> bool {
        self.token.is_empty() && !self.listen.ip().is_loopback()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    #[serde(default = "default_snapshot_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_true")]
    pub watch: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Peers whose `X-Forwarded-For`, `x-scp-request-id` and `x-scp-privatelink-endpoint-id`
    /// headers are believed. Plain addresses mean a single host.
    #[serde(default, deserialize_with = "de_nets")]
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaBackend {
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    #[serde(default = "default_backend")]
    pub backend: QuotaBackend,
    /// `redis://` or `rediss://` (TLS), with `user:password@` when the server wants them.
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis servers' certificates (a private CA);
    /// without it, `rediss://` trusts the system's roots.
    #[serde(default)]
    pub redis_ca_file: Option<PathBuf>,
    /// `true`: `redis_url` names one node of a Redis Cluster; a list of `host:port`:
    /// more seed nodes, reached with `redis_url`'s scheme and credentials.
    #[serde(default)]
    pub redis_cluster: RedisCluster,
    #[serde(default = "default_failure_mode")]
    pub failure_mode: FailureMode,
    /// Per-call timeout of the shared quota store.
    #[serde(default = "default_quota_timeout", with = "duration")]
    pub timeout: Duration,
}

/// `quota.redis_cluster`: off, on (seeded by `redis_url`), or on with more seed nodes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "`true`, `false` or a list of \"host:port\" seed nodes"
)]
pub enum RedisCluster {
    Enabled(bool),
    Seeds(Vec<String>),
}

impl Default for RedisCluster {
    fn default() -> Self {
        Self::Enabled(false)
    }
}

impl RedisCluster {
    pub fn is_on(&self) -> bool {
        match self {
            Self::Enabled(on) => *on,
            Self::Seeds(_) => true,
        }
    }

    /// Seed nodes besides `redis_url`'s own.
    pub fn extra_seeds(&self) -> &[String] {
        match self {
            Self::Enabled(_) => &[],
            Self::Seeds(s) => s,
        }
    }
}

/// Request limits of `request-pipeline.md` ("Limits"). All configurable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Request line + headers, in bytes → 431.
    #[serde(default = "default_max_head")]
    pub max_head_bytes: usize,
    /// Request target alone, in bytes → 414.
    #[serde(default = "default_max_uri")]
    pub max_uri_bytes: usize,
    /// Header count → 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Request body, enforced while streaming → 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Time to receive a request head; the connection is closed after it.
    #[serde(default = "default_head_timeout", with = "duration")]
    pub head_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per client connection.
    #[serde(default = "default_h2_streams")]
    pub max_concurrent_streams: u32,
    /// Open client connections, all listeners together; a connection over the cap is
    /// closed as soon as it is accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Extra PEM CA bundle trusted for `https` backends, on top of the webpki roots.
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// How long an idle pooled backend connection is kept.
    #[serde(default = "default_pool_idle", with = "duration")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Data-plane worker threads, each with its own runtime, listeners and backend pools;
    /// default: one per CPU core. `worker_threads` is the former name of this key.
    #[serde(default, alias = "worker_threads")]
    pub workers: Option<usize>,
}

impl RuntimeConfig {
    /// The number of workers to run.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_snapshot_dir() -> PathBuf {
    PathBuf::from("snapshots")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("var")
}
fn default_true() -> bool {
    true
}
fn default_backend() -> QuotaBackend {
    QuotaBackend::Local
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".to_owned()
}
fn default_failure_mode() -> FailureMode {
    FailureMode::Open
}
fn default_quota_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_max_head() -> usize {
    16 * 1024
}
fn default_max_uri() -> usize {
    8 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_max_body() -> u64 {
    10 * 1024 * 1024
}
fn default_head_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_h2_streams() -> u32 {
    100
}
fn default_max_connections() -> usize {
    16_384
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_idle() -> usize {
    256
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            proxy_protocol_listen: Vec::new(),
            tls: Vec::new(),
            drain_timeout: default_drain(),
        }
    }
}
impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: String::new(),
            allow_unauthenticated: false,
        }
    }
}
impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            dir: default_snapshot_dir(),
            watch: true,
        }
    }
}
impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}
impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            redis_url: default_redis_url(),
            redis_ca_file: None,
            redis_cluster: RedisCluster::default(),
            failure_mode: default_failure_mode(),
            timeout: default_quota_timeout(),
        }
    }
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: default_max_head(),
            max_uri_bytes: default_max_uri(),
            max_headers: default_max_headers(),
            max_body_bytes: default_max_body(),
            head_read_timeout: default_head_timeout(),
            idle_timeout: default_idle_timeout(),
            max_concurrent_streams: default_h2_streams(),
            max_connections: default_max_connections(),
        }
    }
}
impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            connect_timeout: default_connect_timeout(),
            pool_idle_timeout: default_pool_idle(),
            pool_max_idle_per_host: default_pool_max_idle(),
        }
    }
}
/// Durations in the configuration: `"10s"`, `"500ms"`, `"2m"`, `"1h 30m"`. A wrong value
/// says which forms are accepted.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write a number and a unit, for example \"10s\", \"500ms\", \"2m\" or \"1h 30m\""
            ))
        })
    }
}

/// One line for a TOML error: where (line and column), which key, and what is wrong.
fn parse_message(text: &str, e: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let inner = e.inner();
    let at = inner.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    let key = e.path().to_string();
    let key = if key == "." || key.is_empty() {
        String::new()
    } else {
        format!("`{key}`: ")
    };
    format!(
        "{}{key}{}",
        at.unwrap_or_default(),
        inner.message().trim_end().replace('\n', "; ")
    )
}

/// Parses an address or a CIDR; a plain address is a single-host network.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR block"))
}

fn de_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| parse_net(s).map_err(serde::de::Error::custom))
        .collect()
}

/// Command-line overrides of `run` (they win over the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub snapshot_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

impl Config {
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                ConfigError::Parse {
                    path: path.to_owned(),
                    message: parse_message(text, &e),
                }
            })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads a configuration file. Relative paths in it (snapshot and state directories,
    /// access-log file, CA and certificate files) are relative to the file's directory, not
    /// to the working directory: the same file works wherever the gateway is started from.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::from_toml(path, &text)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Makes every relative path of the file relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.snapshots.dir);
        fix(&mut self.state.dir);
        if let Some(p) = &mut self.access_log.path {
            fix(p);
        }
        if let Some(p) = &mut self.upstream.extra_ca_file {
            fix(p);
        }
        if let Some(p) = &mut self.quota.redis_ca_file {
            fix(p);
        }
        for t in &mut self.server.tls {
            for c in &mut t.certificates {
                fix(&mut c.cert);
                fix(&mut c.key);
            }
        }
    }

    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if !o.listen.is_empty() {
            self.server.listen = o.listen;
        }
        if let Some(a) = o.admin_listen {
            self.admin.listen = a;
        }
        if let Some(d) = o.snapshot_dir {
            self.snapshots.dir = d;
        }
        if let Some(d) = o.state_dir {
            self.state.dir = d;
        }
        self.check()
    }

    /// Rules serde cannot express. Each error names its key.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_owned(),
        };
        if self.server.listen.is_empty() {
            return Err(invalid(
                "server.listen",
                "at least one listen address is needed",
            ));
        }
        if self.limits.max_head_bytes < 1024 {
            return Err(invalid("limits.max_head_bytes", "must be at least 1024"));
        }
        if self.limits.max_uri_bytes == 0 || self.limits.max_uri_bytes > self.limits.max_head_bytes
        {
            return Err(invalid(
                "limits.max_uri_bytes",
                "must be between 1 and limits.max_head_bytes",
            ));
        }
        if self.limits.max_headers == 0 {
            return Err(invalid("limits.max_headers", "must be at least 1"));
        }
        if self.limits.head_read_timeout.is_zero() {
            return Err(invalid("limits.head_read_timeout", "must be positive"));
        }
        if self.limits.idle_timeout.is_zero() {
            return Err(invalid("limits.idle_timeout", "must be positive"));
        }
        if self.limits.max_concurrent_streams == 0 {
            return Err(invalid(
                "limits.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if let Some(n) = self.runtime.workers {
            if n == 0 || n > crate::worker::MAX_WORKERS {
                return Err(invalid(
                    "runtime.workers",
                    &format!("must be between 1 and {}", crate::worker::MAX_WORKERS),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(invalid("tracing.sample_ratio", "must be between 0 and 1"));
        }
        if self.tracing.queue_size == 0 {
            return Err(invalid("tracing.queue_size", "must be at least 1"));
        }
        if let Some(e) = &self.tracing.otlp_endpoint {
            // Plain HTTP only: the collector is expected beside the gateway (an agent or a
            // sidecar); TLS to a remote collector is the agent's job.
            if !e.starts_with("http://") || e.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "tracing.otlp_endpoint",
                    "must be an http:// URL, e.g. \"http://127.0.0.1:4318\" (a collector or agent beside the gateway)",
                ));
            }
        }
        if self.admin.is_open() && !self.admin.allow_unauthenticated {
            return Err(ConfigError::Invalid {
                key: "admin.token",
                message: format!(
                    "admin.listen {} is reachable from other hosts and admin.token is empty: \
                     anyone reaching it could replace every route; set admin.token, listen on \
                     loopback, or set admin.allow_unauthenticated = true",
                    self.admin.listen
                ),
            });
        }
        if self.quota.timeout.is_zero() {
            return Err(invalid("quota.timeout", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml(Path::new("x.toml"), "").unwrap();
        assert_eq!(c.server.listen, default_listen());
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.quota.backend, QuotaBackend::Local);
    }

    #[test]
    fn export_priority_is_idle_unless_asked() {
        let load = |t: &str| Config::from_toml(Path::new("x.toml"), t);
        let c = load("[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n").unwrap();
        assert_eq!(c.tracing.export_priority, ExportPriority::Idle);
        let c = load("[tracing]\nexport_priority = \"background\"\n").unwrap();
        assert_eq!(c.tracing.export_priority, ExportPriority::Background);
        let e = load("[tracing]\nexport_priority = \"high\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tracing.export_priority") && e.contains("high"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml(Path::new("x.toml"), "[server]\nlisen = []\n").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = Config::from_toml(Path::new("x.toml"), "[quota]\nbackend = \"memcache\"\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("backend") && s.contains("memcache"), "{s}");
        let e = Config::from_toml(
            Path::new("x.toml"),
            "[network]\ntrusted_proxies = [\"10.0.0.0/8\", \"nope\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("trusted_proxies"), "{e}");
        let e = Config::from_toml(Path::new("x.toml"), "[limits]\nmax_headers = 0\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_headers"), "{e}");
    }

    #[test]
    fn open_admin_api_is_refused_unless_allowed() {
        let load = |t: &str| Config::from_toml(Path::new("x.toml"), t);
        let e = load("[admin]\nlisten = \"0.0.0.0:9901\"\n").unwrap_err();
        assert!(e.to_string().contains("config key `admin.token`"), "{e}");
        let e = load("[admin]\nlisten = \"[::]:9901\"\n").unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
        assert!(load("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"t0k\"\n").is_ok());
        assert!(load("[admin]\nlisten = \"[::1]:9901\"\n").is_ok());
        let c = load("[admin]\nlisten = \"0.0.0.0:9901\"\nallow_unauthenticated = true\n").unwrap();
        assert!(c.admin.is_open());
        // The command-line override is checked too.
        let mut c = load("").unwrap();
        let e = c
            .apply(Overrides {
                admin_listen: Some("10.1.2.3:9901".parse().unwrap()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
    }

    #[test]
    fn a_bad_duration_says_what_is_accepted() {
        let e = Config::from_toml(Path::new("x.toml"), "[limits]\nidle_timeout = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_timeout") && e.contains("\"500ms\""), "{e}");
        // One line: where, which key, what.
        assert!(
            e.contains("line 2, column 16: `limits.idle_timeout`: ") && !e.contains('\n'),
            "{e}"
        );
    }

    /// Every TOML block of the README and of docs/operations.md is a configuration the
    /// gateway accepts (the fleet examples included), so the docs cannot drift from the keys.
    #[test]
    fn the_documented_toml_examples_parse() {
        for (name, text) in [
            ("README.md", include_str!("../README.md")),
            ("docs/operations.md", include_str!("../docs/operations.md")),
        ] {
            let blocks: Vec<&str> = text
                .split("```toml\n")
                .skip(1)
                .map(|b| b.split("```").next().unwrap())
                .collect();
            for b in &blocks {
                let cfg = Config::from_toml(Path::new(name), b)
                    .unwrap_or_else(|e| panic!("{name}: {e}\n{b}"));
                if b.contains("redis_cluster = true") {
                    assert!(cfg.quota.redis_cluster.is_on());
                    assert!(cfg.quota.redis_ca_file.is_some());
                }
            }
            if name == "README.md" {
                assert!(!blocks.is_empty(), "README has a TOML example");
            }
        }
    }

    #[test]
    fn cluster_seeds_are_a_list_or_a_flag() {
        let cfg = Config::from_toml(
            Path::new("t.toml"),
            "[quota]\nbackend = \"redis\"\nredis_cluster = [\"10.0.0.6:6379\"]\n",
        )
        .unwrap();
        assert!(cfg.quota.redis_cluster.is_on());
        assert_eq!(cfg.quota.redis_cluster.extra_seeds(), ["10.0.0.6:6379"]);
        let cfg =
            Config::from_toml(Path::new("t.toml"), "[quota]\nredis_cluster = false\n").unwrap();
        assert!(!cfg.quota.redis_cluster.is_on());
        let err = Config::from_toml(Path::new("t.toml"), "[quota]\nredis_cluster = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("quota.redis_cluster"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "[snapshots]\ndir = \"snaps\"\n[state]\ndir = \"/abs/state\"\n[access_log]\npath = \"logs/a.log\"\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.snapshots.dir, dir.path().join("snaps"));
        assert_eq!(c.state.dir, PathBuf::from("/abs/state"));
        assert_eq!(c.access_log.path, Some(dir.path().join("logs/a.log")));
    }

    #[test]
    fn durations_and_nets() {
        let c = Config::from_toml(
            Path::new("x.toml"),
            "[limits]\nidle_timeout = \"5s\"\n[network]\ntrusted_proxies = [\"10.1.2.3/8\", \"::1\"]\n",
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.network.trusted_proxies[0].to_string(), "10.0.0.0/8");
        assert_eq!(c.network.trusted_proxies[1].to_string(), "::1/128");
    }
}
