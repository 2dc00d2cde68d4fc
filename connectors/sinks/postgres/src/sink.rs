//! The write path: one transaction per batch, rows by binary `COPY`.

use crate::cell::{pg_type, reported_type, sql_type, Cell};
use crate::config::{PostgresSinkConfig, SslMode};
use crate::error::{Ctx, PgError};
use crate::recover;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use idem_config::{ColumnConfig, ColumnType, WriteMode};
use idem_core::failpoint::{self, AFTER_WRITE, MID_WRITE};
use idem_core::table::offsets::{self, OffsetsSql, Unmoved};
use idem_core::table::recent::{self, RecentKeys};
use idem_core::table::sql::{self, q, DELETE_FLAG, ID_COLUMN};
use idem_core::table::{audit, check};
use idem_core::{
    AddsColumns, Batch, CommitStats, Op, Opened, PartitionRef, Record, RowPositions, Sink,
    SinkError, SinkInfo, StoredPosition, TableColumn,
};
use idem_postgres::server_name;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

/// Statements derived from the config, and again from a batch that brings
/// columns learnt from the source's schema.
struct Plan {
    /// How many mapped columns the statements write.
    width: usize,
    /// COPY types: the mapped columns, then partition and offset...
    target_types: Vec<Type>,
    /// ...and the delete flag, for the staging table.
    stage_types: Vec<Type>,
    copy_target: String,
    create_stage: String,
    copy_stage: String,
    /// The offsets table's statements (the table-sink kit).
    offsets: OffsetsSql,
    /// Upsert statements: straight from the staging table when keys are
    /// unique and no tombstone is in the batch, else newest-per-key first.
    merge_staged: String,
    merge_latest: String,
    delete_latest: String,
    /// Versioned upserts with deletes: record deletes, and create their
    /// table (see [`sql::Graves`]).
    bury_latest: Option<String>,
    create_graves: Option<String>,
    /// Dedup: insert first-seen ids and their rows; create and purge ids.
    dedup_insert: String,
    /// Dedup into a target keyed on the key: insert the rows of new keys.
    insert_new_keys: String,
    create_ids: String,
    purge_ids: String,
    /// `[dedup] store = "sink"`: the staging table holds each record's
    /// id; record the new ones and drop the rows of the others, create
    /// and purge the ids, and insert what is left (append).
    drop_seen: Option<String>,
    create_seen: String,
    /// The ids recorded without a check (`seen_at` defaults to `now()`;
    /// a table made before that default gets it).
    copy_seen: String,
    seen_default: String,
    purge_seen: String,
    insert_staged: String,
    /// Positions of `key` among the columns (upsert: the table's key;
    /// dedup: the id columns).
    key_idx: Vec<usize>,
}

