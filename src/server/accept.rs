//! A worker's accept loop for one listener: the connection cap, then PROXY v2 or TLS
//! before HTTP, per [`ListenerKind`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::conn::serve_connection;
use crate::app::{canonical_ip, App};
use crate::integration::http::ip_header_value;
use crate::pipeline::ConnInfo;

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

/// Accepts connections until `shutdown` turns true; each connection becomes a task of
/// this worker, counted in `open` while it lives.
pub async fn accept_loop(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    listener: TcpListener,
    kind: ListenerKind,
    mut shutdown: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
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
        // The connection cap, over all workers: over it, the connection is closed at once
        // (a flood of idle or slow connections cannot take the descriptors and memory the
        // others need).
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
        let peer_ip = canonical_ip(peer.ip());
        let mut info = ConnInfo {
            peer,
            local,
            proto: "http",
            trusted_peer: app.is_trusted_proxy(peer.ip()),
            proxy: None,
            forwarded_for: ip_header_value(peer_ip),
            hop_ip: peer_ip,
        };
        let (app, builder) = (app.clone(), builder.clone());
        let kind = kind.clone();
        let guard = OpenGuard::new(&open);
        let task = async move {
            let _slot = slot;
            let _guard = guard;
            let mut stream = stream;
            let deadline = app.config.limits.head_read_timeout;
            match kind {
                ListenerKind::Plain => serve_connection(app, builder, stream, Arc::new(info)).await,
                // The other kinds are boxed: every connection's task is as large as its
                // largest variant (a TLS stream, the handshake), and most are plain.
                ListenerKind::ProxyProtocol => {
                    Box::pin(async move {
                        match super::proxy_protocol::read(&mut stream, deadline).await {
                            Ok(p) => {
                                // This hop appends the address the PROXY header names.
                                if let Some(source) = p.source {
                                    info.hop_ip = canonical_ip(source);
                                    info.forwarded_for = ip_header_value(info.hop_ip);
                                }
                                info.proxy = Some(p);
                                serve_connection(app, builder, stream, Arc::new(info)).await
                            }
                            Err(e) => {
                                tracing::debug!(peer = %peer, error = %e, "connection without a valid PROXY v2 header closed")
                            }
                        }
                    })
                    .await
                }
                ListenerKind::Tls(acceptor) => {
                    match tokio::time::timeout(deadline, Box::pin(acceptor.accept(stream))).await {
                        Ok(Ok(tls)) => {
                            info.proto = "https";
                            Box::pin(serve_connection(app, builder, tls, Arc::new(info))).await
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
        };
        tokio::spawn(task);
    }
    tracing::debug!(listener = %local, "listener closed");
}

/// Counts a connection of this worker while it lives (the worker drains until none is left).
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
