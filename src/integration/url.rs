//! `endpoint_url` compiled once at snapshot load into literal parts and parameter slots, so
//! that building a backend URI per request is concatenation only.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::routing::Params;
use crate::snapshot::validate::placeholders;

/// Everything but RFC 3986 unreserved characters is encoded in a substituted parameter.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    /// Index into the route's parameters; greedy values keep their slashes.
    Param {
        index: usize,
        greedy: bool,
    },
}

/// Splits a URL into its origin (`scheme://authority`) and the rest (path and query).
pub fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find(['/', '?']) {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

/// The path and query of an `endpoint_url`; the origin is the backend's
/// ([`crate::upstream::Upstream`]), compiled separately.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    /// Path parts (no query).
    parts: Vec<Part>,
    /// The query the URL already has, without `?`.
    query: Option<Box<str>>,
    /// Length of the literal parts, to size the output buffer.
    literal_len: usize,
    /// The whole target when it has no placeholder, for requests without a query (built
    /// once; a clone shares its buffer).
    fixed: Option<http::Uri>,
}

impl UrlTemplate {
    /// Compiles the path and query of a validated `endpoint_url` against the route's
    /// parameter names (placeholders are allowed in the path only).
    pub fn compile(url: &str, param_names: &[impl AsRef<str>]) -> Result<Self, String> {
        let (_, url) = split_origin(url);
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q.into())),
            None => (url, None),
        };
        let mut parts = Vec::new();
        let mut at = 0;
        for (name, _, range) in placeholders(base)? {
            if range.start > at {
                parts.push(Part::Literal(base[at..range.start].into()));
            }
            let index = param_names
                .iter()
                .position(|p| p.as_ref() == name)
                .ok_or_else(|| format!("placeholder {{{name}}} names no path parameter"))?;
            let greedy = base[range.clone()].ends_with("+}");
            parts.push(Part::Param { index, greedy });
            at = range.end;
        }
        if at < base.len() {
            parts.push(Part::Literal(base[at..].into()));
        }
        if base.is_empty() {
            parts.push(Part::Literal("/".into()));
        }
        let literal_len = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.len(),
                Part::Param { .. } => 0,
            })
            .sum();
        let fixed = match parts.as_slice() {
            [Part::Literal(l)] => {
                let target = match &query {
                    Some(q) => format!("{l}?{q}"),
                    None => l.to_string(),
                };
                http::Uri::try_from(target).ok()
            }
            _ => None,
        };
        Ok(Self {
            parts,
            query,
            literal_len,
            fixed,
        })
    }

    /// The backend request target (origin-form) for one request: parameters substituted
    /// (percent-encoded), the client's raw query appended to the URL's own.
    pub fn render(
        &self,
        path: &str,
        params: &Params,
        client_query: Option<&str>,
    ) -> Result<http::Uri, http::uri::InvalidUri> {
        if let (Some(fixed), None | Some("")) = (&self.fixed, client_query) {
            return Ok(fixed.clone());
        }
        let mut out = String::with_capacity(
            self.literal_len + path.len() + client_query.map_or(0, str::len) + 8,
        );
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Param { index, greedy } => {
                    let value = params.get(path, *index).unwrap_or("");
                    if *greedy {
                        for (i, seg) in value.split('/').enumerate() {
                            if i > 0 {
                                out.push('/');
                            }
                            push_encoded(&mut out, seg);
                        }
                    } else {
                        push_encoded(&mut out, value);
                    }
                }
            }
        }
        let client_query = client_query.filter(|q| !q.is_empty());
        match (&self.query, client_query) {
            (Some(q), Some(c)) => {
                out.push('?');
                out.push_str(q);
                out.push('&');
                out.push_str(c);
            }
            (Some(q), None) => {
                out.push('?');
                out.push_str(q);
            }
            (None, Some(c)) => {
                out.push('?');
                out.push_str(c);
            }
            (None, None) => {}
        }
        http::Uri::try_from(out)
    }
}

/// Appends one segment percent-encoded. The matched path still carries the client's escapes
/// for reserved characters, so it is decoded first and encoded once: no double encoding.
fn push_encoded(out: &mut String, seg: &str) {
    if seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        out.push_str(seg);
        return;
    }
    let decoded = percent_decode_str(seg).decode_utf8_lossy();
    out.extend(utf8_percent_encode(&decoded, SEGMENT));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{MethodTable, RouteTable};

    fn render(template: &str, route: &str, path: &str, q: Option<&str>) -> String {
        let mut t: RouteTable<()> = RouteTable::default();
        let id = t.insert(route, MethodTable::new([])).unwrap();
        let (_, params) = t.find(path).unwrap();
        let names = &t.route(id).param_names;
        UrlTemplate::compile(template, names)
            .unwrap()
            .render(path, &params, q)
            .unwrap()
            .to_string()
    }

    #[test]
    fn substitutes_and_merges_query() {
        assert_eq!(
            render(
                "http://b:9000/v1/orders/{order-id}?src=gw",
                "/orders/{order-id}",
                "/orders/42",
                Some("page=2")
            ),
            "/v1/orders/42?src=gw&page=2"
        );
        assert_eq!(
            render("http://b/x", "/orders", "/orders", Some("a=1")),
            "/x?a=1"
        );
        assert_eq!(render("/x?k=v", "/orders", "/orders", None), "/x?k=v");
    }

    #[test]
    fn origins() {
        assert_eq!(
            split_origin("http://b:9000/v1?x=1"),
            ("http://b:9000", "/v1?x=1")
        );
        assert_eq!(split_origin("https://b?x=1"), ("https://b", "?x=1"));
        assert_eq!(split_origin("http://[::1]:80"), ("http://[::1]:80", ""));
        assert_eq!(render("http://b", "/orders", "/orders", None), "/");
        assert_eq!(render("http://b?k=v", "/orders", "/orders", None), "/?k=v");
    }

    #[test]
    fn greedy_keeps_slashes_and_values_are_encoded() {
        assert_eq!(
            render(
                "http://b/static/{path+}",
                "/files/{path+}",
                "/files/a/b%20c/d",
                None
            ),
            "/static/a/b%20c/d"
        );
        assert_eq!(
            render(
                "http://b/u/{user-id}",
                "/users/{user-id}",
                "/users/a;b=c",
                None
            ),
            "/u/a%3Bb%3Dc"
        );
        assert_eq!(
            render(
                "http://b/u/{user-id}",
                "/users/{user-id}",
                "/users/%C3%A9",
                None
            ),
            "/u/%C3%A9"
        );
    }
}
