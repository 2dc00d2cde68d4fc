//! Idem's Apache Iceberg sink: appends into an Iceberg v2 table through a
//! SQL catalog in PostgreSQL, the data files and the partition's position
//! committed together (see docs/sinks/iceberg.md).

mod catalog;
pub mod config;
mod error;
pub mod schema;
mod sink;

pub use config::IcebergSinkConfig;
pub use error::IcebergError;
pub use sink::IcebergSink;
