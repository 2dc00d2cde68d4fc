use idem_config::{ColumnConfig, ColumnType, Invalid, Validate};
use serde::Deserialize;

/// `[connectors.NAME.sink]` with `type = "duckdb"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuckDbSinkConfig {
    /// The database file, created if missing. One process at a time may
    /// open it (DuckDB locks the file).
    #[serde(deserialize_with = "idem_config::interp::string")]
    pub path: String,
    /// The target table.
    pub table: String,
    /// `append` (every message is a row) or `upsert` (one row per key).
    #[serde(default)]
    pub mode: Mode,
    /// Key columns of `upsert` mode; the table's primary key.
    #[serde(default)]
    pub key: Vec<String>,
    /// `upsert`: a column whose larger value wins (e.g. `updated_at`), so an
    /// older event never overwrites a newer row. Default: the source
    /// position (a later message of the same partition wins).
    #[serde(default)]
    pub version: Option<String>,
    /// `upsert`: tombstones (null value, or `tombstone_field` true) delete
    /// the row with their key.
    #[serde(default)]
    pub delete_on_tombstone: bool,
    /// Create the table from `columns` if it is missing. Either way an
    /// existing table is checked against `columns` before the first write.
    #[serde(default = "default_create")]
    pub create: bool,
    /// DuckDB's worker threads. Default: DuckDB's own (one per core); set
    /// it to bound the CPU a sidecar takes.
    #[serde(default)]
    pub threads: Option<usize>,
    /// The table holding each partition's committed position and epoch.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
}

/// How messages become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Insert every message as a new row.
    #[default]
    Append,
    /// Insert or replace the row with the message's key.
    Upsert,
}

fn default_create() -> bool {
    true
}

fn default_offsets_table() -> String {
    "idem_offsets".into()
}

/// A plain SQL identifier: we quote it anyway, but refuse surprises.
pub(crate) fn check_ident(key: &str, value: &str) -> Result<(), Invalid> {
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

impl Validate for DuckDbSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        check_ident("table", &self.table)?;
        check_ident("offsets_table", &self.offsets_table)?;
        if self.threads == Some(0) {
            return Err(Invalid::new(&["threads"], "must be at least 1"));
        }
        if columns.is_empty() {
            return Err(Invalid::new(
                &[],
                "the duckdb sink needs [[columns]]: at least one `name`/`type` (use pointer = \"\" and type = \"json\" for the whole message)",
            ));
        }
        let find = |name: &str| columns.iter().find(|c| c.name == name);
        match self.mode {
            Mode::Append => {
                for (key, set) in [
                    ("key", !self.key.is_empty()),
                    ("version", self.version.is_some()),
                    ("delete_on_tombstone", self.delete_on_tombstone),
                ] {
                    if set {
                        return Err(Invalid::new(
                            &[key],
                            "applies to mode = \"upsert\" only; this sink has mode = \"append\"",
                        ));
                    }
                }
            }
            Mode::Upsert => {
                if self.key.is_empty() {
                    return Err(Invalid::new(
                        &["key"],
                        "mode = \"upsert\" needs key = [\"column\", ...]",
                    ));
                }
                for k in &self.key {
                    if find(k).is_none() {
                        return Err(Invalid::new(
                            &["key"],
                            format!("key column `{k}` is not among [[columns]]"),
                        ));
                    }
                }
                if let Some(v) = &self.version {
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
                                format!("version column `{v}` is {t:?}; it must be a number, timestamp or date"),
                            ))
                        }
                    }
                    if self.key.contains(v) {
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
}
