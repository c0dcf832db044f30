//! One client request, through the named phases of `request-pipeline.md` with one
//! [`RequestContext`]. Each phase either fills in the context or returns a typed
//! [`Rejection`]; [`handle`] turns a rejection into the response in one place and records
//! metrics once for every outcome.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Instant;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::ext::{AmbiguousLength, AppendedHeaders};

use std::sync::Arc;

use http::header::ORIGIN;
use http::StatusCode;

use crate::answer_fields::FieldSink;
use crate::app::App;
use crate::body::{ForwardBody, GatewayBody, LimitedBody};
use crate::config::{FailureMode, Limits};
use crate::integration::http::{
    self as http_integration, ForwardInfo, X_SCP_ENDPOINT_ID, X_SCP_REQUEST_ID,
};
use crate::path::{self, NormalizedPath};
use crate::policy::apikey::{self, ApiKey, CompiledPlan};
use crate::policy::client_addr;
use crate::policy::cors::{is_preflight, CorsPolicy, Preflight};
use crate::policy::jwt::{bearer, Verified};
use crate::policy::quota::{self, Admission};
use crate::policy::resource_policy::{Caller, CompiledPolicy};
use crate::rejection::{AuthFailure, BadRequest, Rejection};
use crate::request_id::{Number, RequestId};
use crate::routing::{Params, Route};
use crate::snapshot::model::EndpointType;
use crate::snapshot::{CompiledApi, CompiledDeployment, CompiledStage, Integration, MethodRoute};
use crate::state::{host_key, GatewayState};

/// What the listener knows about a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `http` or `https`: the scheme clients used to reach this listener.
    pub proto: &'static str,
    /// The socket peer is inside `network.trusted_proxies` (decided once per connection).
    pub trusted_peer: bool,
    /// What a PROXY protocol v2 header said (listeners configured for it).
    pub proxy: Option<ProxyInfo>,
    /// The address this hop appends to `X-Forwarded-For`, built once per connection: the
    /// socket peer, or on PROXY protocol listeners the header's source address. Never the
    /// client address derived through trusted proxies (that one is already in the list).
    pub forwarded_for: HeaderValue,
    /// The address `forwarded_for` holds.
    pub hop_ip: IpAddr,
}

/// What a PROXY protocol v2 header said about the client (listeners configured for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyInfo {
    /// The original client address (`PROXY` command with an IP address family).
    pub source: Option<IpAddr>,
    /// The PrivateLink endpoint id of TLV 0xE0.
    pub endpoint_id: Option<Box<str>>,
}

/// Everything the phases learn about one request, borrowed from the state it is served with.
pub struct RequestContext<'s> {
    pub request_id: RequestId,
    pub started: Instant,
    pub conn: &'s ConnInfo,
    pub client_ip: IpAddr,
    pub method: Method,
    pub api: Option<&'s CompiledApi>,
    pub stage: Option<&'s CompiledStage>,
    pub deployment: Option<&'s CompiledDeployment>,
    pub route: Option<&'s Route<MethodRoute>>,
    pub method_route: Option<&'s MethodRoute>,
    pub path: Option<NormalizedPath>,
    pub params: Params,
    /// When the integration call went out and answered (none if it was not made).
    pub integration: Option<crate::integration::Timing>,
    /// The request's `Origin`, for CORS response headers (read on CORS stages only).
    pub origin: Option<HeaderValue>,
    /// The token verified at step 9.
    pub jwt: Option<Verified>,
    /// The usage plan and key id identified at step 10.
    pub api_key: Option<(&'s CompiledPlan, &'s ApiKey)>,
    /// The quota admission of step 12 (its `RateLimit-*` headers go on the response).
    pub rate_limit: Option<Admission>,
    /// The request was a CORS preflight the gateway answered.
    pub preflight: bool,
    /// The request came over HTTP/1 (its answer's own fields are appended after the map,
    /// see [`finish`]).
    pub http1: bool,
    /// The code of a gateway-made error response (index into [`crate::rejection::CODES`];
    /// a byte: this context is part of every request's future, see [`handle`]).
    pub error_code: Option<u8>,
    /// Why a token or key was refused.
    pub auth_failure: Option<AuthFailure>,
    /// The matched route's id in the selected deployment, and whether that is the canary.
    pub route_id: usize,
    pub canary: bool,
    /// The integration request was sent a second time (a reused backend connection failed).
    pub retried: bool,
    /// The request's server span, with tracing on (boxed: 8 bytes when off).
    pub trace: Option<Box<crate::observe::trace::RequestTrace>>,
}

impl<'s> RequestContext<'s> {
    /// The wall-clock second of the request's checks (JWT expiry, the quota window): the
    /// second of its start, from the worker's clock cache (no clock read of its own, see
    /// `clock`).
    fn unix_secs(&self) -> i64 {
        crate::clock::unix_secs_at(self.started)
    }

