//! What every table sink (DuckDB, PostgreSQL, ...) shares in its config:
//! the write mode, its key and version columns, and identifier checks.

use crate::error::Invalid;
use crate::{ColumnConfig, ColumnType};
use serde::Deserialize;

/// How messages become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Insert every message as a new row.
    #[default]
    Append,
    /// Insert or replace the row with the message's key.
    Upsert,
    /// Insert every message whose id (`key`) was not seen within the
    /// retention window; later copies of an id change nothing.
    Dedup,
}

/// A plain SQL identifier: we quote it anyway, but refuse surprises.
pub fn check_ident(key: &str, value: &str) -> Result<(), Invalid> {
    let ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            &[key],
            format!("`{value}` is not a plain identifier (letters, digits, `_`)"),
        ))
    }
}

/// The placeholders of a table template, and which part of a Debezium
/// topic (`PREFIX.SCHEMA.TABLE`, counted from the end) each stands for.
const PLACEHOLDERS: [(&str, usize); 2] = [("{source.schema}", 2), ("{source.table}", 1)];

/// Whether `table` is a template (one target table per source table).
pub fn is_table_template(table: &str) -> bool {
    table.contains('{')
}

/// A table template: only known placeholders, the rest a plain identifier.
pub fn check_table_template(key: &str, value: &str) -> Result<(), Invalid> {
    let literal = PLACEHOLDERS
        .iter()
        .fold(value.to_string(), |t, (p, _)| t.replace(p, "x"));
    if literal.contains('{') || literal.contains('}') {
        return Err(Invalid::new(
            &[key],
            format!(
                "`{value}`: a table template knows only {{source.schema}} and {{source.table}}"
            ),
        ));
    }
    check_ident(key, &literal).map_err(|_| {
        Invalid::new(
            &[key],
            format!("`{value}`: around its placeholders, a table template holds letters, digits and `_` only"),
        )
    })
}

/// The table `template` names for a Debezium `topic`: `{source.schema}`
/// and `{source.table}` are its last two dot-separated parts. `Err` says
/// why the topic does not fit (too few parts).
pub fn resolve_table(template: &str, topic: &str) -> Result<String, String> {
    let parts: Vec<&str> = topic.split('.').collect();
    let mut out = template.to_string();
    for (placeholder, from_end) in PLACEHOLDERS {
        if out.contains(placeholder) {
            let part = parts
                .len()
                .checked_sub(from_end)
                .filter(|_| parts.len() >= 3)
                .map(|i| parts[i])
                .ok_or_else(|| {
                    format!("topic `{topic}` is not named PREFIX.SCHEMA.TABLE, as Debezium names its topics, so it gives no {placeholder}")
                })?;
            out = out.replace(placeholder, part);
        }
    }
    Ok(out)
}

/// PostgreSQL keeps the first 63 bytes of a name (NAMEDATALEN - 1) and
/// silently drops the rest, so two long names could become one table.
pub const POSTGRES_MAX_NAME: usize = 63;

