//! The admin HTTP server of `idem run`: health and readiness probes,
//! Prometheus metrics, connector status and control, config reload.
//!
//! Reads are open (probes and scrapers carry no secrets); with
//! `[runner.admin] token_env` set, every request that changes state must
//! carry `Authorization: Bearer <token>`. Requests that change state are
//! refused from a web page of another origin (a foreign `Origin` or
//! `Sec-Fetch-Site`, or a form's content type), so a browser on the same
//! host cannot be made to pause or reload Idem. Every answer passes through
//! [`idem_config::redact`].

use crate::process::Process;
use crate::supervisor::{Command, Refused};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// The routes, over the running process.
pub fn router(process: Arc<Process>, token: Option<String>) -> Router {
    let control = Router::new()
        .route("/connectors/{name}/pause", post(pause))
        .route("/connectors/{name}/resume", post(resume))
        .route("/connectors/{name}/restart", post(restart))
        .route("/reload", post(reload))
        .layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ))
        .layer(middleware::from_fn(refuse_cross_origin));
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/connectors", get(connectors))
        .route("/connectors/{name}", get(connector))
        .merge(control)
        .layer(middleware::map_response(hide_secrets))
        .with_state(process)
}

/// Answers name sinks and errors, which may hold credentials.
async fn hide_secrets(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let shown = match std::str::from_utf8(&bytes) {
        Ok(text) => match idem_config::redact::text(text) {
            std::borrow::Cow::Borrowed(_) => bytes,
            std::borrow::Cow::Owned(t) => t.into(),
        },
        Err(_) => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(shown))
}

/// A browser sends `Origin` (and `Sec-Fetch-Site`) with a cross-origin
/// POST, and may send one without any preflight when its content type is a
/// form's or text: such requests are refused. curl and scripts send none.
async fn refuse_cross_origin(headers: HeaderMap, request: Request, next: Next) -> Response {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let host = value(header::HOST).unwrap_or("");
    let foreign_origin = value(header::ORIGIN).is_some_and(|origin| {
        origin
            .split_once("://")
            .is_none_or(|(_, authority)| !authority.eq_ignore_ascii_case(host))
    });
    let foreign_site = value(header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|site| site != "same-origin" && site != "none");
    let form = value(header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.to_ascii_lowercase();
        !ct.starts_with("application/json")
    });
    if foreign_origin || foreign_site {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "requests that change state are refused from another origin (a web page); send them from curl or a script"})),
        )
            .into_response();
    }
    if form {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({"error": "send no body, or Content-Type: application/json"})),
        )
            .into_response();
    }
    next.run(request).await
}

async fn require_token(
    State(token): State<Arc<Option<String>>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = token.as_deref() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110, 11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim_start());
        if !same(given.as_bytes(), expected.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "this request changes state: send `Authorization: Bearer <token>` with the token from runner.admin.token_env"})),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// Compare without stopping at the first difference, so the time taken
/// does not tell how much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn index() -> Json<serde_json::Value> {
    Json(json!({
        "endpoints": [
            "GET /healthz", "GET /readyz", "GET /metrics",
            "GET /connectors", "GET /connectors/{name}",
            "POST /connectors/{name}/pause", "POST /connectors/{name}/resume",
            "POST /connectors/{name}/restart", "POST /reload"
        ]
    }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(p): State<Arc<Process>>) -> Response {
    let mut all = true;
    let list: Vec<_> = p
        .connectors()
        .iter()
        .map(|c| {
            let r = c.readiness();
            all &= r.ready;
            json!({"name": c.name, "state": c.state(), "ready": r.ready, "reason": r.reason})
        })
        .collect();
    let code = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"ready": all, "connectors": list}))).into_response()
}

async fn metrics(State(p): State<Arc<Process>>) -> Response {
    // Lag is read from the sources now, so a scrape sees the current end.
    for c in p.connectors() {
        c.refresh_metrics();
        p.refresh_source_ends(&c).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics.encode(),
    )
        .into_response()
}

async fn connectors(State(p): State<Arc<Process>>) -> Json<serde_json::Value> {
    let mut list = Vec::new();
    for c in p.connectors() {
        list.push(p.describe(&c).await);
    }
    Json(json!({
        "config": p.config_path.display().to_string(),
        "connectors": list,
    }))
}

fn not_found(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no connector named `{name}`")})),
    )
        .into_response()
}

async fn connector(State(p): State<Arc<Process>>, Path(name): Path<String>) -> Response {
    match p.find(&name) {
        Some(c) => Json(p.describe(&c).await).into_response(),
        None => not_found(&name),
    }
}

fn control(p: &Process, name: &str, cmd: Command, what: &str) -> Response {
    let Some(c) = p.find(name) else {
        return not_found(name);
    };
    match c.command(cmd) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({"name": name, "requested": what, "state": c.state()})),
        )
            .into_response(),
        Err(e @ Refused { .. }) => (
            StatusCode::CONFLICT,
            Json(json!({"error": e.to_string(), "state": e.state})),
        )
            .into_response(),
    }
}

async fn pause(State(p): State<Arc<Process>>, Path(name): Path<String>) -> Response {
    control(&p, &name, Command::Pause, "pause")
}

async fn resume(State(p): State<Arc<Process>>, Path(name): Path<String>) -> Response {
    control(&p, &name, Command::Resume, "resume")
}

async fn restart(State(p): State<Arc<Process>>, Path(name): Path<String>) -> Response {
    control(&p, &name, Command::Restart, "restart")
}

async fn reload(State(p): State<Arc<Process>>) -> Response {
    match p.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e, "changed": false})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
