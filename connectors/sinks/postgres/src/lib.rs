//! PostgreSQL sink.
//!
//! Speaks the PostgreSQL wire protocol (`tokio-postgres`, a small pool).
//! Guarantee: **exactly-once** in every mode. Each batch is one transaction:
//! the partition's row in the offsets table moves `WHERE epoch = mine` (zero
//! rows: `Fenced`), the rows arrive by binary `COPY` (straight into the table
//! in `append` mode; into a temporary staging table merged with one
//! `INSERT .. ON CONFLICT` in `upsert` mode), then `COMMIT`. A crash or a
//! dropped connection before `COMMIT` leaves neither rows nor position;
//! after it, both. Recovery reads the offsets table, never the source.

mod cell;
mod config;
mod error;
mod recover;
mod sink;

pub use config::{PostgresSinkConfig, SslMode};
pub use error::PgError;
pub use sink::PostgresSink;

/// The `postgres` sink's registry entry.
pub struct PostgresKind;

impl idem_core::registry::SinkKind for PostgresKind {
    const NAME: &'static str = "postgres";
    type Config = PostgresSinkConfig;

    /// One merge (or COPY) per batch: larger batches cost less each. `max_bytes` (16 MiB) still bounds a batch.
    fn batch_records(_cfg: &PostgresSinkConfig) -> usize {
        idem_config::TABLE_MAX_RECORDS
    }

    fn build(
        cfg: &PostgresSinkConfig,
        columns: &[idem_config::ColumnConfig],
        ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn idem_core::Sink>, String> {
        let sink = PostgresSink::new(cfg.clone(), columns.to_vec());
        Ok(std::sync::Arc::new(match ctx.keep_ids {
            Some(retention) => sink.keeping_ids(retention),
            None => sink,
        }))
    }

    fn postgres(cfg: &PostgresSinkConfig) -> Option<idem_core::registry::PostgresTarget> {
        Some(idem_core::registry::PostgresTarget {
            url: cfg.url.clone(),
            schema: cfg.schema.clone(),
        })
    }

    fn table(cfg: &PostgresSinkConfig) -> Option<String> {
        Some(cfg.table.clone())
    }

    fn creates_table(cfg: &PostgresSinkConfig) -> bool {
        cfg.create
    }

    fn with_table(
        cfg: &PostgresSinkConfig,
        table: &str,
        key: Option<&[String]>,
    ) -> PostgresSinkConfig {
        PostgresSinkConfig {
            table: table.to_string(),
            key: key.map_or_else(|| cfg.key.clone(), <[String]>::to_vec),
            ..cfg.clone()
        }
    }
}
