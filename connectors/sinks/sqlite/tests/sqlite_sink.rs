//! SQLite sink against a real SQLite file: the table-sink conformance suite
//! (`idem_testkit::table_suite`), read back through a connection of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use idem_config::{ColumnConfig, WriteMode};
use idem_core::Sink;
use idem_sink_sqlite::{SqliteSink, SqliteSinkConfig};
use idem_testkit::table_suite::{TableTarget, TypesRow};
use idem_testkit::*;
use std::sync::Arc;
use std::time::Duration;

struct SqliteTarget {
    w: Workdir,
}

impl SqliteTarget {
    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.w.path("t.sqlite")).unwrap()
    }
}

#[async_trait]
impl TableTarget for SqliteTarget {
    fn new(_name: &str) -> Self {
        SqliteTarget { w: Workdir::new() }
    }

    fn sink(
        &self,
        table: &str,
        mode: WriteMode,
        key: &[&str],
        version: Option<&str>,
        create: bool,
        columns: Vec<ColumnConfig>,
    ) -> Arc<dyn Sink> {
        let cfg = SqliteSinkConfig {
            path: self.w.path("t.sqlite").display().to_string(),
            table: table.into(),
            mode,
            key: key.iter().map(|s| s.to_string()).collect(),
            version: version.map(str::to_string),
            delete_on_tombstone: mode == WriteMode::Upsert,
            create,
            busy_timeout: Duration::from_secs(5),
            offsets_table: "idem_offsets".into(),
        };
        Arc::new(SqliteSink::new(cfg, columns))
    }

    /// SQLite lets a second process open the file: a runner of its own.
    fn second_runner(&self, _first: &Arc<dyn Sink>, table: &str) -> Arc<dyn Sink> {
        let sink = self.sink(table, WriteMode::Append, &[], None, true, columns());
        let prepared = sink.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(prepared.prepare())
        })
        .join()
        .unwrap()
        .unwrap();
        sink
    }

    async fn execute(&self, sql: &str) {
        self.db().execute_batch(sql).unwrap();
    }

    async fn rows(&self, table: &str) -> Vec<(String, i64)> {
        let db = self.db();
        let mut stmt = db
            .prepare(&format!("SELECT id, v FROM \"{table}\" ORDER BY id, v"))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    async fn text_column(&self, table: &str, column: &str) -> Vec<(String, Option<String>)> {
        let db = self.db();
        let mut stmt = db
            .prepare(&format!(
                "SELECT id, \"{column}\" FROM \"{table}\" ORDER BY id"
            ))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn type_names(&self) -> (&'static str, &'static str) {
        ("TEXT", "BIGINT")
    }

    fn table(&self, name: &str) -> String {
        format!("\"{name}\"")
    }

    async fn types_row(&self) -> TypesRow {
        // SQLite's own date functions read the stored text: seconds, then
        // the six digits of microseconds after the point.
        self.db()
            .query_row(
                "SELECT t, b, i, d, ok,
                        unixepoch(\"at\") * 1000000 + CAST(substr(\"at\", 21, 6) AS INTEGER),
                        date(day), doc ->> '$.t', u, raw FROM types",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                },
            )
            .unwrap()
    }
}

idem_testkit::table_suite!(SqliteTarget);
