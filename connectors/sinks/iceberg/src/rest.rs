//! An Iceberg REST catalog, through the `iceberg-catalog-rest` client.
//!
//! A REST catalog offers no lock: a commit carries requirements the server
//! checks (the table's main branch still at the snapshot the commit was
//! built on). Idem's guard runs on that snapshot's metadata before the
//! commit, so every change Idem's checks depend on must move the branch:
//! an epoch bump commits a snapshot of its own (no files, the bump in its
//! summary) with the new epoch, and a runner whose view predates it finds
//! its commit refused, reloads, and sees the newer epoch.

use crate::error::IcebergError;
use iceberg::spec::{Schema, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, Error, ErrorKind, NamespaceIdent, Result, TableIdent};
use iceberg_catalog_rest::{RestCatalog, RestCatalogBuilder};
use std::collections::HashMap;
use std::sync::Arc;

type Outcome<T> = std::result::Result<T, IcebergError>;

pub struct RestCat {
    /// Built on first use: the client takes the tokio runtime it runs in.
    client: tokio::sync::OnceCell<RestCatalog>,
    props: HashMap<String, String>,
    /// The catalog's URI, for messages.
    pub server: String,
    warehouse: String,
}

impl RestCat {
    /// `props`: the REST client's (token, credential, ...) and the
    /// warehouse's storage settings (`s3.endpoint`, ...).
    pub fn new(uri: &str, props: HashMap<String, String>, warehouse: &str) -> Outcome<Self> {
        let mut props = props;
        props.insert("uri".into(), uri.to_string());
        Ok(RestCat {
            client: tokio::sync::OnceCell::new(),
            props,
            server: idem_config::redact::text(uri).into_owned(),
            warehouse: warehouse.trim_end_matches('/').to_string(),
        })
    }

    pub async fn inner(&self) -> Result<&RestCatalog> {
        self.client
            .get_or_try_init(|| async {
                let factory = iceberg_storage_opendal::OpenDalResolvingStorageFactory::new();
                RestCatalogBuilder::default()
                    .with_storage_factory(Arc::new(factory))
                    .with_runtime(iceberg::Runtime::try_current()?)
                    .load("idem", self.props.clone())
                    .await
            })
            .await
    }

    pub async fn prepare(&self, namespace: &NamespaceIdent) -> Result<()> {
        if self.inner().await?.namespace_exists(namespace).await? {
            return Ok(());
        }
        match self
            .inner()
            .await?
            .create_namespace(namespace, HashMap::new())
            .await
        {
            Err(e) if e.kind() != ErrorKind::NamespaceAlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    pub async fn load(&self, ident: &TableIdent) -> Result<Option<Table>> {
        match self.inner().await?.load_table(ident).await {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == ErrorKind::TableNotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create(
        &self,
        ident: &TableIdent,
        schema: Schema,
        spec: UnboundPartitionSpec,
    ) -> Result<Table> {
        let creation = crate::catalog::creation(&self.warehouse, ident, schema, spec);
        match self
            .inner()
            .await?
            .create_table(ident.namespace(), creation)
            .await
        {
            // Another runner's table won.
            Err(e) if e.kind() == ErrorKind::TableAlreadyExists => {
                self.load(ident).await?.ok_or_else(|| {
                    Error::new(ErrorKind::Unexpected, format!("table {ident} vanished"))
                })
            }
            other => other,
        }
    }
}
