//! DuckDB sink: an embedded warehouse in one file, Idem's default sink.
//!
//! Speaks DuckDB's C API in-process (the `duckdb` crate). Guarantee:
//! **exactly-once** in every mode. Each batch is one DuckDB transaction that
//! writes the rows (through the appender into the table in `append` mode;
//! in `upsert` mode by one `MERGE INTO` that reads the batch's Arrow record
//! batch in place) and moves the partition's row in the offsets table,
//! guarded by the runner's epoch. A crash before `COMMIT` leaves neither;
//! after it, both. Recovery reads the offsets table, never the source.

mod config;
mod error;
mod recover;
mod scan;
mod sink;

pub use config::{DuckDbSinkConfig, Mode};
pub use error::DuckDbError;
pub use sink::DuckDbSink;

/// The `duckdb` sink's registry entry.
pub struct DuckDbKind;

impl idem_core::registry::SinkKind for DuckDbKind {
    const NAME: &'static str = "duckdb";
    type Config = DuckDbSinkConfig;

    /// One merge (or append) per batch: larger batches cost less each. `max_bytes` (16 MiB) still bounds a batch.
    fn batch_records(_cfg: &DuckDbSinkConfig) -> usize {
        idem_config::TABLE_MAX_RECORDS
    }

    /// DuckDB has no unbounded DECIMAL: a decimal keeps its digits as text.
    fn decimal_column(_cfg: &DuckDbSinkConfig) -> idem_config::ColumnType {
        idem_config::ColumnType::Text
    }

    fn build(
        cfg: &DuckDbSinkConfig,
        columns: &[idem_config::ColumnConfig],
        ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn idem_core::Sink>, String> {
        let (cfg, columns) = (cfg.clone(), columns.to_vec());
        Ok(std::sync::Arc::new(match ctx.keep_ids {
            Some(retention) => DuckDbSink::keeping_ids(cfg, columns, retention),
            None => DuckDbSink::new(cfg, columns),
        }))
    }

    fn table(cfg: &DuckDbSinkConfig) -> Option<String> {
        Some(cfg.table.clone())
    }

    fn creates_table(cfg: &DuckDbSinkConfig) -> bool {
        cfg.create
    }

    fn with_table(cfg: &DuckDbSinkConfig, table: &str, key: Option<&[String]>) -> DuckDbSinkConfig {
        DuckDbSinkConfig {
            table: table.to_string(),
            key: key.map_or_else(|| cfg.key.clone(), <[String]>::to_vec),
            ..cfg.clone()
        }
    }
}
