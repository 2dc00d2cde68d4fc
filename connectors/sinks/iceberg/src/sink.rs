//! The Iceberg sink: each batch becomes Parquet data files and one catalog
//! commit that adds them in a snapshot and moves the partition's position
//! in the table's properties, under the catalog row's lock.
//!
//! Positions and epochs live in the table's properties (one key each per
//! partition), not in snapshot summaries: properties survive snapshot
//! expiry and compaction, which write snapshots without Idem's summary.

use crate::any::{AnyCatalog, Guarded};
use crate::catalog::PgCatalog;
use crate::config::{CatalogConfig, IcebergSinkConfig};
use crate::error::IcebergError;
use crate::glue::GlueAt;
use crate::remote::{Protocol, RemoteCat};
use crate::{leftovers, partition, schema};
use arrow::array::{Array, Int64Array, StringArray};
use arrow::datatypes::Schema as ArrowSchema;
use async_trait::async_trait;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::io::{FileIO, FileIOBuilder};
use iceberg::spec::{DataFile, DataFileFormat, TableMetadata};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{NamespaceIdent, TableIdent};
use idem_config::{ColumnConfig, Guarantee};
use idem_core::failpoint::{self, AFTER_WRITE, BEFORE_CATALOG_COMMIT, MID_WRITE};
use idem_core::table::offsets::{self, Unmoved};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, RowPositions, Sink, SinkError, SinkInfo,
    StoredPosition,
};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A partition's position as its property holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    source: String,
    partition: String,
    next_offset: u64,
    /// The epoch of the runner that wrote it.
    epoch: i64,
}

/// How many times a commit is built again after another writer's commit
/// came first, before the runner's own retries take over.
const MAX_CONFLICTS: u32 = 20;

fn epoch_key(p: &PartitionRef) -> String {
    format!("idem.epoch/{}/{}/{}", p.connector, p.source, p.partition)
}

fn position_prefix(connector: &str) -> String {
    format!("idem.position/{connector}/")
}

fn position_key(p: &PartitionRef) -> String {
    format!(
        "{}{}/{}",
        position_prefix(&p.connector),
        p.source,
        p.partition
    )
}

pub struct IcebergSink {
    cfg: IcebergSinkConfig,
    columns: Vec<ColumnConfig>,
    catalog: AnyCatalog,
    ident: TableIdent,
    /// `namespace.table in catalog ..`, for messages.
    shown: String,
    /// One catalog commit at a time from this runner: partitions that
    /// commit side by side would otherwise each find the table's snapshot
    /// moved by the other between reading it and committing, and retry.
    committing: tokio::sync::Mutex<()>,
    /// The partitions this runner writes, by `PartitionRef`'s text.
    parts: Mutex<HashMap<String, Part>>,
}

