use idem_config::{ColumnConfig, Invalid, Validate};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// `[connectors.NAME.sink]` with `type = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where requests go: `http://` or `https://`. A password in it is
    /// sent, never printed.
    #[serde(deserialize_with = "idem_config::interp::url")]
    pub url: String,
    /// `POST` (default) or `PUT`.
    #[serde(default)]
    pub method: Method,
    /// `message`: one request per message, its columns as a JSON object,
    /// with the message id as the idempotency key (exactly-once with a
    /// receiver that honours the key). `array`: one request per batch, a
    /// JSON array whose elements carry their id in `_idem_id`
    /// (at-least-once: a replay may group messages differently, so the
    /// receiver must deduplicate elements by `_idem_id`).
    #[serde(default)]
    pub mode: Mode,
    /// Headers sent with every request (`${VAR}` expands).
    #[serde(default, deserialize_with = "registered_headers")]
    pub headers: BTreeMap<String, String>,
    /// The header that carries the message id.
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
    /// An environment variable holding a bearer token, sent as
    /// `Authorization: Bearer ...` (never logged).
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// One request's time limit, connection included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Moved to `[connectors.NAME.retry]`: one retry policy governs every
    /// request and batch. Kept only to say so at start.
    #[serde(default)]
    max_attempts: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    initial_backoff: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    max_backoff: Option<serde::de::IgnoredAny>,
    /// Requests in flight at once within a batch (`mode = "message"`).
    /// 1 keeps the partition's order; more is faster but the receiver may
    /// see messages out of order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    #[default]
    Post,
    Put,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Message,
    Array,
}

fn registered_headers<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    // `${VAR}` is already expanded (the whole document is).
    let headers = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &headers {
        // Credentials in headers are sent, never printed.
        let name = k.to_ascii_lowercase();
        if ["auth", "token", "key", "secret", "cookie", "password"]
            .iter()
            .any(|s| name.contains(s))
        {
            idem_config::redact::register(v);
        }
    }
    Ok(headers)
}

fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_concurrency() -> usize {
    8
}

impl Validate for HttpSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if columns.is_empty() {
            return Err(Invalid::new(
                &[],
                "the http sink needs [[columns]]: they make each request's JSON body",
            ));
        }
        let scheme_ok = self.url.starts_with("http://") || self.url.starts_with("https://");
        if !scheme_ok || reqwest::Url::parse(&self.url).is_err() {
            return Err(Invalid::new(
                &["url"],
                format!("`{}` is not an http:// or https:// URL", self.url),
            ));
        }
        for name in self.headers.keys().chain([&self.idempotency_header]) {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(Invalid::new(
                    &["headers"],
                    format!("`{name}` is not a valid header name"),
                ));
            }
        }
        for (name, value) in &self.headers {
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(Invalid::new(
                    &["headers", name],
                    "is not a valid header value",
                ));
            }
        }
        if let Some(var) = &self.bearer_token_env {
            if var.is_empty() {
                return Err(Invalid::new(
                    &["bearer_token_env"],
                    "names no environment variable",
                ));
            }
        }
        for (key, set) in [
            ("max_attempts", self.max_attempts.is_some()),
            ("initial_backoff", self.initial_backoff.is_some()),
            ("max_backoff", self.max_backoff.is_some()),
        ] {
            if set {
                return Err(Invalid::new(
                    &[key],
                    format!("the http sink's retries moved to the connector's [retry] table: write `{key} = ...` under [connectors.NAME.retry] (one retry policy now governs each request and each batch, and a stop interrupts its waits)"),
                ));
            }
        }
        if self.concurrency == 0 {
            return Err(Invalid::new(&["concurrency"], "must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(Invalid::new(&["timeout"], "must be longer than zero"));
        }
        Ok(())
    }
}