    fn new(app: &App, conn: &'s ConnInfo, req: &Request<Incoming>) -> Self {
        let headers = req.headers();
        // An incoming request id is kept only from a trusted proxy.
        let trusted = conn
            .trusted_peer
            .then(|| headers.get(&X_SCP_REQUEST_ID))
            .flatten()
            .filter(|v| !v.is_empty() && v.len() <= 128);
        let request_id = match trusted {
            Some(v) => RequestId::Kept(v.clone()),
            None => crate::request_id::next_id(),
        };
        // A PROXY v2 header names the client; otherwise the peer, or X-Forwarded-For
        // through trusted proxies.
        let client_ip = match conn.proxy.as_ref().and_then(|p| p.source) {
            Some(source) => crate::app::canonical_ip(source),
            None => client_addr::client_ip(conn.peer.ip(), conn.trusted_peer, headers, |ip| {
                app.is_trusted_proxy(ip)
            }),
        };
        Self {
            request_id,
            started: Instant::now(),
            conn,
            client_ip,
            method: req.method().clone(),
            api: None,
            stage: None,
            deployment: None,
            route: None,
            method_route: None,
            path: None,
            params: Params::default(),
            integration: None,
            origin: None,
            jwt: None,
            api_key: None,
            rate_limit: None,
            preflight: false,
            http1: req.version() <= http::Version::HTTP_11,
            error_code: None,
            auth_failure: None,
            route_id: 0,
            canary: false,
            retried: false,
            trace: app
                .tracing
                .as_ref()
                .map(|t| Box::new(t.start_request(headers))),
        }
    }
}

/// What a request is served with: the process and the connection it came on. The
/// listener holds them, and learns when the request is done by the value's drop.
pub trait Serving: Send + Sync + 'static {
    fn app(&self) -> &App;
    fn conn(&self) -> &ConnInfo;
}

/// Serves one request with the state current at its arrival, start to end; `serving` is
/// dropped as soon as the answer's head is ready.
///
/// Its future is for hyper's server to poll (`server::conn`): for an HTTP/1 request the
/// answer's own fields (request id, `RateLimit-*`, CORS) are not in the returned map but
/// pushed for the head hyper's HTTP/1 server writes in the same poll (see [`finish`]).
///
/// The phases that can only refuse run as plain functions; this is the one async frame
/// that holds the request (a request moved through nested async functions would be stored
/// once per level). An async block rather than an async function: a function's arguments
/// are stored twice in its future (as arguments and as locals).
///
/// Boxed: hyper keeps room for one service future per connection, idle or not; a box is 8
/// bytes (the future's size less per idle connection, for one allocation per request;
/// 2.2 KiB when measured with an earlier, larger future). This future
/// is 912 bytes with the integration call boxed apart (see `integrate`; 888 bytes): both
/// boxes stay within glibc's per-thread cache (allocations up to 1,032 bytes), where one
/// box of 1.9 KB took malloc's slow path and cost ~550 instructions more per request
/// (callgrind). Its largest state is the wait for the quota store (the context, the
/// request, and `quota::admit`'s future, which is why that one is not an async function).
/// A field added here or to the backend call's future can push either past 1,032 bytes:
/// measure with a `malloc` uprobe (`perf probe -x libc.so.6 'malloc size=%di:u64'`), or
/// list the layout (`RUSTC_BOOTSTRAP=1 cargo rustc --release --lib -- -Zprint-type-sizes`,
/// the `async block` of this file).
/// Never an error: every failure is an answer.
pub fn handle(
    serving: impl Serving,
    req: Request<Incoming>,
) -> Pin<Box<impl std::future::Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>> {
    // The request goes to the block as an argument rather than captured by the closure:
    // captured, it was copied into the closure and again into the box (264 bytes each).
    boxed_in_place_with(serving, req, |serving, req| async move {
        let (app, conn) = (serving.app(), serving.conn());
        let state = app.state.load_for_request();
        let mut ctx = RequestContext::new(app, conn, &req);
        // Labelled blocks that end in the answer: a phase breaks out with a response, or
        // with its rejection. Broken out of rather than passed along as `Result`s, which
        // moved the answer (232 bytes) once per layer.
        let mut resp = 'answer: {
            let rejection = 'rejected: {
                let m = match admit(app, &state, &mut ctx, &req) {
                    Err(rejection) => break 'rejected rejection,
                    Ok(Admitted::Answered(resp)) => break 'answer *resp,
                    Ok(Admitted::Forward(m)) => m,
                };
                if let Err(rejection) = admit_quota(app, &mut ctx).await {
                    break 'rejected rejection;
                }
                if let Err(rejection) = check_required(m, &req) {
                    break 'rejected rejection;
                }
                // The call is a box (see `integrate`): it adds a pointer to this future.
                let call = match integrate(app, &ctx, m, req) {
                    Err(rejection) => break 'rejected rejection,
                    Ok(call) => call,
                };
                let outcome = call.await;
                ctx.integration = Some(outcome.timing);
                ctx.retried = outcome.retried;
                match outcome.result {
                    Ok(resp) => break 'answer resp,
                    Err(rejection) => rejection,
                }
            };
            ctx.error_code = Some(rejection.code_byte());
            if let Some(reason) = rejection.auth_failure() {
                ctx.auth_failure = Some(reason);
                log_auth_failure(&ctx, reason);
            }
            rejection.into_response(ctx.request_id.as_str())
        };
        finish(&ctx, resp.headers_mut());
        record(app, &ctx, &resp);
        drop(serving);
        Ok(resp)
    })
}

/// `Box::pin(make())`, with the box allocated first so that `make`'s value can be built in
/// it rather than on the stack and then copied (the compiler does so when `make` is inlined:
/// a future made here is written where it will live). The request's future is 1,024
/// bytes, the backend call's 888: `Box::pin` copied each whole, whatever the state
/// it starts in holds.
#[inline(always)]
fn boxed_in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let mut b = Box::<F>::new_uninit();
    b.write(make());
    // SAFETY: written just above.
    Box::into_pin(unsafe { b.assume_init() })
}

/// [`boxed_in_place`] for a value made of `a` and `b`, handed to `make` as its arguments
/// rather than captured by it: a closure's captures are a copy of their own (the request's
/// future held the request twice on its way into the box).
#[inline(always)]
fn boxed_in_place_with<A, B, F>(a: A, b: B, make: impl FnOnce(A, B) -> F) -> Pin<Box<F>> {
    let mut boxed = Box::<F>::new_uninit();
    boxed.write(make(a, b));
    // SAFETY: written just above.
    Box::into_pin(unsafe { boxed.assume_init() })
}