impl IcebergSink {
    pub fn new(cfg: IcebergSinkConfig, columns: Vec<ColumnConfig>) -> Result<Self, IcebergError> {
        let (catalog, shown) = match &cfg.catalog {
            CatalogConfig::Sql {
                url,
                name,
                idle_in_transaction_timeout,
            } => {
                let c = PgCatalog::new(
                    url,
                    name,
                    file_io(&cfg)?,
                    &cfg.warehouse,
                    *idle_in_transaction_timeout,
                )?;
                let shown = format!("in catalog `{name}` on {}", c.server);
                (AnyCatalog::Sql(c), shown)
            }
            CatalogConfig::Rest {
                uri,
                warehouse,
                token,
                credential,
                properties,
            } => {
                let mut props: HashMap<String, String> = io_props(&cfg).into_iter().collect();
                props.extend(
                    properties
                        .iter()
                        .map(|(k, v)| (k.clone(), v.expose().to_string())),
                );
                if let Some(w) = warehouse {
                    props.insert("warehouse".into(), w.clone());
                }
                for (key, secret) in [("token", token), ("credential", credential)] {
                    if let Some(s) = secret {
                        props.insert(key.into(), s.expose().to_string());
                    }
                }
                // Never printed, should the client quote them in an error.
                for (k, v) in &props {
                    if ["token", "credential", "secret", "password", "api-key"]
                        .iter()
                        .any(|s| k.contains(s))
                    {
                        idem_config::redact::register(v);
                    }
                }
                props.insert("uri".into(), uri.clone());
                let server = format!("REST catalog {}", idem_config::redact::text(uri));
                let c = RemoteCat::new(Protocol::Rest, server, props, &cfg.warehouse)?;
                let shown = format!("in {}", c.server);
                (AnyCatalog::Remote(Box::new(c)), shown)
            }
            CatalogConfig::Glue {
                region,
                catalog_id,
                profile,
                endpoint,
            } => {
                let mut props: HashMap<String, String> = io_props(&cfg).into_iter().collect();
                // The data files live in the catalog's region unless the
                // warehouse's store says otherwise.
                if let (Some(r), None) = (region, &cfg.s3_region) {
                    props.insert(iceberg::io::S3_REGION.into(), r.clone());
                }
                let mut server = "Glue catalog".to_string();
                if let Some(id) = catalog_id {
                    server.push_str(&format!(" {id}"));
                }
                if let Some(r) = region {
                    server.push_str(&format!(" in {r}"));
                }
                if let Some(e) = endpoint {
                    server.push_str(&format!(" at {e}"));
                }
                let at = GlueAt {
                    region: region.clone(),
                    profile: profile.clone(),
                    endpoint: endpoint.clone(),
                    catalog_id: catalog_id.clone(),
                };
                let c = RemoteCat::new(Protocol::Glue(at), server, props, &cfg.warehouse)?;
                let shown = format!("in {}", c.server);
                (AnyCatalog::Remote(Box::new(c)), shown)
            }
        };
        let namespace = NamespaceIdent::from_strs(cfg.namespace.split('.'))
            .map_err(|e| IcebergError::Setup(format!("namespace `{}`: {e}", cfg.namespace)))?;
        let ident = TableIdent::new(namespace, cfg.table.clone());
        let shown = format!("{}.{} {shown}", cfg.namespace, cfg.table);
        Ok(IcebergSink {
            cfg,
            columns,
            catalog,
            ident,
            shown,
            committing: tokio::sync::Mutex::new(()),
            parts: Mutex::new(HashMap::new()),
        })
    }

