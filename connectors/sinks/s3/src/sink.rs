use crate::config::{Compression, Format, S3SinkConfig};
use crate::encode::Encoder;
use crate::error::S3Error;
use crate::keys::{key_epoch, Entry, Layout, Manifest, Segment, SegmentRef, MANIFEST_FORMAT};
use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use idem_config::{ColumnConfig, Guarantee};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Sink, SinkError, SinkInfo, StoredPosition,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OnceCell};
use tracing::{debug, info, warn};

/// Tries to win the manifest when several runners open a partition at once.
const OPEN_ATTEMPTS: u32 = 40;

/// A partition this runner opened: its epoch and the manifest as last
/// written, with the ETag the next write must match.
#[derive(Clone)]
struct Owned {
    etag: String,
    manifest: Manifest,
}

pub struct S3Sink {
    cfg: S3SinkConfig,
    encoder: Encoder,
    layout: Layout,
    client: OnceCell<Client>,
    owned: Mutex<HashMap<String, Owned>>,
    /// The store answered "not implemented" to ListMultipartUploads.
    no_upload_listing: AtomicBool,
}

/// How a request failed, for the caller to decide.
enum Failure {
    /// 412 (or 409 for a concurrent conditional write): another writer won.
    Precondition,
    NotFound,
    Other(S3Error),
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
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

