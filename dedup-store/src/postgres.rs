//! Ids in a PostgreSQL table keyed on (namespace, id), with an expiry
//! column. A batch is one statement: `INSERT .. ON CONFLICT DO UPDATE ..
//! WHERE` the held row expired or is the owner's own, `RETURNING` the ids
//! it took; the rest are read back (a second round trip only when the
//! batch holds duplicates). Expired rows are swept every `SWEEP_EVERY`.

use crate::{now_ms, Claim, DedupError, DedupStore, Reservation, Seen, StoredPosition};
use async_trait::async_trait;
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub struct PostgresDedupStore {
    pool: Pool,
    /// `schema.table`, quoted.
    table: String,
    /// `schema.table_positions`, quoted: positions for sinks without their own.
    positions: String,
    shown: String,
    namespace: String,
    retention: Duration,
    last_sweep: AtomicU64,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl PostgresDedupStore {
    /// Ids in `schema.table` (created if missing) under `namespace`, over
    /// `pool`; `shown` names the server in messages (no password).
    pub async fn open(
        pool: Pool,
        shown: &str,
        schema: &str,
        table: &str,
        namespace: &str,
        retention: Duration,
    ) -> Result<Self, DedupError> {
        let store = PostgresDedupStore {
            pool,
            table: format!("{}.{}", quote(schema), quote(table)),
            positions: format!("{}.{}", quote(schema), quote(&format!("{table}_positions"))),
            shown: shown.to_string(),
            namespace: namespace.to_string(),
            retention,
            last_sweep: AtomicU64::new(now_ms()),
        };
        let client = store.client().await?;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {t} (
                 namespace text NOT NULL,
                 id text NOT NULL,
                 state \"char\" NOT NULL,
                 owner text,
                 \"partition\" text,
                 \"offset\" bigint,
                 expires_at timestamptz NOT NULL,
                 PRIMARY KEY (namespace, id));
             CREATE INDEX IF NOT EXISTS {idx} ON {t} (expires_at);
             CREATE TABLE IF NOT EXISTS {p} (
                 namespace text NOT NULL,
                 \"partition\" text NOT NULL,
                 epoch bigint NOT NULL,
                 next_offset bigint,
                 PRIMARY KEY (namespace, \"partition\"));",
            schema = quote(schema),
            t = store.table,
            p = store.positions,
            idx = quote(&format!("{table}_expires_at")),
        );
        // Runners starting together on one database: one creates.
        let lock = format!(
            "SELECT pg_advisory_xact_lock(hashtext('idem_dedup:' || {}))",
            lit(schema)
        );
        client
            .batch_execute(&format!("BEGIN; {lock}; {ddl} COMMIT;"))
            .await
            .map_err(|e| store.err(&e))?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DedupError> {
        self.pool.get().await.map_err(|e| DedupError::Unavailable {
            store: self.describe(),
            message: format!(
                "{e}; is PostgreSQL running there? (for Idem's tests: bash scripts/postgres.sh)"
            ),
            retriable: true,
        })
    }

    fn err(&self, e: &tokio_postgres::Error) -> DedupError {
        let code = e.code().map(|c| c.code().to_string());
        DedupError::Unavailable {
            store: self.describe(),
            message: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.to_string()),
            // Connection trouble, serialization failures, deadlocks.
            retriable: e.is_closed()
                || code
                    .as_deref()
                    .is_none_or(|c| c.starts_with("08") || c == "40001" || c == "40P01"),
        }
    }

    /// Reserve `$2` (ids) at `$3`/`$4` (partitions, offsets) for `$5`
    /// (owner) in namespace `$1` for `$6` seconds, over any row held; the
    /// caller may add a `WHERE` to the update to spare some.
    fn reserve_sql(&self, distinct: &str) -> String {
        format!(
            "INSERT INTO {t} AS d (namespace, id, state, owner, \"partition\", \"offset\", expires_at)
             SELECT {distinct} $1, u.id, 'R', $5, u.p, u.o, now() + make_interval(secs => $6)
             FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(id, p, o)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 state = 'R', owner = EXCLUDED.owner, \"partition\" = EXCLUDED.\"partition\",
                 \"offset\" = EXCLUDED.\"offset\", expires_at = EXCLUDED.expires_at",
            t = self.table
        )
    }

    /// `claims` as the arrays `reserve_sql` takes: ids, partitions, offsets.
    fn columns<'a>(claims: &[&'a Claim]) -> (Vec<&'a str>, Vec<&'a str>, Vec<i64>) {
        (
            claims.iter().map(|c| c.id.as_str()).collect(),
            claims.iter().map(|c| c.partition.as_str()).collect(),
            claims.iter().map(|c| offset_sql(c.offset)).collect(),
        )
    }

    fn secs(&self) -> f64 {
        self.retention.as_secs_f64()
    }

    async fn sweep_if_due(&self, client: &deadpool_postgres::Object) -> Result<(), DedupError> {
        let now = now_ms();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY.as_millis() as u64 {
            return Ok(());
        }
        self.last_sweep.store(now, Ordering::Relaxed);
        let sql = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE expires_at < now() LIMIT 100000))",
            t = self.table
        );
        client.execute(&sql, &[]).await.map_err(|e| self.err(&e))?;
        Ok(())
    }
}

