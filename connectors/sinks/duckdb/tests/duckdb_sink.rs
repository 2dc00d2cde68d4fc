//! DuckDB sink against a real DuckDB file: the table-sink conformance suite
//! (`idem_testkit::table_suite`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use idem_config::{ColumnConfig, WriteMode};
use idem_core::Sink;
use idem_sink_duckdb::{DuckDbSink, DuckDbSinkConfig, Mode};
use idem_testkit::table_suite::{TableTarget, TypesRow};
use idem_testkit::*;
use std::sync::Arc;

fn sink_cfg(w: &Workdir, mode: WriteMode, key: &[&str]) -> DuckDbSinkConfig {
    DuckDbSinkConfig {
        path: w.path("t.duckdb").display().to_string(),
        table: "t".into(),
        mode,
        key: key.iter().map(|s| s.to_string()).collect(),
        version: None,
        delete_on_tombstone: mode == Mode::Upsert,
        create: true,
        offsets_table: "idem_offsets".into(),
        threads: Some(1),
        memory_limit: "1GB".into(),
        checkpoint_threshold: "256MB".into(),
    }
}

struct DuckDbTarget {
    w: Workdir,
}

#[async_trait]
impl TableTarget for DuckDbTarget {
    fn new(_name: &str) -> Self {
        DuckDbTarget { w: Workdir::new() }
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
        let mut cfg = sink_cfg(&self.w, mode, key);
        cfg.table = table.into();
        cfg.version = version.map(str::to_string);
        cfg.create = create;
        Arc::new(DuckDbSink::new(cfg, columns))
    }

    fn sink_keeping_ids(
        &self,
        table: &str,
        mode: WriteMode,
        key: &[&str],
        create: bool,
        retention: std::time::Duration,
    ) -> Arc<dyn Sink> {
        let mut cfg = sink_cfg(&self.w, mode, key);
        cfg.table = table.into();
        cfg.create = create;
        Arc::new(DuckDbSink::keeping_ids(cfg, columns(), retention))
    }

    fn second_runner(&self, first: &Arc<dyn Sink>, _table: &str) -> Arc<dyn Sink> {
        first.clone()
    }

    async fn execute(&self, sql: &str) {
        duckdb::Connection::open(self.w.path("t.duckdb"))
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    async fn rows(&self, table: &str) -> Vec<(String, i64)> {
        let db = duck(&self.w.path("t.duckdb"));
        let mut stmt = db
            .prepare(&format!("SELECT id, v FROM \"{table}\" ORDER BY id, v"))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    async fn text_column(&self, table: &str, column: &str) -> Vec<(String, Option<String>)> {
        let db = duck(&self.w.path("t.duckdb"));
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
        ("VARCHAR", "BIGINT")
    }

    fn table(&self, name: &str) -> String {
        format!("\"{name}\"")
    }

    fn upsert_needs_primary_key(&self) -> bool {
        false
    }

    async fn types_row(&self) -> TypesRow {
        duck(&self.w.path("t.duckdb"))
            .query_row(
                "SELECT t, b, i, d, ok, epoch_us(\"at\"), day::VARCHAR, doc->>'$.t', u::VARCHAR, raw FROM types",
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

idem_testkit::table_suite!(DuckDbTarget);
idem_testkit::table_suite!(kept_ids DuckDbTarget);
