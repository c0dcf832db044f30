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

use std::time::{Duration, Instant};

use ::http::Response;

use crate::body::GatewayBody;
use crate::rejection::Rejection;

pub mod function;
pub mod http;
pub mod url;

/// What an integration call produced: the response or the rejection, when the backend was
/// called and answered, and whether the request was sent a second time.
pub struct Outcome {
    pub result: Result<Response<GatewayBody>, Rejection>,
    pub timing: Timing,
    pub retried: bool,
}

/// When an integration call went out and when its answer head (or its failure) came: the
/// integration latency, and the end of the request's latency (the pipeline reads no clock
/// of its own after the call).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub sent: Instant,
    pub ended: Instant,
}

impl Timing {
    /// A call that went out at `sent` and ends now.
    pub fn since(sent: Instant) -> Self {
        Self {
            sent,
            ended: Instant::now(),
        }
    }

    /// A call that never went out (refused before it was sent): zero long, ending now.
    pub fn unsent() -> Self {
        let now = Instant::now();
        Self {
            sent: now,
            ended: now,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.ended.saturating_duration_since(self.sent)
    }
}
