//! One connector at run time: assignments in, one task pair per partition
//! (reader -> bounded channel -> batcher/committer), the commit protocol
//! applied to every batch.
//!
//! - `mod.rs`: the connector, its run loop over assignments, and the
//!   partition tasks.
//! - `partition.rs`: one partition: open, read and map, batch.
//! - `commit.rs`: one batch through the protocol's steps.
//! - `staged.rs`: what the committer keeps between batches (reservations,
//!   how far the sink is durable).

mod commit;
mod error;
mod partition;
pub(crate) mod routed;
mod staged;
#[cfg(test)]
mod tests;

pub use error::RunError;
pub use partition::{map_message, Item};

use crate::deadletter::DeadLetters;
use crate::dedup::{Ids, LazyStore, Stage};
use crate::registry::ConnectorConfig;
use crate::retry::retry_transient;
use crate::stats::Stats;
use idem_config::{ColumnsFrom, DedupStoreKind, Envelope, Evolve, Format, Guarantee, Validate};
use idem_core::registry::SinkContext;
use idem_core::{Assignment, Mapper, Sink, SinkError, Source, SourceError};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// How long a fenced partition waits before it is opened again, when the
/// source still assigns it to this runner (longer than a rebalance takes).
const REOPEN_AFTER_FENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// How a partition's task ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionEnd {
    /// Its input ended, or it was stopped, with every batch it read
    /// committed or left to be read again.
    Finished,
    /// A newer runner took it: the sink's epoch moved.
    Fenced,
    /// The store holding its positions lost them, and `on_loss = "warn"`
    /// accepts that: it opens again, from the source's start.
    Reopen,
}

/// Everything a connector's tasks share.
pub struct Connector {
    pub name: String,
    pub cfg: ConnectorConfig,
    pub source: Arc<dyn Source>,
    pub sink: Arc<dyn Sink>,
    pub mapper: Mapper,
    pub dead_letters: Arc<DeadLetters>,
    /// Where message ids come from, when the connector deduplicates or
    /// its sink needs them.
    pub ids: Option<Ids>,
    /// The dedup stage before each commit.
    pub dedup: Option<Stage>,
    /// Counters; shared with the connector's supervisor, so they outlive
    /// a restart.
    pub stats: Arc<Stats>,
    /// Each source table into a table of its own (`routed.rs`): columns
    /// are learnt per topic. The same sink as `sink`.
    pub(crate) routed: Option<Arc<routed::RoutedSink>>,
    /// The schema registry the values' writer schemas come from.
    pub registry: Option<Arc<crate::schemas::Registry>>,
    /// Paused by the admin API: partitions stop reading once what they
    /// read is handed over (and commits), and the connector stays what it
    /// is (a Kafka consumer stays in its group).
    paused: tokio::sync::watch::Sender<bool>,
    /// What its partitions may hold of their messages, together, until
    /// their batches commit.
    read_ahead: partition::ReadAhead,
}

impl Connector {
    /// The most messages, and bytes of their values, it holds at once
    /// (read ahead, in batches filling and committing), all its partitions
    /// together.
    pub fn memory_allowance(&self) -> (usize, usize) {
        self.read_ahead.allowance()
    }

    /// What its dedup stage rests on, once its store is open, and what
    /// weakens it; `None` without one.
    pub async fn dedup_line(&self) -> Option<Result<(String, Vec<String>), String>> {
        if let Some(stage) = &self.dedup {
            return Some(
                crate::dedup::describe(stage, self.source.as_ref(), self.cfg.source.is_bounded())
                    .await,
            );
        }
        let d = self.cfg.dedup.as_ref()?;
        let table = self.sink.info().ids_table?;
        let held = format!("{table}, in each batch's transaction");
        Some(Ok(crate::dedup::lines(d, &held, self.source.as_ref()).await))
    }

    /// Build from config without I/O; refuse a guarantee the sink cannot give.
    pub fn build(name: &str, cfg: ConnectorConfig) -> Result<Connector, RunError> {
        Connector::build_with(name, cfg, Arc::new(Stats::default()))
    }

