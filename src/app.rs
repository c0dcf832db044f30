//! The process-wide context shared by listeners, the pipeline and the admin API.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{Config, QuotaBackend};
use crate::fleet::Fleet;
use crate::integration::http::tls_config;
use crate::observe::access_log::{AccessLog, Target};
use crate::observe::metrics::Metrics;
use crate::observe::report::Reports;
use crate::policy::quota::{LocalQuotaStore, QuotaStore, RedisQuotaStore};
use crate::policy::throttle::Throttles;
use crate::reload::{Control, SnapshotDir};
use crate::snapshot;
use crate::state::{LoadError, StateHandle};

/// How long report aggregates and hourly key usage are kept: a 31-day query plus the month
/// start a month plan's remaining quota needs.
pub const RETENTION_DAYS: i64 = 62;

pub struct App {
    pub config: Config,
    pub state: StateHandle,
    /// The snapshot directory and the files the loaded APIs came from.
    pub snapshots: SnapshotDir,
    /// The thread that runs every control-plane operation.
    pub control: Control,
    pub metrics: Metrics,
    /// Backend connection settings (the pools themselves are per worker: `upstream::pool`).
    pub upstream: crate::upstream::Settings,
    /// Quota counters, keyed by stable ids so that they survive reloads.
    pub quota: Arc<dyn QuotaStore>,
    /// Fleet mode's shared Redis (`quota.backend = "redis"`).
    pub fleet: Option<Arc<Fleet>>,
    /// Report aggregates (flushed with the quota counters).
    pub reports: Arc<Reports>,
    /// The access log, when enabled.
    pub access_log: Option<AccessLog>,
    /// OpenTelemetry traces (`[tracing] otlp_endpoint`); `None`: off, nothing per request.
    pub tracing: Option<crate::observe::trace::Tracing>,
    /// Throttle buckets, keyed by stable ids.
    pub throttles: Throttles,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Open client connections on the data-plane listeners (drained on shutdown).
    pub active_connections: AtomicUsize,
    /// One permit per open client connection (`limits.max_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    last_prune_hour: std::sync::atomic::AtomicI64,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let upstream = crate::upstream::Settings {
            tls: tls_config(&config.upstream)?,
            connect_timeout: config.upstream.connect_timeout,
            idle_timeout: config.upstream.pool_idle_timeout,
            max_idle: config.upstream.pool_max_idle_per_host,
        };
        let dir = &config.state.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("config key `state.dir`: {}: {e}", dir.display()))?;
        let db_path = dir.join("state.redb");
        let db = Arc::new(
            crate::state_db::StateDb::open(&db_path)
                .map_err(|e| format!("config key `state.dir`: {e}"))?,
        );
        let metrics = Metrics::new();
        let (quota, fleet): (Arc<dyn QuotaStore>, _) = match config.quota.backend {
            QuotaBackend::Local => (LocalQuotaStore::open(db.clone())?, None),
            QuotaBackend::Redis => {
                let fleet = Fleet::start(&config.quota)?;
                (
                    RedisQuotaStore::new(fleet.clone(), RETENTION_DAYS * 86_400),
                    Some(fleet),
                )
            }
        };
        // The error counter of the store in use exists from the start (at 0), so that a
        // dashboard or an alert sees a series before the first failure.
        metrics
            .quota_store_errors
            .with_label_values(&[quota.backend()]);
        let reports = Reports::open(db)?;
        let access_log = if config.access_log.enabled {
            let target = match &config.access_log.path {
                Some(p) if !p.as_os_str().is_empty() => Target::File(p.clone()),
                _ => Target::Stderr,
            };
            Some(
                AccessLog::start(target, metrics.access_log_dropped.clone())
                    .map_err(|e| format!("config key `access_log.path`: {e}"))?,
            )
        } else {
            None
        };
        let tracing = crate::observe::trace::Tracing::start(
            &config.tracing,
            metrics.trace_spans_dropped.clone(),
        );
        let config_max_connections = config.limits.max_connections;
        let control =
            Control::spawn().map_err(|e| format!("cannot start the control thread: {e}"))?;
        Ok(Arc::new(Self {
            snapshots: SnapshotDir::new(config.snapshots.dir.clone()),
            control,
            config,
            state: StateHandle::default(),
            metrics,
            upstream,
            quota,
            fleet,
            reports,
            access_log,
            tracing,
            throttles: Throttles::default(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            active_connections: AtomicUsize::new(0),
            connection_slots: Arc::new(tokio::sync::Semaphore::new(
                config_max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            last_prune_hour: std::sync::atomic::AtomicI64::new(-1),
        }))
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.config
            .network
            .trusted_proxies
            .iter()
            .any(|n: &IpNet| n.contains(&ip))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Persists quota counters, usage and report aggregates; once an hour, forgets what is
    /// older than [`RETENTION_DAYS`].
    pub fn flush_state(&self) {
        let now = time::OffsetDateTime::now_utc();
        let hour = now.unix_timestamp() / 3600;
        if self.last_prune_hour.swap(hour, Ordering::AcqRel) != hour {
            let before = now - time::Duration::days(RETENTION_DAYS);
            if let Err(e) = self.quota.prune(before.unix_timestamp()) {
                tracing::error!(error = %e, "old quota state could not be pruned");
            }
            if let Err(e) = self
                .reports
                .prune(crate::observe::report::day_number(before.date()))
            {
                tracing::error!(error = %e, "old report aggregates could not be pruned");
            }
        }
        // A failing state database says so itself, once and then every half minute
        // (`state_db`); these lines repeat every second while it fails.
        if let Err(e) = self.quota.flush() {
            tracing::debug!(error = %e, "quota counters could not be persisted");
        }
        if let Err(e) = self.reports.flush() {
            tracing::debug!(error = %e, "report aggregates could not be persisted");
        }
    }

    /// Flushes state every second, on the control thread.
    pub fn spawn_state_flusher(self: &Arc<Self>) {
        let app = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let a = app.clone();
                app.control.run(move || a.flush_state()).await;
                if let Some(fleet) = &app.fleet {
                    if let Err(e) = app.reports.push(fleet).await {
                        tracing::warn!(error = %e, "report aggregates could not be shared with the fleet; retrying");
                    }
                    if let Err(e) = app.quota.push().await {
                        tracing::warn!(error = %e, "usage counts could not be added to the fleet's usage hours; retrying");
                    }
                }
            }
        });
    }

    /// Unloads an API, counting it; false when it was not loaded.
    pub fn unload(&self, id: &str) -> bool {
        if !self.state.remove(id) {
            return false;
        }
        self.metrics
            .snapshot_reloads
            .with_label_values(&["unloaded"])
            .inc();
        let _ = self.metrics.snapshot_revision.remove_label_values(&[id]);
        true
    }

    /// Publishes a compiled API, counting the outcome.
    pub fn install(&self, api: Arc<snapshot::CompiledApi>) -> Result<(), LoadError> {
        let (id, revision) = (api.id.clone(), api.revision);
        match self.state.install(api) {
            Ok(()) => {
                self.metrics
                    .snapshot_reloads
                    .with_label_values(&["loaded"])
                    .inc();
                self.metrics
                    .snapshot_revision
                    .with_label_values(&[&id])
                    .set(revision as i64);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .snapshot_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                Err(e)
            }
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        IpAddr::V4(_) => ip,
    }
}
