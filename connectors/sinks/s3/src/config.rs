use idem_config::{ColumnConfig, Invalid, Validate};
use serde::Deserialize;

/// `[connectors.NAME.sink]` with `type = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SinkConfig {
    #[serde(deserialize_with = "idem_config::interp::string")]
    pub bucket: String,
    /// Prepended to every key; end it with `/` for a folder.
    #[serde(default)]
    pub prefix: String,
    /// An S3-compatible store's URL (`http://127.0.0.1:5000`); AWS's own
    /// endpoints when absent.
    #[serde(default, deserialize_with = "idem_config::interp::opt_string")]
    pub endpoint: Option<String>,
    /// AWS region; from the environment or profile when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// `bucket` in the path (`endpoint/bucket/key`) rather than the host
    /// name: what most S3-compatible stores want.
    #[serde(default)]
    pub path_style: bool,
    /// `none` or `gzip` (`.jsonl.gz`).
    #[serde(default)]
    pub compression: Compression,
    /// An object holds at most this many records (and the rest of a batch
    /// goes on in the next object).
    #[serde(default = "default_max_object_records")]
    pub max_object_records: usize,
    /// An object holds at most about this many bytes before compression.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: usize,
    /// Objects larger than this go up in parts of this size (multipart
    /// upload); at least 5 MiB, S3's smallest part.
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
}

/// Compression of the JSON lines objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

fn default_max_object_records() -> usize {
    1_000_000
}

fn default_max_object_bytes() -> usize {
    128 * 1024 * 1024
}

fn default_part_bytes() -> usize {
    16 * 1024 * 1024
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
        if self.max_object_records == 0 {
            return Err(Invalid::new(&["max_object_records"], "must be at least 1"));
        }
        if self.max_object_bytes == 0 {
            return Err(Invalid::new(&["max_object_bytes"], "must be at least 1"));
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
