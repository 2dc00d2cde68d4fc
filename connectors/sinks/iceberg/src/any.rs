//! The catalog a sink commits through, SQL or remote (REST, Glue), and the
//! `iceberg::Catalog` its transactions commit through, with Idem's guard.

use crate::catalog::PgCatalog;
use crate::error::{unsupported, IcebergError};
use crate::remote::RemoteCat;
use iceberg::spec::{Schema, TableMetadata, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{
    Catalog, Error, ErrorKind, Namespace, NamespaceIdent, Result, TableCommit, TableCreation,
    TableIdent,
};
use std::collections::HashMap;

type Outcome<T> = std::result::Result<T, IcebergError>;

/// How many times a remote catalog's epoch bump is tried again after another
/// writer's commit moved the table under it.
const BUMP_TRIES: usize = 20;

/// The catalog a sink commits through: the SQL catalog in PostgreSQL
/// (commits under a row lock) or a remote one, REST or Glue (commits under
/// requirements, see `remote.rs`).
pub enum AnyCatalog {
    Sql(PgCatalog),
    Remote(Box<RemoteCat>),
}

impl AnyCatalog {
    /// The catalog's server, without credentials, for messages.
    pub fn server(&self) -> &str {
        match self {
            AnyCatalog::Sql(c) => &c.server,
            AnyCatalog::Remote(c) => &c.server,
        }
    }

    /// The namespace (and the SQL catalog's tables).
    pub async fn prepare(&self, namespace: &NamespaceIdent) -> Outcome<()> {
        match self {
            AnyCatalog::Sql(c) => c.prepare(namespace).await,
            AnyCatalog::Remote(c) => c.prepare(namespace).await.map_err(|e| {
                IcebergError::Setup(format!(
                    "{}: create namespace {}: {e}",
                    c.server,
                    namespace.join(".")
                ))
            }),
        }
    }

    pub async fn load(&self, ident: &TableIdent) -> Result<Option<Table>> {
        match self {
            AnyCatalog::Sql(c) => c.load(ident).await,
            AnyCatalog::Remote(c) => c.load(ident).await,
        }
    }

    pub async fn create(
        &self,
        ident: &TableIdent,
        schema: Schema,
        spec: UnboundPartitionSpec,
    ) -> Result<Table> {
        match self {
            AnyCatalog::Sql(c) => c.create(ident, schema, spec).await,
            AnyCatalog::Remote(c) => c.create(ident, schema, spec).await,
        }
    }

    /// Set properties computed from the current metadata (an epoch bump),
    /// with no other commit in between.
    pub async fn set_properties(
        &self,
        ident: &TableIdent,
        properties: impl FnMut(&TableMetadata) -> Result<HashMap<String, String>> + Send,
    ) -> Result<Table> {
        match self {
            AnyCatalog::Sql(c) => c.set_properties(ident, properties).await,
            AnyCatalog::Remote(c) => self.bump_remote(c, ident, properties).await,
        }
    }

    /// Set `properties` computed from the table as loaded, in a snapshot
    /// of their own (see `remote.rs`); computed again on the
    /// newer table when another commit came first.
    async fn bump_remote(
        &self,
        remote: &RemoteCat,
        ident: &TableIdent,
        mut properties: impl FnMut(&TableMetadata) -> Result<HashMap<String, String>> + Send,
    ) -> Result<Table> {
        let mut last = None;
        for _ in 0..BUMP_TRIES {
            let base = remote.load(ident).await?.ok_or_else(|| {
                Error::new(
                    ErrorKind::TableNotFound,
                    format!("table {ident} is not in the catalog"),
                )
            })?;
            let props = properties(base.metadata())?;
            let summary = HashMap::from([(
                "idem.fence".to_string(),
                props
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )]);
            let tx = Transaction::new(&base);
            let mut update = tx.update_table_properties();
            for (k, v) in props {
                update = update.set(k, v);
            }
            let tx = update.apply(tx)?;
            let tx = tx
                .fast_append()
                .set_snapshot_properties(summary)
                .apply(tx)?;
            let guarded = Guarded::new(self, |_: &TableMetadata| Ok(()), &base);
            match tx.commit(&guarded).await {
                Ok(t) => return Ok(t),
                Err(e) if e.kind() == ErrorKind::CatalogCommitConflicts => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Unexpected, "no try was made")))
    }
}

