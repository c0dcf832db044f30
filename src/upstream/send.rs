//! Sending one request to a backend, with the contract's retry rule (see the module docs
//! of [`super`]), and the answer's body, which gives its connection back to the worker's
//! pool when it has been read to its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::ext::AppendedHeaders;
use tokio::time::Instant;

use super::connect::{self, ConnectError, Handle};
use super::pool::{self, Pooled};
use super::wire::{self, Wire};
use super::{Settings, Upstream};
use crate::body::{client_body_failure, ForwardBody};
use crate::rejection::Rejection;
use crate::timer::Deadline;

/// A backend's answer (its head, without the hop-by-hop headers of the connection it came
/// on; the body streams).
pub struct Sent {
    pub response: Response<UpstreamBody>,
    /// The request was sent a second time on a new connection.
    pub retried: bool,
    /// When the answer's head arrived.
    pub answered: std::time::Instant,
}

/// Why no answer came.
#[derive(Debug)]
pub enum SendError {
    /// No answer head before the integration deadline (504).
    Timeout { retried: bool },
    /// The connection could not be opened, broke, or the answer was not HTTP (502).
    Failed { reason: String, retried: bool },
    /// The client's body broke or exceeded the limit while it was forwarded (400, 413).
    ClientBody(Rejection),
}

/// RFC 9110 §9.2.2 idempotent methods (CONNECT and TRACE are never forwarded).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// What it takes to send a request again if the first try on a reused HTTP/2 connection
/// fails after it was written: only when the body is empty or whole in hand (never a
/// streamed client body). (An HTTP/1.1 try is sent again from the bytes its connection
/// wrote: see [`super::wire`]; an HTTP/2 connection's bytes are frames of many streams,
/// their fields compressed.)
///
/// The URI and the header fields are copied as bytes into one buffer, and parsed back only
/// if the copy is needed (rarely): the values a request is made of share their bytes with
/// the client's read buffer, and sharing one more time costs two atomic operations per
/// value (the clone, the drop), which cost more than copying the few hundred bytes.
struct RetryCopy {
    method: http::Method,
    version: Version,
    /// The URI's text, then each field as [`push_field`] writes it.
    head: Vec<u8>,
    uri_len: usize,
    body: Option<Bytes>,
}

