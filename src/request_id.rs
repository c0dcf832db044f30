//! `x-scp-request-id` values and other per-request ids, made by each worker on its own:
//! a per-process random prefix, the worker's index and the worker's own counter, 32 hex
//! digits. Unique within a process by construction and across a fleet with overwhelming
//! probability; no shared counter, no lock, no syscall.
//!
//! Header values are cut from a buffer the worker fills for many requests at once, so that
//! a request's id costs no allocation of its own.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use hyper::ext::AppendedHeaders;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

static PREFIX: OnceLock<u64> = OnceLock::new();

/// Bytes of header values cut from one buffer before the next is allocated.
const CHUNK: usize = 4096;

thread_local! {
    static COUNTER: Cell<u64> = const { Cell::new(0) };
    /// The first half of this thread's ids in hex, and the worker index it was made for.
    static HEAD: Cell<(Option<u64>, [u8; 16])> = const { Cell::new((None, [0; 16])) };
    static CHUNK_BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_entropy());
}

/// `bytes` cut from the worker's buffer (no allocation of its own).
fn cut(bytes: &[u8]) -> Bytes {
    CHUNK_BUF.with_borrow_mut(|buf| {
        if buf.capacity() - buf.len() < bytes.len() {
            *buf = BytesMut::with_capacity(CHUNK.max(bytes.len()));
        }
        buf.extend_from_slice(bytes);
        buf.split().freeze()
    })
}

/// A header value holding `token`: only ASCII digits, lower-case hex letters and `-`,
/// which every caller (all in this module) writes itself from [`HEX_PAIRS`], `itoa` or a
/// fixed template. Such a value is not checked again byte by byte (`HeaderValue`'s check
/// of a request id and a `traceparent`, made on every request, cost ~200 instructions).
fn token_value(token: &[u8]) -> HeaderValue {
    debug_assert!(token
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b) || *b == b'-'));
    // SAFETY: a header value must not hold control characters (CR, LF, NUL, DEL); the
    // caller's bytes are digits, hex letters and `-` (see above), all visible ASCII.
    unsafe { HeaderValue::from_maybe_shared_unchecked(cut(token)) }
}

/// A decimal number as a header value, cut from the worker's buffer (no allocation of its
/// own).
pub fn number_value(n: u64) -> HeaderValue {
    let mut buf = itoa::Buffer::new();
    token_value(buf.format(n).as_bytes())
}

/// A decimal number as a field's value (the `RateLimit-*` fields of an answer): its digits
/// are written where the field goes, in an HTTP/1 head's appended fields, and a header
/// value is made of them only for a map. A header value cut from the worker's buffer, pushed
/// and dropped cost ~120 instructions per field; the digits pushed as they are, ~35.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Number(pub u64);

impl FieldValue for Number {
    fn to_value(&self) -> HeaderValue {
        number_value(self.0)
    }
    fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName) {
        let mut digits = itoa::Buffer::new();
        // SAFETY: ASCII digits are a valid field value.
        unsafe { fields.push_unchecked(name, digits.format(self.0).as_bytes()) }
    }
}

/// A W3C `traceparent` value, `00-<trace id>-<span id>-<flags>`, in lower-case hex: built
/// for every forwarded request (a new one when the client sent none), and `fmt` costs
/// several times more.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> HeaderValue {
    traceparent_token(trace_id, span_id, flags).to_value()
}

/// [`traceparent`] as a [`Token`]: bytes on the stack, for a field that may be written out
/// without a header value of its own.
pub fn traceparent_token(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> Token<55> {
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut v[3..35], trace_id);
    hex_into(&mut v[36..52], span_id);
    hex_into(&mut v[53..55], &[flags]);
    Token(v)
}

/// A value this module made: ASCII digits, lower-case hex letters and `-` only (the
/// invariant that lets it be written as a header field without a check), held on the
/// stack. A [`HeaderValue`] is made of it only where one is needed (an HTTP/2 answer's or
/// request's map, an error body): an HTTP/1 head takes its bytes as they are
/// ([`Token::push_to`]), which spares the per-request buffer cut, its reference count and
/// its drop (~120 instructions per value).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token<const N: usize>([u8; N]);

impl<const N: usize> Token<N> {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: digits, hex letters and `-` (the type's invariant): ASCII, so UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The value as a header value (cut from the worker's buffer).
    pub fn to_value(&self) -> HeaderValue {
        token_value(&self.0)
    }

    /// Appends the field `name: <this value>` to `fields`.
    pub fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName) {
        // SAFETY: digits, hex letters and `-` (the type's invariant) are visible ASCII, a
        // valid field value.
        unsafe { fields.push_unchecked(name, &self.0) }
    }
}

impl<const N: usize> std::fmt::Debug for Token<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value that is written either into a map (as a [`HeaderValue`] made for it) or into an
/// HTTP/1 head's appended fields (as its bytes): a [`Token`] or a [`RequestId`].
pub trait FieldValue {
    fn to_value(&self) -> HeaderValue;
    /// Appends the field `name: <this value>` to `fields`.
    fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName);
}

