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
use tokio::net::TcpListener;
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
    /// Requests whose service has started (a new head begins after each).
    requests: AtomicU64,
    /// The head being read carries both Content-Length and Transfer-Encoding.
    ambiguous_length: AtomicBool,
    /// Wakes the connection's watchdog when a head begins, so that the head deadline (not
    /// the longer idle one it was sleeping towards) applies from that moment.
    head_begun: tokio::sync::Notify,
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
            requests: AtomicU64::new(0),
            ambiguous_length: AtomicBool::new(false),
            head_begun: tokio::sync::Notify::new(),
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
            self.head_begun.notify_one();
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
    /// Called when a request head is complete; returns whether that head was ambiguous.
    fn start(a: &Arc<Activity>) -> (Self, bool) {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.head_started.store(0, Ordering::Relaxed);
        a.requests.fetch_add(1, Ordering::Relaxed);
        let ambiguous = a.ambiguous_length.swap(false, Ordering::Relaxed);
        (InFlight(a.clone()), ambiguous)
    }
}

/// Finds `Content-Length` and `Transfer-Encoding` together in an HTTP/1 request head.
///
/// hyper drops `Content-Length` from the parsed headers when `Transfer-Encoding` is present
/// (and only stops keeping the connection alive), so the pipeline could not refuse such a
/// request as `request-pipeline.md` demands. This scanner looks at the raw head bytes: it
/// compares the first bytes of each line with the two names and stops at the blank line
/// that ends the head. Body bytes are never scanned.
struct HeadScan {
    generation: u64,
    line_len: usize,
    cl_match: bool,
    te_match: bool,
    cl_lines: u8,
    saw_te: bool,
    done: bool,
}

const CL_NAME: &[u8] = b"content-length:";

impl HeadScan {
    /// A scanner for the head that follows `generation` started requests.
    fn new(generation: u64) -> Self {
        Self {
            generation,
            line_len: 0,
            cl_match: true,
            te_match: true,
            cl_lines: 0,
            saw_te: false,
            done: false,
        }
    }
}
const TE_NAME: &[u8] = b"transfer-encoding:";

impl HeadScan {
    /// Scans `bytes`; true when the head ended with both headers present, or with
    /// `Content-Length` more than once (hyper keeps one of equal copies, silently).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.done {
                break;
            }
            match b {
                b'\n' => {
                    if self.line_len == 0 {
                        self.done = true;
                        return (self.cl_lines > 0 && self.saw_te) || self.cl_lines > 1;
                    }
                    self.line_len = 0;
                    self.cl_match = true;
                    self.te_match = true;
                }
                b'\r' => {}
                _ => {
                    let l = b.to_ascii_lowercase();
                    let i = self.line_len;
                    if self.cl_match && i < CL_NAME.len() {
                        self.cl_match = CL_NAME[i] == l;
                        if self.cl_match && i + 1 == CL_NAME.len() {
                            self.cl_lines = self.cl_lines.saturating_add(1);
                        }
                    }
                    if self.te_match && i < TE_NAME.len() {
                        self.te_match = TE_NAME[i] == l;
                        self.saw_te |= self.te_match && i + 1 == TE_NAME.len();
                    }
                    self.line_len += 1;
                }
            }
        }
        false
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last.store(self.0.now_ms(), Ordering::Relaxed);
    }
}

/// A client connection's byte stream: plain TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// A client socket that reports its reads and writes to an [`Activity`], and closes
/// lingeringly: when the gateway closes a connection whose client may still be sending
/// (a 413 mid-upload, a timeout), the socket is half-closed and drained for a short while
/// before it is dropped, as nginx's `lingering_close` does. Closing with unread data would
/// make the kernel send a reset that can destroy the response before the client reads it.
struct TrackedIo<S: Stream> {
    inner: Option<S>,
    activity: Arc<Activity>,
    read_eof: bool,
    scan: HeadScan,
}

/// Lingering close: at most this long in all, and this long without any data.
const LINGER_TOTAL: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(1);

impl<S: Stream> TrackedIo<S> {
    fn new(stream: S, activity: Arc<Activity>) -> Self {
        Self {
            inner: Some(stream),
            activity,
            read_eof: false,
            scan: HeadScan::new(0),
        }
    }