/// The catalog as iceberg's transactions see it for one commit, with
/// `guard` checked on the metadata the commit applies to. The SQL catalog
/// checks it on the current metadata under the row's lock. A remote catalog
/// checks it on `base`, the table the commit was built on, and the
/// commit's requirements make the server refuse it if the table moved
/// since: the transaction then gets no newer table to rebuild on (its
/// second load fails), and the sink checks again on a fresh load.
pub struct Guarded<'a, G> {
    catalog: &'a AnyCatalog,
    guard: G,
    base: Table,
    loaded: std::sync::atomic::AtomicBool,
}

impl<'a, G> Guarded<'a, G> {
    pub fn new(catalog: &'a AnyCatalog, guard: G, base: &Table) -> Self {
        Guarded {
            catalog,
            guard,
            base: base.clone(),
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl<G> std::fmt::Debug for Guarded<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.catalog.server())
    }
}

/// An error the transaction must not retry by itself: the commit may have
/// landed (a connection lost around it), or the table moved and Idem's
/// checks must run again. Conflicts under the SQL catalog's lock stay
/// retryable: nothing landed, and the guard runs again under the lock.
fn not_retried(e: Error) -> Error {
    e.with_retryable(false)
}

#[async_trait::async_trait]
impl<G: Fn(&TableMetadata) -> Result<()> + Send + Sync> Catalog for Guarded<'_, G> {
    async fn list_namespaces(&self, _: Option<&NamespaceIdent>) -> Result<Vec<NamespaceIdent>> {
        unsupported("list namespaces")
    }
    async fn create_namespace(
        &self,
        _: &NamespaceIdent,
        _: HashMap<String, String>,
    ) -> Result<Namespace> {
        unsupported("create namespaces this way")
    }
    async fn get_namespace(&self, _: &NamespaceIdent) -> Result<Namespace> {
        unsupported("read namespaces")
    }
    async fn namespace_exists(&self, _: &NamespaceIdent) -> Result<bool> {
        unsupported("read namespaces")
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
    async fn create_table(&self, _: &NamespaceIdent, _: TableCreation) -> Result<Table> {
        unsupported("create tables this way")
    }
    async fn load_table(&self, table: &TableIdent) -> Result<Table> {
        if let AnyCatalog::Remote(_) = self.catalog {
            if self.loaded.swap(true, std::sync::atomic::Ordering::Relaxed) {
                return Err(not_retried(Error::new(
                    ErrorKind::CatalogCommitConflicts,
                    format!("table {table} moved since Idem checked it"),
                )));
            }
            return Ok(self.base.clone());
        }
        self.catalog.load(table).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::TableNotFound,
                format!("table {table} is not in the catalog"),
            )
        })
    }
    async fn drop_table(&self, _: &TableIdent) -> Result<()> {
        unsupported("drop tables")
    }
    async fn purge_table(&self, _: &TableIdent) -> Result<()> {
        unsupported("purge tables")
    }
    async fn table_exists(&self, table: &TableIdent) -> Result<bool> {
        Ok(self.catalog.load(table).await?.is_some())
    }
    async fn rename_table(&self, _: &TableIdent, _: &TableIdent) -> Result<()> {
        unsupported("rename tables")
    }
    async fn register_table(&self, _: &TableIdent, _: String) -> Result<Table> {
        unsupported("register tables")
    }
    async fn update_table(&self, commit: TableCommit) -> Result<Table> {
        let ident = commit.identifier().clone();
        match self.catalog {
            AnyCatalog::Sql(c) => c
                .locked(&ident, |table| {
                    (self.guard)(table.metadata())?;
                    Ok(commit.apply(table.clone())?.metadata().clone())
                })
                .await
                // The transaction retries a retryable error by adding the
                // same files to the table as it is then. A connection lost
                // around COMMIT may have committed them, and the append
                // would refuse them before the guard could say so: such an
                // error goes back to the sink, which checks the position
                // first.
                .map_err(|e| {
                    if e.kind() == ErrorKind::CatalogCommitConflicts {
                        e
                    } else {
                        not_retried(e)
                    }
                }),
            AnyCatalog::Remote(c) => {
                (self.guard)(self.base.metadata())?;
                c.inner()
                    .await?
                    .update_table(commit)
                    .await
                    .map_err(not_retried)
            }
        }
    }
}
