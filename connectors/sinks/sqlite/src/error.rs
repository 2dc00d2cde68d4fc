use idem_core::SinkError;
use rusqlite::ErrorCode;

/// What failed in the SQLite sink, and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    #[error("sqlite: cannot open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error("sqlite {path}: table `{table}` does not match the connector's columns: {detail}")]
    SchemaMismatch {
        path: String,
        table: String,
        detail: String,
    },
    #[error("sqlite {path}: table `{table}` does not exist and create = false")]
    MissingTable { path: String, table: String },
    #[error("sqlite {path}: {what} (table `{table}`): {source}")]
    Sql {
        path: String,
        table: String,
        what: String,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error("sqlite {path}: offsets table `{table}`: {source}")]
    PositionConflict {
        path: String,
        table: String,
        #[source]
        source: idem_core::table::offsets::PositionConflict,
    },
    #[error("sqlite {path}: offsets table `{table}` holds format version {found} for partition {partition}; this Idem understands up to {supported}: upgrade Idem")]
    FormatVersion {
        path: String,
        table: String,
        partition: String,
        found: i32,
        supported: i32,
    },
    #[error("sqlite: the database is not open (the sink did not start)")]
    NotPrepared,
    #[error("sqlite: worker thread failed: {0}")]
    Worker(String),
}

impl SqliteError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            SqliteError::Sql { source, .. } | SqliteError::Open { source, .. } => {
                source.sqlite_error_code()
            }
            _ => None,
        }
    }

    /// Another connection holds the file's lock, or the disk hiccuped:
    /// the batch can be retried. Everything else fails the same way again.
    pub fn is_retriable(&self) -> bool {
        matches!(self, SqliteError::Worker(_))
            || matches!(
                self.code(),
                Some(
                    ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::SystemIoFailure
                )
            )
    }

    /// A value of the batch broke a constraint of the table (CHECK, NOT
    /// NULL, UNIQUE): the batch is split to find it.
    pub fn is_data(&self) -> bool {
        matches!(self.code(), Some(ErrorCode::ConstraintViolation))
    }
}

impl From<SqliteError> for SinkError {
    fn from(e: SqliteError) -> Self {
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
    pub(crate) fn sql(&self, table: &str, what: &str, source: rusqlite::Error) -> SqliteError {
        SqliteError::Sql {
            path: self.path.clone(),
            table: table.to_string(),
            what: what.to_string(),
            source: Box::new(source),
        }
    }
}
