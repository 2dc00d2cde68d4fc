//! The offsets table every table sink keeps beside its tables: one row per
//! (connector, source, partition) with the next offset to read and the
//! epoch of the runner that owns the partition. The protocol is the same
//! everywhere, only the client differs: [`OffsetsSql::open`] fences (bumps
//! the epoch, inserting the row the first time) and returns the committed
//! position; [`OffsetsSql::advance`] runs inside the batch's transaction and
//! moves the position only while the batch's epoch still owns the
//! partition (zero rows updated = fenced). The statements are written in
//! the SQL that PostgreSQL, DuckDB and SQLite share: numbered parameters
//! (`$1`), `INSERT .. AS o .. ON CONFLICT .. RETURNING`, `CURRENT_TIMESTAMP`.

/// Bumped when the offsets table's meaning changes; a row written by a
/// newer format is refused rather than misread (see [`readable`]).
pub const FORMAT_VERSION: i32 = 1;

/// The statements of one offsets table.
#[derive(Debug, Clone)]
pub struct OffsetsSql {
    /// Creates the table if it does not exist. No parameters.
    pub create: String,
    /// Fence and recover. `$1` connector, `$2` source, `$3` partition,
    /// `$4` [`FORMAT_VERSION`] (text, text, text, integer); returns one row
    /// (epoch bigint, next_offset bigint or NULL, format_version integer).
    pub open: String,
    /// Move the position. `$1` next offset (bigint, see
    /// [`super::sql::offset_to_sql`]), `$2` connector, `$3` source, `$4`
    /// partition, `$5` epoch (bigint), `$6` the batch's first offset
    /// (bigint), `$7` the batch's [`crate::Batch::attempt`] (integer);
    /// updates one row, or none if fenced, or if on a retry the stored
    /// position lies past the batch's start and not past its end (see
    /// [`unmoved`]). A first try moves the position from wherever it is:
    /// a source reset to its oldest offset (`out_of_range = "earliest"`
    /// after a topic was made anew) starts below it.
    pub advance: String,
    /// The partition's row as it stands. `$1` connector, `$2` source, `$3`
    /// partition; returns (epoch bigint, next_offset bigint or NULL), or
    /// no row.
    pub current: String,
    /// A connector's positions. `$1` connector; returns (source, partition,
    /// next_offset, epoch) ordered by source and partition.
    pub positions: String,
}

impl OffsetsSql {
    /// For the offsets table `table`, already quoted (and qualified by its
    /// schema where the database has schemas).
    pub fn new(table: &str) -> Self {
        OffsetsSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    connector text NOT NULL,
                    source text NOT NULL,
                    partition text NOT NULL,
                    next_offset bigint,
                    epoch bigint NOT NULL,
                    format_version integer NOT NULL,
                    updated_at timestamptz NOT NULL,
                    PRIMARY KEY (connector, source, partition))"
            ),
            open: format!(
                "INSERT INTO {table} AS o VALUES ($1, $2, $3, NULL, 1, $4, CURRENT_TIMESTAMP)
                 ON CONFLICT (connector, source, partition)
                 DO UPDATE SET epoch = o.epoch + 1, updated_at = excluded.updated_at
                 RETURNING epoch, next_offset, format_version"
            ),
            advance: format!(
                "UPDATE {table} SET next_offset = $1, updated_at = CURRENT_TIMESTAMP
                 WHERE connector = $2 AND source = $3 AND partition = $4 AND epoch = $5
                   AND (next_offset IS NULL OR next_offset <= $6 OR next_offset > $1 OR $7 = 0)" // SQLite numbers `$N` parameters in order of appearance:
                                                                                                 // each must appear first after those before it.
            ),
            current: format!(
                "SELECT epoch, next_offset FROM {table}
                 WHERE connector = $1 AND source = $2 AND partition = $3"
            ),
            positions: format!(
                "SELECT source, partition, next_offset, epoch FROM {table}
                 WHERE connector = $1 ORDER BY source, partition"
            ),
        }
    }
}

/// Why [`OffsetsSql::advance`] moved no row, from what
/// [`OffsetsSql::current`] read in the same transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmoved {
    /// A newer runner owns the partition (or its row is gone).
    Fenced,
    /// This epoch already stored the batch's end: an earlier try of this
    /// very batch committed and only its answer was lost. Writing it again
    /// would duplicate it.
    Committed,
    /// This epoch's stored position lies inside the batch: something other
    /// than the runner moved it.
    Conflict(PositionConflict),
}

/// The stored position of a partition lies inside the batch being
/// committed. Never retried: the table was changed by hand or by another
/// program, and writing the batch could duplicate or skip messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partition {partition}: the offsets table holds position {stored}, inside the batch of offsets {first_offset}..{next_offset} being committed, so the batch is not written; only Idem moves positions (was the row edited by hand?): check the table and set the position to where its rows end")]
pub struct PositionConflict {
    pub partition: String,
    pub stored: u64,
    pub first_offset: u64,
    pub next_offset: u64,
}

