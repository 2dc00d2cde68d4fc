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

            /// Messages per batch when the connector does not say.
            pub fn batch_records(&self) -> usize {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::batch_records(c),)*
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

            /// The column type of a schema's decimal (see [`SinkKind::decimal_column`]).
            pub fn decimal_column(&self) -> idem_config::ColumnType {
                match self {
                    $(#[cfg(feature = $sink_name)] SinkConfig::$sink(c) => <$sink_kind>::decimal_column(c),)*
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
        Iceberg = "iceberg" => idem_sink_iceberg::IcebergKind,
        Postgres = "postgres" => idem_sink_postgres::PostgresKind,
        S3 = "s3" => idem_sink_s3::S3Kind,
        Sqlite = "sqlite" => idem_sink_sqlite::SqliteKind,
        Stdout = "stdout" => idem_sink_stdout::StdoutKind,
    }
}

pub type Config = idem_config::Config<SourceConfig, SinkConfig>;
pub type ConnectorConfig = idem_config::ConnectorConfig<SourceConfig, SinkConfig>;

/// Parse and validate a config file, with the columns of each connector
/// that takes them from its schema (`columns_from = "schema"`: an Avro
/// schema or a `.proto`) added from the schema file.
pub fn load(path: &std::path::Path) -> Result<Config, idem_config::ConfigError> {
    with_schema_columns(path, idem_config::load(path)?)
}

/// Add the columns of each connector that takes them from its schema
/// to a parsed `config` (read from `path`), then check them.
pub fn with_schema_columns(
    path: &std::path::Path,
    mut config: Config,
) -> Result<Config, idem_config::ConfigError> {
    let mut added = false;
    for (name, c) in &mut config.connectors {
        if c.columns_from() != idem_config::ColumnsFrom::Schema {
            continue;
        }
        let at = |message: String| {
            idem_config::invalid_at(
                path,
                idem_config::Invalid::new(&["connectors", name, "schema_file"], message),
            )
        };
        let file = c.schema_file.as_deref().unwrap_or_default();
        let decimal = c.sink.decimal_column();
        let fields = if c.format == idem_config::Format::Protobuf {
            let message = c.message.as_deref().unwrap_or_default();
            idem_core::mapping::protobuf::ProtoSchema::compile(std::path::Path::new(file), message)
                .map_err(|e| at(format!("`{file}` {e}")))?
                .columns(decimal)
        } else {
            let text = std::fs::read_to_string(file).map_err(|e| at(format!("`{file}`: {e}")))?;
            idem_core::mapping::avro::AvroSchema::parse(&text)
                .map_err(|e| at(format!("`{file}` is not an Avro schema: {e}")))?
                .columns(decimal)
                .map_err(|e| at(format!("`{file}`: {e}")))?
        };
        add_schema_columns(&mut c.columns, fields).map_err(|e| at(format!("`{file}`: {e}")))?;
        added = true;
    }
    if added {
        config
            .validate()
            .map_err(|invalid| idem_config::invalid_at(path, invalid))?;
    }
    Ok(config)
}

/// Add a column for each of a schema's `fields` that no listed column
/// writes: none of them has its name, or reads it (`pointer = "/FIELD"`)
/// under another name. Listed columns keep their place, first.
fn add_schema_columns(
    columns: &mut Vec<idem_config::ColumnConfig>,
    fields: Vec<(String, idem_config::ColumnType)>,
) -> Result<(), String> {
    for (field, ty) in fields {
        let pointer = format!("/{field}");
        if columns
            .iter()
            .any(|c| c.name == field || c.pointer() == pointer)
        {
            continue;
        }
        if field.starts_with("_idem_") {
            return Err(format!("field `{field}` cannot be a column (`_idem_` starts Idem's own columns): list a column that reads it under another name (name = \"...\", pointer = \"{pointer}\")"));
        }
        idem_config::check_column_name(&field).map_err(|e| format!("field `{field}`: {e}"))?;
        columns.push(idem_config::ColumnConfig {
            name: field,
            pointer: None,
            ty,
            required: false,
        });
    }
    Ok(())
}

#[cfg(test)]
mod schema_columns {
    use super::*;
    use idem_config::ColumnType;

    const AVSC: &str = r#"{"type": "record", "name": "Order", "fields": [
        {"name": "id", "type": "long"},
        {"name": "num", "type": "string"},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "city", "type": ["null", "string"]}]}"#;

    /// A config of one Avro connector into `sink`, with `extra` lines, and
    /// its schema file, in a directory of its own.
    fn config(sink: &str, extra: &str, avsc: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("order.avsc");
        std::fs::write(&schema, avsc).unwrap();
        let path = dir.path().join("idem.toml");
        std::fs::write(
            &path,
            format!(
                "[connectors.orders]\nformat = \"avro\"\nschema_file = \"{}\"\n[connectors.orders.source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"orders\"]\ngroup_id = \"g\"\n[connectors.orders.sink]\n{sink}\n{extra}",
                schema.display()
            ),
        )
        .unwrap();
        (dir, path)
    }

    fn columns(c: &Config) -> Vec<(String, String, ColumnType)> {
        c.connectors["orders"]
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.pointer(), c.ty))
            .collect()
    }

    #[test]
    fn the_schemas_fields_follow_the_listed_columns() {
        let pg = "type = \"postgres\"\nurl = \"postgres://u@h/db\"\ntable = \"orders\"\nmode = \"upsert\"\nkey = [\"id\"]";
        // None listed: every field, the decimal as the sink holds it.
        let (_d, path) = config(pg, "", AVSC);
        let c = load(&path).unwrap();
        let s = |n: &str, p: &str, t| (n.to_string(), p.to_string(), t);
        use ColumnType::*;
        assert_eq!(
            columns(&c),
            [
                s("id", "/id", Bigint),
                s("num", "/num", Text),
                s("price", "/price", Numeric),
                s("city", "/city", Text)
            ]
        );
        let (_d, path) = config(
            &pg.replace("postgres", "duckdb")
                .replace("url = \"duckdb://u@h/db\"", "path = \"x.duckdb\""),
            "",
            AVSC,
        );
        assert_eq!(
            columns(&load(&path).unwrap())[2],
            s("price", "/price", Text)
        );
        // A listed column overrides the field of its name, or the one it
        // reads under another name; the others follow.
        let listed = "[[connectors.orders.columns]]\nname = \"price\"\ntype = \"text\"\n[[connectors.orders.columns]]\nname = \"number\"\npointer = \"/num\"\ntype = \"text\"";
        let (_d, path) = config(pg, listed, AVSC);
        assert_eq!(
            columns(&load(&path).unwrap()),
            [
                s("price", "/price", Text),
                s("number", "/num", Text),
                s("id", "/id", Bigint),
                s("city", "/city", Text)
            ]
        );
        // `config`: the listed ones only.
        let (_d, path) = config(pg, &format!("{listed}\n"), AVSC);
        std::fs::write(
            &path,
            std::fs::read_to_string(&path)
                .unwrap()
                .replace(
                    "format = \"avro\"",
                    "format = \"avro\"\ncolumns_from = \"config\"",
                )
                .replace("key = [\"id\"]", "key = [\"number\"]"),
        )
        .unwrap();
        assert_eq!(columns(&load(&path).unwrap()).len(), 2);
    }

    #[test]
    fn a_key_the_schema_lacks_or_a_missing_file_is_named() {
        let pg = "type = \"postgres\"\nurl = \"postgres://u@h/db\"\ntable = \"orders\"\nmode = \"upsert\"\nkey = [\"order_id\"]";
        let (_d, path) = config(pg, "", AVSC);
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("connectors.orders.sink.key") && e.contains("order_id"),
            "{e}"
        );
        let (d, path) = config(pg, "", AVSC);
        std::fs::remove_file(d.path().join("order.avsc")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("connectors.orders.schema_file") && e.contains("order.avsc"),
            "{e}"
        );
        let (_d, path) = config(pg, "", r#""long""#);
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("not records"), "{e}");
    }
}
