//! The floor: a minimal proxy built the way scp-gateway's data plane is built, with no
//! logic. Bench-only code (never in the binary): the load bench runs itself with
//! `--floor-proxy LISTEN BACKEND WORKERS` to start it as a separate process.
//!
//! Same runtime model (one `current_thread` runtime per worker thread, one `SO_REUSEPORT`
//! socket each), same server (hyper-util's automatic HTTP/1.1 + h2c server, same settings),
//! same client (`hyper::client::conn::http1` senders in a per-worker pool, given back when
//! the answer's body ends). No routing, no policies, no header rules, no metrics, no
//! watchdog, no retries: the gap between the gateway and this is the gateway's own work.
//!
//! Started with `headers`, it also adds the headers the contract puts on every forwarded
//! request (`X-Forwarded-For/-Proto/-Host`, `x-scp-request-id`, `x-scp-api-id`,
//! `x-scp-stage`, `traceparent`) and on every answer (`x-scp-request-id`), with values made
//! once, the way the gateway adds them for a plain `http` backend (written after the
//! request's map by hyper's HTTP/1.1 client, see `vendor/hyper/PATCHED.md`; the answer's
//! goes into its map): a reference for how much of the gateway's gap is the header work the
//! contract asks for.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

type Sender = http1::SendRequest<Incoming>;

/// Where the floor adding the contract's headers puts them for the request about to be
/// written on a connection: hyper's HTTP/1 client takes them from the connection's
/// transport (`FieldsIo`), as the gateway's does (see `vendor/hyper/PATCHED.md`).
type Slot = Arc<std::sync::Mutex<Option<hyper::ext::AppendedHeaders>>>;

thread_local! {
    static POOL: RefCell<Vec<(Sender, Option<Slot>)>> = const { RefCell::new(Vec::new()) };
}

/// A backend socket whose transport hands hyper the fields in its [`Slot`], if it has one
/// (the plain floor's connections have none: one transport type for both floors, so that
/// the client's code is compiled once, as the gateway's is).
struct FieldsIo {
    io: TokioIo<tokio::net::TcpStream>,
    slot: Option<Slot>,
}

impl hyper::rt::Read for FieldsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for FieldsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn take_appended_headers(self: Pin<&mut Self>) -> Option<hyper::ext::AppendedHeaders> {
        self.slot.as_ref()?.lock().ok()?.take()
    }
}

/// The backend's answer body; gives its connection back to the worker's pool at its end.
struct Pooled {
    inner: Incoming,
    sender: Option<(Sender, Option<Slot>)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            POOL.with_borrow_mut(|p| p.push(s));
        }
    }
}

