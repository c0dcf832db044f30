//! The admin listener (`operations.md`, "Admin API"): health, readiness, metrics and the
//! loaded APIs. With `admin.token` set, `/admin/*` and `/v1/*` need the bearer token.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::app::App;
use crate::body::GatewayBody;
use crate::rejection::Rejection;

fn json(status: StatusCode, value: &serde_json::Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(
        serde_json::to_vec(value).unwrap_or_default(),
    ));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    let token = &app.config.admin.token;
    if token.is_empty() {
        return true;
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests so that the comparison is constant-time whatever the lengths.
    use sha2::Digest;
    let a = sha2::Sha256::digest(presented.as_bytes());
    let b = sha2::Sha256::digest(token.as_bytes());
    bool::from(a.ct_eq(&b))
}

/// An admin error: the data plane's JSON error body, plus `errors` for validation problems.
fn admin_error(
    status: StatusCode,
    code: &str,
    message: String,
    rid: &HeaderValue,
    errors: Option<&[crate::snapshot::Issue]>,
) -> Response<GatewayBody> {
    let mut body = serde_json::json!({
        "code": code,
        "message": message,
        "request_id": rid.to_str().unwrap_or(""),
    });
    if let Some(errors) = errors {
        body["errors"] = serde_json::to_value(errors).unwrap_or_default();
    }
    json(status, &body)
}

fn internal_error(rid: &HeaderValue) -> Response<GatewayBody> {
    admin_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL_ERROR",
        "internal error".into(),
        rid,
        None,
    )
}

fn api_not_found(rid: &HeaderValue) -> Response<GatewayBody> {
    admin_error(
        StatusCode::NOT_FOUND,
        "API_NOT_FOUND",
        "no such API is loaded".into(),
        rid,
        None,
    )
}

/// Largest snapshot the admin API accepts.
const MAX_SNAPSHOT_BYTES: usize = 16 * 1024 * 1024;

/// Private key material a JWKS may carry; never returned.
const JWK_SECRET_FIELDS: [&str; 8] = ["k", "d", "p", "q", "dp", "dq", "qi", "oth"];

/// The active snapshot as the admin API shows it: key values and secrets removed.
fn redacted(api: &crate::snapshot::CompiledApi) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(&api.document).unwrap_or_default();
    if let Some(auths) = v.get_mut("auths").and_then(|a| a.as_array_mut()) {
        for auth in auths {
            if let Some(keys) = auth
                .pointer_mut("/verification/jwks/keys")
                .and_then(|k| k.as_array_mut())
            {
                for key in keys.iter_mut().filter_map(|k| k.as_object_mut()) {
                    for f in JWK_SECRET_FIELDS {
                        key.remove(f);
                    }
                }
            }
        }
    }
    v
}

async fn api_by_id(
    app: &Arc<App>,
    method: &Method,
    id: &str,
    req: Request<Incoming>,
    rid: &HeaderValue,
) -> Response<GatewayBody> {
    match *method {
        Method::GET => match app.state.load().api(id) {
            Some(api) => json(StatusCode::OK, &redacted(api)),
            None => api_not_found(rid),
        },
        Method::PUT => {
            use http_body_util::BodyExt;
            let body = match http_body_util::Limited::new(req.into_body(), MAX_SNAPSHOT_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return admin_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "PAYLOAD_TOO_LARGE",
                        format!("a snapshot may be at most {MAX_SNAPSHOT_BYTES} bytes"),
                        rid,
                        None,
                    )
                }
            };
            let (app2, id2) = (app.clone(), id.to_owned());
            let result = app
                .control
                .run(move || crate::reload::push(&app2, &id2, &body))
                .await;
            use crate::reload::PushError;
            match result {
                Some(Ok(revision)) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "api_id": id, "revision": revision }),
                ),
                Some(Err(PushError::Invalid(issues))) => {
                    tracing::warn!(api_id = id, problems = issues.len(), first = %issues[0], "pushed snapshot rejected");
                    admin_error(
                        StatusCode::BAD_REQUEST,
                        "INVALID_SNAPSHOT",
                        format!("the snapshot has {} problem(s)", issues.len()),
                        rid,
                        Some(&issues),
                    )
                }
                Some(Err(PushError::NotNewer { loaded, offered })) => {
                    tracing::warn!(
                        api_id = id,
                        loaded,
                        offered,
                        "pushed snapshot is not newer; rejected"
                    );
                    admin_error(
                        StatusCode::CONFLICT,
                        "REVISION_CONFLICT",
                        format!(
                            "revision {offered} is not newer than the loaded revision {loaded}"
                        ),
                        rid,
                        None,
                    )
                }
                Some(Err(PushError::IdMismatch { path, body })) => admin_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "API_ID_MISMATCH",
                    format!("api.id `{body}` differs from the path's `{path}`"),
                    rid,
                    None,
                ),
                Some(Err(PushError::Persist(e))) => {
                    tracing::error!(api_id = id, error = %e, "pushed snapshot could not be persisted; not loaded");
                    admin_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "INTERNAL_ERROR",
                        "the snapshot could not be persisted".into(),
                        rid,
                        None,
                    )
                }
                None => internal_error(rid),
            }
        }
        Method::DELETE => {
            let (app2, id2) = (app.clone(), id.to_owned());
            match app
                .control
                .run(move || crate::reload::delete(&app2, &id2))
                .await
            {
                Some(true) => json(StatusCode::OK, &serde_json::json!({ "api_id": id })),
                Some(false) => api_not_found(rid),
                None => internal_error(rid),
            }
        }
        _ => admin_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "use GET, PUT or DELETE".into(),
            rid,
            None,
        ),
    }
}

