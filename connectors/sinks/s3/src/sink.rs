use crate::config::{Compression, Format, S3SinkConfig};
use crate::encode::Encoder;
use crate::error::{Failure, S3Error};
use crate::keys::{Layout, Manifest, MANIFEST_FORMAT};
use crate::part::{fenced, Part};
use async_trait::async_trait;
use aws_sdk_s3::Client;
use idem_config::{ColumnConfig, Guarantee};
use idem_core::failpoint::{self, AFTER_WRITE};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Sink, SinkError, SinkInfo, StoredPosition,
};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OnceCell};
use tracing::debug;

/// Tries to win the manifest when several runners open a partition at once.
const OPEN_ATTEMPTS: u32 = 40;

pub struct S3Sink {
    pub(crate) cfg: S3SinkConfig,
    pub(crate) encoder: Encoder,
    pub(crate) layout: Layout,
    pub(crate) client: OnceCell<Client>,
    /// The partitions this runner opened, each locked while it commits.
    pub(crate) parts: std::sync::Mutex<HashMap<String, Arc<Mutex<Part>>>>,
    /// The memory all partitions' open objects hold (`max_open_bytes`).
    pub(crate) open_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// The store answered "not implemented" to ListMultipartUploads.
    pub(crate) no_upload_listing: AtomicBool,
}

fn key_of(p: &PartitionRef) -> String {
    format!("{}\u{0}{}\u{0}{}", p.connector, p.source, p.partition)
}

impl S3Sink {
    pub fn new(cfg: S3SinkConfig, columns: &[ColumnConfig]) -> Self {
        let encoder = Encoder::new(&cfg, columns);
        let layout = Layout {
            prefix: cfg.prefix.clone(),
            extension: encoder.extension(),
        };
        S3Sink {
            encoder,
            layout,
            cfg,
            client: OnceCell::new(),
            parts: std::sync::Mutex::new(HashMap::new()),
            no_upload_listing: AtomicBool::new(false),
            open_bytes: Arc::default(),
        }
    }

    /// The partition's state, if this runner opened it.
    fn part(&self, p: &PartitionRef) -> Option<Arc<Mutex<Part>>> {
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key_of(p))
            .cloned()
    }
}

#[async_trait]
impl Sink for S3Sink {
    fn info(&self) -> SinkInfo {
        SinkInfo {
            guarantee: Guarantee::ExactlyOnce,
            why: format!(
                "objects are named by partition, first offset and epoch under {}{}; a partition's manifest, replaced only by a conditional write, names exactly the committed objects and the next offset, and recovery deletes any object it does not name",
                self.store(),
                if self.cfg.prefix.is_empty() { String::new() } else { format!("/{}", self.cfg.prefix) }
            ),
            key_columns: Vec::new(),
            deletes: false,
            rows: idem_core::RowShape::append(),
            // Parquet keeps decimals as their digits (text) either way.
            adds_columns: Some(idem_core::AddsColumns {
                decimal: idem_config::ColumnType::Numeric,
            }),
            ids_table: None,
        }
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        let client = self.client().await;
        if let Err(e) = client.head_bucket().bucket(&self.cfg.bucket).send().await {
            let err = match self.fail("head bucket", &self.cfg.bucket, e) {
                Failure::NotFound => S3Error::NoBucket {
                    store: self.store(),
                    bucket: self.cfg.bucket.clone(),
                },
                f => self.other("head bucket", &self.cfg.bucket, f),
            };
            return Err(err.into());
        }
        self.check_conditional_writes().await?;
        Ok(())
    }