    /// Feeds head bytes (read while no request is in flight) to the [`HeadScan`].
    fn scan_head(&mut self, bytes: &[u8]) {
        let a = &self.activity;
        if a.h2.load(Ordering::Relaxed) || a.in_flight.load(Ordering::Relaxed) > 0 {
            return;
        }
        let generation = a.requests.load(Ordering::Relaxed);
        if self.scan.generation != generation {
            self.scan = HeadScan::new(generation);
        }
        if self.scan.feed(bytes) {
            a.ambiguous_length.store(true, Ordering::Relaxed);
        }
    }

    fn io(&mut self) -> Pin<&mut S> {
        Pin::new(
            self.inner
                .as_mut()
                .expect("the stream is present until drop"),
        )
    }
}

impl<S: Stream> Drop for TrackedIo<S> {
    fn drop(&mut self) {
        if self.read_eof {
            return;
        }
        let (Some(stream), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = stream;
            let _ = stream.shutdown().await;
            let end = tokio::time::Instant::now() + LINGER_TOTAL;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let until = end.min(tokio::time::Instant::now() + LINGER_QUIET);
                match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => return,
                }
            }
        });
    }
}

impl<S: Stream> AsyncRead for TrackedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = this.io().poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            if buf.filled().len() > before {
                let new = &buf.filled()[before..];
                this.activity.on_read(new);
                this.scan_head(new);
            } else if buf.remaining() > 0 {
                this.read_eof = true;
            }
        }
        r
    }
}

impl<S: Stream> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io().poll_write(cx, data);
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
        let r = this.io().poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}

/// How a listener's connections begin.
#[derive(Clone)]
pub enum ListenerKind {
    /// HTTP/1.1 or h2c straight away.
    Plain,
    /// A PROXY protocol v2 header, then HTTP.
    ProxyProtocol,
    /// A TLS handshake (ALPN h2 or http/1.1), then HTTP.
    Tls(tokio_rustls::TlsAcceptor),
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    listener: TcpListener,
    kind: ListenerKind,
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
        // The connection cap: over it, the connection is closed at once (a flood of idle
        // or slow connections cannot take the descriptors and memory the others need).
        let Ok(slot) = app.connection_slots.clone().try_acquire_owned() else {
            static WARN: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new();
            if let Some(held_back) = WARN.allow() {
                tracing::warn!(
                    limit = app.config.limits.max_connections,
                    similar_lines_held_back = held_back,
                    "connection cap reached; new connections are closed"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut info = ConnInfo {
            peer,
            local,
            proto: "http",
            trusted_peer: app.is_trusted_proxy(peer.ip()),
            proxy: None,
            forwarded_for: crate::integration::http::ip_header_value(crate::app::canonical_ip(
                peer.ip(),
            )),
        };
        let (app, builder, shutdown) = (app.clone(), builder.clone(), shutdown.clone());
        let kind = kind.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            let deadline = app.config.limits.head_read_timeout;
            match kind {
                ListenerKind::Plain => serve_connection(app, builder, stream, info, shutdown).await,
                ListenerKind::ProxyProtocol => {
                    match crate::proxy_protocol::read(&mut stream, deadline).await {
                        Ok(p) => {
                            if let Some(source) = p.source {
                                info.forwarded_for = crate::integration::http::ip_header_value(
                                    crate::app::canonical_ip(source),
                                );
                            }
                            info.proxy = Some(p);
                            serve_connection(app, builder, stream, info, shutdown).await
                        }
                        Err(e) => {
                            tracing::debug!(peer = %peer, error = %e, "connection without a valid PROXY v2 header closed")
                        }
                    }
                }
                ListenerKind::Tls(acceptor) => {
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            info.proto = "https";
                            serve_connection(app, builder, tls, info, shutdown).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake not completed in time")
                        }
                    }
                }
            }
        });
    }
    tracing::info!(listener = %local, "listener closed");
}

async fn serve_connection<S: Stream>(
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
            _ = activity.head_begun.notified(), if kind == Deadline::Idle => {}
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    fn scan(parts: &[&[u8]]) -> bool {
        let mut s = HeadScan::new(0);
        parts.iter().any(|p| s.feed(p))
    }

    #[test]
    fn finds_cl_and_te_in_either_order_and_split_reads() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Len",
            b"gth: 5\r\nTransfer-Encoding: chunked\r\n",
            b"\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n"
        ]));
        // A repeated Content-Length, equal values included.
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
        ]));
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"]));
    }

    #[test]
    fn ignores_bodies_and_lookalikes() {
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nContent-Length: 1\r\n"
        ]));
    }
}