impl Plan {
    fn new(
        cfg: &PostgresSinkConfig,
        columns: &[ColumnConfig],
        ctx: &Ctx,
        keep_ids: Option<Duration>,
    ) -> Plan {
        // The target's primary key: upsert only (dedup keeps ids apart).
        let keys = match cfg.mode {
            WriteMode::Upsert => cfg.key.clone(),
            WriteMode::Append | WriteMode::Dedup => Vec::new(),
        };
        let version = cfg.version.as_deref();
        let col_list = sql::list(&sql::insert_columns(columns));
        let mut target_types: Vec<Type> = columns.iter().map(|c| pg_type(c.ty)).collect();
        target_types.extend([Type::TEXT, Type::INT8]);
        let mut stage_types = target_types.clone();
        stage_types.push(Type::BOOL);
        // One staging table per target, width and shape, per session;
        // emptied at each commit.
        let with_ids = if keep_ids.is_some() { "i" } else { "" };
        let stage = q(&format!(
            "_idem_stage{}{with_ids}_{}",
            columns.len(),
            cfg.table
        ));
        let mut stage_defs: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", q(&c.name), sql_type(c.ty)))
            .chain([
                format!("{} text", q(sql::POS_PARTITION)),
                format!("{} bigint", q(sql::POS_OFFSET)),
                format!("{DELETE_FLAG} boolean"),
            ])
            .collect();
        let mut stage_list = format!("{col_list}, {DELETE_FLAG}");
        if keep_ids.is_some() {
            stage_types.push(Type::TEXT);
            stage_defs.push(format!("{ID_COLUMN} text"));
            stage_list.push_str(&format!(", {ID_COLUMN}"));
        }
        let seen = &ctx.seen;
        // Ids go in sorted: two batches holding the same ids wait on each
        // other in the same order instead of deadlocking. A conflicting id
        // is one another batch committed (or, still open, commits first:
        // the insert waits for it).
        // Ids compare byte by byte (`COLLATE "C"`, the ids table's): only
        // equality matters, and a locale's rules made 1M inserts into the
        // index 19-26% (C.UTF-8) to 43-59% (ICU en-US) slower. They go in
        // sorted that way, the index's order. An ids table made before
        // keeps its collation, and works as it did.
        let drop_seen = keep_ids.map(|_| {
            format!(
                "WITH fresh AS (INSERT INTO {seen} (id, seen_at)
                                SELECT {ID_COLUMN}, now() FROM {stage} WHERE {ID_COLUMN} IS NOT NULL ORDER BY {ID_COLUMN} COLLATE \"C\"
                                ON CONFLICT DO NOTHING RETURNING id)
                 DELETE FROM {stage} WHERE {ID_COLUMN} IS NOT NULL AND {ID_COLUMN} NOT IN (SELECT id FROM fresh)"
            )
        });
        let latest = format!(
            "WITH latest AS (SELECT DISTINCT ON ({keys}) * FROM {stage} ORDER BY {keys}, {order}) ",
            keys = sql::list(&keys),
            order = sql::newest_first(version),
        );
        let t = &ctx.table;
        let graves = sql::Graves::of(
            ctx.graves.clone(),
            cfg.mode,
            version,
            cfg.delete_on_tombstone,
        );
        let graves = graves.as_ref();
        Plan {
            width: columns.len(),
            target_types,
            stage_types,
            copy_target: format!("COPY {t} ({col_list}) FROM STDIN (FORMAT binary)"),
            create_stage: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ({}) ON COMMIT DELETE ROWS",
                stage_defs.join(", ")
            ),
            copy_stage: format!("COPY {stage} ({stage_list}) FROM STDIN (FORMAT binary)"),
            offsets: OffsetsSql::new(&ctx.offsets),
            merge_staged: sql::merge(t, "tgt", &stage, columns, &keys, version, graves),
            merge_latest: latest.clone()
                + &sql::merge(t, "tgt", "latest", columns, &keys, version, graves),
            delete_latest: latest.clone() + &sql::delete(t, "tgt", "latest", &keys, version),
            bury_latest: graves.map(|g| latest + &g.bury("latest", &keys)),
            create_graves: graves.map(|g| g.create(columns, &keys, sql_type)),
            dedup_insert: sql::dedup_insert(t, &ctx.ids, &stage, columns, &cfg.key),
            insert_new_keys: sql::insert_new_keys(t, &stage, columns, &cfg.key),
            create_ids: format!(
                "CREATE TABLE IF NOT EXISTS {} ({}, seen_at timestamptz NOT NULL, PRIMARY KEY ({}))",
                ctx.ids,
                columns
                    .iter()
                    .filter(|c| cfg.key.contains(&c.name))
                    .map(|c| format!("{} {} NOT NULL", q(&c.name), sql_type(c.ty)))
                    .collect::<Vec<_>>()
                    .join(", "),
                sql::list(&cfg.key)
            ),
            purge_ids: purge(&ctx.ids, cfg.dedup_retention),
            drop_seen,
            // The default serves the `COPY` of ids.
            create_seen: format!(
                "CREATE TABLE IF NOT EXISTS {seen} (id text COLLATE \"C\" PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now())"
            ),
            seen_default: format!("ALTER TABLE {seen} ALTER COLUMN seen_at SET DEFAULT now()"),
            copy_seen: format!("COPY {seen} (id) FROM STDIN (FORMAT binary)"),
            purge_seen: purge(seen, keep_ids.unwrap_or_default()),
            insert_staged: format!("INSERT INTO {t} ({col_list}) SELECT {col_list} FROM {stage}"),
            key_idx: sql::key_indexes(columns, &cfg.key),
        }
    }
}

/// Forget the ids in `table` older than `retention`.
fn purge(table: &str, retention: Duration) -> String {
    format!(
        "DELETE FROM {table} WHERE seen_at < now() - make_interval(secs => {})",
        retention.as_secs_f64()
    )
}

/// What [`copy_rows`] sends of a batch besides mapped values and position.
#[derive(Clone, Copy)]
struct Rows<'a> {
    /// The delete flag (the staging table's).
    flag: bool,
    /// Only the records it marks.
    keep: Option<&'a [bool]>,
    /// Each record's message id...
    id: bool,
    /// ...but a null for those it marks (their ids are recorded already).
    recorded: Option<&'a [bool]>,
    /// The records to send, in this order (all of them in theirs if none).
    order: Option<&'a [u32]>,
}

impl Rows<'_> {
    const TARGET: Rows<'static> = Rows {
        flag: false,
        keep: None,
        id: false,
        recorded: None,
        order: None,
    };
}

/// COPY `batch` in binary through `sql`: mapped values, position, and what
/// `rows` adds.
async fn copy_rows(
    txn: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    types: &[Type],
    batch: &Batch,
    rows: Rows<'_>,
) -> Result<(), tokio_postgres::Error> {
    let sink = txn.copy_in(sql).await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    futures_util::pin_mut!(writer);
    // Half way through the rows it sends.
    let half = rows.order.map_or(batch.records.len(), <[u32]>::len) / 2;
    let partition: &str = &batch.partition.partition;
    let mut row: Vec<Cell> = Vec::with_capacity(types.len());
    let order: Box<dyn Iterator<Item = usize> + Send> = match rows.order {
        Some(order) => Box::new(order.iter().map(|&i| i as usize)),
        None => Box::new(0..batch.records.len()),
    };
    for (n, i) in order.enumerate() {
        let rec = &batch.records[i];
        if n == half {
            failpoint::hit(MID_WRITE);
        }
        if rows.keep.is_some_and(|k| !k[i]) {
            continue;
        }
        row.extend(rec.values.iter().map(Cell::Mapped));
        row.push(Cell::Text(partition));
        row.push(Cell::BigInt(sql::offset_to_sql(rec.offset)));
        if rows.flag {
            row.push(Cell::Boolean(rec.op == Op::Delete));
        }
        if rows.id {
            let id = rec
                .id
                .as_deref()
                .filter(|_| rows.recorded.is_none_or(|r| !r[i]));
            row.push(id.map_or(Cell::Mapped(idem_core::ValueRef::Null), Cell::Text));
        }
        writer.as_mut().write_raw(row.drain(..)).await?;
    }
    writer.as_mut().finish().await?;
    Ok(())
}

