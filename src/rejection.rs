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

/// Why a token or an API key was refused: the access log's `reason`, the `reason` label of
/// `apigw_auth_failures_total` and the log line of the refusal. None of them says anything
/// about the secret itself; [`AuthFailure::description`] is the part a client may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` token.
    MissingToken,
    /// Not a JWT: not three base64url parts, or a header or payload that is not JSON.
    Malformed,
    /// The token's `alg` is not the algorithm of any candidate key.
    Algorithm,
    /// The token's `kid` names no connected auth and no JWKS key.
    UnknownKid,
    /// The signature does not verify with any candidate key.
    Signature,
    /// `exp` passed (beyond the leeway).
    Expired,
    /// `nbf` or `iat` in the future (beyond the leeway).
    NotYetValid,
    /// `exp`, or `iss` / `aud` where the auth checks them, absent.
    MissingClaim,
    Issuer,
    Audience,
    /// The token verifies with an auth that is past its `expired_at`.
    AuthExpired,
    /// The stage requires JWT but no auth is connected to it: no token can pass.
    NoAuth,
    /// No `x-scp-apikey`.
    MissingKey,
    /// No key of the stage's usage plan has the presented value.
    UnknownKey,
    /// A key of the plan that the stage's `usage_plan_api_keys` does not list.
    KeyNotAllowed,
    /// The method requires a key but the stage has no usage plan: no key can pass.
    NoUsagePlan,
}

/// Every [`AuthFailure`] label, indexed by [`AuthFailure::index`].
pub const AUTH_FAILURES: [&str; 16] = [
    "missing_token",
    "malformed",
    "algorithm",
    "unknown_kid",
    "signature",
    "expired",
    "not_yet_valid",
    "missing_claim",
    "issuer",
    "audience",
    "auth_expired",
    "no_auth",
    "missing_key",
    "unknown_key",
    "key_not_allowed",
    "no_usage_plan",
];

impl AuthFailure {
    pub fn index(self) -> usize {
        match self {
            AuthFailure::MissingToken => 0,
            AuthFailure::Malformed => 1,
            AuthFailure::Algorithm => 2,
            AuthFailure::UnknownKid => 3,
            AuthFailure::Signature => 4,
            AuthFailure::Expired => 5,
            AuthFailure::NotYetValid => 6,
            AuthFailure::MissingClaim => 7,
            AuthFailure::Issuer => 8,
            AuthFailure::Audience => 9,
            AuthFailure::AuthExpired => 10,
            AuthFailure::NoAuth => 11,
            AuthFailure::MissingKey => 12,
            AuthFailure::UnknownKey => 13,
            AuthFailure::KeyNotAllowed => 14,
            AuthFailure::NoUsagePlan => 15,
        }
    }

    pub fn as_str(self) -> &'static str {
        AUTH_FAILURES[self.index()]
    }

    /// The RFC 6750 `error_description` of an `invalid_token` answer, for the reasons that
    /// tell the client nothing it could not see in its own token and nothing about the
    /// gateway's keys or configuration. A signature, issuer or audience mismatch stays
    /// undescribed: naming it would help someone probing for what the gateway accepts.
    pub fn description(self) -> Option<&'static str> {
        match self {
            AuthFailure::Expired => Some("token expired"),
            AuthFailure::NotYetValid => Some("token not yet valid"),
            AuthFailure::Malformed => Some("malformed token"),
            AuthFailure::MissingToken
            | AuthFailure::Algorithm
            | AuthFailure::UnknownKid
            | AuthFailure::Signature
            | AuthFailure::MissingClaim
            | AuthFailure::Issuer
            | AuthFailure::Audience
            | AuthFailure::AuthExpired
            | AuthFailure::NoAuth
            | AuthFailure::MissingKey
            | AuthFailure::UnknownKey
            | AuthFailure::KeyNotAllowed
            | AuthFailure::NoUsagePlan => None,
        }
    }
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
    Unauthorized(AuthFailure),
    /// A token that does not verify (401, `error="invalid_token"`).
    InvalidToken(AuthFailure),
    AccessDenied,
    MissingApiKey(AuthFailure),
    InvalidApiKey(AuthFailure),
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
            | Rejection::MissingApiKey(_)
            | Rejection::InvalidApiKey(_) => StatusCode::FORBIDDEN,
            Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::Unauthorized(_) | Rejection::InvalidToken(_) => StatusCode::UNAUTHORIZED,
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
    /// Why a token or key was refused, for the refusals that are about one.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            Rejection::Unauthorized(r)
            | Rejection::InvalidToken(r)
            | Rejection::MissingApiKey(r)
            | Rejection::InvalidApiKey(r) => Some(*r),
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
            | Rejection::MethodNotAllowed { .. }
            | Rejection::AccessDenied
            | Rejection::Throttled { .. }
            | Rejection::QuotaExceeded { .. }
            | Rejection::IntegrationFailure
            | Rejection::EndpointUnavailable
            | Rejection::IntegrationTimeout
            | Rejection::QuotaStoreUnavailable
            | Rejection::Internal => None,
        }
    }

    /// [`Rejection::code_index`] as a byte (there are fewer than 256 codes).
    pub fn code_byte(&self) -> u8 {
        const { assert!(CODES.len() <= 256) };
        self.code_index() as u8
    }

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
            Rejection::Unauthorized(_) => 11,
            Rejection::InvalidToken(_) => 12,
            Rejection::AccessDenied => 13,
            Rejection::MissingApiKey(_) => 14,
            Rejection::InvalidApiKey(_) => 15,
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
            Rejection::Unauthorized(_) => "a bearer token is required".into(),
            Rejection::InvalidToken(_) => "the bearer token is not valid".into(),
            Rejection::AccessDenied => "the resource policy denies this request".into(),
            Rejection::MissingApiKey(_) => "an API key is required (x-scp-apikey)".into(),
            Rejection::InvalidApiKey(_) => "the API key is not valid for this stage".into(),
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
    pub fn into_response(self, request_id: &str) -> Response<GatewayBody> {
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
            request_id,
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
            Rejection::Unauthorized(_) => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Rejection::InvalidToken(reason) => {
                let challenge = match reason.description() {
                    Some(d) => HeaderValue::try_from(format!(
                        "Bearer error=\"invalid_token\", error_description=\"{d}\""
                    ))
                    .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\"")),
                    None => HeaderValue::from_static("Bearer error=\"invalid_token\""),
                };
                h.insert(WWW_AUTHENTICATE, challenge);
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
            | Rejection::MissingApiKey(_)
            | Rejection::InvalidApiKey(_)
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
        let id = "abc";
        let r = Rejection::MethodNotAllowed {
            allow: HeaderValue::from_static("GET"),
        }
        .into_response(id);
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let r = Rejection::InvalidToken(AuthFailure::Signature).into_response(id);
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let r = Rejection::InvalidToken(AuthFailure::Expired).into_response(id);
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\", error_description=\"token expired\""
        );
        let r = Rejection::QuotaExceeded {
            retry_after_secs: 7,
        }
        .into_response(id);
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