    /// [`Connector::build`], counting into `stats`.
    pub fn build_with(
        name: &str,
        mut cfg: ConnectorConfig,
        stats: Arc<Stats>,
    ) -> Result<Connector, RunError> {
        if cfg.batch.max_records.is_none() {
            cfg.batch.max_records = Some(cfg.sink.batch_records());
        }
        let dead_letters = Arc::new(DeadLetters::build(name, &cfg).map_err(|message| {
            RunError::DeadLetterConfig {
                connector: name.into(),
                message,
            }
        })?);
        let dedup_cfg = cfg
            .dedup
            .clone()
            .or_else(|| cfg.sink.needs_store().then(Default::default));
        let (ids, store, keep_ids) = match dedup_cfg {
            None => (None, None, None),
            Some(d) => {
                let source = d.id_source().map_err(|e| RunError::DedupConfig {
                    connector: name.into(),
                    message: e.message,
                })?;
                let ids = Some(Ids::new(name, source));
                if d.store == DedupStoreKind::Sink {
                    // The sink drops copies in its own transaction.
                    (ids, None, Some(d.retention))
                } else {
                    (ids, Some(Arc::new(LazyStore::new(name, d))), None)
                }
            }
        };
        let refuse_kept_ids = || {
            RunError::DedupConfig {
            connector: name.into(),
            message: format!("store = \"sink\" keeps message ids in the sink's own transaction, which the postgres and duckdb sinks do (in mode = \"append\" or \"upsert\": mode = \"dedup\" keys its ids itself); for this {} sink use store = \"embedded\", \"redis\" or \"postgres\"", cfg.sink.kind()),
        }
        };
        if keep_ids.is_some() && cfg.sink.needs_store() {
            // It keeps its positions in a store of its own (HTTP).
            return Err(refuse_kept_ids());
        }
        let ctx = SinkContext {
            store: store
                .clone()
                .map(|s| s as Arc<dyn idem_dedup_store::DedupStore>),
            rejects: dead_letters.clone(),
            keep_ids,
        };
        let build_err = |message| RunError::Build {
            connector: name.into(),
            sink: cfg.sink.kind(),
            message,
        };
        let mut sink = cfg
            .sink
            .build(&cfg.columns, ctx.clone())
            .map_err(build_err)?;
        let template = cfg
            .sink
            .table()
            .filter(|t| idem_config::is_table_template(t));
        let mut routed = None;
        if let Some(template) = &template {
            if cfg.envelope != Envelope::Debezium
                || cfg.evolve != Evolve::AddColumns
                || cfg.source.kafka().is_none()
            {
                return Err(build_err(format!(
                    "table = \"{template}\" writes each source table of a Debezium topic (PREFIX.SCHEMA.TABLE) to a table of its own: it needs a kafka source, envelope = \"debezium\" and evolve = \"add_columns\" (each table's columns come from its events' schema)"
                )));
            }
            let (section, columns) = (cfg.sink.clone(), cfg.columns.clone());
            let build: routed::Build = Box::new(move |table: &str, learnt| {
                let (one, columns) = match learnt {
                    Some(l) => (section.with_table(table, Some(l.key)), l.columns),
                    None => (section.with_table(table, None), columns.as_slice()),
                };
                one.validate(columns)
                    .map_err(|e| format!("table `{table}`: {}", e.message))?;
                one.build(columns, ctx.clone())
            });
            let learnt_key = learns_key(&sink.info());
            let one = Arc::new(routed::RoutedSink::new(
                template.clone(),
                sink,
                learnt_key,
                build,
            ));
            routed = Some(one.clone());
            sink = one;
        }
        let info = sink.info();
        if keep_ids.is_some() && info.ids_table.is_none() {
            return Err(refuse_kept_ids());
        }
        if cfg.guarantee == Guarantee::ExactlyOnce && info.guarantee != Guarantee::ExactlyOnce {
            return Err(RunError::Guarantee {
                connector: name.into(),
                sink: cfg.sink.kind(),
                required: cfg.guarantee,
                given: info.guarantee,
                why: info.why,
            });
        }
        if cfg.envelope == Envelope::Debezium
            && !info.deletes
            && info.rows.mode != idem_config::WriteMode::Append
        {
            // A replica must apply deletes, or it keeps deleted rows. An
            // append sink is a change log instead: every event is a row.
            return Err(RunError::Build {
                connector: name.into(),
                sink: cfg.sink.kind(),
                message: "envelope = \"debezium\" into a keyed table applies deletes: set delete_on_tombstone = true (with mode = \"upsert\" and `key`, the source table's primary key), or use mode = \"append\" for a change log of every event".into(),
            });
        }
        if cfg.envelope == Envelope::Debezium
            && !info.rows.versioned
            && info.rows.mode != idem_config::WriteMode::Append
        {
            tracing::warn!(
                connector = name,
                "envelope = \"debezium\" without a version column: a change Debezium delivers again after a restart of its own can overwrite a newer row until its replay catches up; add a column with pointer = \"@source/lsn\" and set it as the sink's `version` (docs/cdc.md)"
            );
        }
        let mut mapper = Mapper::new(
            &cfg.columns,
            &info.key_columns,
            info.deletes,
            cfg.tombstone_field.clone(),
        )
        .with_envelope(cfg.envelope);
        if cfg.evolve == Evolve::AddColumns {
            let Some(adds) = info.adds_columns else {
                return Err(RunError::Build {
                    connector: name.into(),
                    sink: cfg.sink.kind(),
                    message: "evolve = \"add_columns\" is available on the postgres, duckdb and s3 sinks; list the columns in [[columns]] and set evolve = \"off\" here".into(),
                });
            };
            mapper = mapper.learning_columns(&cfg.columns, adds.decimal);
            if template.is_some() && learns_key(&info) {
                mapper = mapper.learning_key();
            }
        }
        let mut registry = None;
        if cfg.format != Format::Json
            && matches!(&ids, Some(i) if matches!(i.source(), idem_config::IdSource::Pointer(_)))
        {
            return Err(RunError::DedupConfig {
                connector: name.into(),
                message: format!("[dedup] id points into the value, which it reads as plain JSON; with format = \"{}\" take the id from \"@key\", a header (\"@header/NAME\") or \"@position\"", cfg.format.name()),
            });
        }
        if cfg.format == Format::JsonSchema {
            mapper = mapper.with_registry_prefix();
        }
        let path = cfg.schema_file.as_deref().unwrap_or_default();
        let build_err = |message: String| RunError::Build {
            connector: name.into(),
            sink: cfg.sink.kind(),
            message,
        };
        if let Some(r) = &cfg.registry {
            // Each value names its writer's schema; `schema_file`, if any,
            // only gave the columns.
            let one = crate::schemas::Registry::new(r).map_err(build_err)?;
            mapper = mapper.with_registry(one.schemas.clone());
            registry = Some(Arc::new(one));
        } else if cfg.format == Format::Protobuf {
            let schema = idem_core::mapping::protobuf::ProtoSchema::compile(
                std::path::Path::new(path),
                cfg.message.as_deref().unwrap_or_default(),
            )
            .map_err(|e| build_err(format!("schema_file = \"{path}\" {e}")))?;
            mapper = mapper.with_protobuf(schema);
        } else if cfg.format == Format::Avro {
            let text = std::fs::read_to_string(path)
                .map_err(|e| build_err(format!("schema_file = \"{path}\": {e}")))?;
            let schema = idem_core::mapping::avro::AvroSchema::parse(&text).map_err(|e| {
                build_err(format!("schema_file = \"{path}\": not an Avro schema: {e}"))
            })?;
            mapper = mapper.with_avro(schema);
        }
        if cfg.columns_from() == ColumnsFrom::Table {
            if template.is_some() || cfg.sink.table().is_none() || cfg.sink.creates_table() {
                return Err(RunError::Build {
                    connector: name.into(),
                    sink: cfg.sink.kind(),
                    message: "columns_from = \"table\" reads the columns of a table that exists: it needs a postgres or duckdb sink writing one table, with create = false (Idem then neither creates it nor guesses its columns)".into(),
                });
            }
            mapper = mapper.columns_from_table(&cfg.columns);
        }
        let dedup = store.map(|store| Stage {
            on_loss: store.config().on_loss,
            store,
            connector: name.into(),
        });
        Ok(Connector {
            name: name.into(),
            source: cfg.source.build(),
            sink,
            mapper,
            dead_letters,
            ids,
            dedup,
            stats,
            routed,
            registry,
            read_ahead: partition::ReadAhead::new(&cfg.batch),
            cfg,
            paused: tokio::sync::watch::channel(false).0,
        })
    }