impl<const N: usize> FieldValue for Token<N> {
    fn to_value(&self) -> HeaderValue {
        Token::to_value(self)
    }
    fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName) {
        Token::push_to(self, fields, name)
    }
}

impl FieldValue for RequestId {
    fn to_value(&self) -> HeaderValue {
        RequestId::to_value(self)
    }
    fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName) {
        RequestId::push_to(self, fields, name)
    }
}

/// A request's `x-scp-request-id`: made by the worker, or kept from a trusted proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestId {
    Made(Token<32>),
    /// A trusted proxy's value (1 to 128 bytes, a valid header value).
    Kept(HeaderValue),
}

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Made(t) => t.as_bytes(),
            RequestId::Kept(v) => v.as_bytes(),
        }
    }

    /// The id as text (a kept value that is not visible ASCII reads as empty, as
    /// [`HeaderValue::to_str`] reads it).
    pub fn as_str(&self) -> &str {
        match self {
            RequestId::Made(t) => t.as_str(),
            RequestId::Kept(v) => v.to_str().unwrap_or(""),
        }
    }

    pub fn to_value(&self) -> HeaderValue {
        match self {
            RequestId::Made(t) => t.to_value(),
            RequestId::Kept(v) => v.clone(),
        }
    }

    /// Appends the field `name: <this id>` to `fields`.
    pub fn push_to(&self, fields: &mut AppendedHeaders, name: &HeaderName) {
        match self {
            RequestId::Made(t) => t.push_to(fields, name),
            RequestId::Kept(v) => fields.push(name, v),
        }
    }
}

/// The next request id of this thread, as a header value.
pub fn next() -> HeaderValue {
    next_id().to_value()
}

/// The next request id of this thread.
pub fn next_id() -> RequestId {
    let n = COUNTER.with(|c| {
        let n = c.get();
        c.set(n.wrapping_add(1));
        n
    });
    let worker = crate::worker::index() as u64;
    let mut buf = [0u8; 32];
    // 48 random bits and 16 bits of worker index (hex made once per thread), then 64 bits
    // of counter.
    let head = HEAD.get();
    if head.0 == Some(worker) {
        buf[..16].copy_from_slice(&head.1);
    } else {
        let prefix = *PREFIX.get_or_init(rand::random::<u64>);
        hex_into(
            &mut buf[..16],
            &((prefix & !0xFFFF) | (worker & 0xFFFF)).to_be_bytes(),
        );
        HEAD.set((Some(worker), buf[..16].try_into().unwrap_or_default()));
    }
    hex_into(&mut buf[16..], &n.to_be_bytes());
    RequestId::Made(Token(buf))
}

/// 128 and 64 random bits from the worker's fast generator (trace and span ids).
pub fn random_ids() -> (u128, u64) {
    RNG.with_borrow_mut(|r| {
        let hi = u128::from(r.next_u64()) << 64;
        (hi | u128::from(r.next_u64()), r.next_u64())
    })
}

/// Lower-case hex of `bytes` into `out` (two digits per byte; `out` at least twice as long).
/// A byte's two digits come from one table entry: ids are hex-encoded on every request.
pub fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[*b as usize]);
    }
}

/// The two lower-case hex digits of every byte value.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 15]];
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::{AppendedHeaders, FieldValue, HeaderName, Number};

    #[test]
    fn unique_and_hex() {
        let a = super::next();
        let b = super::next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| super::next()).collect();
        assert_eq!(
            many.len(),
            10_000,
            "ids cut from shared buffers stay distinct"
        );
        // One process prefix, this thread's worker index, then the counter.
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert_eq!(a[..16], b[..16]);
        let (x, y) = (
            u64::from_str_radix(&a[16..], 16).unwrap(),
            u64::from_str_radix(&b[16..], 16).unwrap(),
        );
        assert_eq!(y, x + 1);
    }

    #[test]
    fn traceparent_and_number_values() {
        let trace: [u8; 16] = std::array::from_fn(|i| (i as u8) * 17);
        let span: [u8; 8] = std::array::from_fn(|i| 0xf0 | i as u8);
        let v = super::traceparent(&trace, &span, 0x01);
        assert_eq!(
            v.to_str().unwrap(),
            "00-00112233445566778899aabbccddeeff-f0f1f2f3f4f5f6f7-01"
        );
        assert_eq!(super::traceparent(&[0; 16], &[0; 8], 0).len(), 55);
        assert_eq!(super::number_value(0), "0");
        assert_eq!(super::number_value(u64::MAX), "18446744073709551615");
        let name = HeaderName::from_static("ratelimit-reset");
        for n in [30, 29, 0, u64::MAX] {
            assert_eq!(Number(n).to_value(), n.to_string().as_str());
            let mut fields = AppendedHeaders::with_capacity(0);
            Number(n).push_to(&mut fields, &name);
            assert_eq!(
                fields.as_bytes(),
                format!("ratelimit-reset: {n}\r\n").as_bytes()
            );
        }
    }

    #[test]
    fn hex_of_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0; 512];
        super::hex_into(&mut out, &bytes);
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
}
