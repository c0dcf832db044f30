//! The one snapshot swap. Everything a request needs (host → API → stage → route trie →
//! policies) hangs off one immutable [`GatewayState`] behind one `ArcSwap`. Writers (start-up,
//! admin API, directory watch) build the next state off the request path under a writer lock
//! and publish it with one pointer store; readers never block.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::snapshot::CompiledApi;

/// Maps built here are read by every request and written only by the control plane from
/// trusted snapshots, so a fast hash without flooding resistance is safe: a client can look
/// keys up but never insert one.
type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

#[derive(Default)]
pub struct GatewayState {
    apis: FastMap<Arc<str>, Arc<CompiledApi>>,
    hosts: FastMap<Box<str>, Arc<CompiledApi>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("host `{host}` is already served by API `{other}`")]
    HostConflict { host: String, other: String },
    #[error("revision {offered} is not newer than the loaded revision {loaded}")]
    NotNewer { loaded: u64, offered: u64 },
}

/// The lookup key of a `Host` / `:authority` value: lowercase, without port or trailing
/// dot. Borrows when the value is already in that form (the common case).
pub fn host_key(raw: &str) -> Cow<'_, str> {
    // One pass over the bytes: the last colon, whether there are several (a bare IPv6
    // address has no port to cut), and whether anything needs lowering.
    let (mut last_colon, mut colons, mut upper) = (0, 0, false);
    for (i, b) in raw.bytes().enumerate() {
        if b == b':' {
            last_colon = i;
            colons += 1;
        }
        upper |= b.is_ascii_uppercase();
    }
    let h = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if colons == 1 {
        &raw[..last_colon]
    } else {
        raw
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if upper && h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

impl GatewayState {
    /// The API serving `host` (a `Host` or `:authority` value).
    ///
    /// Most requests name their host as it is stored (lowercase, without port): it is looked
    /// up as it is first, without the pass that normalises it. A stored host is its own key
    /// (a valid name or address, which [`host_key`] leaves as it is), so a hit is what the
    /// normalised lookup would have found; a miss normalises and looks again, unless that
    /// changed nothing.
    pub fn api_for_host(&self, host: &str) -> Option<&Arc<CompiledApi>> {
        if let Some(api) = self.hosts.get(host) {
            return Some(api);
        }
        match host_key(host) {
            Cow::Borrowed(key) if key.len() == host.len() => None,
            key => self.hosts.get(key.as_ref()),
        }
    }

    pub fn api(&self, id: &str) -> Option<&Arc<CompiledApi>> {
        self.apis.get(id)
    }

    pub fn apis(&self) -> impl Iterator<Item = &Arc<CompiledApi>> {
        self.apis.values()
    }

    /// The state with `api` added or replaced; the revision must be newer and the hosts free.
    pub fn with_api(&self, api: Arc<CompiledApi>) -> Result<GatewayState, LoadError> {
        if let Some(old) = self.apis.get(&api.id) {
            if api.revision <= old.revision {
                return Err(LoadError::NotNewer {
                    loaded: old.revision,
                    offered: api.revision,
                });
            }
        }
        for h in &api.hosts {
            if let Some(other) = self.hosts.get(h.as_str()) {
                if other.id != api.id {
                    return Err(LoadError::HostConflict {
                        host: h.clone(),
                        other: other.id.to_string(),
                    });
                }
            }
        }
        let mut next = self.without(&api.id);
        for h in &api.hosts {
            next.hosts.insert(h.as_str().into(), api.clone());
        }
        next.apis.insert(api.id.clone(), api);
        Ok(next)
    }

    /// The state without the API `id` (a copy of the maps; the compiled APIs are shared).
    pub fn without(&self, id: &str) -> GatewayState {
        GatewayState {
            apis: self
                .apis
                .iter()
                .filter(|(k, _)| &***k != id)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            hosts: self
                .hosts
                .iter()
                .filter(|(_, v)| &*v.id != id)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

pub struct StateHandle {
    current: ArcSwap<GatewayState>,
    /// Bumped after every swap: lets each worker keep its own handle on the current state
    /// and notice a swap with one read of a line that is only written by reloads.
    generation: AtomicU64,
    writer: Mutex<()>,
}

impl Default for StateHandle {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(GatewayState::default()),
            generation: AtomicU64::new(1),
            writer: Mutex::new(()),
        }
    }
}

/// A worker's own handle on a state: requests of that worker clone this (their own
/// reference count), not the shared state's.
pub type WorkerState = Arc<Arc<GatewayState>>;

thread_local! {
    static WORKER_STATE: RefCell<(u64, Option<WorkerState>)> = const { RefCell::new((0, None)) };
}

impl StateHandle {
    /// The state a request is served with, start to end (control-plane readers).
    pub fn load(&self) -> Arc<GatewayState> {
        self.current.load_full()
    }

    /// The state for a request of the current thread: the thread's own handle, refreshed
    /// when a reload swapped the state. Cloning it touches no memory another worker writes.
    pub fn load_for_request(&self) -> WorkerState {
        let generation = self.generation.load(Ordering::Acquire);
        WORKER_STATE.with_borrow_mut(|(seen, handle)| match handle {
            Some(h) if *seen == generation => h.clone(),
            _ => {
                let h = Arc::new(self.current.load_full());
                *seen = generation;
                *handle = Some(h.clone());
                h
            }
        })
    }

    fn publish(&self, next: GatewayState) {
        self.current.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Publishes `api`; the old state stays on any error.
    pub fn install(&self, api: Arc<CompiledApi>) -> Result<(), LoadError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.current.load().with_api(api)?;
        self.publish(next);
        Ok(())
    }

    /// Unloads an API; false when it was not loaded.
    pub fn remove(&self, id: &str) -> bool {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load();
        if cur.api(id).is_none() {
            return false;
        }
        let next = cur.without(id);
        drop(cur);
        self.publish(next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys() {
        assert_eq!(host_key("api.example.com"), "api.example.com");
        assert_eq!(host_key("API.example.com:8080"), "api.example.com");
        assert_eq!(host_key("api.example.com.:80"), "api.example.com");
        assert_eq!(host_key("[::1]:8080"), "::1");
        assert_eq!(host_key("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_key("2001:DB8::1"), "2001:db8::1");
        assert_eq!(host_key("[2001:DB8::1]"), "2001:db8::1");
        assert_eq!(host_key("a.b:8080X"), "a.b");
        assert!(matches!(host_key("a.b"), Cow::Borrowed(_)));
        assert!(matches!(host_key("a.b:80"), Cow::Borrowed(_)));
    }

    /// `api_for_host` looks a host up as it is before normalising it: that is only right if
    /// every host a snapshot can store is left as it is by `host_key`.
    #[test]
    fn stored_hosts_are_their_own_keys() {
        for h in [
            "api.example.com",
            "API.Example.COM.",
            "xn--bcher-kva.example",
            "under_score.test",
            "127.0.0.1",
            "[::1]",
            "2001:DB8::1",
            "::ffff:192.0.2.1",
        ] {
            let stored = crate::snapshot::validate::normalize_host(h);
            assert_eq!(host_key(&stored), stored.as_str(), "{h}");
        }
    }
}

#[cfg(test)]
mod swap_tests {
    use super::*;
    use crate::snapshot;

    fn api(id: &str, revision: u64, hosts: &[&str]) -> Arc<CompiledApi> {
        let doc = serde_json::json!({
            "format": "scp-apigw.snapshot/v1", "revision": revision,
            "api": {"id": id, "name": id, "hosts": hosts},
            "deployments": [{"deployment_id": "d1", "resources": [
                {"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []}]}],
            "stages": [{"name": "prod", "deployment_id": "d1"}]
        });
        Arc::new(snapshot::build(&serde_json::to_vec(&doc).unwrap()).unwrap())
    }

    #[test]
    fn host_conflicts_and_revisions() {
        let h = StateHandle::default();
        h.install(api("a", 1, &["a.test", "shared.test"])).unwrap();
        assert_eq!(
            h.install(api("b", 1, &["b.test", "Shared.Test"])),
            Err(LoadError::HostConflict {
                host: "shared.test".into(),
                other: "a".into()
            })
        );
        assert!(
            h.load().api_for_host("b.test").is_none(),
            "the old state stays on failure"
        );
        assert_eq!(
            h.install(api("a", 1, &["a.test"])),
            Err(LoadError::NotNewer {
                loaded: 1,
                offered: 1
            })
        );
        // A newer revision may drop a host, which another API can then claim.
        h.install(api("a", 2, &["a.test"])).unwrap();
        assert!(h.load().api_for_host("shared.test").is_none());
        h.install(api("b", 1, &["shared.test"])).unwrap();
        assert_eq!(&*h.load().api_for_host("SHARED.test:443").unwrap().id, "b");
        assert!(h.remove("a"));
        assert!(!h.remove("a"));
        assert!(h.load().api_for_host("a.test").is_none());
    }
}
