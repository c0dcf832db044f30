//! Typed rejections, one variant per reason in `request-pipeline.md`, and the one place that
//! turns a rejection into the spec's status, code, headers and JSON body.

use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::body::GatewayBody;
use crate::path::PathError;

/// Why a request is malformed (400). Messages never echo client input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    Path(PathError),
    /// Both `Content-Length` and `Transfer-Encoding`, or `Content-Length` more than once.
    AmbiguousLength,
    /// A transfer coding other than exactly `chunked`.
    TransferCoding,
    /// No usable `Host` / `:authority`.
    MissingHost,
    /// An absolute-form target whose authority differs from `Host`.
    HostMismatch,
    /// More than one `Host` header (RFC 9112 §3.2: always 400).
    RepeatedHost,
    MissingQuery(Box<str>),
    MissingHeader(Box<str>),
    /// The request body could not be read (the client went away or sent a broken body).
    Body,
}

/// Every error code of gateway-made responses, indexed by [`Rejection::code_index`].
pub const CODES: [&str; 23] = [
    "BAD_REQUEST",
    "PAYLOAD_TOO_LARGE",
    "HEADERS_TOO_LARGE",
    "URI_TOO_LONG",
    "API_NOT_FOUND",
    "STAGE_NOT_FOUND",
    "ENDPOINT_NOT_ALLOWED",
    "IP_NOT_ALLOWED",
    "RESOURCE_NOT_FOUND",
    "CORS_REJECTED",
    "METHOD_NOT_ALLOWED",
    "UNAUTHORIZED",
    "INVALID_TOKEN",
    "ACCESS_DENIED",
    "MISSING_API_KEY",
    "INVALID_API_KEY",
    "THROTTLED",
    "QUOTA_EXCEEDED",
    "INTEGRATION_FAILURE",
    "ENDPOINT_UNAVAILABLE",
    "INTEGRATION_TIMEOUT",
    "QUOTA_STORE_UNAVAILABLE",
    "INTERNAL_ERROR",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    BadRequest(BadRequest),
    PayloadTooLarge,
    HeadersTooLarge,
    UriTooLong,
    ApiNotFound,
    StageNotFound,
    EndpointNotAllowed,
    IpNotAllowed,
    ResourceNotFound,
    CorsRejected,
    MethodNotAllowed {
        allow: HeaderValue,
    },
    /// No token (401, `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// A token that does not verify (401, `error="invalid_token"`).
    InvalidToken,
    AccessDenied,
    MissingApiKey,
    InvalidApiKey,
    Throttled {
        retry_after_secs: u64,
    },
    QuotaExceeded {
        retry_after_secs: u64,
    },
    IntegrationFailure,
    EndpointUnavailable,
    IntegrationTimeout,
    QuotaStoreUnavailable,
    Internal,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::ApiNotFound | Rejection::StageNotFound | Rejection::ResourceNotFound => {
                StatusCode::NOT_FOUND
            }
            Rejection::EndpointNotAllowed
            | Rejection::IpNotAllowed
            | Rejection::CorsRejected
            | Rejection::AccessDenied
            | Rejection::MissingApiKey
            | Rejection::InvalidApiKey => StatusCode::FORBIDDEN,
            Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::Unauthorized | Rejection::InvalidToken => StatusCode::UNAUTHORIZED,
            Rejection::Throttled { .. } | Rejection::QuotaExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Rejection::IntegrationFailure => StatusCode::BAD_GATEWAY,
            Rejection::EndpointUnavailable | Rejection::QuotaStoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::IntegrationTimeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The spec's error code, also the `code` label of `apigw_rejections_total`.
    pub fn code(&self) -> &'static str {
        CODES[self.code_index()]
    }

    /// The index of [`Rejection::code`] in [`CODES`].
    pub fn code_index(&self) -> usize {
        match self {
            Rejection::BadRequest(_) => 0,
            Rejection::PayloadTooLarge => 1,
            Rejection::HeadersTooLarge => 2,
            Rejection::UriTooLong => 3,
            Rejection::ApiNotFound => 4,
            Rejection::StageNotFound => 5,
            Rejection::EndpointNotAllowed => 6,
            Rejection::IpNotAllowed => 7,
            Rejection::ResourceNotFound => 8,
            Rejection::CorsRejected => 9,
            Rejection::MethodNotAllowed { .. } => 10,
            Rejection::Unauthorized => 11,
            Rejection::InvalidToken => 12,
            Rejection::AccessDenied => 13,
            Rejection::MissingApiKey => 14,
            Rejection::InvalidApiKey => 15,
            Rejection::Throttled { .. } => 16,
            Rejection::QuotaExceeded { .. } => 17,
            Rejection::IntegrationFailure => 18,
            Rejection::EndpointUnavailable => 19,
            Rejection::IntegrationTimeout => 20,
            Rejection::QuotaStoreUnavailable => 21,
            Rejection::Internal => 22,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Rejection::BadRequest(b) => match b {
                BadRequest::Path(e) => e.to_string(),
                BadRequest::AmbiguousLength => {
                    "the body length is ambiguous (Content-Length with Transfer-Encoding, or Content-Length repeated)".into()
                }
                BadRequest::TransferCoding => "only the chunked transfer coding is accepted".into(),
                BadRequest::MissingHost => "the request names no host".into(),
                BadRequest::RepeatedHost => "the request carries more than one Host header".into(),
                BadRequest::HostMismatch => {
                    "the request target's authority differs from the Host header".into()
                }
                BadRequest::MissingQuery(n) => {
                    format!("required query string parameter `{n}` is missing")
                }
                BadRequest::MissingHeader(n) => format!("required header `{n}` is missing"),
                BadRequest::Body => "the request body could not be read".into(),
            },
            Rejection::PayloadTooLarge => "the request body exceeds the limit".into(),
            Rejection::HeadersTooLarge => "the request head exceeds the limit".into(),
            Rejection::UriTooLong => "the request target exceeds the limit".into(),
            Rejection::ApiNotFound => "no API is served for this host".into(),
            Rejection::StageNotFound => "the API has no such stage".into(),
            Rejection::EndpointNotAllowed => {
                "the request did not come through a connected, active endpoint".into()
            }
            Rejection::IpNotAllowed => "the client address is not allowed on this stage".into(),
            Rejection::ResourceNotFound => "no resource matches the path".into(),
            Rejection::CorsRejected => "the CORS preflight request is not allowed".into(),
            Rejection::MethodNotAllowed { .. } => {
                "the resource does not support this method".into()
            }
            Rejection::Unauthorized => "a bearer token is required".into(),
            Rejection::InvalidToken => "the bearer token is not valid".into(),
            Rejection::AccessDenied => "the resource policy denies this request".into(),
            Rejection::MissingApiKey => "an API key is required (x-scp-apikey)".into(),
            Rejection::InvalidApiKey => "the API key is not valid for this stage".into(),
            Rejection::Throttled { .. } => "too many requests".into(),
            Rejection::QuotaExceeded { .. } => "the usage plan quota is exhausted".into(),
            Rejection::IntegrationFailure => "the integration failed".into(),
            Rejection::EndpointUnavailable => "the integration endpoint is not available".into(),
            Rejection::IntegrationTimeout => "the integration did not answer in time".into(),
            Rejection::QuotaStoreUnavailable => "the quota store is unavailable".into(),
            Rejection::Internal => "internal error".into(),
        }
    }

    /// Malformed framing: the connection is closed after the answer.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Rejection::BadRequest(
                BadRequest::AmbiguousLength | BadRequest::TransferCoding | BadRequest::Body
            ) | Rejection::PayloadTooLarge
        )
    }

    /// The gateway-made response: status, spec headers and the JSON error body.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<GatewayBody> {
        #[derive(serde::Serialize)]
        struct ErrorBody<'a> {
            code: &'a str,
            message: &'a str,
            request_id: &'a str,
        }
        let message = self.message();
        let body = serde_json::to_vec(&ErrorBody {
            code: self.code(),
            message: &message,
            request_id: request_id.to_str().unwrap_or(""),
        })
        .unwrap_or_default();
        let mut resp = Response::new(GatewayBody::full(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.closes_connection() {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        match &self {
            Rejection::MethodNotAllowed { allow } => {
                h.insert(ALLOW, allow.clone());
            }
            Rejection::Unauthorized => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Rejection::InvalidToken => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Rejection::Throttled { retry_after_secs }
            | Rejection::QuotaExceeded { retry_after_secs } => {
                h.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Rejection::BadRequest(_)
            | Rejection::PayloadTooLarge
            | Rejection::HeadersTooLarge
            | Rejection::UriTooLong
            | Rejection::ApiNotFound
            | Rejection::StageNotFound
            | Rejection::EndpointNotAllowed
            | Rejection::IpNotAllowed
            | Rejection::ResourceNotFound
            | Rejection::CorsRejected
            | Rejection::AccessDenied
            | Rejection::MissingApiKey
            | Rejection::InvalidApiKey
            | Rejection::IntegrationFailure
            | Rejection::EndpointUnavailable
            | Rejection::IntegrationTimeout
            | Rejection::QuotaStoreUnavailable
            | Rejection::Internal => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_headers() {
        let id = HeaderValue::from_static("abc");
        let r = Rejection::MethodNotAllowed {
            allow: HeaderValue::from_static("GET"),
        }
        .into_response(&id);
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let r = Rejection::InvalidToken.into_response(&id);
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let r = Rejection::QuotaExceeded {
            retry_after_secs: 7,
        }
        .into_response(&id);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        assert!(Rejection::BadRequest(BadRequest::AmbiguousLength).closes_connection());
    }

    #[test]
    fn message_is_json_escaped() {
        let msg = Rejection::BadRequest(BadRequest::MissingHeader("x-\"q".into())).message();
        assert!(msg.contains("x-\"q"));
        let body = serde_json::json!({"m": msg}).to_string();
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
    }
}
