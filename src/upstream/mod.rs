//! Backend connections ("Forwarding to an HTTP or PRIVATELINK integration"): where a request
//! goes ([`Upstream`], compiled with the snapshot), the per-worker connection pool
//! ([`pool`]), connecting over TCP or TLS ([`connect`]), and sending with the retry rule of
//! the contract ([`send`]).
//!
//! # The pool
//! Each worker thread has its own pool (a thread-local table indexed by [`Upstream::id`]):
//! a request borrows a connection of its own worker and gives it back when the answer's
//! body has been read to its end, so a pooled connection is never touched by two threads and
//! a checkout is a `Vec::pop`, without hashing or locking. HTTP/1.1 connections are reused
//! most-recently-used first (the warmest socket, the one least likely to have been closed by
//! the backend); a TLS backend that offers `h2` by ALPN gets one multiplexed HTTP/2
//! connection per worker.
//!
//! # Closing races and retries
//! A backend may close an idle keep-alive connection at any moment (RFC 9112 §9.5). The pool
//! does not reuse a connection past the idle time the backend announced in
//! `Keep-Alive: timeout=N` (less a margin), nor past `upstream.pool_idle_timeout`. When a
//! *reused* connection still fails before any byte of the answer arrived, the request is
//! sent once more on a new connection if it was never written, or if its method is
//! idempotent (RFC 9110 §9.2.2) and its body was empty or is whole in hand (a function
//! event). Otherwise the client gets 502. The stage's integration timeout covers both tries.
//! On HTTP/1.1 the second try's head is parsed back from the bytes the connection wrote
//! for the first ([`wire`]); on HTTP/2 the head is copied before it is sent.

pub mod connect;
pub mod pool;
mod send;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use rustls::pki_types::ServerName;

pub use send::{send, SendError, Sent, UpstreamBody};

/// One backend as connections see it: where to connect, how (TLS and its server name),
/// and the `Host` its requests carry. Compiled once per distinct backend.
#[derive(Debug)]
pub struct Upstream {
    /// Index into every worker's pool. Stable for the life of the process: a backend keeps
    /// its id, and so its pooled connections, across snapshot reloads.
    pub id: usize,
    pub tls: bool,
    /// Host to connect to: a DNS name or an IP address (no brackets).
    pub host: Arc<str>,
    pub port: u16,
    /// TLS server name (SNI and certificate check) for `https` backends.
    pub server_name: Option<ServerName<'static>>,
    /// `Host` of every request sent to this backend.
    pub host_header: HeaderValue,
    /// Scheme and authority of HTTP/2 request URIs.
    pub scheme: Scheme,
    pub authority: Authority,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tls: bool,
    host: String,
    port: u16,
    server_name: Option<String>,
    host_header: String,
}

/// Every backend the process has compiled, by what makes it distinct. Used while snapshots
/// compile (on the control thread), never by requests. It only grows, by one small entry per
/// distinct backend ever loaded.
static REGISTRY: LazyLock<Mutex<HashMap<Key, Arc<Upstream>>>> = LazyLock::new(Default::default);

fn intern(key: Key) -> Result<Arc<Upstream>, String> {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(u) = reg.get(&key) {
        return Ok(u.clone());
    }
    let server_name = match (&key.server_name, key.tls) {
        (Some(n), true) => Some(
            ServerName::try_from(n.clone())
                .map_err(|_| format!("`{n}` is not a TLS server name"))?,
        ),
        _ => None,
    };
    let host_header = crate::interned::header_value(&key.host_header)
        .ok_or_else(|| format!("`{}` is not a valid Host", key.host_header))?;
    let authority: Authority = key
        .host_header
        .parse()
        .map_err(|_| format!("`{}` is not a valid authority", key.host_header))?;
    let up = Arc::new(Upstream {
        id: reg.len(),
        tls: key.tls,
        host: key.host.as_str().into(),
        port: key.port,
        server_name,
        host_header,
        scheme: if key.tls { Scheme::HTTPS } else { Scheme::HTTP },
        authority,
    });
    reg.insert(key, up.clone());
    Ok(up)
}

