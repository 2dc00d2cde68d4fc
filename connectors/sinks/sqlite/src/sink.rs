//! The write path: one `BEGIN IMMEDIATE` transaction per batch on one
//! connection, run on a blocking thread.

use crate::config::{Mode, SqliteSinkConfig};
use crate::error::{Ctx, SqliteError};
use crate::recover;
use async_trait::async_trait;
use idem_config::{ColumnConfig, ColumnType};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::table::check;
use idem_core::table::offsets::{self, OffsetsSql, Unmoved};
use idem_core::table::sql::{self, q, DELETE_FLAG, POS_OFFSET, POS_PARTITION};
use idem_core::{
    Batch, CommitStats, Op, Opened, PartitionRef, RowPositions, Sink, SinkError, SinkInfo,
    StoredPosition, ValueRef,
};
use rusqlite::types::Value as Cell;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use std::sync::{Arc, Mutex};

/// The staging table of upsert batches, and the newest message per key.
const STAGE: &str = "idem_stage";
const LATEST: &str = "idem_latest";

/// A column type as declared in SQLite. JSON and UUIDs are declared TEXT:
/// a name without TEXT in it would give the column numeric affinity, and
/// SQLite would turn a JSON `123` into an integer.
fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text | ColumnType::Json | ColumnType::Uuid | ColumnType::Numeric => "TEXT",
        ColumnType::Bigint => "BIGINT",
        ColumnType::Integer => "INTEGER",
        ColumnType::Double => "DOUBLE",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::Date => "DATE",
        ColumnType::Bytea => "BLOB",
    }
}

/// A value as SQLite stores it: timestamps as RFC 3339 text in UTC with
/// microseconds and dates as `YYYY-MM-DD` (what SQLite's date functions
/// read), booleans as 0 and 1, UUIDs as text.
fn cell(v: ValueRef<'_>) -> Cell {
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Text(s) | ValueRef::Json(s) | ValueRef::Numeric(s) => Cell::Text(s.to_owned()),
        ValueRef::BigInt(n) => Cell::Integer(n),
        ValueRef::Integer(n) => Cell::Integer(i64::from(n)),
        ValueRef::Double(x) => Cell::Real(x),
        ValueRef::Boolean(b) => Cell::Integer(i64::from(b)),
        ValueRef::Bytes(b) => Cell::Blob(b.to_vec()),
        ValueRef::Timestamp(_) | ValueRef::Date(_) | ValueRef::Uuid(_) => match v.to_json() {
            serde_json::Value::String(s) => Cell::Text(s),
            other => Cell::Text(other.to_string()),
        },
    }
}

/// Statements made once from the config.
struct Plan {
    ctx: Ctx,
    offsets: OffsetsSql,
    mode: Mode,
    create_table: String,
    /// Append: into the table; upsert: into the staging table, with the
    /// delete flag.
    insert: String,
    create_stage: String,
    pick_latest: String,
    merge: String,
    delete: String,
    /// Versioned upserts with deletes: record deletes, and create their
    /// table (see [`sql::Graves`]).
    bury: Option<String>,
    create_graves: Option<String>,
}