/// The log line of a refused token or key: at `info` at most once a second (a client
/// retrying a bad token must not fill the log), every one at `debug`. It names the request
/// (its id is in the answer and the access log), never the token or key.
#[cold]
fn log_auth_failure(ctx: &RequestContext<'_>, reason: AuthFailure) {
    static INFO: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new();
    let request_id = ctx.request_id.as_str();
    let api_id = ctx.api.map_or("", |a| &*a.id);
    let stage = ctx.stage.map_or("", |s| &*s.name);
    match INFO.allow() {
        Some(held_back) => tracing::info!(
            request_id,
            api_id,
            stage,
            reason = reason.as_str(),
            client_ip = %ctx.client_ip,
            held_back,
            "credentials refused"
        ),
        None => tracing::debug!(
            request_id,
            api_id,
            stage,
            reason = reason.as_str(),
            client_ip = %ctx.client_ip,
            "credentials refused"
        ),
    }
}

/// What the phases before the quota decided.
enum Admitted<'s> {
    /// The gateway answered itself (a CORS preflight).
    Answered(Box<Response<GatewayBody>>),
    /// On to the quota and the integration of this method.
    Forward(&'s MethodRoute),
}

static RATELIMIT_LIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: http::HeaderName = http::HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: http::HeaderName = http::HeaderName::from_static("ratelimit-reset");

/// Headers every response gets, forwarded or gateway-made: the request id, the quota's
/// `RateLimit-*`, and the stage's CORS headers (so that a browser can read errors too).
///
/// They replace the answer's own (a backend's, a Cloud Function's): one pass over the
/// answer's names finds whether it has any, and only then are they removed. For an
/// HTTP/1 request they are not put in the map at all but pushed to hyper's per-thread
/// buffer for the head its server writes next ([`AppendedHeaders::for_next_response`]):
/// this is the last thing the request's future does, and hyper's HTTP/1 dispatcher writes
/// the answer's head in the same poll that sees the future ready (the connection's poll
/// wrapper in `server::conn` clears the buffer after every poll, so nothing pushed can
/// reach another answer). An HTTP/2 stream's future runs in a task of its own: its fields
/// go in the map.
fn finish(ctx: &RequestContext<'_>, h: &mut http::HeaderMap) {
    let cors = match ctx.stage.and_then(|s| s.cors.as_ref()) {
        Some(cors) if !ctx.preflight => Some(cors),
        _ => None,
    };
    let quota = ctx.rate_limit.is_some();
    let replaced = h.keys().any(|k| {
        let n = k.as_str();
        n == X_SCP_REQUEST_ID.as_str()
            || (quota && n.starts_with("ratelimit-"))
            || (cors.is_some() && crate::policy::cors::is_cors_name(n))
    });
    if replaced {
        h.remove(&X_SCP_REQUEST_ID);
        if quota {
            for n in [&RATELIMIT_LIMIT, &RATELIMIT_REMAINING, &RATELIMIT_RESET] {
                h.remove(n);
            }
        }
        if cors.is_some() {
            crate::policy::cors::remove_backend_fields(h);
        }
    }
    if ctx.http1 {
        AppendedHeaders::for_next_response(|a| add_fields(ctx, cors, a));
    } else {
        add_fields(ctx, cors, h);
    }
}

/// The fields of [`finish`], to wherever they go.
#[inline]
fn add_fields(ctx: &RequestContext<'_>, cors: Option<&CorsPolicy>, out: &mut impl FieldSink) {
    out.add_made(&X_SCP_REQUEST_ID, &ctx.request_id);
    if let Some(a) = ctx.rate_limit {
        match &ctx.api_key {
            Some((plan, _)) if plan.limit == a.limit => {
                out.add(&RATELIMIT_LIMIT, &plan.limit_header);
            }
            _ => out.add_made(&RATELIMIT_LIMIT, &Number(a.limit)),
        }
        out.add_made(&RATELIMIT_REMAINING, &Number(a.remaining));
        out.add_made(&RATELIMIT_RESET, &Number(a.reset_secs));
    }
    if let Some(cors) = cors {
        cors.add_fields(ctx.origin.as_ref(), out);
    }
}

/// The pipeline. The order is the contract of `request-pipeline.md` and each position has
/// a reason:
/// - 1, framing and limits first: nothing else may look at a request that could be read
///   two ways (smuggling), and the cheapest refusals come before any lookup;
/// - 2–3, host → API → stage: every later policy belongs to a stage;
/// - 4–5, endpoint and IP checks before routing, so that a caller who may not reach the
///   stage learns nothing about its resources (404 vs 405 would leak them);
/// - 6–8, resource, then CORS preflight (answered before auth: browsers send no
///   credentials on preflights), then method;
/// - 9–12, JWT before the resource policy (a statement's principal is the token's `sub`),
///   key before throttle and quota (both are per key), quota last so that a request
///   rejected for any other reason is never counted;
/// - 13, required parameters, the last check before the integration is called;
/// - 14, the integration.
fn admit<'s>(
    app: &App,
    state: &'s GatewayState,
    ctx: &mut RequestContext<'s>,
    req: &Request<Incoming>,
) -> Result<Admitted<'s>, Rejection> {
    let found = check_framing(req, &app.config.limits)?;
    ctx.path = Some(
        path::normalize_uri(req.uri()).map_err(|e| Rejection::BadRequest(BadRequest::Path(e)))?,
    );
    let api = select_api(state, req, &found)?;
    ctx.api = Some(api);
    let stage = select_stage(api, ctx)?;
    ctx.stage = Some(stage);
    if stage.cors.is_some() {
        // Only CORS stages put headers on responses for an `Origin`.
        ctx.origin = found.origin.cloned();
    }
    check_private_endpoint(api, ctx, req)?;
    check_ip(api, stage, ctx)?;
    route_resource(ctx, stage)?;
    if let Some(answer) = cors_preflight(stage, ctx, req)? {
        return Ok(Admitted::Answered(Box::new(answer)));
    }
    let method_route = route_method(ctx)?;
    verify_jwt(api, stage, ctx, found.authorization)?;
    check_resource_policy(api, stage, method_route, ctx)?;
    check_api_key(stage, method_route, ctx, found.api_key)?;
    throttle(app, api, stage, ctx)?;
    Ok(Admitted::Forward(method_route))
}

