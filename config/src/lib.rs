//! Idem's configuration: one TOML file, any number of connectors.
//!
//! Parsing is pure (no network, no files but the config itself): every
//! mistake is reported with the file, the line and the key before anything
//! starts. Strings may use `${ENV_VAR}`; secrets use [`Secret`], which
//! redacts itself in `Debug` and logs.

mod error;
pub use error::Invalid;
pub mod interp;
pub mod redact;
mod schema;
mod table;

pub use error::ConfigError;
pub use interp::{interpolate, Secret};
pub use schema::*;
pub use table::{
    check_column_name, check_ident, check_postgres_name, check_table_template, is_table_template,
    resolve_table, validate_rows, validate_write, WriteMode, POSTGRES_MAX_NAME,
};

use serde::de::DeserializeOwned;
use std::path::Path;

/// Read, parse and validate a config file. A connector whose columns come
/// from an Avro schema (`columns_from = "schema"`) is checked against its
/// columns once they are added: call [`Config::validate`] then.
pub fn load<S, K>(path: &Path) -> Result<Config<S, K>, ConfigError>
where
    S: DeserializeOwned + Validate,
    K: DeserializeOwned + Validate,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parse and validate config text; `path` only names the file in errors.
pub fn parse<S, K>(path: &Path, text: &str) -> Result<Config<S, K>, ConfigError>
where
    S: DeserializeOwned + Validate,
    K: DeserializeOwned + Validate,
{
    let mut root =
        toml::de::DeTable::parse(text).map_err(|e| error::from_toml(path, text, &e, Vec::new()))?;
    interp::expand_document(root.get_mut(), &|name| std::env::var(name).ok())
        .map_err(|u| error::at_span(path, text, u.span, u.key, u.message))?;
    let de = toml::de::Deserializer::from(root);
    let config: Config<S, K> = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        error::from_toml(path, text, e.inner(), key)
    })?;
    if let Err(invalid) = config.validate_parsed() {
        return Err(error::from_invalid(path, text, invalid));
    }
    Ok(config)
}

