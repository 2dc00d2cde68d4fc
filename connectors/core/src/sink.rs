use crate::{PartitionRef, Record};
use async_trait::async_trait;
use idem_config::{Guarantee, WriteMode};
use std::sync::Arc;

/// What a sink declares about itself once configured.
#[derive(Debug, Clone)]
pub struct SinkInfo {
    /// The guarantee this sink's mode gives.
    pub guarantee: Guarantee,
    /// Why, in one sentence a user can check against the docs.
    pub why: String,
    /// Columns that identify a row (upsert, delete); required in every message.
    pub key_columns: Vec<String>,
    /// Whether tombstones delete rows (otherwise they are not recognised).
    pub deletes: bool,
    /// Which rows the messages leave, for `idem verify`.
    pub rows: RowShape,
    /// Whether the sink adds the columns a batch brings (`evolve =
    /// "add_columns"`, see [`Batch::columns`]); `None`: it cannot.
    pub adds_columns: Option<AddsColumns>,
    /// Where it keeps message ids in its own transactions, when it was
    /// built to (`[dedup] store = "sink"`, see
    /// [`crate::registry::SinkContext::keep_ids`]): the table, for
    /// `idem check`. `None`: it keeps none.
    pub ids_table: Option<String>,
}

/// How a sink takes columns learnt from the events' schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddsColumns {
    /// The type a decimal field becomes: `numeric` where the target has an
    /// unbounded decimal, else `text` (the digits kept exactly).
    pub decimal: idem_config::ColumnType,
}

/// Which rows a sink's messages leave: one per message (append), or one
/// per key holding its last (upsert) or first (dedup) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowShape {
    pub mode: WriteMode,
    /// The key columns of upsert and dedup.
    pub key: Vec<String>,
    /// Upsert with a version column: the row holds the key's largest
    /// version, not always its last message.
    pub versioned: bool,
}

impl RowShape {
    /// Every message is a row of its own.
    pub fn append() -> RowShape {
        RowShape {
            mode: WriteMode::Append,
            key: Vec::new(),
            versioned: false,
        }
    }
}

/// A partition opened (fenced) in the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// This runner's fencing token for the partition.
    pub epoch: i64,
    /// Where to resume reading; `None` when the sink never committed it.
    pub next_offset: Option<u64>,
}

/// A position as stored in the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPosition {
    pub source: String,
    pub partition: String,
    pub next_offset: Option<u64>,
    pub epoch: i64,
}

/// Consecutive messages of one partition, committed in one atomic step.
#[derive(Debug, Clone)]
pub struct Batch {
    pub partition: PartitionRef,
    /// The epoch returned by [`Sink::open`]; the commit is refused if it moved.
    pub epoch: i64,
    /// Mapped records, in partition order.
    pub records: Vec<Record>,
    /// With `evolve = "add_columns"`: every column the records' values
    /// follow, the configured ones first, then those learnt from the
    /// events' schemas (which only grow). The sink adds to its target the
    /// ones it lacks, in the batch's transaction. `None`: the configured
    /// columns, as the sink was built with.
    pub columns: Option<Arc<Vec<idem_config::ColumnConfig>>>,
    /// With the key learnt from the message key (a table per source table
    /// and no `key` listed): the table's primary key columns, for the sink
    /// that creates the table with the batch. `None`: the configured key.
    pub key: Option<Arc<Vec<String>>>,
    /// Offset of the first message covered (dead letters included).
    pub first_offset: u64,
    /// The position to resume from after this batch.
    pub next_offset: u64,
    /// 0 on the first try of this batch; the runner's retries count up. A
    /// retry may follow a commit that landed but whose answer was lost:
    /// the table sinks then check their stored position before writing
    /// (see `table::offsets`).
    pub attempt: u32,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Records that changed the sink (inserted, updated or deleted a row).
    pub written: u64,
    /// Records that changed nothing because an equal or newer version of
    /// their key was already there, or came later in the same batch.
    pub deduplicated: u64,
    /// Records the destination refused for good, handed to [`Rejects`].
    pub rejected: u64,
    /// The position this partition's effects are durable through after
    /// the commit. `None`: the batch's own `next_offset`, effects and
    /// position durable together (every table sink). A sink that stages
    /// batches (objects kept open across them, see
    /// [`Sink::flush_staged`]) returns the position its store holds,
    /// which may be behind the batch: the runner then confirms the
    /// batch's message ids and reports its position only once a later
    /// commit or flush makes it durable.
    pub durable_through: Option<u64>,
}