/// Step 4: a PRIVATE API is served only through a connected, `Active` PrivateLink endpoint,
/// named by the PROXY v2 TLV 0xE0 or by a trusted proxy's `x-scp-privatelink-endpoint-id`.
fn check_private_endpoint(
    api: &CompiledApi,
    ctx: &RequestContext<'_>,
    req: &Request<Incoming>,
) -> Result<(), Rejection> {
    if api.endpoint_type != EndpointType::Private {
        return Ok(());
    }
    // The PROXY header's TLV on PROXY listeners, else a trusted proxy's header.
    let endpoint = match ctx.conn.proxy.as_ref() {
        Some(p) => p.endpoint_id.as_deref(),
        None => ctx
            .conn
            .trusted_peer
            .then(|| req.headers().get(&X_SCP_ENDPOINT_ID))
            .flatten()
            .and_then(|v| v.to_str().ok()),
    };
    match endpoint {
        Some(id) if api.active_endpoints.contains(id) => Ok(()),
        _ => Err(Rejection::EndpointNotAllowed),
    }
}

/// Step 5: IP access control (not for PRIVATE APIs).
fn check_ip(
    api: &CompiledApi,
    stage: &CompiledStage,
    ctx: &RequestContext<'_>,
) -> Result<(), Rejection> {
    if api.endpoint_type == EndpointType::Private || stage.acl.admits(ctx.client_ip) {
        Ok(())
    } else {
        Err(Rejection::IpNotAllowed)
    }
}

/// Step 7: a CORS preflight to a resource without an explicit OPTIONS method is answered
/// here, before any credential is asked for.
///
/// This and the other phases a stage may not use (9–11) test whether it does where
/// they are called, and only then call the phase's own work: a call that finds nothing
/// to do cost ~20 instructions each (the call, the context's fields spilled and read
/// back, the result returned through memory), five on every request of a plain stage.
#[inline(always)]
fn cors_preflight(
    stage: &CompiledStage,
    ctx: &mut RequestContext<'_>,
    req: &Request<Incoming>,
) -> Result<Option<Response<GatewayBody>>, Rejection> {
    match (&stage.cors, ctx.route) {
        (Some(cors), Some(route)) => answer_preflight(cors, route, ctx, req),
        _ => Ok(None),
    }
}

fn answer_preflight(
    cors: &CorsPolicy,
    route: &Route<MethodRoute>,
    ctx: &mut RequestContext<'_>,
    req: &Request<Incoming>,
) -> Result<Option<Response<GatewayBody>>, Rejection> {
    if !is_preflight(req.method(), req.headers())
        || route.methods.explicit(&Method::OPTIONS).is_some()
    {
        return Ok(None);
    }
    match cors.preflight(req.headers()) {
        Preflight::Allowed(headers) => {
            ctx.preflight = true;
            let mut resp = Response::new(GatewayBody::Empty);
            *resp.status_mut() = StatusCode::NO_CONTENT;
            *resp.headers_mut() = headers;
            Ok(Some(resp))
        }
        Preflight::Rejected => {
            // A preflight is judged by its own headers: a refused one gets none.
            ctx.preflight = true;
            Err(Rejection::CorsRejected)
        }
    }
}

/// Step 9: JWT, when the stage enables it or the API is PRIVATE.
#[inline(always)]
fn verify_jwt(
    api: &CompiledApi,
    stage: &CompiledStage,
    ctx: &mut RequestContext<'_>,
    authorization: Option<&HeaderValue>,
) -> Result<(), Rejection> {
    if !stage.jwt_enabled && api.endpoint_type != EndpointType::Private {
        return Ok(());
    }
    verify_token(stage, ctx, authorization)
}

fn verify_token(
    stage: &CompiledStage,
    ctx: &mut RequestContext<'_>,
    authorization: Option<&HeaderValue>,
) -> Result<(), Rejection> {
    match stage.jwt.verify(authorization, ctx.unix_secs()) {
        Ok(v) => {
            ctx.jwt = Some(v);
            Ok(())
        }
        // No token is a challenge (`Bearer`); a token that does not verify is `invalid_token`.
        Err(reason) if bearer(authorization).is_none() => Err(Rejection::Unauthorized(reason)),
        Err(reason) => Err(Rejection::InvalidToken(reason)),
    }
}

/// Step 9b: the API's resource policy, with the method SRN of this request.
#[inline(always)]
fn check_resource_policy(
    api: &CompiledApi,
    stage: &CompiledStage,
    m: &MethodRoute,
    ctx: &RequestContext<'_>,
) -> Result<(), Rejection> {
    match &api.resource_policy {
        Some(policy) => apply_resource_policy(policy, stage, m, ctx),
        None => Ok(()),
    }
}

