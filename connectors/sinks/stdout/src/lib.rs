//! Stdout sink: each row as a JSON line on standard output, for previewing
//! a mapping before pointing it at a real sink.
//!
//! Guarantee: **at-least-once**. Standard output cannot store a position,
//! so a restart reads every partition again from the start.

use async_trait::async_trait;
use idem_config::{ColumnConfig, Guarantee, Invalid, Validate};
use idem_core::{
    Batch, CommitStats, Op, Opened, PartitionRef, Sink, SinkError, SinkInfo, StoredPosition,
};
use serde::Deserialize;
use std::io::Write;

/// `[connectors.NAME.sink]` with `type = "stdout"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Add `_idem_partition`, `_idem_offset` and `_idem_op` to each line.
    #[serde(default)]
    pub positions: bool,
}

impl Validate for StdoutSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if columns.is_empty() {
            return Err(Invalid::new(&[], "the stdout sink needs [[columns]]"));
        }
        Ok(())
    }
}

pub struct StdoutSink {
    cfg: StdoutSinkConfig,
    names: Vec<String>,
}

impl StdoutSink {
    pub fn new(cfg: StdoutSinkConfig, columns: &[ColumnConfig]) -> Self {
        StdoutSink {
            cfg,
            names: columns.iter().map(|c| c.name.clone()).collect(),
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn info(&self) -> SinkInfo {
        SinkInfo {
            guarantee: Guarantee::AtLeastOnce,
            why: "stdout cannot store positions: a restart prints every message again".into(),
            key_columns: Vec::new(),
            deletes: false,
            rows: idem_core::RowShape::append(),
            adds_columns: None,
            ids_table: None,
        }
    }

    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn open(&self, _partition: &PartitionRef) -> Result<Opened, SinkError> {
        Ok(Opened {
            epoch: 0,
            next_offset: None,
        })
    }

    async fn commit(&self, batch: std::sync::Arc<Batch>) -> Result<CommitStats, SinkError> {
        // Streamed through a small buffer: a batch is not held twice.
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
        let fail = |e: std::io::Error| SinkError::Permanent(Box::new(e));
        for rec in &batch.records {
            let mut obj = rec.to_json_object(&self.names, 3);
            if self.cfg.positions {
                obj.insert(
                    "_idem_partition".into(),
                    batch.partition.partition.to_string().into(),
                );
                obj.insert("_idem_offset".into(), rec.offset.into());
                let op = if rec.op == Op::Delete {
                    "delete"
                } else {
                    "upsert"
                };
                obj.insert("_idem_op".into(), op.into());
            }
            serde_json::to_writer(&mut out, &serde_json::Value::Object(obj))
                .map_err(|e| fail(e.into()))?;
            out.write_all(b"\n").map_err(fail)?;
        }
        out.flush().map_err(fail)?;
        Ok(CommitStats {
            written: batch.records.len() as u64,
            deduplicated: 0,
            rejected: 0,
            durable_through: None,
        })
    }

    async fn positions(&self, _connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        Ok(Vec::new())
    }

    async fn describe(&self) -> Result<String, SinkError> {
        Ok("stdout".into())
    }
}

/// The `stdout` sink's registry entry.
pub struct StdoutKind;

impl idem_core::registry::SinkKind for StdoutKind {
    const NAME: &'static str = "stdout";
    type Config = StdoutSinkConfig;

    fn build(
        cfg: &StdoutSinkConfig,
        columns: &[ColumnConfig],
        _ctx: idem_core::registry::SinkContext,
    ) -> Result<std::sync::Arc<dyn Sink>, String> {
        Ok(std::sync::Arc::new(StdoutSink::new(cfg.clone(), columns)))
    }
}