    fn table_error(&self, what: &str, e: iceberg::Error) -> IcebergError {
        IcebergError::Table {
            table: self.shown.clone(),
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    async fn table(&self) -> Result<Table, IcebergError> {
        self.catalog
            .load(&self.ident)
            .await
            .map_err(|e| self.table_error("load", e))?
            .ok_or_else(|| IcebergError::MissingTable {
                table: self.shown.clone(),
            })
    }

    /// What the table's properties hold for `p`: (epoch, next offset).
    fn stored(
        &self,
        m: &TableMetadata,
        p: &PartitionRef,
    ) -> Result<Option<(i64, Option<i64>)>, IcebergError> {
        let props = m.properties();
        let Some(epoch) = props.get(&epoch_key(p)) else {
            return Ok(None);
        };
        let bad = |key: String, value: &str, why: String| IcebergError::BadProperty {
            table: self.shown.clone(),
            key,
            value: value.to_string(),
            why,
        };
        let epoch: i64 = epoch
            .parse()
            .map_err(|e: std::num::ParseIntError| bad(epoch_key(p), epoch, e.to_string()))?;
        let next = match props.get(&position_key(p)) {
            None => None,
            Some(v) => {
                let pos: Position =
                    serde_json::from_str(v).map_err(|e| bad(position_key(p), v, e.to_string()))?;
                Some(idem_core::table::sql::offset_to_sql(pos.next_offset))
            }
        };
        Ok(Some((epoch, next)))
    }

    /// Parquet data files of `batch`, written under the table's data
    /// location. Named by partition, first offset and epoch, plus a unique
    /// suffix: a retry writes new files, and only the committed ones count.
    async fn write_files(
        &self,
        table: &Table,
        batch: &Batch,
    ) -> Result<Vec<iceberg::spec::DataFile>, IcebergError> {
        let m = table.metadata();
        let arrow: Arc<ArrowSchema> = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(m.current_schema())
                .map_err(|e| self.table_error("read the schema as Arrow", e))?,
        );
        let records: Vec<&idem_core::Record> = batch.records.iter().collect();
        let rb = schema::record_batch(&arrow, &self.columns, &batch.partition.partition, &records)
            .map_err(|detail| IcebergError::Encode {
                table: self.shown.clone(),
                detail,
            })?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let locations = DefaultLocationGenerator::new(m)
            .map_err(|e| self.table_error("place data files", e))?;
        let safe: String = batch
            .partition
            .partition
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let names = DefaultFileNameGenerator::new(
            format!("idem-{safe}-{:020}-{}", batch.first_offset, batch.epoch),
            Some(uuid_suffix()),
            DataFileFormat::Parquet,
        );
        let rolling = RollingFileWriterBuilder::new_with_default_file_size(
            ParquetWriterBuilder::new(props, m.current_schema().clone()),
            table.file_io().clone(),
            locations,
            names,
        );
        // A partitioned table takes a file (or more) per partition value.
        let spec = m.default_partition_spec();
        let pieces = if spec.is_unpartitioned() {
            vec![(None, rb)]
        } else {
            RecordBatchPartitionSplitter::try_new_with_computed_values(
                m.current_schema().clone(),
                spec.clone(),
            )
            .and_then(|s| s.split(&rb))
            .map_err(|e| self.table_error("split a batch by the partition spec", e))?
            .into_iter()
            .map(|(key, piece)| (Some(key), piece))
            .collect()
        };
        let builder = DataFileWriterBuilder::new(rolling);
        let mut files = Vec::new();
        for (i, (key, piece)) in pieces.into_iter().enumerate() {
            let mut writer = builder
                .build(key)
                .await
                .map_err(|e| self.table_error("open a data file", e))?;
            writer
                .write(piece)
                .await
                .map_err(|e| self.table_error("write a data file", e))?;
            if i == 0 {
                // The rows are buffered or partly uploaded, the file not
                // complete.
                failpoint::hit(MID_WRITE);
            }
            files.extend(
                writer
                    .close()
                    .await
                    .map_err(|e| self.table_error("close a data file", e))?,
            );
        }
        Ok(files)
    }
}

impl IcebergSink {
    /// Write `batch`'s data files and stage them for its partition.
    async fn stage(&self, batch: &Batch) -> Result<(), SinkError> {
        let files = if batch.records.is_empty() {
            Vec::new()
        } else {
            let table = self.table().await?;
            self.write_files(&table, batch).await?
        };
        let p = &batch.partition;
        let mut parts = self.lock_parts();
        let part = parts.entry(p.to_string()).or_insert_with(|| Part::new(p));
        // The partition was opened again since this batch was read.
        if batch.epoch < part.epoch {
            return Err(fenced(batch));
        }
        if batch.epoch > part.epoch {
            part.epoch = batch.epoch;
            part.staged = None;
        }
        let staged = part.staged.get_or_insert_with(|| Staged {
            epoch: batch.epoch,
            from: batch.first_offset,
            through: batch.first_offset,
            files: Vec::new(),
        });
        staged.files.extend(files);
        staged.through = batch.next_offset;
        Ok(())
    }
}

fn uuid_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}

/// The warehouse's files: `s3://` through the S3 settings (credentials
/// from the usual AWS variables), `file://` on the local disk.
fn file_io(cfg: &IcebergSinkConfig) -> Result<FileIO, IcebergError> {
    let factory = iceberg_storage_opendal::OpenDalResolvingStorageFactory::new();
    Ok(FileIOBuilder::new(Arc::new(factory))
        .with_props(io_props(cfg))
        .build())
}

