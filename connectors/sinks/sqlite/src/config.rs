pub use idem_config::WriteMode as Mode;
use idem_config::{check_ident, ColumnConfig, ColumnType, Invalid, Validate};
use serde::Deserialize;
use std::time::Duration;

/// `[connectors.NAME.sink]` with `type = "sqlite"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// The database file, created if missing. Other processes may read it
    /// while Idem writes (write-ahead log).
    pub path: String,
    /// The target table.
    pub table: String,
    /// `append` (every message is a row) or `upsert` (one row per key).
    #[serde(default)]
    pub mode: Mode,
    /// Key columns of `upsert` mode; the table's primary key.
    #[serde(default)]
    pub key: Vec<String>,
    /// `upsert`: a column whose larger value wins, so an older event never
    /// overwrites a newer row. Default: the source position.
    #[serde(default)]
    pub version: Option<String>,
    /// `upsert`: tombstones delete the row with their key.
    #[serde(default)]
    pub delete_on_tombstone: bool,
    /// Create the table from `columns` if it is missing. Either way an
    /// existing table is checked against `columns` before the first write.
    #[serde(default = "default_create")]
    pub create: bool,
    /// How long a write waits for another connection's lock on the file
    /// (a reader checkpointing, a second runner) before the batch is
    /// retried.
    #[serde(default = "default_busy_timeout", with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// The table holding each partition's committed position and epoch.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
}

fn default_create() -> bool {
    true
}

fn default_busy_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_offsets_table() -> String {
    "idem_offsets".into()
}

impl Validate for SqliteSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        check_ident("table", &self.table)?;
        check_ident("offsets_table", &self.offsets_table)?;
        idem_config::validate_rows(
            "sqlite",
            columns,
            &[(
                ColumnType::Numeric,
                "SQLite has no exact decimal for type = \"numeric\"; map the field as \"double\", or as \"text\" to keep its digits",
            )],
        )?;
        if self.mode == Mode::Dedup {
            return Err(Invalid::new(
                &["mode"],
                "mode = \"dedup\" is not available on the sqlite sink; mode = \"upsert\" keyed on the message id gives one row per id",
            ));
        }
        idem_config::validate_write(
            self.mode,
            &self.key,
            self.version.as_deref(),
            self.delete_on_tombstone,
            columns,
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> SqliteSinkConfig {
        toml::from_str(&format!("path = \"x.sqlite\"\ntable = \"t\"\n{extra}")).unwrap()
    }

    fn col(name: &str, ty: ColumnType) -> ColumnConfig {
        ColumnConfig {
            name: name.into(),
            pointer: None,
            ty,
            required: false,
        }
    }

    #[test]
    fn defaults_and_refusals_name_their_key() {
        let c = cfg("");
        assert_eq!((c.mode, c.create), (Mode::Append, true));
        assert_eq!(c.busy_timeout, Duration::from_secs(5));
        assert_eq!(c.offsets_table, "idem_offsets");
        assert!(c.validate(&[col("id", ColumnType::Text)]).is_ok());
        let e = c
            .validate(&[
                col("id", ColumnType::Text),
                col("amount", ColumnType::Numeric),
            ])
            .unwrap_err();
        assert!(e.message.contains("no exact decimal"), "{}", e.message);
        let e = cfg("mode = \"dedup\"\nkey = [\"id\"]")
            .validate(&[col("id", ColumnType::Text)])
            .unwrap_err();
        assert_eq!(e.key, ["mode"]);
        assert!(cfg("busy_timeout = \"250ms\"").busy_timeout == Duration::from_millis(250));
        assert!(
            toml::from_str::<SqliteSinkConfig>("path = \"x\"\ntable = \"t\"\nthreads = 2").is_err()
        );
    }
}