#[derive(serde::Deserialize, Default)]
struct Period {
    stage_name: Option<String>,
    start_date: Option<String>,
    end_date: Option<String>,
    key_id: Option<String>,
}

/// `start_date` and `end_date`: `YYYY-MM-DD`, start ≤ end, at most 31 days apart.
fn period(p: &Period) -> Result<(time::Date, time::Date), String> {
    use crate::observe::report::{parse_date, MAX_RANGE_DAYS};
    let get = |v: &Option<String>, name: &str| -> Result<time::Date, String> {
        let raw = v
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(format!("`{name}` is required (YYYY-MM-DD)"))?;
        parse_date(raw).ok_or(format!("`{name}` must be a date as YYYY-MM-DD"))
    };
    let (start, end) = (
        get(&p.start_date, "start_date")?,
        get(&p.end_date, "end_date")?,
    );
    if end < start {
        return Err("`end_date` is before `start_date`".into());
    }
    if (end - start).whole_days() > MAX_RANGE_DAYS {
        return Err(format!("the period may span at most {MAX_RANGE_DAYS} days"));
    }
    Ok((start, end))
}

async fn v1(app: &Arc<App>, path: &str, query: &str, rid: &HeaderValue) -> Response<GatewayBody> {
    let bad = |m: String| admin_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", m, rid, None);
    let not_found =
        |code: &str, m: &str| admin_error(StatusCode::NOT_FOUND, code, m.into(), rid, None);
    let Ok(q) = serde_urlencoded::from_str::<Period>(query) else {
        return bad("the query string is malformed".into());
    };
    let parts: Vec<&str> = path.trim_start_matches("/v1/apis/").split('/').collect();
    match parts.as_slice() {
        [api_id, "reports"] => {
            let Some(stage) = q.stage_name.as_deref().filter(|s| !s.is_empty()) else {
                return bad("`stage_name` is required".into());
            };
            // An API or stage that is not loaded is a 404, not an empty list that would
            // read as "no traffic" (as the control plane's report page: a deleted stage
            // cannot be queried).
            {
                let state = app.state.load();
                let Some(api) = state.api(api_id) else {
                    return not_found("API_NOT_FOUND", "no such API is loaded");
                };
                if api.stage(stage).is_none() {
                    return not_found("STAGE_NOT_FOUND", "the API has no such stage");
                }
            }
            let (start, end) = match period(&q) {
                Ok(p) => p,
                Err(m) => return bad(m),
            };
            let report = match &app.fleet {
                None => app.reports.report(api_id, stage, start, end),
                Some(fleet) => match app
                    .reports
                    .fleet_report(fleet, api_id, stage, start, end)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        return admin_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "REPORT_STORE_UNAVAILABLE",
                            format!("the fleet's report store failed: {e}"),
                            rid,
                            None,
                        )
                    }
                },
            };
            json(
                StatusCode::OK,
                &serde_json::to_value(report).unwrap_or_default(),
            )
        }
        [api_id, "usage-plans", plan_id, "usage"] => {
            let state = app.state.load();
            let Some(api) = state.api(api_id) else {
                return not_found("API_NOT_FOUND", "no such API is loaded");
            };
            let Some(plan) = api.usage_plans.iter().find(|p| p.id == *plan_id) else {
                return not_found(
                    "USAGE_PLAN_NOT_FOUND",
                    "the API's snapshot has no such usage plan",
                );
            };
            let (start, end) = match period(&q) {
                Ok(p) => p,
                Err(m) => return bad(m),
            };
            let keys: Vec<String> = match q.key_id.as_deref().filter(|k| !k.is_empty()) {
                Some(k) if plan.api_keys.iter().any(|pk| pk.id == k) => vec![k.to_owned()],
                Some(_) => return not_found("API_KEY_NOT_FOUND", "the usage plan has no such key"),
                None => plan.api_keys.iter().map(|k| k.id.clone()).collect(),
            };
            let from = crate::observe::usage::rows_from(plan.rate, start);
            let to = end
                .next_day()
                .unwrap_or(end)
                .midnight()
                .assume_utc()
                .unix_timestamp();
            let rows = match app.quota.usage(plan_id, from, to).await {
                Ok(r) => r,
                Err(e) => {
                    app.metrics
                        .quota_store_errors
                        .with_label_values(&[app.quota.backend()])
                        .inc();
                    return admin_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "QUOTA_STORE_UNAVAILABLE",
                        e.to_string(),
                        rid,
                        None,
                    );
                }
            };
            let items = crate::observe::usage::items(
                &rows,
                &keys,
                plan.limit,
                plan.rate,
                start,
                end,
                time::OffsetDateTime::now_utc(),
            );
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "usage_plan_id": plan_id,
                    "start_date": crate::observe::report::format_date(start),
                    "end_date": crate::observe::report::format_date(end),
                    "items": items,
                }),
            )
        }
        _ => not_found("NOT_FOUND", "no such endpoint"),
    }
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<GatewayBody> {
    let path = req.uri().path().to_owned();
    let path = path.as_str();
    let rid = crate::request_id::next();
    let mut resp = match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if app.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(GatewayBody::full(app.metrics.render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if (p.starts_with("/admin/") || p.starts_with("/v1/")) && !authorized(app, &req) => {
            let mut r = Rejection::Unauthorized(crate::rejection::AuthFailure::MissingToken)
                .into_response(rid.to_str().unwrap_or(""));
            r.headers_mut().remove(http::header::WWW_AUTHENTICATE);
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            r
        }
        (&Method::GET, "/admin/apis") => {
            let state = app.state.load();
            let mut apis: Vec<serde_json::Value> = state
                .apis()
                .map(|a| {
                    // Sorted by name (see `CompiledApi::stages`).
                    let stages: Vec<&str> = a.stages.iter().map(|s| &*s.name).collect();
                    serde_json::json!({
                        "api_id": &*a.id,
                        "name": a.name,
                        "revision": a.revision,
                        "hosts": a.hosts,
                        "stages": stages,
                        "loaded_at": a.loaded_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    })
                })
                .collect();
            apis.sort_by(|a, b| a["api_id"].as_str().cmp(&b["api_id"].as_str()));
            json(StatusCode::OK, &serde_json::json!({ "apis": apis }))
        }
        (&Method::GET, p) if p.starts_with("/v1/apis/") => {
            let query = req.uri().query().unwrap_or("").to_owned();
            v1(app, p, &query, &rid).await
        }
        (m, p) if p.starts_with("/admin/apis/") && !p["/admin/apis/".len()..].contains('/') => {
            let method = m.clone();
            let id = p["/admin/apis/".len()..].to_owned();
            api_by_id(app, &method, &id, req, &rid).await
        }
        _ => {
            let mut r = Response::new(GatewayBody::full(
                serde_json::to_vec(&serde_json::json!({
                    "code": "NOT_FOUND",
                    "message": "no such admin endpoint",
                    "request_id": rid.to_str().unwrap_or(""),
                }))
                .unwrap_or_default(),
            ));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    };
    resp.headers_mut().insert("x-scp-request-id", rid);
    resp
}

/// Serves the admin API until the process exits: it stays up while the data plane drains,
/// so that `/readyz` can say 503.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    loop {
        let accepted = listener.accept().await;
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
