//! The connectors this build knows: their config sections and constructors.
//! Adding a source or sink means a variant here and a crate beside the others.

use idem_config::{ColumnConfig, Invalid, Validate};
use idem_core::Rejects;
use idem_core::{Sink, Source};
use idem_dedup_store::DedupStore;
use idem_sink_duckdb::{DuckDbSink, DuckDbSinkConfig};
use idem_sink_http::{HttpSink, HttpSinkConfig};
use idem_sink_postgres::{PostgresSink, PostgresSinkConfig};
use idem_sink_s3::{S3Sink, S3SinkConfig};
use idem_sink_stdout::{StdoutSink, StdoutSinkConfig};
use idem_source_file::{FileSource, FileSourceConfig};
use idem_source_kafka::{KafkaSource, KafkaSourceConfig};
use serde::Deserialize;
use std::sync::Arc;

/// `[connectors.NAME.source]`, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Newline-delimited JSON files.
    File(FileSourceConfig),
    /// Kafka topics through a consumer group.
    Kafka(KafkaSourceConfig),
}

/// `[connectors.NAME.sink]`, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// DuckDB, embedded (exactly-once).
    Duckdb(DuckDbSinkConfig),
    /// Each message sent to an HTTP endpoint with an idempotency key
    /// (exactly-once with a receiver that honours the key).
    Http(HttpSinkConfig),
    /// PostgreSQL (exactly-once).
    Postgres(PostgresSinkConfig),
    /// JSON lines objects in S3 or an S3-compatible store (exactly-once).
    S3(S3SinkConfig),
    /// JSON lines on standard output (at-least-once; previews).
    Stdout(StdoutSinkConfig),
}

pub type Config = idem_config::Config<SourceConfig, SinkConfig>;
pub type ConnectorConfig = idem_config::ConnectorConfig<SourceConfig, SinkConfig>;

impl Validate for SourceConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        match self {
            SourceConfig::File(c) => c.validate(columns),
            SourceConfig::Kafka(c) => c.validate(columns),
        }
    }
}

impl Validate for SinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        match self {
            SinkConfig::Duckdb(c) => c.validate(columns),
            SinkConfig::Http(c) => c.validate(columns),
            SinkConfig::Postgres(c) => c.validate(columns),
            SinkConfig::S3(c) => c.validate(columns),
            SinkConfig::Stdout(c) => c.validate(columns),
        }
    }
}

impl SourceConfig {
    pub fn build(&self) -> Arc<dyn Source> {
        match self {
            SourceConfig::File(c) => Arc::new(FileSource::new(c.clone())),
            SourceConfig::Kafka(c) => Arc::new(KafkaSource::new(c.clone())),
        }
    }

    /// Whether the source ends by itself (batch mode).
    pub fn is_bounded(&self) -> bool {
        match self {
            SourceConfig::File(c) => !c.follow,
            SourceConfig::Kafka(_) => false,
        }
    }
}

/// What a sink may need from the runner beside its config.
pub struct SinkContext {
    /// The connector's dedup store (present when [`SinkConfig::needs_store`]).
    pub store: Option<Arc<dyn DedupStore>>,
    /// The connector's dead letters.
    pub rejects: Arc<dyn Rejects>,
}

impl SinkConfig {
    /// Whether the sink keeps its positions in the dedup store (which is
    /// then always on, embedded unless configured).
    pub fn needs_store(&self) -> bool {
        matches!(self, SinkConfig::Http(_))
    }

    pub fn build(&self, columns: &[ColumnConfig], ctx: SinkContext) -> Arc<dyn Sink> {
        match self {
            SinkConfig::Duckdb(c) => Arc::new(DuckDbSink::new(c.clone(), columns.to_vec())),
            SinkConfig::Http(c) => match ctx.store {
                Some(store) => Arc::new(HttpSink::new(c.clone(), columns, store, ctx.rejects)),
                // Connector::build always gives it one.
                None => unreachable!("the http sink is built with a dedup store"),
            },
            SinkConfig::Postgres(c) => Arc::new(PostgresSink::new(c.clone(), columns.to_vec())),
            SinkConfig::S3(c) => Arc::new(S3Sink::new(c.clone(), columns)),
            SinkConfig::Stdout(c) => Arc::new(StdoutSink::new(c.clone(), columns)),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Duckdb(_) => "duckdb",
            SinkConfig::Http(_) => "http",
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::S3(_) => "s3",
            SinkConfig::Stdout(_) => "stdout",
        }
    }
}

/// Parse and validate a config file.
pub fn load(path: &std::path::Path) -> Result<Config, idem_config::ConfigError> {
    idem_config::load(path)
}