/// A sink error. Every sink maps its own error enum into this one, keeping
/// the message and saying whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A newer runner took the partition: drop it, never retry.
    #[error("partition {partition} is fenced: epoch {epoch} was superseded by a newer runner; this runner drops the partition")]
    Fenced { partition: String, epoch: i64 },
    /// Connection reset, timeout, lock conflict: the whole batch is retried.
    #[error("{0} (transient; will retry)")]
    Transient(Box<dyn std::error::Error + Send + Sync>),
    /// Transient, and the destination said when to call again (HTTP 429 or
    /// 503 with `Retry-After`): the retry waits at least that long.
    #[error("{source} (transient; will retry in {}s or later)", retry_after.as_secs())]
    Busy {
        retry_after: std::time::Duration,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Bad credentials, missing table, schema mismatch: retrying cannot help.
    #[error("{0}")]
    Permanent(Box<dyn std::error::Error + Send + Sync>),
    /// The target refused a value of the batch (out of its range, against
    /// a constraint): the same batch will fail again, but the runner splits
    /// it until the refused records stand alone, dead-letters them with
    /// this reason and commits the rest.
    #[error("{0}")]
    Refused(Box<dyn std::error::Error + Send + Sync>),
    /// The store holding this sink's positions lost its data (a dedup
    /// store restarted empty): the positions and the message ids kept with
    /// them are gone alike. The runner applies the connector's `on_loss`.
    #[error("{store} lost its data: the positions it kept for this sink are gone")]
    PositionsLost { store: String },
}

impl SinkError {
    /// A sink's own error, classed by what the runner should do: a value
    /// the target refused (`refused`: split the batch, dead-letter it), a
    /// failure a retry can help (`retriable`), or neither.
    pub fn classify<E>(e: E, refused: bool, retriable: bool) -> SinkError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        if refused {
            SinkError::Refused(Box::new(e))
        } else if retriable {
            SinkError::Transient(Box::new(e))
        } else {
            SinkError::Permanent(Box::new(e))
        }
    }

    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Transient(_) | SinkError::Busy { .. })
    }

    /// How long the destination asked to be left alone, if it said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            SinkError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Where a sink's rows came from, for `idem verify`: each row's source
/// partition (an index into `partitions`, each name held once) and offset.
/// 16 bytes a row, whatever the partition's name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowPositions {
    pub partitions: Vec<String>,
    pub rows: Vec<(u32, u64)>,
    index: std::collections::HashMap<String, u32>,
}

impl RowPositions {
    /// One more row, from `offset` of `partition`.
    pub fn push(&mut self, partition: &str, offset: u64) {
        let i = match self.index.get(partition) {
            Some(&i) => i,
            None => {
                let i = u32::try_from(self.partitions.len()).unwrap_or(u32::MAX);
                self.index.insert(partition.to_string(), i);
                self.partitions.push(partition.to_string());
                i
            }
        };
        self.rows.push((i, offset));
    }
}

/// A column of an existing target table: its name, and the column type
/// Idem writes it as or else the database's own type name.
pub type TableColumn = (String, Result<idem_config::ColumnType, String>);

