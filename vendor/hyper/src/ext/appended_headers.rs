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
/// them; HTTP/2 connections never do, so a request that may go out over HTTP/2 must carry
/// its fields in the map.
///
/// An HTTP/1 server writes such fields after a response's map too: those the service
/// pushed on its thread ([`AppendedHeaders::for_next_response`]) as its future finished,
/// see there.
#[derive(Clone, Debug, Default)]
pub struct AppendedHeaders {
    bytes: Vec<u8>,
    /// A field of the request's map was left out (see [`AppendedHeaders::leave_out`]).
    leaves_out: bool,
}

/// The value of a map field left out of the head: known by its address (a `static`'s is its
/// own; no value parsed from a message or made by a caller points into it).
static LEFT_OUT: &str = "(left out of the head by AppendedHeaders::leave_out)";

impl AppendedHeaders {
    /// Room for `bytes` bytes of fields (names, values, and 4 bytes per field).
    ///
    /// The buffer is one this thread kept from a dropped `AppendedHeaders` when there is
    /// one (see `SPARE`), else a new one.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = SPARE
            .try_with(|s| s.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        buf.reserve(bytes);
        AppendedHeaders {
            bytes: buf,
            leaves_out: false,
        }
    }

    /// Leaves a field of the request's map out of the head the HTTP/1 client writes, name
    /// and all: for a field that must not go out (a credential the proxy consumed, a header
    /// a client could forge), without removing it from the map. `value` is the field's
    /// value in the map (as `HeaderMap::iter_mut` lends it); it is replaced by a marker the
    /// client knows by its address as it writes the map (a pointer comparison per field,
    /// and only for a request that left one out). A removal from the map would hash the
    /// name, move the map's last entry into the gap and hash that one's name again. The
    /// field's old value is dropped here; its name stays in the map until the head is
    /// written, then is dropped with the rest of the map.
    ///
    /// `false`, and nothing is left out, for a name hyper reads in a request's map to frame
    /// the request or decide on its connection (`Connection`, `Content-Length`, `Expect`,
    /// `Host`, `TE`, `Transfer-Encoding`, `Upgrade`): such a field must be removed from the
    /// map, not only left unwritten.
    ///
    /// Only HTTP/1 client connections write the map this way: a request that may go out
    /// over HTTP/2, or whose map anything else reads afterwards, must have such fields
    /// removed (a field left out would be written with the marker as its value, or be read
    /// as one).
    pub fn leave_out(&mut self, name: &HeaderName, value: &mut HeaderValue) -> bool {
        use http::header::{
            CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TE, TRANSFER_ENCODING, UPGRADE,
        };
        const READ_BY_HYPER: [HeaderName; 7] = [
            CONNECTION,
            CONTENT_LENGTH,
            EXPECT,
            HOST,
            TE,
            TRANSFER_ENCODING,
            UPGRADE,
        ];
        if READ_BY_HYPER.contains(name) {
            return false;
        }
        *value = HeaderValue::from_static(LEFT_OUT);
        self.leaves_out = true;
        true
    }

    /// Whether [`AppendedHeaders::leave_out`] left any field out.
    #[cfg(feature = "client")]
    pub(crate) fn leaves_out(&self) -> bool {
        self.leaves_out
    }

    /// Whether `value` is the marker of a field left out.
    #[cfg(feature = "client")]
    pub(crate) fn is_left_out(value: &HeaderValue) -> bool {
        value.as_bytes().as_ptr() == LEFT_OUT.as_ptr()
    }