/// COPY `ids` in binary through `sql` (one text column).
async fn copy_ids(
    txn: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    ids: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let sink = txn.copy_in(sql).await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT]);
    futures_util::pin_mut!(writer);
    for id in ids {
        writer.as_mut().write_raw([Cell::Text(id)]).await?;
    }
    writer.as_mut().finish().await?;
    Ok(())
}

/// Writes batches into a PostgreSQL table, positions in the same transaction.
pub struct PostgresSink {
    cfg: PostgresSinkConfig,
    columns: Vec<ColumnConfig>,
    ctx: Ctx,
    /// The configured columns' plan, or a wider one once a batch added
    /// columns learnt from the source's schema.
    plan: RwLock<Arc<Plan>>,
    pool: Result<Pool, String>,
    /// Upserts: batches since the direct COPY last met an existing key
    /// (0: try it).
    since_fallback: AtomicU32,
    /// Dedup mode and kept ids: commits so far, to purge expired ids
    /// every 100th.
    commits: AtomicU64,
    /// `[dedup] store = "sink"`: how long message ids are kept.
    keep_ids: Option<Duration>,
    /// Dedup mode, and the table has a unique index on the key (Idem
    /// creates it so): the rows themselves are the ids (learnt at
    /// [`Sink::prepare`]).
    keyed_dedup: AtomicBool,
    /// The keys (upsert, dedup) or message ids (kept ids) committed
    /// lately: those not among them are sent by `COPY` first (see
    /// [`PostgresSink::try_copy`]).
    recent: Mutex<RecentKeys>,
}

/// Keys or ids a sink remembers per generation (two are kept, about 20
/// bytes each with the hash sets' slack: at most 10 MB); a copy arriving
/// later than that many keys after its original costs its batch the fast
/// path.
const RECENT_KEYS: usize = 250_000;

impl PostgresSink {
    /// No I/O: connections open on first use.
    pub fn new(cfg: PostgresSinkConfig, columns: Vec<ColumnConfig>) -> Self {
        let parsed = cfg.url.expose().parse::<tokio_postgres::Config>();
        let server = parsed
            .as_ref()
            .map_or_else(|_| "postgres".into(), server_name);
        let ctx = Ctx {
            server,
            table: format!("{}.{}", q(&cfg.schema), q(&cfg.table)),
            offsets: format!("{}.{}", q(&cfg.schema), q(&cfg.offsets_table)),
            ids: format!(
                "{}.{}",
                q(&cfg.schema),
                q(&crate::config::ids_table(&cfg.table))
            ),
            graves: format!("{}.{}", q(&cfg.schema), q(&sql::Graves::name(&cfg.table))),
            seen: format!("{}.{}", q(&cfg.schema), q(&sql::seen_table(&cfg.table))),
        };
        let pool = parsed.map_err(|e| e.to_string()).and_then(|mut pg| {
            pg.connect_timeout(cfg.connect_timeout);
            // `IF NOT EXISTS` notices on every batch are noise, not news.
            pg.options(format!(
                "-c statement_timeout={} -c idle_in_transaction_session_timeout={} -c client_min_messages=warning",
                cfg.statement_timeout.as_millis(),
                cfg.idle_in_transaction_timeout.as_millis()
            ));
            if pg.get_application_name().is_none() {
                pg.application_name("idem");
            }
            pg.ssl_mode(match cfg.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
            });
            let tls = idem_postgres::tls_connector(cfg.sslmode, cfg.ca_file.as_deref())?;
            let manager = Manager::from_config(
                pg,
                tls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(cfg.pool_size)
                .build()
                .map_err(|e| e.to_string())
        });
        let plan = Plan::new(&cfg, &columns, &ctx, None);
        PostgresSink {
            cfg,
            columns,
            ctx,
            plan: RwLock::new(Arc::new(plan)),
            pool,
            since_fallback: AtomicU32::new(0),
            commits: AtomicU64::new(0),
            keep_ids: None,
            keyed_dedup: AtomicBool::new(false),
            recent: Mutex::new(RecentKeys::new(RECENT_KEYS)),
        }
    }

    /// Keep message ids in the sink's own table for `retention` and drop,
    /// in each batch's transaction, the records whose id took effect
    /// before (`[dedup] store = "sink"`). Not with `mode = "dedup"`, which
    /// keys its ids itself ([`Sink::info`] then names no ids table).
    pub fn keeping_ids(mut self, retention: Duration) -> Self {
        if self.cfg.mode != WriteMode::Dedup {
            self.keep_ids = Some(retention);
            let plan = Plan::new(&self.cfg, &self.columns, &self.ctx, self.keep_ids);
            self.plan = RwLock::new(Arc::new(plan));
        }
        self
    }

    /// Every 100th commit: forget the ids of `table` past the retention
    /// (`purge`).
    async fn purge_expired(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        purge: &str,
        table: &str,
    ) -> Result<(), PgError> {
        if self
            .commits
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(100)
        {
            txn.execute(purge, &[])
                .await
                .map_err(|e| self.ctx.sql(table, "forget expired message ids", e))?;
        }
        Ok(())
    }