thread_local! {
    /// The buffer of the worker's last finished retry copy, kept for its next one: a
    /// request's copy costs no allocation of its own. One spare per worker: with several
    /// requests in flight at once, the copies beyond the spare allocate their own (and the
    /// last one given back is kept).
    static SPARE_HEAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Buffers larger than this (a request with very large headers) are not kept for reuse.
const SPARE_HEAD_MAX: usize = 16 * 1024;

impl Drop for RetryCopy {
    fn drop(&mut self) {
        let head = std::mem::take(&mut self.head);
        if head.capacity() <= SPARE_HEAD_MAX {
            SPARE_HEAD.set(head);
        }
    }
}

/// The body of a request that may be sent again: none, or whole in hand; `None` for a
/// streamed client body (it cannot be read twice).
fn whole_body(req: &Request<ForwardBody>) -> Option<Option<Bytes>> {
    match req.body() {
        ForwardBody::Full(b) => Some(b.clone()),
        ForwardBody::Stream(s) if s.is_end_stream() => Some(None),
        ForwardBody::Stream(_) => None,
    }
}

/// A URI's text (the origin form for HTTP/1.1, the absolute form for HTTP/2) without the
/// formatting machinery.
fn push_uri(buf: &mut Vec<u8>, uri: &http::Uri) {
    match (uri.scheme_str(), uri.authority(), uri.path_and_query()) {
        (None, None, Some(pq)) => buf.extend_from_slice(pq.as_str().as_bytes()),
        (Some(scheme), Some(authority), Some(pq)) => {
            for part in [scheme, "://", authority.as_str(), pq.as_str()] {
                buf.extend_from_slice(part.as_bytes());
            }
        }
        _ => buf.extend_from_slice(uri.to_string().as_bytes()),
    }
}

/// One field in a [`RetryCopy`]'s buffer: the name's length (u16, a name's maximum), the
/// value's length (u32), whether the value is sensitive, then the name and the value.
fn push_field(buf: &mut Vec<u8>, name: &http::HeaderName, value: &HeaderValue) {
    let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
    // Both lengths and the flag in one copy (a request copies a dozen fields).
    let mut meta = [0u8; 7];
    meta[..2].copy_from_slice(&(n.len() as u16).to_le_bytes());
    meta[2..6].copy_from_slice(&(v.len() as u32).to_le_bytes());
    meta[6] = u8::from(value.is_sensitive());
    buf.reserve(meta.len() + n.len() + v.len());
    buf.extend_from_slice(&meta);
    buf.extend_from_slice(n);
    buf.extend_from_slice(v);
}

/// The next field of a [`RetryCopy`]'s buffer, and the rest of the buffer.
fn pop_field(buf: &[u8]) -> Option<(http::HeaderName, HeaderValue, &[u8])> {
    let (n_len, rest) = buf.split_first_chunk::<2>()?;
    let (v_len, rest) = rest.split_first_chunk::<4>()?;
    let (sensitive, rest) = rest.split_first()?;
    let (name, rest) = rest.split_at_checked(usize::from(u16::from_le_bytes(*n_len)))?;
    let (value, rest) = rest.split_at_checked(u32::from_le_bytes(*v_len) as usize)?;
    let name = http::HeaderName::from_bytes(name).ok()?;
    let mut value = HeaderValue::from_bytes(value).ok()?;
    value.set_sensitive(*sensitive != 0);
    Some((name, value, rest))
}

impl RetryCopy {
    fn of(req: &Request<ForwardBody>) -> Option<RetryCopy> {
        let body = whole_body(req)?;
        let mut head = SPARE_HEAD.take();
        head.clear();
        head.reserve(1024);
        push_uri(&mut head, req.uri());
        let uri_len = head.len();
        for (n, v) in req.headers() {
            push_field(&mut head, n, v);
        }
        Some(RetryCopy {
            method: req.method().clone(),
            version: req.version(),
            head,
            uri_len,
            body,
        })
    }

    /// The request again; `None` if the copy does not read back (it always does: it was
    /// written from a valid request).
    fn request(mut self) -> Option<Request<ForwardBody>> {
        let (uri, mut fields) = self.head.split_at_checked(self.uri_len)?;
        let mut req = Request::new(ForwardBody::Full(self.body.take()));
        *req.method_mut() = std::mem::take(&mut self.method);
        *req.uri_mut() = http::Uri::try_from(uri).ok()?;
        *req.version_mut() = self.version;
        let h = req.headers_mut();
        while !fields.is_empty() {
            let (name, value, rest) = pop_field(fields)?;
            h.append(name, value);
            fields = rest;
        }
        Some(req)
    }
}

/// Sends `req` (origin-form URI, with `up`'s `Host`: over HTTP/2 it becomes `:authority`) to
/// `up` and waits for the answer's head until `deadline`.
/// `now` is the caller's clock read as it made the call (idle connections are judged by it:
/// one clock read per call rather than one per step).
///
/// One future for the whole HTTP/1.1 path (pooled or new connection, retry): every
/// nested async call would add its future, moved on each request, to the caller's. The
/// HTTP/2 path and connecting are boxed for the same reason.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in its future"
)]
pub fn send<'a>(
    settings: &'a Settings,
    up: &'a Upstream,
    mut req: Request<ForwardBody>,
    mut appended: Option<AppendedHeaders>,
    now: std::time::Instant,
    deadline: Instant,
) -> impl std::future::Future<Output = Result<Sent, SendError>> + Send + 'a {
    // An async block, not an async function: a function's arguments are stored twice in
    // its future (as arguments and as locals), and this future is part of every request's.
    async move {
        let mut deadline = Deadline::new(deadline);
        let mut retried = false;
        loop {
            let outcome = 'attempt: {
                // A pooled connection (HTTP/2 if the backend offered it), unless retrying.
                let mut conn = None;
                if !retried {
                    if up.tls {
                        if let Some((h2, wire)) = pool::h2(up.id) {
                            debug_assert!(appended.is_none(), "HTTP/1.1 only");
                            break 'attempt Box::pin(send_h2(
                                up,
                                h2,
                                wire,
                                req,
                                &mut deadline,
                                true,
                            ))
                            .await;
                        }
                    }
                    while let Some(mut c) = pool::checkout(up.id, now) {
                        // An idle connection becomes ready as soon as its driver has seen the
                        // end of the previous answer (usually before it is checked out: then
                        // no timer is armed); one that fails here was closed by its backend
                        // and nothing was sent on it.
                        if c.sender.is_ready() {
                            conn = Some(c);
                            break;
                        }
                        match deadline.wait(c.sender.ready()).await {
                            Ok(Ok(())) => {
                                conn = Some(c);
                                break;
                            }
                            Ok(Err(_)) => continue,
                            Err(_) => break 'attempt Outcome::Timeout,
                        }
                    }
                }
                let reused = conn.is_some();
                let mut conn = match conn {
                    Some(c) => c,
                    None => match Box::pin(connect::open(settings, up, deadline.at())).await {
                        Err(ConnectError::Deadline) => break 'attempt Outcome::Timeout,
                        Err(e) => break 'attempt Outcome::Failed(e.to_string()),
                        Ok(fresh) => match fresh.handle {
                            Handle::H1(mut sender) => {
                                if deadline.wait(sender.ready()).await.is_err() {
                                    break 'attempt Outcome::Timeout;
                                }
                                Pooled {
                                    sender,
                                    wire: fresh.wire,
                                }
                            }
                            Handle::H2(sender) => {
                                pool::set_h2(up.id, sender.clone(), fresh.wire.clone());
                                debug_assert!(appended.is_none(), "HTTP/1.1 only");
                                break 'attempt Box::pin(send_h2(
                                    up,
                                    sender,
                                    fresh.wire,
                                    req,
                                    &mut deadline,
                                    false,
                                ))
                                .await;
                            }
                        },
                    },
                };
                // HTTP/1.1 on `conn`, with the request's own `Host`, the backend's: the
                // integration set it (in place of the client's, see
                // `ForwardInfo::backend_host`, or in the event it built for a function).
                *req.version_mut() = Version::HTTP_11;
                // A request that may go again: the connection keeps what it writes for it
                // (see `wire`), and its body (none, or whole) is kept here.
                let resend = if reused && idempotent(req.method()) {
                    whole_body(&req)
                } else {
                    None
                };
                if resend.is_some() {
                    conn.wire.arm();
                }
                let before = conn.wire.received();
                // The fields written after the map go by the connection (see `wire`); set
                // for every request, so that none is left from one that was not written.
                conn.wire.set_appended(appended.take());
                let sent = conn.sender.try_send_request(req);
                match deadline.wait(sent).await {
                    Err(_) => Outcome::Timeout,
                    Ok(Ok(mut response)) => {
                        // Returned from here, not through `Outcome` and the match below:
                        // the answer (232 bytes) is copied fewer times (−40 instructions).
                        let answered = std::time::Instant::now();
                        let keep_alive = crate::hop_by_hop::strip(response.headers_mut());
                        let give_back = GiveBack {
                            id: up.id,
                            conn,
                            since: answered,
                            idle_for: reuse_for(keep_alive.as_ref(), settings.idle_timeout),
                            max_idle: settings.max_idle,
                        };
                        return Ok(Sent {
                            response: response.map(|body| UpstreamBody::pooled(body, give_back)),
                            retried,
                            answered,
                        });
                    }
                    Ok(Err(mut e)) => {
                        // Unwritten, the request's appended fields are still on the
                        // connection: they go with it if it is sent again (a request sent
                        // again from its written bytes has them in those bytes).
                        appended = conn.wire.take_appended();
                        failed(&mut e, reused, &conn.wire, before, || {
                            let body = resend?;
                            wire::request_again(&conn.wire.take_written(), body)
                        })
                    }
                }
            };
            match outcome {
                Outcome::Answer(response, answered) => {
                    return Ok(Sent {
                        response,
                        retried,
                        answered,
                    })
                }
                Outcome::Again(r) if !retried => {
                    tracing::debug!(backend = %up.host_header.to_str().unwrap_or(""), "reused backend connection failed before answering; sending once more on a new connection");
                    req = r;
                    retried = true;
                }
                Outcome::Again(_) => {
                    return Err(SendError::Failed {
                        reason: "the backend closed the connection before answering".into(),
                        retried,
                    })
                }
                Outcome::Timeout => return Err(SendError::Timeout { retried }),
                Outcome::Failed(reason) => return Err(SendError::Failed { reason, retried }),
                Outcome::ClientBody(r) => return Err(SendError::ClientBody(r)),
            }
        }
    }
}

