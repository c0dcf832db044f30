//! Opening a backend connection: name resolution, TCP within `upstream.connect_timeout`,
//! TLS with ALPN (`h2`, `http/1.1`), and the HTTP/1.1 or HTTP/2 handshake. The connection's
//! driver runs as a task of the worker that opened it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::wire::Wire;
use super::{Settings, Upstream};
use crate::body::ForwardBody;

/// A new connection's request handle.
pub enum Handle {
    H1(http1::SendRequest<ForwardBody>),
    H2(http2::SendRequest<ForwardBody>),
}

/// A connection just opened, with what its socket shares with the requests sent on it.
pub struct Fresh {
    pub handle: Handle,
    pub wire: Arc<Wire>,
}

/// Why a connection could not be opened (logged; the client gets 502).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr}: no connection within the connect timeout")]
    Timeout { addr: SocketAddr },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("no connection before the integration deadline")]
    Deadline,
}

/// Opens a connection to `up`, giving up at `deadline` (the request's integration
/// deadline) or after the connect timeout, whichever comes first.
pub async fn open(
    settings: &Settings,
    up: &Upstream,
    deadline: Instant,
) -> Result<Fresh, ConnectError> {
    let addrs: Vec<SocketAddr> = match up.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, up.port)],
        Err(_) => {
            let lookup = tokio::net::lookup_host((&*up.host, up.port));
            match tokio::time::timeout_at(deadline, lookup).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(source)) => {
                    return Err(ConnectError::Resolve {
                        host: up.host.to_string(),
                        source,
                    })
                }
                Err(_) => return Err(ConnectError::Deadline),
            }
        }
    };
    let mut last = ConnectError::NoAddress {
        host: up.host.to_string(),
    };
    for addr in addrs {
        match open_addr(settings, up, addr, deadline).await {
            Ok(c) => return Ok(c),
            Err(ConnectError::Deadline) => return Err(ConnectError::Deadline),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn open_addr(
    settings: &Settings,
    up: &Upstream,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<Fresh, ConnectError> {
    let until = deadline.min(Instant::now() + settings.connect_timeout);
    let tcp = match tokio::time::timeout_at(until, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Connect { addr, source }),
        Err(_) if until == deadline => return Err(ConnectError::Deadline),
        Err(_) => return Err(ConnectError::Timeout { addr }),
    };
    let _ = tcp.set_nodelay(true);
    let wire = Arc::new(Wire::default());
    let (io, h2) = match &up.server_name {
        Some(name) if up.tls => {
            let connector = tokio_rustls::TlsConnector::from(settings.tls.clone());
            let tls = match tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(source)) => return Err(ConnectError::Tls { addr, source }),
                Err(_) => return Err(ConnectError::Deadline),
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            (BackendIo::Tls(Box::new(tls)), h2)
        }
        _ => (BackendIo::Plain(tcp), false),
    };
    let io = Transport {
        io,
        wire: wire.clone(),
    };
    let handle = if h2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %addr, error = %e, "HTTP/2 backend connection ended");
            }
        });
        Handle::H2(send)
    } else {
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended");
            }
        });
        Handle::H1(send)
    };
    Ok(Fresh { handle, wire })
}

/// A backend connection's transport as hyper sees it: the socket, counting the bytes it
/// received and keeping, when asked, the bytes written for a request ([`Wire`]); it also
/// hands hyper's HTTP/1 client the header fields its [`Wire`] holds for the request head
/// being written ([`hyper::rt::Write::take_appended_headers`], see `vendor/hyper/PATCHED.md`).
///
/// hyper's I/O traits are implemented here directly, as hyper-util's `TokioIo` does, rather
/// than over `TokioIo` and a counting `AsyncRead` layer: the count is the read's own length,
/// not worked out again from the buffer before and after (a backend connection is read
/// six times per request, most of them finding nothing).
struct Transport {
    io: BackendIo,
    /// Written only by the connection's own task; read when a request on it fails.
    wire: Arc<Wire>,
}

/// A backend socket: plain TCP or TLS.
enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsIo>),
}

type TlsIo = tokio_rustls::client::TlsStream<TcpStream>;

/// The TLS stream's reads and writes are called, not inlined, into the transport's: a
/// plain connection's read or write then saves and restores fewer registers (the TLS
/// code inlined made each call ~40 instructions dearer).
impl BackendIo {
    #[inline(always)]
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            BackendIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => tls_read(s, cx, buf),
        }
    }

    #[inline(always)]
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            BackendIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendIo::Tls(s) => tls_write_vectored(s, cx, bufs),
        }
    }
}

#[inline(never)]
fn tls_read(s: &mut TlsIo, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    Pin::new(s).poll_read(cx, buf)
}

#[inline(never)]
fn tls_write_vectored(
    s: &mut TlsIo,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    Pin::new(s).poll_write_vectored(cx, bufs)
}

impl hyper::rt::Read for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // SAFETY: as in hyper-util's `TokioIo`: the socket only writes initialised bytes
        // into the unfilled part it is lent, and reports how many in `filled`.
        let n = unsafe {
            let mut tbuf = ReadBuf::uninit(buf.as_mut());
            match this.io.poll_read(cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                other => return other,
            }
        };
        if n > 0 {
            this.wire.add_received(n);
        }
        // SAFETY: the socket filled these `n` bytes just above.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl Transport {
    /// Tells the wire what a write took: the bytes written, or all of them when the write
    /// failed (they were not sent whole).
    fn wrote(&self, bufs: &[io::IoSlice<'_>], r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => self.wire.wrote(bufs, *n),
            Poll::Ready(Err(_)) => self.wire.wrote(bufs, usize::MAX),
            Poll::Pending => {}
        }
    }
}

impl hyper::rt::Write for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = match &mut this.io {
            BackendIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        };
        this.wrote(&[io::IoSlice::new(data)], &r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io.poll_write_vectored(cx, bufs);
        this.wrote(bufs, &r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            BackendIo::Plain(s) => s.is_write_vectored(),
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            BackendIo::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            BackendIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn take_appended_headers(self: Pin<&mut Self>) -> Option<hyper::ext::AppendedHeaders> {
        self.wire.take_appended()
    }
}