/// A SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn offset_sql(o: u64) -> i64 {
    i64::try_from(o).unwrap_or(i64::MAX)
}

#[async_trait]
impl DedupStore for PostgresDedupStore {
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        self.sweep_if_due(&client).await?;
        let (ids, parts, offs) = Self::columns(claims);
        let sql = format!(
            "{} WHERE d.expires_at < now() OR (d.state = 'R' AND d.owner = EXCLUDED.owner)
             RETURNING d.id",
            self.reserve_sql("")
        );
        let taken = client
            .query(
                &sql,
                &[&self.namespace, &ids, &parts, &offs, &owner, &self.secs()],
            )
            .await
            .map_err(|e| self.err(&e))?;
        if taken.len() == claims.len() {
            return Ok(vec![Seen::New; claims.len()]);
        }
        let taken: std::collections::HashSet<String> = taken.iter().map(|r| r.get(0)).collect();
        let held: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !taken.contains(*id))
            .collect();
        // A new statement: it sees the rows other runners committed while
        // this one waited on them.
        let sql = format!(
            "SELECT id, state::text, owner, \"partition\", \"offset\" FROM {t}
             WHERE namespace = $1 AND id = ANY($2)",
            t = self.table
        );
        let rows = client
            .query(&sql, &[&self.namespace, &held])
            .await
            .map_err(|e| self.err(&e))?;
        let mut found: HashMap<String, Seen> = HashMap::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get(0);
            let state: String = r.get(1);
            let seen = if state == "D" {
                Seen::Done
            } else {
                Seen::Pending(Reservation {
                    owner: r.get::<_, Option<String>>(2).unwrap_or_default(),
                    partition: r.get::<_, Option<String>>(3).unwrap_or_default(),
                    offset: r.get::<_, Option<i64>>(4).map_or(0, |o| o.max(0) as u64),
                })
            };
            found.insert(id, seen);
        }
        Ok(claims
            .iter()
            .map(|c| {
                if taken.contains(&c.id) {
                    Seen::New
                } else {
                    // Gone between the two statements (swept): unseen, but
                    // not reserved; the caller's next try reserves it.
                    found.remove(&c.id).unwrap_or(Seen::Pending(Reservation {
                        owner: String::new(),
                        partition: c.partition.clone(),
                        offset: c.offset,
                    }))
                }
            })
            .collect())
    }

    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {t} (namespace, id, state, expires_at)
             SELECT $1, u.id, 'D', now() + make_interval(secs => $3)
             FROM (SELECT DISTINCT unnest($2::text[]) AS id) AS u
             ON CONFLICT (namespace, id) DO UPDATE SET state = 'D', owner = NULL,
                 \"partition\" = NULL, \"offset\" = NULL, expires_at = EXCLUDED.expires_at",
            t = self.table
        );
        client
            .execute(&sql, &[&self.namespace, &ids, &self.secs()])
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError> {
        if claims.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let (ids, parts, offs) = Self::columns(claims);
        // A claim list may name an id twice; one row per id.
        let sql = self.reserve_sql("DISTINCT ON (u.id)");
        client
            .execute(
                &sql,
                &[&self.namespace, &ids, &parts, &offs, &owner, &self.secs()],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let sql = format!(
            "DELETE FROM {t} WHERE namespace = $1 AND id = ANY($2) AND state = 'R' AND owner = $3",
            t = self.table
        );
        client
            .execute(&sql, &[&self.namespace, &ids, &owner])
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    fn describe(&self) -> String {
        format!("{} {} ({})", self.shown, self.table, self.namespace)
    }

    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {p} AS t (namespace, \"partition\", epoch) VALUES ($1, $2, 1)
             ON CONFLICT (namespace, \"partition\") DO UPDATE SET epoch = t.epoch + 1
             RETURNING epoch, next_offset",
            p = self.positions
        );
        let row = client
            .query_one(&sql, &[&self.namespace, &partition])
            .await
            .map_err(|e| self.err(&e))?;
        Ok(StoredPosition {
            epoch: row.get(0),
            next_offset: row.get::<_, Option<i64>>(1).map(|o| o.max(0) as u64),
        })
    }

    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE {p} SET next_offset = $4 WHERE namespace = $1 AND \"partition\" = $2 AND epoch = $3",
            p = self.positions
        );
        let n = client
            .execute(
                &sql,
                &[
                    &self.namespace,
                    &partition,
                    &epoch,
                    &offset_sql(next_offset),
                ],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(n == 1)
    }

    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT \"partition\", epoch, next_offset FROM {p} WHERE namespace = $1 ORDER BY 1",
            p = self.positions
        );
        let rows = client
            .query(&sql, &[&self.namespace])
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    StoredPosition {
                        epoch: r.get(1),
                        next_offset: r.get::<_, Option<i64>>(2).map(|o| o.max(0) as u64),
                    },
                )
            })
            .collect())
    }
}
