//! SCF (Cloud Functions) integration (`request-pipeline.md`, "SCF (function) integration"):
//! the request becomes a JSON event POSTed to the function's `invoke_url`; the function's
//! JSON answer becomes the client's response. Anything malformed is a 502.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::http::forward;
use super::{Outcome, Timing};
use crate::body::{ForwardBody, GatewayBody};
use crate::rejection::Rejection;
use crate::snapshot::compile::FunctionTarget;
use crate::timer::Deadline;
use crate::upstream::Settings;

/// Largest function answer accepted (→ 502 beyond).
pub const MAX_FUNCTION_RESPONSE: usize = 6 * 1024 * 1024;

/// What the event is made of.
pub struct EventInput<'a> {
    pub request_id: &'a str,
    pub api_id: &'a str,
    pub stage: &'a str,
    pub deployment_id: &'a str,
    pub resource_path: &'a str,
    pub path: &'a str,
    pub http_method: &'a str,
    /// Headers after the forwarding rules.
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub path_parameters: Vec<(&'a str, String)>,
    pub source_ip: IpAddr,
    pub api_key_id: Option<&'a str>,
    pub jwt_claims: Option<&'a Map<String, Value>>,
}

#[derive(Serialize)]
struct RequestContext<'a> {
    source_ip: String,
    api_key_id: Option<&'a str>,
    jwt_claims: Option<&'a Map<String, Value>>,
    request_time_epoch_ms: i64,
}

#[derive(Serialize)]
struct Event<'a> {
    version: &'static str,
    request_id: &'a str,
    api_id: &'a str,
    stage: &'a str,
    deployment_id: &'a str,
    resource_path: &'a str,
    path: &'a str,
    http_method: &'a str,
    headers: BTreeMap<String, String>,
    multi_value_headers: BTreeMap<String, Vec<String>>,
    query_string_parameters: BTreeMap<String, String>,
    multi_value_query_string_parameters: BTreeMap<String, Vec<String>>,
    path_parameters: BTreeMap<&'a str, String>,
    body: Option<String>,
    is_base64_encoded: bool,
    request_context: RequestContext<'a>,
}

/// Builds the event JSON for a request and its (complete) body.
pub fn event(input: &EventInput<'_>, body: &[u8]) -> Vec<u8> {
    let mut headers = BTreeMap::new();
    let mut multi_value_headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in input.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.insert(name.as_str().to_owned(), v.clone());
        multi_value_headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(v);
    }
    let mut query_string_parameters = BTreeMap::new();
    let mut multi_value_query_string_parameters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(q) = input.query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            query_string_parameters.insert(k.to_string(), v.to_string());
            multi_value_query_string_parameters
                .entry(k.into_owned())
                .or_default()
                .push(v.into_owned());
        }
    }
    let (body, is_base64_encoded) = if body.is_empty() {
        (None, false)
    } else {
        match std::str::from_utf8(body) {
            Ok(text) => (Some(text.to_owned()), false),
            Err(_) => (
                Some(base64::engine::general_purpose::STANDARD.encode(body)),
                true,
            ),
        }
    };
    let event = Event {
        version: "1.0",
        request_id: input.request_id,
        api_id: input.api_id,
        stage: input.stage,
        deployment_id: input.deployment_id,
        resource_path: input.resource_path,
        path: input.path,
        http_method: input.http_method,
        headers,
        multi_value_headers,
        query_string_parameters,
        multi_value_query_string_parameters,
        path_parameters: input
            .path_parameters
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        body,
        is_base64_encoded,
        request_context: RequestContext {
            source_ip: input.source_ip.to_string(),
            api_key_id: input.api_key_id,
            jwt_claims: input.jwt_claims,
            request_time_epoch_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos()
                / 1_000_000) as i64,
        },
    };
    serde_json::to_vec(&event).unwrap_or_default()
}

/// The function's answer.
#[derive(Deserialize)]
struct Answer {
    status_code: u16,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    multi_value_headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: Option<bool>,
}

/// Why a function answer is refused (logged; the client gets 502).
fn malformed(why: &str) -> Rejection {
    tracing::warn!(reason = why, "function answer refused");
    Rejection::IntegrationFailure
}

/// Turns the function's answer into the client's response.
pub fn response(raw: &[u8]) -> Result<Response<GatewayBody>, Rejection> {
    let a: Answer = serde_json::from_slice(raw).map_err(|_| malformed("not the expected JSON"))?;
    let status = match a.status_code {
        100..=599 => {
            StatusCode::from_u16(a.status_code).map_err(|_| malformed("bad status_code"))?
        }
        _ => return Err(malformed("status_code outside 100-599")),
    };
    let body = match (a.body, a.is_base64_encoded.unwrap_or(false)) {
        (None, _) => Bytes::new(),
        (Some(b), false) => Bytes::from(b),
        (Some(b), true) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|_| malformed("body is not base64"))?,
        ),
    };
    let mut resp = Response::new(GatewayBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let header = |k: &str, v: &str| -> Result<(HeaderName, HeaderValue), Rejection> {
        Ok((
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| malformed("bad header name"))?,
            HeaderValue::from_str(v).map_err(|_| malformed("bad header value"))?,
        ))
    };
    for (k, v) in a.headers.iter().flatten() {
        let (n, v) = header(k, v)?;
        h.insert(n, v);
    }
    // Multi-value headers win over single-valued ones of the same name.
    for (k, vs) in a.multi_value_headers.iter().flatten() {
        let mut first = true;
        for v in vs {
            let (n, v) = header(k, v)?;
            if first {
                h.insert(n, v);
                first = false;
            } else {
                h.append(n, v);
            }
        }
    }
    crate::hop_by_hop::strip(h);
    h.remove(http::header::CONTENT_LENGTH);
    Ok(resp)
}

