//! Fleet mode's shared store (`operations.md`, "State and fleet mode"): one Redis — a
//! standalone server or a Redis Cluster, plain or TLS, with or without an ACL user — that
//! every gateway instance of a fleet points at, for quota counters, usage counts and report
//! aggregates.
//!
//! Connections are made in the background: a gateway starts whether Redis is up or not
//! (requests meet the configured failure mode meanwhile), retries with exponential backoff,
//! and once connected, makes a connection again when it is lost, goes silent or reaches a
//! replica ([`Fleet`]); a cluster connection follows its cluster's new topology by itself
//! (`ClusterConnection`). Each worker drives a connection of its own. Every call is bounded
//! by `quota.timeout`. The URL is never logged: it may carry a password.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

use crate::config::QuotaConfig;
use crate::timer::Deadline;

/// Key prefix of everything the gateway keeps in Redis.
pub const PREFIX: &str = "scpgw";

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("not connected to Redis (yet)")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One connection to the fleet's store, whichever its kind. Both kinds multiplex: a clone
/// shares the connection, and calls from every worker go out on it concurrently.
// Not boxed: a call clones the connection out of its `Arc` (the crate's calls need `&mut`);
// a box would add an allocation to every admission.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum FleetConn {
    /// A standalone Redis (or a proxy in front of one). Not the crate's
    /// `ConnectionManager`: [`Fleet`] makes a lost connection again itself (as it does a
    /// silent one), and the manager's layer cost ~750 instructions per call (its lock-free
    /// swap, and a clone of the client's connection info on every call).
    Single(MultiplexedConnection),
    /// A Redis Cluster: routes each call to the master of its key's slot, follows
    /// `MOVED`/`ASK` and refreshes the slot map after a failover by itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for FleetConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// What the background task connects with.
enum Connector {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Connector {
    /// Reads `quota.redis_url`, `quota.redis_ca_file` and `quota.redis_cluster`. Errors name
    /// the key and never echo the URL (it may hold a password).
    fn new(cfg: &QuotaConfig) -> Result<Self, String> {
        let bad_url = |e: redis::RedisError| {
            format!("config key `quota.redis_url`: not a usable Redis URL: {e}")
        };
        let info = cfg
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(bad_url)?;
        let certs = match &cfg.redis_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("config key `quota.redis_ca_file`: {}: {e}", path.display())
                })?;
                let mut rd = pem.as_slice();
                let n = rustls_pemfile::certs(&mut rd).filter(Result::is_ok).count();
                if n == 0 {
                    return Err(format!(
                        "config key `quota.redis_ca_file`: {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                if !matches!(info.addr, ConnectionAddr::TcpTls { .. }) {
                    return Err("config key `quota.redis_ca_file`: set, but `quota.redis_url` is not a `rediss://` (TLS) URL".to_owned());
                }
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
        };
        if !cfg.redis_cluster.is_on() {
            let client = match certs {
                Some(c) => redis::Client::build_with_tls(info, c),
                None => redis::Client::open(info),
            }
            .map_err(bad_url)?;
            return Ok(Self::Single(client));
        }
        if info.redis.db != 0 {
            return Err("config key `quota.redis_url`: a Redis Cluster has only database 0; drop the `/N` from the URL".to_owned());
        }
        let mut seeds = vec![info.clone()];
        for (i, s) in cfg.redis_cluster.extra_seeds().iter().enumerate() {
            seeds.push(seed(&info, s).ok_or_else(|| {
                format!(
                    "config key `quota.redis_cluster[{i}]`: {s:?} is not a \"host:port\" address"
                )
            })?);
        }
        let mut b = ClusterClientBuilder::new(seeds)
            .connection_timeout(cfg.timeout.max(Duration::from_millis(250)))
            .response_timeout(cfg.timeout.max(Duration::from_millis(250)));
        if let Some(c) = certs {
            b = b.certs(c);
        }
        let client = b
            .build()
            .map_err(|e| format!("config key `quota.redis_cluster`: {e}"))?;
        Ok(Self::Cluster(client))
    }

