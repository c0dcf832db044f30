//! The data plane's listeners and workers.
//!
//! # Thread per core
//! `runtime.workers` threads (default: one per core) each run their own single-threaded
//! tokio runtime with their own `SO_REUSEPORT` socket on every configured address
//! ([`bind`]). The kernel spreads new connections over the sockets; from then on a client
//! connection, its requests, the backend connections they borrow ([`crate::upstream::pool`])
//! and the tasks driving them all live on one thread. Nothing on the request path hands work
//! to another thread or waits for one.
//!
//! What is still shared between workers, and why:
//! - the loaded snapshots (one `ArcSwap`, read-only between reloads);
//! - the connection cap (`limits.max_connections` counts all workers), touched once per
//!   connection;
//! - throttle buckets and quota counters: the contract makes them per gateway instance
//!   (a burst of 10 is 10 over all workers), so they are one atomic each;
//! - the fleet's Redis connection, when enabled.
//!
//! Metrics, report aggregates and request ids are kept per worker ([`crate::worker`]) and
//! merged when read; access-log lines wait in a buffer per worker, which the writer thread
//! swaps for an empty one on its tick.
//!
//! Trade-offs: a worker whose connections happen to be the busy ones cannot hand them to an
//! idle worker (work stealing would), and the kernel's spreading is by connection, so few
//! long-lived busy connections can load workers unevenly. In exchange a request costs no
//! cross-thread wake-up, no shared pool lock and no contended cache line. This is the model
//! of nginx's workers, Envoy's worker threads and Pingora's per-thread pools.
//!
//! The control plane (admin API, reloads, state flushes, access-log writing, fleet pushes)
//! runs on the main thread's runtime and the control thread, never on a worker.

mod accept;
pub mod bind;
mod conn;
mod io;
pub mod proxy_protocol;
pub mod tls;
mod watchdog;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use accept::ListenerKind;
pub use conn::http_builder;

use crate::app::App;

/// The running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<usize>>,
}

/// One worker's listening sockets.
pub type WorkerListeners = Vec<(std::net::TcpListener, ListenerKind)>;

impl Workers {
    /// Starts one thread per entry of `listeners` (worker `i` gets `listeners[i]`). They
    /// serve until `shutdown` turns true, then drain their connections for up to
    /// `server.drain_timeout`.
    pub fn start(
        app: &Arc<App>,
        listeners: Vec<WorkerListeners>,
        shutdown: &watch::Receiver<bool>,
    ) -> std::io::Result<Workers> {
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, socks) in listeners.into_iter().enumerate() {
            let (app, shutdown) = (app.clone(), shutdown.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("scp-worker-{i}"))
                    .spawn(move || run(i, app, socks, shutdown))?,
            );
        }
        Ok(Workers { threads })
    }

    /// Waits for every worker to finish draining; returns how many connections were
    /// still open at the drain deadline (and were cut).
    pub fn join(self) -> usize {
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or(0))
            .sum()
    }
}

/// A worker thread: its runtime, its accept loops, its pool sweeper.
fn run(i: usize, app: Arc<App>, socks: WorkerListeners, shutdown: watch::Receiver<bool>) -> usize {
    crate::worker::enter(i);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = i, error = %e, "worker runtime could not start");
            return 0;
        }
    };
    rt.block_on(async move {
        crate::timer::enable();
        let builder = Arc::new(http_builder(&app.config.limits));
        let open = Arc::new(AtomicUsize::new(0));
        let mut accepts = Vec::new();
        for (sock, kind) in socks {
            let listener = match tokio::net::TcpListener::from_std(sock) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(worker = i, error = %e, "listener could not join the worker runtime");
                    continue;
                }
            };
            accepts.push(tokio::spawn(accept::accept_loop(
                app.clone(),
                builder.clone(),
                listener,
                kind,
                shutdown.clone(),
                open.clone(),
            )));
        }
        // The connection watchdog (timeouts, drain), and idle backend connections past
        // their time closed even without traffic.
        let watchdog = tokio::spawn(watchdog::run(app.config.limits.clone(), shutdown.clone()));
        let sweeper = tokio::spawn(async {
            loop {
                crate::timer::sleep_until(tokio::time::Instant::now() + Duration::from_secs(1))
                    .await;
                crate::upstream::pool::sweep();
            }
        });
        for a in accepts {
            let _ = a.await;
        }
        // Draining: this worker's connections were told to finish; they get until the
        // drain deadline, then the runtime (and whatever is left) is dropped.
        let deadline = tokio::time::Instant::now() + app.config.server.drain_timeout;
        while open.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sweeper.abort();
        watchdog.abort();
        crate::timer::disable();
        open.load(Ordering::Acquire)
    })
}
