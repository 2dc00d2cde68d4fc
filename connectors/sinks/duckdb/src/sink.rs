//! The write path: one DuckDB transaction per batch.

use crate::config::{DuckDbSinkConfig, Mode};
use crate::error::{Ctx, DuckDbError};
use crate::recover;
use crate::scan;
use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use duckdb::{params, Connection, OptionalExt};
use idem_config::{ColumnConfig, ColumnType};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::table::offsets::{self, OffsetsSql, Unmoved};
use idem_core::table::sql::{self, q, DELETE_FLAG, POS_OFFSET, POS_PARTITION};
use idem_core::table::{audit, check};
use idem_core::{
    columnar, AddsColumns, Batch, CommitStats, Op, Opened, PartitionRef, Record, RowPositions,
    Sink, SinkError, SinkInfo, StoredPosition, TableColumn,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Statements derived from the config, and again from a batch that brings
/// columns learnt from the source's schema.
struct Plan {
    ctx: Ctx,
    /// How many mapped columns the statements write.
    width: usize,
    /// Upserts: a temporary view of the batch's record batch (see
    /// [`scan`]), and the temporary table of its newest row per key when
    /// SQL picks them. Named after the table: sinks of several tables of
    /// one file share the connection (see [`connection_of`]).
    stage: String,
    /// Whether the newest message of each key is the last by offset (no
    /// version column), so the batch's own records tell which to keep.
    newest_by_offset: bool,
    latest: String,
    /// The offsets table's statements (the table-sink kit).
    offsets: OffsetsSql,
    mode: Mode,
    /// Mapped columns, then the position columns.
    insert_columns: Vec<String>,
    /// The mapped columns, and the Arrow schema of a batch as written:
    /// them, the position, then (upserts) the delete flag.
    columns: Vec<ColumnConfig>,
    schema: Arc<Schema>,
    create_table: String,
    create_stage: String,
    delete: String,
    /// Upserts update the rows their messages may replace and insert the
    /// keys the table lacks, in one `MERGE INTO` (no `ON CONFLICT`: see
    /// `create_table`), from the newest message per key picked in SQL.
    merge: String,
    /// The merge straight from the batch's view, for a batch whose keys
    /// are unique and which holds no tombstone (no need to pick per key).
    merge_staged: String,
    pick_latest: String,
    /// Versioned upserts with deletes: record deletes, and create their
    /// table (see [`sql::Graves`]).
    bury: Option<String>,
    create_graves: Option<String>,
    /// Positions of the key columns among the mapped columns.
    key_idx: Vec<usize>,
    /// `[dedup] store = "sink"`: the message ids table's statements.
    seen: Option<SeenSql>,
}

/// Message ids kept beside the table (`[dedup] store = "sink"`), read and
/// written in each batch's transaction. No index: DuckDB joins a batch's
/// ids against the table by hashing, and an index on random ids would
/// cost more to insert into than the scan it saves.
struct SeenSql {
    create: String,
    /// Which of the ids in the ids slot took effect before.
    lookup: String,
    /// Record the ids in the ids slot.
    record: String,
    purge: String,
}

/// Where a batch's rows and its ids wait for the statements that read them.
struct Slots {
    rows: scan::Slot,
    ids: scan::Slot,
}

impl Slots {
    /// The ids slot's schema: one column of message ids.
    fn ids_schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]))
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Text => "VARCHAR",
        ColumnType::Bigint => "BIGINT",
        ColumnType::Integer => "INTEGER",
        ColumnType::Double => "DOUBLE",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Timestamp => "TIMESTAMP WITH TIME ZONE",
        ColumnType::Date => "DATE",
        ColumnType::Json => "JSON",
        ColumnType::Uuid => "UUID",
        ColumnType::Bytea => "BLOB",
        // Refused by the config's validation (no unbounded DECIMAL here).
        ColumnType::Numeric => "DECIMAL(38,10)",
    }
}

impl Plan {
    /// What failed building a batch of `batch`'s partition as Arrow.
    fn encode(&self, batch: &Batch, detail: String) -> DuckDbError {
        DuckDbError::Encode {
            table: self.ctx.table.clone(),
            partition: batch.partition.to_string(),
            detail,
        }
    }

