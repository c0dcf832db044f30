//! One client connection: HTTP/1.1 or h2c (prior knowledge) through hyper's automatic
//! server, with the connection limits of `request-pipeline.md` enforced by a watchdog.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request (and arms a timer per request), which would cut idle connections at the
//! head timeout. So each connection has a small [`Activity`] record, fed by its socket and
//! its requests with plain stores, and a watchdog in the connection's own task that wakes
//! on a coarse tick (half the shorter of the two timeouts) rather than per request:
//! - a head being read is cut at its first byte + `limits.head_read_timeout` (exactly: the
//!   tick that first sees the head arms the precise deadline);
//! - a connection with no request in flight and no byte moved is closed gracefully
//!   `limits.idle_timeout` after the tick that last saw activity (so between the idle
//!   timeout and the idle timeout plus one tick after its last byte, never before).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use super::io::{Activity, InFlight, Stream, TrackedIo};
use crate::app::App;
use crate::config::Limits;
use crate::pipeline::{self, ConnInfo};

/// The HTTP server settings shared by every connection of a worker.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Our own watchdog enforces the head timeout (see the module docs).
        .header_read_timeout(None)
        .keep_alive(true)
        .max_headers(limits.max_headers)
        // The parser's hard stop; the configured head and URI limits are checked on the
        // parsed head so that a long URI gets 414 rather than 431.
        .max_buf_size((limits.max_head_bytes * 2).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(None);
    b
}

/// How long after the graceful close of an idle connection the socket is dropped outright.
const FORCE_CLOSE_AFTER: Duration = Duration::from_secs(5);

/// Serves one connection until it ends, the watchdog cuts it, or shutdown drains it.
pub async fn serve_connection<S: Stream>(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: S,
    info: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) {
    struct Open<'a>(&'a App);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.active_connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
    app.active_connections.fetch_add(1, Ordering::AcqRel);
    let _open = Open(&app);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedIo::new(stream, activity.clone()));
    let info = Arc::new(info);
    let svc_app = app.clone();
    let svc_activity = activity.clone();
    let svc = service_fn(move |req| {
        let app = svc_app.clone();
        let info = info.clone();
        let (guard, ambiguous) = InFlight::start(&svc_activity);
        let mut req = req;
        if ambiguous {
            req.extensions_mut().insert(pipeline::AmbiguousLength);
        }
        async move {
            let resp = pipeline::handle(&app, &info, req).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let limits = &app.config.limits;
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    let tick =
        (limits.head_read_timeout.min(limits.idle_timeout) / 2).max(Duration::from_millis(10));
    let mut watch = Watchdog {
        seen: activity.events(),
        idle_since: Instant::now(),
        force_close_at: None,
    };
    let sleep = tokio::time::sleep(tick);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = sleep.as_mut() => {
                match watch.check(&activity, limits, tick) {
                    Verdict::Wait(until) => sleep.as_mut().reset(until.into()),
                    Verdict::Cut => {
                        tracing::debug!("request head not received in time; closing");
                        return;
                    }
                    Verdict::CloseIdle => {
                        if !closing {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        let at = Instant::now() + FORCE_CLOSE_AFTER;
                        watch.force_close_at = Some(at);
                        sleep.as_mut().reset(at.into());
                    }
                    Verdict::Force => return,
                }
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The watchdog's memory between ticks.
struct Watchdog {
    /// The activity counter at the last tick.
    seen: u64,
    /// The tick that last saw activity.
    idle_since: Instant,
    force_close_at: Option<Instant>,
}

enum Verdict {
    /// Look again then.
    Wait(Instant),
    /// The head took too long: drop the connection.
    Cut,
    /// Idle too long: close gracefully.
    CloseIdle,
    /// The graceful close did not finish in time.
    Force,
}

impl Watchdog {
    fn check(&mut self, a: &Activity, limits: &Limits, tick: Duration) -> Verdict {
        let now = Instant::now();
        if let Some(at) = self.force_close_at {
            return if now >= at {
                Verdict::Force
            } else {
                Verdict::Wait(at)
            };
        }
        let events = a.events();
        if events != self.seen {
            self.seen = events;
            self.idle_since = now;
        }
        if let Some(started) = a.head_started() {
            let deadline = started + limits.head_read_timeout;
            return if now >= deadline {
                Verdict::Cut
            } else {
                Verdict::Wait(deadline.min(now + tick))
            };
        }
        if a.busy() {
            return Verdict::Wait(now + tick);
        }
        let idle_deadline = self.idle_since + limits.idle_timeout;
        if now >= idle_deadline {
            Verdict::CloseIdle
        } else {
            Verdict::Wait(idle_deadline.min(now + tick))
        }
    }
}