    /// Appends one field.
    ///
    /// The field is written with one check for room, not one per part: a proxy pushes
    /// several fields on every request.
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        // SAFETY: a `HeaderValue`'s bytes are a valid field value.
        unsafe { self.push_unchecked(name, value.as_bytes()) }
    }

    /// Appends one field whose value is given as bytes, for a value the caller makes
    /// itself on every request (a request id): a [`HeaderValue`] would hold it in a
    /// reference-counted buffer, made and dropped for each field, or check it byte by byte.
    ///
    /// # Safety
    ///
    /// `value` must be a valid field value, as [`HeaderValue::from_bytes`] would accept it:
    /// no CR, LF, NUL or other control byte but horizontal tab, and no DEL. The bytes are
    /// written as they are; a CR or LF among them would end the field, and the head, early.
    pub unsafe fn push_unchecked(&mut self, name: &HeaderName, value: &[u8]) {
        let name = name.as_str().as_bytes();
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

    /// No field was pushed and none left out: the list changes nothing in the head.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && !self.leaves_out
    }

    /// The fields as they will be written: `name: value\r\n` each.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives `f` the fields that the next HTTP/1 response head encoded on this thread ends
    /// with (after the response's map, before the blank line).
    ///
    /// An HTTP/1 server connection polls its service's future inside the connection's own
    /// poll and, in the same poll that sees the future ready, encodes the response's head;
    /// nothing else runs on the thread in between. So a service that pushes its answer's
    /// fields here as the last thing its future does, for a request that came over HTTP/1,
    /// has them written on that answer, without putting them in its map. Every server head
    /// encoded takes what is here (an answer whose head fails to encode drops it), so the
    /// fields never reach a later answer through the head they were meant for. The caller
    /// still makes sure that nothing set here outlives the poll it was set in: an answer
    /// that never reaches the encoder (the connection was closing, the service returned an
    /// error) leaves its fields behind, and [`AppendedHeaders::clear_next_response`] after
    /// each poll of the connection drops them. HTTP/2 streams run in tasks of their own and
    /// never look here: an HTTP/2 answer's fields go in its map.
    ///
    /// The buffer is the thread's and is kept (emptied, not freed) when a head takes its
    /// fields: pushing costs no allocation once it has grown to the largest answer's.
    #[cfg(feature = "server")]
    pub fn for_next_response<R>(f: impl FnOnce(&mut AppendedHeaders) -> R) -> R {
        NEXT_RESPONSE.with_borrow_mut(f)
    }

    /// Drops whatever was pushed for the next response head on this thread (see
    /// [`AppendedHeaders::for_next_response`]).
    #[cfg(feature = "server")]
    pub fn clear_next_response() {
        NEXT_RESPONSE.with_borrow_mut(|a| a.bytes.clear());
    }

    /// Writes the fields pushed for the next response head into `head`, an encoded head
    /// that ends with its blank line, and empties the thread's buffer.
    #[cfg(feature = "server")]
    pub(crate) fn write_next_response(head: &mut Vec<u8>) {
        NEXT_RESPONSE.with_borrow_mut(|a| {
            if a.bytes.is_empty() {
                return;
            }
            debug_assert!(head.ends_with(b"\r\n\r\n"));
            head.truncate(head.len() - 2);
            head.extend_from_slice(&a.bytes);
            head.extend_from_slice(b"\r\n");
            a.bytes.clear();
        });
    }
}

/// Buffers a thread keeps at most for its next `AppendedHeaders` (about the requests one
/// thread has between their fields being made and written, at a peak).
const SPARE_MAX: usize = 64;

/// Buffers larger than this (fields of unusual size) are freed, not kept.
const SPARE_BYTES_MAX: usize = 4096;

std::thread_local! {
    /// The emptied buffers of this thread's dropped `AppendedHeaders`, for its next ones
    /// ([`AppendedHeaders::with_capacity`]).
    ///
    /// A proxy makes one list of fields per request it forwards and the client connection
    /// drops it once written, usually on the same thread: a kept buffer makes the next list
    /// without an allocation. With many requests in flight, a fresh buffer for each would
    /// go past what the allocator keeps at hand per thread (glibc: 7 free blocks of a size)
    /// and take its slow path, on allocation and on free.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for AppendedHeaders {
    fn drop(&mut self) {
        let cap = self.bytes.capacity();
        if cap == 0 || cap > SPARE_BYTES_MAX {
            return;
        }
        let mut buf = std::mem::take(&mut self.bytes);
        buf.clear();
        // Not kept while the thread's spares are borrowed or already gone (a thread
        // ending): the buffer is then freed.
        let _ = SPARE.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if s.len() < SPARE_MAX {
                    s.push(buf);
                }
            }
        });
    }
}

#[cfg(feature = "server")]
std::thread_local! {
    /// The fields of the next HTTP/1 response head this thread encodes.
    static NEXT_RESPONSE: std::cell::RefCell<AppendedHeaders> =
        const { std::cell::RefCell::new(AppendedHeaders { bytes: Vec::new(), leaves_out: false }) };
}