/// The warehouse's storage settings, as iceberg's FileIO names them.
fn io_props(cfg: &IcebergSinkConfig) -> Vec<(String, String)> {
    use iceberg::io::{
        S3_ACCESS_KEY_ID, S3_ENDPOINT, S3_PATH_STYLE_ACCESS, S3_REGION, S3_SECRET_ACCESS_KEY,
        S3_SESSION_TOKEN,
    };
    let mut props: Vec<(String, String)> = Vec::new();
    if cfg.warehouse.starts_with("s3://") {
        if let Some(e) = &cfg.s3_endpoint {
            props.push((S3_ENDPOINT.into(), e.clone()));
        }
        let region = cfg
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        props.push((S3_REGION.into(), region));
        if cfg.s3_path_style {
            props.push((S3_PATH_STYLE_ACCESS.into(), "true".into()));
        }
        for (var, key) in [
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY),
            ("AWS_SESSION_TOKEN", S3_SESSION_TOKEN),
        ] {
            if let Ok(v) = std::env::var(var) {
                props.push((key.into(), v));
            }
        }
    }
    props
}

#[async_trait]
impl Sink for IcebergSink {
    fn info(&self) -> SinkInfo {
        SinkInfo {
            guarantee: Guarantee::ExactlyOnce,
            why: format!(
                "each batch's data files and its partition's next offset are committed to {} in one catalog commit, made {} only while the runner's epoch owns the partition; a retried commit that finds its own position there appends nothing",
                self.shown,
                match self.catalog {
                    AnyCatalog::Sql(_) => "under the catalog row's lock",
                    AnyCatalog::Remote(_) => "on the condition that the table has not moved since the runner checked it (every epoch bump moves it)",
                }
            ),
            key_columns: Vec::new(),
            deletes: false,
            rows: idem_core::RowShape::append(),
            adds_columns: None,
            ids_table: None,
        }
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        self.catalog.prepare(self.ident.namespace()).await?;
        let table = match self
            .catalog
            .load(&self.ident)
            .await
            .map_err(|e| self.table_error("load", e))?
        {
            Some(t) => t,
            None if self.cfg.create => {
                let s = schema::table_schema(&self.columns)
                    .map_err(|e| self.table_error("make the schema", e))?;
                let fields = self.cfg.partition_fields().map_err(IcebergError::Setup)?;
                let spec = partition::spec(&s, &fields).map_err(IcebergError::Setup)?;
                self.catalog
                    .create(&self.ident, s, spec)
                    .await
                    .map_err(|e| self.table_error("create", e))?
            }
            None => {
                return Err(IcebergError::MissingTable {
                    table: self.shown.clone(),
                }
                .into())
            }
        };
        let m = table.metadata();
        if let Some(detail) = schema::mismatch(m.current_schema(), &self.columns) {
            return Err(IcebergError::SchemaMismatch {
                table: self.shown.clone(),
                detail,
            }
            .into());
        }
        let spec = partition::of_table(m.default_partition_spec(), m.current_schema());
        let configured = self.cfg.partition_fields().map_err(IcebergError::Setup)?;
        if let Some(detail) = partition::mismatch(&spec, &configured) {
            return Err(IcebergError::SchemaMismatch {
                table: self.shown.clone(),
                detail,
            }
            .into());
        }
        Ok(())
    }

