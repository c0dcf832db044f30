//! The process-wide context shared by listeners, the pipeline and the admin API.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{Config, QuotaBackend};
use crate::integration::http::{build_client, HttpClient};
use crate::metrics::Metrics;
use crate::policy::quota::{LocalQuotaStore, QuotaStore};
use crate::policy::throttle::Throttles;
use crate::reload::{Control, SnapshotDir};
use crate::snapshot;
use crate::state::{LoadError, StateHandle};

pub struct App {
    pub config: Config,
    pub state: StateHandle,
    /// The snapshot directory and the files the loaded APIs came from.
    pub snapshots: SnapshotDir,
    /// The thread that runs every control-plane operation.
    pub control: Control,
    pub metrics: Metrics,
    pub client: HttpClient,
    /// Quota counters, keyed by stable ids so that they survive reloads.
    pub quota: Arc<dyn QuotaStore>,
    /// The local store, when that is the backend (flushed every second and on shutdown).
    pub local_quota: Option<Arc<LocalQuotaStore>>,
    /// Throttle buckets, keyed by stable ids.
    pub throttles: Throttles,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Open client connections on the data-plane listeners (drained on shutdown).
    pub active_connections: AtomicUsize,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let client = build_client(&config.upstream)?;
        let local = match config.quota.backend {
            QuotaBackend::Local => LocalQuotaStore::open(&config.state.dir)?,
            QuotaBackend::Redis => {
                return Err("config key `quota.backend`: \"redis\" (fleet mode) is not available in this build yet; use \"local\"".into())
            }
        };
        let control =
            Control::spawn().map_err(|e| format!("cannot start the control thread: {e}"))?;
        Ok(Arc::new(Self {
            snapshots: SnapshotDir::new(config.snapshots.dir.clone()),
            control,
            config,
            state: StateHandle::default(),
            metrics: Metrics::new(),
            client,
            quota: local.clone(),
            local_quota: Some(local),
            throttles: Throttles::default(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            active_connections: AtomicUsize::new(0),
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
