//! The HTTP sink: requests for a batch, then its position in the dedup
//! store.

use crate::client::{Client, Outcome};
use crate::config::{HttpSinkConfig, Mode};
use crate::error::HttpError;
use async_trait::async_trait;
use futures_util::{stream, StreamExt};
use idem_config::{ColumnConfig, Guarantee};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Record, Rejects, Sink, SinkError, SinkInfo,
    StoredPosition,
};
use idem_dedup_store::DedupStore;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tracing::warn;

pub struct HttpSink {
    cfg: HttpSinkConfig,
    names: Vec<String>,
    client: Client,
    /// Positions (and, in the runner, the ids).
    store: Arc<dyn DedupStore>,
    rejects: Arc<dyn Rejects>,
    /// Per partition, the batch being tried and the offsets of it already
    /// answered for good (delivered, or refused and dead-lettered): a retry
    /// of the batch sends only the rest.
    answered: Mutex<HashMap<String, Answered>>,
}

/// What earlier tries of one batch settled.
#[derive(Default)]
struct Answered {
    /// The batch: epoch, first and next offset.
    batch: (i64, u64, u64),
    delivered: HashSet<u64>,
    refused: HashSet<u64>,
}

impl HttpSink {
    /// No I/O: the client connects on the first request.
    pub fn new(
        cfg: HttpSinkConfig,
        columns: &[ColumnConfig],
        store: Arc<dyn DedupStore>,
        rejects: Arc<dyn Rejects>,
    ) -> Self {
        HttpSink {
            names: columns.iter().map(|c| c.name.clone()).collect(),
            client: Client::new(&cfg),
            cfg,
            store,
            rejects,
            answered: Mutex::default(),
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

    /// Offsets of `batch` settled by earlier tries of it (none for a new
    /// batch, which replaces what an older one left).
    fn settled(&self, batch: &Batch) -> (HashSet<u64>, HashSet<u64>) {
        let id = (batch.epoch, batch.first_offset, batch.next_offset);
        let Ok(mut all) = self.answered.lock() else {
            return Default::default();
        };
        let entry = all
            .entry(batch.partition.partition.to_string())
            .or_default();
        if entry.batch != id {
            *entry = Answered {
                batch: id,
                ..Default::default()
            };
        }
        (entry.delivered.clone(), entry.refused.clone())
    }

    /// Remember that `offset` of `batch` was answered for good.
    fn settle(&self, batch: &Batch, offset: u64, delivered: bool) {
        if let Ok(mut all) = self.answered.lock() {
            if let Some(entry) = all.get_mut(batch.partition.partition.as_ref()) {
                if entry.batch == (batch.epoch, batch.first_offset, batch.next_offset) {
                    if delivered {
                        entry.delivered.insert(offset);
                    } else {
                        entry.refused.insert(offset);
                    }
                }
            }
        }
    }

    fn forget(&self, partition: &PartitionRef) {
        if let Ok(mut all) = self.answered.lock() {
            all.remove(partition.partition.as_ref());
        }
    }

    /// Every message of the batch answered for good, or the first failure
    /// (retriable ones are retried by the runner, with the batch: the
    /// requests already answered are not sent again).
    async fn commit_messages(&self, batch: &Batch) -> Result<CommitStats, SinkError> {
        type Sent = (u64, Vec<u8>, Result<Outcome, HttpError>);
        let (delivered, refused) = self.settled(batch);
        // Boxed one by one: a lazily mapped iterator of futures trips the
        // compiler's lifetime inference inside an async-trait method.
        let mut sends: Vec<futures_util::future::BoxFuture<'_, Sent>> =
            Vec::with_capacity(batch.records.len());
        for rec in &batch.records {
            if delivered.contains(&rec.offset) || refused.contains(&rec.offset) {
                continue;
            }
            let body = serde_json::Value::Object(self.body(rec, false))
                .to_string()
                .into_bytes();
            let key = message_key(&batch.partition, rec);
            sends.push(Box::pin(async move {
                let outcome = self.client.send(&key, &body).await;
                // Some requests of the batch answered, others not yet.
                failpoint::hit(MID_WRITE);
                (rec.offset, body, outcome)
            }));
        }
        // Unordered: a slow request holds one slot, not the ones behind it.
        // With concurrency = 1 requests still go one by one, in order.
        let answers: Vec<_> = stream::iter(sends)
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        // Earlier tries' answers count with this one's.
        let (mut written, mut rejected) = (delivered.len() as u64, refused.len() as u64);
        let mut first_failure = None;
        for (offset, body, outcome) in answers {
            match outcome {
                Ok(Outcome::Delivered) => {
                    self.settle(batch, offset, true);
                    written += 1;
                }
                Ok(Outcome::Refused(reason)) => {
                    self.reject(&batch.partition, offset, reason, body).await?;
                    self.settle(batch, offset, false);
                    rejected += 1;
                }
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_failure {
            return Err(e.into());
        }
        Ok(CommitStats {
            written,
            rejected,
            ..Default::default()
        })
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
        match self.client.send(&key, &body).await? {
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
            adds_columns: None,
            ids_table: None,
        }
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        self.client.ready()?;
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
        // Committed: this batch's answers are no longer needed.
        self.forget(&batch.partition);
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
            self.client.method(),
            self.client.url(),
            self.store.describe()
        ))
    }
}
