//! Positions and fencing: the offsets table, one row per
//! (connector, source, partition) with the next offset to read and the
//! epoch of the runner that owns the partition.

use crate::error::{Ctx, DuckDbError};
use duckdb::{params, Connection};
use idem_core::sql::{self, q};
use idem_core::{Opened, PartitionRef, StoredPosition};

/// Bumped when the offsets table's meaning changes; a row written by a
/// newer format is refused rather than misread.
pub const FORMAT_VERSION: i32 = 1;

pub(crate) fn create_offsets_table(conn: &Connection, ctx: &Ctx) -> Result<(), DuckDbError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            connector VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            partition VARCHAR NOT NULL,
            next_offset BIGINT,
            epoch BIGINT NOT NULL,
            format_version INTEGER NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (connector, source, partition))",
        q(&ctx.offsets_table)
    );
    conn.execute_batch(&sql)
        .map_err(|e| ctx.sql(&ctx.offsets_table, "create the offsets table", e))
}

/// Fence and recover: bump the partition's epoch (inserting its row the
/// first time) and return the new epoch with the committed position.
pub(crate) fn open(conn: &Connection, ctx: &Ctx, p: &PartitionRef) -> Result<Opened, DuckDbError> {
    let sql = format!(
        "INSERT INTO {t} VALUES (?, ?, ?, NULL, 1, ?, now())
         ON CONFLICT (connector, source, partition)
         DO UPDATE SET epoch = {t}.epoch + 1, updated_at = now()
         RETURNING epoch, next_offset, format_version",
        t = q(&ctx.offsets_table)
    );
    let (epoch, next, format): (i64, Option<i64>, i32) = conn
        .query_row(
            &sql,
            params![&*p.connector, &*p.source, &*p.partition, FORMAT_VERSION],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(|e| ctx.sql(&ctx.offsets_table, &format!("fence partition {p}"), e))?;
    if format > FORMAT_VERSION {
        return Err(DuckDbError::FormatVersion {
            path: ctx.path.clone(),
            table: ctx.offsets_table.clone(),
            partition: p.to_string(),
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Opened {
        epoch,
        next_offset: next.map(sql::offset_from_sql),
    })
}

/// Inside the batch's transaction: move the position, only if `epoch` still
/// owns the partition. `false` means fenced.
pub(crate) fn advance(
    conn: &Connection,
    ctx: &Ctx,
    p: &PartitionRef,
    epoch: i64,
    next_offset: i64,
) -> Result<bool, DuckDbError> {
    let sql = format!(
        "UPDATE {} SET next_offset = ?, updated_at = now()
         WHERE connector = ? AND source = ? AND partition = ? AND epoch = ?",
        q(&ctx.offsets_table)
    );
    let n = conn
        .execute(
            &sql,
            params![next_offset, &*p.connector, &*p.source, &*p.partition, epoch],
        )
        .map_err(|e| ctx.sql(&ctx.offsets_table, &format!("advance partition {p}"), e))?;
    Ok(n == 1)
}

/// Positions of `connector`; the offsets table exists once the sink is prepared.
pub(crate) fn positions(
    conn: &Connection,
    ctx: &Ctx,
    connector: &str,
) -> Result<Vec<StoredPosition>, DuckDbError> {
    let sql = format!(
        "SELECT source, partition, next_offset, epoch FROM {}
         WHERE connector = ? ORDER BY source, partition",
        q(&ctx.offsets_table)
    );
    let read = || -> duckdb::Result<Vec<StoredPosition>> {
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![connector], |r| {
            Ok(StoredPosition {
                source: r.get(0)?,
                partition: r.get(1)?,
                next_offset: r.get::<_, Option<i64>>(2)?.map(sql::offset_from_sql),
                epoch: r.get(3)?,
            })
        })?;
        rows.collect()
    };
    read().map_err(|e| ctx.sql(&ctx.offsets_table, "read positions", e))
}
