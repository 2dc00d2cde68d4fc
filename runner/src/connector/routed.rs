//! One connector, a target table per source table: the sink's `table` is a
//! template (`{source.schema}_{source.table}`) resolved from each Debezium
//! topic (`PREFIX.SCHEMA.TABLE`). Every table gets a sink of its own, built
//! and prepared (the table created) when its first partition opens, so a
//! table that appears while Idem runs needs no restart. A partition belongs
//! to one topic, hence one table: its batches commit through that table's
//! sink alone, positions and rows in one transaction as ever, and every
//! table's sink keeps positions in the same offsets table.
//!
//! Without a `key` in the config, each table is keyed on its source table's
//! primary key, which the mapper learns from the message key: a table's sink
//! is then built and its table created by the first batch that brings rows
//! (with their key and columns), while partitions open through the offsets
//! table alone.

use async_trait::async_trait;
use idem_config::ColumnConfig;
use idem_core::{
    Batch, CommitStats, Opened, PartitionRef, Record, Sink, SinkError, SinkInfo, StoredPosition,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds the sink of one table, keyed on a learnt key when given; `Err`
/// says why the table is refused.
pub type Build =
    Box<dyn Fn(&str, Option<Learnt<'_>>) -> Result<Arc<dyn Sink>, String> + Send + Sync>;

/// A table's key learnt from its messages, and the columns known so far
/// (which the key's columns are among).
pub struct Learnt<'a> {
    pub key: &'a [String],
    pub columns: &'a [ColumnConfig],
}

pub struct RoutedSink {
    template: String,
    build: Build,
    /// A sink built from the section as written: what every table's sink
    /// declares alike (guarantee, key, shape), and the offsets table they
    /// share. Only its offsets table is prepared (`prepare_positions`):
    /// its own table is the template, never created.
    probe: Arc<dyn Sink>,
    /// Each table keyed on its source table's key, learnt from messages.
    learnt_key: bool,
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
    pub fn new(template: String, probe: Arc<dyn Sink>, learnt_key: bool, build: Build) -> Self {
        RoutedSink {
            template,
            build,
            probe,
            learnt_key,
            tables: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The table `topic`'s rows go to; `Err` says why it has none.
    pub fn table_for(&self, topic: &str) -> Result<String, String> {
        idem_config::resolve_table(&self.template, topic)
    }

    /// Whether each table is keyed on a key learnt from its messages.
    pub fn learns_key(&self) -> bool {
        self.learnt_key
    }

    /// A sink of `table` of its own, not prepared nor kept (for `idem
    /// verify` to read a table back); keyed on `learnt` when the key is
    /// learnt.
    pub fn table_sink(
        &self,
        table: &str,
        learnt: Option<Learnt<'_>>,
    ) -> Result<Arc<dyn Sink>, String> {
        (self.build)(table, learnt)
    }

    fn unroutable(&self, partition: &str, why: String) -> SinkError {
        SinkError::Permanent(Box::new(Unroutable {
            template: self.template.clone(),
            partition: partition.to_string(),
            why,
        }))
    }

    /// The sink of `partition`'s table, built and prepared on first use
    /// (keyed on `learnt`, when the key is learnt). `None`: the key is
    /// learnt and not known yet.
    async fn sink_for(
        &self,
        partition: &str,
        learnt: Option<Learnt<'_>>,
    ) -> Result<Option<Arc<dyn Sink>>, SinkError> {
        let table = self
            .table_for(topic_of(partition))
            .map_err(|why| self.unroutable(partition, why))?;
        // Held while a new table is prepared: partitions of one table wait
        // for it rather than create it twice.
        let mut tables = self.tables.lock().await;
        if let Some(sink) = tables.get(&table) {
            return Ok(Some(sink.clone()));
        }
        if self.learnt_key && learnt.is_none() {
            return Ok(None);
        }
        let sink = (self.build)(&table, learnt).map_err(|why| self.unroutable(partition, why))?;
        sink.prepare().await?;
        tracing::info!(table = %table, partition, "writing a new source table");
        tables.insert(table, sink.clone());
        Ok(Some(sink))
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

    /// Each table is prepared when its first partition opens, or with a
    /// learnt key by its first rows; only the offsets table comes first
    /// (so that positions read before any table exists).
    async fn prepare(&self) -> Result<(), SinkError> {
        self.probe.prepare_positions().await
    }

    async fn open(&self, partition: &PartitionRef) -> Result<Opened, SinkError> {
        if self.learnt_key {
            // Opening touches the shared offsets table only.
            return self.probe.open(partition).await;
        }
        match self.sink_for(&partition.partition, None).await? {
            Some(sink) => sink.open(partition).await,
            None => self.probe.open(partition).await,
        }
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let partition = &batch.partition.partition;
        let learnt = match (&batch.key, &batch.columns) {
            (Some(key), Some(columns)) => Some(Learnt { key, columns }),
            _ => None,
        };
        match self.sink_for(partition, learnt).await? {
            Some(sink) => sink.commit(batch).await,
            // Nothing mapped yet, so no key: only skipped events and dead
            // letters, which leave the table as it is. Its position moves
            // with the table's first rows; until then a restart reads these
            // again, to the same effect (a dead letter may be written again,
            // with its position).
            None if batch.records.is_empty() => Ok(CommitStats::default()),
            None => Err(self.unroutable(
                partition,
                "rows arrived without the key learnt from their messages".into(),
            )),
        }
    }

    fn stage_for(&self) -> Option<std::time::Duration> {
        self.probe.stage_for()
    }

    async fn flush_staged(&self, partition: &PartitionRef) -> Result<Option<u64>, SinkError> {
        match self.sink_for(&partition.partition, None).await? {
            Some(sink) => sink.flush_staged(partition).await,
            None => Ok(None),
        }
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