impl Plan {
    fn new(cfg: &SqliteSinkConfig, columns: &[ColumnConfig]) -> Self {
        let t = q(&cfg.table);
        let keys = match cfg.mode {
            Mode::Upsert => cfg.key.clone(),
            Mode::Append | Mode::Dedup => Vec::new(),
        };
        let version = cfg.version.as_deref();
        let cols = sql::insert_columns(columns);
        let col_list = sql::list(&cols);
        let marks = |n: usize| vec!["?"; n].join(", ");
        let insert = match cfg.mode {
            Mode::Upsert => format!(
                "INSERT INTO temp.{STAGE} ({col_list}, {DELETE_FLAG}) VALUES ({})",
                marks(cols.len() + 1)
            ),
            Mode::Append | Mode::Dedup => {
                format!(
                    "INSERT INTO {t} ({col_list}) VALUES ({})",
                    marks(cols.len())
                )
            }
        };
        let stage_defs: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", q(&c.name), sql_type(c.ty)))
            .chain([
                format!("{POS_PARTITION} TEXT"),
                format!("{POS_OFFSET} BIGINT"),
                format!("{DELETE_FLAG} BOOLEAN"),
            ])
            .collect();
        let graves = sql::Graves::of(
            q(&sql::Graves::name(&cfg.table)),
            cfg.mode,
            version,
            cfg.delete_on_tombstone,
        );
        let graves = graves.as_ref();
        Plan {
            offsets: OffsetsSql::new(&q(&cfg.offsets_table)),
            ctx: Ctx {
                path: cfg.path.clone(),
                table: cfg.table.clone(),
                offsets_table: cfg.offsets_table.clone(),
            },
            mode: cfg.mode,
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} ({})",
                sql::table_definition(columns, &keys, sql_type)
            ),
            insert,
            create_stage: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {STAGE} ({})",
                stage_defs.join(", ")
            ),
            pick_latest: format!(
                "DROP TABLE IF EXISTS temp.{LATEST};
                 CREATE TEMP TABLE {LATEST} AS SELECT * FROM (
                   SELECT *, row_number() OVER (PARTITION BY {} ORDER BY {}) AS idem_rank
                   FROM temp.{STAGE}) WHERE idem_rank = 1",
                sql::list(&keys),
                sql::newest_first(version)
            ),
            // The kit's merge reads `WHERE NOT _idem_delete` from the
            // picked rows, which also settles SQLite's parse of
            // `INSERT .. SELECT .. ON CONFLICT`.
            merge: sql::merge(
                &t,
                "tgt",
                &format!("temp.{LATEST}"),
                columns,
                &keys,
                version,
                graves,
            ),
            bury: graves.map(|g| g.bury(&format!("temp.{LATEST}"), &keys)),
            create_graves: graves.map(|g| g.create(columns, &keys, sql_type)),
            // SQLite has no `DELETE .. USING`. The `IN` on the key lets it
            // find the rows through the primary key instead of scanning.
            delete: format!(
                "DELETE FROM {t} AS tgt WHERE ({k}) IN (SELECT {k} FROM temp.{LATEST} WHERE {DELETE_FLAG})
                 AND EXISTS (SELECT 1 FROM temp.{LATEST} AS l WHERE l.{DELETE_FLAG} AND {} AND {})",
                sql::key_match("tgt", "l", &keys),
                sql::guard("l", "tgt", version),
                k = sql::list(&keys),
            ),
        }
    }
}

/// Writes batches into a SQLite table, positions in the same transaction.
pub struct SqliteSink {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SqliteSinkConfig,
    columns: Vec<ColumnConfig>,
    plan: Plan,
    /// SQLite has one writer per file: partitions commit in turn on one
    /// connection, each call on a blocking thread.
    conn: Mutex<Option<Connection>>,
}

impl SqliteSink {
    /// No I/O: the file opens in [`Sink::prepare`].
    pub fn new(cfg: SqliteSinkConfig, columns: Vec<ColumnConfig>) -> Self {
        let plan = Plan::new(&cfg, &columns);
        SqliteSink {
            inner: Arc::new(Inner {
                cfg,
                columns,
                plan,
                conn: Mutex::new(None),
            }),
        }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, SqliteError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SqliteError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| SqliteError::Worker(e.to_string()))?
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, SqliteError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Plan) -> Result<T, SqliteError> + Send + 'static,
    {
        self.blocking(move |inner| {
            let guard = inner
                .conn
                .lock()
                .map_err(|_| SqliteError::Worker("connection lock poisoned".into()))?;
            let conn = guard.as_ref().ok_or(SqliteError::NotPrepared)?;
            f(conn, &inner.plan)
        })
        .await
    }
}

