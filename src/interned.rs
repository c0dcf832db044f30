//! Header values that snapshots hold and requests copy (`x-scp-api-id`, `x-scp-stage`, the
//! backend `Host`, key ids, CORS and `RateLimit-Limit` values), made from interned
//! `'static` text.
//!
//! A `HeaderValue` made at run time shares its bytes through a reference count: each copy
//! a request makes (into the backend request or the response) is an atomic increment and,
//! when the request ends, an atomic decrement, on a count every worker writes (one cache
//! line bounced between the cores for each value a request carries). A value made from
//! `'static` text is copied without touching any count. The text is kept for the life of
//! the process, once per distinct string (a reload that keeps its names adds nothing), up
//! to [`BUDGET`] bytes in all; past that, values are made the usual way.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use http::HeaderValue;

/// Most bytes of text kept for the process's life (distinct strings, summed).
pub const BUDGET: usize = 4 << 20;

struct Interned {
    texts: HashSet<&'static str>,
    bytes: usize,
}

static INTERNED: Mutex<Option<Interned>> = Mutex::new(None);

/// `text` as a header value (`None` where `HeaderValue::from_str` refuses it); from
/// interned `'static` text while the budget lasts, when the text is ASCII (what
/// `HeaderValue::from_static` takes: visible ASCII, spaces, tabs).
pub fn header_value(text: &str) -> Option<HeaderValue> {
    let value = HeaderValue::from_str(text).ok()?;
    if !text
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        return Some(value);
    }
    let mut guard = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    let interned = guard.get_or_insert_with(|| Interned {
        texts: HashSet::new(),
        bytes: 0,
    });
    let kept: &'static str = match interned.texts.get(text) {
        Some(kept) => kept,
        None if interned.bytes + text.len() <= BUDGET => {
            let kept: &'static str = Box::leak(text.into());
            interned.texts.insert(kept);
            interned.bytes += kept.len();
            kept
        }
        None => return Some(value),
    };
    // ASCII that `from_str` accepted: `from_static` accepts it too.
    Some(HeaderValue::from_static(kept))
}

/// The interned text, in bytes.
pub fn bytes() -> usize {
    INTERNED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or(0, |i| i.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_interned_once_and_invalid_text_is_refused() {
        let a = header_value("api-interned-test-0001").unwrap();
        let after_first = bytes();
        let b = header_value("api-interned-test-0001").unwrap();
        assert_eq!(bytes(), after_first, "the same text is kept once");
        assert_eq!(a, "api-interned-test-0001");
        assert_eq!(a, b);
        assert!(header_value("bad\nvalue").is_none());
        // Accepted as `from_str` accepts it (obs-text), not interned.
        let before = bytes();
        assert_eq!(
            header_value("caf\u{e9}").unwrap().as_bytes(),
            "caf\u{e9}".as_bytes()
        );
        assert_eq!(bytes(), before);
        assert_eq!(header_value("a\tb c").unwrap(), "a\tb c");
    }
}
