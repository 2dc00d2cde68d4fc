//! An existing table checked against what the connector maps, before the
//! first write: each sink reads the table's columns and primary key its own
//! way (information_schema, its catalog) and compares them here, so every
//! table sink refuses the same mismatches with the same words.

use idem_config::ColumnType;

/// Every `expected` (name, type) is a column of `actual` with that type,
/// as the database names it (compared without regard to case: DuckDB says
/// `VARCHAR`, PostgreSQL `character varying`). Extra columns are allowed.
/// `Err` says which column is missing or mistyped.
pub fn columns<'a>(
    expected: impl IntoIterator<Item = (&'a str, &'a str)>,
    actual: &[(String, String)],
) -> Result<(), String> {
    for (name, ty) in expected {
        match actual.iter().find(|(n, _)| n == name) {
            None => return Err(format!("column `{name}` ({ty}) is missing")),
            Some((_, found)) if !same_type(found, ty) => {
                return Err(format!(
                    "column `{name}` is {found}, the connector maps it as {ty}"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Columns learnt from the source's schema, once added to a table: each
/// has the type the schema gives it (one that was there already, added by
/// an earlier run, may not). `Err` says which does not.
pub fn learnt<'a>(
    added: impl IntoIterator<Item = (&'a str, &'a str)>,
    actual: &[(String, String)],
) -> Result<(), String> {
    columns(added, actual).map_err(|d| format!("{d} (a column learnt from the source's schema)"))
}

/// Whether a column the database reports as `found` takes what Idem writes
/// as type `ty`: the same name, or for text PostgreSQL's `character
/// varying` and `character` (varchar(n), char(n)), which take text as it is
/// written and enforce their length themselves.
fn same_type(found: &str, ty: &str) -> bool {
    found.eq_ignore_ascii_case(ty)
        || (ty == "text" && matches!(found, "character varying" | "character"))
}

/// The column type of a table's column that the database reports as
/// `found`, among those the sink `writes` (its type name for each, `None`
/// for a type it refuses); `Err(found)` when it writes none such.
pub fn column_type(
    found: &str,
    writes: impl Fn(ColumnType) -> Option<&'static str>,
) -> Result<ColumnType, String> {
    ColumnType::ALL
        .into_iter()
        .find(|&t| writes(t).is_some_and(|name| same_type(found, name)))
        .ok_or_else(|| found.to_string())
}

/// An upsert table's primary key is exactly `key`, in order: the merge
/// matches rows on it, and another key would merge the wrong rows or fail.
pub fn primary_key(key: &[String], found: &[String]) -> Result<(), String> {
    if found == key {
        return Ok(());
    }
    Err(format!(
        "upsert needs PRIMARY KEY ({}); the table has {}",
        key.join(", "),
        if found.is_empty() {
            "none".to_string()
        } else {
            format!("PRIMARY KEY ({})", found.join(", "))
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_missing_or_mistyped_column_is_named() {
        let actual = cols(&[("id", "VARCHAR"), ("v", "VARCHAR"), ("extra", "DATE")]);
        assert_eq!(columns([("id", "varchar")], &actual), Ok(()));
        assert_eq!(
            columns([("id", "VARCHAR"), ("v", "BIGINT")], &actual),
            Err("column `v` is VARCHAR, the connector maps it as BIGINT".into())
        );
        assert_eq!(
            columns([("n", "BIGINT")], &actual),
            Err("column `n` (BIGINT) is missing".into())
        );
        // PostgreSQL's varchar(n) and char(n) take text; nothing else does.
        let pg = cols(&[
            ("a", "character varying"),
            ("b", "character"),
            ("c", "smallint"),
        ]);
        assert_eq!(columns([("a", "text"), ("b", "text")], &pg), Ok(()));
        assert!(columns([("c", "integer")], &pg).is_err());
    }

    #[test]
    fn a_table_columns_type_is_the_one_idem_writes_it_as() {
        let pg = |t: ColumnType| {
            Some(if t == ColumnType::Timestamp {
                "timestamp with time zone"
            } else {
                t.name()
            })
        };
        assert_eq!(column_type("character varying", pg), Ok(ColumnType::Text));
        assert_eq!(column_type("bigint", pg), Ok(ColumnType::Bigint));
        assert_eq!(
            column_type("timestamp with time zone", pg),
            Ok(ColumnType::Timestamp)
        );
        assert_eq!(
            column_type("timestamp without time zone", pg),
            Err("timestamp without time zone".into())
        );
        // A type the sink refuses is no answer.
        let no_numeric = |t: ColumnType| (t != ColumnType::Numeric).then(|| t.name());
        assert_eq!(column_type("numeric", no_numeric), Err("numeric".into()));
    }

    #[test]
    fn a_primary_key_must_be_the_key_in_order() {
        let key = vec!["a".to_string(), "b".to_string()];
        assert_eq!(primary_key(&key, &key), Ok(()));
        let swapped = vec!["b".to_string(), "a".to_string()];
        assert_eq!(
            primary_key(&key, &swapped),
            Err("upsert needs PRIMARY KEY (a, b); the table has PRIMARY KEY (b, a)".into())
        );
        assert_eq!(
            primary_key(&key, &[]),
            Err("upsert needs PRIMARY KEY (a, b); the table has none".into())
        );
    }
}
