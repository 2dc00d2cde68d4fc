//! S3 sink: records go into JSON lines or Parquet objects named by
//! partition, folder and first offset, kept open across batches until full
//! or until `roll_interval`; a per-partition manifest, replaced only by a
//! conditional write, names the committed objects and the next offset.
//! See docs/sinks/s3.md.

mod config;
mod encode;
mod error;
mod keys;
mod part;
mod recover;
mod sink;
mod stage;
mod store;

pub use config::{Compression, Format, S3SinkConfig, TimePartition};
pub use encode::{OFFSET_COLUMN, PARTITION_COLUMN};
pub use error::S3Error;
pub use keys::{Entry, Manifest, MANIFEST_FORMAT};
pub use sink::S3Sink;

/// The `s3` sink's registry entry.
pub struct S3Kind;

impl idem_core::registry::SinkKind for S3Kind {
    const NAME: &'static str = "s3";
    type Config = S3SinkConfig;

    /// Objects stay open across batches, so the batch sets the commit's
    /// work, not the object's size. `max_bytes` (16 MiB) still bounds a batch.
    fn batch_records(_cfg: &S3SinkConfig) -> usize {
        idem_config::TABLE_MAX_RECORDS
    }

    fn build(
        cfg: &S3SinkConfig,
        columns: &[idem_config::ColumnConfig],
        _ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn idem_core::Sink>, String> {
        Ok(std::sync::Arc::new(S3Sink::new(cfg.clone(), columns)))
    }
}
