//! One request to the receiver, tried once: retries belong to the
//! runner's single retry policy (`[connectors.NAME.retry]`), which a stop
//! interrupts.

use crate::config::{HttpSinkConfig, Method};
use crate::error::HttpError;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured; beyond it the runner's own backoff
/// decides.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Bytes of a refusal's body kept in its dead-letter reason.
const REASON_BODY_BYTES: usize = 500;

/// What one request came to.
pub(crate) enum Outcome {
    Delivered,
    /// Refused for good (a 4xx): the reason, for the dead letters.
    Refused(String),
}

pub(crate) struct Client {
    http: Result<reqwest::Client, String>,
    token: Result<Option<String>, String>,
    url: String,
    method: Method,
    idempotency_header: String,
    timeout: Duration,
}

impl Client {
    /// No I/O: it connects on the first request.
    pub(crate) fn new(cfg: &HttpSinkConfig) -> Client {
        let token = match &cfg.bearer_token_env {
            None => Ok(None),
            Some(var) => std::env::var(var)
                .inspect(|t| idem_config::redact::register(t))
                .map(Some)
                .map_err(|_| var.clone()),
        };
        Client {
            http: build(cfg),
            token,
            url: cfg.url.clone(),
            method: cfg.method,
            idempotency_header: cfg.idempotency_header.clone(),
            timeout: cfg.timeout,
        }
    }

    pub(crate) fn method(&self) -> &'static str {
        match self.method {
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether requests can be made at all (the client built, the token
    /// found), for the start.
    pub(crate) fn ready(&self) -> Result<(), HttpError> {
        if let Err(e) = &self.http {
            return Err(HttpError::Client(e.clone()));
        }
        if let Err(var) = &self.token {
            return Err(HttpError::MissingToken(var.clone()));
        }
        Ok(())
    }

    /// Send `body` with `key` as its idempotency key, once.
    pub(crate) async fn send(&self, key: &str, body: &[u8]) -> Result<Outcome, HttpError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| HttpError::Client(e.clone()))?;
        let token = self
            .token
            .as_ref()
            .map_err(|var| HttpError::MissingToken(var.clone()))?;
        let method = match self.method {
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
        };
        let mut req = http
            .request(method, &self.url)
            .header(self.idempotency_header.as_str(), key)
            .body(body.to_vec());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let failed = |last: String, retry_after: Option<Duration>| HttpError::Failed {
            method: self.method(),
            url: self.url.clone(),
            last,
            retry_after: retry_after.filter(|d| *d <= MAX_RETRY_AFTER),
        };
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    return Ok(Outcome::Delivered);
                }
                if !retriable(status) {
                    let text = resp.text().await.unwrap_or_default();
                    return Ok(Outcome::Refused(self.refusal(status, &text)));
                }
                Err(failed(
                    format!("HTTP {status}"),
                    retry_after(resp.headers()),
                ))
            }
            Err(e) if e.is_timeout() => {
                Err(failed(format!("no answer within {:?}", self.timeout), None))
            }
            Err(e) if e.is_connect() || e.is_request() || e.is_body() => Err(failed(
                format!("{}; is the receiver running?", error_chain(&e)),
                None,
            )),
            Err(e) => Err(HttpError::Request {
                method: self.method(),
                url: self.url.clone(),
                message: error_chain(&e),
            }),
        }
    }

    fn refusal(&self, status: StatusCode, body: &str) -> String {
        let mut end = body.len().min(REASON_BODY_BYTES);
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        let body = body[..end].trim();
        let mut reason = format!("{} {} refused it: HTTP {status}", self.method(), self.url);
        if status.is_redirection() {
            reason.push_str("; redirects are not followed: point url at the final address");
        }
        if !body.is_empty() {
            reason.push_str(": ");
            reason.push_str(body);
        }
        reason
    }
}

fn build(cfg: &HttpSinkConfig) -> Result<reqwest::Client, String> {
    let mut headers = HeaderMap::new();
    for (k, v) in &cfg.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(v).map_err(|e| e.to_string())?;
        headers.insert(name, value);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        // A redirected POST becomes a GET: refuse rather than guess.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// 408 Request Timeout, 409 Conflict (the same key in flight), 425 Too
/// Early, 429 Too Many Requests and 5xx may pass on a later try.
fn retriable(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn which_answers_are_retried() {
        for s in [408, 409, 425, 429, 500, 502, 503, 504] {
            assert!(retriable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413, 422, 301] {
            assert!(!retriable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
