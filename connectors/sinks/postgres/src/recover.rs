//! Positions and fencing: the offsets table of the table-sink kit
//! (`idem_core::table::offsets`), run on this sink's PostgreSQL client. The
//! position moves inside the batch's transaction, in `sink.rs`.

use crate::error::{Ctx, PgError};
use idem_core::table::offsets::{self, OffsetsSql, FORMAT_VERSION};
use idem_core::table::sql;
use idem_core::{Opened, PartitionRef, StoredPosition};
use tokio_postgres::GenericClient;

pub(crate) async fn create_offsets_table(
    client: &impl GenericClient,
    ctx: &Ctx,
    stmts: &OffsetsSql,
) -> Result<(), PgError> {
    client
        .batch_execute(&stmts.create)
        .await
        .map_err(|e| ctx.sql(&ctx.offsets, "create the offsets table", e))
}

/// Fence and recover: bump the partition's epoch (inserting its row the
/// first time) and return the new epoch with the committed position.
pub(crate) async fn open(
    client: &impl GenericClient,
    ctx: &Ctx,
    stmts: &OffsetsSql,
    p: &PartitionRef,
) -> Result<Opened, PgError> {
    let row = client
        .query_one(
            &stmts.open,
            &[&&*p.connector, &&*p.source, &&*p.partition, &FORMAT_VERSION],
        )
        .await
        .map_err(|e| ctx.sql(&ctx.offsets, &format!("fence partition {p}"), e))?;
    let (epoch, next, format): (i64, Option<i64>, i32) = (row.get(0), row.get(1), row.get(2));
    if !offsets::readable(format) {
        return Err(PgError::FormatVersion {
            server: ctx.server.clone(),
            table: ctx.offsets.clone(),
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

pub(crate) async fn positions(
    client: &impl GenericClient,
    ctx: &Ctx,
    stmts: &OffsetsSql,
    connector: &str,
) -> Result<Vec<StoredPosition>, PgError> {
    let rows = client
        .query(&stmts.positions, &[&connector])
        .await
        .map_err(|e| ctx.sql(&ctx.offsets, "read positions", e))?;
    Ok(rows
        .iter()
        .map(|r| StoredPosition {
            source: r.get(0),
            partition: r.get(1),
            next_offset: r.get::<_, Option<i64>>(2).map(sql::offset_from_sql),
            epoch: r.get(3),
        })
        .collect())
}