fn apply_resource_policy(
    policy: &CompiledPolicy,
    stage: &CompiledStage,
    m: &MethodRoute,
    ctx: &RequestContext<'_>,
) -> Result<(), Rejection> {
    let srn = m.srn.render(&stage.name, ctx.method.as_str());
    let caller = Caller {
        method_srn: &srn,
        source_ip: ctx.client_ip,
        sub: ctx.jwt.as_ref().and_then(Verified::sub),
    };
    if policy.allows(&caller) {
        Ok(())
    } else {
        Err(Rejection::AccessDenied)
    }
}

/// Step 10: the API key, when the method requires one.
#[inline(always)]
fn check_api_key<'s>(
    stage: &'s CompiledStage,
    m: &MethodRoute,
    ctx: &mut RequestContext<'s>,
    presented: Option<&HeaderValue>,
) -> Result<(), Rejection> {
    if !m.api_key_required {
        return Ok(());
    }
    identify_key(stage, ctx, presented)
}

fn identify_key<'s>(
    stage: &'s CompiledStage,
    ctx: &mut RequestContext<'s>,
    presented: Option<&HeaderValue>,
) -> Result<(), Rejection> {
    match stage.keys.check(presented) {
        Ok(found) => {
            ctx.api_key = Some(found);
            Ok(())
        }
        Err(reason) if presented.is_none() => Err(Rejection::MissingApiKey(reason)),
        Err(reason) => Err(Rejection::InvalidApiKey(reason)),
    }
}

/// Step 11: the stage bucket, then the key's usage-plan bucket.
#[inline(always)]
fn throttle(
    app: &App,
    api: &CompiledApi,
    stage: &CompiledStage,
    ctx: &RequestContext<'_>,
) -> Result<(), Rejection> {
    if stage.throttle.is_none() && ctx.api_key.is_none() {
        return Ok(());
    }
    take_tokens(app, api, stage, ctx)
}

fn take_tokens(
    app: &App,
    api: &CompiledApi,
    stage: &CompiledStage,
    ctx: &RequestContext<'_>,
) -> Result<(), Rejection> {
    let throttled = |retry_after_secs| Rejection::Throttled { retry_after_secs };
    if let Some(spec) = stage.throttle {
        app.throttles
            .check_stage(&stage.throttle_bucket, &api.id, &stage.name, spec)
            .map_err(throttled)?;
    }
    if let Some((plan, key)) = &ctx.api_key {
        if let Some(spec) = plan.throttle {
            app.throttles
                .check_key(&key.throttle, &plan.id, &key.id, spec)
                .map_err(throttled)?;
        }
    }
    Ok(())
}

/// Step 12: the usage-plan quota, when step 10 identified a key. Last of the checks that
/// can refuse, so that a request refused for any other reason is never counted.
async fn admit_quota(app: &App, ctx: &mut RequestContext<'_>) -> Result<(), Rejection> {
    let Some((plan, key)) = ctx.api_key else {
        return Ok(());
    };
    let now = ctx.unix_secs();
    let window = plan.window.get(plan.rate, now);
    let admission = quota::admit(
        &*app.quota,
        &key.quota,
        &plan.id,
        &key.id,
        plan.limit,
        window,
        now,
    );
    match admission.await {
        Ok(a) => {
            ctx.rate_limit = Some(a);
            if a.admitted {
                Ok(())
            } else {
                Err(Rejection::QuotaExceeded {
                    retry_after_secs: a.reset_secs,
                })
            }
        }
        Err(e) => {
            app.metrics
                .quota_store_errors
                .with_label_values(&[app.quota.backend()])
                .inc();
            static WARN: crate::log_throttle::LogThrottle = crate::log_throttle::LogThrottle::new();
            if let Some(held_back) = WARN.allow() {
                tracing::warn!(error = %e, failure_mode = ?app.config.quota.failure_mode, similar_lines_held_back = held_back, "quota store failed");
            }
            match app.config.quota.failure_mode {
                FailureMode::Open => Ok(()),
                FailureMode::Closed => Err(Rejection::QuotaStoreUnavailable),
            }
        }
    }
}

/// Request headers later phases read, found by step 1's pass over the headers (a lookup
/// by name in each phase would hash each name again): the first value of each, as
/// `HeaderMap::get` gives it.
#[derive(Default)]
struct Found<'r> {
    /// Step 2's `Host`, and whether there was a second.
    host: Option<&'r HeaderValue>,
    repeated_host: bool,
    /// Step 9's token.
    authorization: Option<&'r HeaderValue>,
    /// Step 10's key (`x-scp-apikey`).
    api_key: Option<&'r HeaderValue>,
    /// For CORS response headers.
    origin: Option<&'r HeaderValue>,
}

