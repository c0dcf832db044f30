//! Forwarding to an HTTP integration ("Forwarding to an HTTP or PRIVATELINK integration"):
//! the header rules, the backend TLS settings, and one call through [`crate::upstream`]
//! (pooled connections, the retry rule) with its 502/504 mapping. Bodies stream both ways.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};

use super::Timing;
use crate::body::ForwardBody;
use crate::config::UpstreamConfig;
use crate::hop_by_hop::{is_hop_by_hop, lists_names, Removals};
use crate::rejection::Rejection;
use crate::request_id::{FieldValue, RequestId, Token};
use crate::upstream::{SendError, Settings, Upstream, UpstreamBody};
pub use hyper::ext::AppendedHeaders;

pub static X_SCP_REQUEST_ID: HeaderName = HeaderName::from_static("x-scp-request-id");
pub static X_SCP_API_ID: HeaderName = HeaderName::from_static("x-scp-api-id");
pub static X_SCP_STAGE: HeaderName = HeaderName::from_static("x-scp-stage");
pub static X_SCP_API_KEY_ID: HeaderName = HeaderName::from_static("x-scp-api-key-id");
pub static X_SCP_JWT_SUB: HeaderName = HeaderName::from_static("x-scp-jwt-sub");
pub static X_SCP_APIKEY: HeaderName = HeaderName::from_static("x-scp-apikey");
pub static X_SCP_ENDPOINT_ID: HeaderName = HeaderName::from_static("x-scp-privatelink-endpoint-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What the gateway adds to a forwarded request.
pub struct ForwardInfo<'a> {
    /// What this hop appends to `X-Forwarded-For`: the socket peer (or a PROXY header's
    /// source), never the client address derived from the list through trusted proxies.
    pub forwarded_for: &'a HeaderValue,
    pub proto: &'static str,
    /// The request target's authority (absolute form, or HTTP/2 `:authority`): the
    /// `X-Forwarded-Host` when the request has no `Host` header.
    pub authority: Option<&'a str>,
    pub request_id: &'a RequestId,
    /// `x-scp-api-id` and `x-scp-stage` values, built with the snapshot.
    pub api_id: Option<&'a HeaderValue>,
    pub stage: Option<&'a HeaderValue>,
    /// `x-scp-api-key-id` and `x-scp-jwt-sub` values, built with the snapshot and the
    /// verified token.
    pub api_key_id: Option<&'a HeaderValue>,
    pub jwt_sub: Option<&'a HeaderValue>,
    /// The socket peer is a trusted proxy: its forwarding headers are kept.
    pub trusted_peer: bool,
    /// The request goes to an HTTP backend, whose `Host` this is: it replaces the client's
    /// in place (found in the pass over the headers: no map operation of its own), or is
    /// inserted when the client sent none. `None` (a function's event): the client's is
    /// removed, and [`forward`] sets the function endpoint's.
    pub backend_host: Option<&'a HeaderValue>,
    /// With tracing on: the `traceparent` naming the integration call's client span,
    /// replacing the client's.
    pub traceparent: Option<&'a HeaderValue>,
}

/// Headers a client must not pass on: hop-by-hop, `Host` (the backend's is set from its
/// URL; the client's value is replaced in place when the backend's is known), the
/// gateway's own `x-scp-*` (a client could forge them), names with `_` (dropped as nginx
/// does, so that `x_scp_apikey`-style spellings can never be read as another header
/// downstream), and forwarding headers unless the peer is a trusted proxy.
fn dropped_on_forward(s: &str, info: &ForwardInfo<'_>) -> bool {
    let trusted_peer = info.trusted_peer;
    if is_hop_by_hop(s) || has_underscore(s.as_bytes()) {
        return true;
    }
    if s == "host" {
        return info.backend_host.is_none();
    }
    if let Some(own) = s.strip_prefix("x-scp-") {
        return match own {
            "apikey" | "request-id" | "api-id" | "stage" | "api-key-id" | "jwt-sub" => true,
            "privatelink-endpoint-id" => !trusted_peer,
            _ => false,
        };
    }
    !trusted_peer && matches!(s, "x-forwarded-proto" | "x-forwarded-host")
}

