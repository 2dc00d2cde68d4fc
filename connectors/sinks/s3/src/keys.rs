//! Object names and the manifest.

use idem_core::PartitionRef;
use serde::{Deserialize, Serialize};

/// The manifest format this Idem writes and reads. 2 added `segments`: an
/// Idem that knows only 1 would take their objects for orphans.
pub const MANIFEST_FORMAT: u32 = 2;

/// A partition's commit record: the only object Idem replaces, and only by
/// a conditional write. The committed objects are those of `segments`, in
/// order, then `objects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub connector: String,
    pub source: String,
    pub partition: String,
    /// The runner that owns the partition; a commit by an older one fails.
    pub epoch: i64,
    /// Where reading resumes; `None` until the first commit.
    pub next_offset: Option<u64>,
    /// Older committed objects, listed in immutable segment objects so that
    /// the manifest (rewritten on every commit) stays small.
    #[serde(default)]
    pub segments: Vec<SegmentRef>,
    /// The newest committed objects, in offset order.
    pub objects: Vec<Entry>,
}

/// A segment: committed objects moved out of the manifest, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub key: String,
    /// Its objects' offsets lie in `first_offset..next_offset` (the lowest
    /// first offset to the highest next offset).
    pub first_offset: u64,
    pub next_offset: u64,
    pub objects: u64,
    pub records: u64,
}

/// A segment object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub format: u32,
    pub partition: String,
    pub objects: Vec<Entry>,
}

/// One committed object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    /// Its records' offsets lie in `first_offset..next_offset`: its first
    /// record's, to one past its last record's.
    pub first_offset: u64,
    pub next_offset: u64,
    pub records: u64,
    /// Its size as stored.
    pub bytes: u64,
}

/// Bytes outside `[A-Za-z0-9._-]` as `%XX`, so any partition name makes
/// one path segment.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `(topic, partition)` path segments: `orders/3` is topic `orders`,
/// partition `3`; another name (a file) is the source's "topic" and the
/// whole name as partition.
fn segments(p: &PartitionRef) -> (String, String) {
    match p.partition.rsplit_once('/') {
        Some((t, n)) if !t.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (enc(t), n.to_string())
        }
        _ => (enc(&p.source), enc(&p.partition)),
    }
}

/// The epoch in a data object's or a segment's name (`…+7.jsonl.gz`).
pub fn key_epoch(key: &str) -> Option<i64> {
    let name = key.rsplit('/').next()?;
    let (_, tail) = name.rsplit_once('+')?;
    tail.split('.').next()?.parse().ok()
}

/// Keys under `prefix` for one connector.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub extension: &'static str,
}

impl Layout {
    fn connector(&self, connector: &str) -> String {
        format!("{}{}/", self.prefix, enc(connector))
    }

    /// Where a partition's data objects live (and nothing else).
    pub fn data_prefix(&self, p: &PartitionRef) -> String {
        let (t, n) = segments(p);
        format!("{}topic={t}/partition={n}/", self.connector(&p.connector))
    }

    /// `…/topic=orders/partition=3/[dt=2026-11-24/]orders+3+00000000000000001200+7.jsonl.gz`:
    /// the record-time folder if any (`bucket`), the first offset it
    /// holds, zero-padded so names sort by offset, and the epoch of the
    /// runner that wrote it, so a stale runner can never overwrite an
    /// object the owner committed.
    pub fn data_key(
        &self,
        p: &PartitionRef,
        bucket: &str,
        first_offset: u64,
        epoch: i64,
    ) -> String {
        let (t, n) = segments(p);
        format!(
            "{}{bucket}{t}+{n}+{first_offset:020}+{epoch}.{}",
            self.data_prefix(p),
            self.extension
        )
    }

    /// Where a connector's manifests live.
    pub fn manifests_prefix(&self, connector: &str) -> String {
        format!("{}_manifests/", self.connector(connector))
    }

    /// Where a partition's segments live.
    pub fn segments_prefix(&self, p: &PartitionRef) -> String {
        let (t, n) = segments(p);
        format!(
            "{}_segments/topic={t}/partition={n}/",
            self.connector(&p.connector)
        )
    }

    /// A segment is named by the offsets it covers and, like a data
    /// object, by the epoch of the runner that wrote it.
    pub fn segment_key(
        &self,
        p: &PartitionRef,
        first_offset: u64,
        next_offset: u64,
        epoch: i64,
    ) -> String {
        format!(
            "{}{first_offset:020}-{next_offset:020}+{epoch}.json",
            self.segments_prefix(p)
        )
    }

    pub fn manifest_key(&self, p: &PartitionRef) -> String {
        let (t, n) = segments(p);
        format!(
            "{}topic={t}/partition={n}.json",
            self.manifests_prefix(&p.connector)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            prefix: "lake/".into(),
            extension: "jsonl.gz",
        }
    }

    #[test]
    fn kafka_partitions_make_readable_keys_that_sort_by_offset() {
        let p = PartitionRef::new("orders-sink", "kafka", "orders/3");
        let l = layout();
        assert_eq!(
            l.data_key(&p, "", 1200, 7),
            "lake/orders-sink/topic=orders/partition=3/orders+3+00000000000000001200+7.jsonl.gz"
        );
        assert_eq!(
            l.data_key(&p, "dt=2026-11-24/", 1200, 7),
            "lake/orders-sink/topic=orders/partition=3/dt=2026-11-24/orders+3+00000000000000001200+7.jsonl.gz"
        );
        assert!(l.data_key(&p, "", 999, 9) < l.data_key(&p, "", 1200, 1));
        assert_eq!(
            l.manifest_key(&p),
            "lake/orders-sink/_manifests/topic=orders/partition=3.json"
        );
        assert!(l
            .data_key(&p, "dt=x/", 0, 1)
            .starts_with(&l.data_prefix(&p)));
        assert!(!l.manifest_key(&p).starts_with(&l.data_prefix(&p)));
        assert_eq!(
            l.segment_key(&p, 0, 1200, 7),
            "lake/orders-sink/_segments/topic=orders/partition=3/00000000000000000000-00000000000000001200+7.json"
        );
        assert!(!l.segment_key(&p, 0, 1, 1).starts_with(&l.data_prefix(&p)));
        assert!(!l
            .segment_key(&p, 0, 1, 1)
            .starts_with(&l.manifests_prefix("orders-sink")));
        assert_eq!(key_epoch(&l.segment_key(&p, 0, 1200, 7)), Some(7));
        assert_eq!(key_epoch(&l.data_key(&p, "dt=x/", 1200, 12)), Some(12));
        let dotted = PartitionRef::new("c", "kafka", "a.b+c/0");
        assert_eq!(key_epoch(&l.data_key(&dotted, "", 5, 3)), Some(3));
        assert_eq!(key_epoch("lake/c/topic=t/partition=0/notes.txt"), None);
    }

    #[test]
    fn other_names_are_one_escaped_segment() {
        let p = PartitionRef::new("c", "file", "/data/in 1.jsonl");
        let l = layout();
        assert_eq!(
            l.data_prefix(&p),
            "lake/c/topic=file/partition=%2Fdata%2Fin%201.jsonl/"
        );
        // Two partitions never share a data prefix.
        let q = PartitionRef::new("c", "file", "/data/in 10.jsonl");
        assert!(!l.data_prefix(&q).starts_with(&l.data_prefix(&p)));
        let k = PartitionRef::new("c", "kafka", "t/1");
        let k10 = PartitionRef::new("c", "kafka", "t/10");
        assert!(!l.data_prefix(&k10).starts_with(&l.data_prefix(&k)));
    }
}
