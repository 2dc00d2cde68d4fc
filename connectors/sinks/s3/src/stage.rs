//! Objects kept open across batches: a partition's records go onto one
//! open object per folder, batch after batch; its parts go up as they fill
//! (multipart), and the objects close when full or when the partition's
//! staged records have waited `roll_interval`. Then one conditional
//! manifest write names them all with the position after the last batch:
//! the batches between two manifests become visible together, or not at
//! all (a crash leaves unfinished uploads and unnamed objects, which the
//! next owner's recovery removes, and the batches are read again).

use crate::encode::{Encoder, Fill};
use crate::error::{Failure, S3Error};
use crate::keys::Entry;
use crate::part::{fenced, Body, Object, Part};
use crate::sink::S3Sink;
use idem_core::failpoint::{self, AFTER_WRITE};
use idem_core::{Batch, PartitionRef, Record, SinkError};
use std::sync::Arc;
use tracing::{debug, warn};

impl S3Sink {
    /// The batch's records onto the partition's open objects, grouped by
    /// folder, a new object started where one is full, sending parts as
    /// they fill. In chunks of about half a part, so that a batch larger
    /// than a part does not sit whole in an object's buffer beside the
    /// part going up. A retry resumes after the chunks already staged; an
    /// encoding error breaks the partition (its objects may hold part of a
    /// chunk) until it opens again.
    pub(crate) async fn stage(
        &self,
        p: &PartitionRef,
        part: &mut Part,
        batch: &Batch,
    ) -> Result<(), SinkError> {
        let mut from = match part.partial {
            Some((next, from)) if next == batch.next_offset => from,
            Some(_) => {
                let e = S3Error::Broken {
                    partition: p.partition.to_string(),
                    reason: "a batch was left half staged".into(),
                };
                part.broken = Some(e.to_string());
                return Err(e.into());
            }
            None => 0,
        };
        let encoder = part.encoder.clone();
        let encoder = encoder.as_deref().unwrap_or(&self.encoder);
        let chunk = (self.cfg.part_bytes / 2).max(1);
        while from < batch.records.len() {
            let mut to = from;
            let mut weight = 0;
            while to < batch.records.len() && weight < chunk {
                weight += encoder.weight(&batch.records[to]);
                to += 1;
            }
            if let Err(e) = self.stage_records(part, batch, from..to) {
                part.broken = Some(e.to_string());
                return Err(e.into());
            }
            part.partial = Some((batch.next_offset, to));
            from = to;
            self.send_or_fence(p, part).await?;
        }
        part.partial = None;
        part.through = Some(batch.next_offset);
        Ok(())
    }

    fn stage_records(
        &self,
        part: &mut Part,
        batch: &Batch,
        range: std::ops::Range<usize>,
    ) -> Result<(), S3Error> {
        // Columns learnt from the source's schema: objects already open
        // keep theirs and close; new ones take the wider schema.
        if let Some(columns) = &batch.columns {
            let width = part.encoder.as_deref().unwrap_or(&self.encoder).width();
            if columns.len() > width {
                for (_, o) in part.open.drain() {
                    part.closing.push(o.close()?);
                }
                part.encoder = Some(Arc::new(Encoder::new(&self.cfg, columns)));
            }
        }
        let encoder = part.encoder.clone();
        let encoder = encoder.as_deref().unwrap_or(&self.encoder);
        let p = &batch.partition;
        let first = range.start;
        for (bucket, members) in encoder.groups(&batch.records[range]) {
            let members: Vec<usize> = members.into_iter().map(|i| i + first).collect();
            let mut rest = &members[..];
            while let Some(&i) = rest.first() {
                let o = match part.open.get_mut(&bucket) {
                    Some(o) => o,
                    None => {
                        let first = batch.records[i].offset;
                        let o = Object {
                            key: self.layout.data_key(p, &bucket, first, batch.epoch),
                            first_offset: first,
                            next_offset: first,
                            fill: Fill::default(),
                            body: Body::Open(Box::new(encoder.stream()?)),
                            upload: None,
                            sent: 0,
                        };
                        part.open.entry(bucket.clone()).or_insert(o)
                    }
                };
                let mut fill = o.fill;
                let mut taken = 0;
                for &j in rest {
                    if encoder.full(fill) {
                        break;
                    }
                    fill.add(encoder.weight(&batch.records[j]));
                    taken += 1;
                }
                let run: Vec<&Record> = rest[..taken].iter().map(|&j| &batch.records[j]).collect();
                rest = &rest[taken..];
                if let (Some(last), Body::Open(s)) = (run.last(), &mut o.body) {
                    s.append(encoder, &p.partition, &run)?;
                    o.next_offset = last.offset + 1;
                }
                o.fill = fill;
                if encoder.full(fill) {
                    if let Some(o) = part.open.remove(&bucket) {
                        part.closing.push(o.close()?);
                    }
                }
            }
        }
        Ok(())
    }

