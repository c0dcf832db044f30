//! A client connection's byte stream as the listener sees it: what it tells the worker's
//! watchdog ([`Activity`], see `watchdog.rs`), and the lingering close.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's watchdog needs to know, written by the connection's own task (its
/// reads and writes, and its requests starting and ending) and read by its watchdog, on the
/// same worker thread. Each field has one writer at a time, so updates are plain loads and
/// stores: nothing here costs a locked instruction, a timer or a wake-up per request.
pub struct Activity {
    /// Bumped by every read or write that moved bytes and by every request's end: the
    /// watchdog compares it between its ticks to tell an idle connection from a busy one.
    events: AtomicU64,
    /// A request head is being read (its first byte arrived, its service has not started);
    /// the number of the request it belongs to, +1, or 0. The watchdog times the head from
    /// the tick that first sees it, so a read costs no clock.
    head_started: AtomicU64,
    in_flight: AtomicU32,
    saw_first_read: AtomicBool,
    h2: AtomicBool,
    /// Requests whose service has started (a new head begins after each).
    requests: AtomicU64,
    /// What the watchdog ordered ([`Order`] as a number), and the connection task to wake
    /// for it.
    order: AtomicU8,
    waker: AtomicWaker,
}

/// What the watchdog tells a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Order {
    None = 0,
    /// Close gracefully (idle, or the gateway is draining).
    Close = 1,
    /// Drop the connection now (the head took too long, or the graceful close did).
    Cut = 2,
}

/// Adds one with a plain load and store: every counter here has a single writer.
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

impl Activity {
    pub fn new() -> Self {
        Self {
            events: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            saw_first_read: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            order: AtomicU8::new(0),
            waker: AtomicWaker::new(),
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        bump(&self.events);
        if !self.saw_first_read.load(Ordering::Relaxed) {
            self.saw_first_read.store(true, Ordering::Relaxed);
            if bytes.starts_with(b"PRI * HTTP/2.0") {
                self.h2.store(true, Ordering::Relaxed);
            }
        }
        // The first byte of a new HTTP/1 head (HTTP/2 connections have no per-request head
        // to time).
        if self.head_started.load(Ordering::Relaxed) == 0
            && self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            let n = self.requests.load(Ordering::Relaxed);
            self.head_started
                .store(n.wrapping_add(1).max(1), Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        bump(&self.events);
    }

    /// A snapshot of the activity counter.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// A request is being served (its head was read; its answer is not done).
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Orders the connection to close (never weakens an earlier order) and wakes its task.
    pub fn order(&self, o: Order) {
        if self.order.fetch_max(o as u8, Ordering::AcqRel) < o as u8 {
            self.waker.wake();
        }
    }

    /// The watchdog's order. The connection task registers to be woken for the next one
    /// when `registered` is false: on its first poll, and after it has seen an order (the
    /// wake-up that came with the order took the registration). In between one registration
    /// stands, as every order comes with a wake-up and a task's waker does not change; a
    /// registration per poll would cost two atomic operations on every poll of every
    /// connection.
    pub fn ordered(&self, cx: &Context<'_>, registered: &mut bool) -> Order {
        if !*registered {
            self.waker.register(cx.waker());
            *registered = true;
        }
        match self.order.load(Ordering::Acquire) {
            0 => Order::None,
            1 => {
                *registered = false;
                Order::Close
            }
            _ => {
                *registered = false;
                Order::Cut
            }
        }
    }

    /// The head being read, if one is: a number that changes with each request's head.
    pub fn head_pending(&self) -> Option<u64> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A request's head is complete (its service runs). Pair with
    /// [`Activity::request_ended`].
    pub fn request_started(&self) {
        let n = self.in_flight.load(Ordering::Relaxed);
        self.in_flight.store(n + 1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        bump(&self.requests);
    }

    /// A request's answer is done, or the request was dropped.
    pub fn request_ended(&self) {
        let n = self.in_flight.load(Ordering::Relaxed);
        self.in_flight.store(n.saturating_sub(1), Ordering::Relaxed);
        bump(&self.events);
    }
}

/// A client connection's byte stream: plain TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// A client socket that reports its reads and writes to an [`Activity`] and closes
/// lingeringly: when the gateway closes a connection whose client may still be sending (a
/// 413 mid-upload, a timeout), the socket is half-closed and drained for a short while
/// before it is dropped, as nginx's `lingering_close` does. Closing with unread data would
/// make the kernel send a reset that can destroy the response before the client reads it.
pub struct TrackedIo<S: Stream> {
    inner: Option<S>,
    activity: Arc<Activity>,
    read_eof: bool,
}

/// Lingering close: at most this long in all, and this long without any data.
const LINGER_TOTAL: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(1);

impl<S: Stream> TrackedIo<S> {
    pub fn new(stream: S, activity: Arc<Activity>) -> Self {
        Self {
            inner: Some(stream),
            activity,
            read_eof: false,
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
                this.activity.on_read(&buf.filled()[before..]);
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