impl Inner {
    fn prepare_blocking(&self) -> Result<(), SqliteError> {
        let ctx = &self.plan.ctx;
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| SqliteError::Worker("connection lock poisoned".into()))?;
        if guard.is_none() {
            let path = std::path::Path::new(&self.cfg.path);
            let open_err = |source| SqliteError::Open {
                path: self.cfg.path.clone(),
                source: Box::new(source),
            };
            let conn = Connection::open(path).map_err(open_err)?;
            conn.busy_timeout(self.cfg.busy_timeout).map_err(open_err)?;
            // Readers go on while a batch commits; FULL makes a commit
            // durable before the source is acked.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(open_err)?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(open_err)?;
            *guard = Some(conn);
        }
        let conn = guard.as_ref().ok_or(SqliteError::NotPrepared)?;
        recover::create_offsets_table(conn, ctx, &self.plan.offsets)?;
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                params![&ctx.table],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| ctx.sql(&ctx.table, "look up the table", e))?;
        if exists.is_none() {
            if !self.cfg.create {
                return Err(SqliteError::MissingTable {
                    path: ctx.path.clone(),
                    table: ctx.table.clone(),
                });
            }
            conn.execute_batch(&self.plan.create_table)
                .map_err(|e| ctx.sql(&ctx.table, "create the table", e))?;
        }
        self.check_table(conn)?;
        if let Some(create) = &self.plan.create_graves {
            conn.execute_batch(create)
                .map_err(|e| ctx.sql(&ctx.table, "create the deleted keys table", e))?;
        }
        if self.plan.mode == Mode::Upsert {
            conn.execute_batch(&self.plan.create_stage)
                .map_err(|e| ctx.sql(STAGE, "create the staging table", e))?;
        }
        Ok(())
    }

    fn check_table(&self, conn: &Connection) -> Result<(), SqliteError> {
        let ctx = &self.plan.ctx;
        let mismatch = |detail: String| SqliteError::SchemaMismatch {
            path: ctx.path.clone(),
            table: ctx.table.clone(),
            detail,
        };
        // (name, declared type, place in the primary key or 0)
        let read = || -> rusqlite::Result<Vec<(String, String, i64)>> {
            let mut stmt = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?)")?;
            let rows = stmt.query_map(params![&ctx.table], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect()
        };
        let info = read().map_err(|e| ctx.sql(&ctx.table, "read the table's columns", e))?;
        let actual: Vec<(String, String)> = info
            .iter()
            .map(|(n, t, _)| (n.clone(), t.clone()))
            .collect();
        let expected = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), sql_type(c.ty)))
            .chain([(POS_PARTITION, "TEXT"), (POS_OFFSET, "BIGINT")]);
        check::columns(expected, &actual).map_err(mismatch)?;
        if self.cfg.mode == Mode::Upsert {
            let mut pk: Vec<(i64, String)> = info
                .into_iter()
                .filter(|(_, _, place)| *place > 0)
                .map(|(n, _, place)| (place, n))
                .collect();
            pk.sort();
            let pk: Vec<String> = pk.into_iter().map(|(_, n)| n).collect();
            check::primary_key(&self.cfg.key, &pk).map_err(mismatch)?;
        }
        Ok(())
    }
}

enum Outcome {
    Committed(CommitStats),
    Fenced,
}

fn write_batch(conn: &Connection, plan: &Plan, batch: &Batch) -> Result<Outcome, SqliteError> {
    let ctx = &plan.ctx;
    let p = &batch.partition;
    match recover::advance(conn, ctx, &plan.offsets, batch)? {
        None => {}
        Some(Unmoved::Fenced) => return Ok(Outcome::Fenced),
        Some(Unmoved::Committed) => {
            return Ok(Outcome::Committed(offsets::committed_before(batch)))
        }
        Some(Unmoved::Conflict(source)) => {
            return Err(SqliteError::PositionConflict {
                path: ctx.path.clone(),
                table: ctx.offsets_table.clone(),
                source,
            })
        }
    }
    let upsert = plan.mode == Mode::Upsert;
    let target = if upsert { STAGE } else { ctx.table.as_str() };
    if upsert {
        conn.execute(&format!("DELETE FROM temp.{STAGE}"), [])
            .map_err(|e| ctx.sql(STAGE, "empty the staging table", e))?;
    }
    let mut insert = conn
        .prepare(&plan.insert)
        .map_err(|e| ctx.sql(target, "prepare the insert", e))?;
    let half = batch.records.len() / 2;
    let partition = Cell::Text(p.partition.to_string());
    for (i, r) in batch.records.iter().enumerate() {
        if i == half {
            failpoint::hit(MID_WRITE);
        }
        let mut row: Vec<Cell> = r.values.iter().map(cell).collect();
        row.push(partition.clone());
        row.push(Cell::Integer(sql::offset_to_sql(r.offset)));
        if upsert {
            row.push(Cell::Integer(i64::from(r.op == Op::Delete)));
        }
        insert
            .execute(params_from_iter(row))
            .map_err(|e| ctx.sql(target, &format!("insert offset {} of {p}", r.offset), e))?;
    }
    let total = batch.records.len() as u64;
    let written = if upsert {
        conn.execute_batch(&plan.pick_latest)
            .map_err(|e| ctx.sql(STAGE, "pick the newest message per key", e))?;
        let merged = conn
            .execute(&plan.merge, [])
            .map_err(|e| ctx.sql(&ctx.table, "merge", e))?;
        let deleted = if batch.records.iter().any(|r| r.op == Op::Delete) {
            if let Some(bury) = &plan.bury {
                conn.execute(bury, [])
                    .map_err(|e| ctx.sql(&ctx.table, "record deleted keys", e))?;
            }
            conn.execute(&plan.delete, [])
                .map_err(|e| ctx.sql(&ctx.table, "delete tombstoned keys", e))?
        } else {
            0
        };
        (merged + deleted) as u64
    } else {
        total
    };
    failpoint::hit(AFTER_WRITE);
    Ok(Outcome::Committed(CommitStats {
        written,
        deduplicated: total - written.min(total),
        rejected: 0,
        durable_through: None,
    }))
}