    async fn open(&self, p: &PartitionRef) -> Result<Opened, SinkError> {
        let key = epoch_key(p);
        let mut bumped = None;
        let table = self
            .catalog
            .set_properties(&self.ident, |m| {
                let now = match m.properties().get(&key) {
                    None => 0,
                    Some(v) => v.parse::<i64>().map_err(|e| {
                        iceberg::Error::new(
                            iceberg::ErrorKind::DataInvalid,
                            format!("property `{key}` holds `{v}`, not an epoch: {e}"),
                        )
                    })?,
                };
                bumped = Some(now + 1);
                Ok(HashMap::from([(key.clone(), (now + 1).to_string())]))
            })
            .await
            .map_err(|e| self.table_error(&format!("fence partition {p}"), e))?;
        let epoch = bumped.unwrap_or(1);
        let next = self
            .stored(table.metadata(), p)?
            .and_then(|(_, n)| n)
            .map(idem_core::table::sql::offset_from_sql);
        // Whatever an earlier epoch staged here is the new one's to redo.
        self.lock_parts().insert(
            p.to_string(),
            Part {
                epoch,
                durable: next,
                ..Part::new(p)
            },
        );
        Ok(Opened {
            epoch,
            next_offset: next,
        })
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let p = &batch.partition;
        let key = p.to_string();
        let total = batch.records.len() as u64;
        let per_batch = self.cfg.commit_interval.is_zero();
        // Staged already: a retry, after its commit failed (a snapshot per
        // batch) or not (staging).
        let mut staged_already = false;
        {
            let parts = self.lock_parts();
            if let Some(part) = parts.get(&key) {
                if part.fenced {
                    return Err(fenced(&batch));
                }
                let staged = part.staged.as_ref().map(|s| s.through);
                staged_already = staged.is_some_and(|t| batch.next_offset <= t);
                if staged_already && !per_batch {
                    return Ok(CommitStats {
                        deduplicated: total,
                        durable_through: part.durable,
                        ..Default::default()
                    });
                }
                // Committed already: a retry after the answer to its
                // commit was lost.
                if batch.attempt > 0 && staged.is_none() && part.durable == Some(batch.next_offset)
                {
                    return Ok(offsets::committed_before(&batch));
                }
            }
        }
        if !staged_already {
            self.stage(&batch).await?;
        }
        if batch.attempt > 0 {
            // A retry: what it staged may have been committed by the try
            // whose answer was lost.
            if let Some(part) = self.lock_parts().get_mut(&key) {
                part.tried = true;
            }
        }
        if !per_batch {
            let parts = self.lock_parts();
            let durable = parts
                .get(&key)
                .and_then(|part| part.durable.or(part.staged.as_ref().map(|s| s.from)));
            return Ok(CommitStats {
                written: total,
                durable_through: Some(durable.unwrap_or(batch.first_offset)),
                ..Default::default()
            });
        }
        self.commit_staged().await?;
        let parts = self.lock_parts();
        match parts.get(&key) {
            Some(part) if part.fenced => Err(fenced(&batch)),
            _ => Ok(CommitStats {
                written: total,
                ..Default::default()
            }),
        }
    }

    fn stage_for(&self) -> Option<std::time::Duration> {
        (!self.cfg.commit_interval.is_zero()).then_some(self.cfg.commit_interval)
    }