    fn store(&self) -> String {
        match &self.cfg.endpoint {
            Some(e) => format!("{e}/{}", self.cfg.bucket),
            None => format!("s3://{}", self.cfg.bucket),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .timeout_config(timeouts);
                if let Some(r) = &self.cfg.region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(e) = &self.cfg.endpoint {
                    loader = loader.endpoint_url(e);
                }
                let shared = loader.load().await;
                let mut b = aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(self.cfg.path_style);
                if shared.region().is_none() {
                    // S3-compatible stores rarely care; signing needs one.
                    b = b.region(aws_config::Region::new("us-east-1"));
                }
                Client::from_conf(b.build())
            })
            .await
    }

    /// An SDK error as ours, keeping the store's message.
    fn fail<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = status(&e);
        match code {
            Some(412) => return Failure::Precondition,
            Some(409) if e.code() == Some("ConditionalRequestConflict") => {
                return Failure::Precondition
            }
            Some(404) if e.code() != Some("NoSuchBucket") => return Failure::NotFound,
            _ => {}
        }
        // The store's own code and message when it sent them (a HEAD has
        // no body: then the status), else the whole chain (no answer).
        let message = match (e.code(), e.message(), code) {
            (Some(c), Some(m), _) => format!("{c}: {m}"),
            (Some(c), None, _) => c.to_string(),
            (None, _, Some(status)) => format!("HTTP {status}"),
            _ => DisplayErrorContext(&e).to_string(),
        };
        Failure::Other(match (code, e.code()) {
            (None, _) if matches!(e, SdkError::DispatchFailure(_)) => S3Error::Unreachable {
                store: self.store(),
                message,
            },
            (_, Some("NoSuchBucket")) => S3Error::NoBucket {
                store: self.store(),
                bucket: self.cfg.bucket.clone(),
            },
            (Some(401 | 403), _) => S3Error::Denied {
                store: self.store(),
                bucket: self.cfg.bucket.clone(),
                message,
            },
            (code, _) => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message,
                // No answer, a timeout, throttling or a server error.
                retriable: code.is_none_or(|c| c >= 500 || c == 429 || c == 408),
            },
        })
    }

    /// An SDK error as ours, whatever it was.
    fn req<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let f = self.fail(op, key, e);
        self.other(op, key, f)
    }

    fn other(&self, op: &'static str, key: &str, f: Failure) -> S3Error {
        match f {
            Failure::Other(e) => e,
            Failure::Precondition => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message: "precondition failed".into(),
                retriable: true,
            },
            Failure::NotFound => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message: "not found".into(),
                retriable: false,
            },
        }
    }

    /// An object's bytes and ETag, if it exists.
    async fn get(&self, op: &'static str, key: &str) -> Result<Option<(String, Vec<u8>)>, S3Error> {
        let client = self.client().await;
        let out = match client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                return match self.fail(op, key, e) {
                    Failure::NotFound => Ok(None),
                    f => Err(self.other(op, key, f)),
                }
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out.body.collect().await.map_err(|e| S3Error::Request {
            store: self.store(),
            op,
            key: key.to_string(),
            message: e.to_string(),
            retriable: true,
        })?;
        Ok(Some((etag, body.into_bytes().to_vec())))
    }

    /// A partition's manifest and its ETag, if it has one.
    async fn read_manifest(&self, key: &str) -> Result<Option<(String, Manifest)>, S3Error> {
        let Some((etag, body)) = self.get("get manifest", key).await? else {
            return Ok(None);
        };
        let bad = |message: String| S3Error::BadManifest {
            store: self.store(),
            key: key.to_string(),
            message,
        };
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let found = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
        if found > MANIFEST_FORMAT {
            return Err(S3Error::FormatVersion {
                store: self.store(),
                key: key.to_string(),
                found,
                supported: MANIFEST_FORMAT,
            });
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        Ok(Some((etag, m)))
    }

    /// Replace the manifest if it is still `etag` (or create it when
    /// `etag` is `None`); the new ETag, or `Precondition` if another
    /// writer got there first.
    async fn write_manifest(
        &self,
        key: &str,
        etag: Option<&str>,
        m: &Manifest,
    ) -> Result<String, Failure> {
        let body = serde_json::to_vec_pretty(m)
            .map_err(|e| Failure::Other(S3Error::Encode(e.to_string())))?;
        let req = self
            .client()
            .await
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let req = match etag {
            Some(t) => req.if_match(t),
            None => req.if_none_match("*"),
        };
        match req.send().await {
            Ok(out) => Ok(out.e_tag().unwrap_or_default().to_string()),
            Err(e) => Err(self.fail("put manifest", key, e)),
        }
    }

    /// Every key under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let client = self.client().await;
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = client
                .list_objects_v2()
                .bucket(&self.cfg.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.req("list", prefix, e))?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), S3Error> {
        match self
            .client()
            .await
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.fail("delete", key, e) {
                Failure::NotFound => Ok(()),
                f => Err(self.other("delete", key, f)),
            },
        }
    }

    /// Whether `m` names the object `o` (in its own list or in the segment
    /// covering `o`'s first offset).
    async fn names(&self, m: &Manifest, o: Option<&Pending>) -> Result<bool, S3Error> {
        let Some(o) = o else {
            return Ok(false);
        };
        if m.objects.iter().any(|e| e.key == o.key) {
            return Ok(true);
        }
        for r in &m.segments {
            if r.first_offset <= o.first_offset && o.first_offset < r.next_offset {
                let seg = self.read_segment(&r.key).await?;
                if seg.objects.iter().any(|e| e.key == o.key) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// A segment the manifest names.
    async fn read_segment(&self, key: &str) -> Result<Segment, S3Error> {
        let bad = |message: String| S3Error::BadManifest {
            store: self.store(),
            key: key.to_string(),
            message,
        };
        let Some((_, body)) = self.get("get segment", key).await? else {
            return Err(bad(
                "the manifest names this segment but it is missing".into()
            ));
        };
        serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
    }

    /// Move the manifest's objects into a new segment (written before the
    /// manifest that names it).
    async fn move_to_segment(
        &self,
        p: &PartitionRef,
        epoch: i64,
        m: &mut Manifest,
    ) -> Result<(), S3Error> {
        // With folders, objects of a batch interleave: the range is the
        // lowest first offset to the highest next offset.
        let (Some(first), Some(next)) = (
            m.objects.iter().map(|o| o.first_offset).min(),
            m.objects.iter().map(|o| o.next_offset).max(),
        ) else {
            return Ok(());
        };
        let key = self.layout.segment_key(p, first, next, epoch);
        let r = SegmentRef {
            key: key.clone(),
            first_offset: first,
            next_offset: next,
            objects: m.objects.len() as u64,
            records: m.objects.iter().map(|o| o.records).sum(),
        };
        let segment = Segment {
            format: MANIFEST_FORMAT,
            partition: p.partition.to_string(),
            objects: std::mem::take(&mut m.objects),
        };
        let body = serde_json::to_vec(&segment).map_err(|e| S3Error::Encode(e.to_string()))?;
        self.client()
            .await
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.req("put segment", &key, e))?;
        m.segments.push(r);
        Ok(())
    }

    /// After a crash or a stale runner: remove the data objects and
    /// segments the manifest does not name, and abort uploads that never
    /// completed, under the partition's prefix. Only what an epoch up to
    /// the manifest's wrote is removed: a newer owner's work, should this
    /// runner already be stale, is never touched.
    async fn recover(&self, p: &PartitionRef, m: &Manifest) -> Result<(), S3Error> {
        let prefix = self.layout.data_prefix(p);
        let mut named: HashSet<String> = m.objects.iter().map(|o| o.key.clone()).collect();
        for r in &m.segments {
            named.extend(
                self.read_segment(&r.key)
                    .await?
                    .objects
                    .into_iter()
                    .map(|o| o.key),
            );
        }
        let segments: HashSet<&str> = m.segments.iter().map(|r| r.key.as_str()).collect();
        let orphan = |key: &str, named: bool| !named && key_epoch(key).is_none_or(|e| e <= m.epoch);
        let mut removed = 0;
        for key in self.list(&prefix).await? {
            if orphan(&key, named.contains(&key)) {
                self.delete(&key).await?;
                removed += 1;
            }
        }
        for key in self.list(&self.layout.segments_prefix(p)).await? {
            if orphan(&key, segments.contains(key.as_str())) {
                self.delete(&key).await?;
                removed += 1;
            }
        }
        let client = self.client().await;
        let uploads = match client
            .list_multipart_uploads()
            .bucket(&self.cfg.bucket)
            .prefix(&prefix)
            .send()
            .await
        {
            Ok(u) => u,
            // Some S3-compatible stores cannot list uploads. Their parts are
            // invisible to readers, only billed: say so once and go on.
            Err(e) if status(&e) == Some(501) || e.code() == Some("NotImplemented") => {
                if !self.no_upload_listing.swap(true, Ordering::Relaxed) {
                    warn!(store = %self.store(), "the store cannot list multipart uploads: parts of uploads a crash interrupted stay stored (invisible to readers) until a lifecycle rule (AbortIncompleteMultipartUpload) removes them");
                }
                aws_sdk_s3::operation::list_multipart_uploads::ListMultipartUploadsOutput::builder()
                    .build()
            }
            Err(e) => return Err(self.req("list multipart uploads", &prefix, e)),
        };
        let mut aborted = 0;
        for u in uploads.uploads() {
            if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                // Another runner's upload fails on completion: it is stale.
                if let Err(e) = client
                    .abort_multipart_upload()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    match self.fail("abort multipart upload", key, e) {
                        Failure::NotFound => {}
                        f => return Err(self.other("abort multipart upload", key, f)),
                    }
                }
                aborted += 1;
            }
        }
        if removed + aborted > 0 {
            info!(partition = %p.partition, removed, aborted, "removed objects no manifest names (left by a crash or a stale runner)");
        }
        Ok(())
    }

    /// The batch as objects: grouped by folder, cut by count and size,
    /// each named by its first offset. An object's offsets lie in
    /// `first_offset..next_offset` (its last record's plus one); with
    /// folders, objects of one batch may interleave.
    fn encode(&self, batch: &Batch) -> Result<Vec<Pending>, S3Error> {
        self.encoder
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
                    body: self.encoder.encode(&batch.partition.partition, &records)?,
                })
            })
            .collect()
    }

    async fn upload(&self, o: &Pending) -> Result<(), S3Error> {
        let client = self.client().await;
        let content_type = self.encoder.content_type();
        if o.body.len() <= self.cfg.part_bytes {
            client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&o.key)
                .content_type(content_type)
                .body(ByteStream::from(o.body.clone()))
                .send()
                .await
                .map_err(|e| self.req("put", &o.key, e))?;
            failpoint::hit(MID_WRITE);
            return Ok(());
        }
        let created = client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(&o.key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| self.req("create multipart upload", &o.key, e))?;
        let id = created.upload_id().unwrap_or_default().to_string();
        let mut parts = Vec::new();
        for (i, chunk) in o.body.chunks(self.cfg.part_bytes).enumerate() {
            let n = i32::try_from(i + 1).unwrap_or(i32::MAX);
            let out = client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(&o.key)
                .upload_id(&id)
                .part_number(n)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| self.req("upload part", &o.key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag().map(String::from))
                    .build(),
            );
            failpoint::hit(MID_WRITE);
        }
        client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(&o.key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.req("complete multipart upload", &o.key, e))?;
        Ok(())
    }

    /// `prepare`'s check that the store refuses a second `If-None-Match: *`
    /// write: without it, manifests cannot fence a stale runner.
    async fn check_conditional_writes(&self) -> Result<(), S3Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(
            "{}_idem_probe/{}-{nanos}",
            self.cfg.prefix,
            std::process::id()
        );
        let client = self.client().await;
        let put = || {
            client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        put().await.map_err(|e| self.req("put probe", &key, e))?;
        let second = put().await;
        self.delete(&key).await?;
        match second {
            Ok(_) => Err(S3Error::NoConditionalWrites {
                store: self.store(),
            }),
            Err(e) => match self.fail("put probe", &key, e) {
                Failure::Precondition => Ok(()),
                f => Err(self.other("put probe", &key, f)),
            },
        }
    }
}

/// An object encoded and not yet committed.
struct Pending {
    key: String,
    first_offset: u64,
    next_offset: u64,
    records: u64,
    body: Vec<u8>,
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
