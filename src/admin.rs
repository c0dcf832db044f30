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
use tokio::sync::watch;

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

pub async fn handle(app: &App, req: Request<Incoming>) -> Response<GatewayBody> {
    let path = req.uri().path();
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
            let mut r = Rejection::Unauthorized.into_response(&rid);
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
                    let mut stages: Vec<&str> = a.stages.keys().map(|s| &**s).collect();
                    stages.sort_unstable();
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

pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
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