enum Outcome {
    /// The answer, and when its head arrived.
    Answer(Response<UpstreamBody>, std::time::Instant),
    /// A reused connection failed before any byte of the answer; the request may be sent
    /// once more, on a new connection.
    Again(Request<ForwardBody>),
    Timeout,
    Failed(String),
    ClientBody(Rejection),
}

/// An HTTP/2 try. Appended fields are for HTTP/1.1 only: a request that may go out over
/// HTTP/2 (to a TLS backend) carries all of its fields in its map.
async fn send_h2(
    up: &Upstream,
    mut sender: hyper::client::conn::http2::SendRequest<ForwardBody>,
    wire: Arc<Wire>,
    mut req: Request<ForwardBody>,
    deadline: &mut Deadline,
    reused: bool,
) -> Outcome {
    if deadline.wait(sender.ready()).await.is_err() {
        return Outcome::Timeout;
    }
    *req.version_mut() = Version::HTTP_2;
    // `:authority` replaces Host; the URI is absolute.
    req.headers_mut().remove(HOST);
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(up.scheme.clone());
    parts.authority = Some(up.authority.clone());
    match http::Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => return Outcome::Failed(format!("request URI: {e}")),
    }
    let copy = if reused && idempotent(req.method()) {
        RetryCopy::of(&req)
    } else {
        None
    };
    let before = wire.received();
    match deadline.wait(sender.try_send_request(req)).await {
        Err(_) => Outcome::Timeout,
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            crate::hop_by_hop::strip(&mut parts.headers);
            Outcome::Answer(
                Response::from_parts(parts, UpstreamBody::shared(body)),
                std::time::Instant::now(),
            )
        }
        Ok(Err(mut e)) => failed(&mut e, reused, &wire, before, || {
            copy.and_then(RetryCopy::request)
        }),
    }
}

