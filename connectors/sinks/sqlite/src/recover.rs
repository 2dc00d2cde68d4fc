//! Positions and fencing: the offsets table of the table-sink kit
//! (`idem_core::table::offsets`), run on this sink's SQLite connection.

use crate::error::{Ctx, SqliteError};
use idem_core::table::offsets::{self, OffsetsSql, Unmoved, FORMAT_VERSION};
use idem_core::table::sql;
use idem_core::{Batch, Opened, PartitionRef, StoredPosition};
use rusqlite::{params, Connection, OptionalExtension};

pub(crate) fn create_offsets_table(
    conn: &Connection,
    ctx: &Ctx,
    stmts: &OffsetsSql,
) -> Result<(), SqliteError> {
    conn.execute_batch(&stmts.create)
        .map_err(|e| ctx.sql(&ctx.offsets_table, "create the offsets table", e))
}

/// Fence and recover: bump the partition's epoch (inserting its row the
/// first time) and return the new epoch with the committed position.
pub(crate) fn open(
    conn: &Connection,
    ctx: &Ctx,
    stmts: &OffsetsSql,
    p: &PartitionRef,
) -> Result<Opened, SqliteError> {
    let (epoch, next, format): (i64, Option<i64>, i32) = conn
        .query_row(
            &stmts.open,
            params![&*p.connector, &*p.source, &*p.partition, FORMAT_VERSION],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(|e| ctx.sql(&ctx.offsets_table, &format!("fence partition {p}"), e))?;
    if !offsets::readable(format) {
        return Err(SqliteError::FormatVersion {
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

/// Inside the batch's transaction: move the position, only if the batch's
/// epoch still owns the partition and, on a retry, its position is neither
/// at the batch's end nor inside it (`OffsetsSql::advance`). `Some`: it did
/// not move, and why.
pub(crate) fn advance(
    conn: &Connection,
    ctx: &Ctx,
    stmts: &OffsetsSql,
    batch: &Batch,
) -> Result<Option<Unmoved>, SqliteError> {
    let p = &batch.partition;
    let n = conn
        .execute(
            &stmts.advance,
            params![
                sql::offset_to_sql(batch.next_offset),
                &*p.connector,
                &*p.source,
                &*p.partition,
                batch.epoch,
                sql::offset_to_sql(batch.first_offset),
                i64::from(batch.attempt)
            ],
        )
        .map_err(|e| ctx.sql(&ctx.offsets_table, &format!("advance partition {p}"), e))?;
    if n == 1 {
        return Ok(None);
    }
    let row = conn
        .query_row(
            &stmts.current,
            params![&*p.connector, &*p.source, &*p.partition],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()
        .map_err(|e| ctx.sql(&ctx.offsets_table, &format!("read partition {p}"), e))?;
    Ok(Some(offsets::unmoved(row, batch)))
}

/// Positions of `connector`; the offsets table exists once the sink is prepared.
pub(crate) fn positions(
    conn: &Connection,
    ctx: &Ctx,
    stmts: &OffsetsSql,
    connector: &str,
) -> Result<Vec<StoredPosition>, SqliteError> {
    let read = || -> rusqlite::Result<Vec<StoredPosition>> {
        let mut stmt = conn.prepare(&stmts.positions)?;
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
