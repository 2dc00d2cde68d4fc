//! The connectors this build knows, one line each. A line names the
//! `type` users write, the enum variant, and the crate's registry entry
//! (`idem_core::registry::{SinkKind, SourceKind}`); everything else (config
//! sections, validation, construction) is dispatched from that line. Each
//! kind sits behind a cargo feature of its own name, so a slim build is
//! `cargo build --no-default-features --features postgres,kafka`.

use idem_config::{ColumnConfig, Invalid, Validate};
use idem_core::registry::{KafkaTarget, PostgresTarget, SinkContext, SinkKind, SourceKind};
use idem_core::{Sink, Source};
use serde::Deserialize;
use std::sync::Arc;

/// Writes the config enums and their dispatch from the lists above. A
/// line's variant is compiled only with the feature named by its `type`.
macro_rules! registry {
    (
        sources { $($src:ident = $src_name:literal => $src_kind:path,)* }
        sinks { $($sink:ident = $sink_name:literal => $sink_kind:path,)* }
    ) => {
        /// `[connectors.NAME.source]`, chosen by `type`.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "type")]
        pub enum SourceConfig {
            $(
                #[cfg(feature = $src_name)]
                #[serde(rename = $src_name)]
                $src(<$src_kind as SourceKind>::Config),
            )*
        }

        /// `[connectors.NAME.sink]`, chosen by `type`.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "type")]
        pub enum SinkConfig {
            $(
                #[cfg(feature = $sink_name)]
                #[serde(rename = $sink_name)]
                $sink(<$sink_kind as SinkKind>::Config),
            )*
        }

        impl Validate for SourceConfig {
            fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(c) => c.validate(columns),)*
                }
            }
        }

        impl SourceConfig {
            pub fn build(&self) -> Arc<dyn Source> {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(c) => <$src_kind>::build(c),)*
                }
            }

            /// Whether the source ends by itself (batch mode).
            pub fn is_bounded(&self) -> bool {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(c) => <$src_kind>::is_bounded(c),)*
                }
            }

            /// Checks against this machine before the start; the key is
            /// relative to the source section.
            pub fn preflight(&self) -> Result<(), Invalid> {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(c) => <$src_kind>::preflight(c),)*
                }
            }

            /// The Kafka brokers it reads, if any.
            pub fn kafka(&self) -> Option<KafkaTarget> {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(c) => <$src_kind>::kafka(c),)*
                }
            }

            pub fn kind(&self) -> &'static str {
                match self {
                    $(#[cfg(feature = $src_name)] SourceConfig::$src(_) => <$src_kind as SourceKind>::NAME,)*
                }
            }
        }

        impl Validate for SinkConfig {
            fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => c.validate(columns),)*
                }
            }
        }

        impl SinkConfig {
            pub fn build(
                &self,
                columns: &[ColumnConfig],
                ctx: SinkContext,
            ) -> Result<Arc<dyn Sink>, String> {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::build(c, columns, ctx),)*
                }
            }

            /// Whether the sink keeps its positions in the dedup store
            /// (which is then always on, embedded unless configured).
            pub fn needs_store(&self) -> bool {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::needs_store(c),)*
                }
            }

            /// The PostgreSQL database the sink writes into, if any.
            pub fn postgres(&self) -> Option<PostgresTarget> {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::postgres(c),)*
                }
            }

            pub fn kind(&self) -> &'static str {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(_) => <$sink_kind as SinkKind>::NAME,)*
                }
            }

            /// The table it writes, possibly a template (see [`SinkKind::table`]).
            pub fn table(&self) -> Option<String> {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::table(c),)*
                }
            }

            /// Whether it creates its table when missing (see [`SinkKind::creates_table`]).
            pub fn creates_table(&self) -> bool {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::creates_table(c),)*
                }
            }

            /// The same section writing into `table` instead, keyed on
            /// `key` when given (see [`SinkKind::with_table`]).
            pub fn with_table(&self, table: &str, key: Option<&[String]>) -> SinkConfig {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => SinkConfig::$sink(<$sink_kind>::with_table(c, table, key)),)*
                }
            }
        }

        #[cfg(test)]
        mod registry_lines {
            use super::*;

            /// A line's `type` is the name its kind gives itself, so the
            /// feature, the config and the crate agree.
            #[test]
            fn each_line_spells_its_kind_as_the_kind_does() {
                $(#[cfg(feature = $src_name)] assert_eq!($src_name, <$src_kind as SourceKind>::NAME);)*
                $(#[cfg(feature = $sink_name)] assert_eq!($sink_name, <$sink_kind as SinkKind>::NAME);)*
            }
        }
    };
}

registry! {
    sources {
        File = "file" => idem_source_file::FileKind,
        Kafka = "kafka" => idem_source_kafka::KafkaKind,
    }
    sinks {
        Duckdb = "duckdb" => idem_sink_duckdb::DuckDbKind,
        Http = "http" => idem_sink_http::HttpKind,
        Postgres = "postgres" => idem_sink_postgres::PostgresKind,
        S3 = "s3" => idem_sink_s3::S3Kind,
        Sqlite = "sqlite" => idem_sink_sqlite::SqliteKind,
        Stdout = "stdout" => idem_sink_stdout::StdoutKind,
    }
}

pub type Config = idem_config::Config<SourceConfig, SinkConfig>;
pub type ConnectorConfig = idem_config::ConnectorConfig<SourceConfig, SinkConfig>;

/// Parse and validate a config file.
pub fn load(path: &std::path::Path) -> Result<Config, idem_config::ConfigError> {
    idem_config::load(path)
}