/// The static of a name the gateway sets itself, for a client's copy that must not go on:
/// one of its own `x-scp-*` headers, or a forwarding header of an untrusted peer.
fn own_static(name: &HeaderName) -> Option<&'static HeaderName> {
    Some(match name.as_str() {
        "x-scp-apikey" => &X_SCP_APIKEY,
        "x-scp-request-id" => &X_SCP_REQUEST_ID,
        "x-scp-api-id" => &X_SCP_API_ID,
        "x-scp-stage" => &X_SCP_STAGE,
        "x-scp-api-key-id" => &X_SCP_API_KEY_ID,
        "x-scp-jwt-sub" => &X_SCP_JWT_SUB,
        "x-scp-privatelink-endpoint-id" => &X_SCP_ENDPOINT_ID,
        "x-forwarded-proto" => &X_FORWARDED_PROTO,
        "x-forwarded-host" => &X_FORWARDED_HOST,
        _ => return None,
    })
}

/// Whether a header name holds `_`, looked for eight bytes at a time: `contains` looked at
/// a name byte by byte (~4 instructions a byte, on every field of every request). A word
/// with a `_` has a zero byte once XORed with eight `_`s, and `(x - 0x01…) & !x & 0x80…`
/// is not zero exactly when `x` has a zero byte.
fn has_underscore(name: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let any = |w: u64| {
        let x = w ^ (ONES * u64::from(b'_'));
        x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
    };
    let word = |b: &[u8]| b.first_chunk::<8>().map_or(0, |w| u64::from_le_bytes(*w));
    let half = |b: &[u8]| b.first_chunk::<4>().map_or(0, |w| u32::from_le_bytes(*w));
    match name.len() {
        0..=3 => name.contains(&b'_'),
        // The first four bytes and the last four (overlapping when fewer than eight).
        len @ 4..=7 => any(u64::from(half(name)) | u64::from(half(&name[len - 4..])) << 32),
        // Whole words, then the last eight bytes (overlapping the last whole word).
        len => name.chunks_exact(8).any(|c| any(word(c))) || any(word(&name[len - 8..])),
    }
}

/// A name [`rewrite_request_headers`] removes once its pass over the headers is done. A
/// client's copy of one of the gateway's own headers, or of a custom hop-by-hop one, is
/// named by its static: a clone of a custom name that hyper parsed allocates (its bytes are
/// shared on first clone), a static is copied. Standard names are plain values either way.
fn to_remove(name: &HeaderName) -> Cow<'static, HeaderName> {
    if let Some(hop) = crate::hop_by_hop::static_name(name.as_str()) {
        return Cow::Borrowed(hop);
    }
    own_static(name).map_or_else(|| Cow::Owned(name.clone()), Cow::Borrowed)
}

/// Where the headers the gateway adds to a forwarded request go.
pub enum Added<'a> {
    /// Into the request's map (a function's event reads them there; HTTP/2 sends the map).
    Map,
    /// For a request that goes out over HTTP/1.1 only (a plain `http` backend): the headers
    /// that are new to the map are written after it by the backend connection, unhashed
    /// (`hyper::ext::AppendedHeaders`, handed to the connection with the request: see
    /// [`forward`] and `vendor/hyper/PATCHED.md`). Those that replace a
    /// client's value (a trusted proxy's `X-Forwarded-For` extended, a `traceparent`
    /// replaced) still go into the map, so a name is never sent twice.
    Appended(&'a mut AppendedHeaders),
}

