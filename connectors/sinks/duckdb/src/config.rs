pub use idem_config::WriteMode as Mode;
use idem_config::{
    check_ident, check_table_template, is_table_template, ColumnConfig, ColumnType, Invalid,
    Validate,
};
use serde::Deserialize;

/// `[connectors.NAME.sink]` with `type = "duckdb"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuckDbSinkConfig {
    /// The database file, created if missing. One process at a time may
    /// open it (DuckDB locks the file).
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
    /// DuckDB's memory limit (its `memory_limit` setting, e.g. "512MB",
    /// "2GB"): the cache of table blocks it keeps beside Idem's own
    /// bounded buffers. Default: 1GB; DuckDB's own default is 80% of the
    /// machine's memory, too much for a sidecar.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: String,
    /// The write-ahead log size at which DuckDB checkpoints (its
    /// `checkpoint_threshold`). Default: 256MB. DuckDB's own 16MB
    /// checkpoints every few batches of large values, and each checkpoint
    /// re-reads and holds the blocks it rewrites.
    #[serde(default = "default_checkpoint_threshold")]
    pub checkpoint_threshold: String,
    /// The table holding each partition's committed position and epoch.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
}

fn default_create() -> bool {
    true
}

fn default_memory_limit() -> String {
    "1GB".into()
}

fn default_checkpoint_threshold() -> String {
    "256MB".into()
}

fn default_offsets_table() -> String {
    "idem_offsets".into()
}

impl Validate for DuckDbSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if is_table_template(&self.table) {
            // Each table it names is checked when it is resolved.
            check_table_template("table", &self.table)?;
        } else {
            check_ident("table", &self.table)?;
        }
        check_ident("offsets_table", &self.offsets_table)?;
        check_size("memory_limit", &self.memory_limit)?;
        check_size("checkpoint_threshold", &self.checkpoint_threshold)?;
        if self.threads == Some(0) {
            return Err(Invalid::new(&["threads"], "must be at least 1"));
        }
        idem_config::validate_rows(
            "duckdb",
            columns,
            &[(
                ColumnType::Numeric,
                "DuckDB has no unbounded DECIMAL for type = \"numeric\"; map the field as \"double\", or as \"text\" and cast it in a view",
            )],
        )?;
        if self.mode == Mode::Dedup {
            return Err(Invalid::new(
                &["mode"],
                "mode = \"dedup\" is not available on the duckdb sink yet; mode = \"upsert\" keyed on the message id gives one row per id",
            ));
        }
        idem_config::validate_write(
            self.mode,
            &self.key,
            self.version.as_deref(),
            self.delete_on_tombstone,
            columns,
            is_table_template(&self.table),
        )
    }
}

/// A DuckDB size setting: a positive number and a unit. Only such values
/// are spliced into `SET`, so no quote can reach the statement.
fn check_size(key: &str, value: &str) -> Result<(), Invalid> {
    let size = value.trim();
    let digits = size
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .trim();
    let unit = size[digits.len()..].trim().to_ascii_uppercase();
    if digits
        .parse::<f64>()
        .map_or(true, |n| !(n > 0.0 && n.is_finite()))
        || !["B", "KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB"].contains(&unit.as_str())
    {
        return Err(Invalid::new(
            &[key],
            format!("`{value}` is not a size such as \"512MB\" or \"2GB\""),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_size;

    #[test]
    fn sizes_need_a_positive_number_and_a_unit() {
        for ok in ["1GB", "512MB", " 2 gib ", "0.5GB", "100B"] {
            assert!(check_size("memory_limit", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "GB",
            "0MB",
            "-1GB",
            "1",
            "1XB",
            "1GB'; DROP TABLE t; --",
            "infGB",
            "NaNMB",
        ] {
            let e = check_size("checkpoint_threshold", bad).unwrap_err();
            assert!(e.message.contains("is not a size"), "{bad}: {}", e.message);
            assert_eq!(e.key, ["checkpoint_threshold"]);
        }
    }
}