    async fn flush_staged(&self, p: &PartitionRef) -> Result<Option<u64>, SinkError> {
        let key = p.to_string();
        let staged = {
            let parts = self.lock_parts();
            parts.get(&key).is_some_and(|part| part.staged.is_some())
        };
        if staged {
            self.commit_staged().await?;
        }
        let parts = self.lock_parts();
        match parts.get(&key) {
            Some(part) if part.fenced => Err(SinkError::Fenced {
                partition: key,
                epoch: part.epoch,
            }),
            Some(part) => Ok(part.durable),
            None => Ok(None),
        }
    }

    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        let table = self.table().await?;
        let prefix = position_prefix(connector);
        let mut out = Vec::new();
        for (key, value) in table.metadata().properties() {
            if !key.starts_with(&prefix) {
                continue;
            }
            let pos: Position =
                serde_json::from_str(value).map_err(|e| IcebergError::BadProperty {
                    table: self.shown.clone(),
                    key: key.clone(),
                    value: value.clone(),
                    why: e.to_string(),
                })?;
            let p = PartitionRef::new(connector, &pos.source, &pos.partition);
            let epoch = self
                .stored(table.metadata(), &p)?
                .map_or(pos.epoch, |(e, _)| e);
            out.push(StoredPosition {
                source: pos.source,
                partition: pos.partition,
                next_offset: Some(pos.next_offset),
                epoch,
            });
        }
        out.sort_by(|a, b| (&a.source, &a.partition).cmp(&(&b.source, &b.partition)));
        Ok(out)
    }

    async fn row_positions(&self) -> Result<Option<RowPositions>, SinkError> {
        use futures_util::TryStreamExt;
        let table = self.table().await?;
        let mut out = RowPositions::default();
        if table.metadata().current_snapshot().is_none() {
            return Ok(Some(out));
        }
        // The current snapshot's data files, two columns of each, one
        // record batch at a time.
        let scan = table
            .scan()
            .select([schema::PARTITION, schema::OFFSET])
            .build()
            .map_err(|e| self.table_error("plan a scan of", e))?;
        let mut batches = scan
            .to_arrow()
            .await
            .map_err(|e| self.table_error("scan", e))?;
        while let Some(rb) = batches
            .try_next()
            .await
            .map_err(|e| self.table_error("read a data file of", e))?
        {
            let (Some(parts), Some(offsets)) = (
                rb.column_by_name(schema::PARTITION)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>()),
                rb.column_by_name(schema::OFFSET)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>()),
            ) else {
                return Err(IcebergError::SchemaMismatch {
                    table: self.shown.clone(),
                    detail: format!(
                        "its {} and {} columns do not read as text and long",
                        schema::PARTITION,
                        schema::OFFSET
                    ),
                }
                .into());
            };
            for (p, o) in parts.iter().zip(offsets.iter()) {
                if let (Some(p), Some(o)) = (p, o) {
                    out.push(p, o.max(0) as u64);
                }
            }
        }
        Ok(Some(out))
    }

    async fn leftovers(&self) -> Result<Vec<String>, SinkError> {
        let table = self.table().await?;
        let named = leftovers::referenced(&table)
            .await
            .map_err(|e| self.table_error("read the snapshots' manifests", e))?;
        let data = format!("{}/data", table.metadata().location().trim_end_matches('/'));
        let listed =
            leftovers::list(&self.cfg, &data)
                .await
                .map_err(|message| IcebergError::Warehouse {
                    location: data.clone(),
                    message,
                })?;
        Ok(listed
            .into_iter()
            .filter(|f| !named.contains(&f.location))
            .map(|f| format!("{} ({} bytes)", f.location, f.bytes))
            .collect())
    }

    async fn describe(&self) -> Result<String, SinkError> {
        let table = self.table().await?;
        let (rows, files) = table
            .metadata()
            .current_snapshot()
            .map(|s| {
                let get = |k: &str| {
                    s.summary()
                        .additional_properties
                        .get(k)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                (get("total-records"), get("total-data-files"))
            })
            .unwrap_or((0, 0));
        let m = table.metadata();
        let spec = partition::of_table(m.default_partition_spec(), m.current_schema());
        let by = if spec.is_empty() {
            "unpartitioned".to_string()
        } else {
            let fields: Vec<String> = spec.iter().map(ToString::to_string).collect();
            format!("partitioned by {}", fields.join(", "))
        };
        Ok(format!(
            "table {} holds {rows} rows in {files} data files, {by}",
            self.shown
        ))
    }
}

/// What this runner holds of a partition it writes.
struct Part {
    partition: PartitionRef,
    /// The epoch of its latest staged batch (or of its open).
    epoch: i64,
    /// The position the table holds for it, as far as this runner knows.
    durable: Option<u64>,
    /// Batches' data files written, not yet committed.
    staged: Option<Staged>,
    /// A newer runner owns it: its staged files were dropped.
    fenced: bool,
    /// A commit of its staged files failed: it may have landed.
    tried: bool,
}

impl Part {
    fn new(p: &PartitionRef) -> Part {
        Part {
            partition: p.clone(),
            epoch: 0,
            durable: None,
            staged: None,
            fenced: false,
            tried: false,
        }
    }
}

