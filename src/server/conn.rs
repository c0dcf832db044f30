//! One client connection: HTTP/1.1 or h2c (prior knowledge) through hyper's automatic
//! server. Its limits (head and idle timeouts, drain) are enforced by the worker's
//! watchdog (`watchdog.rs`), which reads the connection's [`Activity`] and orders it to
//! close; the connection task only obeys.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use super::io::{Activity, Order, Stream, TrackedIo};
use crate::app::App;
use crate::config::Limits;
use crate::pipeline::{self, ConnInfo};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

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

/// What a connection's requests share: one reference-counted allocation per connection,
/// cloned once per request (never the process-wide `App`, whose count every worker would
/// write).
struct Conn {
    app: Arc<App>,
    info: Arc<ConnInfo>,
    activity: Arc<Activity>,
}

/// A request of a connection, from its head to its answer (or until it is dropped).
struct InFlight(Arc<Conn>);

impl pipeline::Serving for InFlight {
    fn app(&self) -> &App {
        &self.0.app
    }
    fn conn(&self) -> &ConnInfo {
        &self.0.info
    }
}

impl InFlight {
    fn start(conn: &Arc<Conn>) -> Self {
        conn.activity.request_started();
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.request_ended();
    }
}

/// Serves one connection until it ends, or until the watchdog cuts it.
pub async fn serve_connection<S: Stream>(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: S,
    info: Arc<ConnInfo>,
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
    super::watchdog::register(&activity);
    let io = TokioIo::new(TrackedIo::new(stream, activity.clone()));
    let shared = Arc::new(Conn {
        app: app.clone(),
        info,
        activity: activity.clone(),
    });
    let svc = service_fn(move |req| pipeline::handle(InFlight::start(&shared), req));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    // Obey the watchdog: a graceful close when told to close (hyper finishes the request in
    // flight and answers it with `Connection: close`, or sends a GOAWAY), the end of the
    // connection when told to cut.
    let mut closing = false;
    let mut registered = false;
    let result = std::future::poll_fn(|cx| {
        match activity.ordered(cx, &mut registered) {
            Order::Cut => return Poll::Ready(Ok(())),
            Order::Close if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            Order::Close | Order::None => {}
        }
        let polled = conn.as_mut().poll(cx);
        // The answer fields a request's future pushed for the head hyper writes in the same
        // poll (see `pipeline::finish`) never outlive this poll: an answer hyper did not
        // write (the connection was closing) must not lend them to another connection's.
        hyper::ext::AppendedHeaders::clear_next_response();
        polled
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