    /// What columns are learnt per: a routed connector's partition's
    /// topic, else the connector as a whole (`""`).
    pub(super) fn route<'a>(&self, partition: &'a str) -> &'a str {
        if self.routed.is_some() {
            routed::topic_of(partition)
        } else {
            ""
        }
    }

    /// Stop reading (`true`) after handing over what was read, or go on.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub(super) fn paused(&self) -> tokio::sync::watch::Receiver<bool> {
        self.paused.subscribe()
    }

    fn sink_err(&self, source: SinkError) -> RunError {
        RunError::Sink {
            connector: self.name.clone(),
            source,
        }
    }

    fn dedup_err(&self, source: idem_dedup_store::DedupError) -> RunError {
        let advice = match source {
            idem_dedup_store::DedupError::Lost { .. } => ". The connector stops (dedup.on_loss = \"fail\"): restart it with on_loss = \"warn\" to accept the loss and go on, or restore the store's data first",
            _ => "",
        };
        RunError::Dedup {
            connector: self.name.clone(),
            source,
            advice,
        }
    }

    /// `columns_from = "table"`: the mapper takes the target table's
    /// columns (read once the sink is prepared, before any partition
    /// opens). A column of a type Idem does not write stops the connector
    /// here, named, rather than being left empty.
    async fn seed_from_table(&self) -> Result<(), RunError> {
        let fail = |message: String| RunError::Build {
            connector: self.name.clone(),
            sink: self.cfg.sink.kind(),
            message,
        };
        let found = self
            .sink
            .existing_columns()
            .await
            .map_err(|e| self.sink_err(e))?
            .ok_or_else(|| {
                fail("columns_from = \"table\": this sink cannot read its table's columns".into())
            })?;
        let mut columns = Vec::new();
        let mut refused = Vec::new();
        for (name, ty) in found {
            if self.cfg.columns.iter().any(|c| c.name == name) {
                continue;
            }
            match ty {
                Ok(ty) => columns.push((name, ty)),
                Err(db) => refused.push(format!("`{name}` ({db})")),
            }
        }
        if !refused.is_empty() {
            return Err(fail(format!(
                "columns_from = \"table\": Idem does not write the type of column {}; it writes the types of `[[columns]]` (see the sink's page): change the column's type, or leave columns_from out and list the columns",
                refused.join(", ")
            )));
        }
        self.mapper
            .seed("", &columns)
            .map_err(|e| fail(format!("columns_from = \"table\": {e}")))?;
        tracing::info!(
            connector = %self.name,
            columns = columns.len(),
            "columns taken from the target table"
        );
        Ok(())
    }

    fn source_err(&self, source: SourceError) -> RunError {
        RunError::Source {
            connector: self.name.clone(),
            source,
        }
    }

    /// Run until the source is exhausted (batch mode), `stop` is cancelled,
    /// or a permanent error.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> Result<(), RunError> {
        let retry = self.cfg.retry.clone();
        let prepared = retry_transient(&retry, &self.stats, "prepare the sink", &stop, || {
            self.sink.prepare()
        })
        .await;
        match prepared {
            Ok(()) => {}
            Err(e) if stop.is_cancelled() && e.is_retriable() => {
                warn!(connector = %self.name, error = %e, "stopped while retrying to prepare the sink");
                return Ok(());
            }
            Err(e) => return Err(self.sink_err(e)),
        }
        if self.cfg.columns_from() == ColumnsFrom::Table {
            self.seed_from_table().await?;
        }
        self.stats.set_prepared(true);
        let mut parts = PartitionTasks::default();
        let mut assignments_done = false;
        let mut failure: Option<RunError> = None;
        loop {
            if assignments_done && parts.tasks.is_empty() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled(), if !assignments_done => {
                    // Partition tasks see the same token and finish their batch.
                    assignments_done = true;
                }
                next = self.source.next_assignment(), if !assignments_done => match next {
                    Ok(Some(Assignment::Assigned(list))) => {
                        for p in list {
                            parts.start(&self, p, &stop, false);
                        }
                    }
                    Ok(Some(Assignment::Revoked(list))) => {
                        for p in list {
                            if let Some((_, t)) = parts.running.get(&p) {
                                t.cancel();
                            }
                        }
                    }
                    Ok(None) => assignments_done = true,
                    Err(e) => {
                        failure = Some(self.source_err(e));
                        assignments_done = true;
                        stop.cancel();
                    }
                },
                Some(joined) = parts.tasks.join_next(), if !parts.tasks.is_empty() => {
                    let (partition, id, result) = match joined {
                        Ok(v) => v,
                        Err(e) => (String::new(), 0, Err(RunError::Task {
                            connector: self.name.clone(),
                            message: e.to_string(),
                        })),
                    };
                    if parts.running.get(&partition).is_some_and(|(mine, _)| *mine == id) {
                        parts.running.remove(&partition);
                    }
                    let free = !parts.running.contains_key(&partition);
                    match result {
                        Ok(PartitionEnd::Finished) => debug!(connector = %self.name, partition, "partition finished"),
                        // Not `assignments_done`: a bounded source has handed out all
                        // its partitions, and this one must still finish.
                        Ok(PartitionEnd::Reopen) if !stop.is_cancelled() && free => {
                            parts.start(&self, partition, &stop, false);
                        }
                        Ok(PartitionEnd::Reopen) => {}
                        Ok(PartitionEnd::Fenced) => {
                            self.stats.fenced(&partition);
                            warn!(connector = %self.name, partition, "partition fenced by a newer runner: dropped");
                            // A group normally takes the partition away soon. If
                            // it still names this runner after a pause, this
                            // runner is its owner and opens it again; otherwise
                            // nobody would read it until the next rebalance.
                            if !assignments_done && free && self.source.still_assigned(&partition) {
                                parts.start(&self, partition, &stop, true);
                            }
                        }
                        Err(e) => {
                            // One partition's permanent error stops the connector:
                            // the others commit what they have and stop too.
                            if failure.is_none() {
                                failure = Some(e);
                            }
                            stop.cancel();
                        }
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The partition tasks of one run of a connector.
#[derive(Default)]
struct PartitionTasks {
    tasks: JoinSet<(String, u64, Result<PartitionEnd, RunError>)>,
    /// Partition -> (its task's number, its stop token). A partition
    /// revoked and assigned again can briefly have two tasks: the old one
    /// finishing its batch (the sink's epoch fences it if it is late).
    running: HashMap<String, (u64, CancellationToken)>,
    spawned: u64,
}

impl PartitionTasks {
    /// Read and commit `partition` until `stop`. `after_fence`: first wait
    /// [`REOPEN_AFTER_FENCE`], and open it only if the source still assigns
    /// it to this runner.
    fn start(
        &mut self,
        conn: &Arc<Connector>,
        partition: String,
        stop: &CancellationToken,
        after_fence: bool,
    ) {
        let token = stop.child_token();
        self.spawned += 1;
        let id = self.spawned;
        self.running.insert(partition.clone(), (id, token.clone()));
        let me = conn.clone();
        // Every line logged for this partition names it.
        let span = info_span!("partition", connector = %conn.name, partition = %partition);
        self.tasks.spawn(async move {
            if after_fence {
                tokio::select! {
                    _ = token.cancelled() => return (partition, id, Ok(PartitionEnd::Finished)),
                    _ = tokio::time::sleep(REOPEN_AFTER_FENCE) => {}
                }
                if !me.source.still_assigned(&partition) {
                    return (partition, id, Ok(PartitionEnd::Finished));
                }
                info!(connector = %me.name, partition, "the group still assigns this fenced partition here: opening it again");
            }
            let r = me
                .clone()
                .run_partition(&partition, token.clone())
                .instrument(span)
                .await;
            match r {
                // Stopped (shutdown, pause, revoked) while an operation was
                // being retried: abandoned, not failed. Nothing past the
                // last commit counts as done; it is read again.
                Err(e) if token.is_cancelled() && e.retriable() => {
                    warn!(connector = %me.name, partition, error = %e, "stopped while retrying: what did not commit is read again on the next start");
                    (partition, id, Ok(PartitionEnd::Finished))
                }
                r => (partition, id, r),
            }
        });
    }
}

/// An upsert sink with no `key` listed (a table template's): each table is
/// keyed on its source table's primary key, learnt from the message key.
fn learns_key(info: &idem_core::SinkInfo) -> bool {
    info.rows.mode == idem_config::WriteMode::Upsert && info.rows.key.is_empty()
}
