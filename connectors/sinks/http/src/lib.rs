//! HTTP sink: each message POSTed (or PUT) to an endpoint, its id in an
//! `Idempotency-Key` header; positions kept in the connector's dedup store.
//!
//! An HTTP call cannot join a transaction with a position, so the commit
//! is: every request of the batch answered (2xx, or a 4xx that sends the
//! message to the dead letters), then the position saved in the dedup
//! store under the partition's epoch. A crash in between re-sends some
//! requests with the same keys: a receiver that honours idempotency keys
//! applies each once. Ids already confirmed in the dedup store are not
//! sent again at all (the runner's dedup stage drops them).

mod config;

pub use config::{HttpSinkConfig, Method, Mode};

use async_trait::async_trait;
use futures_util::{stream, StreamExt};
use idem_config::{ColumnConfig, Guarantee};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Record, Rejects, Sink, SinkError, SinkInfo,
    StoredPosition,
};
use idem_dedup_store::{DedupError, DedupStore};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

/// The longest `Retry-After` honoured; beyond it the request fails as
/// retriable and the runner's own backoff takes over.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Bytes of a refusal's body kept in its dead-letter reason.
const REASON_BODY_BYTES: usize = 500;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("{method} {url}: no success after {attempts} tries; last: {last} (retriable)")]
    GaveUp {
        method: &'static str,
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{method} {url}: {message}")]
    Request {
        method: &'static str,
        url: String,
        message: String,
    },
    #[error("bearer_token_env = \"{0}\": the variable is not set")]
    MissingToken(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("positions: {0}")]
    Store(#[from] DedupError),
}

impl HttpError {
    pub fn is_retriable(&self) -> bool {
        match self {
            HttpError::GaveUp { .. } => true,
            HttpError::Store(e) => e.is_retriable(),
            _ => false,
        }
    }
}

impl From<HttpError> for SinkError {
    fn from(e: HttpError) -> Self {
        if let HttpError::Store(DedupError::Lost { store }) = e {
            return SinkError::PositionsLost { store };
        }
        if e.is_retriable() {
            SinkError::Transient(Box::new(e))
        } else {
            SinkError::Permanent(Box::new(e))
        }
    }
}

/// What one request came to.
enum Outcome {
    Delivered,
    /// Refused for good (a 4xx): the reason, for the dead letters.
    Refused(String),
}

pub struct HttpSink {
    cfg: HttpSinkConfig,
    names: Vec<String>,
    client: Result<reqwest::Client, String>,
    token: Result<Option<String>, String>,
    /// Positions (and, in the runner, the ids).
    store: Arc<dyn DedupStore>,
    rejects: Arc<dyn Rejects>,
}

impl HttpSink {
    /// No I/O: the client connects on the first request.
    pub fn new(
        cfg: HttpSinkConfig,
        columns: &[ColumnConfig],
        store: Arc<dyn DedupStore>,
        rejects: Arc<dyn Rejects>,
    ) -> Self {
        let token = match &cfg.bearer_token_env {
            None => Ok(None),
            Some(var) => std::env::var(var)
                .inspect(|t| idem_config::redact::register(t))
                .map(Some)
                .map_err(|_| var.clone()),
        };
        let client = Self::client(&cfg);
        HttpSink {
            names: columns.iter().map(|c| c.name.clone()).collect(),
            cfg,
            client,
            token,
            store,
            rejects,
        }
    }

    fn client(cfg: &HttpSinkConfig) -> Result<reqwest::Client, String> {
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

    fn method(&self) -> &'static str {
        match self.cfg.method {
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }

    fn body(&self, rec: &Record, with_id: bool) -> serde_json::Map<String, serde_json::Value> {
        let mut obj = rec.to_json_object(&self.names, 1);
        if with_id {
            if let Some(id) = &rec.id {
                obj.insert("_idem_id".into(), id.clone().into());
            }
        }
        obj
    }

    /// One request, tried up to `max_attempts` times while the answer says
    /// a retry can help.
    async fn send(&self, key: &str, body: &[u8]) -> Result<Outcome, HttpError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| HttpError::Client(e.clone()))?;
        let token = self
            .token
            .as_ref()
            .map_err(|var| HttpError::MissingToken(var.clone()))?;
        let method = match self.cfg.method {
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
        };
        let mut backoff = self.cfg.initial_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = client
                .request(method.clone(), &self.cfg.url)
                .header(self.cfg.idempotency_header.as_str(), key)
                .body(body.to_vec());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let (last, wait) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return Ok(Outcome::Delivered);
                    }
                    if !retriable(status) {
                        let text = resp.text().await.unwrap_or_default();
                        return Ok(Outcome::Refused(self.refusal(status, &text)));
                    }
                    let wait = retry_after(resp.headers());
                    (format!("HTTP {status}"), wait)
                }
                Err(e) if e.is_timeout() => {
                    (format!("no answer within {:?}", self.cfg.timeout), None)
                }
                Err(e) if e.is_connect() || e.is_request() || e.is_body() => (
                    format!("{}; is the receiver running?", error_chain(&e)),
                    None,
                ),
                Err(e) => {
                    return Err(HttpError::Request {
                        method: self.method(),
                        url: self.cfg.url.clone(),
                        message: error_chain(&e),
                    })
                }
            };
            if attempt >= self.cfg.max_attempts {
                return Err(HttpError::GaveUp {
                    method: self.method(),
                    url: self.cfg.url.clone(),
                    attempts: attempt,
                    last,
                });
            }
            let delay = match wait {
                Some(w) if w <= MAX_RETRY_AFTER => w,
                _ => jitter(backoff),
            };
            debug!(url = %self.cfg.url, key, attempt, delay_ms = delay.as_millis() as u64, "{last}; retrying");
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    fn refusal(&self, status: StatusCode, body: &str) -> String {
        let mut end = body.len().min(REASON_BODY_BYTES);
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        let body = body[..end].trim();
        let mut reason = format!(
            "{} {} refused it: HTTP {status}",
            self.method(),
            self.cfg.url
        );
        if status.is_redirection() {
            reason.push_str("; redirects are not followed: point url at the final address");
        }
        if !body.is_empty() {
            reason.push_str(": ");
            reason.push_str(body);
        }
        reason
    }

    async fn reject(
        &self,
        p: &PartitionRef,
        offset: u64,
        reason: String,
        raw: Vec<u8>,
    ) -> Result<(), SinkError> {
        // Retried with the batch: nothing is stored before the dead letter is.
        self.rejects
            .reject(p, offset, reason, raw)
            .await
            .map_err(SinkError::Transient)
    }

    async fn commit_messages(&self, batch: &Batch) -> Result<CommitStats, SinkError> {
        type Sent = (u64, Vec<u8>, Result<Outcome, HttpError>);
        // Boxed one by one: a lazily mapped iterator of futures trips the
        // compiler's lifetime inference inside an async-trait method.
        let mut sends: Vec<futures_util::future::BoxFuture<'_, Sent>> =
            Vec::with_capacity(batch.records.len());
        for rec in &batch.records {
            let body = serde_json::Value::Object(self.body(rec, false))
                .to_string()
                .into_bytes();
            let key = message_key(&batch.partition, rec);
            sends.push(Box::pin(async move {
                let outcome = self.send(&key, &body).await;
                // Some requests of the batch answered, others not yet.
                failpoint::hit(MID_WRITE);
                (rec.offset, body, outcome)
            }));
        }
        // Unordered: a slow request holds one slot, not the ones behind it.
        // With concurrency = 1 requests still go one by one, in order.
        let answered: Vec<_> = stream::iter(sends)
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        let mut stats = CommitStats::default();
        for (offset, body, outcome) in answered {
            match outcome.map_err(SinkError::from)? {
                Outcome::Delivered => stats.written += 1,
                Outcome::Refused(reason) => {
                    self.reject(&batch.partition, offset, reason, body).await?;
                    stats.rejected += 1;
                }
            }
        }
        Ok(stats)
    }

    async fn commit_array(&self, batch: &Batch) -> Result<CommitStats, SinkError> {
        let mut stats = CommitStats::default();
        if batch.records.is_empty() {
            return Ok(stats);
        }
        let items: Vec<serde_json::Value> = batch
            .records
            .iter()
            .map(|r| serde_json::Value::Object(self.body(r, true)))
            .collect();
        let body = serde_json::to_vec(&items).map_err(|e| SinkError::Permanent(Box::new(e)))?;
        let key = format!(
            "{}/{}@{}-{}",
            batch.partition.connector,
            batch.partition.partition,
            batch.first_offset,
            batch.next_offset
        );
        match self.send(&key, &body).await? {
            Outcome::Delivered => stats.written = batch.records.len() as u64,
            Outcome::Refused(reason) => {
                for (rec, item) in batch.records.iter().zip(&items) {
                    let one = item.to_string().into_bytes();
                    self.reject(
                        &batch.partition,
                        rec.offset,
                        format!("{reason} (the whole array)"),
                        one,
                    )
                    .await?;
                }
                stats.rejected = batch.records.len() as u64;
            }
        }
        Ok(stats)
    }
}