    /// Whether batches are merged from the view of their record batch
    /// (upserts) rather than appended to the table.
    fn merges(&self) -> bool {
        self.mode == Mode::Upsert
    }

    fn new(
        cfg: &DuckDbSinkConfig,
        columns: &[ColumnConfig],
        keep_ids: Option<Duration>,
        slots: &Slots,
    ) -> Plan {
        let t = format!("main.{}", q(&cfg.table));
        let insert_columns = sql::insert_columns(columns);
        // `dedup` is refused by the config's validation on this sink.
        let keys = match cfg.mode {
            Mode::Upsert => cfg.key.clone(),
            Mode::Append | Mode::Dedup => Vec::new(),
        };
        let version = cfg.version.as_deref();
        let (stage, latest) = (
            format!("_idem_stage_{}", cfg.table),
            format!("_idem_latest_{}", cfg.table),
        );
        let (stage_q, latest_q) = (q(&stage), q(&latest));
        // No primary key: DuckDB holds a key's index in memory whole (about
        // 55 bytes a key) and inserts into it slowly batch after batch; the
        // merge keeps keys unique itself (`sql::merge_into`).
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} ({})",
            sql::unkeyed_table_definition(columns, &keys, sql_type)
        );
        let create_stage = format!(
            "CREATE OR REPLACE TEMP VIEW {stage_q} AS {}",
            slots.rows.select()
        );
        let seen_q = format!("main.{}", q(&sql::seen_table(&cfg.table)));
        let ids = slots.ids.select();
        let seen = keep_ids.map(|retention| SeenSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {seen_q} (id VARCHAR NOT NULL, seen_at TIMESTAMP WITH TIME ZONE NOT NULL)"
            ),
            lookup: format!("SELECT b.id FROM ({ids}) AS b SEMI JOIN {seen_q} AS s ON b.id = s.id"),
            record: format!("INSERT INTO {seen_q} SELECT id, now() FROM ({ids})"),
            purge: format!(
                "DELETE FROM {seen_q} WHERE seen_at < now() - to_microseconds({})",
                retention.as_micros()
            ),
        });
        // The newest message per key in the batch: by version, then offset.
        let pick_latest = format!(
            "CREATE OR REPLACE TEMP TABLE {latest_q} AS SELECT * FROM {stage_q}
             QUALIFY row_number() OVER (PARTITION BY {} ORDER BY {}) = 1",
            sql::list(&keys),
            sql::newest_first(version)
        );
        let graves = sql::Graves::of(
            format!("main.{}", q(&sql::Graves::name(&cfg.table))),
            cfg.mode,
            version,
            cfg.delete_on_tombstone,
        );
        let graves = graves.as_ref();
        let mut fields = columnar::fields(columns, POS_PARTITION, POS_OFFSET);
        if cfg.mode == Mode::Upsert {
            fields.push(Field::new(DELETE_FLAG, DataType::Boolean, false));
        }
        Plan {
            columns: columns.to_vec(),
            schema: Arc::new(Schema::new(fields)),
            width: columns.len(),
            offsets: OffsetsSql::new(&q(&cfg.offsets_table)),
            ctx: Ctx {
                path: cfg.path.clone(),
                table: cfg.table.clone(),
                offsets_table: cfg.offsets_table.clone(),
            },
            mode: cfg.mode,
            insert_columns,
            create_table,
            create_stage,
            delete: sql::delete(&t, "tgt", &latest_q, &keys, version),
            merge: sql::merge_into(&t, &latest_q, columns, &keys, version, graves),
            merge_staged: sql::merge_into(&t, &stage_q, columns, &keys, version, graves),
            bury: graves.map(|g| g.bury(&latest_q, &keys)),
            stage,
            newest_by_offset: version.is_none(),
            latest,
            create_graves: graves.map(|g| g.create(columns, &keys, sql_type)),
            pick_latest,
            key_idx: sql::key_indexes(columns, &keys),
            seen,
        }
    }
}