    async fn connect(&self, timeout: Duration) -> redis::RedisResult<FleetConn> {
        match self {
            Self::Single(client) => {
                // No response timeout of the crate's: [`Fleet::call`] bounds every call
                // (a second timer per call would cost ~1,000 instructions on the worker).
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(timeout.max(Duration::from_millis(250)));
                Ok(FleetConn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Self::Cluster(client) => Ok(FleetConn::Cluster(client.get_async_connection().await?)),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Single(_) => "Redis",
            Self::Cluster(_) => "Redis Cluster",
        }
    }
}

/// A seed node `host:port` reached like `base` (same scheme, TLS settings and credentials).
fn seed(base: &ConnectionInfo, hostport: &str) -> Option<ConnectionInfo> {
    let (host, port) = hostport.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    let mut info = base.clone();
    info.addr = match &base.addr {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_) => {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    };
    Some(info)
}

/// The fleet's connections. Shared: one connection made at start by the control thread
/// (it warns while Redis is unreachable and serves the admin API and report pushes).
/// Per worker: each data-plane worker makes its own on its first call, on its own runtime,
/// so that an admission's round trip wakes no other thread (a call on a connection driven
/// by another thread costs two cross-thread wake-ups, measured as a third of a worker's
/// throughput in fleet mode). Until a worker's own connection is up, the worker uses the
/// shared one.
///
/// A connection on which nothing has answered for [`SILENT_FOR`] (and at least
/// [`SILENT_CALLS`] calls in a row timed out) is given up and made again: a Redis host that
/// vanished, or a route that was dropped, sends no reset, and the kernel would retransmit
/// into the void for about 15 minutes before the crate saw an error. A connection the
/// crate reports lost (Redis closed or reset it: a restart) is made again at once, the
/// same way.
pub struct Fleet {
    connector: Arc<Connector>,
    shared: Arc<Slot>,
    workers: Box<[Arc<Slot>]>,
    timeout: Duration,
    started: std::time::Instant,
    /// The runtime the fleet was started on (the control thread's): the shared connection
    /// is made there, and driven from there, also when a worker's call gives it up.
    control: tokio::runtime::Handle,
}

/// One connection (the shared one, or a worker's own), whether it is being made, and how
/// long it has not answered.
#[derive(Default)]
struct Slot {
    conn: ArcSwapOption<FleetConn>,
    connecting: AtomicBool,
    /// Milliseconds since the fleet started before which no new attempt is made (after a
    /// failed one).
    retry_after_ms: AtomicU64,
    /// Calls in a row that timed out on the current connection, and when (milliseconds
    /// since the fleet started) the first of them did.
    timeouts: AtomicU64,
    first_timeout_ms: AtomicU64,
}

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connection is given up when nothing answered on it for this long...
const SILENT_FOR: Duration = Duration::from_secs(1);
/// ...and at least this many calls in a row timed out on it.
const SILENT_CALLS: u64 = 3;

impl Slot {
    /// A call on `conn` was answered (a reply or an error from the crate).
    fn answered(&self) {
        if self.timeouts.load(Ordering::Relaxed) != 0 {
            self.timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// A call on `conn` timed out at `now_ms`; true when `conn` is to be given up.
    fn timed_out(&self, conn: &Arc<FleetConn>, now_ms: u64) -> bool {
        let current = self.conn.load();
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            return false; // a call on a connection already replaced
        }
        let n = self.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            self.first_timeout_ms.store(now_ms, Ordering::Relaxed);
        }
        let silent_ms = now_ms.saturating_sub(self.first_timeout_ms.load(Ordering::Relaxed));
        n >= SILENT_CALLS && silent_ms >= SILENT_FOR.as_millis() as u64
    }

    /// Drops `conn` if it is still this slot's; true if it was.
    fn give_up(&self, conn: &Arc<FleetConn>) -> bool {
        let prev = self.conn.compare_and_swap(&Some(conn.clone()), None);
        let dropped = prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, conn));
        if dropped {
            self.timeouts.store(0, Ordering::Relaxed);
            self.retry_after_ms.store(0, Ordering::Relaxed);
        }
        dropped
    }
}