    async fn open(&self, p: &PartitionRef) -> Result<Opened, SinkError> {
        let key = self.layout.manifest_key(p);
        // Two runners opening at once: one write wins, the other reads the
        // winner's manifest and goes one epoch higher.
        for attempt in 0..OPEN_ATTEMPTS {
            if attempt > 0 {
                // Spread racing openers out a little.
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() % 20);
                tokio::time::sleep(Duration::from_millis(u64::from(jitter) + 5)).await;
            }
            let current = self.read_manifest(&key).await?;
            let (etag, mut m) = match current {
                Some((etag, m)) => (Some(etag), m),
                None => (
                    None,
                    Manifest {
                        format: MANIFEST_FORMAT,
                        connector: p.connector.to_string(),
                        source: p.source.to_string(),
                        partition: p.partition.to_string(),
                        epoch: 0,
                        next_offset: None,
                        segments: Vec::new(),
                        objects: Vec::new(),
                    },
                ),
            };
            m.epoch += 1;
            m.format = MANIFEST_FORMAT;
            match self.write_manifest(&key, etag.as_deref(), &m).await {
                Ok(new_etag) => {
                    self.recover(p, &m).await?;
                    let opened = Opened {
                        epoch: m.epoch,
                        next_offset: m.next_offset,
                    };
                    // What an earlier open staged is dropped: its uploads
                    // were just aborted, and its batches are read again.
                    self.parts.lock().unwrap_or_else(|e| e.into_inner()).insert(
                        key_of(p),
                        Arc::new(Mutex::new(Part::new(new_etag, m, self.open_bytes.clone()))),
                    );
                    return Ok(opened);
                }
                Err(Failure::Precondition) => {
                    debug!(partition = %p.partition, "another runner opened the partition at the same time; reading its manifest");
                    continue;
                }
                Err(f) => return Err(self.other("put manifest", &key, f).into()),
            }
        }
        Err(S3Error::Request {
            store: self.store(),
            op: "open",
            key,
            message: format!("lost {OPEN_ATTEMPTS} races for the manifest in a row"),
            retriable: true,
        }
        .into())
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let p = &batch.partition;
        let Some(part) = self.part(p) else {
            return Err(fenced(p, batch.epoch));
        };
        let mut part = part.lock().await;
        if part.fenced || part.manifest.epoch != batch.epoch {
            return Err(fenced(p, batch.epoch));
        }
        if !part.holds(&batch) {
            self.stage(p, &mut part, &batch).await?;
        }
        if self.cfg.roll_interval.is_zero() {
            self.settle(p, &mut part).await?;
        } else {
            self.send_or_fence(p, &mut part).await?;
            // The batch is written (open, in parts or in stored objects)
            // and no manifest names it yet.
            failpoint::hit(AFTER_WRITE);
            self.keep_within_budget(p, &mut part).await?;
        }
        Ok(CommitStats {
            written: batch.records.len() as u64,
            deduplicated: 0,
            rejected: 0,
            durable_through: Some(part.durable()),
        })
    }

    fn stage_for(&self) -> Option<Duration> {
        Some(self.cfg.roll_interval).filter(|d| !d.is_zero())
    }

    async fn flush_staged(&self, p: &PartitionRef) -> Result<Option<u64>, SinkError> {
        let Some(part) = self.part(p) else {
            return Ok(None);
        };
        let mut part = part.lock().await;
        if !self.settle(p, &mut part).await? {
            return Ok(None);
        }
        Ok(Some(part.durable()))
    }

    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        let mut out = Vec::new();
        for key in self.list(&self.layout.manifests_prefix(connector)).await? {
            if let Some((_, m)) = self.read_manifest(&key).await? {
                out.push(StoredPosition {
                    source: m.source,
                    partition: m.partition,
                    next_offset: m.next_offset,
                    epoch: m.epoch,
                });
            }
        }
        Ok(out)
    }

    async fn describe(&self) -> Result<String, SinkError> {
        let format = match self.cfg.format {
            Format::Jsonl => "JSON lines",
            Format::Parquet => "Parquet",
        };
        let compression = match self.cfg.compression() {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        };
        Ok(format!(
            "{}/{} ({format}, {compression})",
            self.store(),
            self.cfg.prefix
        ))
    }
}