/// A database file's connection, opened by the first sink to prepare.
type Slot = Mutex<Option<Connection>>;
type Shared = Arc<Slot>;

/// The connection of the file at `path` in this process: DuckDB opens a
/// file once per process, and a connector writing each source table to a
/// table of its own has a sink per table in one file; they commit in turn
/// on this connection. The file closes when its last sink is dropped.
fn connection_of(path: &str) -> Shared {
    static OPEN: std::sync::LazyLock<Mutex<HashMap<std::path::PathBuf, Weak<Slot>>>> =
        std::sync::LazyLock::new(Default::default);
    let key = std::path::absolute(path).unwrap_or_else(|_| path.into());
    let mut open = OPEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    open.retain(|_, conn| conn.strong_count() > 0);
    if let Some(conn) = open.get(&key).and_then(Weak::upgrade) {
        return conn;
    }
    let conn = Arc::new(Mutex::new(None));
    open.insert(key, Arc::downgrade(&conn));
    conn
}

/// Writes batches into a DuckDB table, positions in the same transaction.
pub struct DuckDbSink {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DuckDbSinkConfig,
    columns: Vec<ColumnConfig>,
    /// The configured columns' plan, or a wider one once a batch added
    /// columns learnt from the source's schema. Changed only under `conn`.
    plan: Mutex<Arc<Plan>>,
    /// DuckDB allows one writer; partitions commit in turn on one
    /// connection, each call on a blocking thread. Shared with the other
    /// sinks of the same file in this process (see [`connection_of`]).
    conn: Shared,
    /// `[dedup] store = "sink"`: how long message ids are kept.
    keep_ids: Option<Duration>,
    /// Commits so far, to purge expired ids every 100th.
    commits: AtomicU64,
    /// Where a batch's rows and ids wait for the statements that read them.
    slots: Slots,
}

impl DuckDbSink {
    pub fn new(cfg: DuckDbSinkConfig, columns: Vec<ColumnConfig>) -> Self {
        DuckDbSink::with(cfg, columns, None)
    }

    /// Keep message ids in a table beside the target for `retention` and
    /// drop, in each batch's transaction, the records whose id took
    /// effect before (`[dedup] store = "sink"`). Not with `mode =
    /// "dedup"`, which this sink refuses anyway.
    pub fn keeping_ids(
        cfg: DuckDbSinkConfig,
        columns: Vec<ColumnConfig>,
        retention: Duration,
    ) -> Self {
        let keep = (cfg.mode != Mode::Dedup).then_some(retention);
        DuckDbSink::with(cfg, columns, keep)
    }

    fn with(cfg: DuckDbSinkConfig, columns: Vec<ColumnConfig>, keep_ids: Option<Duration>) -> Self {
        let slots = Slots {
            rows: scan::Slot::new(),
            ids: scan::Slot::new(),
        };
        let plan = Plan::new(&cfg, &columns, keep_ids, &slots);
        DuckDbSink {
            inner: Arc::new(Inner {
                slots,
                conn: connection_of(&cfg.path),
                cfg,
                columns,
                plan: Mutex::new(Arc::new(plan)),
                keep_ids,
                commits: AtomicU64::new(0),
            }),
        }
    }

    /// Run `f` on a blocking thread with the inner state.
    async fn blocking<T, F>(&self, f: F) -> Result<T, DuckDbError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, DuckDbError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| DuckDbError::Worker(e.to_string()))?
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, DuckDbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Plan) -> Result<T, DuckDbError> + Send + 'static,
    {
        self.blocking(move |inner| {
            let guard = inner
                .conn
                .lock()
                .map_err(|_| DuckDbError::Worker("connection lock poisoned".into()))?;
            let c = guard.as_ref().ok_or(DuckDbError::NotPrepared)?;
            f(c, &inner.plan())
        })
        .await
    }
}

