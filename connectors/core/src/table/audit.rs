//! Column values as canonical text, so that a target table and the source
//! database it replicates compare equal when they hold the same values,
//! whichever engine printed them (`idem verify --against`). Each dialect
//! selects a column cast to the connector's type and printed as text; the
//! text is then made canonical here.

use super::sql::q;
use idem_config::ColumnType;

/// `SELECT` of `columns` (name, type) of `table` in PostgreSQL, each as
/// text. Timestamps as microseconds since the epoch (in the session's time
/// zone for a source column without one: set it to UTC).
pub fn postgres_select(table: &str, columns: &[(&str, ColumnType)]) -> String {
    let exprs: Vec<String> = columns
        .iter()
        .map(|(name, ty)| {
            let c = q(name);
            match ty {
                ColumnType::Text => format!("CAST({c} AS text)"),
                ColumnType::Bigint => format!("CAST({c} AS bigint)::text"),
                ColumnType::Integer => format!("CAST({c} AS integer)::text"),
                ColumnType::Double => format!("CAST({c} AS double precision)::text"),
                ColumnType::Boolean => format!("CAST({c} AS boolean)::text"),
                ColumnType::Timestamp => {
                    format!(
                        "(extract(epoch FROM CAST({c} AS timestamptz)) * 1000000)::bigint::text"
                    )
                }
                ColumnType::Date => format!("to_char(CAST({c} AS date), 'YYYY-MM-DD')"),
                ColumnType::Json => format!("CAST({c} AS jsonb)::text"),
                ColumnType::Numeric => format!("CAST({c} AS numeric)::text"),
                ColumnType::Uuid => format!("CAST({c} AS uuid)::text"),
                ColumnType::Bytea => format!("encode(CAST({c} AS bytea), 'hex')"),
            }
        })
        .collect();
    format!("SELECT {} FROM {table}", exprs.join(", "))
}

/// The same in DuckDB.
pub fn duckdb_select(table: &str, columns: &[(&str, ColumnType)]) -> String {
    let exprs: Vec<String> = columns
        .iter()
        .map(|(name, ty)| {
            let c = q(name);
            match ty {
                ColumnType::Timestamp => format!("CAST(epoch_us({c}) AS VARCHAR)"),
                ColumnType::Date => format!("strftime({c}, '%Y-%m-%d')"),
                ColumnType::Bytea => format!("lower(hex({c}))"),
                _ => format!("CAST({c} AS VARCHAR)"),
            }
        })
        .collect();
    format!("SELECT {} FROM {table}", exprs.join(", "))
}

/// One value's canonical text: numbers without what their engine adds
/// (`100.0`, `12.5000000000`), JSON re-serialized with sorted keys.
pub fn canonical(ty: ColumnType, text: Option<String>) -> Option<String> {
    let text = text?;
    Some(match ty {
        ColumnType::Double => match text.parse::<f64>() {
            Ok(x) => x.to_string(),
            Err(_) => text,
        },
        ColumnType::Numeric if text.contains('.') => {
            let trimmed = text.trim_end_matches('0').trim_end_matches('.');
            match trimmed {
                "" | "-" | "-0" => "0".into(),
                t => t.to_string(),
            }
        }
        ColumnType::Json => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => sorted(v).to_string(),
            Err(_) => text,
        },
        _ => text,
    })
}

/// `v` with every object's keys in order, whatever the map keeps.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut items: Vec<(String, Value)> = map.into_iter().collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(items.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(list) => Value::Array(list.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_print_differently_and_compare_equal() {
        let c = |ty, s: &str| canonical(ty, Some(s.to_string()));
        assert_eq!(c(ColumnType::Double, "100.0"), c(ColumnType::Double, "100"));
        assert_eq!(c(ColumnType::Double, "0.25"), Some("0.25".into()));
        assert_eq!(
            c(ColumnType::Numeric, "12.5000000000"),
            c(ColumnType::Numeric, "12.50")
        );
        assert_eq!(c(ColumnType::Numeric, "-0.000"), Some("0".into()));
        assert_eq!(c(ColumnType::Numeric, "1200"), Some("1200".into()));
        assert_eq!(
            c(ColumnType::Json, r#"{"b": 1, "a": [1, {"d": 2, "c": 3}]}"#),
            c(ColumnType::Json, r#"{"a":[1,{"c":3,"d":2}],"b":1}"#)
        );
        assert_ne!(c(ColumnType::Text, "a "), c(ColumnType::Text, "a"));
        assert_eq!(canonical(ColumnType::Text, None), None);
    }

    #[test]
    fn selects_quote_names_and_print_text() {
        let cols = [("id", ColumnType::Bigint), ("at", ColumnType::Timestamp)];
        assert_eq!(
            postgres_select("s.t", &cols),
            r#"SELECT CAST("id" AS bigint)::text, (extract(epoch FROM CAST("at" AS timestamptz)) * 1000000)::bigint::text FROM s.t"#
        );
        assert_eq!(
            duckdb_select("t", &cols),
            r#"SELECT CAST("id" AS VARCHAR), CAST(epoch_us("at") AS VARCHAR) FROM t"#
        );
    }
}
