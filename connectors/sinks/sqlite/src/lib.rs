//! SQLite sink: a table in one SQLite database file.
//!
//! Speaks SQLite in-process (the `rusqlite` crate, SQLite compiled in).
//! Guarantee: **exactly-once** in `append` and `upsert` mode. Each batch is
//! one `BEGIN IMMEDIATE` transaction that moves the partition's row in the
//! offsets table (guarded by the runner's epoch, as every table sink does:
//! `idem_core::table::offsets`) and writes the rows: inserted as they come
//! in `append` mode; in `upsert` mode staged, the newest message per key
//! picked, then merged with `INSERT .. ON CONFLICT` under the version guard
//! and deleted for tombstones. A crash before `COMMIT` leaves neither rows
//! nor position; after it, both. Recovery reads the offsets table.

mod config;
mod error;
mod recover;
mod sink;

pub use config::{Mode, SqliteSinkConfig};
pub use error::SqliteError;
pub use sink::SqliteSink;

/// The `sqlite` sink's registry entry.
pub struct SqliteKind;

impl idem_core::registry::SinkKind for SqliteKind {
    const NAME: &'static str = "sqlite";
    type Config = SqliteSinkConfig;

    /// One transaction per batch: larger batches cost less each. `max_bytes` (16 MiB) still bounds a batch.
    fn batch_records(_cfg: &SqliteSinkConfig) -> usize {
        idem_config::TABLE_MAX_RECORDS
    }

    /// SQLite has no exact decimal: a decimal keeps its digits as text.
    fn decimal_column(_cfg: &SqliteSinkConfig) -> idem_config::ColumnType {
        idem_config::ColumnType::Text
    }

    fn build(
        cfg: &SqliteSinkConfig,
        columns: &[idem_config::ColumnConfig],
        _ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn idem_core::Sink>, String> {
        Ok(std::sync::Arc::new(SqliteSink::new(
            cfg.clone(),
            columns.to_vec(),
        )))
    }
}