impl Inner {
    fn plan(&self) -> Arc<Plan> {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Commit `batch` in one transaction: through a wider plan (adding its
    /// columns to the table first) when it brings learnt columns.
    fn commit_blocking(&self, batch: &Batch) -> Result<Outcome, DuckDbError> {
        let guard = self
            .conn
            .lock()
            .map_err(|_| DuckDbError::Worker("connection lock poisoned".into()))?;
        let conn = guard.as_ref().ok_or(DuckDbError::NotPrepared)?;
        let current = self.plan();
        let grown = batch
            .columns
            .as_ref()
            .filter(|c| c.len() > current.width)
            .map(|c| {
                let plan = Plan::new(&self.cfg, c, self.keep_ids, &self.slots);
                (Arc::new(plan), &c[current.width..])
            });
        let plan = grown.as_ref().map_or(&current, |(plan, _)| plan);
        let ctx = &plan.ctx;
        conn.execute_batch("BEGIN TRANSACTION")
            .map_err(|e| ctx.sql(&ctx.table, "begin", e))?;
        let result = grown
            .as_ref()
            .map_or(Ok(()), |(plan, added)| self.add_columns(conn, plan, added))
            .and_then(|()| self.purge_seen(conn, plan))
            .and_then(|()| write_batch(conn, plan, &self.slots, batch));
        match &result {
            Ok(Outcome::Committed(_)) => {
                if let Err(e) = conn.execute_batch("COMMIT") {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(ctx.sql(&ctx.table, "commit", e));
                }
                if let Some((plan, _)) = grown {
                    *self
                        .plan
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = plan;
                }
            }
            Ok(Outcome::Fenced) | Err(_) => {
                // The error that matters is the one we return.
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        result
    }

    /// Every 100th commit with kept ids: forget those past the retention.
    fn purge_seen(&self, conn: &Connection, plan: &Plan) -> Result<(), DuckDbError> {
        let Some(seen) = &plan.seen else {
            return Ok(());
        };
        if self
            .commits
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(100)
        {
            let ctx = &plan.ctx;
            conn.execute_batch(&seen.purge)
                .map_err(|e| ctx.sql(&ctx.table, "forget expired message ids", e))?;
        }
        Ok(())
    }

    /// Add `added` (columns learnt from the source's schema) to the table,
    /// check the types of those it had already, and remake the staging
    /// table to the wider `plan`.
    fn add_columns(
        &self,
        conn: &Connection,
        plan: &Plan,
        added: &[ColumnConfig],
    ) -> Result<(), DuckDbError> {
        let ctx = &plan.ctx;
        let t = format!("main.{}", q(&ctx.table));
        for c in added {
            conn.execute_batch(&sql::add_column(&t, &c.name, sql_type(c.ty)))
                .map_err(|e| ctx.sql(&ctx.table, &format!("add column `{}`", c.name), e))?;
        }
        let actual = table_columns(conn, ctx)?;
        let expected = added.iter().map(|c| (c.name.as_str(), sql_type(c.ty)));
        check::learnt(expected, &actual).map_err(|detail| DuckDbError::SchemaMismatch {
            path: ctx.path.clone(),
            table: ctx.table.clone(),
            detail,
        })?;
        if plan.merges() {
            self.create_stage(conn, plan)?;
        }
        Ok(())
    }

    /// (Re)create the view of the rows slot: bound to an empty batch of the
    /// plan's columns while it is created.
    fn create_stage(&self, conn: &Connection, plan: &Plan) -> Result<(), DuckDbError> {
        let _empty = self
            .slots
            .rows
            .hold(RecordBatch::new_empty(plan.schema.clone()));
        conn.execute_batch(&plan.create_stage)
            .map_err(|e| plan.ctx.sql(&plan.stage, "create the view of a batch", e))
    }

    fn check_table(&self, conn: &Connection) -> Result<(), DuckDbError> {
        let plan = self.plan();
        let ctx = &plan.ctx;
        let mismatch = |detail: String| DuckDbError::SchemaMismatch {
            path: ctx.path.clone(),
            table: ctx.table.clone(),
            detail,
        };
        let actual = table_columns(conn, ctx)?;
        let expected = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), sql_type(c.ty)))
            .chain([(POS_PARTITION, "VARCHAR"), (POS_OFFSET, "BIGINT")]);
        check::columns(expected, &actual).map_err(mismatch)?;
        if self.cfg.mode == Mode::Upsert {
            // The key's columns in their order in the constraint.
            let read = || -> duckdb::Result<Vec<String>> {
                let mut stmt = conn.prepare(
                    "SELECT unnest(constraint_column_names) FROM duckdb_constraints()
                     WHERE schema_name = 'main' AND table_name = ? AND constraint_type = 'PRIMARY KEY'",
                )?;
                let rows = stmt.query_map(params![&ctx.table], |r| r.get(0))?;
                rows.collect()
            };
            let pk = read().map_err(|e| ctx.sql(&ctx.table, "read the primary key", e))?;
            // A table without one is this sink's own shape (see
            // `create_table`); one on other columns would refuse inserts.
            if !pk.is_empty() {
                check::primary_key(&self.cfg.key, &pk).map_err(mismatch)?;
            }
        }
        Ok(())
    }

    /// Open the database file and create or check the offsets table, and
    /// with `table` the target table and the tables beside it.
    fn prepare_blocking(&self, table: bool) -> Result<(), DuckDbError> {
        let plan = self.plan();
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| DuckDbError::Worker("connection lock poisoned".into()))?;
        if guard.is_none() {
            let path = std::path::Path::new(&self.cfg.path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| DuckDbError::Open {
                    path: self.cfg.path.clone(),
                    source: Box::new(duckdb::Error::ToSqlConversionFailure(Box::new(e))),
                })?;
            }
            if path.is_dir() {
                return Err(DuckDbError::NotADatabase {
                    path: self.cfg.path.clone(),
                    why: "it is a directory; give the path of a database file".into(),
                });
            }
            let conn = Connection::open(path).map_err(|source| DuckDbError::Open {
                path: self.cfg.path.clone(),
                source: Box::new(source),
            })?;
            scan::register(&conn)
                .map_err(|e| plan.ctx.sql(&self.cfg.table, "register the batch scan", e))?;
            // Validated as a number and a unit: no quote can reach here.
            for (setting, value) in [
                ("memory_limit", &self.cfg.memory_limit),
                ("checkpoint_threshold", &self.cfg.checkpoint_threshold),
            ] {
                conn.execute_batch(&format!("SET {setting} = '{}'", value.trim()))
                    .map_err(|e| plan.ctx.sql(&self.cfg.table, setting, e))?;
            }
            if let Some(n) = self.cfg.threads {
                conn.execute_batch(&format!("SET threads = {n}"))
                    .map_err(|e| plan.ctx.sql(&self.cfg.table, "set threads", e))?;
            }
            *guard = Some(conn);
        }
        let conn = guard.as_ref().ok_or(DuckDbError::NotPrepared)?;
        let ctx = &plan.ctx;
        recover::create_offsets_table(conn, ctx, &plan.offsets)?;
        if !table {
            return Ok(());
        }
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = 'main' AND table_name = ?",
                params![&ctx.table],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| ctx.sql(&ctx.table, "look up the table", e))?;
        if exists.is_none() {
            if !self.cfg.create {
                return Err(DuckDbError::MissingTable {
                    path: ctx.path.clone(),
                    table: ctx.table.clone(),
                });
            }
            conn.execute_batch(&plan.create_table)
                .map_err(|e| ctx.sql(&ctx.table, "create the table", e))?;
        }
        self.check_table(conn)?;
        if let Some(create) = &plan.create_graves {
            conn.execute_batch(create)
                .map_err(|e| ctx.sql(&ctx.table, "create the deleted keys table", e))?;
        }
        if plan.merges() {
            self.create_stage(conn, &plan)?;
        }
        if let Some(seen) = &plan.seen {
            conn.execute_batch(&seen.create)
                .map_err(|e| ctx.sql(&ctx.table, "create the message id table", e))?;
        }
        Ok(())
    }
}

