//! One connector, a target table per source table: the sink's `table` is a
//! template (`{source.schema}_{source.table}`) resolved from each Debezium
//! topic (`PREFIX.SCHEMA.TABLE`). Every table gets a sink of its own, built
//! and prepared (the table created) when its first partition opens, so a
//! table that appears while Idem runs needs no restart. A partition belongs
//! to one topic, hence one table: its batches commit through that table's
//! sink alone, positions and rows in one transaction as ever, and every
//! table's sink keeps positions in the same offsets table.

use async_trait::async_trait;
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Record, Sink, SinkError, SinkInfo, StoredPosition,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds the sink of one table; `Err` says why the table is refused.
pub type Build = Box<dyn Fn(&str) -> Result<Arc<dyn Sink>, String> + Send + Sync>;

pub struct RoutedSink {
    template: String,
    build: Build,
    /// A sink built from the section as written: what every table's sink
    /// declares alike (guarantee, key, shape), and the offsets table they
    /// share. Never prepared: its table is the template.
    probe: Arc<dyn Sink>,
    /// The tables opened so far, by name.
    tables: tokio::sync::Mutex<BTreeMap<String, Arc<dyn Sink>>>,
}

/// The topic of a Kafka partition named `TOPIC/N`.
pub fn topic_of(partition: &str) -> &str {
    partition
        .rsplit_once('/')
        .map_or(partition, |(topic, _)| topic)
}

#[derive(Debug, thiserror::Error)]
#[error("table template `{template}` for partition {partition}: {why}")]
struct Unroutable {
    template: String,
    partition: String,
    why: String,
}

impl RoutedSink {
    pub fn new(template: String, probe: Arc<dyn Sink>, build: Build) -> Self {
        RoutedSink {
            template,
            build,
            probe,
            tables: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The sink of `partition`'s table, built and prepared on first use.
    async fn sink_for(&self, partition: &str) -> Result<Arc<dyn Sink>, SinkError> {
        let unroutable = |why: String| {
            SinkError::Permanent(Box::new(Unroutable {
                template: self.template.clone(),
                partition: partition.to_string(),
                why,
            }))
        };
        let table =
            idem_config::resolve_table(&self.template, topic_of(partition)).map_err(unroutable)?;
        // Held while a new table is prepared: partitions of one table wait
        // for it rather than create it twice.
        let mut tables = self.tables.lock().await;
        if let Some(sink) = tables.get(&table) {
            return Ok(sink.clone());
        }
        let sink = (self.build)(&table).map_err(unroutable)?;
        sink.prepare().await?;
        tracing::info!(table = %table, partition, "writing a new source table");
        tables.insert(table, sink.clone());
        Ok(sink)
    }
}

#[async_trait]
impl Sink for RoutedSink {
    fn info(&self) -> SinkInfo {
        let mut info = self.probe.info();
        info.why = format!(
            "{} (each source table into its own table, `{}`)",
            info.why, self.template
        );
        info
    }

    /// Each table is prepared when its first partition opens.
    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError> {
        self.sink_for(&partition.partition)
            .await?
            .open(partition)
            .await
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        self.sink_for(&batch.partition.partition)
            .await?
            .commit(batch)
            .await
    }

    fn check_record(&self, record: &Record) -> Result<(), String> {
        self.probe.check_record(record)
    }

    async fn positions(&self, connector: &str) -> Result<Vec<StoredPosition>, SinkError> {
        self.probe.positions(connector).await
    }

    async fn describe(&self) -> Result<String, SinkError> {
        let tables = self.tables.lock().await;
        if tables.is_empty() {
            return Ok(format!(
                "one table per source table (`{}`); none opened yet",
                self.template
            ));
        }
        let mut lines = Vec::new();
        for sink in tables.values() {
            lines.push(sink.describe().await?);
        }
        Ok(lines.join("; "))
    }

    async fn close(&self) -> Result<(), SinkError> {
        for sink in self.tables.lock().await.values() {
            sink.close().await?;
        }
        Ok(())
    }
}