/// Locate a mistake found after parsing (by a check that looks at this
/// machine: a missing input file, say): `invalid.key` is from the root,
/// e.g. `["connectors", "orders", "source", "path"]`.
pub fn invalid_at(path: &Path, invalid: Invalid) -> ConfigError {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    error::from_invalid(path, &text, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Src {
        path: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
    enum Snk {
        Mem { table: String },
    }

    impl Validate for Src {
        fn validate(&self, _: &[ColumnConfig]) -> Result<(), Invalid> {
            Ok(())
        }
    }

    impl Validate for Snk {
        fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
            let Snk::Mem { table } = self;
            if columns.iter().any(|c| &c.name == table) {
                return Err(Invalid::new(&["table"], "clashes with a column"));
            }
            Ok(())
        }
    }

    const GOOD: &str = r#"
[connectors.a.source]
path = "in.jsonl"

[connectors.a.sink]
type = "mem"
table = "t"

[[connectors.a.columns]]
name = "id"
type = "text"
"#;

    fn err(text: &str) -> String {
        parse::<Src, Snk>(Path::new("f.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_fill_what_is_not_said() {
        let c = parse::<Src, Snk>(Path::new("f.toml"), GOOD).unwrap();
        let a = &c.connectors["a"];
        assert_eq!(a.guarantee, Guarantee::ExactlyOnce);
        assert_eq!(a.errors, ErrorPolicy::DeadLetter);
        // Left to the sink (the runner fills it in), 10,000 failing that.
        assert_eq!(a.batch.max_records, None);
        assert_eq!(a.batch.records(), 10_000);
        assert_eq!(a.columns[0].pointer(), "/id");
        assert_eq!(a.source.path, "in.jsonl");
        assert_eq!(
            c.runner.progress_interval,
            std::time::Duration::from_secs(5)
        );
    }

    #[test]
    fn errors_carry_file_line_and_key() {
        let e = err(&GOOD.replace("path =", "paht ="));
        assert!(
            e.starts_with("f.toml:3: key `connectors.a.source.paht`: unknown field"),
            "{e}"
        );
        let e = err(&GOOD.replace("table = \"t\"", "table = \"t\"\nextra = 1"));
        assert!(
            e.starts_with("f.toml:8:") && e.contains("unknown field `extra`"),
            "{e}"
        );
        let e = err(&GOOD.replace("table = \"t\"", "table = \"id\""));
        assert_eq!(
            e,
            "f.toml:7: key `connectors.a.sink.table`: clashes with a column"
        );
        let e = err(&GOOD.replace("in.jsonl", "${IDEM_CONFIG_TEST_UNSET}"));
        assert!(
            e.starts_with("f.toml:3:") && e.contains("IDEM_CONFIG_TEST_UNSET is not set"),
            "{e}"
        );
        let e = err(&format!("[runner]\nprogress_interval = \"0s\"\n{GOOD}"));
        assert!(
            e.starts_with("f.toml:2: key `runner.progress_interval`"),
            "{e}"
        );
        let e = err(&GOOD.replace("name = \"id\"", "name = \"_idem_x\""));
        assert!(
            e.contains("connectors.a.columns.0.name") && e.contains("reserved"),
            "{e}"
        );
        let e = err("[connectors]\n");
        assert!(e.contains("no connector is defined"), "{e}");
    }

    #[test]
    fn every_string_value_expands_variables_once() {
        // A variable every process has (tests may not set one).
        let path = std::env::var("PATH").unwrap();
        // A sink's own field (inside a `type`-tagged section), a column's
        // field, and an escape that must not be expanded a second time.
        let text = GOOD
            .replace("table = \"t\"", "table = \"${PATH}_$${x}\"")
            .replace("name = \"id\"", "name = \"${IDEM_CONFIG_TEST_NOPE:-id}\"");
        let c = parse::<Src, Snk>(Path::new("f.toml"), &text).unwrap();
        let Snk::Mem { table } = &c.connectors["a"].sink;
        assert_eq!(table, &format!("{path}_${{x}}"));
        assert_eq!(c.connectors["a"].columns[0].name, "id");
        // An unset variable in a sink's field: its line and key.
        let e = err(&GOOD.replace("table = \"t\"", "table = \"${IDEM_CONFIG_TEST_UNSET}\""));
        assert!(
            e.starts_with("f.toml:7: key `connectors.a.sink.table`:")
                && e.contains("IDEM_CONFIG_TEST_UNSET is not set"),
            "{e}"
        );
    }

    #[test]
    fn change_event_pointers_need_the_debezium_envelope() {
        let lsn = GOOD.replace(
            "type = \"text\"",
            "type = \"bigint\"\npointer = \"@source/lsn\"",
        );
        let e = err(&lsn);
        assert!(
            e.contains("connectors.a.columns.0.pointer") && e.contains("envelope = \"debezium\""),
            "{e}"
        );
        let with_envelope = lsn.replace(
            "[connectors.a.source]",
            "[connectors.a]\nenvelope = \"debezium\"\n[connectors.a.source]",
        );
        parse::<Src, Snk>(Path::new("f.toml"), &with_envelope).unwrap();
        let op = with_envelope.replace("@source/lsn", "@op");
        parse::<Src, Snk>(Path::new("f.toml"), &op).unwrap();
        let e = err(&with_envelope.replace("@source/lsn", "@sourcelsn"));
        assert!(e.contains("is neither a JSON pointer"), "{e}");
        // Columns learnt from the schema need the envelope too.
        let evolve = GOOD.replace(
            "[connectors.a.source]",
            "[connectors.a]\nevolve = \"add_columns\"\n[connectors.a.source]",
        );
        let e = err(&evolve);
        assert!(
            e.contains("connectors.a.evolve") && e.contains("envelope = \"debezium\""),
            "{e}"
        );
        parse::<Src, Snk>(
            Path::new("f.toml"),
            &evolve.replace("evolve =", "envelope = \"debezium\"\nevolve ="),
        )
        .unwrap();
        // So do columns taken from the target table.
        let from_table = evolve.replace("evolve = \"add_columns\"", "columns_from = \"table\"");
        let e = err(&from_table);
        assert!(
            e.contains("connectors.a.columns_from") && e.contains("envelope = \"debezium\""),
            "{e}"
        );
        let e = err(&from_table.replace("\"table\"", "\"tabel\""));
        assert!(e.contains("columns_from"), "{e}");
        // Avro needs its schema, and the schema needs Avro.
        let avro = GOOD.replace(
            "[connectors.a.source]",
            "[connectors.a]\nformat = \"avro\"\n[connectors.a.source]",
        );
        let e = err(&avro);
        assert!(e.contains("connectors.a.schema_file"), "{e}");
        parse::<Src, Snk>(
            Path::new("f.toml"),
            &avro.replace("format =", "schema_file = \"v.avsc\"\nformat ="),
        )
        .unwrap();
        let e = err(&GOOD.replace(
            "[connectors.a.source]",
            "[connectors.a]\nschema_file = \"v.avsc\"\n[connectors.a.source]",
        ));
        assert!(
            e.contains("connectors.a.schema_file") && e.contains("JSON"),
            "{e}"
        );
        // Avro takes its columns from the schema unless told otherwise;
        // JSON cannot.
        let avro = avro.replace("format =", "schema_file = \"v.avsc\"\nformat =");
        let c = parse::<Src, Snk>(Path::new("f.toml"), &avro).unwrap();
        assert_eq!(c.connectors["a"].columns_from(), crate::ColumnsFrom::Schema);
        let listed = avro.replace("format =", "columns_from = \"config\"\nformat =");
        let c = parse::<Src, Snk>(Path::new("f.toml"), &listed).unwrap();
        assert_eq!(c.connectors["a"].columns_from(), crate::ColumnsFrom::Config);
        let e = err(&from_table.replace("\"table\"", "\"schema\""));
        assert!(
            e.contains("connectors.a.columns_from") && e.contains("format = \"avro\""),
            "{e}"
        );
        // A registry: Avro without a schema file, columns as listed.
        let registry = GOOD.replace(
            "[connectors.a.source]",
            "[connectors.a]\nformat = \"avro\"\n[connectors.a.registry]\nurl = \"http://r:8081\"\n[connectors.a.source]",
        );
        let c = parse::<Src, Snk>(Path::new("f.toml"), &registry).unwrap();
        assert_eq!(c.connectors["a"].columns_from(), crate::ColumnsFrom::Config);
        for (change, key, says) in [
            ("url = \"r:8081\"", "registry.url", "not an http"),
            (
                "url = \"http://r\"\nusername = \"u\"",
                "registry.password",
                "both username and password",
            ),
            (
                "url = \"http://r\"\nusername = \"u\"\npassword = \"p\"\ntoken = \"t\"",
                "registry.token",
                "keep one",
            ),
        ] {
            let e = err(&registry.replace("url = \"http://r:8081\"", change));
            assert!(
                e.contains(&format!("connectors.a.{key}")) && e.contains(says),
                "{e}"
            );
        }
        // Protobuf through it: no .proto or message needed.
        parse::<Src, Snk>(
            Path::new("f.toml"),
            &registry.replace("\"avro\"", "\"protobuf\""),
        )
        .unwrap();
        let e = err(&registry.replace("format = \"avro\"\n", ""));
        assert!(
            e.contains("connectors.a.registry") && e.contains("format = \"avro\""),
            "{e}"
        );
        // Protobuf: the .proto and the message type, which only it takes.
        let proto = GOOD.replace(
            "[connectors.a.source]",
            "[connectors.a]\nformat = \"protobuf\"\nschema_file = \"o.proto\"\nmessage = \"shop.Order\"\n[connectors.a.source]",
        );
        let c = parse::<Src, Snk>(Path::new("f.toml"), &proto).unwrap();
        assert_eq!(c.connectors["a"].columns_from(), crate::ColumnsFrom::Schema);
        let e = err(&proto.replace("message = \"shop.Order\"\n", ""));
        assert!(e.contains("connectors.a.message"), "{e}");
        let e = err(&proto.replace("schema_file = \"o.proto\"\n", ""));
        assert!(
            e.contains("connectors.a.schema_file") && e.contains(".proto"),
            "{e}"
        );
        let e = err(&proto.replace("\"protobuf\"", "\"avro\""));
        assert!(e.contains("connectors.a.message"), "{e}");
        // The sink's checks of the columns wait for the schema's columns
        // (here, a table named as a column would clash), then run.
        let clash = avro.replace("table = \"t\"", "table = \"id\"");
        let c = parse::<Src, Snk>(Path::new("f.toml"), &clash).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, ["connectors", "a", "sink", "table"]);
        assert!(err(&clash.replace(
            "format = \"avro\"",
            "columns_from = \"config\"\nformat = \"avro\""
        ))
        .contains("clashes"));
    }

    #[test]
    fn pointers_read_one_way() {
        use crate::Pointer;
        assert_eq!(Pointer::of(""), Pointer::Field(""));
        assert_eq!(Pointer::of("/a/b"), Pointer::Field("/a/b"));
        assert_eq!(Pointer::of("@key"), Pointer::Key);
        assert_eq!(Pointer::of("@timestamp"), Pointer::Timestamp);
        assert_eq!(Pointer::of("@header/x-id"), Pointer::Header("x-id"));
        assert_eq!(Pointer::of("@header/"), Pointer::Invalid);
        assert_eq!(Pointer::of("@source"), Pointer::Source(""));
        assert_eq!(Pointer::of("@source/lsn"), Pointer::Source("/lsn"));
        assert_eq!(Pointer::of("@sourcelsn"), Pointer::Invalid);
        assert_eq!(Pointer::of("@op"), Pointer::Op);
        assert_eq!(Pointer::of("id"), Pointer::Invalid);
        assert!(Pointer::of("@op").of_event() && !Pointer::of("@key").of_event());
        assert_eq!(crate::pointer_tokens("/a~1b/~0x"), ["a/b", "~x"]);
        assert!(crate::pointer_tokens("").is_empty());
    }
}