struct Staged {
    epoch: i64,
    /// The first offset of the first staged batch.
    from: u64,
    /// The position after the last staged batch.
    through: u64,
    files: Vec<DataFile>,
}

fn fenced(batch: &Batch) -> SinkError {
    SinkError::Fenced {
        partition: batch.partition.to_string(),
        epoch: batch.epoch,
    }
}

/// One partition's share of a commit: its files, and the batch-like span
/// the guard checks (`first_offset` the position it must find).
struct Share {
    key: String,
    span: Batch,
    files: usize,
}

impl IcebergSink {
    fn lock_parts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Part>> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commit every partition's staged files in one snapshot with their
    /// positions. A partition whose epoch moved is dropped from it
    /// (marked fenced) and the rest tried again; one whose position shows
    /// its files committed already (the answer to an earlier try lost)
    /// counts as committed.
    async fn commit_staged(&self) -> Result<(), SinkError> {
        let _turn = self.committing.lock().await;
        let mut conflicts = 0;
        loop {
            let (shares, files) = {
                let parts = self.lock_parts();
                let mut shares = Vec::new();
                let mut files = Vec::new();
                for (key, part) in parts.iter() {
                    let Some(s) = &part.staged else { continue };
                    files.extend(s.files.iter().cloned());
                    shares.push(Share {
                        key: key.clone(),
                        span: Batch {
                            partition: part.partition.clone(),
                            epoch: s.epoch,
                            records: Vec::new(),
                            columns: None,
                            key: None,
                            first_offset: s.from,
                            next_offset: s.through,
                            // After a failed commit of these files, their
                            // position is checked: it may have landed.
                            attempt: u32::from(part.tried),
                        },
                        files: s.files.len(),
                    });
                }
                (shares, files)
            };
            if shares.is_empty() {
                return Ok(());
            }
            failpoint::hit(AFTER_WRITE);
            let refused: Mutex<Vec<(usize, Unmoved)>> = Mutex::new(Vec::new());
            // The transaction's own retries (after a conflict, or a commit
            // whose answer was lost) check positions too.
            let tries = std::sync::atomic::AtomicU32::new(0);
            let guard = |m: &TableMetadata| -> iceberg::Result<()> {
                let tried = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let found = self.unmoved(m, &shares, tried).map_err(|e| {
                    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string())
                })?;
                if found.is_empty() {
                    return Ok(());
                }
                *refused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = found;
                Err(iceberg::Error::new(
                    iceberg::ErrorKind::DataInvalid,
                    "a partition's position or epoch moved",
                ))
            };
            let table = self.table().await?;
            // Checked before the append too: after a commit whose answer
            // was lost, the table holds these very files, which the append
            // refuses to add again before the guard could say they landed.
            let found = self.unmoved(table.metadata(), &shares, 0)?;
            if !found.is_empty() {
                if let Some(source) = self.settle(&shares, &found) {
                    return Err(IcebergError::PositionConflict {
                        table: self.shown.clone(),
                        source,
                    }
                    .into());
                }
                continue;
            }
            // Checked, not committed: a runner frozen here must find its
            // commit refused once woken, if another took its partitions.
            failpoint::hit(BEFORE_CATALOG_COMMIT);
            let mut tx = Transaction::new(&table);
            if !files.is_empty() {
                let summary = HashMap::from([(
                    "idem.partitions".to_string(),
                    shares
                        .iter()
                        .map(|s| format!("{}@{}", s.key, s.span.next_offset))
                        .collect::<Vec<_>>()
                        .join(" "),
                )]);
                tx = tx
                    .fast_append()
                    .add_data_files(files)
                    .set_snapshot_properties(summary)
                    .apply(tx)
                    .map_err(|e| self.table_error("append data files", e))?;
            }
            let mut props = tx.update_table_properties();
            for share in &shares {
                let p = &share.span.partition;
                let position = serde_json::to_string(&Position {
                    source: p.source.to_string(),
                    partition: p.partition.to_string(),
                    next_offset: share.span.next_offset,
                    epoch: share.span.epoch,
                })
                .map_err(|e| IcebergError::Setup(e.to_string()))?;
                props = props.set(position_key(p), position);
            }
            let tx = props
                .apply(tx)
                .map_err(|e| self.table_error("set the positions", e))?;
            let committed = tx.commit(&Guarded::new(&self.catalog, guard, &table)).await;
            let refused = std::mem::take(
                &mut *refused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            match committed {
                Ok(_) => {
                    self.settle(&shares, &[]);
                    return Ok(());
                }
                // Another writer's commit came first (a remote catalog does
                // not rebuild on it by itself): check again on a fresh load.
                Err(e)
                    if refused.is_empty()
                        && e.kind() == iceberg::ErrorKind::CatalogCommitConflicts
                        && conflicts < MAX_CONFLICTS =>
                {
                    conflicts += 1;
                }
                Err(e) if refused.is_empty() => {
                    let mut parts = self.lock_parts();
                    for share in &shares {
                        if let Some(part) = parts.get_mut(&share.key) {
                            part.tried = true;
                        }
                    }
                    return Err(self.table_error("commit staged data files", e).into());
                }
                Err(_) => {
                    let conflict = self.settle(&shares, &refused);
                    if let Some(source) = conflict {
                        return Err(IcebergError::PositionConflict {
                            table: self.shown.clone(),
                            source,
                        }
                        .into());
                    }
                    // The others again, without the refused.
                }
            }
        }
    }

