pub use idem_config::WriteMode as Mode;
use idem_config::{check_ident, ColumnConfig, ColumnType, Invalid, Validate};
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
    /// DuckDB's memory limit (its `memory_limit` setting, e.g. "512MB",
    /// "2GB"): the cache of table blocks it keeps beside Idem's own
    /// bounded buffers. Default: 1GB; DuckDB's own default is 80% of the
    /// machine's memory, too much for a sidecar.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: String,
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

fn default_offsets_table() -> String {
    "idem_offsets".into()
}

impl Validate for DuckDbSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        check_ident("table", &self.table)?;
        check_ident("offsets_table", &self.offsets_table)?;
        let limit = self.memory_limit.trim();
        let digits = limit
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .trim();
        let unit = limit[digits.len()..].trim().to_ascii_uppercase();
        if digits.parse::<f64>().map_or(true, |n| n <= 0.0)
            || !["B", "KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB"].contains(&unit.as_str())
        {
            return Err(Invalid::new(
                &["memory_limit"],
                format!(
                    "`{}` is not a size such as \"512MB\" or \"2GB\"",
                    self.memory_limit
                ),
            ));
        }
        if self.threads == Some(0) {
            return Err(Invalid::new(&["threads"], "must be at least 1"));
        }
        if columns.is_empty() {
            return Err(Invalid::new(
                &[],
                "the duckdb sink needs [[columns]]: at least one `name`/`type` (use pointer = \"\" and type = \"json\" for the whole message)",
            ));
        }
        if let Some(i) = columns.iter().position(|c| c.ty == ColumnType::Numeric) {
            return Err(Invalid::column(
                i,
                "type",
                "DuckDB has no unbounded DECIMAL for type = \"numeric\"; map the field as \"double\", or as \"text\" and cast it in a view",
            ));
        }
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
        )
    }
}