/// Invokes the function: reads the request body (bounded), POSTs the event, maps the answer.
pub async fn invoke(
    settings: &Settings,
    function: &FunctionTarget,
    input: &EventInput<'_>,
    body: Incoming,
    max_body: u64,
    timeout: Duration,
) -> Outcome {
    let failed = |rejection, timing, retried| Outcome {
        result: Err(rejection),
        timing,
        retried,
    };
    let body =
        match http_body_util::Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return failed(Rejection::PayloadTooLarge, Timing::unsent(), false)
            }
            Err(_) => {
                return failed(
                    Rejection::BadRequest(crate::rejection::BadRequest::Body),
                    Timing::unsent(),
                    false,
                )
            }
        };
    let event = event(input, &body);
    let mut req = Request::new(ForwardBody::Full(Some(Bytes::from(event))));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = function.target.clone();
    let h = req.headers_mut();
    // The function endpoint's Host: `forward` sends a request's own (see `upstream::send`).
    h.insert(http::header::HOST, function.upstream.host_header.clone());
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let started = Instant::now();
    let mut deadline = Deadline::new(tokio::time::Instant::from_std(started) + timeout);
    let forwarded = match forward(
        settings,
        &function.upstream,
        req,
        None,
        timeout,
        std::convert::identity,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => return failed(e.rejection, e.timing, e.retried),
    };
    let retried = forwarded.retried;
    if forwarded.response.status() != StatusCode::OK {
        tracing::warn!(
            status = forwarded.response.status().as_u16(),
            "function endpoint answered non-200"
        );
        return failed(
            Rejection::IntegrationFailure,
            Timing::since(started),
            retried,
        );
    }
    let limited =
        http_body_util::Limited::new(forwarded.response.into_body(), MAX_FUNCTION_RESPONSE);
    let raw = match deadline.wait(limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return failed(
                malformed("answer over 6 MiB or cut short"),
                Timing::since(started),
                retried,
            )
        }
        Err(_) => {
            return failed(
                Rejection::IntegrationTimeout,
                Timing::since(started),
                retried,
            )
        }
    };
    Outcome {
        result: response(&raw),
        timing: Timing::since(started),
        retried,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = response(br#"{"status_code": 201, "headers": {"x-a": "1"}, "multi_value_headers": {"set-cookie": ["a=1", "b=2"]}, "body": "aGk=", "is_base64_encoded": true}"#).unwrap();
        assert_eq!(ok.status(), 201);
        assert_eq!(ok.headers()["x-a"], "1");
        assert_eq!(ok.headers().get_all("set-cookie").iter().count(), 2);
        for bad in [
            &br#"{"status_code": 99}"#[..],
            br#"{"status_code": 600}"#,
            br#"{"headers": {}}"#,
            br#"not json"#,
            br#"{"status_code": 200, "body": "***", "is_base64_encoded": true}"#,
            br#"{"status_code": 200, "headers": {"bad name": "x"}}"#,
        ] {
            assert!(response(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn event_fields() {
        let mut h = HeaderMap::new();
        h.append("x-m", HeaderValue::from_static("1"));
        h.append("x-m", HeaderValue::from_static("2"));
        let input = EventInput {
            request_id: "rid",
            api_id: "api",
            stage: "prod",
            deployment_id: "d1",
            resource_path: "/orders/{order-id}",
            path: "/orders/42",
            http_method: "POST",
            headers: &h,
            query: Some("page=1&page=2&q=a%20b"),
            path_parameters: vec![("order-id", "42".into())],
            source_ip: "203.0.113.9".parse().unwrap(),
            api_key_id: Some("k01"),
            jwt_claims: None,
        };
        let v: Value = serde_json::from_slice(&event(&input, b"hello")).unwrap();
        assert_eq!(v["headers"]["x-m"], "2");
        assert_eq!(
            v["multi_value_headers"]["x-m"],
            serde_json::json!(["1", "2"])
        );
        assert_eq!(v["query_string_parameters"]["page"], "2");
        assert_eq!(
            v["multi_value_query_string_parameters"]["page"],
            serde_json::json!(["1", "2"])
        );
        assert_eq!(v["query_string_parameters"]["q"], "a b");
        assert_eq!(v["body"], "hello");
        assert_eq!(v["is_base64_encoded"], false);
        assert_eq!(v["request_context"]["api_key_id"], "k01");
        let v: Value = serde_json::from_slice(&event(&input, &[0xff, 0xfe])).unwrap();
        assert_eq!(
            (v["body"].as_str(), v["is_base64_encoded"].as_bool()),
            (Some("//4="), Some(true))
        );
        let v: Value = serde_json::from_slice(&event(&input, b"")).unwrap();
        assert!(v["body"].is_null());
    }
}
