//! Request path normalisation (`request-pipeline.md`, "Addressing"), done once per request:
//! percent-decoding of unreserved characters, removal of `.` and `..` segments, merging of
//! repeated slashes. The result is what is matched, authorised and forwarded.
//!
//! Choices where the contract is silent: a trailing slash is insignificant (`/prod/orders/`
//! is `/prod/orders`); a raw backslash or a malformed escape (`%zz`) is a 400 like `%5C`;
//! escapes of reserved characters are kept, with upper-case hex.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded slash")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path climbs above the stage root")]
    AboveRoot,
    #[error("the path is not a valid absolute path")]
    Malformed,
}

/// `/{stage}/{resource path}` after normalisation.
#[derive(Debug, Clone)]
pub struct NormalizedPath {
    buf: Buf,
    /// End of the stage segment in `buf` (0 when the path is `/`).
    stage_end: usize,
}

/// A normalised path: built, or the request's own path when it was already normal (no
/// copy: the URI's buffer is shared).
#[derive(Debug, Clone)]
enum Buf {
    Owned(String),
    Request(http::uri::PathAndQuery),
}

impl PartialEq for NormalizedPath {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() && self.stage_end == other.stage_end
    }
}

impl Eq for NormalizedPath {}

impl NormalizedPath {
    /// The first segment, naming the stage.
    pub fn stage(&self) -> Option<&str> {
        (self.stage_end > 1).then(|| &self.as_str()[1..self.stage_end])
    }

    /// The resource path after the stage, `/` for the stage root.
    pub fn resource(&self) -> &str {
        match &self.as_str()[self.stage_end.max(1)..] {
            "" => "/",
            r => r,
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.buf {
            Buf::Owned(s) => s,
            Buf::Request(pq) => pq.path(),
        }
    }
}

/// When normalising `p` would change nothing (no escape, no backslash, no byte that must
/// be escaped, no empty, `.` or `..` segment, no trailing slash): where its first segment
/// (the stage) ends, found in the same pass.
fn already_normal(p: &[u8]) -> Option<usize> {
    if p.first() != Some(&b'/') || (p.len() > 1 && p.last() == Some(&b'/')) {
        return None;
    }
    let mut seg_start = 1;
    let mut stage_end = None;
    for (i, &b) in p.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                let seg = &p[seg_start..i];
                if matches!(seg, b"" | b"." | b"..") {
                    return None;
                }
                stage_end.get_or_insert(i);
                seg_start = i + 1;
            }
            b'%' | b'\\' => return None,
            b if b >= 0x7F || b <= 0x20 => return None,
            _ => {}
        }
    }
    if matches!(&p[seg_start..], b"." | b"..") {
        return None;
    }
    Some(if p.len() > 1 {
        stage_end.unwrap_or(p.len())
    } else {
        0
    })
}

/// Normalises a request's path, sharing the request's buffer when it is already normal.
pub fn normalize_uri(uri: &http::Uri) -> Result<NormalizedPath, PathError> {
    if let Some(pq) = uri.path_and_query() {
        if let Some(stage_end) = already_normal(pq.path().as_bytes()) {
            return Ok(NormalizedPath {
                buf: Buf::Request(pq.clone()),
                stage_end,
            });
        }
    }
    normalize(uri.path())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_escaped(out: &mut String, v: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[(v >> 4) as usize] as char);
    out.push(HEX[(v & 15) as usize] as char);
}

