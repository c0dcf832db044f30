//! CORS per stage (`request-pipeline.md`, "CORS"): preflights answered by the gateway,
//! response headers on actual requests. Origins compare exactly; `null` never matches an
//! explicit list; backend CORS headers are replaced.

use http::header::{self, HeaderMap, HeaderValue};

use crate::answer_fields::FieldSink;
use crate::snapshot::model::Stage;

#[derive(Debug)]
pub struct CorsPolicy {
    any_origin: bool,
    origins: Vec<String>,
    methods: Vec<http::Method>,
    allow_methods: Option<HeaderValue>,
    /// Lowercase names, for the subset check of a preflight.
    allow_header_names: Vec<String>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
}

/// A preflight's verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    Allowed(HeaderMap),
    Rejected,
}

const CORS_RESPONSE_HEADERS: [header::HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

fn joined(items: &[String]) -> Option<HeaderValue> {
    let v: Vec<&str> = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    (!v.is_empty())
        .then(|| crate::interned::header_value(&v.join(", ")))
        .flatten()
}

impl CorsPolicy {
    /// The stage's policy, `None` when `cors_enabled` is off.
    pub fn compile(st: &Stage) -> Option<Self> {
        if !st.cors_enabled {
            return None;
        }
        let any_origin = st.allow_origins.iter().any(|o| o.trim() == "*");
        Some(Self {
            any_origin,
            origins: st
                .allow_origins
                .iter()
                .map(|o| o.trim().to_ascii_lowercase())
                .filter(|o| o != "*")
                .collect(),
            methods: st
                .allow_methods
                .iter()
                .filter_map(|m| http::Method::from_bytes(m.trim().as_bytes()).ok())
                .collect(),
            allow_methods: joined(&st.allow_methods),
            allow_header_names: st
                .allow_headers
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            allow_headers: joined(&st.allow_headers),
            expose_headers: joined(&st.expose_headers),
            max_age: st.max_age.map(HeaderValue::from),
            credentials: st.allow_credentials,
        })
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed: `origin`
    /// itself or `*`, borrowed (a clone of the request's value is a reference count taken
    /// and dropped on every answer to a browser).
    fn allow_origin<'o>(&self, origin: &'o HeaderValue) -> Option<&'o HeaderValue> {
        static ANY: HeaderValue = HeaderValue::from_static("*");
        // Compared as bytes: a listed origin is text, so a value equal to one is too (a
        // check of every byte first would cost more than the comparison).
        let o = origin.as_bytes();
        if o == b"null" {
            return None;
        }
        if self
            .origins
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(o))
        {
            return Some(origin);
        }
        // Any other origin is echoed only if it is visible ASCII.
        if self.any_origin && origin.to_str().is_ok() {
            return Some(if self.credentials { origin } else { &ANY });
        }
        None
    }

    /// Judges a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`).
    pub fn preflight(&self, req: &HeaderMap) -> Preflight {
        let (Some(origin), Some(method)) = (
            req.get(header::ORIGIN),
            req.get(header::ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            return Preflight::Rejected;
        };
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Preflight::Rejected;
        };
        let method_ok =
            http::Method::from_bytes(method.as_bytes()).is_ok_and(|m| self.methods.contains(&m));
        let headers_ok = req
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .all(|h| {
                self.allow_header_names
                    .iter()
                    .any(|a| a == "*" || a.eq_ignore_ascii_case(h))
            });
        if !method_ok || !headers_ok {
            return Preflight::Rejected;
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin.clone());
        if let Some(v) = &self.allow_methods {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &self.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        Preflight::Allowed(h)
    }

    /// Applies the actual-response headers to a map: backend CORS headers are removed, and
    /// an allowed origin gets the stage's ([`remove_backend_fields`], then
    /// [`CorsPolicy::add_fields`]).
    pub fn apply(&self, origin: Option<&HeaderValue>, resp: &mut HeaderMap) {
        if has_cors_field(resp) {
            remove_backend_fields(resp);
        }
        self.add_fields(origin, resp);
    }

    /// The stage's actual-response fields, for an allowed origin. The answer holds no CORS
    /// field by now ([`remove_backend_fields`]); `Vary: Origin` is added next to any
    /// `Vary` it has.
    pub fn add_fields(&self, origin: Option<&HeaderValue>, out: &mut impl FieldSink) {
        let Some(allow) = origin.and_then(|o| self.allow_origin(o)) else {
            return;
        };
        out.add(&header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if let Some(v) = &self.expose_headers {
            out.add(&header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
        if self.credentials {
            out.add(
                &header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                &HeaderValue::from_static("true"),
            );
        }
        out.add(&header::VARY, &HeaderValue::from_static("Origin"));
    }
}

/// True for a name of the CORS family (`access-control-*`): one such in an answer means
/// [`remove_backend_fields`] has work (one pass over the few names of an answer instead of
/// a probe per CORS name).
#[inline]
pub fn is_cors_name(name: &str) -> bool {
    name.starts_with("access-control-")
}

fn has_cors_field(resp: &HeaderMap) -> bool {
    resp.keys().any(|k| is_cors_name(k.as_str()))
}

/// Removes a backend's CORS response fields: on a CORS stage the stage's replace them.
pub fn remove_backend_fields(resp: &mut HeaderMap) {
    for h in &CORS_RESPONSE_HEADERS {
        resp.remove(h);
    }
}

/// True when a request is a CORS preflight.
pub fn is_preflight(method: &http::Method, h: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && h.contains_key(header::ORIGIN)
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> CorsPolicy {
        let st: Stage = serde_json::from_value(serde_json::json!({
            "name": "prod", "deployment_id": "d", "cors_enabled": true,
            "allow_origins": origins, "allow_methods": ["GET", "POST"],
            "allow_headers": ["Content-Type", "Authorization", "x-scp-apikey"],
            "expose_headers": ["x-scp-request-id"], "allow_credentials": credentials, "max_age": 3600
        }))
        .unwrap();
        CorsPolicy::compile(&st).unwrap()
    }

    fn pre(origin: &str, method: &str, headers: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            method.parse().unwrap(),
        );
        if let Some(v) = headers {
            h.insert(header::ACCESS_CONTROL_REQUEST_HEADERS, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn preflights() {
        let p = policy(&["https://app.example.com"], true);
        let Preflight::Allowed(h) = p.preflight(&pre(
            "https://app.example.com",
            "POST",
            Some("content-type, X-SCP-APIKEY"),
        )) else {
            panic!("allowed")
        };
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "3600");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[header::VARY], "Origin");
        for (o, m, hs) in [
            ("https://app.example.com.evil.com", "GET", None),
            ("null", "GET", None),
            ("http://app.example.com", "GET", None),
            ("https://app.example.com:8443", "GET", None),
            ("https://app.example.com", "DELETE", None),
            ("https://app.example.com", "GET", Some("x-other")),
        ] {
            assert_eq!(
                p.preflight(&pre(o, m, hs)),
                Preflight::Rejected,
                "{o} {m} {hs:?}"
            );
        }
    }

    #[test]
    fn wildcard_without_credentials_answers_star() {
        let p = policy(&["*"], false);
        let Preflight::Allowed(h) = p.preflight(&pre("https://x.test", "GET", None)) else {
            panic!()
        };
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[test]
    fn actual_responses() {
        let p = policy(&["https://app.example.com"], true);
        let mut resp = HeaderMap::new();
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            "https://backend.example".parse().unwrap(),
        );
        p.apply(Some(&"https://app.example.com".parse().unwrap()), &mut resp);
        assert_eq!(
            resp[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(
            resp[header::ACCESS_CONTROL_EXPOSE_HEADERS],
            "x-scp-request-id"
        );
        assert_eq!(resp[header::VARY], "Origin");
        let mut resp = HeaderMap::new();
        resp.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".parse().unwrap());
        p.apply(
            Some(&"https://app.example.com.evil.com".parse().unwrap()),
            &mut resp,
        );
        assert!(resp.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
}
