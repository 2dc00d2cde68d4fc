//! A partition's staging state: the manifest this runner last wrote, the
//! objects open or going up, and how far its batches are staged. The
//! requests that move it on are in `stage.rs`.

use crate::encode::{Encoder, Fill, Stream};
use crate::error::S3Error;
use crate::keys::{Entry, Manifest};
use aws_sdk_s3::types::CompletedPart;
use idem_core::{Batch, PartitionRef, SinkError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A partition this runner opened: the manifest as last written (with the
/// ETag the next write must match), and what is staged after it.
pub(crate) struct Part {
    pub(crate) etag: String,
    pub(crate) manifest: Manifest,
    /// The schema new objects are written with, once the source's schema
    /// grew past the configured columns (each object carries its own).
    pub(crate) encoder: Option<Arc<Encoder>>,
    /// Objects taking records, one per folder.
    pub(crate) open: HashMap<String, Object>,
    /// Objects that are full or closed, not yet stored whole.
    pub(crate) closing: Vec<Object>,
    /// Objects stored whole, not yet named by the manifest.
    pub(crate) stored: Vec<Entry>,
    /// The position after the last batch staged.
    pub(crate) through: Option<u64>,
    /// A batch being staged (its `next_offset`) and how many of its
    /// records are staged, while its commit has not returned.
    pub(crate) partial: Option<(u64, usize)>,
    /// A newer runner holds the partition.
    pub(crate) fenced: bool,
    /// Why staging stopped, when an earlier failure left it half done.
    pub(crate) broken: Option<String>,
    /// The memory its objects held when last counted, and the sink's
    /// count of all partitions' (see `max_open_bytes`).
    pub(crate) held: usize,
    open_bytes: Arc<AtomicUsize>,
}

impl Drop for Part {
    fn drop(&mut self) {
        self.open_bytes.fetch_sub(self.held, Ordering::Relaxed);
    }
}

impl Part {
    pub(crate) fn new(etag: String, manifest: Manifest, open_bytes: Arc<AtomicUsize>) -> Self {
        Part {
            held: 0,
            open_bytes,
            through: manifest.next_offset,
            partial: None,
            etag,
            manifest,
            encoder: None,
            open: HashMap::new(),
            closing: Vec::new(),
            stored: Vec::new(),
            fenced: false,
            broken: None,
        }
    }

    /// The position the manifest holds durable.
    pub(crate) fn durable(&self) -> u64 {
        self.manifest.next_offset.unwrap_or(0)
    }

    /// Whether anything is staged past the manifest.
    pub(crate) fn staged(&self) -> bool {
        self.through != self.manifest.next_offset
            || self.partial.is_some()
            || !self.open.is_empty()
            || !self.closing.is_empty()
            || !self.stored.is_empty()
    }

    /// A newer runner holds the partition: what is staged is dropped
    /// (the new owner reads it again), and so is the memory it held.
    pub(crate) fn fence(&mut self) {
        self.fenced = true;
        self.open.clear();
        self.closing.clear();
        self.count();
    }

    /// Whether `batch` was staged already (this is a retry of it).
    pub(crate) fn holds(&self, batch: &Batch) -> bool {
        self.through.is_some_and(|t| batch.next_offset <= t)
    }

    /// Count the memory its objects hold now; all partitions' together.
    pub(crate) fn count(&mut self) -> usize {
        let held: usize = self
            .open
            .values_mut()
            .chain(self.closing.iter_mut())
            .map(Object::memory)
            .sum();
        let before = std::mem::replace(&mut self.held, held);
        if held >= before {
            self.open_bytes.fetch_add(held - before, Ordering::Relaxed) + (held - before)
        } else {
            self.open_bytes.fetch_sub(before - held, Ordering::Relaxed) - (before - held)
        }
    }

    pub(crate) fn check(&self, partition: &str) -> Result<(), S3Error> {
        match &self.broken {
            Some(reason) => Err(S3Error::Broken {
                partition: partition.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// An object being written or going up.
pub(crate) struct Object {
    pub(crate) key: String,
    pub(crate) first_offset: u64,
    pub(crate) next_offset: u64,
    pub(crate) fill: Fill,
    pub(crate) body: Body,
    /// Its multipart upload, once its first part went up.
    pub(crate) upload: Option<(String, Vec<CompletedPart>)>,
    /// Bytes already sent in parts.
    pub(crate) sent: u64,
}

pub(crate) enum Body {
    /// Taking records; its encoded head drains as parts go up.
    Open(Box<Stream>),
    /// Ended: the bytes not yet sent.
    Closed(Vec<u8>),
}

impl Object {
    pub(crate) fn unsent(&mut self) -> &mut Vec<u8> {
        match &mut self.body {
            Body::Open(s) => s.encoded(),
            Body::Closed(b) => b,
        }
    }

    pub(crate) fn memory(&mut self) -> usize {
        match &mut self.body {
            Body::Open(s) => s.memory(),
            Body::Closed(b) => b.capacity(),
        }
    }

    pub(crate) fn close(mut self) -> Result<Object, S3Error> {
        if let Body::Open(s) = std::mem::replace(&mut self.body, Body::Closed(Vec::new())) {
            self.body = Body::Closed(s.finish()?);
        }
        Ok(self)
    }
}

pub(crate) fn fenced(p: &PartitionRef, epoch: i64) -> SinkError {
    SinkError::Fenced {
        partition: p.partition.to_string(),
        epoch,
    }
}
