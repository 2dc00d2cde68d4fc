//! AWS Glue's Data Catalog as an `iceberg::Catalog`, over Glue's own API
//! (`aws-sdk-glue`): a Glue database per namespace, a Glue table per
//! Iceberg table whose `metadata_location` parameter points at its
//! current metadata file, as Iceberg's Java `GlueCatalog`, Athena and
//! PyIceberg keep them.
//!
//! A commit loads the table with its Glue version, checks the commit's
//! requirements on it, writes the next metadata file and moves the
//! pointer with `UpdateTable` naming that version: Glue refuses it if
//! another writer's update came in between.
//!
//! Written here rather than taken from `iceberg-catalog-glue`, whose
//! 0.10 release refuses tables with `timestamptz` columns (Glue's column
//! list has no such type; Iceberg's Java catalog lists them as
//! `timestamp`, as this one does).

use crate::error::unsupported;
use iceberg::io::FileIO;
use iceberg::spec::{PrimitiveType, TableMetadata, TableMetadataBuilder, Type};
use iceberg::table::Table;
use iceberg::{
    Catalog, Error, ErrorKind, MetadataLocation, Namespace, NamespaceIdent, Result, TableCommit,
    TableCreation, TableIdent,
};
use std::collections::HashMap;
use std::str::FromStr;

use aws_sdk_glue::types::{Column, DatabaseInput, StorageDescriptor, TableInput};

/// Where a Glue table keeps its Iceberg metadata pointer.
const METADATA_LOCATION: &str = "metadata_location";
const PREVIOUS_METADATA_LOCATION: &str = "previous_metadata_location";

/// Which Glue catalog, and through which endpoint.
#[derive(Debug, Clone, Default)]
pub struct GlueAt {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint: Option<String>,
    /// Another account's catalog.
    pub catalog_id: Option<String>,
}

#[derive(Debug)]
pub struct GlueCat {
    client: aws_sdk_glue::Client,
    catalog_id: Option<String>,
    io: FileIO,
}

/// An AWS call that failed, as iceberg's error; retryable unless Glue
/// answered with a refusal of its own.
fn aws<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    e: aws_sdk_glue::error::SdkError<E>,
) -> Error {
    let answered = matches!(e, aws_sdk_glue::error::SdkError::ServiceError(_));
    Error::new(ErrorKind::Unexpected, format!("glue: {what}"))
        .with_source(e)
        .with_retryable(!answered)
}

fn database(namespace: &NamespaceIdent) -> Result<String> {
    match namespace.as_ref().as_slice() {
        [db] => Ok(db.clone()),
        _ => Err(Error::new(
            ErrorKind::DataInvalid,
            format!(
                "a Glue namespace is one database, not `{}`",
                namespace.join(".")
            ),
        )),
    }
}

fn built<T>(what: &str, r: std::result::Result<T, aws_sdk_glue::error::BuildError>) -> Result<T> {
    r.map_err(|e| Error::new(ErrorKind::Unexpected, format!("glue: {what}: {e}")))
}

/// Glue's (Hive's) name for a column type, for engines that list a Glue
/// table's columns; Iceberg readers take the schema from the metadata.
fn hive_type(t: &Type) -> String {
    match t {
        Type::Primitive(p) => match p {
            PrimitiveType::Boolean => "boolean".into(),
            PrimitiveType::Int => "int".into(),
            PrimitiveType::Long => "bigint".into(),
            PrimitiveType::Float => "float".into(),
            PrimitiveType::Double => "double".into(),
            PrimitiveType::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            PrimitiveType::Date => "date".into(),
            PrimitiveType::Timestamp
            | PrimitiveType::Timestamptz
            | PrimitiveType::TimestampNs
            | PrimitiveType::TimestamptzNs => "timestamp".into(),
            PrimitiveType::Binary | PrimitiveType::Fixed(_) => "binary".into(),
            PrimitiveType::Time | PrimitiveType::String | PrimitiveType::Uuid => "string".into(),
        },
        // Idem's tables hold primitive columns only; anything else is
        // listed loosely, the metadata being what readers go by.
        _ => "string".into(),
    }
}