/// Decides what a failed try means: the client's body at fault, a retry, or a failure.
/// `again` is the request once more, if it may go again once written (`before`: the
/// bytes `wire` had received when it was sent).
fn failed(
    e: &mut hyper::client::conn::TrySendError<Request<ForwardBody>>,
    reused: bool,
    wire: &Wire,
    before: u64,
    again: impl FnOnce() -> Option<Request<ForwardBody>>,
) -> Outcome {
    if let Some(r) = client_body_failure(e.error()) {
        return Outcome::ClientBody(r);
    }
    if reused {
        // Never written: any method may go again.
        if let Some(unsent) = e.take_message() {
            return Outcome::Again(unsent);
        }
        // Written, and not a byte of the answer arrived: idempotent requests whose body
        // is in hand go again.
        if wire.received() == before {
            if let Some(again) = again() {
                return Outcome::Again(again);
            }
        }
    }
    Outcome::Failed(super::error_chain(e.error()))
}

/// How long a connection may stay idle after an answer with this `Keep-Alive` value: the
/// pool's idle timeout, or less when the backend announced `Keep-Alive: timeout=N` (minus a
/// margin, so that the gateway stops reusing it before the backend closes it).
fn reuse_for(keep_alive: Option<&HeaderValue>, pool_idle: Duration) -> Duration {
    let Some(ka) = keep_alive else {
        return pool_idle;
    };
    match keep_alive_timeout(ka) {
        Some(n) => pool_idle.min(usable_idle(n)),
        None => pool_idle,
    }
}

/// `timeout=N` of a `Keep-Alive` value (RFC 2068 §19.7.1.1), in seconds.
fn keep_alive_timeout(v: &HeaderValue) -> Option<u64> {
    let s = v.to_str().ok()?;
    s.split(',').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| v.trim().trim_matches('"').parse().ok())
            .flatten()
    })
}

/// The idle time the gateway uses of a backend's `N` seconds: a fifth of it is kept as a
/// margin, at least 250 ms and at most 2 s (N = 1 → 750 ms, 5 → 4 s, 60 → 58 s).
fn usable_idle(n_secs: u64) -> Duration {
    let n = Duration::from_secs(n_secs);
    let margin = (n / 5).clamp(Duration::from_millis(250), Duration::from_secs(2));
    n.saturating_sub(margin)
}

/// What returns a connection to its worker's pool.
struct GiveBack {
    id: usize,
    conn: Pooled,
    /// When the answer's head arrived.
    since: std::time::Instant,
    idle_for: Duration,
    max_idle: usize,
}

impl GiveBack {
    fn give(self) {
        pool::checkin(self.id, self.conn, self.since, self.idle_for, self.max_idle);
    }
}