/// Step 1: HTTP framing and limits the parser left to us.
fn check_framing<'r>(req: &'r Request<Incoming>, limits: &Limits) -> Result<Found<'r>, Rejection> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > limits.max_uri_bytes {
        return Err(Rejection::UriTooLong);
    }
    // One pass over the headers measures the head and finds the framing headers and
    // those later steps read (a lookup by name would hash each name again).
    let mut head = req.method().as_str().len() + uri_len + 12;
    let (mut te, mut te_count, mut cl) = (None, 0usize, None);
    let mut found = Found::default();
    for (n, v) in req.headers() {
        head += n.as_str().len() + v.len() + 4;
        if n == TRANSFER_ENCODING {
            te_count += 1;
            te = te.or(Some(v));
        } else if n == CONTENT_LENGTH {
            cl = cl.or(Some(v));
        } else if n == HOST {
            found.repeated_host |= found.host.is_some();
            found.host = found.host.or(Some(v));
        } else if n == AUTHORIZATION {
            found.authorization = found.authorization.or(Some(v));
        } else if n == ORIGIN {
            found.origin = found.origin.or(Some(v));
        } else if n == apikey::HEADER {
            found.api_key = found.api_key.or(Some(v));
        }
    }
    if head > limits.max_head_bytes {
        return Err(Rejection::HeadersTooLarge);
    }
    // hyper's parser resolves an ambiguous head on its own and keeps one field (it drops
    // `Content-Length` next to `Transfer-Encoding`, and a second `Content-Length` equal to
    // the first; nginx refuses both): its `AmbiguousLength` marker says it did (see
    // `vendor/hyper/PATCHED.md`). The map check stays for a head that kept both.
    if (te.is_some() && cl.is_some()) || req.extensions().get::<AmbiguousLength>().is_some() {
        return Err(Rejection::BadRequest(BadRequest::AmbiguousLength));
    }
    if let Some(coding) = te {
        let only_chunked = te_count == 1
            && coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(Rejection::BadRequest(BadRequest::TransferCoding));
        }
    }
    if let Some(len) = cl {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        if len > limits.max_body_bytes {
            return Err(Rejection::PayloadTooLarge);
        }
    }
    Ok(found)
}

/// The host the client addressed: `:authority` / absolute-form authority, else `Host`.
/// Both present and different is a 400 (a classic cache-poisoning and routing confusion).
fn request_host<'r>(req: &'r Request<Incoming>, found: &Found<'r>) -> Result<&'r str, Rejection> {
    if found.repeated_host {
        return Err(Rejection::BadRequest(BadRequest::RepeatedHost));
    }
    let header = found.host.map(|v| {
        v.to_str()
            .map_err(|_| Rejection::BadRequest(BadRequest::MissingHost))
    });
    match (req.uri().authority(), header) {
        (Some(a), Some(h)) => {
            let h = h?;
            if host_key(a.as_str()) != host_key(h) {
                return Err(Rejection::BadRequest(BadRequest::HostMismatch));
            }
            Ok(a.as_str())
        }
        (Some(a), None) => Ok(a.as_str()),
        (None, Some(h)) => h,
        (None, None) => Err(Rejection::BadRequest(BadRequest::MissingHost)),
    }
}

/// Step 2: host → API.
fn select_api<'s>(
    state: &'s GatewayState,
    req: &Request<Incoming>,
    found: &Found<'_>,
) -> Result<&'s CompiledApi, Rejection> {
    let host = request_host(req, found)?;
    state
        .api_for_host(host)
        .map(|a| &**a)
        .ok_or(Rejection::ApiNotFound)
}

/// Step 3: first path segment → stage.
fn select_stage<'s>(
    api: &'s CompiledApi,
    ctx: &RequestContext<'s>,
) -> Result<&'s CompiledStage, Rejection> {
    ctx.path
        .as_ref()
        .and_then(|p| p.stage())
        .and_then(|s| api.stage(s))
        .ok_or(Rejection::StageNotFound)
}

/// Step 6: resource of the stage's deployment (canary drawn here).
fn route_resource<'s>(
    ctx: &mut RequestContext<'s>,
    stage: &'s CompiledStage,
) -> Result<(), Rejection> {
    let deployment = match &stage.canary {
        Some(c) if c.percent > 0.0 => stage.select(rand::random::<f64>() * 100.0),
        _ => &stage.deployment,
    };
    ctx.deployment = Some(deployment);
    ctx.canary = !Arc::ptr_eq(deployment, &stage.deployment);
    let path = ctx.path.as_ref().ok_or(Rejection::Internal)?;
    let (id, params) = deployment
        .routes
        .find(path.resource())
        .ok_or(Rejection::ResourceNotFound)?;
    ctx.route = Some(deployment.routes.route(id));
    ctx.route_id = id.index();
    ctx.params = params;
    Ok(())
}

/// Step 8: method of the resource, or 405 with `Allow`.
fn route_method<'s>(ctx: &mut RequestContext<'s>) -> Result<&'s MethodRoute, Rejection> {
    let route = ctx.route.ok_or(Rejection::Internal)?;
    let m = route
        .methods
        .get(&ctx.method)
        .ok_or_else(|| Rejection::MethodNotAllowed {
            allow: route.methods.allow().clone(),
        })?;
    ctx.method_route = Some(m);
    Ok(m)
}

/// Step 13: required query strings (case-sensitive names) and headers.
fn check_required(m: &MethodRoute, req: &Request<Incoming>) -> Result<(), Rejection> {
    for h in m.required_headers.iter() {
        if !req.headers().contains_key(h) {
            return Err(Rejection::BadRequest(BadRequest::MissingHeader(
                h.as_str().into(),
            )));
        }
    }
    if !m.required_query.is_empty() {
        let query = req.uri().query().unwrap_or("");
        for name in m.required_query.iter() {
            let present = query
                .split('&')
                .any(|pair| pair.split('=').next() == Some(&**name));
            if !present {
                return Err(Rejection::BadRequest(BadRequest::MissingQuery(
                    name.clone(),
                )));
            }
        }
    }
    Ok(())
}