pub fn normalize(raw: &str) -> Result<NormalizedPath, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::Malformed);
    }
    // 1. Decode unreserved escapes; refuse encoded separators.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::Malformed);
                };
                let v = h << 4 | l;
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    v if is_unreserved(v) => decoded.push(v as char),
                    v => push_escaped(&mut decoded, v),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            // Bytes a URI path may not hold raw (the http crate lets UTF-8 through): escaped,
            // so that the result is ASCII and normalising it again changes nothing.
            b if b >= 0x80 || b <= 0x20 || b == 0x7F => {
                push_escaped(&mut decoded, b);
                i += 1;
            }
            _ => {
                decoded.push(b as char);
                i += 1;
            }
        }
    }
    // 2. Resolve dot segments and empty segments; `..` may not pop the stage segment.
    let mut segments: Vec<&str> = Vec::with_capacity(8);
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.len() <= 1 {
                    return Err(PathError::AboveRoot);
                }
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut buf = String::with_capacity(decoded.len());
    for s in &segments {
        buf.push('/');
        buf.push_str(s);
    }
    let stage_end = segments.first().map_or(0, |s| 1 + s.len());
    if buf.is_empty() {
        buf.push('/');
    }
    Ok(NormalizedPath {
        buf: Buf::Owned(buf),
        stage_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<(Option<String>, String), PathError> {
        normalize(p).map(|x| (x.stage().map(str::to_owned), x.resource().to_owned()))
    }

    #[test]
    fn stage_and_resource() {
        assert_eq!(
            n("/prod/orders/42"),
            Ok((Some("prod".into()), "/orders/42".into()))
        );
        assert_eq!(n("/prod"), Ok((Some("prod".into()), "/".into())));
        assert_eq!(n("/prod/"), Ok((Some("prod".into()), "/".into())));
        assert_eq!(n("/"), Ok((None, "/".into())));
    }

    #[test]
    fn merges_slashes_and_dots() {
        assert_eq!(
            n("//prod///orders//42/"),
            Ok((Some("prod".into()), "/orders/42".into()))
        );
        assert_eq!(
            n("/prod/./orders/x/../42"),
            Ok((Some("prod".into()), "/orders/42".into()))
        );
        assert_eq!(
            n("/prod/orders/%2e%2e/users"),
            Ok((Some("prod".into()), "/users".into()))
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(n("/prod/../other/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/prod/a/../../x"), Err(PathError::AboveRoot));
        assert_eq!(n("/../x"), Err(PathError::AboveRoot));
        assert_eq!(n("/prod/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/prod/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/prod/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/prod/a%5Cb"), Err(PathError::Backslash));
        assert_eq!(n("/prod/a\\b"), Err(PathError::Backslash));
        assert_eq!(n("/prod/a%zz"), Err(PathError::Malformed));
        assert_eq!(n("/prod/a%4"), Err(PathError::Malformed));
        assert_eq!(n("*"), Err(PathError::Malformed));
    }

    #[test]
    fn decodes_unreserved_only() {
        assert_eq!(
            n("/prod/%6Frders/a%20b"),
            Ok((Some("prod".into()), "/orders/a%20b".into()))
        );
        assert_eq!(n("/prod/x%3bY"), Ok((Some("prod".into()), "/x%3BY".into())));
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_one() {
        for p in [
            "/",
            "/prod",
            "/prod/orders",
            "/prod/orders/42",
            "/prod/v1.2/file.txt",
            "/p/a.b/.c",
            "/prod/",
            "//prod",
            "/prod//x",
            "/prod/./x",
            "/prod/x/..",
            "/prod/..x",
            "/prod/x%41",
            "/prod/a b",
            "/prod/.",
            "/prod/...",
            "/prod/a\\b",
        ] {
            let uri: http::Uri = match p.parse() {
                Ok(u) => u,
                Err(_) => continue,
            };
            assert_eq!(normalize_uri(&uri), normalize(p), "{p}");
        }
    }

    /// Found by the `path` fuzz target: raw UTF-8 in a path was pushed byte by byte as
    /// Latin-1 characters, so the result differed from the input and from itself.
    #[test]
    fn raw_non_ascii_is_escaped_and_stable() {
        assert_eq!(
            n("/prod/fills/x/.n\u{45d}\0\u{1b}"),
            Ok((Some("prod".into()), "/fills/x/.n%D1%9D%00%1B".into()))
        );
        let once = normalize("/prod/caf\u{e9} x").unwrap();
        assert_eq!(once.resource(), "/caf%C3%A9%20x");
        assert_eq!(normalize(once.as_str()).unwrap(), once);
    }
}