/// A destination that commits effects and positions together.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The guarantee and shape this sink gives, from its config alone.
    fn info(&self) -> SinkInfo;

    /// Connect; create or check the target and the offsets storage. Called
    /// once before any partition opens, and by `idem check`.
    async fn prepare(&self) -> Result<(), SinkError>;

    /// Connect and create or check the offsets storage alone, not the
    /// target: for a sink whose target is created later, from what its
    /// first batch carries (a table keyed on a key learnt from the
    /// messages), while its partitions must open now. Then [`Sink::open`]
    /// and [`Sink::positions`] work; [`Sink::prepare`] comes before any
    /// commit.
    async fn prepare_positions(&self) -> Result<(), SinkError> {
        self.prepare().await
    }

    /// Step 1 and 2 of the protocol: fence the partition, return its epoch
    /// and committed position.
    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError>;

    /// Step 3: effects and `batch.next_offset` durable together, or nothing.
    /// The batch is shared so a retry re-sends it whole without a copy.
    ///
    /// A sink that stages (see [`Sink::stage_for`]) may instead keep the
    /// batch's effects pending with the position after them, and say how
    /// far it is durable in [`CommitStats::durable_through`]: staged
    /// batches become durable later, in offset order, each whole or not at
    /// all, with the position after them (a crash loses staged batches,
    /// and they are read again). A retry of a batch it staged already must
    /// not stage it twice.
    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError>;

    /// How long staged effects may wait: once a partition has had effects
    /// staged for this long, the runner calls [`Sink::flush_staged`].
    /// `None` (the default): this sink never stages; every commit is
    /// durable.
    fn stage_for(&self) -> Option<std::time::Duration> {
        None
    }

    /// Make durable what this partition's commits staged (close its open
    /// objects, write its position), and return the position now durable:
    /// called when the partition's staged effects reach
    /// [`Sink::stage_for`], and when it stops reading (end of input,
    /// shutdown) with effects staged. `None`: nothing was staged.
    /// [`SinkError::Fenced`] when a newer runner holds the partition: what
    /// was staged is dropped, and the new owner reads it again.
    async fn flush_staged(&self, _partition: &PartitionRef) -> Result<Option<u64>, SinkError> {
        Ok(None)
    }

    /// Whether the target can store `record`; `Err(reason)` sends it to the
    /// dead letters when it is mapped (a NUL character PostgreSQL text
    /// cannot hold, a date out of the target's range), before it can fail
    /// a batch. Values the sink cannot judge in advance surface as
    /// [`SinkError::Refused`] at commit.
    fn check_record(&self, _record: &Record) -> Result<(), String> {
        Ok(())
    }

    /// Committed positions of `connector`, for `idem status`.
    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError>;

    /// The columns of its existing target table, in the table's order, the
    /// position columns left out: each with the column type Idem writes it
    /// as, or `Err` with the database's type when Idem writes none such
    /// (for `columns_from = "table"`; after [`Sink::prepare`]). `None`:
    /// the sink has no table to read.
    async fn existing_columns(&self) -> Result<Option<Vec<TableColumn>>, SinkError> {
        Ok(None)
    }

    /// One line on what the sink holds now (e.g. a table's row count).
    async fn describe(&self) -> Result<String, SinkError>;

    /// Files the sink wrote that no committed state names (a batch's files
    /// written, then a crash or a fence before its commit), one line each,
    /// for `idem verify` to list: readers never see them. Empty when there
    /// are none or the sink removes them itself.
    async fn leftovers(&self) -> Result<Vec<String>, SinkError> {
        Ok(Vec::new())
    }

    /// The source position (partition, offset) every row was written from,
    /// one entry per row, for `idem verify`; `None` when this sink cannot
    /// list its rows.
    async fn row_positions(&self) -> Result<Option<RowPositions>, SinkError> {
        Ok(None)
    }

    /// Every row's `columns` (name, type) as canonical text
    /// ([`crate::table::audit`]), for `idem verify --against`; `None` when
    /// this sink cannot read its rows back.
    async fn canonical_rows(
        &self,
        _columns: &[(String, idem_config::ColumnType)],
    ) -> Result<Option<Vec<Vec<Option<String>>>>, SinkError> {
        Ok(None)
    }

    /// Called once when the run ends with no batch in flight. Everything
    /// committed is already durable; this only leaves the destination tidy
    /// for the next start (DuckDB folds its write-ahead log into the file,
    /// so the next open does not replay it into memory).
    async fn close(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Where a sink puts records its destination refused for good (an HTTP
/// 4xx): the dead letters, made durable before the call returns, so the
/// batch's position is stored only after them.
#[async_trait]
pub trait Rejects: Send + Sync {
    /// `raw` is what was sent (the request body). An error means the dead
    /// letter may not be durable: the batch must not commit.
    async fn reject(
        &self,
        partition: &PartitionRef,
        offset: u64,
        reason: String,
        raw: Vec<u8>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

#[cfg(test)]
mod tests {
    use super::RowPositions;

    #[test]
    fn row_positions_hold_each_partition_name_once() {
        let mut rows = RowPositions::default();
        for (p, o) in [("t/0", 5), ("t/1", 1), ("t/0", 7)] {
            rows.push(p, o);
        }
        assert_eq!(rows.partitions, ["t/0", "t/1"]);
        assert_eq!(rows.rows, [(0, 5), (1, 1), (0, 7)]);
    }
}