impl Body for Pooled {
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
            Poll::Ready(Some(Err(_))) => this.sender = None,
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

/// A pooled or new connection; a new one has a [`Slot`] for the contract's headers if
/// `fields`.
async fn sender(backend: SocketAddr, fields: bool) -> Result<(Sender, Option<Slot>), String> {
    while let Some((mut s, slot)) = POOL.with_borrow_mut(Vec::pop) {
        if s.ready().await.is_ok() {
            return Ok((s, slot));
        }
    }
    let tcp = tokio::net::TcpStream::connect(backend)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let slot = fields.then(Slot::default);
    let io = FieldsIo {
        io: TokioIo::new(tcp),
        slot: slot.clone(),
    };
    let (s, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok((s, slot))
}

/// The contract's forwarding headers, values made once (see the module docs).
struct ContractHeaders {
    forwarded_for: HeaderValue,
}

static X_SCP_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-scp-request-id");
static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
static ADDED: [(http::HeaderName, HeaderValue); 5] = [
    (
        http::HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    ),
    (
        http::HeaderName::from_static("x-scp-request-id"),
        HeaderValue::from_static("5f0e4c2a9b7d13e80000000000000001"),
    ),
    (
        http::HeaderName::from_static("x-scp-api-id"),
        HeaderValue::from_static("api-bench"),
    ),
    (
        http::HeaderName::from_static("x-scp-stage"),
        HeaderValue::from_static("bench"),
    ),
    (
        http::HeaderName::from_static("traceparent"),
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ),
];

impl ContractHeaders {
    /// As the gateway adds them for a plain `http` backend: written after the request's
    /// map by hyper's HTTP/1.1 client, not inserted into it (`hyper::ext::AppendedHeaders`,
    /// handed to the connection the request goes on).
    fn fields<B>(&self, req: &Request<B>) -> hyper::ext::AppendedHeaders {
        let mut added = hyper::ext::AppendedHeaders::with_capacity(256);
        added.push(&X_FORWARDED_FOR, &self.forwarded_for);
        if let Some(host) = req.headers().get(http::header::HOST) {
            added.push(&X_FORWARDED_HOST, host);
        }
        for (name, value) in &ADDED {
            added.push(name, value);
        }
        added
    }
}

type Answer = Response<http_body_util::Either<Pooled, http_body_util::Full<Bytes>>>;

async fn proxy(
    mut req: Request<Incoming>,
    backend: SocketAddr,
    host: HeaderValue,
    fields: Option<hyper::ext::AppendedHeaders>,
) -> Answer {
    let bad = || {
        let mut r = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
            Bytes::from_static(b"bad gateway"),
        )));
        *r.status_mut() = http::StatusCode::BAD_GATEWAY;
        r
    };
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = http::Uri::from(pq);
    }
    req.headers_mut().insert(http::header::HOST, host);
    *req.version_mut() = http::Version::HTTP_11;
    let Ok((mut s, slot)) = sender(backend, fields.is_some()).await else {
        return bad();
    };
    if let (Some(slot), Some(fields)) = (&slot, fields) {
        if let Ok(mut f) = slot.lock() {
            *f = Some(fields);
        }
    }
    match s.send_request(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let mut body = Pooled {
                inner: body,
                sender: Some((s, slot)),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            Response::from_parts(parts, http_body_util::Either::Left(body))
        }
        Err(_) => bad(),
    }
}

/// Runs the floor proxy until the process is killed. Prints `listening ADDR`. With
/// `headers`, it adds the contract's headers (see the module docs).
pub fn main(listen: SocketAddr, backend: SocketAddr, workers: usize, headers: bool) {
    let socks = scp_gateway::server::bind::bind(listen, workers, "floor").expect("bind");
    println!("listening {}", socks[0].local_addr().unwrap());
    let host = HeaderValue::from_str(&backend.to_string()).unwrap();
    let threads: Vec<_> = socks
        .into_iter()
        .map(|sock| {
            let host = host.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut b = auto::Builder::new(TokioExecutor::new());
                    b.http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(None)
                        .keep_alive(true);
                    let b = Arc::new(b);
                    let listener = tokio::net::TcpListener::from_std(sock).unwrap();
                    loop {
                        let Ok((stream, peer)) = listener.accept().await else {
                            continue;
                        };
                        let contract = headers.then(|| ContractHeaders {
                            forwarded_for: HeaderValue::from_str(&peer.ip().to_string()).unwrap(),
                        });
                        let _ = stream.set_nodelay(true);
                        let (b, host) = (b.clone(), host.clone());
                        // Two services, so that the plain floor's requests run exactly
                        // the code they ran before the contract variant existed.
                        tokio::spawn(async move {
                            let io = TokioIo::new(stream);
                            match contract {
                                None => {
                                    let svc = hyper::service::service_fn(move |req| {
                                        let host = host.clone();
                                        async move {
                                            Ok::<_, Infallible>(
                                                proxy(req, backend, host, None).await,
                                            )
                                        }
                                    });
                                    let _ = b.serve_connection(io, svc).await;
                                }
                                Some(c) => {
                                    // The request's headers are added before its future
                                    // starts, the answer's by a `map`: no layer of its own.
                                    let svc = hyper::service::service_fn(
                                        move |req: Request<Incoming>| {
                                            use futures_util::FutureExt;
                                            let fields = Some(c.fields(&req));
                                            proxy(req, backend, host.clone(), fields).map(
                                                |mut answer| {
                                                    answer.headers_mut().insert(
                                                        &X_SCP_REQUEST_ID,
                                                        ADDED[1].1.clone(),
                                                    );
                                                    Ok::<_, Infallible>(answer)
                                                },
                                            )
                                        },
                                    );
                                    let _ = b.serve_connection(io, svc).await;
                                }
                            }
                        });
                    }
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