/// Step 14: the integration. The forwarding header rules apply to every type (to the
/// function event's headers too).
fn integrate<'a>(
    app: &'a App,
    ctx: &'a RequestContext<'a>,
    m: &'a MethodRoute,
    req: Request<Incoming>,
) -> Result<impl std::future::Future<Output = crate::integration::Outcome> + Send + 'a, Rejection> {
    use futures_util::future::{Either, FutureExt};
    if let Integration::PrivateLink { endpoint, .. } = &m.integration {
        if !endpoint.active {
            return Err(Rejection::EndpointUnavailable);
        }
    }
    let (api, stage, path, deployment, route) = match (
        ctx.api,
        ctx.stage,
        ctx.path.as_ref(),
        ctx.deployment,
        ctx.route,
    ) {
        (Some(a), Some(s), Some(p), Some(d), Some(r)) => (a, s, p, d, r),
        _ => return Err(Rejection::Internal),
    };
    let (mut parts, body) = req.into_parts();
    // A GET or HEAD with a body of unknown length (chunked, or HTTP/2 DATA frames) keeps
    // its body, as with Content-Length: hyper's client would send such a request without
    // its body unless the framing is said explicitly (other methods get chunked framing by
    // default). `Transfer-Encoding` itself was dropped above as hop-by-hop from the client.
    let chunked_get = matches!(parts.method, Method::GET | Method::HEAD)
        && !http_body::Body::is_end_stream(&body)
        && http_body::Body::size_hint(&body).exact().is_none();
    let jwt_sub = ctx.jwt.as_ref().and_then(|v| v.sub_header.as_ref());
    let render = |url: &crate::integration::url::UrlTemplate, query: Option<&str>| {
        url.render(path.resource(), &ctx.params, query)
            .map_err(|e| {
                tracing::error!(error = %e, "backend URL could not be built");
                Rejection::IntegrationFailure
            })
    };
    // The backend URL is rendered before the headers are rewritten: with tracing on, the
    // client span (which names the backend) gives the `traceparent` the backend gets.
    let backend_uri = match &m.integration {
        Integration::Http { url, .. } | Integration::PrivateLink { url, .. } => {
            Some(render(url, parts.uri.query())?)
        }
        Integration::Function { .. } => None,
    };
    let client_span = match (&app.tracing, &ctx.trace) {
        (Some(t), Some(request)) => {
            let backend = m.integration.http_upstream().map(|u| (&u.host, u.port));
            Some(t.start_client(
                request,
                crate::observe::metrics::method_label(&ctx.method),
                backend,
            ))
        }
        _ => None,
    };
    // A plain `http` backend is only ever spoken to over HTTP/1.1: the headers the gateway
    // adds are written after the map instead of hashed into it (see `Added::Appended`).
    // Room for the usual fields (about 250 bytes with short names and ids; a key id and a
    // token's subject add theirs) without growing: any size up to 1 KiB costs the same.
    let mut appended = m
        .integration
        .http_upstream()
        .filter(|u| !u.tls)
        .map(|_| http_integration::AppendedHeaders::with_capacity(512));
    http_integration::rewrite_request_headers(
        &mut parts.headers,
        &ForwardInfo {
            forwarded_for: &ctx.conn.forwarded_for,
            proto: ctx.conn.proto,
            // Borrowed: the URI is replaced only after the headers are rewritten.
            authority: parts.uri.authority().map(http::uri::Authority::as_str),
            request_id: &ctx.request_id,
            api_id: api.id_header.as_ref(),
            stage: stage.name_header.as_ref(),
            api_key_id: ctx.api_key.as_ref().and_then(|(_, k)| k.header.as_ref()),
            jwt_sub,
            trusted_peer: ctx.conn.trusted_peer,
            backend_host: m.integration.http_upstream().map(|u| &u.host_header),
            traceparent: client_span.as_ref().map(|(_, tp)| tp),
        },
        match appended.as_mut() {
            Some(a) => http_integration::Added::Appended(a),
            None => http_integration::Added::Map,
        },
    );
    // Handed to the connection only if it changes the head (pushes or leaves out a field).
    let appended = appended.filter(|a| !a.is_empty());
    let client_span = client_span.and_then(|(span, _)| span);
    let frame_body = |h: &mut http::HeaderMap| {
        if chunked_get {
            h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
    };
    let timeout = stage.integration_timeout;
    let max_body = app.config.limits.max_body_bytes;
    let call = match &m.integration {
        Integration::Http { upstream, .. } | Integration::PrivateLink { upstream, .. } => {
            let Some(uri) = backend_uri else {
                return Err(Rejection::Internal);
            };
            parts.uri = uri;
            frame_body(&mut parts.headers);
            let req =
                Request::from_parts(parts, ForwardBody::Stream(LimitedBody::new(body, max_body)));
            boxed_in_place(move || {
                Either::Left(http_integration::forward(
                    &app.upstream,
                    upstream,
                    req,
                    appended,
                    timeout,
                    forwarded,
                ))
            })
        }
        Integration::Function { function } => {
            let path_parameters = route
                .param_names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let raw = ctx.params.get(path.resource(), i).unwrap_or("");
                    (
                        &**name,
                        percent_encoding::percent_decode_str(raw)
                            .decode_utf8_lossy()
                            .into_owned(),
                    )
                })
                .collect();
            let request_id = ctx.request_id.as_str();
            let query = parts.uri.query().map(str::to_owned);
            let client_ip = ctx.client_ip;
            let api_key_id = ctx.api_key.as_ref().map(|(_, k)| k.id.clone());
            let jwt_claims = ctx.jwt.as_ref().map(|v| v.claims.clone());
            let method = ctx.method.as_str();
            // Boxed: the function path (whole body read, JSON event) keeps its large future
            // out of every request's.
            boxed_in_place(move || {
                Either::Right(Box::pin(async move {
                    let input = crate::integration::function::EventInput {
                        request_id,
                        api_id: &api.id,
                        stage: &stage.name,
                        deployment_id: &deployment.id,
                        resource_path: &route.template,
                        path: path.resource(),
                        http_method: method,
                        headers: &parts.headers,
                        query: query.as_deref(),
                        path_parameters,
                        source_ip: client_ip,
                        api_key_id: api_key_id.as_deref(),
                        jwt_claims: jwt_claims.as_deref(),
                    };
                    crate::integration::function::invoke(
                        &app.upstream,
                        function,
                        &input,
                        body,
                        max_body,
                        timeout,
                    )
                    .await
                }))
            })
        }
    };
    // Boxed apart from the request's future (see `handle`): 888 bytes (malloc uprobe),
    // most of them the backend call's (`upstream::send`), and matched and awaited as a
    // pointer.
    Ok(match (client_span, &app.tracing) {
        (Some(span), Some(t)) => Either::Left(call.map(move |outcome| {
            t.end_client(span, &client_summary(&outcome));
            outcome
        })),
        _ => Either::Right(call),
    })
}

