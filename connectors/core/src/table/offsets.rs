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
    /// partition, `$5` epoch (bigint); updates one row, or none if fenced.
    pub advance: String,
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
                 WHERE connector = $2 AND source = $3 AND partition = $4 AND epoch = $5"
            ),
            positions: format!(
                "SELECT source, partition, next_offset, epoch FROM {table}
                 WHERE connector = $1 ORDER BY source, partition"
            ),
        }
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
        for stmt in [&s.create, &s.open, &s.advance, &s.positions] {
            assert!(stmt.contains(r#""s"."_idem_offsets""#), "{stmt}");
        }
        // Fencing is the epoch in the WHERE clause of the position update.
        assert!(s.advance.contains("AND epoch = $5"), "{}", s.advance);
        assert!(readable(FORMAT_VERSION) && !readable(FORMAT_VERSION + 1));
    }
}
