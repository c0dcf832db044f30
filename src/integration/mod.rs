//! Integrations: where an admitted request goes.
//!
//! - `http`: HTTP and PRIVATELINK backends: header rules, one call through
//!   [`crate::upstream`] (pooled connections, retries), 502/504;
//! - `function`: SCF functions (event in, JSON answer out);
//! - `url`: `endpoint_url` templates.
//!
//! A PRIVATELINK integration is the HTTP path sent to the endpoint's `target`, with `Host`
//! and the TLS server name of the URL: its [`crate::upstream::Upstream`] is compiled that
//! way with the snapshot.

use std::time::Duration;

use ::http::Response;

use crate::body::GatewayBody;
use crate::rejection::Rejection;

pub mod function;
pub mod http;
pub mod url;

/// What an integration call produced: the response or the rejection, how long the backend
/// took, and whether the request was sent a second time.
pub struct Outcome {
    pub result: Result<Response<GatewayBody>, Rejection>,
    pub elapsed: Duration,
    pub retried: bool,
}