/// The idempotency key of one message: its id (the runner sets it: the
/// configured id, or the partition and offset).
fn message_key(p: &PartitionRef, rec: &Record) -> String {
    match &rec.id {
        Some(id) => id.clone(),
        None => format!("{}/{}@{}", p.connector, p.partition, rec.offset),
    }
}

/// The key of a partition's position in the store.
fn position_key(p: &PartitionRef) -> String {
    format!("{}\t{}", p.source, p.partition)
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

/// Between half and all of `d`, so that runners do not retry in step.
fn jitter(d: Duration) -> Duration {
    use rand::{Rng, SeedableRng};
    d.mul_f64(rand::rngs::SmallRng::from_os_rng().random_range(0.5..=1.0))
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

#[async_trait]
impl Sink for HttpSink {
    fn info(&self) -> SinkInfo {
        let (guarantee, why) = match self.cfg.mode {
            Mode::Message => (
                Guarantee::ExactlyOnce,
                format!(
                    "each message is sent with its id as {}, ids already confirmed are not sent again, and positions are stored after the answers; a crash between a request and its position re-sends it with the same key, so the receiver must honour idempotency keys",
                    self.cfg.idempotency_header
                ),
            ),
            Mode::Array => (
                Guarantee::AtLeastOnce,
                "mode = \"array\": a replay may group messages into different arrays, so the receiver must deduplicate elements by `_idem_id`".to_string(),
            ),
        };
        SinkInfo {
            guarantee,
            why,
            key_columns: Vec::new(),
            deletes: false,
            rows: idem_core::RowShape::append(),
        }
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        if let Err(e) = &self.client {
            return Err(HttpError::Client(e.clone()).into());
        }
        if let Err(var) = &self.token {
            return Err(HttpError::MissingToken(var.clone()).into());
        }
        // Opens the store (a missing Redis is named here, at start).
        self.store.positions().await.map_err(HttpError::from)?;
        Ok(())
    }

    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError> {
        let p = self
            .store
            .open_position(&position_key(partition))
            .await
            .map_err(HttpError::from)?;
        Ok(Opened {
            epoch: p.epoch,
            next_offset: p.next_offset,
        })
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let stats = match self.cfg.mode {
            Mode::Message => self.commit_messages(&batch).await?,
            Mode::Array => self.commit_array(&batch).await?,
        };
        failpoint::hit(AFTER_WRITE);
        let saved = self
            .store
            .save_position(
                &position_key(&batch.partition),
                batch.epoch,
                batch.next_offset,
            )
            .await
            .map_err(HttpError::from)?;
        if !saved {
            warn!(partition = %batch.partition, epoch = batch.epoch, "requests sent, but a newer runner opened the partition: it re-sends them with the same keys");
            return Err(SinkError::Fenced {
                partition: batch.partition.to_string(),
                epoch: batch.epoch,
            });
        }
        Ok(stats)
    }

    async fn positions(&self, _connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        let all = self.store.positions().await.map_err(HttpError::from)?;
        Ok(all
            .into_iter()
            .filter_map(|(key, p)| {
                let (source, partition) = key.split_once('\t')?;
                Some(StoredPosition {
                    source: source.to_string(),
                    partition: partition.to_string(),
                    next_offset: p.next_offset,
                    epoch: p.epoch,
                })
            })
            .collect())
    }

    async fn describe(&self) -> Result<String, SinkError> {
        Ok(format!(
            "{} {} (positions in {})",
            self.method(),
            self.cfg.url,
            self.store.describe()
        ))
    }
}

/// The `http` sink's registry entry.
pub struct HttpKind;

impl idem_core::registry::SinkKind for HttpKind {
    const NAME: &'static str = "http";
    type Config = HttpSinkConfig;

    fn build(
        cfg: &HttpSinkConfig,
        columns: &[ColumnConfig],
        ctx: idem_core::registry::SinkContext,
    ) -> Result<Arc<dyn Sink>, String> {
        let store = ctx
            .store
            .ok_or("the http sink keeps its positions in the dedup store, and none was given")?;
        Ok(Arc::new(HttpSink::new(
            cfg.clone(),
            columns,
            store,
            ctx.rejects,
        )))
    }

    /// Its positions live in the dedup store beside the message ids.
    fn needs_store(_cfg: &HttpSinkConfig) -> bool {
        true
    }
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
