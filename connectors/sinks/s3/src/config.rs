use idem_config::{ColumnConfig, ColumnType, Invalid, Validate};
use serde::Deserialize;

/// `[connectors.NAME.sink]` with `type = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SinkConfig {
    pub bucket: String,
    /// Prepended to every key; end it with `/` for a folder.
    #[serde(default)]
    pub prefix: String,
    /// An S3-compatible store's URL (`http://127.0.0.1:5000`); AWS's own
    /// endpoints when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// AWS region; from the environment or profile when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// `bucket` in the path (`endpoint/bucket/key`) rather than the host
    /// name: what most S3-compatible stores want.
    #[serde(default)]
    pub path_style: bool,
    /// `jsonl` (one JSON object per line) or `parquet`.
    #[serde(default)]
    pub format: Format,
    /// `none`, `gzip` or `zstd`: of the whole object for JSON lines
    /// (`.jsonl.gz`, `.jsonl.zst`), of its pages for Parquet. Default:
    /// `none` for JSON lines, `zstd` for Parquet.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// A `timestamp` or `date` column whose value puts each record in a
    /// time folder (`dt=2026-11-24/`); an object never spans two.
    #[serde(default)]
    pub time_column: Option<String>,
    /// A column whose value puts each record in a folder of its own
    /// (`country=US/`, before any time folder); an object never spans two.
    #[serde(default)]
    pub partition_column: Option<String>,
    /// `day` (`dt=YYYY-MM-DD/`, the default) or `hour`
    /// (`dt=YYYY-MM-DD/hr=HH/`); needs `time_column`.
    #[serde(default)]
    pub time_partition: Option<TimePartition>,
    /// An object holds at most this many records (and the rest of a batch
    /// goes on in the next object).
    #[serde(default = "default_max_object_records")]
    pub max_object_records: usize,
    /// An object holds at most about this many bytes before compression.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: usize,
    /// How long records may wait in open objects before the partition's
    /// objects close and its manifest commits them (objects stay open
    /// across batches until then, or until full). Longer: fewer, larger
    /// objects; shorter: records visible and positions committed sooner.
    /// `0s`: every batch commits its own objects.
    #[serde(default = "default_roll_interval", with = "humantime_serde")]
    pub roll_interval: std::time::Duration,
    /// Memory the open objects of all partitions may hold together (their
    /// encoded bytes not yet sent, Parquet row groups being encoded). Past
    /// it, the committing partition closes its row groups, and if still
    /// over, commits its objects before `roll_interval`.
    #[serde(default = "default_max_open_bytes")]
    pub max_open_bytes: usize,
    /// Objects larger than this go up in parts of this size (multipart
    /// upload); at least 5 MiB, S3's smallest part.
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
    /// The manifest lists at most about this many objects itself; older
    /// ones move to an immutable segment object it names, so that a commit
    /// rewrites a small manifest however long the partition's history.
    #[serde(default = "default_manifest_max_objects")]
    pub manifest_max_objects: usize,
}

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Jsonl,
    Parquet,
}

/// Compression of JSON lines objects or of Parquet pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The width of a time folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimePartition {
    #[default]
    Day,
    Hour,
}

impl S3SinkConfig {
    /// The compression in effect.
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or(match self.format {
            Format::Jsonl => Compression::None,
            Format::Parquet => Compression::Zstd,
        })
    }
}

fn default_max_object_records() -> usize {
    1_000_000
}

fn default_max_object_bytes() -> usize {
    128 * 1024 * 1024
}

fn default_roll_interval() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn default_max_open_bytes() -> usize {
    32 * 1024 * 1024
}

fn default_part_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_manifest_max_objects() -> usize {
    1000
}

/// S3's smallest part (but the last).
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;

impl Validate for S3SinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if self.bucket.trim().is_empty() {
            return Err(Invalid::new(&["bucket"], "must name a bucket"));
        }
        if columns.is_empty() {
            return Err(Invalid::new(
                &[],
                "the s3 sink needs [[columns]] (each record is written as an object of them)",
            ));
        }
        if let Some(c) = columns
            .iter()
            .find(|c| c.name == "_idem_partition" || c.name == "_idem_offset")
        {
            return Err(Invalid::new(
                &["columns"],
                format!("`{}` is written by Idem itself", c.name),
            ));
        }
        if let Some(t) = &self.time_column {
            match columns.iter().find(|c| &c.name == t) {
                None => {
                    return Err(Invalid::new(
                        &["time_column"],
                        format!("`{t}` is not one of the connector's [[columns]]"),
                    ))
                }
                Some(c) if !matches!(c.ty, ColumnType::Timestamp | ColumnType::Date) => {
                    return Err(Invalid::new(
                        &["time_column"],
                        format!(
                            "`{t}` is a {:?} column; it must be a timestamp or a date",
                            c.ty
                        )
                        .to_lowercase(),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(f) = &self.partition_column {
            match columns.iter().find(|c| &c.name == f) {
                None => {
                    return Err(Invalid::new(
                        &["partition_column"],
                        format!("`{f}` is not one of the connector's [[columns]]"),
                    ))
                }
                Some(c)
                    if matches!(
                        c.ty,
                        ColumnType::Json
                            | ColumnType::Bytea
                            | ColumnType::Double
                            | ColumnType::Timestamp
                    ) =>
                {
                    return Err(Invalid::new(
                        &["partition_column"],
                        format!(
                            "`{f}` is a {:?} column; folders take text, integers, booleans, dates, uuids or numerics (for a timestamp use `time_column`)",
                            c.ty
                        )
                        .to_lowercase(),
                    ))
                }
                Some(_) => {}
            }
        }
        if self.time_partition.is_some() && self.time_column.is_none() {
            return Err(Invalid::new(
                &["time_partition"],
                "needs `time_column`: the timestamp or date column that picks the folder",
            ));
        }
        if self.max_object_records == 0 {
            return Err(Invalid::new(&["max_object_records"], "must be at least 1"));
        }
        if self.max_object_bytes == 0 {
            return Err(Invalid::new(&["max_object_bytes"], "must be at least 1"));
        }
        if self.max_open_bytes == 0 {
            return Err(Invalid::new(&["max_open_bytes"], "must be at least 1"));
        }
        if self.manifest_max_objects == 0 {
            return Err(Invalid::new(
                &["manifest_max_objects"],
                "must be at least 1",
            ));
        }
        if self.part_bytes < MIN_PART_BYTES {
            return Err(Invalid::new(
                &["part_bytes"],
                format!("must be at least {MIN_PART_BYTES} (5 MiB, S3's smallest part)"),
            ));
        }
        Ok(())
    }
}
