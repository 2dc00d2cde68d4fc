//! Positions and fencing: the offsets table, one row per
//! (connector, source, partition) with the next offset to read and the
//! epoch of the runner that owns the partition.

use crate::error::{Ctx, PgError};
use idem_core::sql;
use idem_core::{Opened, PartitionRef, StoredPosition};
use tokio_postgres::GenericClient;

/// Bumped when the offsets table's meaning changes; a row written by a
/// newer format is refused rather than misread.
pub const FORMAT_VERSION: i32 = 1;

pub(crate) async fn create_offsets_table(
    client: &impl GenericClient,
    ctx: &Ctx,
) -> Result<(), PgError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            connector text NOT NULL,
            source text NOT NULL,
            partition text NOT NULL,
            next_offset bigint,
            epoch bigint NOT NULL,
            format_version integer NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (connector, source, partition))",
        ctx.offsets
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| ctx.sql(&ctx.offsets, "create the offsets table", e))
}

/// Fence and recover: bump the partition's epoch (inserting its row the
/// first time) and return the new epoch with the committed position.
pub(crate) async fn open(
    client: &impl GenericClient,
    ctx: &Ctx,
    p: &PartitionRef,
) -> Result<Opened, PgError> {
    let sql = format!(
        "INSERT INTO {t} AS o VALUES ($1, $2, $3, NULL, 1, $4, now())
         ON CONFLICT (connector, source, partition)
         DO UPDATE SET epoch = o.epoch + 1, updated_at = now()
         RETURNING epoch, next_offset, format_version",
        t = ctx.offsets
    );
    let row = client
        .query_one(
            &sql,
            &[&&*p.connector, &&*p.source, &&*p.partition, &FORMAT_VERSION],
        )
        .await
        .map_err(|e| ctx.sql(&ctx.offsets, &format!("fence partition {p}"), e))?;
    let (epoch, next, format): (i64, Option<i64>, i32) = (row.get(0), row.get(1), row.get(2));
    if format > FORMAT_VERSION {
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

/// The statement that moves a position inside a batch's transaction, only
/// while `epoch` owns the partition; zero rows updated means fenced.
pub(crate) fn advance_sql(ctx: &Ctx) -> String {
    format!(
        "UPDATE {} SET next_offset = $1, updated_at = now()
         WHERE connector = $2 AND source = $3 AND partition = $4 AND epoch = $5",
        ctx.offsets
    )
}

pub(crate) async fn positions(
    client: &impl GenericClient,
    ctx: &Ctx,
    connector: &str,
) -> Result<Vec<StoredPosition>, PgError> {
    let sql = format!(
        "SELECT source, partition, next_offset, epoch FROM {}
         WHERE connector = $1 ORDER BY source, partition",
        ctx.offsets
    );
    let rows = client
        .query(&sql, &[&connector])
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
