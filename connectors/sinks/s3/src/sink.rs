use crate::config::{Compression, Format, S3SinkConfig};
use crate::encode::Encoder;
use crate::error::{Failure, S3Error};
use crate::keys::{Entry, Layout, Manifest, MANIFEST_FORMAT};
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
use tracing::{debug, warn};

/// Tries to win the manifest when several runners open a partition at once.
const OPEN_ATTEMPTS: u32 = 40;

/// A partition this runner opened: its epoch and the manifest as last
/// written, with the ETag the next write must match.
#[derive(Clone)]
pub(crate) struct Owned {
    pub(crate) etag: String,
    pub(crate) manifest: Manifest,
}

pub struct S3Sink {
    pub(crate) cfg: S3SinkConfig,
    pub(crate) encoder: Encoder,
    pub(crate) layout: Layout,
    pub(crate) client: OnceCell<Client>,
    pub(crate) owned: Mutex<HashMap<String, Owned>>,
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
            owned: Mutex::new(HashMap::new()),
            no_upload_listing: AtomicBool::new(false),
        }
    }

    /// The batch as objects: grouped by folder, cut by count and size,
    /// each named by its first offset. An object's offsets lie in
    /// `first_offset..next_offset` (its last record's plus one); with
    /// folders, objects of one batch may interleave.
    fn encode(&self, batch: &Batch) -> Result<Vec<Pending>, S3Error> {
        // Columns learnt from the source's schema: the batch's objects
        // take the wider schema (each object carries its own).
        let wider = batch
            .columns
            .as_ref()
            .filter(|c| c.len() > self.encoder.width())
            .map(|c| Encoder::new(&self.cfg, c));
        let encoder = wider.as_ref().unwrap_or(&self.encoder);
        encoder
            .cut(&batch.records)
            .into_iter()
            .map(|cut| {
                let records: Vec<&idem_core::Record> =
                    cut.records.iter().map(|&i| &batch.records[i]).collect();
                let (Some(first), Some(last)) = (records.first(), records.last()) else {
                    return Err(S3Error::Encode("an empty object".into()));
                };
                Ok(Pending {
                    key: self.layout.data_key(
                        &batch.partition,
                        &cut.bucket,
                        first.offset,
                        batch.epoch,
                    ),
                    first_offset: first.offset,
                    next_offset: last.offset + 1,
                    records: records.len() as u64,
                    body: encoder.encode(&batch.partition.partition, &records)?,
                })
            })
            .collect()
    }
}

/// An object encoded and not yet committed.
pub(crate) struct Pending {
    pub(crate) key: String,
    pub(crate) first_offset: u64,
    pub(crate) next_offset: u64,
    pub(crate) records: u64,
    pub(crate) body: Vec<u8>,
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
                    self.owned.lock().await.insert(
                        key_of(p),
                        Owned {
                            etag: new_etag,
                            manifest: m,
                        },
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
        let fenced = || SinkError::Fenced {
            partition: p.partition.to_string(),
            epoch: batch.epoch,
        };
        let Some(owned) = self.owned.lock().await.get(&key_of(p)).cloned() else {
            return Err(fenced());
        };
        if owned.manifest.epoch != batch.epoch {
            return Err(fenced());
        }
        let objects = self.encode(&batch)?;
        for o in &objects {
            self.upload(o).await?;
        }
        let mut m = owned.manifest.clone();
        let mut written: Vec<String> = objects.iter().map(|o| o.key.clone()).collect();
        if m.objects.len() >= self.cfg.manifest_max_objects {
            self.move_to_segment(p, batch.epoch, &mut m).await?;
            written.extend(m.segments.last().map(|r| r.key.clone()));
        }
        failpoint::hit(AFTER_WRITE);
        m.next_offset = Some(batch.next_offset);
        m.objects.extend(objects.iter().map(|o| Entry {
            key: o.key.clone(),
            first_offset: o.first_offset,
            next_offset: o.next_offset,
            records: o.records,
            bytes: o.body.len() as u64,
        }));
        let key = self.layout.manifest_key(p);
        let etag = match self.write_manifest(&key, Some(&owned.etag), &m).await {
            Ok(etag) => etag,
            Err(Failure::Precondition) => {
                // Either a newer runner owns the partition, or this very
                // write landed and only its answer was lost.
                let now = self.read_manifest(&key).await?;
                match now {
                    Some((etag, now)) if now == m => etag,
                    Some((_, now)) if self.names(&now, objects.first()).await? => {
                        // This write landed, then a newer runner opened the
                        // partition from it: the batch is committed, and
                        // its objects are the new owner's to keep.
                        self.owned.lock().await.remove(&key_of(p));
                        return Ok(CommitStats {
                            written: batch.records.len() as u64,
                            deduplicated: 0,
                            rejected: 0,
                            durable_through: None,
                        });
                    }
                    _ => {
                        for key in &written {
                            if let Err(e) = self.delete(key).await {
                                warn!(key, error = %e, "could not remove an object of a fenced commit; the owner's next recovery removes it");
                            }
                        }
                        self.owned.lock().await.remove(&key_of(p));
                        return Err(fenced());
                    }
                }
            }
            Err(f) => return Err(self.other("put manifest", &key, f).into()),
        };
        self.owned
            .lock()
            .await
            .insert(key_of(p), Owned { etag, manifest: m });
        Ok(CommitStats {
            written: batch.records.len() as u64,
            deduplicated: 0,
            rejected: 0,
            durable_through: None,
        })
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