/// A backend answer's body. An HTTP/1.1 connection goes back to the worker's pool when the
/// body has been read to its end; a body dropped before that closes the connection.
pub struct UpstreamBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

impl UpstreamBody {
    fn pooled(inner: Incoming, give_back: GiveBack) -> Self {
        let mut b = Self {
            inner,
            give_back: Some(give_back),
        };
        // No body at all (HEAD, 204, 304, Content-Length: 0): the connection is free now.
        if b.inner.is_end_stream() {
            b.release();
        }
        b
    }

    fn shared(inner: Incoming) -> Self {
        Self {
            inner,
            give_back: None,
        }
    }

    fn release(&mut self) {
        if let Some(g) = self.give_back.take() {
            g.give();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.give_back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request a retry sends is the one the first try sent: method, URI (origin and
    /// absolute form), version, every field in order (repeated names, obs-text, an empty
    /// value, sensitivity) and the body.
    #[test]
    fn a_retry_copy_reads_back_as_the_request_it_was_made_of() {
        for uri in [
            "/orders/7?x=1&y=%20",
            "https://backend.example:8443/a/b?c",
            "*",
        ] {
            let mut req = Request::new(ForwardBody::Full(Some(Bytes::from_static(b"{}"))));
            *req.method_mut() = Method::PUT;
            *req.uri_mut() = uri.parse().unwrap();
            *req.version_mut() = Version::HTTP_2;
            let h = req.headers_mut();
            h.append(HOST, HeaderValue::from_static("backend.example"));
            h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            h.append("accept", HeaderValue::from_static("a/b"));
            h.append(
                "x-custom",
                HeaderValue::from_bytes(b"caf\xe9 \t ok").unwrap(),
            );
            h.append("accept", HeaderValue::from_static("c/d"));
            h.append("x-empty", HeaderValue::from_static(""));
            let mut secret = HeaderValue::from_static("Bearer abc");
            secret.set_sensitive(true);
            h.append(http::header::AUTHORIZATION, secret);
            let copy = RetryCopy::of(&req).unwrap();
            let again = copy.request().unwrap();
            assert_eq!(again.method(), req.method());
            assert_eq!(again.uri(), req.uri());
            assert_eq!(again.uri().to_string(), uri);
            assert_eq!(again.version(), req.version());
            let fields = |r: &Request<ForwardBody>| {
                r.headers()
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(fields(&again), fields(&req));
            assert!(again.headers()[http::header::AUTHORIZATION].is_sensitive());
            assert!(matches!(again.body(), ForwardBody::Full(Some(b)) if b == "{}"));
        }
    }

    /// A worker's copies share one buffer: a dropped copy's buffer makes the next copy
    /// (no allocation per request), unless a huge head made it too large to keep.
    #[test]
    fn a_dropped_retry_copy_leaves_its_buffer_to_the_next() {
        let get = |value: &[u8]| {
            let mut req = Request::new(ForwardBody::Full(None));
            req.headers_mut()
                .insert("x-big", HeaderValue::from_bytes(value).unwrap());
            req
        };
        let first = RetryCopy::of(&get(b"a")).unwrap();
        let buffer = first.head.as_ptr();
        drop(first);
        let second = RetryCopy::of(&get(b"b")).unwrap();
        assert_eq!(second.head.as_ptr(), buffer);
        // The reused buffer holds only the new request.
        assert_eq!(second.request().unwrap().headers()["x-big"], "b");
        let huge = RetryCopy::of(&get(&[b'h'; SPARE_HEAD_MAX + 1])).unwrap();
        assert!(huge.head.capacity() > SPARE_HEAD_MAX);
        drop(huge);
        let after = RetryCopy::of(&get(b"c")).unwrap();
        assert!(after.head.capacity() <= SPARE_HEAD_MAX);
    }

    #[test]
    fn keep_alive_timeouts() {
        let v = |s: &'static str| keep_alive_timeout(&HeaderValue::from_static(s));
        assert_eq!(v("timeout=5, max=1000"), Some(5));
        assert_eq!(v("max=10,Timeout = 2"), Some(2));
        assert_eq!(v("max=10"), None);
        assert_eq!(v("timeout=soon"), None);
        assert_eq!(usable_idle(1), Duration::from_millis(750));
        assert_eq!(usable_idle(5), Duration::from_secs(4));
        assert_eq!(usable_idle(60), Duration::from_secs(58));
        assert_eq!(usable_idle(0), Duration::ZERO);
    }
}
