use idem_config::{
    check_ident, check_postgres_name, check_table_template, is_table_template, ColumnConfig,
    Invalid, Secret, Validate, WriteMode,
};
use serde::Deserialize;
use std::time::Duration;

/// `[connectors.NAME.sink]` with `type = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// Connection URL, e.g. `postgres://idem:${PGPASSWORD}@127.0.0.1:5432/app`.
    /// Redacted in logs and errors.
    pub url: Secret,
    /// The schema of the target and offsets tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The target table.
    pub table: String,
    /// `append` (every message is a row) or `upsert` (one row per key).
    #[serde(default)]
    pub mode: WriteMode,
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
    /// `dedup` into a table without a unique index on `key`: how long a
    /// message id is remembered. A copy of an id that arrives later than
    /// this after the first is written again. (A keyed table's rows are
    /// its ids.)
    #[serde(default = "default_dedup_retention", with = "humantime_serde")]
    pub dedup_retention: Duration,
    /// Create the schema and table from `columns` if missing. Either way an
    /// existing table is checked against `columns` before the first write.
    #[serde(default = "default_create")]
    pub create: bool,
    /// The table holding each partition's committed position and epoch.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// Connections in the pool (partitions commit concurrently).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Give up connecting after this long (then retry with backoff).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout` for every statement.
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Server-side `idle_in_transaction_session_timeout`: a runner frozen
    /// in the middle of a commit (a stopped process or VM) has its
    /// transaction aborted after this long, so the partition's new owner
    /// does not wait for its row locks until it wakes.
    #[serde(
        default = "default_idle_in_transaction_timeout",
        with = "humantime_serde"
    )]
    pub idle_in_transaction_timeout: Duration,
    /// TLS, as libpq's `sslmode`: `disable`, `prefer` (TLS when the server
    /// offers it), `require` (TLS, certificate not checked), `verify-full`
    /// (TLS, certificate checked against `ca_file` and the host name).
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file with the CA certificate(s) for `sslmode = "verify-full"`.
    #[serde(default)]
    pub ca_file: Option<String>,
}

pub use idem_postgres::SslMode;

fn default_schema() -> String {
    "public".into()
}

fn default_create() -> bool {
    true
}

fn default_offsets_table() -> String {
    "idem_offsets".into()
}

fn default_dedup_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_pool_size() -> usize {
    4
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_statement_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_idle_in_transaction_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Validate for PostgresSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        check_ident("schema", &self.schema)?;
        if self.schema.starts_with("pg_") {
            return Err(Invalid::new(
                &["schema"],
                "names starting with `pg_` are reserved by PostgreSQL",
            ));
        }
        if is_table_template(&self.table) {
            // Each table it names is checked when it is resolved.
            check_table_template("table", &self.table)?;
            if self.mode == WriteMode::Dedup {
                return Err(Invalid::new(
                    &["table"],
                    "a table template writes change events (envelope = \"debezium\"): use mode = \"upsert\" or \"append\"",
                ));
            }
        } else {
            check_ident("table", &self.table)?;
            check_postgres_name(&["table"], &self.table)?;
        }
        check_ident("offsets_table", &self.offsets_table)?;
        for (key, value) in [
            ("schema", &self.schema),
            ("offsets_table", &self.offsets_table),
        ] {
            check_postgres_name(&[key], value)?;
        }
        if self.mode == WriteMode::Dedup {
            // An unkeyed table's ids live beside it in `idem_ids_<table>`.
            check_postgres_name(&["table"], &ids_table(&self.table))?;
        }
        if self.version.is_some() && self.delete_on_tombstone {
            // Its deleted keys live beside it in `idem_deleted_<table>`.
            check_postgres_name(
                &["table"],
                &idem_core::table::sql::Graves::name(&self.table),
            )?;
        }
        for (i, c) in columns.iter().enumerate() {
            check_postgres_name(&[], &c.name).map_err(|e| Invalid::column(i, "name", e.message))?;
        }
        if let Err(e) = self.url.expose().parse::<tokio_postgres::Config>() {
            return Err(Invalid::new(&["url"], format!("not a PostgreSQL URL: {e}")));
        }
        if self.sslmode == SslMode::VerifyFull && self.ca_file.is_none() {
            return Err(Invalid::new(
                &["ca_file"],
                "sslmode = \"verify-full\" needs ca_file = \"/path/to/ca.pem\"",
            ));
        }
        if self.pool_size == 0 {
            return Err(Invalid::new(&["pool_size"], "must be at least 1"));
        }
        idem_config::validate_rows("postgres", columns, &[])?;
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

/// The table of a `mode = "dedup"` sink's message ids, in the sink's schema.
pub fn ids_table(table: &str) -> String {
    format!("idem_ids_{table}")
}
