use idem_core::SinkError;
use tokio_postgres::error::SqlState;

/// What failed in the PostgreSQL sink, and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("postgres {server}: cannot connect: {}. {}", chain(source), if tls_failure(source) {
        "The server's certificate was refused: check sslmode and ca_file"
    } else {
        "Is PostgreSQL running there? (for the tests: bash scripts/postgres.sh)"
    })]
    Connect {
        server: String,
        #[source]
        source: Box<tokio_postgres::Error>,
    },
    #[error("postgres {server}: no connection from the pool: {message}")]
    Pool { server: String, message: String },
    #[error("postgres {server}: {what} (table `{table}`): {}", describe(source))]
    Sql {
        server: String,
        table: String,
        what: String,
        #[source]
        source: Box<tokio_postgres::Error>,
    },
    #[error("postgres {server}: table `{table}` does not match the connector's columns: {detail}")]
    SchemaMismatch {
        server: String,
        table: String,
        detail: String,
    },
    #[error("postgres {server}: table `{table}` does not exist and create = false")]
    MissingTable { server: String, table: String },
    #[error("postgres {server}: offsets table `{table}` holds format version {found} for partition {partition}; this Idem understands up to {supported}: upgrade Idem")]
    FormatVersion {
        server: String,
        table: String,
        partition: String,
        found: i32,
        supported: i32,
    },
    #[error("postgres {server}: offsets table `{table}`: {source}")]
    PositionConflict {
        server: String,
        table: String,
        #[source]
        source: idem_core::table::offsets::PositionConflict,
    },
    #[error("postgres: cannot set up connections: {0}")]
    Setup(String),
}

/// The server's message, with its detail, instead of "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({}): {d}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

/// Errors a retry of the whole batch can get past: the connection dropped,
/// the server restarts or is overloaded, a serialization failure or a
/// deadlock, or the server ended a transaction left idle (a runner frozen
/// mid-commit: on retry it finds its partition fenced if another runner
/// took it meanwhile).
fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O or protocol: the connection is gone
        Some(code) => {
            [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::QUERY_CANCELED,
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            ]
            .contains(code)
                || code.code().starts_with("08")
        }
    }
}

/// The error and its causes, `a: b: c`.
fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn tls_failure(e: &tokio_postgres::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

impl PgError {
    pub fn is_retriable(&self) -> bool {
        match self {
            // A certificate that fails verification will fail again.
            PgError::Connect { source, .. } => !tls_failure(source),
            PgError::Pool { .. } => true,
            PgError::Sql { source, .. } => transient(source),
            _ => false,
        }
    }

    /// Whether the server refused a value of the batch (SQLSTATE class 22,
    /// data exception; 23, a constraint; 54000, a value too large for an
    /// index): the batch is split to find it.
    pub fn is_data(&self) -> bool {
        match self {
            PgError::Sql { source, .. } => source.code().is_some_and(|c| {
                let c = c.code();
                c.starts_with("22") || c.starts_with("23") || c == "54000"
            }),
            _ => false,
        }
    }
}

impl From<PgError> for SinkError {
    fn from(e: PgError) -> Self {
        let (refused, retriable) = (e.is_data(), e.is_retriable());
        SinkError::classify(e, refused, retriable)
    }
}

/// Names used in errors and SQL.
pub(crate) struct Ctx {
    /// `postgres://user@host:port/db`, never the password.
    pub server: String,
    /// `"schema"."table"`
    pub table: String,
    /// `"schema"."offsets_table"`
    pub offsets: String,
    /// `"schema"."idem_ids_table"`: message ids of `dedup` mode.
    pub ids: String,
    /// `"schema"."idem_deleted_table"`: deleted keys of versioned upserts.
    pub graves: String,
    /// `"schema"."idem_seen_table"`: message ids of `[dedup] store = "sink"`.
    pub seen: String,
}

impl Ctx {
    pub(crate) fn sql(&self, table: &str, what: &str, source: tokio_postgres::Error) -> PgError {
        PgError::Sql {
            server: self.server.clone(),
            table: table.to_string(),
            what: what.to_string(),
            source: Box::new(source),
        }
    }
}
