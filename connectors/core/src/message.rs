use std::fmt;
use std::sync::Arc;

/// One message read from a source, with its position in its partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Position of this message in its partition.
    pub offset: u64,
    /// Position to resume from once this message is committed. Offsets need
    /// not be contiguous (a file's are byte offsets).
    pub next_offset: u64,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone (a delete of the key).
    pub value: Option<Vec<u8>>,
    /// Set by the source when the message is unusable as read (too large,
    /// not UTF-8): it goes to the dead letters with this reason.
    pub poison: Option<String>,
    /// What the source knows beside key and value (Kafka: timestamp and
    /// headers); columns map it with `@timestamp` and `@header/NAME`.
    pub meta: Meta,
}

/// A message's metadata beside key and value.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Meta {
    /// Milliseconds since the Unix epoch, as the source stamped it.
    pub timestamp_ms: Option<i64>,
    /// In order; a name may repeat (the last one wins when mapped).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Message {
    /// Bytes this message weighs in a batch.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Which partition of which source, for which connector: the unit of
/// ordering, fencing and committed positions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionRef {
    pub connector: Arc<str>,
    pub source: Arc<str>,
    pub partition: Arc<str>,
}

impl PartitionRef {
    pub fn new(connector: &str, source: &str, partition: &str) -> Self {
        PartitionRef {
            connector: connector.into(),
            source: source.into(),
            partition: partition.into(),
        }
    }
}

impl fmt::Display for PartitionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.partition)
    }
}
