//! A receiver for the HTTP sink's tests, on 127.0.0.1: records every
//! request, applies each idempotency key once (as a receiver that honours
//! keys does), and fails some requests on purpose: 500 before applying,
//! 429 with `Retry-After`, 503 after applying (the effect happened, the
//! answer says otherwise), and answers slower than the client's timeout.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which requests fail, by their arrival number `n`: each fault fires when
/// `n % every == phase` (0 = never).
#[derive(Clone, Copy, Default)]
pub struct Faults {
    pub error_500_every: u64,
    pub throttle_429_every: u64,
    pub error_503_after_apply_every: u64,
    pub slow_every: u64,
    pub slow: Duration,
}

impl Faults {
    pub fn none() -> Self {
        Faults::default()
    }

    /// About one request in six fails one way or another.
    pub fn some() -> Self {
        Faults {
            error_500_every: 29,
            throttle_429_every: 31,
            error_503_after_apply_every: 37,
            slow_every: 41,
            slow: Duration::from_millis(700),
        }
    }
}

#[derive(Default)]
pub struct Log {
    /// Every request: (idempotency key, body).
    pub requests: Vec<(String, serde_json::Value)>,
    /// The effects: the body of each key's first applied request, in order.
    pub effects: Vec<(String, serde_json::Value)>,
    applied: HashSet<String>,
    /// Requests refused on purpose, by status.
    pub faults: HashMap<u16, u64>,
    /// Requests refused because of their content or headers.
    pub refused: u64,
    /// Authorization header values seen.
    pub auth: HashSet<String>,
    /// Values of the `X-Test` header seen.
    pub x_test: HashSet<String>,
}

struct Shared {
    log: Mutex<Log>,
    faults: Faults,
    token: Option<String>,
}

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Listening on a free port; `token`: the bearer token it requires.
    pub fn start(faults: Faults, token: Option<&str>) -> Receiver {
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            faults,
            token: token.map(str::to_string),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new()
                    .route("/events", axum::routing::post(handle).put(handle))
                    .with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Receiver {
            url,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.shared.log.lock().unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let f = s.faults;
    let fires = |every: u64, phase: u64, n: u64| every > 0 && n % every == phase;
    let (slow, status) = {
        let mut log = s.log.lock().unwrap();
        let n = log.requests.len() as u64;
        log.requests
            .push((key.clone().unwrap_or_default(), doc.clone()));
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        log.auth.insert(auth.clone());
        if let Some(x) = headers.get("x-test").and_then(|v| v.to_str().ok()) {
            log.x_test.insert(x.to_string());
        }
        if let Some(t) = &s.token {
            if auth != format!("Bearer {t}") {
                log.refused += 1;
                return (StatusCode::UNAUTHORIZED, "bad token").into_response();
            }
        }
        let Some(key) = key else {
            log.refused += 1;
            return (StatusCode::BAD_REQUEST, "no Idempotency-Key").into_response();
        };
        if doc.get("reject").and_then(|v| v.as_bool()) == Some(true) {
            log.refused += 1;
            return (StatusCode::UNPROCESSABLE_ENTITY, "this event is refused").into_response();
        }
        if fires(f.error_500_every, 2, n) {
            *log.faults.entry(500).or_default() += 1;
            return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
        }
        if fires(f.throttle_429_every, 3, n) {
            *log.faults.entry(429).or_default() += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response();
        }
        if log.applied.insert(key.clone()) {
            log.effects.push((key, doc));
        }
        if fires(f.error_503_after_apply_every, 4, n) {
            *log.faults.entry(503).or_default() += 1;
            (false, StatusCode::SERVICE_UNAVAILABLE)
        } else if fires(f.slow_every, 5, n) {
            *log.faults.entry(0).or_default() += 1;
            (true, StatusCode::OK)
        } else {
            (false, StatusCode::OK)
        }
    };
    if slow {
        tokio::time::sleep(f.slow).await;
    }
    (status, "ok").into_response()
}