    /// The shares whose stored position or epoch refuses this commit, and
    /// why; `tried` raises each share's attempt (a retry is checked more
    /// strictly).
    fn unmoved(
        &self,
        m: &TableMetadata,
        shares: &[Share],
        tried: u32,
    ) -> Result<Vec<(usize, Unmoved)>, IcebergError> {
        let mut found = Vec::new();
        for (i, share) in shares.iter().enumerate() {
            let row = self.stored(m, &share.span.partition)?;
            let span = Batch {
                attempt: share.span.attempt.max(tried),
                ..share.span.clone()
            };
            if let Some(why) = offsets::check(row, &span) {
                found.push((i, why));
            }
        }
        Ok(found)
    }

    /// After a commit of `shares`: those not `refused` are committed
    /// (their files and positions); refused ones are fenced (their files
    /// dropped) or were committed before. The first conflict, if any.
    fn settle(
        &self,
        shares: &[Share],
        refused: &[(usize, Unmoved)],
    ) -> Option<idem_core::table::offsets::PositionConflict> {
        let mut parts = self.lock_parts();
        let mut conflict = None;
        for (i, share) in shares.iter().enumerate() {
            // Reopened under a newer epoch while this commit ran (the
            // group gave the partition back): the new epoch's state and
            // staged files are not this commit's to change.
            let Some(part) = parts
                .get_mut(&share.key)
                .filter(|part| part.epoch == share.span.epoch)
            else {
                continue;
            };
            let why = refused.iter().find(|(j, _)| *j == i).map(|(_, w)| w);
            match why {
                Some(Unmoved::Fenced) => {
                    part.fenced = true;
                    part.staged = None;
                    continue;
                }
                Some(Unmoved::Conflict(c)) => {
                    conflict.get_or_insert_with(|| c.clone());
                    part.staged = None;
                    continue;
                }
                Some(Unmoved::Committed) => {
                    tracing::warn!(partition = %share.key, next_offset = share.span.next_offset, "these staged batches had already committed (the answer to an earlier commit was lost): not appended again");
                }
                None if refused.is_empty() => {}
                // Not refused, but the commit did not happen: next round.
                None => continue,
            }
            part.durable = Some(share.span.next_offset);
            part.tried = false;
            // Batches staged while this commit ran stay staged.
            if let Some(s) = &mut part.staged {
                if s.through == share.span.next_offset {
                    part.staged = None;
                } else {
                    s.files.drain(..share.files);
                    s.from = share.span.next_offset;
                }
            }
        }
        conflict
    }
}