impl Added<'_> {
    /// Has a client's field that must not go on (one of the gateway's own names, see
    /// [`own_static`]) left out of the head as the backend connection writes it, instead of
    /// removed from the map: `true` if it will be. A removal from the map hashes the name
    /// and moves the map's last entry into its place (~300 instructions, on every request
    /// that carries an `x-scp-apikey`); a field left out has its value replaced by a
    /// marker that the connection skips as it writes the head. Hop-by-hop names and the
    /// client's `Host` are always removed: hyper reads them in the map
    /// (`AppendedHeaders::leave_out` refuses them too).
    fn leave_out(&mut self, name: &HeaderName, value: &mut HeaderValue) -> bool {
        match self {
            Added::Map => false,
            Added::Appended(a) => own_static(name).is_some() && a.leave_out(name, value),
        }
    }

    /// Adds a header the map does not hold.
    fn new_header(&mut self, h: &mut HeaderMap, name: &'static HeaderName, value: &HeaderValue) {
        match self {
            Added::Map => {
                h.append(name, value.clone());
            }
            Added::Appended(a) => a.push(name, value),
        }
    }

    /// Adds a value the gateway made (the request id, a new `traceparent`), a header the
    /// map does not hold: a header value is made of it only for the map.
    fn new_made(&mut self, h: &mut HeaderMap, name: &'static HeaderName, value: &impl FieldValue) {
        match self {
            Added::Map => {
                h.append(name, value.to_value());
            }
            Added::Appended(a) => value.push_to(a, name),
        }
    }
}

/// Applies the request header rules in place: drops what a client must not pass on (and
/// anything it could forge), then adds the gateway's own headers (to `added`).
pub fn rewrite_request_headers(h: &mut HeaderMap, info: &ForwardInfo<'_>, mut added: Added<'_>) {
    // One pass over the client's headers finds what goes and what is already there, so
    // that each header below costs one map operation (a request's headers are few; a
    // probe per name would hash each name again).
    // Made when a first name goes (most requests remove none): an unused list still cost
    // its drop, a look at each of its slots.
    let mut doomed: Option<Removals> = None;
    let (mut listed, mut xff, mut xfp, mut xfh, mut cookies) = (false, false, false, false, 0);
    // A `Connection` that is only `keep-alive` or `close` (browsers send it on every
    // HTTP/1.1 request): removed by its name after the pass, with no list made for it.
    let mut plain_connection = false;
    let mut host: Option<HeaderValue> = None;
    let mut traceparent_ok = false;
    let mut traceparent = false;
    for (name, value) in h.iter_mut() {
        let s = name.as_str();
        match s {
            "host" => {
                host = Some(match info.backend_host {
                    Some(backend) => std::mem::replace(value, backend.clone()),
                    None => value.clone(),
                })
            }
            "x-forwarded-for" => xff = true,
            "x-forwarded-proto" => xfp = true,
            "x-forwarded-host" => xfh = true,
            "cookie" => cookies += 1,
            "traceparent" => {
                traceparent = true;
                traceparent_ok = valid_traceparent(value.as_bytes());
            }
            _ => {}
        }
        if dropped_on_forward(s, info) {
            if s == "connection" {
                if !lists_names(value) {
                    plain_connection = true;
                    continue;
                }
                listed = true;
            }
            if !added.leave_out(name, value) {
                doomed.get_or_insert_default().add(name, to_remove);
            }
        }
    }
    if listed {
        // `Connection` itself is in `doomed` (all its values go with it).
        doomed.get_or_insert_default().add_connection_listed(h);
    } else if plain_connection {
        h.remove(header::CONNECTION);
    }
    if let Some(doomed) = doomed {
        for n in doomed.iter() {
            h.remove(n);
        }
    }
    if let (Some(backend), None) = (info.backend_host, &host) {
        // No `Host` from the client (HTTP/1.0, or HTTP/2's `:authority`): the backend's
        // goes into the map all the same, so that it is written before any appended field.
        h.insert(header::HOST, backend.clone());
    }
    // Forwarding headers of an untrusted peer were just removed.
    let (xfp, xfh) = (xfp && info.trusted_peer, xfh && info.trusted_peer);
    if let Added::Map = added {
        // Room for what is added below, so that the map grows (and rehashes) once at most.
        h.reserve(8);
    }
    if cookies > 1 {
        join_cookie_crumbs(h);
    }
    let ip = info.forwarded_for;
    if xff {
        let mut s: Vec<u8> = Vec::with_capacity(64);
        for v in h.get_all(&X_FORWARDED_FOR) {
            s.extend_from_slice(v.as_bytes());
            s.extend_from_slice(b", ");
        }
        s.extend_from_slice(ip.as_bytes());
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_bytes(&s).unwrap_or_else(|_| ip.clone()),
        );
    } else {
        added.new_header(h, &X_FORWARDED_FOR, ip);
    }
    // A trusted proxy's own values are kept; otherwise they were removed above.
    if !xfp {
        added.new_header(h, &X_FORWARDED_PROTO, &HeaderValue::from_static(info.proto));
    }
    if !xfh {
        let host = host.or_else(|| info.authority.and_then(|a| HeaderValue::from_str(a).ok()));
        if let Some(host) = host {
            added.new_header(h, &X_FORWARDED_HOST, &host);
        }
    }
    // Client copies of these were removed above: they are new to the map.
    added.new_made(h, &X_SCP_REQUEST_ID, info.request_id);
    for (name, value) in [
        (&X_SCP_API_ID, info.api_id),
        (&X_SCP_STAGE, info.stage),
        (&X_SCP_API_KEY_ID, info.api_key_id),
        (&X_SCP_JWT_SUB, info.jwt_sub),
    ] {
        if let Some(v) = value {
            added.new_header(h, name, v);
        }
    }
    // The tracing span's `traceparent` replaces the client's; without tracing, a valid
    // one is passed on and an invalid one replaced.
    match (info.traceparent, traceparent, traceparent_ok) {
        (Some(tp), true, _) => {
            h.insert(&TRACEPARENT, tp.clone());
        }
        (Some(tp), false, _) => added.new_header(h, &TRACEPARENT, tp),
        (None, true, true) => {}
        (None, true, false) => {
            h.insert(&TRACEPARENT, new_traceparent().to_value());
        }
        (None, false, _) => added.new_made(h, &TRACEPARENT, &new_traceparent()),
    }
}