impl Fleet {
    /// Checks the URL and its companions (errors name the key without echoing the URL) and
    /// starts connecting in the background. Needs a tokio runtime; call it after the worker
    /// count is set.
    pub fn start(cfg: &QuotaConfig) -> Result<Arc<Self>, String> {
        let connector = Arc::new(Connector::new(cfg)?);
        let fleet = Arc::new(Self {
            connector,
            shared: Arc::default(),
            workers: (0..crate::worker::count())
                .map(|_| Arc::default())
                .collect(),
            timeout: cfg.timeout,
            started: std::time::Instant::now(),
            control: tokio::runtime::Handle::current(),
        });
        fleet.connect_shared();
        Ok(fleet)
    }

    /// Makes the shared connection in the background, retrying with exponential backoff
    /// and warning while Redis is unreachable (until the fleet is dropped).
    fn connect_shared(&self) {
        if self.shared.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = Arc::downgrade(&self.shared);
        let (connector, timeout) = (self.connector.clone(), self.timeout);
        self.control.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let kind = connector.kind();
            loop {
                match connector.connect(timeout).await {
                    Ok(conn) => {
                        let Some(slot) = slot.upgrade() else { return };
                        slot.conn.store(Some(Arc::new(conn)));
                        slot.connecting.store(false, Ordering::Release);
                        tracing::info!(store = kind, "connected to the fleet's Redis");
                        return;
                    }
                    Err(e) => {
                        if slot.strong_count() == 0 {
                            return;
                        }
                        tracing::warn!(store = kind, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the fleet's Redis; quota failure mode applies");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    /// The longest a call waits for Redis (`quota.timeout`).
    /// A standalone Redis (not a Redis Cluster): one call may carry keys of any slot.
    pub fn is_standalone(&self) -> bool {
        matches!(*self.connector, Connector::Single(_))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The connection for a call on this thread, and its slot: the worker's own when it is
    /// up (starting to make it if not), else the shared one; `None` before the first
    /// connection is up.
    fn conn(&self) -> Option<(Arc<FleetConn>, &Arc<Slot>)> {
        if let Some(w) = self.workers.get(crate::worker::index()) {
            if let Some(own) = w.conn.load_full() {
                return Some((own, w));
            }
            self.connect_worker(w);
        }
        Some((self.shared.conn.load_full()?, &self.shared))
    }

    /// Starts making a worker's own connection on the worker's runtime, unless one is being
    /// made or the last attempt failed less than [`MAX_BACKOFF`] ago.
    fn connect_worker(&self, w: &Arc<Slot>) {
        if self.now_ms() < w.retry_after_ms.load(Ordering::Relaxed)
            || w.connecting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (w, connector, timeout) = (w.clone(), self.connector.clone(), self.timeout);
        let started = self.started;
        tokio::spawn(async move {
            match connector.connect(timeout).await {
                Ok(conn) => w.conn.store(Some(Arc::new(conn))),
                Err(e) => {
                    tracing::debug!(error = %e, "a worker's own Redis connection failed; it uses the shared one meanwhile");
                    let retry = started.elapsed() + MAX_BACKOFF;
                    w.retry_after_ms
                        .store(retry.as_millis() as u64, Ordering::Relaxed);
                }
            }
            w.connecting.store(false, Ordering::Release);
        });
    }

    /// Runs one call, bounded by the timeout. In a cluster, every key of one call must hash
    /// to one slot (the key layout sees to it).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(FleetConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_until(tokio::time::Instant::now() + self.timeout, f)
            .await
    }

    /// Runs one call, given up at `at` (a call made for requests that have been waiting
    /// since before it: the timeout counted from the first one's arrival).
    pub async fn call_until<T, F, Fut>(
        &self,
        at: tokio::time::Instant,
        f: F,
    ) -> Result<T, FleetError>
    where
        F: FnOnce(FleetConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (conn, slot) = self.conn().ok_or(FleetError::NotConnected)?;
        let mut deadline = Deadline::new(at);
        match deadline.wait(f((*conn).clone())).await {
            Ok(Err(e)) if e.kind() == redis::ErrorKind::ReadOnly => {
                // A replica answered: the address now names another server (a failover
                // that moved a DNS name or a virtual IP), and this connection still goes
                // to the old master. The crate does not reconnect for this; a new
                // connection reaches whatever the address names now.
                slot.answered();
                self.replace(slot, &conn, "the fleet's Redis answered READONLY (a replica: after a failover?); reconnecting");
                Err(e.into())
            }
            Ok(Err(e)) if e.is_unrecoverable_error() && matches!(*conn, FleetConn::Single(_)) => {
                // The connection is gone (closed or reset by Redis: a restart, a
                // failover); a cluster connection makes its nodes' connections again itself.
                slot.answered();
                self.replace(
                    slot,
                    &conn,
                    "the connection to the fleet's Redis was lost; reconnecting",
                );
                Err(e.into())
            }
            Ok(r) => {
                slot.answered();
                Ok(r?)
            }
            Err(_) => {
                if slot.timed_out(&conn, self.now_ms()) {
                    self.replace(
                        slot,
                        &conn,
                        "nothing answered on a connection to the fleet's Redis; reconnecting",
                    );
                }
                Err(FleetError::Timeout(self.timeout))
            }
        }
    }

    /// Gives `conn` up, if it is still `slot`'s, and has it made again (a worker's on its
    /// next call, the shared one at once on the control runtime).
    fn replace(&self, slot: &Arc<Slot>, conn: &Arc<FleetConn>, why: &'static str) {
        if !slot.give_up(conn) {
            return;
        }
        let shared = Arc::ptr_eq(slot, &self.shared);
        tracing::warn!(store = self.connector.kind(), shared, "{why}");
        if shared {
            self.connect_shared();
        }
    }
}

/// A Redis key part from an id: `%` and `:` percent-encoded, so that ids containing the
/// separator cannot make two different (plan, key) pairs share a key, and `{` `}` too, so
/// that an id cannot move a key's hash tag (the part of the name that picks its cluster
/// slot).
pub fn key_part(id: &str) -> std::borrow::Cow<'_, str> {
    if id.contains([':', '%', '{', '}']) {
        id.replace('%', "%25")
            .replace(':', "%3A")
            .replace('{', "%7B")
            .replace('}', "%7D")
            .into()
    } else {
        id.into()
    }
}

#[cfg(test)]
mod tests {
    use redis::{ConnectionAddr, IntoConnectionInfo};

    #[test]
    fn seeds_take_the_scheme_and_credentials_of_the_url() {
        let base = "rediss://gw:pw@10.0.0.5:6380"
            .into_connection_info()
            .unwrap();
        let s = super::seed(&base, "10.0.0.6:6381").unwrap();
        assert!(
            matches!(&s.addr, ConnectionAddr::TcpTls { host, port: 6381, .. } if host == "10.0.0.6")
        );
        assert_eq!(s.redis.username.as_deref(), Some("gw"));
        assert_eq!(s.redis.password.as_deref(), Some("pw"));
        let plain = "redis://10.0.0.5:6379".into_connection_info().unwrap();
        let s = super::seed(&plain, "[::1]:7000").unwrap();
        assert!(matches!(&s.addr, ConnectionAddr::Tcp(host, 7000) if host == "::1"));
        for bad in [
            "nowhere",
            "host:",
            ":7000",
            "host:99999",
            "u@host:1",
            "redis://h:1",
        ] {
            assert!(super::seed(&plain, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn key_parts_are_unambiguous() {
        assert_eq!(super::key_part("up-1"), "up-1");
        assert_eq!(super::key_part("a:b"), "a%3Ab");
        assert_eq!(super::key_part("a%3Ab"), "a%253Ab");
        assert_ne!(super::key_part("a:b"), super::key_part("a%3Ab"));
        assert_eq!(super::key_part("{a}"), "%7Ba%7D");
    }
}
