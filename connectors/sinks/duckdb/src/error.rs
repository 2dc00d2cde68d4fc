use idem_core::SinkError;

/// What failed in the DuckDB sink, and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DuckDbError {
    #[error("duckdb: cannot open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<duckdb::Error>,
    },
    #[error("duckdb {path}: table `{table}` does not match the connector's columns: {detail}")]
    SchemaMismatch {
        path: String,
        table: String,
        detail: String,
    },
    #[error("duckdb {path}: table `{table}` does not exist and create = false")]
    MissingTable { path: String, table: String },
    #[error("duckdb {path}: {what} (table `{table}`): {source}")]
    Sql {
        path: String,
        table: String,
        what: String,
        #[source]
        source: Box<duckdb::Error>,
    },
    #[error("duckdb {path}: offsets table `{table}`: {source}")]
    PositionConflict {
        path: String,
        table: String,
        #[source]
        source: idem_core::table::offsets::PositionConflict,
    },
    #[error("duckdb {path}: offsets table `{table}` holds format version {found} for partition {partition}; this Idem understands up to {supported}: upgrade Idem")]
    FormatVersion {
        path: String,
        table: String,
        partition: String,
        found: i32,
        supported: i32,
    },
    #[error("duckdb: {path} is not a DuckDB database: {why}")]
    NotADatabase { path: String, why: String },
    #[error("duckdb: the database is not open (the sink did not start)")]
    NotPrepared,
    #[error("duckdb: worker thread failed: {0}")]
    Worker(String),
    /// A batch's values do not fit its columns' Arrow types (a value of
    /// another type than its column's).
    #[error("duckdb: table {table}: a batch of {partition} does not fit its columns: {detail}")]
    Encode {
        table: String,
        partition: String,
        detail: String,
    },
}

impl DuckDbError {
    /// Write conflicts and I/O hiccups can pass; everything else is about
    /// the config or the data and will fail the same way again.
    pub fn is_retriable(&self) -> bool {
        match self {
            DuckDbError::Sql { source, .. } | DuckDbError::Open { source, .. } => {
                let msg = source.to_string();
                // An I/O error about what the file is will not pass.
                let about_the_file = [
                    "not a valid DuckDB database",
                    "Is a directory",
                    "Permission denied",
                    "created with an older, unsupported version",
                    "newer version of DuckDB",
                ]
                .iter()
                .any(|s| msg.contains(s));
                !about_the_file
                    && ["Conflict", "IO Error", "Could not set lock", "Interrupted"]
                        .iter()
                        .any(|s| msg.contains(s))
            }
            DuckDbError::Worker(_) => true,
            _ => false,
        }
    }

    /// Whether DuckDB refused a value of the batch (a constraint, a cast, a
    /// value out of range): the batch is split to find it.
    pub fn is_data(&self) -> bool {
        match self {
            DuckDbError::Sql { source, .. } => {
                let msg = source.to_string();
                ["Constraint Error", "Conversion Error", "Out of Range Error"]
                    .iter()
                    .any(|s| msg.contains(s))
            }
            _ => false,
        }
    }
}

impl From<DuckDbError> for SinkError {
    fn from(e: DuckDbError) -> Self {
        let (refused, retriable) = (e.is_data(), e.is_retriable());
        SinkError::classify(e, refused, retriable)
    }
}

/// Names used in errors and SQL.
pub(crate) struct Ctx {
    pub path: String,
    pub table: String,
    pub offsets_table: String,
}

impl Ctx {
    pub(crate) fn sql(&self, table: &str, what: &str, source: duckdb::Error) -> DuckDbError {
        DuckDbError::Sql {
            path: self.path.clone(),
            table: table.to_string(),
            what: what.to_string(),
            source: Box::new(source),
        }
    }
}
