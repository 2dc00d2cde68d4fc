//! S3 sink: each batch becomes one or more JSON lines or Parquet objects
//! named by partition and first offset; a per-partition manifest, replaced only by a
//! conditional write, names the committed objects and the next offset.
//! See docs/sinks/s3.md.

mod config;
mod encode;
mod error;
mod keys;
mod sink;

pub use config::{Compression, Format, S3SinkConfig, TimePartition};
pub use encode::{OFFSET_COLUMN, PARTITION_COLUMN};
pub use error::S3Error;
pub use keys::{Entry, Manifest, MANIFEST_FORMAT};
pub use sink::S3Sink;
