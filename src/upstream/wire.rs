//! What a backend connection's socket shares with the requests sent on it: the count of
//! bytes it received (did any byte of an answer arrive?) and, while a request that may
//! have to be sent again is written, the bytes written for it.
//!
//! Why the written bytes rather than a copy of the request: hyper's client takes the
//! request by value and does not give it back once it has written it, so a request that a
//! reused connection failed to answer (the backend closed it as the request went out) can
//! only be sent again from something kept aside. Copying every header field of every
//! idempotent request before it is sent cost ~900 instructions per request (the
//! contract's own headers are most of the fields); keeping the bytes the socket is given
//! anyway is one copy of the encoded head (a few hundred bytes, one `memcpy`), and the
//! head is parsed back only on the rare retry.
//!
//! It also carries, from the request to the socket, the header fields the gateway adds to
//! a request for a plain `http` backend ([`AppendedHeaders`]): hyper's HTTP/1 client takes
//! them from the connection's transport as it writes the request's head (see
//! `vendor/hyper/PATCHED.md`), after the header map, unhashed.
//!
//! The connection's driver task (its socket) writes here; the request's task reads. Both
//! run on the worker that opened the connection, so the locks are never contended; they
//! are there because the types must be `Sync`.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version};
use hyper::ext::AppendedHeaders;

use crate::body::ForwardBody;

/// Most bytes kept for one request (a head larger than this is not sent again).
const WRITTEN_MAX: usize = 64 * 1024;

/// Shared by a backend connection's socket and the requests sent on it (see the module
/// docs).
#[derive(Debug, Default)]
pub struct Wire {
    received: AtomicU64,
    /// The request being written may be sent again: keep what is written.
    armed: AtomicBool,
    written: Mutex<Vec<u8>>,
    /// The fields to append to the next request head written on the connection.
    appended: Mutex<Option<AppendedHeaders>>,
}

impl Wire {
    /// Bytes received so far on the connection.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Counts `n` bytes read from the socket (called by the connection's socket only). The
    /// first byte of an answer ends the keeping of the request's bytes: once an answer
    /// arrives the request is never sent again.
    pub fn add_received(&self, n: usize) {
        // One writer: a plain load and store, no read-modify-write.
        let c = self.received.load(Ordering::Relaxed);
        self.received.store(c + n as u64, Ordering::Relaxed);
        if self.armed.load(Ordering::Relaxed) {
            self.armed.store(false, Ordering::Relaxed);
        }
    }

    /// Keeps the bytes written from now on, until an answer's first byte (the next request
    /// to write on the connection), dropping what was kept before.
    pub fn arm(&self) {
        let mut w = self.lock();
        w.clear();
        self.armed.store(true, Ordering::Release);
    }

    /// Keeps the first `n` bytes of `bufs` if [`arm`](Self::arm)ed (called by the
    /// connection's socket for what it wrote, or for what it failed to write: a request
    /// whose write failed was not sent whole and may go again).
    pub fn wrote(&self, bufs: &[IoSlice<'_>], mut n: usize) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.lock();
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(b.len());
            if w.len() + take > WRITTEN_MAX {
                // Too large to keep: nothing is kept, and the request cannot go again.
                w.clear();
                self.armed.store(false, Ordering::Relaxed);
                return;
            }
            w.extend_from_slice(&b[..take]);
            n -= take;
        }
    }