/// Decide what a zero-row [`OffsetsSql::advance`] meant for `batch`
/// committed under `epoch`. `row` is what [`OffsetsSql::current`]
/// returned: (epoch, next_offset).
pub fn unmoved(row: Option<(i64, Option<i64>)>, batch: &crate::Batch) -> Unmoved {
    let stored = match row {
        Some((e, next)) if e == batch.epoch => next.map(super::sql::offset_from_sql),
        _ => return Unmoved::Fenced,
    };
    match stored {
        Some(s) if s == batch.next_offset => Unmoved::Committed,
        Some(s) if s > batch.first_offset && s < batch.next_offset => {
            Unmoved::Conflict(PositionConflict {
                partition: batch.partition.to_string(),
                stored: s,
                first_offset: batch.first_offset,
                next_offset: batch.next_offset,
            })
        }
        // `advance` would have moved it: the row changed between the two
        // statements, which only a newer runner does.
        _ => Unmoved::Fenced,
    }
}

/// For a sink that keeps the row elsewhere (table properties): `None` if
/// `batch` may move the position `row` holds, as [`OffsetsSql::advance`]
/// would, else why not.
pub fn check(row: Option<(i64, Option<i64>)>, batch: &crate::Batch) -> Option<Unmoved> {
    let moves = |n: i64| {
        let n = super::sql::offset_from_sql(n);
        batch.attempt == 0 || n <= batch.first_offset || n > batch.next_offset
    };
    match row {
        Some((e, next)) if e == batch.epoch && next.is_none_or(moves) => None,
        row => Some(unmoved(row, batch)),
    }
}

/// What to report for a batch [`Unmoved::Committed`] found already
/// committed: its records took effect in the earlier try, so this commit
/// changed nothing, as for copies of records already held.
pub fn committed_before(batch: &crate::Batch) -> crate::CommitStats {
    tracing::warn!(
        partition = %batch.partition,
        first_offset = batch.first_offset,
        next_offset = batch.next_offset,
        "this batch had already committed (the answer to an earlier try was lost with the connection): not written again"
    );
    crate::CommitStats {
        deduplicated: batch.records.len() as u64,
        ..Default::default()
    }
}

/// Whether a row written in `format` can be read by this build.
pub fn readable(format: i32) -> bool {
    format <= FORMAT_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_names_the_table_it_was_made_for() {
        let s = OffsetsSql::new(r#""s"."_idem_offsets""#);
        for stmt in [&s.create, &s.open, &s.advance, &s.current, &s.positions] {
            assert!(stmt.contains(r#""s"."_idem_offsets""#), "{stmt}");
        }
        // Fencing is the epoch in the WHERE clause of the position update.
        assert!(s.advance.contains("AND epoch = $5"), "{}", s.advance);
        assert!(readable(FORMAT_VERSION) && !readable(FORMAT_VERSION + 1));
    }

    fn batch(first_offset: u64, next_offset: u64) -> crate::Batch {
        crate::Batch {
            partition: crate::PartitionRef::new("c", "s", "p"),
            epoch: 7,
            records: Vec::new(),
            columns: None,
            key: None,
            first_offset,
            next_offset,
            attempt: 1,
        }
    }

    #[test]
    fn a_lost_answer_is_told_from_fencing_and_from_a_moved_position() {
        let b = batch(100, 150);
        // The earlier try landed: same epoch, position at the batch's end.
        assert_eq!(unmoved(Some((7, Some(150))), &b), Unmoved::Committed);
        // A newer runner, or the row gone.
        assert_eq!(unmoved(Some((8, Some(150))), &b), Unmoved::Fenced);
        assert_eq!(unmoved(None, &b), Unmoved::Fenced);
        // What `check` lets through: the position at or before the batch.
        assert_eq!(check(Some((7, None)), &b), None);
        assert_eq!(check(Some((7, Some(100))), &b), None);
        assert_eq!(check(Some((7, Some(150))), &b), Some(Unmoved::Committed));
        assert_eq!(check(Some((6, Some(90))), &b), Some(Unmoved::Fenced));
        // Past the batch: a source reset below the stored position.
        assert_eq!(check(Some((7, Some(400))), &b), None);
        // A first try moves it from anywhere.
        let first = crate::Batch {
            attempt: 0,
            ..b.clone()
        };
        assert_eq!(check(Some((7, Some(150))), &first), None);
        // Inside the batch: neither this batch nor its predecessor wrote it.
        match unmoved(Some((7, Some(120))), &b) {
            Unmoved::Conflict(c) => {
                assert_eq!((c.stored, c.first_offset, c.next_offset), (120, 100, 150));
                assert!(c.to_string().contains("position 120, inside"), "{c}");
            }
            other => panic!("{other:?}"),
        }
    }
}
