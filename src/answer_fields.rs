//! Where the gateway's own fields of an answer go (`x-scp-request-id`, `RateLimit-*`, the
//! stage's CORS fields): into the answer's map, or, for an answer to an HTTP/1 request,
//! after the map, unhashed, through hyper's per-thread [`AppendedHeaders`] buffer (see
//! `vendor/hyper/PATCHED.md` and `pipeline::finish`).
//!
//! Each such field put in the map hashes its name (http's FNV, byte by byte), may grow the
//! map, and is walked again when the head is written: about 300 instructions per field,
//! on every answer. Pushed, a field is one copy into a buffer the thread keeps.
//!
//! Whoever adds fields through a sink first makes sure the map holds none of their names
//! (a backend's own copy is replaced, not repeated): an appended field is never merged
//! with the map's, and a map sink appends rather than inserts.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::ext::AppendedHeaders;

use crate::request_id::FieldValue;

/// Takes the gateway's fields of one answer.
pub trait FieldSink {
    /// Adds a field; its name is not in the answer's map (see the module docs).
    fn add(&mut self, name: &HeaderName, value: &HeaderValue);

    /// Adds a value the gateway made (the request id): a header value is made of it only
    /// for a map.
    fn add_made(&mut self, name: &HeaderName, value: &impl FieldValue);
}

/// An HTTP/2 answer (or any answer built for a test): its map.
impl FieldSink for HeaderMap {
    #[inline]
    fn add(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.append(name, value.clone());
    }

    #[inline]
    fn add_made(&mut self, name: &HeaderName, value: &impl FieldValue) {
        self.append(name, value.to_value());
    }
}

/// An HTTP/1 answer: after the map, as the server encodes its head.
impl FieldSink for AppendedHeaders {
    #[inline]
    fn add(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.push(name, value);
    }

    #[inline]
    fn add_made(&mut self, name: &HeaderName, value: &impl FieldValue) {
        value.push_to(self, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_id::RequestId;

    fn fill(sink: &mut impl FieldSink) {
        sink.add_made(
            &HeaderName::from_static("x-scp-request-id"),
            &RequestId::Kept(HeaderValue::from_static("r-1")),
        );
        sink.add(&http::header::VARY, &HeaderValue::from_static("Origin"));
    }

    #[test]
    fn a_map_sink_keeps_a_fields_earlier_values() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::VARY,
            HeaderValue::from_static("Accept-Encoding"),
        );
        fill(&mut h);
        assert_eq!(h["x-scp-request-id"], "r-1");
        let vary: Vec<_> = h.get_all(http::header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
    }

    #[test]
    fn a_made_request_id_reads_the_same_from_either_sink() {
        let name = HeaderName::from_static("x-scp-request-id");
        let id = crate::request_id::next_id();
        assert!(matches!(id, RequestId::Made(_)));
        let (mut h, mut a) = (HeaderMap::new(), AppendedHeaders::default());
        h.add_made(&name, &id);
        a.add_made(&name, &id);
        assert_eq!(h[&name], id.as_str());
        assert_eq!(
            a.as_bytes(),
            format!("x-scp-request-id: {}\r\n", id.as_str()).as_bytes()
        );
    }

    #[test]
    fn an_appended_sink_writes_the_fields_in_order() {
        let mut a = AppendedHeaders::default();
        fill(&mut a);
        assert_eq!(a.as_bytes(), b"x-scp-request-id: r-1\r\nvary: Origin\r\n");
    }
}