    /// Whether to try COPY straight into the table for a batch of new-looking
    /// keys; after it met an existing key, try again every 16th batch.
    fn try_direct(&self) -> bool {
        let n = self.since_fallback.load(Ordering::Relaxed);
        if n == 0 {
            return true;
        }
        self.since_fallback.store((n + 1) % 16, Ordering::Relaxed);
        false
    }

    fn direct_failed(&self) {
        self.since_fallback.store(1, Ordering::Relaxed);
    }

    fn plan(&self) -> Arc<Plan> {
        self.plan
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Add `added` (columns learnt from the source's schema) to the table
    /// in `txn`, and check that those it had already have their types.
    async fn add_columns(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        added: &[ColumnConfig],
    ) -> Result<(), PgError> {
        let ctx = &self.ctx;
        for c in added {
            // A column that already exists (added by an earlier run, or
            // by another partition just now) is checked below instead.
            txn.batch_execute(&sql::add_column(&ctx.table, &c.name, sql_type(c.ty)))
                .await
                .map_err(|e| ctx.sql(&ctx.table, &format!("add column `{}`", c.name), e))?;
        }
        let actual = self.table_columns(&**txn).await?;
        let expected = added.iter().map(|c| (c.name.as_str(), reported_type(c.ty)));
        check::learnt(expected, &actual).map_err(|detail| PgError::SchemaMismatch {
            server: ctx.server.clone(),
            table: ctx.table.clone(),
            detail,
        })
    }

    async fn table_columns(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<(String, String)>, PgError> {
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&self.cfg.schema, &self.cfg.table],
            )
            .await
            .map_err(|e| self.ctx.sql(&self.ctx.table, "read the table's columns", e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// COPY `batch` into the session's staging table (made on first use,
    /// emptied at each commit), with the delete flag.
    async fn stage(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        keep: Option<&[bool]>,
        recorded: Option<&[bool]>,
    ) -> Result<(), PgError> {
        let ctx = &self.ctx;
        txn.batch_execute(&plan.create_stage)
            .await
            .map_err(|e| ctx.sql(&ctx.table, "create the staging table", e))?;
        let rows = Rows {
            flag: true,
            keep,
            // The staging table's shape: see `Plan::new`.
            id: self.keep_ids.is_some(),
            recorded,
            order: None,
        };
        copy_rows(txn, &plan.copy_stage, &plan.stage_types, batch, rows)
            .await
            .map_err(|e| {
                ctx.sql(
                    &ctx.table,
                    &format!("COPY a batch of {}", batch.partition),
                    e,
                )
            })
    }

    /// Dedup: COPY into the staging table, then insert the rows whose id is
    /// new (recording it); now and then forget ids past the retention.
    async fn dedup(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
    ) -> Result<u64, PgError> {
        let ctx = &self.ctx;
        self.purge_expired(txn, &plan.purge_ids, &ctx.ids).await?;
        self.stage(txn, plan, batch, None, None).await?;
        txn.execute(&plan.dedup_insert, &[])
            .await
            .map_err(|e| ctx.sql(&ctx.table, "insert messages with new ids", e))
    }

    /// Dedup into a target keyed on the key: of the first record of each
    /// key in the batch, insert those whose key the table does not hold.
    /// The rows are the ids: nothing to record or forget. Keys this sink
    /// did not commit lately go by `COPY` straight into the table under a
    /// savepoint (as fast as a load); the others, and every key after that
    /// `COPY` met an existing one, are staged and inserted with `ON
    /// CONFLICT DO NOTHING`.
    async fn dedup_keyed(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
    ) -> Result<u64, PgError> {
        let ctx = &self.ctx;
        let keep = sql::first_of_each_key(&batch.records, &plan.key_idx);
        let hashes: Vec<u64> = sql::kept(&batch.records, &keep)
            .map(|r| recent::key_hash(r, &plan.key_idx))
            .collect();
        let mut written = 0;
        let mut safe = keep.clone();
        if self.try_direct() {
            let mut fast = keep.clone();
            {
                let recent = self.recent_keys();
                let mut h = hashes.iter();
                for (f, s) in fast.iter_mut().zip(safe.iter_mut()).filter(|(f, _)| **f) {
                    let maybe = h.next().is_some_and(|h| recent.may_hold(*h));
                    (*f, *s) = (!maybe, maybe);
                }
            }
            match self.copy_new_rows(txn, plan, batch, &fast).await? {
                Some(n) => written = n,
                None => safe = keep,
            }
        }
        if safe.iter().any(|s| *s) {
            self.stage(txn, plan, batch, Some(&safe), None).await?;
            written += txn
                .execute(&plan.insert_new_keys, &[])
                .await
                .map_err(|e| ctx.sql(&ctx.table, "insert messages with new keys", e))?;
        }
        // Before the commit: a key added for a batch that then fails only
        // sends that key the safe way next time.
        self.recent_keys().add(hashes);
        Ok(written)
    }

    fn recent_keys(&self) -> std::sync::MutexGuard<'_, RecentKeys> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `[dedup] store = "sink"`: the ids of `keep`'s records that this
    /// sink did not record lately go by `COPY` straight into the ids table
    /// (sorted, so that batches sharing ids wait in one order), under a
    /// savepoint. Returns the records whose ids it recorded; `None` when it
    /// did not try, or met an id recorded already (rolled back: the
    /// staged statement then checks every id).
    async fn copy_new_ids(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        keep: &[bool],
    ) -> Result<Option<Vec<bool>>, PgError> {
        let ctx = &self.ctx;
        let direct = self.try_direct();
        let mut hashes = Vec::with_capacity(batch.records.len());
        let mut fast = vec![false; batch.records.len()];
        let mut ids: Vec<&str> = Vec::new();
        {
            let recent = self.recent_keys();
            for (i, r) in batch.records.iter().enumerate().filter(|(i, _)| keep[*i]) {
                let Some(id) = r.id.as_deref() else { continue };
                let h = recent::id_hash(id);
                hashes.push(h);
                if direct && !recent.may_hold(h) {
                    fast[i] = true;
                    ids.push(id);
                }
            }
        }
        // Before the commit: an id added for a batch that then fails only
        // sends that id the checked way next time.
        self.recent_keys().add(hashes);
        if ids.is_empty() {
            return Ok(None);
        }
        ids.sort_unstable();
        let copy = copy_ids(txn, &plan.copy_seen, &ids);
        let what = "COPY the batch's new message ids";
        let copied = self.try_copy(txn, &ctx.seen, what, copy).await?;
        Ok(copied.then_some(fast))
    }

    /// COPY the records `fast` marks, taken to be new keys, straight into
    /// the table under a savepoint: how many, or `None` if one met a key
    /// the table holds (rolled back).
    async fn copy_new_rows(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        fast: &[bool],
    ) -> Result<Option<u64>, PgError> {
        let n = fast.iter().filter(|f| **f).count() as u64;
        if n == 0 {
            return Ok(Some(0));
        }
        // In key order: the table's unique index takes them with fewer page
        // visits (25% faster for random ids than in arrival order).
        let order = sql::in_key_order(&batch.records, fast, &plan.key_idx);
        let rows = Rows {
            keep: Some(fast),
            order: Some(&order),
            ..Rows::TARGET
        };
        let copy = copy_rows(txn, &plan.copy_target, &plan.target_types, batch, rows);
        let what = format!("COPY a batch of {}", batch.partition);
        let copied = self.try_copy(txn, &self.ctx.table, &what, copy).await?;
        Ok(copied.then_some(n))
    }

    /// Run `copy`, a `COPY` of rows taken to be new, under a savepoint:
    /// `true` if it went through, `false` if it met a key `table` holds
    /// already and was rolled back (then the next 15 batches do not try).
    async fn try_copy(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        table: &str,
        what: &str,
        copy: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
    ) -> Result<bool, PgError> {
        let ctx = &self.ctx;
        txn.batch_execute("SAVEPOINT idem_direct")
            .await
            .map_err(|e| ctx.sql(table, "savepoint", e))?;
        match copy.await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                self.direct_failed();
                txn.batch_execute("ROLLBACK TO SAVEPOINT idem_direct")
                    .await
                    .map_err(|e| ctx.sql(table, "rollback to savepoint", e))?;
                Ok(false)
            }
            Err(e) => Err(ctx.sql(table, what, e)),
        }
    }

    /// Upsert without graves: the records whose key is alone in the batch
    /// and was not committed lately (new keys, as in a load) go by `COPY`
    /// straight into the table under a savepoint; the rest are staged and
    /// merged. A key the table holds after all (written before a restart,
    /// or by another runner) fails the `COPY`, and the whole batch is
    /// merged instead.
    async fn upsert_new_keys_first(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        unique: bool,
    ) -> Result<u64, PgError> {
        let records = &batch.records;
        let hashes: Vec<u64> = records
            .iter()
            .map(|r| recent::key_hash(r, &plan.key_idx))
            .collect();
        let mut copied = 0;
        let mut rest: Option<Vec<bool>> = None;
        if self.try_direct() {
            // Counted by hash: two keys sharing one only go the merge way.
            let mut counts: HashMap<u64, u32> = HashMap::with_capacity(hashes.len());
            for h in &hashes {
                *counts.entry(*h).or_default() += 1;
            }
            let fast: Vec<bool> = {
                let recent = self.recent_keys();
                records
                    .iter()
                    .zip(&hashes)
                    .map(|(r, h)| r.op == Op::Upsert && counts[h] == 1 && !recent.may_hold(*h))
                    .collect()
            };
            if let Some(n) = self.copy_new_rows(txn, plan, batch, &fast).await? {
                copied = n;
                rest = Some(fast.iter().map(|f| !f).collect());
            }
        }
        // Before the commit: a key added for a batch that then fails only
        // sends that key the merge way next time.
        self.recent_keys().add(hashes);
        let merged = match &rest {
            None => self.merge(txn, plan, batch, unique).await?,
            Some(rest) if rest.iter().any(|r| *r) => {
                self.stage(txn, plan, batch, Some(rest), None).await?;
                let unique = sql::unique_upserts(sql::kept(records, rest), &plan.key_idx);
                self.merge_staged(txn, plan, batch, unique).await?
            }
            Some(_) => 0,
        };
        Ok(copied + merged)
    }

    /// `[dedup] store = "sink"`: stage the first record of each id in the
    /// batch, record the ids new to the table and drop the rows of the
    /// others, then insert (append) or merge (upsert) what is left; now
    /// and then forget ids past the retention.
    async fn by_id(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        drop_seen: &str,
    ) -> Result<u64, PgError> {
        let ctx = &self.ctx;
        self.purge_expired(txn, &plan.purge_seen, &ctx.seen).await?;
        let keep = sql::first_of_each_id(&batch.records);
        let recorded = self.copy_new_ids(txn, plan, batch, &keep).await?;
        self.stage(txn, plan, batch, Some(&keep), recorded.as_deref())
            .await?;
        // Ids left to check: those the `COPY` did not record.
        let unchecked = batch
            .records
            .iter()
            .zip(&keep)
            .enumerate()
            .any(|(i, (r, k))| *k && r.id.is_some() && recorded.as_ref().is_none_or(|rec| !rec[i]));
        if unchecked {
            txn.execute(drop_seen, &[])
                .await
                .map_err(|e| ctx.sql(&ctx.seen, "record the batch's message ids", e))?;
        }
        if self.cfg.mode != WriteMode::Upsert {
            return txn
                .execute(&plan.insert_staged, &[])
                .await
                .map_err(|e| ctx.sql(&ctx.table, "insert the batch", e));
        }
        let unique = sql::unique_upserts(sql::kept(&batch.records, &keep), &plan.key_idx);
        self.merge_staged(txn, plan, batch, unique).await
    }

    /// Upsert through the staging table: COPY there, then merge (picking
    /// the newest message per key first unless keys are `unique`).
    async fn merge(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        unique: bool,
    ) -> Result<u64, PgError> {
        self.stage(txn, plan, batch, None, None).await?;
        self.merge_staged(txn, plan, batch, unique).await
    }

    /// Merge the staging table, where `batch` went, into the table.
    async fn merge_staged(
        &self,
        txn: &deadpool_postgres::Transaction<'_>,
        plan: &Plan,
        batch: &Batch,
        unique: bool,
    ) -> Result<u64, PgError> {
        let ctx = &self.ctx;
        if unique {
            return txn
                .execute(&plan.merge_staged, &[])
                .await
                .map_err(|e| ctx.sql(&ctx.table, "merge the batch", e));
        }
        // Without a tombstone in the batch, nothing to delete or bury.
        let mut deleted = 0;
        if batch.records.iter().any(|r| r.op == Op::Delete) {
            deleted = txn
                .execute(&plan.delete_latest, &[])
                .await
                .map_err(|e| ctx.sql(&ctx.table, "apply tombstones", e))?;
            if let Some(bury) = &plan.bury_latest {
                txn.execute(bury, &[])
                    .await
                    .map_err(|e| ctx.sql(&ctx.graves, "record deleted keys", e))?;
            }
        }
        let merged = txn
            .execute(&plan.merge_latest, &[])
            .await
            .map_err(|e| ctx.sql(&ctx.table, "merge the batch", e))?;
        Ok(deleted + merged)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        let pool = self.pool.as_ref().map_err(|e| PgError::Setup(e.clone()))?;
        pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => PgError::Connect {
                server: self.ctx.server.clone(),
                source: Box::new(source),
            },
            other => PgError::Pool {
                server: self.ctx.server.clone(),
                message: other.to_string(),
            },
        })
    }