impl GlueCat {
    /// A client of the catalog `at` says, credentials from the usual AWS
    /// chain; `io` reads and writes the tables' metadata files.
    pub async fn connect(at: &GlueAt, io: FileIO) -> GlueCat {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &at.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(p) = &at.profile {
            loader = loader.profile_name(p);
        }
        if let Some(e) = &at.endpoint {
            loader = loader.endpoint_url(e);
        }
        GlueCat {
            client: aws_sdk_glue::Client::new(&loader.load().await),
            catalog_id: at.catalog_id.clone(),
            io,
        }
    }

    fn table_of(
        &self,
        ident: &TableIdent,
        location: String,
        metadata: TableMetadata,
    ) -> Result<Table> {
        crate::catalog::table_at(&self.io, ident, location, metadata)
    }

    /// The table's metadata location and Glue version, `None` if Glue has
    /// no such table.
    async fn pointer(&self, ident: &TableIdent) -> Result<Option<(String, Option<String>)>> {
        let got = self
            .client
            .get_table()
            .set_catalog_id(self.catalog_id.clone())
            .database_name(database(ident.namespace())?)
            .name(ident.name())
            .send()
            .await;
        let out = match got {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_entity_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(aws(&format!("read table {ident}"), e)),
        };
        let table = out.table();
        let location = table
            .and_then(|t| t.parameters())
            .and_then(|p| p.get(METADATA_LOCATION))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::DataInvalid,
                    format!("Glue table {ident} is not an Iceberg table (no {METADATA_LOCATION})"),
                )
            })?;
        Ok(Some((
            location.clone(),
            table.and_then(|t| t.version_id()).map(str::to_string),
        )))
    }

    fn table_input(
        &self,
        ident: &TableIdent,
        location: &str,
        previous: Option<&str>,
        metadata: &TableMetadata,
    ) -> Result<TableInput> {
        let columns = metadata
            .current_schema()
            .as_struct()
            .fields()
            .iter()
            .map(|f| {
                built(
                    "describe a column",
                    Column::builder()
                        .name(f.name.clone())
                        .r#type(hive_type(&f.field_type))
                        .build(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut input = TableInput::builder()
            .name(ident.name())
            .table_type("EXTERNAL_TABLE")
            .parameters("table_type", "ICEBERG")
            .parameters(METADATA_LOCATION, location)
            .storage_descriptor(
                StorageDescriptor::builder()
                    .location(metadata.location())
                    .set_columns(Some(columns))
                    .build(),
            );
        if let Some(p) = previous {
            input = input.parameters(PREVIOUS_METADATA_LOCATION, p);
        }
        built("describe the table", input.build())
    }
}

#[async_trait::async_trait]
impl Catalog for GlueCat {
    async fn list_namespaces(&self, _: Option<&NamespaceIdent>) -> Result<Vec<NamespaceIdent>> {
        unsupported("list namespaces")
    }

    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        _: HashMap<String, String>,
    ) -> Result<Namespace> {
        let input = built(
            "describe the database",
            DatabaseInput::builder().name(database(namespace)?).build(),
        )?;
        let made = self
            .client
            .create_database()
            .set_catalog_id(self.catalog_id.clone())
            .database_input(input)
            .send()
            .await;
        match made {
            Ok(_) => Ok(Namespace::new(namespace.clone())),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_already_exists_exception()) =>
            {
                Err(Error::new(
                    ErrorKind::NamespaceAlreadyExists,
                    format!("{} exists", namespace.join(".")),
                ))
            }
            Err(e) => Err(aws(&format!("create database {}", namespace.join(".")), e)),
        }
    }

    async fn get_namespace(&self, _: &NamespaceIdent) -> Result<Namespace> {
        unsupported("read namespaces")
    }

    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> Result<bool> {
        let got = self
            .client
            .get_database()
            .set_catalog_id(self.catalog_id.clone())
            .name(database(namespace)?)
            .send()
            .await;
        match got {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_entity_not_found_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(aws(&format!("read database {}", namespace.join(".")), e)),
        }
    }

    async fn update_namespace(&self, _: &NamespaceIdent, _: HashMap<String, String>) -> Result<()> {
        unsupported("change namespaces")
    }

    async fn drop_namespace(&self, _: &NamespaceIdent) -> Result<()> {
        unsupported("drop namespaces")
    }

    async fn list_tables(&self, _: &NamespaceIdent) -> Result<Vec<TableIdent>> {
        unsupported("list tables")
    }

    /// Writes the first metadata file, then registers the table; if
    /// another runner registered it first, that one is the table.
    async fn create_table(
        &self,
        namespace: &NamespaceIdent,
        creation: TableCreation,
    ) -> Result<Table> {
        let ident = TableIdent::new(namespace.clone(), creation.name.clone());
        let location = creation.location.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::DataInvalid,
                format!("table {ident} has no location"),
            )
        })?;
        let metadata = TableMetadataBuilder::from_table_creation(creation)?
            .build()?
            .metadata;
        let at = MetadataLocation::new_with_metadata(&location, &metadata);
        metadata.write_to(&self.io, &at).await?;
        let at = at.to_string();
        let input = self.table_input(&ident, &at, None, &metadata)?;
        let made = self
            .client
            .create_table()
            .set_catalog_id(self.catalog_id.clone())
            .database_name(database(namespace)?)
            .table_input(input)
            .send()
            .await;
        match made {
            Ok(_) => self.table_of(&ident, at, metadata),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_already_exists_exception()) =>
            {
                // This metadata file is unused.
                let _ = self.io.delete(&at).await;
                Err(Error::new(
                    ErrorKind::TableAlreadyExists,
                    format!("table {ident} exists"),
                ))
            }
            Err(e) => Err(aws(&format!("create table {ident}"), e)),
        }
    }

    async fn load_table(&self, ident: &TableIdent) -> Result<Table> {
        let Some((location, _)) = self.pointer(ident).await? else {
            return Err(Error::new(
                ErrorKind::TableNotFound,
                format!("table {ident} is not in Glue"),
            ));
        };
        let metadata = TableMetadata::read_from(&self.io, &location).await?;
        self.table_of(ident, location, metadata)
    }

    async fn drop_table(&self, _: &TableIdent) -> Result<()> {
        unsupported("drop tables")
    }

    async fn purge_table(&self, _: &TableIdent) -> Result<()> {
        unsupported("purge tables")
    }

    async fn table_exists(&self, ident: &TableIdent) -> Result<bool> {
        Ok(self.pointer(ident).await?.is_some())
    }

    async fn rename_table(&self, _: &TableIdent, _: &TableIdent) -> Result<()> {
        unsupported("rename tables")
    }

    async fn register_table(&self, _: &TableIdent, _: String) -> Result<Table> {
        unsupported("register tables")
    }

    async fn update_table(&self, commit: TableCommit) -> Result<Table> {
        let ident = commit.identifier().clone();
        let Some((current, version)) = self.pointer(&ident).await? else {
            return Err(Error::new(
                ErrorKind::TableNotFound,
                format!("table {ident} is not in Glue"),
            ));
        };
        let metadata = TableMetadata::read_from(&self.io, &current).await?;
        // The requirements are checked on the table as it is now.
        let next = commit.apply(self.table_of(&ident, current.clone(), metadata)?)?;
        let at = MetadataLocation::from_str(next.metadata_location_result()?)?;
        next.metadata().write_to(&self.io, &at).await?;
        let at = at.to_string();
        let input = self.table_input(&ident, &at, Some(&current), next.metadata())?;
        // Only if nobody moved the pointer since it was read.
        let moved = self
            .client
            .update_table()
            .set_catalog_id(self.catalog_id.clone())
            .database_name(database(ident.namespace())?)
            .set_version_id(version)
            .skip_archive(true)
            .table_input(input)
            .send()
            .await;
        match moved {
            Ok(_) => Ok(next),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_concurrent_modification_exception()) =>
            {
                Err(Error::new(
                    ErrorKind::CatalogCommitConflicts,
                    format!("table {ident} moved while this commit was made"),
                ))
            }
            Err(e) => Err(aws(&format!("move table {ident}'s metadata pointer"), e)),
        }
    }
}