#[async_trait]
impl Sink for SqliteSink {
    fn info(&self) -> SinkInfo {
        let cfg = &self.inner.cfg;
        sql::table_sink_info(
            "SQLite",
            &cfg.path,
            cfg.mode,
            &cfg.key,
            cfg.version.as_deref(),
            cfg.delete_on_tombstone,
        )
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(self.blocking(Inner::prepare_blocking).await?)
    }

    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError> {
        let p = partition.clone();
        Ok(self
            .with_conn(move |conn, plan| recover::open(conn, &plan.ctx, &plan.offsets, &p))
            .await?)
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let partition = batch.partition.to_string();
        let epoch = batch.epoch;
        let outcome = self
            .with_conn(move |conn, plan| {
                let ctx = &plan.ctx;
                // IMMEDIATE: take the write lock now, not halfway through.
                conn.execute_batch("BEGIN IMMEDIATE")
                    .map_err(|e| ctx.sql(&ctx.table, "begin", e))?;
                let result = write_batch(conn, plan, &batch);
                match &result {
                    Ok(Outcome::Committed(_)) => {
                        if let Err(e) = conn.execute_batch("COMMIT") {
                            let _ = conn.execute_batch("ROLLBACK");
                            return Err(ctx.sql(&ctx.table, "commit", e));
                        }
                    }
                    Ok(Outcome::Fenced) | Err(_) => {
                        // The error that matters is the one we return.
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                }
                result
            })
            .await?;
        match outcome {
            Outcome::Committed(stats) => Ok(stats),
            Outcome::Fenced => Err(SinkError::Fenced { partition, epoch }),
        }
    }

    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        let connector = connector.to_string();
        Ok(self
            .with_conn(move |conn, plan| {
                recover::positions(conn, &plan.ctx, &plan.offsets, &connector)
            })
            .await?)
    }

    async fn describe(&self) -> Result<String, SinkError> {
        Ok(self
            .with_conn(|conn, plan| {
                let ctx = &plan.ctx;
                let n: i64 = conn
                    .query_row(
                        &format!("SELECT count(*) FROM {}", q(&ctx.table)),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| ctx.sql(&ctx.table, "count rows", e))?;
                Ok(format!(
                    "table {} in {} holds {n} rows",
                    ctx.table, ctx.path
                ))
            })
            .await?)
    }

    async fn row_positions(&self) -> Result<Option<RowPositions>, SinkError> {
        Ok(Some(
            self.with_conn(|conn, plan| {
                let ctx = &plan.ctx;
                let sql = format!(
                    "SELECT {POS_PARTITION}, {POS_OFFSET} FROM {}",
                    q(&ctx.table)
                );
                let list = |conn: &Connection| -> rusqlite::Result<RowPositions> {
                    let mut stmt = conn.prepare(&sql)?;
                    let mut rows = stmt.query([])?;
                    let mut out = RowPositions::default();
                    while let Some(r) = rows.next()? {
                        let partition = r.get_ref(0)?.as_str()?.to_string();
                        out.push(&partition, sql::offset_from_sql(r.get(1)?));
                    }
                    Ok(out)
                };
                list(conn).map_err(|e| ctx.sql(&ctx.table, "list row positions", e))
            })
            .await?,
        ))
    }
}