/// RFC 9113 §8.2.3: an HTTP/2 request may split its cookie into several `cookie` fields
/// ("crumbs"); they MUST be joined with "; " into one before an HTTP/1.1 hop, where a second
/// `Cookie` line is not allowed (RFC 6265 §5.4).
fn join_cookie_crumbs(h: &mut HeaderMap) {
    let mut crumbs = h.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::with_capacity(128);
    for (i, v) in h.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// An address as a header value (`X-Forwarded-For` element).
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
fn valid_traceparent(v: &[u8]) -> bool {
    v.len() == 55
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && v.iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 2 | 35 | 52) || matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && &v[0..2] != b"ff"
        && v[3..35].iter().any(|b| *b != b'0')
        && v[36..52].iter().any(|b| *b != b'0')
}

/// A new `traceparent` with random trace and span ids (the worker's fast generator; these
/// ids need to be unique, not secret).
fn new_traceparent() -> Token<55> {
    let (trace, span) = crate::request_id::random_ids();
    crate::request_id::traceparent_token(
        &(trace | 1).to_be_bytes(),
        &(span | 1).to_be_bytes(),
        0x01,
    )
}

/// The TLS settings for backends: webpki roots plus the optional extra CA file.
pub fn tls_config(cfg: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.extra_ca_file {
        let key = |e: &dyn std::fmt::Display| {
            format!(
                "config key `upstream.extra_ca_file` ({}): {e}",
                path.display()
            )
        };
        let pem = std::fs::read(path).map_err(|e| key(&e))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.map_err(|e| key(&e))?).map_err(|e| key(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(key(&"no PEM certificate found"));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tls = tls;
    // HTTP/2 when a TLS backend offers it, else HTTP/1.1.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Outcome of one backend call: the response, when it was sent and its head came, and
/// whether the request had to be sent a second time (see [`crate::upstream`]).
pub struct Forwarded {
    pub response: Response<UpstreamBody>,
    pub timing: Timing,
    pub retried: bool,
}

/// A failed backend call: the rejection, when it was sent and failed, and whether it was
/// retried.
pub struct NotForwarded {
    pub rejection: Rejection,
    pub timing: Timing,
    pub retried: bool,
}

/// Sends the request (origin-form URI, `upstream`'s `Host`; `appended`: header fields
/// written after its map, for a plain `http` backend only) to `upstream` and waits for the
/// response head within `timeout`, which covers a retry too. The answer comes without its
/// hop-by-hop headers (the backend connection's layer removes them, see
/// [`crate::upstream::Sent`]).
///
/// Not an async function on purpose: the future is `upstream::send`'s own, mapped once
/// through `then` (the caller's conversion of the result), so that neither the request nor
/// the answer is stored or moved by an extra layer.
pub fn forward<'a, T>(
    settings: &'a Settings,
    upstream: &'a Upstream,
    req: Request<ForwardBody>,
    appended: Option<AppendedHeaders>,
    timeout: Duration,
    then: impl FnOnce(Result<Forwarded, NotForwarded>) -> T + Send + 'a,
) -> impl std::future::Future<Output = T> + Send + 'a {
    use futures_util::FutureExt;
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + timeout);
    crate::upstream::send(settings, upstream, req, appended, started, deadline).map(move |r| then(match r {
        Ok(sent) => {
            Ok(Forwarded {
                response: sent.response,
                timing: Timing {
                    sent: started,
                    ended: sent.answered,
                },
                retried: sent.retried,
            })
        }
        Err(e) => {
            let timing = Timing::since(started);
            let backend = upstream.host_header.to_str().unwrap_or("");
            let (rejection, retried) = match e {
                SendError::ClientBody(r) => (r, false),
                SendError::Timeout { retried } => {
                    tracing::warn!(
                        backend,
                        timeout_ms = timeout.as_millis() as u64,
                        retried,
                        "integration timed out"
                    );
                    (Rejection::IntegrationTimeout, retried)
                }
                SendError::Failed { reason, retried } => {
                    tracing::warn!(backend, error = %reason, retried, "integration request failed");
                    (Rejection::IntegrationFailure, retried)
                }
            };
            Err(NotForwarded {
                rejection,
                timing,
                retried,
            })
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info<'a>(rid: &'a RequestId, host: &'a HeaderValue) -> ForwardInfo<'a> {
        ForwardInfo {
            forwarded_for: Box::leak(Box::new(HeaderValue::from_static("203.0.113.9"))),
            proto: "http",
            authority: Some(host.to_str().unwrap()),
            request_id: rid,
            api_id: Some(Box::leak(Box::new(HeaderValue::from_static("api1")))),
            stage: Some(Box::leak(Box::new(HeaderValue::from_static("prod")))),
            api_key_id: Some(Box::leak(Box::new(HeaderValue::from_static("k01")))),
            jwt_sub: None,
            trusted_peer: false,
            backend_host: None,
            traceparent: None,
        }
    }

    #[test]
    fn header_rules() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("host", HeaderValue::from_static("api.example.com"));
        h.insert("x-scp-apikey", HeaderValue::from_static("secret"));
        h.insert("x-scp-api-key-id", HeaderValue::from_static("forged"));
        h.insert("x-scp-jwt-sub", HeaderValue::from_static("forged"));
        h.insert(
            "x-scp-privatelink-endpoint-id",
            HeaderValue::from_static("forged"),
        );
        h.insert("x_scp_apikey", HeaderValue::from_static("secret"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("api.example.com");
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Map);
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "upgrade",
            "host",
            "x-scp-apikey",
            "x-scp-jwt-sub",
            "x-scp-privatelink-endpoint-id",
            "x_scp_apikey",
        ] {
            assert!(!h.contains_key(gone), "{gone} must not be forwarded");
        }
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-scp-api-key-id"], "k01");
        assert_eq!(h["x-scp-stage"], "prod");
        assert_eq!(h["x-scp-request-id"], "rid");
        assert!(valid_traceparent(h["traceparent"].as_bytes()));
    }

    #[test]
    fn a_browsers_plain_connection_goes_and_only_it() {
        // `keep-alive` or `close` alone (browsers, curl with -H), in either case and with
        // a second value: Connection goes, the fields around it stay, for either backend.
        for values in [&["keep-alive"][..], &["Close"], &["keep-alive", "CLOSE"]] {
            for appended in [false, true] {
                let mut h = HeaderMap::new();
                for v in values {
                    h.append("connection", HeaderValue::from_static(v));
                }
                h.insert("x-custom", HeaderValue::from_static("kept"));
                h.insert("keep-alive", HeaderValue::from_static("kept-no-more"));
                let rid = RequestId::Kept(HeaderValue::from_static("rid"));
                let host = HeaderValue::from_static("api.example.com");
                if appended {
                    rewrite_appending(&mut h, &info(&rid, &host));
                } else {
                    rewrite_request_headers(&mut h, &info(&rid, &host), Added::Map);
                }
                assert!(!h.contains_key("connection"), "{values:?}");
                assert!(!h.contains_key("keep-alive"), "{values:?}");
                assert_eq!(h["x-custom"], "kept", "{values:?}");
            }
        }
    }

    /// Rewrites `h` for a plain backend: the appended fields' lines.
    fn rewrite_appending(h: &mut HeaderMap, info: &ForwardInfo<'_>) -> Vec<String> {
        let mut appended = AppendedHeaders::with_capacity(512);
        rewrite_request_headers(h, info, Added::Appended(&mut appended));
        lines_of(&appended)
    }

    #[test]
    fn appended_fields_are_written_whole_as_their_buffer_grows() {
        // hyper's `AppendedHeaders::push` (vendored patch) writes a field with one check
        // for room: from no room at all, through many growths, the bytes must be exact.
        let mut appended = AppendedHeaders::with_capacity(0);
        let mut want = String::new();
        for i in 0..60 {
            let name = HeaderName::try_from(format!("x-field-{i}")).unwrap();
            let value = HeaderValue::try_from("v".repeat(i * 7)).unwrap();
            appended.push(&name, &value);
            want.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        appended.push(&http::header::HOST, &HeaderValue::from_static(""));
        want.push_str("host: \r\n");
        assert_eq!(std::str::from_utf8(appended.as_bytes()).unwrap(), want);
    }

    #[test]
    fn a_dropped_field_list_lends_its_buffer_to_the_next_empty() {
        // hyper's `AppendedHeaders` (vendored patch) keeps a dropped list's buffer for the
        // thread's next one: the next request's list must start with none of its fields.
        let mut first = AppendedHeaders::with_capacity(512);
        first.push(&X_SCP_API_ID, &HeaderValue::from_static("secret-api"));
        let buffer = first.as_bytes().as_ptr();
        drop(first);
        // Asking for less room than the kept buffer has: a new block would be another
        // size (and another address).
        let mut next = AppendedHeaders::with_capacity(16);
        assert!(next.is_empty(), "the next list starts empty");
        assert_eq!(next.as_bytes().as_ptr(), buffer, "the buffer was kept");
        next.push(&X_SCP_STAGE, &HeaderValue::from_static("prod"));
        assert_eq!(next.as_bytes(), b"x-scp-stage: prod\r\n");
    }

    /// A transport that hands the client connection `fields` for the first request head
    /// it writes, as the gateway's backend transport does (`upstream::connect`).
    struct WithFields {
        io: hyper_util::rt::TokioIo<tokio::io::DuplexStream>,
        fields: Option<AppendedHeaders>,
    }

    impl hyper::rt::Read for WithFields {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl hyper::rt::Write for WithFields {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }

        fn take_appended_headers(self: std::pin::Pin<&mut Self>) -> Option<AppendedHeaders> {
            self.get_mut().fields.take()
        }
    }

    /// The header lines of the head hyper's HTTP/1 client writes for a request with map
    /// `h`, its transport holding `fields` for it.
    fn written_head(h: HeaderMap, fields: AppendedHeaders) -> Vec<String> {
        use tokio::io::AsyncReadExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (near, mut far) = tokio::io::duplex(64 * 1024);
            let io = WithFields {
                io: hyper_util::rt::TokioIo::new(near),
                fields: Some(fields),
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut req = Request::new(http_body_util::Empty::new());
            *req.headers_mut() = h;
            // The answer never comes: only the head written matters.
            tokio::spawn(sender.send_request(req));
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                far.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let text = String::from_utf8(head).unwrap();
            text.split_terminator("\r\n")
                .skip(1)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
    }

    #[test]
    fn a_clients_copy_of_an_own_header_is_left_out_of_the_head_written() {
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("api.example.com");
        let mut h = HeaderMap::new();
        h.insert("host", host.clone());
        h.insert("x-scp-apikey", HeaderValue::from_static("secret-key"));
        h.append("x-scp-apikey", HeaderValue::from_static("second-secret"));
        h.insert("x-scp-stage", HeaderValue::from_static("forged"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("forged"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        let mut fields = AppendedHeaders::with_capacity(512);
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Appended(&mut fields));
        // Hop-by-hop names are removed from the map (hyper reads the map's): never left out.
        assert!(!h.contains_key("keep-alive"));
        let lines = written_head(h, fields);
        for line in &lines {
            assert!(
                !line.contains("secret") && !line.contains("forged"),
                "{line:?} was written: {lines:?}"
            );
        }
        for name in ["x-scp-stage", "x-forwarded-proto", "x-custom"] {
            let n = lines
                .iter()
                .filter(|l| l.starts_with(&format!("{name}: ")))
                .count();
            assert_eq!(n, 1, "{name} written once: {lines:?}");
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("x-scp-apikey")),
            "{lines:?}"
        );
        assert!(lines.contains(&"x-custom: kept".to_owned()), "{lines:?}");
        assert!(lines.contains(&"x-scp-stage: prod".to_owned()), "{lines:?}");
    }

    /// The lines of appended fields.
    fn lines_of(fields: &AppendedHeaders) -> Vec<String> {
        let text = std::str::from_utf8(fields.as_bytes()).unwrap();
        text.split_terminator("\r\n").map(str::to_owned).collect()
    }

    #[test]
    fn an_underscore_is_found_wherever_it_is() {
        for len in 0..40 {
            let plain = vec![b'a'; len];
            assert!(!has_underscore(&plain), "{len}");
            // Bytes one bit away from `_` (0x5f) are not it.
            for near in [0x5e, 0x5d, 0x7f, 0x4f, 0xdf, 0x60] {
                assert!(!has_underscore(&vec![near; len]), "{len} {near:#x}");
            }
            for at in 0..len {
                let mut name = plain.clone();
                name[at] = b'_';
                assert!(has_underscore(&name), "{len} at {at}");
            }
        }
        for name in [
            "x_scp_apikey",
            "x-scp-apikey",
            "authorization",
            "a_",
            "_",
            "te",
        ] {
            let n = name.as_bytes();
            assert_eq!(has_underscore(n), n.contains(&b'_'), "{name}");
        }
    }

    #[test]
    fn names_hyper_reads_are_never_left_out_only_removed() {
        // hyper frames the request and decides on its connection from these in the map: a
        // field left out (its value replaced by the marker) would be misread.
        let mut fields = AppendedHeaders::with_capacity(0);
        for name in [
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::EXPECT,
            header::HOST,
            header::TE,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ] {
            let mut value = HeaderValue::from_static("close");
            assert!(!fields.leave_out(&name, &mut value), "{name}");
            assert_eq!(value, "close", "{name} kept its value");
        }
        assert!(fields.is_empty(), "nothing pushed, nothing left out");
        let mut value = HeaderValue::from_static("secret");
        assert!(fields.leave_out(&X_SCP_APIKEY, &mut value));
        assert_ne!(value, "secret");
        // A list that only leaves a field out still changes the head: it is not empty
        // (`integrate` hands the connection only a list that is not).
        assert!(!fields.is_empty());
    }

    #[test]
    fn headers_new_to_the_map_are_appended_replacements_stay_in_it() {
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("api.example.com");
        let mut h = HeaderMap::new();
        h.insert("host", host.clone());
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        h.insert("x-scp-stage", HeaderValue::from_static("forged"));
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let mut fields = AppendedHeaders::with_capacity(512);
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Appended(&mut fields));
        let lines = lines_of(&fields);
        // Extended or replaced: in the map, where the client's were.
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.9");
        assert!(valid_traceparent(h["traceparent"].as_bytes()));
        // New (the client's forged copy left out of the head): appended, in order.
        assert_eq!(
            lines,
            [
                "x-forwarded-proto: http",
                "x-forwarded-host: api.example.com",
                "x-scp-request-id: rid",
                "x-scp-api-id: api1",
                "x-scp-stage: prod",
                "x-scp-api-key-id: k01",
            ]
        );
        // As written: each name once, the forged value nowhere.
        let written = written_head(h, fields);
        for line in &lines {
            let (name, _) = line.split_once(": ").unwrap();
            let n = written
                .iter()
                .filter(|l| l.starts_with(&format!("{name}: ")))
                .count();
            assert_eq!(n, 1, "{name} written once: {written:?}");
        }
        assert!(!written.iter().any(|l| l.contains("forged")), "{written:?}");

        // Nothing in the map: every added header is appended, a new traceparent last.
        let mut h = HeaderMap::new();
        let lines = rewrite_appending(&mut h, &info(&rid, &host));
        assert!(h.is_empty(), "{h:?}");
        assert_eq!(lines[0], "x-forwarded-for: 203.0.113.9");
        assert_eq!(lines.len(), 8, "{lines:?}");
        let tp = lines[7].strip_prefix("traceparent: ").unwrap();
        assert!(valid_traceparent(tp.as_bytes()), "{tp}");
    }

    #[test]
    fn a_made_request_id_reaches_the_map_or_the_appended_fields_as_made() {
        let rid = crate::request_id::next_id();
        assert_eq!(rid.as_str().len(), 32);
        let host = HeaderValue::from_static("api.example.com");
        let mut h = HeaderMap::new();
        let lines = rewrite_appending(&mut h, &info(&rid, &host));
        let want = format!("x-scp-request-id: {}", rid.as_str());
        assert_eq!(lines.iter().filter(|l| **l == want).count(), 1, "{lines:?}");
        let mut h = HeaderMap::new();
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Map);
        assert_eq!(h["x-scp-request-id"], rid.as_str());
        assert!(valid_traceparent(h["traceparent"].as_bytes()));
    }

    #[test]
    fn host_becomes_the_backends_and_the_clients_is_forwarded_host() {
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("api.example.com");
        let backend = HeaderValue::from_static("orders.internal:8080");
        let mut forwarded = info(&rid, &host);
        forwarded.backend_host = Some(&backend);
        for added in [false, true] {
            // The client's Host, replaced in place; it is the X-Forwarded-Host.
            let mut h = HeaderMap::new();
            h.insert("accept", HeaderValue::from_static("*/*"));
            h.insert("host", host.clone());
            let lines = if added {
                rewrite_appending(&mut h, &forwarded)
            } else {
                rewrite_request_headers(&mut h, &forwarded, Added::Map);
                Vec::new()
            };
            assert_eq!(h.get_all("host").iter().count(), 1);
            assert_eq!(h["host"], "orders.internal:8080");
            let xfh = h
                .get("x-forwarded-host")
                .map(|v| v.to_str().unwrap().to_owned());
            let xfh = xfh.or_else(|| {
                lines
                    .iter()
                    .find_map(|l| l.strip_prefix("x-forwarded-host: ").map(str::to_owned))
            });
            assert_eq!(xfh.as_deref(), Some("api.example.com"));
            // No Host from the client: the backend's goes into the map, never appended.
            let mut h = HeaderMap::new();
            let lines = if added {
                rewrite_appending(&mut h, &forwarded)
            } else {
                rewrite_request_headers(&mut h, &forwarded, Added::Map);
                Vec::new()
            };
            assert_eq!(h["host"], "orders.internal:8080");
            assert!(lines.iter().all(|l| !l.starts_with("host:")), "{lines:?}");
        }
        // A function's event: the client's Host goes, nothing replaces it here.
        let mut h = HeaderMap::new();
        h.insert("host", host.clone());
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Map);
        assert!(!h.contains_key("host"));
        assert_eq!(h["x-forwarded-host"], "api.example.com");
    }

    #[test]
    fn traceparent_passes_through() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(tp));
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("h");
        rewrite_request_headers(&mut h, &info(&rid, &host), Added::Map);
        assert_eq!(h["traceparent"], tp);
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
    }

    #[test]
    fn the_tracing_traceparent_is_the_only_one() {
        let ours =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01");
        let rid = RequestId::Kept(HeaderValue::from_static("rid"));
        let host = HeaderValue::from_static("h");
        let mut traced = info(&rid, &host);
        traced.traceparent = Some(&ours);
        for client in [
            None,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("garbage"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(tp) = client {
                h.append("traceparent", HeaderValue::from_static(tp));
            }
            rewrite_request_headers(&mut h, &traced, Added::Map);
            let all: Vec<_> = h.get_all("traceparent").iter().collect();
            assert_eq!(all, [&ours], "client sent {client:?}");
        }
    }
}