/// Refuse a name PostgreSQL would truncate.
pub fn check_postgres_name(key: &[&str], value: &str) -> Result<(), Invalid> {
    if value.len() > POSTGRES_MAX_NAME {
        return Err(Invalid::new(
            key,
            format!(
                "`{value}` is {} bytes; PostgreSQL keeps only the first {POSTGRES_MAX_NAME} bytes of a name",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// A column name is free-form (it is always quoted, an embedded `"`
/// doubled), but it must be printable: no control characters, and no NUL,
/// which no SQL engine stores.
pub fn check_column_name(value: &str) -> Result<(), String> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "column name {value:?} holds the control character {:?}",
            c
        ));
    }
    Ok(())
}

/// A table sink's rows: at least one mapped column, and none of a type its
/// database cannot hold (`refused`: the type and what to map it as
/// instead). `sink` is its `type`, for the message.
pub fn validate_rows(
    sink: &str,
    columns: &[ColumnConfig],
    refused: &[(ColumnType, &str)],
) -> Result<(), Invalid> {
    if columns.is_empty() {
        return Err(Invalid::new(
            &[],
            format!("the {sink} sink needs [[columns]]: at least one `name`/`type` (use pointer = \"\" and type = \"json\" for the whole message)"),
        ));
    }
    for (ty, why) in refused {
        if let Some(i) = columns.iter().position(|c| c.ty == *ty) {
            return Err(Invalid::column(i, "type", *why));
        }
    }
    Ok(())
}

/// Check `mode` with its `key`, `version` and `delete_on_tombstone` against
/// the mapped `columns`. Keys of errors are relative to the sink section.
/// With `template` (a table per source table), an upsert may leave `key`
/// out: each table is keyed on its source table's primary key, learnt
/// from the message key.
pub fn validate_write(
    mode: WriteMode,
    key: &[String],
    version: Option<&str>,
    delete_on_tombstone: bool,
    columns: &[ColumnConfig],
    template: bool,
) -> Result<(), Invalid> {
    let find = |name: &str| columns.iter().find(|c| c.name == name);
    match mode {
        WriteMode::Append => {
            for (key, set) in [
                ("key", !key.is_empty()),
                ("version", version.is_some()),
                ("delete_on_tombstone", delete_on_tombstone),
            ] {
                if set {
                    return Err(Invalid::new(
                        &[key],
                        "applies to mode = \"upsert\" (or `key` to \"dedup\") only; this sink has mode = \"append\"",
                    ));
                }
            }
        }
        WriteMode::Dedup => {
            if key.is_empty() {
                return Err(Invalid::new(
                    &["key"],
                    "mode = \"dedup\" needs key = [\"message id column\", ...]",
                ));
            }
            if let Some(k) = key.iter().find(|k| find(k).is_none()) {
                return Err(Invalid::new(
                    &["key"],
                    format!("key column `{k}` is not among [[columns]]"),
                ));
            }
            for (name, set) in [
                ("version", version.is_some()),
                ("delete_on_tombstone", delete_on_tombstone),
            ] {
                if set {
                    return Err(Invalid::new(
                        &[name],
                        "applies to mode = \"upsert\" only; this sink has mode = \"dedup\"",
                    ));
                }
            }
        }
        WriteMode::Upsert => {
            if key.is_empty() && !template {
                return Err(Invalid::new(
                    &["key"],
                    "mode = \"upsert\" needs key = [\"column\", ...]",
                ));
            }
            for k in key {
                if find(k).is_none() {
                    return Err(Invalid::new(
                        &["key"],
                        format!("key column `{k}` is not among [[columns]]"),
                    ));
                }
            }
            if let Some(v) = version {
                match find(v).map(|c| c.ty) {
                    None => {
                        return Err(Invalid::new(
                            &["version"],
                            format!("version column `{v}` is not among [[columns]]"),
                        ))
                    }
                    Some(
                        ColumnType::Bigint
                        | ColumnType::Integer
                        | ColumnType::Double
                        | ColumnType::Timestamp
                        | ColumnType::Date,
                    ) => {}
                    Some(t) => {
                        return Err(Invalid::new(
                            &["version"],
                            format!(
                            "version column `{v}` is {t:?}; it must be a number, timestamp or date"
                        ),
                        ))
                    }
                }
                if key.iter().any(|k| k == v) {
                    return Err(Invalid::new(
                        &["version"],
                        "the version column cannot be a key column",
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_names_a_table_per_topic() {
        assert!(is_table_template("{source.table}") && !is_table_template("t"));
        check_table_template("table", "{source.schema}_{source.table}").unwrap();
        check_table_template("table", "replica_{source.table}").unwrap();
        let e = check_table_template("table", "{source.db}").unwrap_err();
        assert!(e.message.contains("knows only"), "{}", e.message);
        let e = check_table_template("table", "a-{source.table}").unwrap_err();
        assert!(e.message.contains("letters, digits"), "{}", e.message);
        assert_eq!(
            resolve_table(
                "{source.schema}_{source.table}",
                "dbserver1.inventory.orders"
            )
            .unwrap(),
            "inventory_orders"
        );
        assert_eq!(resolve_table("{source.table}", "a.b.c.d").unwrap(), "d");
        let e = resolve_table("{source.table}", "orders").unwrap_err();
        assert!(e.contains("PREFIX.SCHEMA.TABLE"), "{e}");
    }
}
