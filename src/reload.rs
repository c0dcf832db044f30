//! Hot reload (`operations.md`, "Hot reload"): snapshots arrive by admin `PUT`, by files in
//! `snapshots.dir` (watched, debounced) and by `SIGHUP`. Every arrival is parsed, validated
//! and compiled off the request path, then swapped in with one pointer store; on any failure
//! the old snapshot keeps serving.
//!
//! The directory is reconciled as a whole: each `*.json` file is remembered by the SHA-256
//! of its content, so an unchanged file (including one the admin API just wrote) is not an
//! arrival; a changed file is; a vanished file unloads the API it was the source of. Names
//! starting with `.` are ignored, so writers can write `.name.tmp` and rename it.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::app::App;
use crate::snapshot::{self, Issue};
use crate::state::LoadError;

#[derive(Default)]
struct DirState {
    /// Content hash of every file last seen.
    files: HashMap<PathBuf, [u8; 32]>,
    /// The file each loaded API came from (or was persisted to).
    sources: HashMap<Arc<str>, PathBuf>,
}

/// The snapshot directory and what the gateway knows of it. All control-plane writes
/// (reconcile, push, unload) hold its lock, so they apply one at a time.
pub struct SnapshotDir {
    dir: PathBuf,
    state: Mutex<DirState>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub loaded: usize,
    pub rejected: usize,
    pub unloaded: usize,
}

/// Why an admin push was refused; each maps to the admin API's status.
#[derive(Debug)]
pub enum PushError {
    /// 400: not a valid snapshot (or a host held by another API).
    Invalid(Vec<Issue>),
    /// 409: not newer than the loaded revision.
    NotNewer { loaded: u64, offered: u64 },
    /// 422: `api.id` differs from the path.
    IdMismatch { path: String, body: String },
    /// 500: the snapshot could not be persisted; nothing was loaded.
    Persist(String),
}