    /// Past `max_open_bytes` (all partitions' open objects together):
    /// close this partition's Parquet row groups and send what that made
    /// ready; if still past it, commit its objects now, before
    /// `roll_interval`. A backfill through many folders thus commits
    /// early rather than holding its objects in memory.
    pub(crate) async fn keep_within_budget(
        &self,
        p: &PartitionRef,
        part: &mut Part,
    ) -> Result<(), SinkError> {
        let budget = self.cfg.max_open_bytes;
        if part.count() <= budget || part.held == 0 {
            return Ok(());
        }
        for o in part.open.values_mut() {
            if let Body::Open(s) = &mut o.body {
                if let Err(e) = s.close_row_group() {
                    part.broken = Some(e.to_string());
                    return Err(e.into());
                }
            }
        }
        self.send_or_fence(p, part).await?;
        if part.count() > budget {
            debug!(partition = %p.partition, held = part.held, budget, "open objects past max_open_bytes: committing them before roll_interval");
            self.settle(p, part).await?;
        }
        Ok(())
    }

    /// Send what is ready: each open object's full parts, and the objects
    /// that closed, whole. What went up is never sent again; on an error
    /// the rest stays for the next call.
    pub(crate) async fn send(&self, part: &mut Part) -> Result<(), S3Error> {
        let size = self.cfg.part_bytes;
        for o in part.open.values_mut() {
            while o.unsent().len() >= size {
                self.send_part(o, size).await?;
            }
        }
        while let Some(o) = part.closing.first_mut() {
            if o.upload.is_none() && o.unsent().len() <= size {
                let body = o.unsent().clone();
                self.put(&o.key, body).await?;
                o.sent = o.unsent().len() as u64;
            } else {
                while !o.unsent().is_empty() {
                    let n = o.unsent().len().min(size);
                    self.send_part(o, n).await?;
                }
                if let Some((id, parts)) = &o.upload {
                    self.complete_upload(&o.key, id, parts.clone()).await?;
                }
            }
            let o = part.closing.remove(0);
            part.stored.push(Entry {
                key: o.key,
                first_offset: o.first_offset,
                next_offset: o.next_offset,
                records: o.fill.records as u64,
                bytes: o.sent,
            });
        }
        Ok(())
    }

    /// The first `n` unsent bytes of `o` as its next part.
    async fn send_part(&self, o: &mut Object, n: usize) -> Result<(), S3Error> {
        if o.upload.is_none() {
            o.upload = Some((self.start_upload(&o.key).await?, Vec::new()));
        }
        let number = o.upload.as_ref().map_or(0, |(_, parts)| parts.len()) + 1;
        let number = i32::try_from(number).unwrap_or(i32::MAX);
        let chunk = o.unsent()[..n].to_vec();
        let (key, id) = (o.key.clone(), o.upload.as_ref().map(|u| u.0.clone()));
        let done = self
            .put_part(&key, id.as_deref().unwrap_or_default(), number, chunk)
            .await?;
        let unsent = o.unsent();
        unsent.drain(..n);
        // A batch appended at once may have doubled the buffer: give back
        // what the next part will not need.
        if unsent.capacity() > 2 * self.cfg.part_bytes {
            unsent.shrink_to(self.cfg.part_bytes.max(unsent.len()));
        }
        o.sent += n as u64;
        if let Some((_, parts)) = &mut o.upload {
            parts.push(done);
        }
        Ok(())
    }

