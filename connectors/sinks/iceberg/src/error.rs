use idem_core::SinkError;

/// What failed in the Iceberg sink, and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IcebergError {
    #[error("iceberg catalog {server}: cannot connect: {message}. Is PostgreSQL running there? (for the tests: bash scripts/postgres.sh)")]
    Connect { server: String, message: String },
    #[error("iceberg catalog {server}: {what}: {source}")]
    Catalog {
        server: String,
        what: String,
        #[source]
        source: Box<tokio_postgres::Error>,
    },
    #[error("iceberg table {table}: {what}: {source}")]
    Table {
        table: String,
        what: String,
        #[source]
        source: Box<iceberg::Error>,
    },
    #[error("iceberg table {table} does not exist and create = false")]
    MissingTable { table: String },
    #[error("iceberg table {table} does not match the connector's columns: {detail}")]
    SchemaMismatch { table: String, detail: String },
    #[error("iceberg table {table}: a record does not fit its schema: {detail}")]
    Encode { table: String, detail: String },
    #[error("iceberg table {table}: {source}")]
    PositionConflict {
        table: String,
        #[source]
        source: idem_core::table::offsets::PositionConflict,
    },
    #[error("iceberg table {table}: the property `{key}` holds `{value}`, which Idem did not write: {why}")]
    BadProperty {
        table: String,
        key: String,
        value: String,
        why: String,
    },
    #[error("iceberg warehouse {location}: {message}")]
    Warehouse { location: String, message: String },
    #[error("iceberg: {0}")]
    Setup(String),
}

impl IcebergError {
    pub fn is_retriable(&self) -> bool {
        match self {
            IcebergError::Connect { .. } | IcebergError::Warehouse { .. } => true,
            IcebergError::Catalog { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            // Requirement conflicts say so; I/O of the warehouse comes as
            // `Unexpected` (a store that is down, a timeout).
            IcebergError::Table { source, .. } => {
                source.retryable() || source.kind() == iceberg::ErrorKind::Unexpected
            }
            _ => false,
        }
    }
}

impl From<IcebergError> for SinkError {
    fn from(e: IcebergError) -> Self {
        let retriable = e.is_retriable();
        SinkError::classify(e, false, retriable)
    }
}

/// What Idem's catalog clients leave out of `iceberg::Catalog`: Idem only
/// creates, loads and commits to its own tables.
pub fn unsupported<T>(what: &str) -> iceberg::Result<T> {
    Err(iceberg::Error::new(
        iceberg::ErrorKind::FeatureUnsupported,
        format!("Idem's catalog client does not {what}"),
    ))
}