/// The table's columns and their types, in the table's order.
fn table_columns(conn: &Connection, ctx: &Ctx) -> Result<Vec<(String, String)>, DuckDbError> {
    let read = || -> duckdb::Result<Vec<(String, String)>> {
        let mut stmt = conn.prepare(
            "SELECT column_name, data_type FROM information_schema.columns
             WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
        )?;
        let rows = stmt.query_map(params![&ctx.table], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    read().map_err(|e| ctx.sql(&ctx.table, "read the table's columns", e))
}

enum Outcome {
    Committed(CommitStats),
    Fenced,
}

/// `batch` as one Arrow record batch of `plan.schema` (with the delete
/// flags for an upsert), and with `keep` only the records it marks.
fn record_batch(
    plan: &Plan,
    batch: &Batch,
    keep: Option<&[bool]>,
) -> Result<RecordBatch, DuckDbError> {
    let records: Vec<&Record> = match keep {
        Some(keep) => sql::kept(&batch.records, keep).collect(),
        None => batch.records.iter().collect(),
    };
    let encode = |detail: String| plan.encode(batch, detail);
    let p = &batch.partition;
    let mut arrays = columnar::arrays(&plan.columns, &p.partition, &records).map_err(encode)?;
    if plan.merges() {
        let flags = records.iter().map(|r| Some(r.op == Op::Delete));
        arrays.push(Arc::new(flags.collect::<BooleanArray>()) as ArrayRef);
    }
    RecordBatch::try_new(plan.schema.clone(), arrays).map_err(|e| encode(e.to_string()))
}

/// Append the records of `batch` (those `keep` marks) to the table in two
/// halves around `mid_write`; how many.
fn append(
    conn: &Connection,
    plan: &Plan,
    batch: &Batch,
    keep: Option<&[bool]>,
) -> Result<u64, DuckDbError> {
    let ctx = &plan.ctx;
    let (p, table) = (&batch.partition, ctx.table.as_str());
    let rows = record_batch(plan, batch, keep)?;
    let cols: Vec<&str> = plan.insert_columns.iter().map(String::as_str).collect();
    let mut app = conn
        .appender_with_columns(table, &cols)
        .map_err(|e| ctx.sql(table, "open the appender", e))?;
    let half = rows.num_rows() / 2;
    for (i, (from, len)) in [(0, half), (half, rows.num_rows() - half)]
        .into_iter()
        .enumerate()
    {
        if i == 1 {
            failpoint::hit(MID_WRITE);
        }
        app.append_record_batch(rows.slice(from, len))
            .map_err(|e| ctx.sql(table, &format!("append a batch of {p}"), e))?;
    }
    app.flush()
        .map_err(|e| ctx.sql(table, &format!("flush a batch of {p}"), e))?;
    Ok(rows.num_rows() as u64)
}

/// `[dedup] store = "sink"`: per record of `batch`, whether it takes
/// effect: the first of its id in the batch, with an id that did not take
/// effect before (a record without one always does). Records their ids.
fn drop_seen(
    conn: &Connection,
    plan: &Plan,
    seen: &SeenSql,
    slots: &Slots,
    batch: &Batch,
) -> Result<Vec<bool>, DuckDbError> {
    let ctx = &plan.ctx;
    let records = &batch.records;
    let ids = |keep: &[bool]| {
        let ids: StringArray = sql::kept(records, keep)
            .filter_map(|r| r.id.as_deref().map(Some))
            .collect();
        RecordBatch::try_new(Slots::ids_schema(), vec![Arc::new(ids) as ArrayRef])
            .map_err(|e| plan.encode(batch, e.to_string()))
    };
    let mut keep = sql::first_of_each_id(records);
    let mut firsts = ids(&keep)?;
    let before = {
        let _held = slots.ids.hold(firsts.clone());
        let read = || -> duckdb::Result<HashSet<String>> {
            let mut stmt = conn.prepare(&seen.lookup)?;
            let ids = stmt.query_map([], |r| r.get(0))?;
            ids.collect()
        };
        read().map_err(|e| ctx.sql(&ctx.table, "look up the batch's message ids", e))?
    };
    if !before.is_empty() {
        for (k, r) in keep.iter_mut().zip(records) {
            if r.id.as_deref().is_some_and(|id| before.contains(id)) {
                *k = false;
            }
        }
        firsts = ids(&keep)?;
    }
    let _held = slots.ids.hold(firsts);
    conn.execute(&seen.record, [])
        .map_err(|e| ctx.sql(&ctx.table, "record the batch's message ids", e))?;
    Ok(keep)
}

fn write_batch(
    conn: &Connection,
    plan: &Plan,
    slots: &Slots,
    batch: &Batch,
) -> Result<Outcome, DuckDbError> {
    let ctx = &plan.ctx;
    let total = batch.records.len() as u64;
    match recover::advance(conn, ctx, &plan.offsets, batch)? {
        None => {}
        Some(Unmoved::Fenced) => return Ok(Outcome::Fenced),
        Some(Unmoved::Committed) => {
            return Ok(Outcome::Committed(offsets::committed_before(batch)))
        }
        Some(Unmoved::Conflict(source)) => {
            return Err(DuckDbError::PositionConflict {
                path: ctx.path.clone(),
                table: ctx.offsets_table.clone(),
                source,
            })
        }
    }
    let keep = match &plan.seen {
        Some(seen) => Some(drop_seen(conn, plan, seen, slots, batch)?),
        None => None,
    };
    let keep = keep.as_deref();
    let written = match plan.mode {
        Mode::Append | Mode::Dedup => append(conn, plan, batch, keep)?,
        Mode::Upsert => {
            // Only the newest message of each key goes into the record
            // batch when the offsets tell which it is: then it merges as
            // it is, with no pick in SQL (a tenth of a second for 88k).
            let newest = plan
                .newest_by_offset
                .then(|| sql::newest_of_each_key(&batch.records, keep, &plan.key_idx))
                .flatten();
            let unique = newest.is_some()
                || match keep {
                    Some(keep) => {
                        sql::unique_upserts(sql::kept(&batch.records, keep), &plan.key_idx)
                    }
                    None => sql::unique_upserts(&batch.records, &plan.key_idx),
                };
            let rows = record_batch(plan, batch, newest.as_deref().or(keep))?;
            // The view reads the slot until the merge is done.
            let _held = slots.rows.hold(rows);
            if unique {
                merge(conn, plan, &plan.merge_staged)?
            } else {
                conn.execute_batch(&plan.pick_latest)
                    .map_err(|e| ctx.sql(&plan.latest, "pick the newest message per key", e))?;
                // Without a tombstone in the batch, nothing to delete or bury.
                let mut deleted = 0;
                if batch.records.iter().any(|r| r.op == Op::Delete) {
                    deleted = conn
                        .execute(&plan.delete, [])
                        .map_err(|e| ctx.sql(&ctx.table, "apply tombstones", e))?;
                    if let Some(bury) = &plan.bury {
                        conn.execute(bury, [])
                            .map_err(|e| ctx.sql(&ctx.table, "record deleted keys", e))?;
                    }
                }
                deleted as u64 + merge(conn, plan, &plan.merge)?
            }
        }
    };
    failpoint::hit(AFTER_WRITE);
    Ok(Outcome::Committed(CommitStats {
        written,
        deduplicated: total.saturating_sub(written),
        rejected: 0,
        durable_through: None,
    }))
}

/// Run a merge; the rows it changed. The batch is read straight from its
/// record batch (no append to cut in two): `mid_write` comes before it,
/// with the position already moved in the transaction.
fn merge(conn: &Connection, plan: &Plan, merge: &str) -> Result<u64, DuckDbError> {
    let ctx = &plan.ctx;
    failpoint::hit(MID_WRITE);
    let changed = conn
        .execute(merge, [])
        .map_err(|e| ctx.sql(&ctx.table, "merge the batch", e))?;
    Ok(changed as u64)
}

#[async_trait]
impl Sink for DuckDbSink {
    fn info(&self) -> SinkInfo {
        let cfg = &self.inner.cfg;
        let mut info = sql::table_sink_info(
            "DuckDB",
            &cfg.path,
            cfg.mode,
            &cfg.key,
            cfg.version.as_deref(),
            cfg.delete_on_tombstone,
        );
        // No unbounded DECIMAL in DuckDB: a learnt decimal keeps its
        // digits as text.
        info.adds_columns = Some(AddsColumns {
            decimal: ColumnType::Text,
        });
        info.ids_table = self
            .inner
            .keep_ids
            .map(|_| format!("{}:{}", cfg.path, sql::seen_table(&cfg.table)));
        info
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(self.blocking(|inner| inner.prepare_blocking(true)).await?)
    }

    async fn prepare_positions(&self) -> Result<(), SinkError> {
        Ok(self.blocking(|inner| inner.prepare_blocking(false)).await?)
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
            .blocking(move |inner| inner.commit_blocking(&batch))
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

    async fn existing_columns(&self) -> Result<Option<Vec<TableColumn>>, SinkError> {
        Ok(Some(
            self.with_conn(|conn, plan| table_columns(conn, &plan.ctx))
                .await?
                .into_iter()
                .filter(|(name, _)| !name.starts_with("_idem_"))
                .map(|(name, ty)| {
                    // No unbounded DECIMAL here (see `sql_type`).
                    let ty = check::column_type(&ty, |t| {
                        (t != ColumnType::Numeric).then(|| sql_type(t))
                    });
                    (name, ty)
                })
                .collect(),
        ))
    }

    async fn describe(&self) -> Result<String, SinkError> {
        Ok(self
            .with_conn(|conn, plan| {
                let ctx = &plan.ctx;
                let n: i64 = conn
                    .query_row(
                        &format!("SELECT count(*) FROM main.{}", q(&ctx.table)),
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
                // A result is held whole by DuckDB: one partition's
                // offsets at a time, not every row's partition name.
                let list = |conn: &Connection| -> duckdb::Result<RowPositions> {
                    let mut names = conn.prepare(&format!(
                        "SELECT DISTINCT {POS_PARTITION} FROM main.{}",
                        q(&ctx.table)
                    ))?;
                    let names: Vec<String> = names
                        .query_map([], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    let mut offsets = conn.prepare(&format!(
                        "SELECT {POS_OFFSET} FROM main.{} WHERE {POS_PARTITION} = ?",
                        q(&ctx.table)
                    ))?;
                    let mut out = RowPositions::default();
                    for name in &names {
                        let mut rows = offsets.query(params![name])?;
                        while let Some(r) = rows.next()? {
                            out.push(name, r.get::<_, i64>(0)?.max(0) as u64);
                        }
                    }
                    Ok(out)
                };
                list(conn).map_err(|e| ctx.sql(&ctx.table, "list row positions", e))
            })
            .await?,
        ))
    }

    async fn canonical_rows(
        &self,
        columns: &[(String, ColumnType)],
    ) -> Result<Option<Vec<Vec<Option<String>>>>, SinkError> {
        let cols: Vec<(String, ColumnType)> = columns.to_vec();
        Ok(Some(
            self.with_conn(move |conn, plan| {
                let ctx = &plan.ctx;
                let named: Vec<(&str, ColumnType)> =
                    cols.iter().map(|(n, t)| (n.as_str(), *t)).collect();
                let sql = audit::duckdb_select(&format!("main.{}", q(&ctx.table)), &named);
                let read = |conn: &Connection| -> duckdb::Result<Vec<Vec<Option<String>>>> {
                    let mut stmt = conn.prepare(&sql)?;
                    let rows = stmt.query_map([], |r| {
                        named
                            .iter()
                            .enumerate()
                            .map(|(i, (_, ty))| Ok(audit::canonical(*ty, r.get(i)?)))
                            .collect()
                    })?;
                    rows.collect()
                };
                read(conn).map_err(|e| ctx.sql(&ctx.table, "read the rows", e))
            })
            .await?,
        ))
    }

    async fn close(&self) -> Result<(), SinkError> {
        Ok(self
            .blocking(|inner| {
                let guard = inner
                    .conn
                    .lock()
                    .map_err(|_| DuckDbError::Worker("connection lock poisoned".into()))?;
                // Never prepared (a run that opened nothing): nothing to fold.
                let Some(conn) = guard.as_ref() else {
                    return Ok(());
                };
                let ctx = &inner.plan().ctx;
                conn.execute_batch("CHECKPOINT")
                    .map_err(|e| ctx.sql(&ctx.table, "checkpoint", e))
            })
            .await?)
    }
}
