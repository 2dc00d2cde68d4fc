//! The SQL catalog in PostgreSQL: the table layout PyIceberg's
//! `SqlCatalog` and Iceberg's `JdbcCatalog` share (`iceberg_tables` holds
//! each table's metadata location), so their readers find what Idem
//! commits. A commit locks the table's row (`SELECT .. FOR UPDATE`), reads
//! the metadata it points to, checks the commit's requirements and Idem's
//! positions against it, writes the new metadata file and moves the
//! pointer, in one PostgreSQL transaction: no other writer can commit in
//! between, whatever it checked before.

use crate::error::IcebergError;
use deadpool_postgres::Pool;
use iceberg::io::FileIO;
use iceberg::spec::{Schema, TableMetadata, TableMetadataBuilder, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::{
    Error, ErrorKind, MetadataLocation, NamespaceIdent, Result, TableCreation, TableIdent,
};

type Outcome<T> = std::result::Result<T, IcebergError>;
use std::collections::HashMap;
use std::str::FromStr;

// Columns are named in every INSERT: Iceberg's `JdbcCatalog` (schema V1)
// adds `iceberg_type` to a catalog it shares.
const CREATE: &str = "
CREATE TABLE IF NOT EXISTS iceberg_tables (
    catalog_name VARCHAR(255) NOT NULL,
    table_namespace VARCHAR(255) NOT NULL,
    table_name VARCHAR(255) NOT NULL,
    metadata_location VARCHAR(1000),
    previous_metadata_location VARCHAR(1000),
    PRIMARY KEY (catalog_name, table_namespace, table_name));
CREATE TABLE IF NOT EXISTS iceberg_namespace_properties (
    catalog_name VARCHAR(255) NOT NULL,
    namespace VARCHAR(255) NOT NULL,
    property_key VARCHAR(255) NOT NULL,
    property_value VARCHAR(1000),
    PRIMARY KEY (catalog_name, namespace, property_key));";

pub struct PgCatalog {
    pool: Pool,
    /// `postgres://user@host:port/db`, never the password.
    pub server: String,
    name: String,
    io: FileIO,
    warehouse: String,
}

/// A failure inside the catalog's own statements, as iceberg's error (the
/// trait's), retryable when the connection broke.
fn pg_error(what: &str, e: tokio_postgres::Error) -> Error {
    let retryable = e.is_closed() || e.as_db_error().is_none();
    Error::new(ErrorKind::Unexpected, format!("sql catalog: {what}"))
        .with_source(e)
        .with_retryable(retryable)
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    Error::new(
        ErrorKind::Unexpected,
        format!("sql catalog: no connection: {e}"),
    )
    .with_retryable(true)
}

impl PgCatalog {
    pub fn new(
        url: &str,
        name: &str,
        io: FileIO,
        warehouse: &str,
        idle_in_transaction: std::time::Duration,
    ) -> Outcome<Self> {
        let (pool, server) = idem_postgres::pool_with_timeout(url, 4, Some(idle_in_transaction))
            .map_err(IcebergError::Setup)?;
        Ok(PgCatalog {
            pool,
            server,
            name: name.to_string(),
            io,
            warehouse: warehouse.trim_end_matches('/').to_string(),
        })
    }

    async fn client(&self) -> Outcome<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| IcebergError::Connect {
            server: self.server.clone(),
            message: e.to_string(),
        })
    }

    fn sql(&self, what: &str, e: tokio_postgres::Error) -> IcebergError {
        IcebergError::Catalog {
            server: self.server.clone(),
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    /// The catalog's tables, and the namespace (as PyIceberg marks one
    /// without properties).
    pub async fn prepare(&self, namespace: &NamespaceIdent) -> Outcome<()> {
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(|e| self.sql("begin", e))?;
        // Two runners starting together would race on CREATE TABLE.
        txn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('idem iceberg catalog'))",
            &[],
        )
        .await
        .map_err(|e| self.sql("lock", e))?;
        txn.batch_execute(CREATE)
            .await
            .map_err(|e| self.sql("create the catalog tables", e))?;
        txn.execute(
            "INSERT INTO iceberg_namespace_properties (catalog_name, namespace, property_key, property_value) VALUES ($1, $2, 'exists', 'true')
             ON CONFLICT DO NOTHING",
            &[&self.name, &namespace.join(".")],
        )
        .await
        .map_err(|e| self.sql("create the namespace", e))?;
        txn.commit().await.map_err(|e| self.sql("commit", e))
    }

    fn table_of(
        &self,
        ident: &TableIdent,
        location: String,
        metadata: TableMetadata,
    ) -> Result<Table> {
        table_at(&self.io, ident, location, metadata)
    }

    /// The table as its current metadata says, or `None` if the catalog
    /// has no such table.
    pub async fn load(&self, ident: &TableIdent) -> Result<Option<Table>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                "SELECT metadata_location FROM iceberg_tables
                 WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
                &[&self.name, &ident.namespace().join("."), &ident.name()],
            )
            .await
            .map_err(|e| pg_error("read a table's metadata location", e))?;
        let Some(location) = row.and_then(|r| r.get::<_, Option<String>>(0)) else {
            return Ok(None);
        };
        let metadata = TableMetadata::read_from(&self.io, &location).await?;
        Ok(Some(self.table_of(ident, location, metadata)?))
    }

    /// A new table of `schema` and `spec` under the warehouse; the
    /// existing one if another runner created it first.
    pub async fn create(
        &self,
        ident: &TableIdent,
        schema: Schema,
        spec: UnboundPartitionSpec,
    ) -> Result<Table> {
        let creation = creation(&self.warehouse, ident, schema, spec);
        let location = creation.location.clone().unwrap_or_default();
        let metadata = TableMetadataBuilder::from_table_creation(creation)?
            .build()?
            .metadata;
        let at = MetadataLocation::new_with_metadata(&location, &metadata);
        metadata.write_to(&self.io, &at).await?;
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client
            .execute(
                "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, metadata_location, previous_metadata_location)
                 VALUES ($1, $2, $3, $4, NULL) ON CONFLICT DO NOTHING",
                &[
                    &self.name,
                    &ident.namespace().join("."),
                    &ident.name(),
                    &at.to_string(),
                ],
            )
            .await
            .map_err(|e| pg_error("register the table", e))?;
        if n == 0 {
            // Another runner's table won; this metadata file is unused.
            let _ = self.io.delete(at.to_string()).await;
        }
        self.load(ident).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Unexpected,
                format!("table {ident} vanished once created"),
            )
        })
    }

    /// Change the table under its row's lock: `change` gets the current
    /// table and returns the new metadata, or an error that leaves the
    /// table as it was.
    pub async fn locked(
        &self,
        ident: &TableIdent,
        change: impl FnOnce(&Table) -> Result<TableMetadata> + Send,
    ) -> Result<Table> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let txn = client
            .transaction()
            .await
            .map_err(|e| pg_error("begin", e))?;
        let ns = ident.namespace().join(".");
        let row = txn
            .query_opt(
                "SELECT metadata_location FROM iceberg_tables
                 WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3
                 FOR UPDATE",
                &[&self.name, &ns, &ident.name()],
            )
            .await
            .map_err(|e| pg_error("lock the table's row", e))?;
        let Some(current) = row.and_then(|r| r.get::<_, Option<String>>(0)) else {
            return Err(Error::new(
                ErrorKind::TableNotFound,
                format!("table {ident} is not in catalog `{}`", self.name),
            ));
        };
        let metadata = TableMetadata::read_from(&self.io, &current).await?;
        let table = self.table_of(ident, current.clone(), metadata)?;
        let next = change(&table)?;
        let at = MetadataLocation::from_str(&current)?
            .with_next_version()
            .with_new_metadata(&next);
        next.write_to(&self.io, &at).await?;
        let at = at.to_string();
        txn.execute(
            "UPDATE iceberg_tables SET metadata_location = $4, previous_metadata_location = $5
             WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
            &[&self.name, &ns, &ident.name(), &at, &current],
        )
        .await
        .map_err(|e| pg_error("move the table's metadata pointer", e))?;
        txn.commit()
            .await
            .map_err(|e| pg_error("commit the table's new metadata", e))?;
        self.table_of(ident, at, next)
    }

    /// Set `properties` of the table, computed from its current metadata
    /// under the row's lock (an epoch bump).
    pub async fn set_properties(
        &self,
        ident: &TableIdent,
        mut properties: impl FnMut(&TableMetadata) -> Result<HashMap<String, String>> + Send,
    ) -> Result<Table> {
        self.locked(ident, |table| {
            let props = properties(table.metadata())?;
            let location = table.metadata_location_result()?.to_string();
            Ok(table
                .metadata()
                .clone()
                .into_builder(Some(location))
                .set_properties(props)?
                .build()?
                .metadata)
        })
        .await
    }
}

/// Table `ident` as the metadata file at `location` describes it.
pub fn table_at(
    io: &FileIO,
    ident: &TableIdent,
    location: String,
    metadata: TableMetadata,
) -> Result<Table> {
    Table::builder()
        .file_io(io.clone())
        .metadata_location(location)
        .metadata(metadata)
        .identifier(ident.clone())
        .runtime(iceberg::Runtime::try_current()?)
        .build()
}

/// A new table `ident` of `schema` and `spec`, its files under
/// `warehouse/namespace/name`.
pub fn creation(
    warehouse: &str,
    ident: &TableIdent,
    schema: Schema,
    spec: UnboundPartitionSpec,
) -> TableCreation {
    TableCreation::builder()
        .name(ident.name().to_string())
        .location(format!(
            "{warehouse}/{}/{}",
            ident.namespace().join("/"),
            ident.name()
        ))
        .schema(schema)
        .partition_spec(spec)
        .build()
}