impl SnapshotDir {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            state: Mutex::new(DirState::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DirState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn is_snapshot_file(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "json")
        && !p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}

/// Brings the loaded state in line with the directory.
pub fn reconcile(app: &App) -> Report {
    let sd = &app.snapshots;
    let mut st = sd.lock();
    let mut report = Report::default();
    let files: Vec<PathBuf> = match snapshot::snapshot_files(&sd.dir) {
        Ok(f) => f.into_iter().filter(|p| is_snapshot_file(p)).collect(),
        Err(e) => {
            tracing::error!(dir = %sd.dir.display(), error = %e, "cannot read the snapshot directory");
            return report;
        }
    };
    let present: HashSet<PathBuf> = files.iter().cloned().collect();
    for file in files {
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read snapshot file");
                continue;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if st.files.get(&file) == Some(&hash) {
            continue;
        }
        st.files.insert(file.clone(), hash);
        match snapshot::check(&bytes) {
            Ok((api, warnings)) => {
                snapshot::log_warnings(&file.display().to_string(), &warnings);
                let (id, revision) = (api.id.clone(), api.revision);
                match app.install(Arc::new(api)) {
                    Ok(()) => {
                        tracing::info!(file = %file.display(), api_id = %id, revision, "snapshot loaded");
                        st.sources.insert(id, file);
                        report.loaded += 1;
                    }
                    Err(e) => {
                        tracing::warn!(file = %file.display(), api_id = %id, revision, error = %e, "snapshot rejected; the loaded one keeps serving");
                        report.rejected += 1;
                    }
                }
            }
            Err(issues) => {
                app.metrics
                    .snapshot_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                for i in &issues {
                    tracing::error!(file = %file.display(), problem = %i, "invalid snapshot rejected");
                }
                report.rejected += 1;
            }
        }
    }
    let gone: Vec<PathBuf> = st
        .files
        .keys()
        .filter(|p| !present.contains(*p))
        .cloned()
        .collect();
    for path in gone {
        st.files.remove(&path);
        let owners: Vec<Arc<str>> = st
            .sources
            .iter()
            .filter(|(_, p)| **p == path)
            .map(|(id, _)| id.clone())
            .collect();
        for id in owners {
            st.sources.remove(&id);
            if app.unload(&id) {
                tracing::info!(file = %path.display(), api_id = %id, "snapshot file removed; API unloaded");
                report.unloaded += 1;
            }
        }
    }
    report
}

/// An admin `PUT /admin/apis/{api_id}`: validate, persist atomically, then swap in.
/// Every refused arrival is counted as `rejected`.
pub fn push(app: &App, path_id: &str, bytes: &[u8]) -> Result<u64, PushError> {
    let result = try_push(app, path_id, bytes);
    match &result {
        Err(PushError::Invalid(_) | PushError::NotNewer { .. } | PushError::IdMismatch { .. }) => {
            app.metrics
                .snapshot_reloads
                .with_label_values(&["rejected"])
                .inc();
        }
        Ok(_) | Err(PushError::Persist(_)) => {}
    }
    result
}

fn try_push(app: &App, path_id: &str, bytes: &[u8]) -> Result<u64, PushError> {
    let parsed = snapshot::parse(bytes).map_err(|i| PushError::Invalid(vec![i]))?;
    if parsed.api.id != path_id {
        return Err(PushError::IdMismatch {
            path: path_id.to_owned(),
            body: parsed.api.id,
        });
    }
    snapshot::validate::validate(&parsed).map_err(PushError::Invalid)?;
    let warnings = snapshot::warnings::warnings(&parsed);
    let api = Arc::new(snapshot::compile::compile(parsed).map_err(PushError::Invalid)?);
    let revision = api.revision;
    let sd = &app.snapshots;
    let mut st = sd.lock();
    // Check before persisting, so that a refused push leaves the directory untouched.
    if let Err(e) = app.state.load().with_api(api.clone()) {
        return Err(refused(e));
    }
    let target = st
        .sources
        .get(&api.id)
        .cloned()
        .unwrap_or_else(|| sd.dir.join(format!("{}.json", api.id)));
    write_atomically(&target, bytes)
        .map_err(|e| PushError::Persist(format!("{}: {e}", target.display())))?;
    st.files
        .insert(target.clone(), Sha256::digest(bytes).into());
    let id = api.id.clone();
    app.install(api).map_err(refused)?;
    tracing::info!(api_id = %id, revision, file = %target.display(), "snapshot pushed and loaded");
    snapshot::log_warnings(&target.display().to_string(), &warnings);
    st.sources.insert(id, target);
    Ok(revision)
}

/// A push the loaded state refuses: 409 for an old revision, 400 for a taken host.
fn refused(e: LoadError) -> PushError {
    match e {
        LoadError::NotNewer { loaded, offered } => PushError::NotNewer { loaded, offered },
        LoadError::HostConflict { .. } => PushError::Invalid(vec![Issue {
            path: "api.hosts".into(),
            message: e.to_string(),
        }]),
    }
}

/// An admin `DELETE /admin/apis/{api_id}`: unload and remove the persisted file.
/// False when the API is not loaded.
pub fn delete(app: &App, api_id: &str) -> bool {
    let sd = &app.snapshots;
    let mut st = sd.lock();
    if !app.unload(api_id) {
        return false;
    }
    if let Some(path) = st.sources.remove(api_id) {
        st.files.remove(&path);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "could not remove the persisted snapshot");
        }
    }
    tracing::info!(api_id, "API deleted through the admin API");
    true
}

/// Writes `bytes` to `target` through a temporary file in the same directory and a rename.
fn write_atomically(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("snapshot.json");
    let tmp = dir.join(format!(".{name}.{}.tmp", rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

type Job = Box<dyn FnOnce() + Send>;

/// The control thread: every control-plane operation (reconcile, push, delete) runs on this
/// one thread, in arrival order, off the request path. One thread also keeps the snapshot
/// allocations in one malloc arena, so resident memory stays flat under reload churn.
pub struct Control {
    tx: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Control {
    pub fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("scp-control".into())
            .spawn(move || {
                crate::worker::lower_priority(5);
                for job in rx {
                    job();
                }
            })?;
        Ok(Self { tx: Mutex::new(tx) })
    }

    /// Runs `f` on the control thread and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .ok()?;
        result.await.ok()
    }
}

/// Watches the directory and reconciles after changes settle (100 ms of quiet, at most
/// 500 ms after the first event). The returned watcher must be kept alive.
pub fn watch(app: Arc<App>) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher as _;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(app.snapshots.path(), notify::RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            loop {
                let quiet = tokio::time::Instant::now() + Duration::from_millis(100);
                match tokio::time::timeout_at(quiet.min(deadline), rx.recv()).await {
                    Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
                    Ok(None) => return,
                    _ => break,
                }
            }
            let app2 = app.clone();
            let report = app.control.run(move || reconcile(&app2)).await;
            if let Some(r) = report {
                if r != Report::default() {
                    tracing::info!(
                        loaded = r.loaded,
                        rejected = r.rejected,
                        unloaded = r.unloaded,
                        "snapshot directory changed"
                    );
                }
            }
        }
    });
    Ok(watcher)
}
