//! Idem's Apache Iceberg sink: appends into an Iceberg v2 table through a
//! SQL catalog in PostgreSQL, a REST catalog or AWS Glue, the data files
//! and the partition's position committed together (see
//! docs/sinks/iceberg.md).

mod any;
mod catalog;
pub mod config;
mod error;
mod glue;
mod leftovers;
pub mod partition;
mod remote;
pub mod schema;
mod sink;

pub use config::IcebergSinkConfig;
pub use error::IcebergError;
pub use sink::IcebergSink;

/// The `iceberg` line of the runner's registry.
pub struct IcebergKind;

impl idem_core::registry::SinkKind for IcebergKind {
    const NAME: &'static str = "iceberg";
    type Config = IcebergSinkConfig;

    /// Each batch writes data files of its own: large batches make them
    /// few and large (snapshots follow `commit_interval`).
    fn batch_records(_cfg: &IcebergSinkConfig) -> usize {
        idem_config::TABLE_MAX_RECORDS
    }

    fn build(
        cfg: &IcebergSinkConfig,
        columns: &[idem_config::ColumnConfig],
        _ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn idem_core::Sink>, String> {
        IcebergSink::new(cfg.clone(), columns.to_vec())
            .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn idem_core::Sink>)
            .map_err(|e| e.to_string())
    }
}
