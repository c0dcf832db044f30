// scp-gateway patch (see PATCHED.md): the whole file.

use http::header::{HeaderName, HeaderValue};

/// Header fields an HTTP/1 client writes after the request's [`http::HeaderMap`], in the
/// order they were pushed, without being put in the map.
///
/// A proxy adds the same few fields to every request it forwards (forwarding headers, a
/// request id); putting each in the map hashes its name and may grow the map, and writing
/// it walks the map again. Fields pushed here are written out once, as they were pushed:
/// the name as given (lowercase, as every [`HeaderName`] is; title-case and original-case
/// settings of the connection do not apply to them), `": "`, the value, CRLF. A name and a
/// value are valid by construction (unless made with `from_maybe_shared_unchecked`, whose
/// caller vouches for it, as for the map's own fields), so the bytes are well-formed fields.
///
/// They reach the connection through its transport, not the request: an HTTP/1 client
/// connection asks its transport for them ([`crate::rt::Write::take_appended_headers`]) as
/// it encodes each request head, so the caller that owns the transport puts there the
/// fields of the request it sends next on it (a request extension would cost http's
/// extension map, its table and a box per request).
///
/// The caller keeps the map and these fields apart: a name pushed here should not also be
/// in the map (nothing merges or checks them). Only HTTP/1 client connections ask for
/// them; HTTP/2 connections and servers never do, so a request that may go out over
/// HTTP/2 must carry its fields in the map.
#[derive(Clone, Debug, Default)]
pub struct AppendedHeaders {
    bytes: Vec<u8>,
}

impl AppendedHeaders {
    /// Room for `bytes` bytes of fields (names, values, and 4 bytes per field).
    pub fn with_capacity(bytes: usize) -> Self {
        AppendedHeaders {
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Appends one field.
    ///
    /// The field is written with one check for room, not one per part: a proxy pushes
    /// several fields on every request.
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        let len = name.len() + 2 + value.len() + 2;
        let b = &mut self.bytes;
        b.reserve(len);
        // SAFETY: `reserve` made room for `len` more bytes after `b.len()`; the four parts
        // written below are exactly `len` bytes, in that room (none overlaps the sources,
        // which `b` does not own), and only then is the length raised to cover them.
        unsafe {
            let mut at = b.as_mut_ptr().add(b.len());
            std::ptr::copy_nonoverlapping(name.as_ptr(), at, name.len());
            at = at.add(name.len());
            at.cast::<[u8; 2]>().write_unaligned(*b": ");
            at = at.add(2);
            std::ptr::copy_nonoverlapping(value.as_ptr(), at, value.len());
            at = at.add(value.len());
            at.cast::<[u8; 2]>().write_unaligned(*b"\r\n");
            b.set_len(b.len() + len);
        }
    }

    /// No field was pushed.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The fields as they will be written: `name: value\r\n` each.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}
