//! Hop-by-hop header fields (RFC 9110 §7.6.1): they describe one connection and are never
//! forwarded, in either direction. Shared by the backend connection layer (a backend
//! answer's, see [`crate::upstream`]) and the integration's request rules
//! ([`crate::integration::http`]).

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop fields every message loses, whatever its `Connection` names.
pub fn is_hop_by_hop(n: &str) -> bool {
    matches!(
        n,
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// The static of a hop-by-hop name that is not one of http's standard names (those are
/// plain values): a name that hyper parsed shares its bytes on its first clone, which
/// allocates, where a static is copied.
pub fn static_name(n: &str) -> Option<&'static HeaderName> {
    match n {
        "keep-alive" => Some(&KEEP_ALIVE),
        "proxy-connection" => Some(&PROXY_CONNECTION),
        _ => None,
    }
}

/// Header names listed in `Connection` (they go too); its usual options (`keep-alive`,
/// dropped anyway, and `close`) name no header that could be left.
pub fn connection_listed(h: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
}

/// Whether a `Connection` value may name header fields to remove: anything but one of the
/// usual options alone (`keep-alive`, which nginx and browsers send on every HTTP/1.1
/// message, or `close`), compared whole. Looked at in the pass over a message's fields,
/// so that the usual value costs no lookup of `Connection` and no split, trim and parse of
/// its elements (~350 instructions and a dozen small copies per message).
#[inline]
pub fn lists_names(connection: &HeaderValue) -> bool {
    let v = connection.as_bytes();
    !(is_spelled(v, b"keep-alive") || is_spelled(v, b"close"))
}

/// Whether `v` is `word` (lower-case letters and `-`) in any case: each byte OR 0x20 (which
/// lower-cases a letter) equals `word`'s, looked at all at once (`eq_ignore_ascii_case`
/// lower-cases and compares a byte at a time, ~8 instructions a byte, on every message of
/// a browser or of nginx). Exact for a header value: the only other bytes that OR 0x20 to
/// a letter or `-` are upper-case letters and CR, which no header value holds.
#[inline]
fn is_spelled<const N: usize>(v: &[u8], word: &[u8; N]) -> bool {
    let Ok(v) = <&[u8; N]>::try_from(v) else {
        return false;
    };
    v.iter()
        .zip(word)
        .fold(0, |diff, (b, w)| diff | ((b | 0x20) ^ w))
        == 0
}

/// Names to remove from a map once a pass over it is done (a map cannot lose entries while
/// it is iterated), each once (a pass over the values meets a repeated field's name again).
/// The first two are kept inline: nothing is allocated unless more go.
#[derive(Default)]
pub struct Removals {
    first: [Option<Cow<'static, HeaderName>>; 2],
    more: Vec<Cow<'static, HeaderName>>,
}

impl Removals {
    /// Adds `name`, unless it is there already, as `keep` makes it (a static where there is
    /// one, see [`static_name`]: called only for a name not yet there).
    #[inline]
    pub fn add(
        &mut self,
        name: &HeaderName,
        keep: impl FnOnce(&HeaderName) -> Cow<'static, HeaderName>,
    ) {
        for slot in &mut self.first {
            match slot {
                Some(n) if **n == *name => return,
                Some(_) => {}
                None => {
                    *slot = Some(keep(name));
                    return;
                }
            }
        }
        if !self.more.iter().any(|n| **n == *name) {
            self.more.push(keep(name));
        }
    }

    /// Adds the names `h`'s `Connection` lists (call it when one of its values
    /// [`lists_names`]).
    #[inline]
    pub fn add_connection_listed(&mut self, h: &HeaderMap) {
        self.more.extend(connection_listed(h).map(Cow::Owned));
    }

    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = &HeaderName> {
        self.first.iter().flatten().chain(&self.more).map(|n| &**n)
    }
}

/// A hop-by-hop name as [`Removals`] keeps it: its static, or a clone of a standard name.
fn hop_name(name: &HeaderName) -> Cow<'static, HeaderName> {
    static_name(name.as_str()).map_or_else(|| Cow::Owned(name.clone()), Cow::Borrowed)
}

/// Removes hop-by-hop headers, including those named by `Connection`, and gives back the
/// (first) `Keep-Alive` value it removed: a backend's announced idle time, read without a
/// lookup of its own.
///
/// One pass over the fields, then one removal per header actually present (a message
/// carries a handful of headers; probing seven absent names would hash each of them).
/// Nothing is allocated unless more than two names go, or `Connection` names others.
/// A message with none (most answers of an HTTP/1.1 backend that keeps its connections
/// alive by default) costs only a look at its names.
pub fn strip(h: &mut HeaderMap) -> Option<HeaderValue> {
    // Made at the first hop-by-hop field: a message with none costs the pass alone. One pass
    // over names and values rather than a look at the names first (which stops at the first
    // that goes) and then this: ~35 more for an answer without hop-by-hop fields (hyper's,
    // Go's), ~180 less for one with `Connection: keep-alive` (nginx's, Node's, Apache's).
    let mut gone: Option<Removals> = None;
    let (mut listed, mut plain_connection) = (false, false);
    for (name, value) in h.iter() {
        let s = name.as_str();
        if !is_hop_by_hop(s) {
            continue;
        }
        if s == "connection" && !lists_names(value) {
            // The usual `keep-alive` or `close` alone: removed by its name below, with no
            // list made for it (~100 instructions for most answers of nginx, Node, Apache).
            // The request rewrite (`integration::http`) does the same in its own pass: a
            // helper shared by both measured ~95 instructions a request more (session 35).
            plain_connection = true;
            continue;
        }
        listed |= s == "connection";
        gone.get_or_insert_default().add(name, hop_name);
    }
    if plain_connection && !listed {
        // A `Connection` that lists names is in `gone` (all its values go with it).
        h.remove(header::CONNECTION);
    }
    let mut gone = gone?;
    if listed {
        gone.add_connection_listed(h);
    }
    let mut keep_alive = None;
    for n in gone.iter() {
        let removed = h.remove(n);
        if n.as_str() == "keep-alive" && keep_alive.is_none() {
            keep_alive = removed;
        }
    }
    keep_alive
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_in_any_case_as_eq_ignore_ascii_case_reads_them() {
        // Every byte a header value may hold, at every place of either option.
        let bytes: Vec<u8> = (0u8..=255)
            .filter(|&b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
            .collect();
        for word in ["keep-alive", "close"] {
            for at in 0..word.len() {
                for &b in &bytes {
                    let mut v = word.as_bytes().to_vec();
                    v[at] = b;
                    let value = HeaderValue::from_bytes(&v).unwrap();
                    let expected = !(v.eq_ignore_ascii_case(b"keep-alive")
                        || v.eq_ignore_ascii_case(b"close"));
                    assert_eq!(lists_names(&value), expected, "{v:?}");
                }
            }
        }
        for v in [
            "",
            "keep-aliv",
            "keep-alive ",
            "closed",
            "Close",
            "KEEP-ALIVE",
        ] {
            let value = HeaderValue::from_static(v);
            assert_eq!(
                lists_names(&value),
                !(v.eq_ignore_ascii_case("keep-alive") || v.eq_ignore_ascii_case("close")),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_plain_keep_alive_or_close_names_no_header() {
        for value in ["keep-alive", "Keep-Alive", "close", "CLOSE"] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static(value));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            h.insert(
                "close",
                HeaderValue::from_static("an end-to-end field named close"),
            );
            let kept = strip(&mut h);
            assert_eq!(kept.unwrap(), "timeout=5", "{value}");
            assert!(!h.contains_key("connection") && !h.contains_key("keep-alive"));
            assert_eq!(h["content-type"], "text/plain", "{value}");
            assert!(h.contains_key("close"), "{value}: an option, not a name");
        }
        // `Connection` alone (nginx's answers): it goes, nothing else does.
        for values in [&["keep-alive"][..], &["close", "Keep-Alive"]] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("connection", HeaderValue::from_static(v));
            }
            h.insert("server", HeaderValue::from_static("nginx"));
            assert!(strip(&mut h).is_none());
            assert!(!h.contains_key("connection"), "{values:?}");
            assert_eq!(h.len(), 1);
        }
        // A list, or a second value naming a field, still removes that field.
        for values in [&["keep-alive, x-hop"][..], &["keep-alive", "x-hop"]] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("connection", HeaderValue::from_static(v));
            }
            h.insert("x-hop", HeaderValue::from_static("1"));
            strip(&mut h);
            assert!(!h.contains_key("x-hop"), "{values:?}");
        }
    }

    #[test]
    fn strips_every_hop_by_hop_field_and_what_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-hop, Keep-Alive"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5, max=100"));
        h.append("keep-alive", HeaderValue::from_static("timeout=9"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("trailer", HeaderValue::from_static("x-sum"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let keep_alive = strip(&mut h);
        assert_eq!(
            keep_alive,
            Some(HeaderValue::from_static("timeout=5, max=100"))
        );
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn no_keep_alive_no_value() {
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("date", HeaderValue::from_static("x"));
        assert_eq!(strip(&mut h), None);
        assert!(!h.contains_key("transfer-encoding"));
        assert!(h.contains_key("date"));
        // A message without any keeps every field.
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("2"));
        h.insert("date", HeaderValue::from_static("x"));
        h.append("date", HeaderValue::from_static("y"));
        assert_eq!(strip(&mut h), None);
        assert_eq!(h.len(), 3);
    }
}
