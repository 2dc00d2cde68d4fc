//! A catalog on a server that takes commits under requirements: an
//! Iceberg REST catalog (the `iceberg-catalog-rest` client) or AWS Glue
//! (Glue's own API, see `glue.rs`).
//!
//! Such a catalog offers no lock: a commit carries requirements checked
//! against the table as it is when the commit lands (the table's main
//! branch still at the snapshot the commit was built on). A REST server
//! checks them; the Glue client checks them on the table it loads and
//! swaps the metadata pointer only if the table's Glue version is still
//! the one it loaded. Idem's guard runs on that snapshot's metadata
//! before the commit, so every change Idem's checks depend on must move
//! the branch: an epoch bump commits a snapshot of its own (no files, the
//! bump in its summary) with the new epoch, and a runner whose view
//! predates it finds its commit refused, reloads, and sees the newer
//! epoch.

use crate::error::IcebergError;
use crate::glue::{GlueAt, GlueCat};
use iceberg::io::FileIOBuilder;
use iceberg::spec::{Schema, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, Error, ErrorKind, NamespaceIdent, Result, TableIdent};
use iceberg_catalog_rest::RestCatalogBuilder;
use std::collections::HashMap;
use std::sync::Arc;

type Outcome<T> = std::result::Result<T, IcebergError>;

/// Which client a [`RemoteCat`] builds.
#[derive(Debug, Clone)]
pub enum Protocol {
    Rest,
    Glue(GlueAt),
}

pub struct RemoteCat {
    protocol: Protocol,
    /// Built on first use: the client takes the tokio runtime it runs in.
    client: tokio::sync::OnceCell<Box<dyn Catalog>>,
    props: HashMap<String, String>,
    /// The catalog, for messages: `REST catalog https://..`, `Glue catalog
    /// in us-east-1`.
    pub server: String,
    warehouse: String,
}

impl RemoteCat {
    /// `props`: the REST client's (`uri`, token, credential) and the
    /// warehouse's storage settings (`s3.endpoint`, ...).
    pub fn new(
        protocol: Protocol,
        server: String,
        props: HashMap<String, String>,
        warehouse: &str,
    ) -> Outcome<Self> {
        Ok(RemoteCat {
            protocol,
            client: tokio::sync::OnceCell::new(),
            props,
            server,
            warehouse: warehouse.trim_end_matches('/').to_string(),
        })
    }

    pub async fn inner(&self) -> Result<&dyn Catalog> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let factory =
                    Arc::new(iceberg_storage_opendal::OpenDalResolvingStorageFactory::new());
                let props = self.props.clone();
                Ok::<Box<dyn Catalog>, Error>(match &self.protocol {
                    Protocol::Rest => Box::new(
                        RestCatalogBuilder::default()
                            .with_storage_factory(factory)
                            .with_runtime(iceberg::Runtime::try_current()?)
                            .load("idem", props)
                            .await?,
                    ),
                    Protocol::Glue(at) => {
                        let io = FileIOBuilder::new(factory).with_props(props).build();
                        Box::new(GlueCat::connect(at, io).await)
                    }
                })
            })
            .await?;
        Ok(client.as_ref())
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
        let catalog = self.inner().await?;
        match catalog.load_table(ident).await {
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