/// The host of a URI without the brackets of an IPv6 literal.
fn bare_host(uri: &http::Uri) -> Option<&str> {
    uri.host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
}

/// `host[:port]`, the port omitted when it is the scheme's default (as HTTP clients do).
fn host_header(uri: &http::Uri, tls: bool) -> Option<String> {
    let host = uri.host()?;
    Some(match uri.port_u16() {
        Some(p) if p != default_port(tls) => format!("{host}:{p}"),
        _ => host.to_owned(),
    })
}

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

fn is_tls(uri: &http::Uri) -> Result<bool, String> {
    match uri.scheme_str() {
        Some("http") => Ok(false),
        Some("https") => Ok(true),
        other => Err(format!(
            "scheme `{}` is not http or https",
            other.unwrap_or("")
        )),
    }
}

impl Upstream {
    /// The backend of an `http`/`https` URL (HTTP integrations, function invoke URLs).
    pub fn for_url(url: &http::Uri) -> Result<Arc<Upstream>, String> {
        let tls = is_tls(url)?;
        let host = bare_host(url).ok_or("the URL has no host")?;
        intern(Key {
            tls,
            host: host.to_owned(),
            port: url.port_u16().unwrap_or(default_port(tls)),
            server_name: tls.then(|| host.to_owned()),
            host_header: host_header(url, tls).ok_or("the URL has no host")?,
        })
    }

    /// A PrivateLink endpoint: connections go to `target`, while `Host` and the TLS server
    /// name come from the integration's URL.
    pub fn for_target(
        url: &http::Uri,
        target_host: &str,
        target_port: u16,
    ) -> Result<Arc<Upstream>, String> {
        let tls = is_tls(url)?;
        let name = bare_host(url).ok_or("the URL has no host")?;
        intern(Key {
            tls,
            host: target_host.to_owned(),
            port: target_port,
            server_name: tls.then(|| name.to_owned()),
            host_header: host_header(url, tls).ok_or("the URL has no host")?,
        })
    }
}

/// `a: b: c` of an error and its sources, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What connecting and pooling need from the configuration.
pub struct Settings {
    /// Backend TLS: webpki roots plus `upstream.extra_ca_file`, ALPN `h2` and `http/1.1`.
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    /// An idle pooled connection is closed after this long (`upstream.pool_idle_timeout`).
    pub idle_timeout: Duration,
    /// Idle connections kept per backend and worker (`upstream.pool_max_idle_per_host`).
    pub max_idle: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_targets() {
        let a = Upstream::for_url(&"http://127.0.0.1:9000/x".parse().unwrap()).unwrap();
        let b = Upstream::for_url(&"http://127.0.0.1:9000/y?q".parse().unwrap()).unwrap();
        assert_eq!(a.id, b.id, "one backend, one id");
        assert_eq!(a.host_header, "127.0.0.1:9000");
        assert!(!a.tls && a.server_name.is_none());
        let s = Upstream::for_url(&"https://Api.Example.com/x".parse().unwrap()).unwrap();
        assert_eq!((s.port, s.tls), (443, true));
        assert_eq!(s.host_header, "Api.Example.com");
        let v6 = Upstream::for_url(&"http://[::1]:8080/".parse().unwrap()).unwrap();
        assert_eq!((&*v6.host, v6.port), ("::1", 8080));
        assert_eq!(v6.host_header, "[::1]:8080");
        let pl = Upstream::for_target(
            &"https://orders.internal:8443/v1".parse().unwrap(),
            "10.0.0.5",
            443,
        )
        .unwrap();
        assert_eq!((&*pl.host, pl.port), ("10.0.0.5", 443));
        assert_eq!(pl.host_header, "orders.internal:8443");
        assert!(pl.server_name.is_some());
        assert_ne!(pl.id, s.id);
        assert!(Upstream::for_url(&"ftp://x/".parse().unwrap()).is_err());
    }
}