    /// What was kept since the last [`arm`](Self::arm), and no longer keeps anything.
    pub fn take_written(&self) -> Vec<u8> {
        let mut w = self.lock();
        self.armed.store(false, Ordering::Relaxed);
        std::mem::take(&mut *w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the fields the next request head written on the connection gets after its
    /// header map (the request about to be sent on it), replacing any left unwritten.
    pub fn set_appended(&self, fields: Option<AppendedHeaders>) {
        let mut a = self.appended.lock().unwrap_or_else(PoisonError::into_inner);
        *a = fields;
    }

    /// Takes the fields set for the next request head: the connection's socket, writing
    /// that head; or the request, taking back the fields of a request that was not written.
    pub fn take_appended(&self) -> Option<AppendedHeaders> {
        let mut a = self.appended.lock().unwrap_or_else(PoisonError::into_inner);
        a.take()
    }
}

/// The request whose head `written` holds (an HTTP/1.1 request line and header fields, as
/// hyper's client wrote them), with `body`; `None` if `written` does not hold a whole head.
/// Anything after the head (a body that was written too) is ignored: `body` is the body.
pub fn request_again(written: &[u8], body: Option<Bytes>) -> Option<Request<ForwardBody>> {
    // Each field is a line: their count bounds the fields (the request line is one more).
    let lines = memchr::memchr_iter(b'\n', written).count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut head = httparse::Request::new(&mut fields);
    if !matches!(head.parse(written), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut req = Request::new(ForwardBody::Full(body));
    *req.method_mut() = Method::from_bytes(head.method?.as_bytes()).ok()?;
    *req.uri_mut() = Uri::try_from(head.path?).ok()?;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    for f in head.headers.iter() {
        h.append(
            HeaderName::from_bytes(f.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(f.value).ok()?,
        );
    }
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices<'a>(parts: &'a [&'a [u8]]) -> Vec<IoSlice<'a>> {
        parts.iter().map(|p| IoSlice::new(p)).collect()
    }

    #[test]
    fn keeps_only_an_armed_requests_bytes_until_an_answer_arrives() {
        let w = Wire::default();
        w.wrote(&slices(&[b"GET /a HTTP/1.1\r\n\r\n"]), 19);
        assert!(w.take_written().is_empty(), "not armed: nothing kept");
        w.arm();
        // A partial write keeps what went out; the rest comes with the next write.
        w.wrote(&slices(&[b"GET /b HTTP/1.1\r\n", b"host: x\r\n\r\n"]), 20);
        w.wrote(&slices(&[b"t: x\r\n\r\n"]), 8);
        w.add_received(5);
        assert_eq!(w.received(), 5);
        w.wrote(&slices(&[b"POST /c HTTP/1.1\r\n\r\n"]), 20);
        assert_eq!(
            w.take_written(),
            b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n",
            "kept until the answer's first byte"
        );
        w.arm();
        w.wrote(&slices(&[b"GET /d HTTP/1.1\r\n\r\n"]), 19);
        assert_eq!(
            w.take_written(),
            b"GET /d HTTP/1.1\r\n\r\n",
            "arm drops the last"
        );
    }

    #[test]
    fn a_head_too_large_is_not_kept() {
        let w = Wire::default();
        w.arm();
        let big = vec![b'a'; WRITTEN_MAX];
        w.wrote(&slices(&[b"GET / HTTP/1.1\r\n"]), 16);
        w.wrote(&slices(&[&big]), big.len());
        w.wrote(&slices(&[b"\r\n\r\n"]), 4);
        assert!(w.take_written().is_empty());
    }

    #[test]
    fn a_written_head_reads_back_as_its_request() {
        let written = b"PUT /orders/7?q=a%20b HTTP/1.1\r\nhost: backend:8080\r\n\
            x-client: one\r\naccept: */*\r\nx-client: two\r\ncontent-length: 2\r\n\r\n{}";
        let req = request_again(written, Some(Bytes::from_static(b"{}"))).unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri(), "/orders/7?q=a%20b");
        assert_eq!(req.version(), Version::HTTP_11);
        let h = req.headers();
        assert_eq!(h["host"], "backend:8080");
        assert_eq!(
            h.get_all("x-client").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(h["content-length"], "2");
        assert!(matches!(req.body(), ForwardBody::Full(Some(b)) if b == "{}"));
        // Not a whole head: no request.
        assert!(request_again(b"GET / HTTP/1.1\r\nhost: x\r\n", None).is_none());
        assert!(request_again(b"", None).is_none());
        assert!(request_again(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", None).is_none());
    }
}
