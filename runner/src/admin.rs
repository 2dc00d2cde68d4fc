//! The admin HTTP server of `idem run`: health and readiness probes,
//! Prometheus metrics, connector status and control, config reload.
//!
//! Reads are open (probes and scrapers carry no secrets); with
//! `[runner.admin] token_env` set, every request that changes state must
//! carry `Authorization: Bearer <token>`.

use crate::app::Process;
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
        ));
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/connectors", get(connectors))
        .route("/connectors/{name}", get(connector))
        .merge(control)
        .with_state(process)
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
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
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
