//! Recovery when a partition opens: what the manifest names stays, what it
//! does not (objects of a batch that never committed, unfinished uploads)
//! is deleted, and long manifests move into segments.

use crate::error::{status, Failure, S3Error};
use crate::keys::{key_epoch, Entry, Manifest, Segment, SegmentRef, MANIFEST_FORMAT};
use crate::sink::S3Sink;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use idem_core::PartitionRef;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use tracing::{info, warn};

impl S3Sink {
    /// Whether `m` names the object `o` (in its own list or in the segment
    /// covering `o`'s first offset).
    pub(crate) async fn names(&self, m: &Manifest, o: Option<&Entry>) -> Result<bool, S3Error> {
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

    /// Move the manifest's objects into a new segment (written before the
    /// manifest that names it).
    pub(crate) async fn move_to_segment(
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
    pub(crate) async fn recover(&self, p: &PartitionRef, m: &Manifest) -> Result<(), S3Error> {
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
}
