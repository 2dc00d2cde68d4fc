//! The Iceberg sink: each batch becomes Parquet data files and one catalog
//! commit that adds them in a snapshot and moves the partition's position
//! in the table's properties, under the catalog row's lock.
//!
//! Positions and epochs live in the table's properties (one key each per
//! partition), not in snapshot summaries: properties survive snapshot
//! expiry and compaction, which write snapshots without Idem's summary.

use crate::catalog::{Guarded, PgCatalog};
use crate::config::{CatalogConfig, IcebergSinkConfig};
use crate::error::IcebergError;
use crate::schema;
use arrow::datatypes::Schema as ArrowSchema;
use async_trait::async_trait;
use iceberg::io::{FileIO, FileIOBuilder};
use iceberg::spec::{DataFileFormat, TableMetadata};
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
use idem_core::failpoint::{self, AFTER_WRITE};
use idem_core::table::offsets::{self, Unmoved};
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Sink, SinkError, SinkInfo, StoredPosition,
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
    catalog: PgCatalog,
    ident: TableIdent,
    /// `namespace.table in catalog ..`, for messages.
    shown: String,
}

impl IcebergSink {
    pub fn new(cfg: IcebergSinkConfig, columns: Vec<ColumnConfig>) -> Result<Self, IcebergError> {
        let io = file_io(&cfg)?;
        let CatalogConfig::Sql { url, name } = &cfg.catalog;
        let catalog = PgCatalog::new(url, name, io, &cfg.warehouse)?;
        let namespace = NamespaceIdent::from_strs(cfg.namespace.split('.'))
            .map_err(|e| IcebergError::Setup(format!("namespace `{}`: {e}", cfg.namespace)))?;
        let ident = TableIdent::new(namespace, cfg.table.clone());
        let shown = format!(
            "{}.{} in catalog `{name}` on {}",
            cfg.namespace, cfg.table, catalog.server
        );
        Ok(IcebergSink {
            cfg,
            columns,
            catalog,
            ident,
            shown,
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
        let mut writer = DataFileWriterBuilder::new(rolling)
            .build(None)
            .await
            .map_err(|e| self.table_error("open a data file", e))?;
        writer
            .write(rb)
            .await
            .map_err(|e| self.table_error("write a data file", e))?;
        writer
            .close()
            .await
            .map_err(|e| self.table_error("close a data file", e))
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
    let factory = iceberg_storage_opendal::OpenDalResolvingStorageFactory::new();
    Ok(FileIOBuilder::new(Arc::new(factory))
        .with_props(props)
        .build())
}

#[async_trait]
impl Sink for IcebergSink {
    fn info(&self) -> SinkInfo {
        SinkInfo {
            guarantee: Guarantee::ExactlyOnce,
            why: format!(
                "each batch's data files and its partition's next offset are committed to {} in one catalog commit, made under the catalog row's lock only while the runner's epoch owns the partition and the stored position is not past the batch",
                self.shown
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
                self.catalog
                    .create(&self.ident, s)
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
        if let Some(detail) = schema::mismatch(table.metadata().current_schema(), &self.columns) {
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
        Ok(Opened {
            epoch,
            next_offset: next,
        })
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let p = &batch.partition;
        let table = self.table().await?;
        // Before writing files: a fenced or already committed batch needs
        // none.
        if let Some(why) = offsets::check(self.stored(table.metadata(), p)?, &batch) {
            return self.not_moved(why, &batch);
        }
        let files = if batch.records.is_empty() {
            Vec::new()
        } else {
            self.write_files(&table, &batch).await?
        };
        failpoint::hit(AFTER_WRITE);
        let position = serde_json::to_string(&Position {
            source: p.source.to_string(),
            partition: p.partition.to_string(),
            next_offset: batch.next_offset,
            epoch: batch.epoch,
        })
        .map_err(|e| IcebergError::Setup(e.to_string()))?;
        let why_not: Mutex<Option<Unmoved>> = Mutex::new(None);
        let guard = |m: &TableMetadata| -> iceberg::Result<()> {
            let row = self
                .stored(m, p)
                .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()))?;
            match offsets::check(row, &batch) {
                None => Ok(()),
                Some(why) => {
                    *why_not
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
                    Err(iceberg::Error::new(
                        iceberg::ErrorKind::DataInvalid,
                        "the partition's position or epoch moved",
                    ))
                }
            }
        };
        let guarded = Guarded {
            catalog: &self.catalog,
            guard,
        };
        let tx = Transaction::new(&table);
        let tx = if files.is_empty() {
            tx
        } else {
            let summary = HashMap::from([
                ("idem.partition".to_string(), p.to_string()),
                (
                    "idem.next-offset".to_string(),
                    batch.next_offset.to_string(),
                ),
            ]);
            tx.fast_append()
                .add_data_files(files)
                .set_snapshot_properties(summary)
                .apply(tx)
                .map_err(|e| self.table_error("append data files", e))?
        };
        let tx = tx
            .update_table_properties()
            .set(position_key(p), position)
            .apply(tx)
            .map_err(|e| self.table_error("set the position", e))?;
        let committed = tx.commit(&guarded).await;
        let why = why_not
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match (committed, why) {
            (Ok(_), _) => Ok(CommitStats {
                written: batch.records.len() as u64,
                ..Default::default()
            }),
            (Err(_), Some(why)) => self.not_moved(why, &batch),
            (Err(e), None) => Err(self
                .table_error(&format!("commit a batch of {p}"), e)
                .into()),
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
        Ok(format!(
            "table {} holds {rows} rows in {files} data files",
            self.shown
        ))
    }
}

impl IcebergSink {
    fn not_moved(&self, why: Unmoved, batch: &Batch) -> Result<CommitStats, SinkError> {
        match why {
            Unmoved::Fenced => Err(SinkError::Fenced {
                partition: batch.partition.to_string(),
                epoch: batch.epoch,
            }),
            Unmoved::Committed => Ok(offsets::committed_before(batch)),
            Unmoved::Conflict(source) => Err(IcebergError::PositionConflict {
                table: self.shown.clone(),
                source,
            }
            .into()),
        }
    }
}
