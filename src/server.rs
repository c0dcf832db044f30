//! Data-plane listeners: HTTP/1.1 and h2c (prior knowledge) on every `server.listen`
//! address, with the connection limits of `request-pipeline.md`.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request, which would cut idle connections at the head timeout. So each connection
//! has a small [`Activity`] record fed by its socket and its service, and one watchdog that
//! sleeps until the next deadline: the head deadline (first byte of a head + 10 s) or the
//! idle deadline (last byte + 60 s).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::app::App;
use crate::config::Limits;
use crate::pipeline::{self, ConnInfo};

/// The HTTP server settings shared by every connection.
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

/// Per-connection activity, in milliseconds since `base` (0 = never).
struct Activity {
    base: Instant,
    last: AtomicU64,
    head_started: AtomicU64,
    in_flight: AtomicU32,
    saw_first_read: AtomicBool,
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            saw_first_read: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn on_read(&self, bytes: &[u8]) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if !self.saw_first_read.swap(true, Ordering::Relaxed)
            && bytes.starts_with(b"PRI * HTTP/2.0")
        {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    fn deadline(&self, limits: &Limits) -> (Instant, Deadline) {
        let ms = |v: u64| self.base + Duration::from_millis(v.saturating_sub(1));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (Instant::now() + limits.idle_timeout, Deadline::Recheck);
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => (
                ms(self.last.load(Ordering::Relaxed)) + limits.idle_timeout,
                Deadline::Idle,
            ),
            t => (ms(t) + limits.head_read_timeout, Deadline::Head),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Recheck,
    Idle,
    Head,
    Force,
}

/// Marks a request in flight for the watchdog; the head is complete once the service runs.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.head_started.store(0, Ordering::Relaxed);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last.store(self.0.now_ms(), Ordering::Relaxed);
    }
}

/// A socket that reports its reads and writes to an [`Activity`].
struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, listener = %local, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            peer,
            local,
            proto: "http",
            trusted_peer: app.is_trusted_proxy(peer.ip()),
        };
        tokio::spawn(serve_connection(
            app.clone(),
            builder.clone(),
            stream,
            info,
            shutdown.clone(),
        ));
    }
    tracing::info!(listener = %local, "listener closed");
}

async fn serve_connection(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
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
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        activity: activity.clone(),
    });
    let info = Arc::new(info);
    let svc_app = app.clone();
    let svc_activity = activity.clone();
    let svc = service_fn(move |req| {
        let app = svc_app.clone();
        let info = info.clone();
        let guard = InFlight::start(&svc_activity);
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
    // After an idle close was asked for, hyper gets this long to finish before the socket
    // is dropped outright.
    let mut force_close_at: Option<Instant> = None;
    loop {
        let (at, kind) = match force_close_at {
            Some(f) => (f, Deadline::Force),
            None => activity.deadline(limits),
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(at.into()) => {
                match kind {
                    Deadline::Force => return,
                    Deadline::Recheck => {}
                    Deadline::Head | Deadline::Idle => {
                        // Activity may have moved the deadline while we slept.
                        let (now_at, now_kind) = activity.deadline(limits);
                        if now_kind != kind || now_at > Instant::now() {
                            continue;
                        }
                        if kind == Deadline::Head {
                            tracing::debug!("request head not received in time; closing");
                            return;
                        }
                        if !closing {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        force_close_at = Some(Instant::now() + Duration::from_secs(5));
                    }
                }
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