    /// Close every open object, store them, and commit the manifest naming
    /// them with the position after the last staged batch. `Ok(false)`:
    /// nothing was staged.
    pub(crate) async fn settle(
        &self,
        p: &PartitionRef,
        part: &mut Part,
    ) -> Result<bool, SinkError> {
        if part.fenced {
            return Err(fenced(p, part.manifest.epoch));
        }
        part.check(&p.partition)?;
        if part.partial.is_some() {
            // Never called between a commit's chunks; should it be after a
            // failed commit, the half batch must not be named.
            return Err(S3Error::Broken {
                partition: p.partition.to_string(),
                reason: "a batch is half staged".into(),
            }
            .into());
        }
        if !part.staged() {
            return Ok(false);
        }
        let open: Vec<Object> = part.open.drain().map(|(_, o)| o).collect();
        for o in open {
            match o.close() {
                Ok(o) => part.closing.push(o),
                Err(e) => {
                    part.broken = Some(e.to_string());
                    return Err(e.into());
                }
            }
        }
        self.send_or_fence(p, part).await?;
        let epoch = part.manifest.epoch;
        let mut m = part.manifest.clone();
        let mut stored = part.stored.clone();
        stored.sort_by_key(|e| e.first_offset);
        let mut written: Vec<String> = stored.iter().map(|e| e.key.clone()).collect();
        m.next_offset = part.through;
        // The manifest keeps the newest objects: once it names enough,
        // they move into a segment before this commit's join it.
        if m.objects.len() >= self.cfg.manifest_max_objects {
            self.move_to_segment(p, epoch, &mut m).await?;
            written.extend(m.segments.last().map(|r| r.key.clone()));
        }
        m.objects.append(&mut stored);
        failpoint::hit(AFTER_WRITE);
        let key = self.layout.manifest_key(p);
        let etag = match self.write_manifest(&key, Some(&part.etag), &m).await {
            Ok(etag) => etag,
            Err(Failure::Precondition) => {
                // Either a newer runner owns the partition, or this very
                // write landed and only its answer was lost.
                let first = part.stored.iter().min_by_key(|e| e.first_offset);
                match self.read_manifest(&key).await? {
                    Some((etag, now)) if now == m => etag,
                    Some((_, now)) if self.names(&now, first).await? => {
                        // This write landed, then a newer runner opened the
                        // partition from it: the batches are committed, and
                        // their objects are the new owner's to keep.
                        part.manifest = m;
                        part.stored.clear();
                        part.fence();
                        return Ok(true);
                    }
                    _ => {
                        for key in &written {
                            if let Err(e) = self.delete(key).await {
                                warn!(key, error = %e, "could not remove an object of a fenced commit; the owner's next recovery removes it");
                            }
                        }
                        part.fence();
                        return Err(fenced(p, epoch));
                    }
                }
            }
            Err(f) => return Err(self.other("put manifest", &key, f).into()),
        };
        part.etag = etag;
        part.manifest = m;
        part.stored.clear();
        part.count();
        Ok(true)
    }

    /// [`S3Sink::send`], telling a refused upload apart: when a newer
    /// runner's recovery aborted it, the partition is fenced (stores
    /// answer a part of an aborted upload with 404 or 500 alike); when the
    /// upload is gone otherwise, the staged records are lost and the
    /// partition must open again.
    pub(crate) async fn send_or_fence(
        &self,
        p: &PartitionRef,
        part: &mut Part,
    ) -> Result<(), SinkError> {
        let Err(e) = self.send(part).await else {
            return Ok(());
        };
        let epoch = part.manifest.epoch;
        if let Ok(Some((_, now))) = self.read_manifest(&self.layout.manifest_key(p)).await {
            if now.epoch != epoch {
                part.fence();
                return Err(fenced(p, epoch));
            }
        }
        if matches!(e, S3Error::UploadGone { .. }) {
            part.broken = Some(e.to_string());
        }
        Err(e.into())
    }
}