/// What the client span of an integration call records of its outcome.
#[cold]
fn client_summary(o: &crate::integration::Outcome) -> crate::observe::trace::ClientSummary {
    crate::observe::trace::ClientSummary {
        status: o.result.as_ref().ok().map(|r| r.status().as_u16()),
        error_code: o
            .result
            .as_ref()
            .err()
            .map(|e| crate::rejection::CODES[e.code_index()]),
        retried: o.retried,
    }
}

/// A streamed backend answer as the client's response.
fn forwarded(
    r: Result<http_integration::Forwarded, http_integration::NotForwarded>,
) -> crate::integration::Outcome {
    match r {
        Ok(f) => crate::integration::Outcome {
            result: Ok(f.response.map(GatewayBody::Upstream)),
            timing: f.timing,
            retried: f.retried,
        },
        Err(e) => crate::integration::Outcome {
            result: Err(e.rejection),
            timing: e.timing,
            retried: e.retried,
        },
    }
}

/// Metrics, report deltas and the access log of one answered request (every outcome
/// passes here exactly once, when the response head is ready). Everything written here is
/// the current worker's own (`observe::series`), except the access log's queue.
fn record(app: &App, ctx: &RequestContext<'_>, resp: &Response<GatewayBody>) {
    use crate::observe::series;
    let status = resp.status().as_u16();
    // A forwarded request's latency ends when the backend's answer head came (what happens
    // after, until here, is a few header writes): no clock read of its own.
    let ended = ctx.integration.map_or_else(Instant::now, |t| t.ended);
    let latency = ended.saturating_duration_since(ctx.started);
    let integration_elapsed = ctx.integration.map(|t| t.elapsed());
    let method = series::method_index(&ctx.method);
    let integration =
        integration_elapsed.zip(ctx.method_route.map(|m| m.integration.kind().index()));
    let (stage_series, route_series) = match (ctx.api, ctx.stage) {
        (None, _) => series::unknown_host(),
        (Some(api), None) => api.no_stage_series(),
        (Some(_), Some(stage)) => (
            &stage.series,
            match ctx.route {
                Some(r) => stage.route_series(ctx.canary, ctx.route_id, &r.template),
                None => stage.no_route_series(),
            },
        ),
    };
    route_series.count(method, status);
    stage_series.record(
        latency,
        integration,
        ctx.error_code.map(usize::from),
        ctx.auth_failure,
        ctx.retried,
    );
    if ctx.stage.is_some() {
        // The report's day is the answer's, from the worker's clock cache (see `clock`):
        // no wall-clock read per request.
        route_series.report(&series::ReportSample {
            day: crate::clock::unix_day_at(ended),
            method,
            status,
            latency,
            integration: integration_elapsed,
        });
    }
    if let (Some(t), Some(request)) = (&app.tracing, &ctx.trace) {
        // An unsampled request has no span to end (its summary is not even built).
        if request.is_recording() {
            end_server_span(t, request, ctx, status);
        }
    }
    if let Some(log) = &app.access_log {
        log.log(&crate::observe::access_log::Entry {
            time: std::time::SystemTime::now(),
            request_id: ctx.request_id.as_bytes(),
            client_ip: ctx.client_ip,
            api_id: ctx.api.map(|a| a.id.as_bytes()),
            stage: ctx.stage.map(|s| s.name.as_bytes()),
            resource: ctx.route.map(|r| r.template.as_bytes()),
            method,
            status,
            bytes: http_body::Body::size_hint(resp.body()).exact(),
            latency,
            integration_latency: integration_elapsed,
            error_code: ctx.error_code.map(usize::from),
            reason: ctx.auth_failure.map(AuthFailure::index),
            retried: ctx.retried,
        });
    }
}

#[cold]
fn end_server_span(
    t: &crate::observe::trace::Tracing,
    request: &crate::observe::trace::RequestTrace,
    ctx: &RequestContext<'_>,
    status: u16,
) {
    t.end_request(
        request,
        &crate::observe::trace::ServerSummary {
            method: crate::observe::metrics::method_label(&ctx.method),
            route: ctx.route.map(|r| &r.template),
            status,
            client_ip: ctx.client_ip,
            client_ip_text: (ctx.client_ip == ctx.conn.hop_ip)
                .then(|| ctx.conn.forwarded_for.to_str().ok())
                .flatten(),
            scheme: ctx.conn.proto,
            api_id: ctx.api.map(|a| &a.id),
            stage: ctx.stage.map(|s| &s.name),
            api_key_id: ctx.api_key.as_ref().map(|(_, k)| &k.id),
            jwt_sub: ctx
                .jwt
                .as_ref()
                .and_then(|v| v.sub_header.as_ref())
                .and_then(|h| h.to_str().ok()),
            request_id: ctx.request_id.as_str(),
            error_code: ctx
                .error_code
                .map(|c| crate::rejection::CODES[usize::from(c)]),
        },
    );
}