    async fn check_table(&self, client: &impl GenericClient) -> Result<(), PgError> {
        let ctx = &self.ctx;
        let mismatch = |detail: String| PgError::SchemaMismatch {
            server: ctx.server.clone(),
            table: ctx.table.clone(),
            detail,
        };
        let actual = self.table_columns(client).await?;
        let expected = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), reported_type(c.ty)))
            .chain([(sql::POS_PARTITION, "text"), (sql::POS_OFFSET, "bigint")]);
        check::columns(expected, &actual).map_err(mismatch)?;
        if self.cfg.mode == WriteMode::Upsert {
            let pk: Vec<String> = client
                .query(
                    "SELECT a.attname::text FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                     WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                     ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    &[&ctx.table],
                )
                .await
                .map_err(|e| ctx.sql(&ctx.table, "read the primary key", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            check::primary_key(&self.cfg.key, &pk).map_err(mismatch)?;
        }
        Ok(())
    }

    /// Whether a unique index of the table (not partial, on plain
    /// columns) covers exactly the key columns: what `ON CONFLICT (key)`
    /// needs.
    async fn key_unique(&self, client: &impl GenericClient) -> Result<bool, PgError> {
        let mut key = self.cfg.key.clone();
        key.sort();
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i
                 WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL
                   AND i.indexprs IS NULL AND i.indnkeyatts = cardinality($2::text[])
                   AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE \"C\") FROM pg_attribute a
                        WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = $2::text[])",
                &[&self.ctx.table, &key],
            )
            .await
            .map(|r| r.get(0))
            .map_err(|e| self.ctx.sql(&self.ctx.table, "read the unique indexes", e))
    }

    async fn write(&self, batch: &Batch) -> Result<Option<CommitStats>, PgError> {
        let ctx = &self.ctx;
        let current = self.plan();
        // A batch that brings learnt columns the plan lacks writes through
        // a wider plan, kept once the batch commits.
        let grown = batch
            .columns
            .as_ref()
            .filter(|c| c.len() > current.width)
            .map(|c| {
                let plan = Plan::new(&self.cfg, c, ctx, self.keep_ids);
                (Arc::new(plan), &c[current.width..])
            });
        let plan = grown.as_ref().map_or(&current, |(plan, _)| plan);
        let p = &batch.partition;
        let upsert = self.cfg.mode == WriteMode::Upsert;
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(|e| ctx.sql(&ctx.table, "begin", e))?;
        let next = sql::offset_to_sql(batch.next_offset);
        let moved = txn
            .execute(
                &plan.offsets.advance,
                &[
                    &next,
                    &&*p.connector,
                    &&*p.source,
                    &&*p.partition,
                    &batch.epoch,
                    &sql::offset_to_sql(batch.first_offset),
                    &i32::try_from(batch.attempt).unwrap_or(i32::MAX),
                ],
            )
            .await
            .map_err(|e| ctx.sql(&ctx.offsets, &format!("advance partition {p}"), e))?;
        if moved == 0 {
            // Fenced, or this batch committed in an earlier try whose
            // answer was lost. Dropping `txn` rolls back either way.
            let row = txn
                .query_opt(
                    &plan.offsets.current,
                    &[&&*p.connector, &&*p.source, &&*p.partition],
                )
                .await
                .map_err(|e| ctx.sql(&ctx.offsets, &format!("read partition {p}"), e))?
                .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)));
            return match offsets::unmoved(row, batch) {
                Unmoved::Fenced => Ok(None),
                Unmoved::Committed => Ok(Some(offsets::committed_before(batch))),
                Unmoved::Conflict(source) => Err(PgError::PositionConflict {
                    server: ctx.server.clone(),
                    table: ctx.offsets.clone(),
                    source,
                }),
            };
        }
        if let Some((_, added)) = &grown {
            self.add_columns(&txn, added).await?;
        }
        let total = batch.records.len() as u64;
        let written = if self.cfg.mode == WriteMode::Dedup {
            if self.keyed_dedup.load(Ordering::Relaxed) {
                self.dedup_keyed(&txn, plan, batch).await?
            } else {
                self.dedup(&txn, plan, batch).await?
            }
        } else if let Some(drop_seen) = &plan.drop_seen {
            self.by_id(&txn, plan, batch, drop_seen).await?
        } else if !upsert {
            copy_rows(
                &txn,
                &plan.copy_target,
                &plan.target_types,
                batch,
                Rows::TARGET,
            )
            .await
            .map_err(|e| ctx.sql(&ctx.table, &format!("COPY a batch of {p}"), e))?;
            total
        } else {
            let unique = sql::unique_upserts(&batch.records, &plan.key_idx);
            // Graves must be consulted: no COPY straight into the table.
            if plan.create_graves.is_none() {
                self.upsert_new_keys_first(&txn, plan, batch, unique)
                    .await?
            } else {
                self.merge(&txn, plan, batch, unique).await?
            }
        };
        failpoint::hit(AFTER_WRITE);
        txn.commit()
            .await
            .map_err(|e| ctx.sql(&ctx.table, "commit", e))?;
        if let Some((plan, _)) = grown {
            let mut kept = self
                .plan
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.width < plan.width {
                *kept = plan;
            }
        }
        Ok(Some(CommitStats {
            written,
            deduplicated: total.saturating_sub(written),
            rejected: 0,
            durable_through: None,
        }))
    }

    /// Create or check the offsets table (and the schema), and with
    /// `table` the target table and the tables beside it, in one
    /// transaction.
    async fn prepare_with(&self, table: bool) -> Result<(), SinkError> {
        let mut client = self.client().await?;
        let ctx = &self.ctx;
        // Runners starting together would race: `CREATE .. IF NOT EXISTS`
        // is not safe against a concurrent create in PostgreSQL. One
        // transaction under an advisory lock per schema serializes them.
        let txn = client
            .transaction()
            .await
            .map_err(|e| ctx.sql(&ctx.table, "begin", e))?;
        txn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("idem ddl {}", self.cfg.schema)],
        )
        .await
        .map_err(|e| ctx.sql(&ctx.table, "take the schema's DDL lock", e))?;
        let client = &txn;
        if self.cfg.create {
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    q(&self.cfg.schema)
                ))
                .await
                .map_err(|e| ctx.sql(&ctx.table, "create the schema", e))?;
        }
        recover::create_offsets_table(&**client, ctx, &self.plan().offsets).await?;
        if !table {
            txn.commit()
                .await
                .map_err(|e| ctx.sql(&ctx.offsets, "commit the offsets table", e))?;
            return Ok(());
        }
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&ctx.table])
            .await
            .map_err(|e| ctx.sql(&ctx.table, "look up the table", e))?
            .get(0);
        if exists.is_none() {
            if !self.cfg.create {
                return Err(PgError::MissingTable {
                    server: ctx.server.clone(),
                    table: ctx.table.clone(),
                }
                .into());
            }
            // Dedup: keyed too, so that the rows are the ids.
            let keys = match self.cfg.mode {
                WriteMode::Upsert | WriteMode::Dedup => self.cfg.key.clone(),
                WriteMode::Append => Vec::new(),
            };
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} ({})",
                ctx.table,
                sql::table_definition(&self.columns, &keys, sql_type)
            );
            client
                .batch_execute(&ddl)
                .await
                .map_err(|e| ctx.sql(&ctx.table, "create the table", e))?;
        }
        self.check_table(&**client).await?;
        if let Some(create) = &self.plan().create_graves {
            client
                .batch_execute(create)
                .await
                .map_err(|e| ctx.sql(&ctx.graves, "create the deleted keys table", e))?;
        }
        let keyed = self.cfg.mode == WriteMode::Dedup && self.key_unique(&**client).await?;
        self.keyed_dedup.store(keyed, Ordering::Relaxed);
        if self.cfg.mode == WriteMode::Dedup && !keyed {
            client
                .batch_execute(&self.plan().create_ids)
                .await
                .map_err(|e| ctx.sql(&ctx.ids, "create the message id table", e))?;
        }
        if self.keep_ids.is_some() {
            client
                .batch_execute(&self.plan().create_seen)
                .await
                .map_err(|e| ctx.sql(&ctx.seen, "create the message id table", e))?;
            let defaulted: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a
                     ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                     WHERE d.adrelid = $1::text::regclass AND a.attname = 'seen_at')",
                    &[&ctx.seen],
                )
                .await
                .map_err(|e| ctx.sql(&ctx.seen, "read the message id table's defaults", e))?
                .get(0);
            if !defaulted {
                client
                    .batch_execute(&self.plan().seen_default)
                    .await
                    .map_err(|e| ctx.sql(&ctx.seen, "give seen_at its default", e))?;
            }
        }
        txn.commit()
            .await
            .map_err(|e| ctx.sql(&ctx.table, "commit the table definitions", e))?;
        Ok(())
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn check_record(&self, record: &Record) -> Result<(), String> {
        for (i, v) in record.values.iter().enumerate() {
            let name = self
                .columns
                .get(i)
                .map_or("(learnt from the source's schema)", |c| c.name.as_str());
            if let Some(why) = crate::cell::refusal(name, v) {
                return Err(why);
            }
        }
        Ok(())
    }

    fn info(&self) -> SinkInfo {
        let cfg = &self.cfg;
        let mut info = sql::table_sink_info(
            "PostgreSQL",
            &format!("{} on {}", self.ctx.table, self.ctx.server),
            cfg.mode,
            &cfg.key,
            cfg.version.as_deref(),
            cfg.delete_on_tombstone,
        );
        info.adds_columns = Some(AddsColumns {
            decimal: ColumnType::Numeric,
        });
        info.ids_table = self.keep_ids.map(|_| self.ctx.seen.clone());
        info
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        self.prepare_with(true).await
    }

    async fn prepare_positions(&self) -> Result<(), SinkError> {
        self.prepare_with(false).await
    }

    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError> {
        let client = self.client().await?;
        Ok(recover::open(&**client, &self.ctx, &self.plan().offsets, partition).await?)
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        match self.write(&batch).await? {
            Some(stats) => Ok(stats),
            None => Err(SinkError::Fenced {
                partition: batch.partition.to_string(),
                epoch: batch.epoch,
            }),
        }
    }

    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        let client = self.client().await?;
        Ok(recover::positions(&**client, &self.ctx, &self.plan().offsets, connector).await?)
    }

    async fn existing_columns(&self) -> Result<Option<Vec<TableColumn>>, SinkError> {
        let client = self.client().await?;
        let found = self.table_columns(&**client).await?;
        Ok(Some(
            found
                .into_iter()
                .filter(|(name, _)| !name.starts_with("_idem_"))
                .map(|(name, ty)| {
                    let ty = check::column_type(&ty, |t| Some(reported_type(t)));
                    (name, ty)
                })
                .collect(),
        ))
    }

    async fn describe(&self) -> Result<String, SinkError> {
        let client = self.client().await?;
        let ctx = &self.ctx;
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}", ctx.table), &[])
            .await
            .map_err(|e| ctx.sql(&ctx.table, "count rows", e))?
            .get(0);
        Ok(format!(
            "table {} on {} holds {n} rows",
            ctx.table, ctx.server
        ))
    }

    async fn canonical_rows(
        &self,
        columns: &[(String, ColumnType)],
    ) -> Result<Option<Vec<Vec<Option<String>>>>, SinkError> {
        let client = self.client().await?;
        let ctx = &self.ctx;
        let cols: Vec<(&str, ColumnType)> = columns.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let rows = client
            .query(&audit::postgres_select(&ctx.table, &cols), &[])
            .await
            .map_err(|e| ctx.sql(&ctx.table, "read the rows", e))?;
        Ok(Some(
            rows.iter()
                .map(|r| {
                    cols.iter()
                        .enumerate()
                        .map(|(i, (_, ty))| audit::canonical(*ty, r.get(i)))
                        .collect()
                })
                .collect(),
        ))
    }

    async fn row_positions(&self) -> Result<Option<RowPositions>, SinkError> {
        use futures_util::TryStreamExt;
        let client = self.client().await?;
        let ctx = &self.ctx;
        let fail = |e| ctx.sql(&ctx.table, "list row positions", e);
        let sql = format!(
            "SELECT {}, {} FROM {}",
            sql::POS_PARTITION,
            sql::POS_OFFSET,
            ctx.table
        );
        // Streamed: a million rows are never a million rows in memory.
        let no_params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
        let rows = client.query_raw(&sql, no_params).await.map_err(fail)?;
        futures_util::pin_mut!(rows);
        let mut out = RowPositions::default();
        while let Some(r) = rows.try_next().await.map_err(fail)? {
            out.push(r.get::<_, &str>(0), r.get::<_, i64>(1).max(0) as u64);
        }
        Ok(Some(out))
    }
}
