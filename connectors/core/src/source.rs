use crate::Message;
use async_trait::async_trait;

/// A change in the partitions this runner reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Start reading these partitions (open and fence them in the sink first).
    Assigned(Vec<String>),
    /// Stop reading these partitions: commit or abandon their in-flight batch.
    Revoked(Vec<String>),
}

/// What a [`PartitionReader::read`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// Messages were appended.
    Data,
    /// Nothing new yet (following a live source); call again.
    Idle,
    /// The partition is finished (batch mode): nothing more will come.
    End,
    /// No message, but the partition's position moved from `from` to `to`
    /// over offsets that hold none a reader may see (Kafka transaction
    /// markers, aborted transactions' records): committing `to` loses
    /// nothing, and without it the position would stay short of the end.
    Skipped { from: u64, to: u64 },
}

/// A source error, with where it happened and whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("{source_name} partition {partition}: {message}")]
    Read {
        source_name: String,
        partition: String,
        message: String,
        retriable: bool,
    },
    #[error("{source_name}: {message}")]
    Setup {
        source_name: String,
        message: String,
    },
}

impl SourceError {
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            SourceError::Read {
                retriable: true,
                ..
            }
        )
    }
}

/// A log of partitioned messages.
#[async_trait]
pub trait Source: Send + Sync {
    /// The name stored with positions in the sink (e.g. `file`).
    fn name(&self) -> &str;

    /// The next change of assignment; `None` once no more will come (every
    /// partition of a bounded source was assigned).
    async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError>;

    /// Read `partition` from `start` (a committed `next_offset`), or from
    /// the source's default start when the sink has never seen it.
    async fn open(
        &self,
        partition: &str,
        start: Option<u64>,
    ) -> Result<Box<dyn PartitionReader>, SourceError>;

    /// Read `partition` from its first retained message, for an audit
    /// (`idem verify`): no group membership, nothing acknowledged. The
    /// default opens it as [`Source::open`] does with no position.
    async fn open_audit(&self, partition: &str) -> Result<Box<dyn PartitionReader>, SourceError> {
        self.open(partition, None).await
    }

    /// Tell the source that everything before `next_offset` is committed in
    /// the sink. Advisory (lag tools): correctness never depends on it.
    async fn ack(&self, _partition: &str, _next_offset: u64) -> Result<(), SourceError> {
        Ok(())
    }

    /// The offset after the last message `partition` holds now, when the
    /// source knows it (for lag: end minus committed position).
    async fn end_offset(&self, _partition: &str) -> Option<u64> {
        None
    }

    /// How long the source keeps messages, per topic (or stream) it can
    /// name: `Some(None)` for forever, `None` when it cannot tell. The
    /// dedup stage warns when its own retention is shorter.
    async fn retention(&self) -> Vec<(String, Option<Option<std::time::Duration>>)> {
        Vec::new()
    }

    /// Whether this runner still holds `partition` by the source's own
    /// account, after the sink fenced it. A group member whose partition a
    /// newer runner opened normally loses it soon; one that keeps it (a
    /// stale view that the group confirmed) opens it again. `false` for
    /// sources without a group: two runners on one partition would take it
    /// from each other forever.
    fn still_assigned(&self, _partition: &str) -> bool {
        false
    }
}

/// Reads one partition in order.
#[async_trait]
pub trait PartitionReader: Send {
    /// Append up to `max` messages to `out`. Must be cancel-safe: the
    /// runner may drop a call that waits (a pause, a stop) and, after a
    /// pause, call again with what the dropped call appended to `out` kept
    /// and handed on; no message may be lost or given twice by that.
    async fn read(&mut self, max: usize, out: &mut Vec<Message>)
        -> Result<ReadStatus, SourceError>;

    /// Offsets `from..to` between the sink's position and where this reader
    /// starts that the sink will never receive: the source no longer held
    /// them (retention deleted them before they were committed) and its
    /// configuration said to go on past them. The runner reports them.
    fn lost(&self) -> Option<(u64, u64)> {
        None
    }
}
