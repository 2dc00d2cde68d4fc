//! One connector at run time: assignments in, one task pair per partition
//! (reader -> bounded channel -> batcher/committer), the commit protocol
//! applied to every batch.

use crate::deadletter::{DeadLetter, DeadLetterError, DeadLetters, ErrorClass};
use crate::dedup::{Ids, LazyStore, Stage};
use crate::plugins::{ConnectorConfig, SinkContext};
use crate::stats::{Committed, Stats};
use idem_config::{ErrorPolicy, Guarantee, OnLoss, RetryConfig};
use idem_core::failpoint::{self, AFTER_COMMIT, BEFORE_COMMIT};
use idem_core::{
    Assignment, Batch, CommitStats, Mapper, Message, PartitionReader, PartitionRef, ReadStatus,
    Record, Sink, SinkError, Source, SourceError,
};
use idem_dedup_store::DedupStore;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// Messages per read call, and per chunk sent to the committer.
const READ_CHUNK: usize = 1024;

/// Chunks of one partition mapped ahead of the one being sent.
const MAPPING_AHEAD: usize = 2;

/// How long a fenced partition waits before it is opened again, when the
/// source still assigns it to this runner (longer than a rebalance takes).
const REOPEN_AFTER_FENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Chunks in flight between a partition's reader and its committer: about
/// one batch, so the next batch is read and mapped while the current one
/// commits, and the reader blocks (backpressure) beyond that.
fn channel_chunks(max_records: usize) -> usize {
    (max_records / READ_CHUNK + 1).clamp(2, 1024)
}

/// Why a connector stopped before finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("connector `{connector}` requires {required}, but its {sink} sink gives {given}: {why}. Use a sink mode that gives {required}, or set guarantee = \"{given}\" to accept it")]
    Guarantee {
        connector: String,
        sink: &'static str,
        required: Guarantee,
        given: Guarantee,
        why: String,
    },
    #[error("connector `{connector}`: sink: {source}")]
    Sink {
        connector: String,
        #[source]
        source: SinkError,
    },
    #[error("connector `{connector}`: {partition}: the batch of offsets {first_offset}..{next_offset} did not commit (its position is not stored: it is read again on restart): {source}")]
    Commit {
        connector: String,
        partition: String,
        first_offset: u64,
        next_offset: u64,
        #[source]
        source: SinkError,
    },
    #[error("connector `{connector}`: source: {source}")]
    Source {
        connector: String,
        #[source]
        source: SourceError,
    },
    #[error("connector `{connector}`: {partition} offset {offset}: {reason} (errors = \"fail\" stops here; everything before it is committed)")]
    BadMessage {
        connector: String,
        partition: String,
        offset: u64,
        reason: String,
    },
    #[error("connector `{connector}`: {source}")]
    DeadLetter {
        connector: String,
        #[source]
        source: DeadLetterError,
    },
    #[error("connector `{connector}`: {message}")]
    DeadLetterConfig { connector: String, message: String },
    #[error("connector `{connector}`: {partition} offset {offset}: more than dead_letters.max = {max} messages dead-lettered in this run; the input or the mapping looks wrong. Nothing from this batch on is committed: fix the cause (see the dead letters) or raise dead_letters.max, then restart")]
    TooManyDeadLetters {
        connector: String,
        partition: String,
        offset: u64,
        max: u64,
    },
    #[error("connector `{connector}`: {source}{advice}")]
    Dedup {
        connector: String,
        #[source]
        source: idem_dedup_store::DedupError,
        advice: &'static str,
    },
    #[error("connector `{connector}`: dedup: {message}")]
    DedupConfig { connector: String, message: String },
    #[error("connector `{connector}`: task failed: {message}")]
    Task { connector: String, message: String },
    /// The dedup store lost the partition's position with its ids, and
    /// `on_loss = "warn"` accepts it: the partition opens again (a new
    /// epoch, from the source's start).
    #[error("connector `{connector}`: {partition}: the dedup store lost this partition's position; opening it again")]
    Reopen {
        connector: String,
        partition: String,
    },
}

impl RunError {
    /// Whether more tries could have cleared it (a transient error of the
    /// sink, source, dead letters or dedup store).
    pub fn retriable(&self) -> bool {
        match self {
            RunError::Sink { source, .. } | RunError::Commit { source, .. } => {
                source.is_retriable()
            }
            RunError::Source { source, .. } => source.is_retriable(),
            RunError::DeadLetter { source, .. } => Retriable::is_retriable(source),
            RunError::Dedup { source, .. } => source.is_retriable(),
            _ => false,
        }
    }
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
}

impl Connector {
    /// Build from config without I/O; refuse a guarantee the sink cannot give.
    pub fn build(name: &str, cfg: ConnectorConfig) -> Result<Connector, RunError> {
        Connector::build_with(name, cfg, Arc::new(Stats::default()))
    }

    /// [`Connector::build`], counting into `stats`.
    pub fn build_with(
        name: &str,
        cfg: ConnectorConfig,
        stats: Arc<Stats>,
    ) -> Result<Connector, RunError> {
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
        let (ids, store) = match dedup_cfg {
            None => (None, None),
            Some(d) => {
                let source = d.id_source().map_err(|e| RunError::DedupConfig {
                    connector: name.into(),
                    message: e.message,
                })?;
                (
                    Some(Ids::new(name, source)),
                    Some(Arc::new(LazyStore::new(name, d))),
                )
            }
        };
        let ctx = SinkContext {
            store: store
                .clone()
                .map(|s| s as Arc<dyn idem_dedup_store::DedupStore>),
            rejects: dead_letters.clone(),
        };
        let sink = cfg.sink.build(&cfg.columns, ctx);
        let info = sink.info();
        if cfg.guarantee == Guarantee::ExactlyOnce && info.guarantee != Guarantee::ExactlyOnce {
            return Err(RunError::Guarantee {
                connector: name.into(),
                sink: cfg.sink.kind(),
                required: cfg.guarantee,
                given: info.guarantee,
                why: info.why,
            });
        }
        let mapper = Mapper::new(
            &cfg.columns,
            &info.key_columns,
            info.deletes,
            cfg.tombstone_field.clone(),
        );
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
            cfg,
        })
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
                        Ok(()) => debug!(connector = %self.name, partition, "partition finished"),
                        // Not `assignments_done`: a bounded source has handed out all
                        // its partitions, and this one must still finish.
                        Err(RunError::Reopen { .. }) if !stop.is_cancelled() && free => {
                            parts.start(&self, partition, &stop, false);
                        }
                        Err(RunError::Reopen { .. }) => {}
                        Err(RunError::Sink { source: SinkError::Fenced { .. }, .. }) => {
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

    async fn run_partition(
        self: Arc<Self>,
        partition: &str,
        stop: CancellationToken,
    ) -> Result<(), RunError> {
        let pref = PartitionRef::new(&self.name, self.source.name(), partition);
        let retry = &self.cfg.retry;
        // Counted as opening until the reader is positioned: readiness waits.
        let opening = self.stats.opening();
        let opened = async {
            let opened = retry_transient(retry, &self.stats, "open the partition", &stop, || {
                self.sink.open(&pref)
            })
            .await
            .map_err(|e| self.sink_err(e))?;
            let reader = self
                .source
                .open(partition, opened.next_offset)
                .await
                .map_err(|e| self.source_err(e))?;
            Ok::<_, RunError>((opened, reader))
        }
        .await;
        drop(opening);
        let (opened, reader) = opened?;
        info!(
            connector = %self.name,
            partition,
            epoch = opened.epoch,
            resume_at = ?opened.next_offset,
            "partition opened"
        );
        if let Some(o) = opened.next_offset {
            self.stats.set_position(partition, o);
        }
        let (tx, rx) = mpsc::channel(channel_chunks(self.cfg.batch.max_records));
        let reading = tokio::spawn(read_loop(
            self.clone(),
            Arc::from(partition),
            reader,
            tx,
            stop.clone(),
        ));
        let result = self.commit_loop(&pref, opened.epoch, rx, &stop).await;
        reading.abort();
        result
    }

    /// Batch what the reader sends; commit on size, bytes or linger.
    async fn commit_loop(
        &self,
        pref: &PartitionRef,
        epoch: i64,
        mut rx: mpsc::Receiver<Result<Vec<Item>, RunError>>,
        stop: &CancellationToken,
    ) -> Result<(), RunError> {
        let batching = &self.cfg.batch;
        let mut pending = Pending::default();
        let mut deadline: Option<Instant> = None;
        loop {
            let linger = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                chunk = rx.recv() => match chunk {
                    Some(Ok(items)) => {
                        for item in items {
                            if let Item::Fatal { offset, reason } = item {
                                self.flush(pref, epoch, &mut pending, stop).await?;
                                return Err(RunError::BadMessage {
                                    connector: self.name.clone(),
                                    partition: pref.partition.to_string(),
                                    offset,
                                    reason,
                                });
                            }
                            if pending.is_empty() {
                                deadline = Some(Instant::now() + batching.linger);
                            }
                            pending.push(item);
                            if pending.records.len() >= batching.max_records
                                || pending.bytes >= batching.max_bytes
                            {
                                self.flush(pref, epoch, &mut pending, stop).await?;
                                deadline = None;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        self.flush(pref, epoch, &mut pending, stop).await?;
                        return Err(e);
                    }
                    None => {
                        // Reader finished (end of input, or stop): commit the rest.
                        return self.flush(pref, epoch, &mut pending, stop).await;
                    }
                },
                _ = linger => {
                    self.flush(pref, epoch, &mut pending, stop).await?;
                    deadline = None;
                }
            }
        }
    }

    /// Dead letters durable, then one atomic commit, then the ack.
    async fn flush(
        &self,
        pref: &PartitionRef,
        epoch: i64,
        pending: &mut Pending,
        stop: &CancellationToken,
    ) -> Result<(), RunError> {
        let Some(range) = pending.range else {
            return Ok(());
        };
        let taken = std::mem::take(pending);
        let max = self.cfg.dead_letters.max;
        if max > 0 && !taken.dead.is_empty() {
            let so_far = self.stats.snapshot().dead_lettered;
            if so_far + taken.dead.len() as u64 > max {
                return Err(RunError::TooManyDeadLetters {
                    connector: self.name.clone(),
                    partition: pref.partition.to_string(),
                    offset: taken.dead[0].offset,
                    max,
                });
            }
        }
        retry_transient(
            &self.cfg.retry,
            &self.stats,
            "write dead letters",
            stop,
            || self.dead_letters.write(pref, &taken.dead),
        )
        .await
        .map_err(|source| RunError::DeadLetter {
            connector: self.name.clone(),
            source,
        })?;
        let mut records = taken.records;
        let mut skipped = 0;
        let mut reserved = None;
        if let Some(stage) = &self.dedup {
            let f = retry_transient(
                &self.cfg.retry,
                &self.stats,
                "reserve message ids",
                stop,
                || stage.filter(&pref.partition, epoch, range.0, &records),
            )
            .await
            .map_err(|e| self.dedup_err(e))?;
            let mut keep = f.keep.iter();
            records.retain(|_| keep.next().copied().unwrap_or(true));
            skipped = f.skipped;
            reserved = Some((f.owner, f.confirm));
        }
        let n_records = records.len() as u64;
        let batch = Arc::new(Batch {
            partition: pref.clone(),
            epoch,
            records,
            first_offset: range.0,
            next_offset: range.1,
        });
        failpoint::hit(BEFORE_COMMIT);
        let started = Instant::now();
        let committed = self.commit_isolating(batch.clone(), stop).await;
        let commit_elapsed = started.elapsed();
        let stats = match committed {
            Ok(s) => s,
            Err(e) if lost_store(&e).is_some() => {
                // The store lost its data between this batch's reservation
                // and its position: its ids and positions are gone alike.
                let store = lost_store(&e).unwrap_or_default();
                let Some(stage) = self.dedup.as_ref().filter(|s| s.on_loss == OnLoss::Warn) else {
                    return Err(self.dedup_err(idem_dedup_store::DedupError::Lost { store }));
                };
                warn!(connector = %self.name, partition = %pref.partition, store, "the dedup store lost its ids and this partition's position: copies of messages processed before now will not be recognised; the partition is read again from the source's start and the receiver's idempotency keys keep repeated effects single (on_loss = \"warn\")");
                stage
                    .store
                    .accept_loss()
                    .await
                    .map_err(|e| self.dedup_err(e))?;
                return Err(RunError::Reopen {
                    connector: self.name.clone(),
                    partition: pref.partition.to_string(),
                });
            }
            Err(e) => {
                if let (Some(stage), Some((owner, _))) = (&self.dedup, &reserved) {
                    // Given up: the ids are free again (a crash leaves them
                    // reserved instead; the next owner resolves them).
                    let ids: Vec<&str> = batch
                        .records
                        .iter()
                        .filter_map(|r| r.id.as_deref())
                        .collect();
                    if let Err(re) = stage.store.release(owner, &ids).await {
                        warn!(connector = %self.name, partition = %pref.partition, error = %re, "could not release the batch's message ids");
                    }
                }
                return Err(match e {
                    // Fencing is handled by partition; other errors say
                    // which batch could not commit.
                    SinkError::Fenced { .. } => self.sink_err(e),
                    e => RunError::Commit {
                        connector: self.name.clone(),
                        partition: pref.partition.to_string(),
                        first_offset: range.0,
                        next_offset: range.1,
                        source: e,
                    },
                });
            }
        };
        failpoint::hit(AFTER_COMMIT);
        if let (Some(stage), Some((_, confirm))) = (&self.dedup, &reserved) {
            let ids: Vec<&str> = confirm.iter().map(String::as_str).collect();
            // Advisory: an unconfirmed reservation behind a committed
            // position already reads as done (see Stage::filter).
            if let Err(e) = retry_transient(
                &self.cfg.retry,
                &self.stats,
                "confirm message ids",
                stop,
                || stage.store.confirm(&ids),
            )
            .await
            {
                warn!(connector = %self.name, partition = %pref.partition, error = %e, "could not confirm the batch's message ids; later copies are still recognised by position");
            }
        }
        debug!(
            connector = %self.name,
            partition = %pref.partition,
            first_offset = range.0,
            next_offset = range.1,
            records = n_records,
            skipped,
            dead = taken.dead.len(),
            elapsed_ms = commit_elapsed.as_millis() as u64,
            "batch committed"
        );
        self.stats.committed(Committed {
            partition: &pref.partition,
            written: stats.written,
            deduplicated: stats.deduplicated + skipped,
            dead_lettered: taken.dead.len() as u64 + stats.rejected,
            next_offset: range.1,
            elapsed: commit_elapsed,
        });
        if let Err(e) = self.source.ack(&pref.partition, range.1).await {
            // Advisory: the sink holds the position that counts.
            warn!(connector = %self.name, partition = %pref.partition, error = %e, "ack to the source failed");
        }
        Ok(())
    }

    /// Step 3 for `batch`. When the sink refuses data in it
    /// ([`SinkError::Refused`]), the batch is split in halves until each
    /// refused record stands alone; those go to the dead letters with the
    /// sink's reason, and the rest commits in order, each piece with the
    /// position after it, so no message is stuck behind a bad one.
    async fn commit_isolating(
        &self,
        batch: Arc<Batch>,
        stop: &CancellationToken,
    ) -> Result<CommitStats, SinkError> {
        let first = retry_transient(&self.cfg.retry, &self.stats, "commit a batch", stop, || {
            self.sink.commit(batch.clone())
        })
        .await;
        let reason = match first {
            Err(SinkError::Refused(e)) if !batch.records.is_empty() => e,
            other => return other,
        };
        let pref = &batch.partition;
        warn!(connector = %self.name, partition = %pref.partition, first_offset = batch.first_offset, next_offset = batch.next_offset, error = %reason, "the sink refused data in this batch: finding the message(s) it refuses");
        let names: Vec<String> = self.cfg.columns.iter().map(|c| c.name.clone()).collect();
        let mut total = CommitStats::default();
        // The whole batch was just refused: start from its halves.
        let mut pieces = VecDeque::new();
        split_in_halves(
            &mut pieces,
            batch.records.clone(),
            batch.first_offset,
            batch.next_offset,
        );
        while let Some((records, first_offset, next_offset)) = pieces.pop_front() {
            let piece = Arc::new(Batch {
                partition: pref.clone(),
                epoch: batch.epoch,
                records,
                first_offset,
                next_offset,
            });
            let committed = retry_transient(
                &self.cfg.retry,
                &self.stats,
                "commit part of a batch",
                stop,
                || self.sink.commit(piece.clone()),
            )
            .await;
            let refused = match committed {
                Ok(s) => {
                    total.written += s.written;
                    total.deduplicated += s.deduplicated;
                    total.rejected += s.rejected;
                    continue;
                }
                Err(SinkError::Refused(e)) if !piece.records.is_empty() => e,
                Err(e) => return Err(e),
            };
            if piece.records.len() > 1 {
                let mut halves = VecDeque::new();
                split_in_halves(
                    &mut halves,
                    piece.records.clone(),
                    first_offset,
                    next_offset,
                );
                while let Some(half) = halves.pop_back() {
                    pieces.push_front(half);
                }
                continue;
            }
            let records = &piece.records;
            // The one record the sink refuses: a dead letter, then its
            // position commits alone.
            let max = self.cfg.dead_letters.max;
            if max > 0 && self.stats.snapshot().dead_lettered + total.rejected + 1 > max {
                return Err(SinkError::Permanent(Box::new(
                    RunError::TooManyDeadLetters {
                        connector: self.name.clone(),
                        partition: pref.partition.to_string(),
                        offset: records[0].offset,
                        max,
                    },
                )));
            }
            let raw = serde_json::to_vec(&records[0].to_json_object(&names, 0)).ok();
            let letter = DeadLetter {
                offset: records[0].offset,
                class: ErrorClass::Refused,
                reason: idem_config::redact::text(&format!("refused by the sink: {refused}"))
                    .into_owned(),
                raw,
            };
            warn!(connector = %self.name, partition = %pref.partition, offset = letter.offset, reason = %letter.reason, "dead-lettered a message the sink refuses");
            retry_transient(
                &self.cfg.retry,
                &self.stats,
                "write dead letters",
                stop,
                || self.dead_letters.write(pref, std::slice::from_ref(&letter)),
            )
            .await
            .map_err(|e| SinkError::Permanent(Box::new(e)))?;
            total.rejected += 1;
            // Its position goes with the next piece (they are contiguous),
            // or alone when it was the last.
            match pieces.front_mut() {
                Some(next) => next.1 = first_offset,
                None => pieces.push_front((Vec::new(), first_offset, next_offset)),
            }
        }
        Ok(total)
    }
}

/// `records` (covering offsets `first..next`) as two contiguous pieces
/// appended to `pieces`, or as one when it holds a single record.
fn split_in_halves(
    pieces: &mut VecDeque<(Vec<Record>, u64, u64)>,
    mut records: Vec<Record>,
    first: u64,
    next: u64,
) {
    if records.len() < 2 {
        pieces.push_back((records, first, next));
        return;
    }
    let right = records.split_off(records.len() / 2);
    let middle = right[0].offset;
    pieces.push_back((records, first, middle));
    pieces.push_back((right, middle, next));
}

/// The partition tasks of one run of a connector.
#[derive(Default)]
struct PartitionTasks {
    tasks: JoinSet<(String, u64, Result<(), RunError>)>,
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
                    _ = token.cancelled() => return (partition, id, Ok(())),
                    _ = tokio::time::sleep(REOPEN_AFTER_FENCE) => {}
                }
                if !me.source.still_assigned(&partition) {
                    return (partition, id, Ok(()));
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
                    (partition, id, Ok(()))
                }
                r => (partition, id, r),
            }
        });
    }
}

/// What the reader hands the committer, in partition order.
pub enum Item {
    Row {
        record: Record,
        next_offset: u64,
        bytes: usize,
    },
    Dead {
        letter: DeadLetter,
        next_offset: u64,
    },
    /// A bad message under `errors = "fail"`.
    Fatal { offset: u64, reason: String },
}

#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    dead: Vec<DeadLetter>,
    bytes: usize,
    /// First offset covered and the next offset after the last.
    range: Option<(u64, u64)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.range.is_none()
    }

    fn push(&mut self, item: Item) {
        let (offset, next) = match item {
            Item::Row {
                record,
                next_offset,
                bytes,
            } => {
                let o = record.offset;
                self.bytes += bytes;
                self.records.push(record);
                (o, next_offset)
            }
            Item::Dead {
                letter,
                next_offset,
            } => {
                let o = letter.offset;
                // Dead letters hold their raw bytes until the batch: they
                // count toward max_bytes too.
                self.bytes += letter.raw.as_ref().map_or(0, Vec::len) + letter.reason.len();
                self.dead.push(letter);
                (o, next_offset)
            }
            Item::Fatal { .. } => return,
        };
        self.range = Some(match self.range {
            Some((first, _)) => (first, next),
            None => (offset, next),
        });
    }
}

pub(crate) fn map_message(conn: &Connector, partition: &str, msg: Message) -> Item {
    let failure = match &msg.poison {
        Some(reason) => Err((ErrorClass::Poison, reason.clone())),
        None => conn
            .mapper
            .map(&msg)
            .map_err(|e| (ErrorClass::Mapping, e.reason))
            .and_then(|record| {
                conn.sink
                    .check_record(&record)
                    .map(|()| record)
                    .map_err(|reason| (ErrorClass::Mapping, reason))
            }),
    };
    let failure = match (failure, &conn.ids) {
        (Ok(mut record), Some(ids)) => ids
            .of(partition, &msg)
            .map(|id| {
                record.id = Some(id);
                record
            })
            .map_err(|reason| (ErrorClass::MessageId, reason)),
        (other, _) => other,
    };
    match failure {
        Ok(record) => Item::Row {
            record,
            next_offset: msg.next_offset,
            bytes: msg.size(),
        },
        Err((_, reason)) if conn.cfg.errors == ErrorPolicy::Fail => Item::Fatal {
            offset: msg.offset,
            reason,
        },
        Err((class, reason)) => Item::Dead {
            next_offset: msg.next_offset,
            letter: DeadLetter::new(&msg, class, reason),
        },
    }
}

async fn read_loop(
    conn: Arc<Connector>,
    partition: Arc<str>,
    mut reader: Box<dyn PartitionReader>,
    tx: mpsc::Sender<Result<Vec<Item>, RunError>>,
    stop: CancellationToken,
) {
    // Chunks being mapped on the runtime's threads while the next is read,
    // so a busy partition's parsing is not bound to one core; they leave
    // in read order.
    let mut mapping: VecDeque<tokio::task::JoinHandle<Vec<Item>>> = VecDeque::new();
    // Read-ahead is bounded in bytes as well as in messages: a chunk holds
    // about a quarter of `max_bytes`, sized from the messages seen so far,
    // so 1 MB messages travel a few at a time instead of 1,024.
    let chunk_bytes = (conn.cfg.batch.max_bytes / 4).max(1);
    let mut chunk = 1;
    loop {
        let mut msgs = Vec::with_capacity(chunk);
        let status = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = reader.read(chunk, &mut msgs) => r,
        };
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(conn.source_err(e))).await;
                return;
            }
        };
        // A short read means the source has caught up: hand over all that
        // is mapped rather than hold it until more arrives.
        let caught_up = msgs.len() < chunk || status == ReadStatus::End;
        if !msgs.is_empty() {
            let bytes: usize = msgs.iter().map(Message::size).sum::<usize>().max(1);
            let per_message = bytes.div_ceil(msgs.len());
            chunk = (chunk_bytes / per_message).clamp(1, READ_CHUNK);
            conn.stats.read(&partition, msgs.len() as u64);
            let conn = conn.clone();
            let partition = partition.clone();
            mapping.push_back(tokio::spawn(async move {
                msgs.into_iter()
                    .map(|m| map_message(&conn, &partition, m))
                    .collect()
            }));
        }
        while mapping.len() > MAPPING_AHEAD || (caught_up && !mapping.is_empty()) {
            let Some(next) = mapping.pop_front() else {
                break;
            };
            let items = match next.await {
                Ok(items) => items,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return, // the runtime is shutting down
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = tx.send(Ok(items)) => if sent.is_err() { return },
            }
        }
        if status == ReadStatus::End {
            return;
        }
    }
}

/// The store a sink error says lost its data, if it says so (a dedup
/// store keeping a sink's positions).
fn lost_store(e: &SinkError) -> Option<String> {
    let (SinkError::Permanent(b) | SinkError::Transient(b)) = e else {
        return None;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(b.as_ref());
    while let Some(err) = cur {
        if let Some(idem_dedup_store::DedupError::Lost { store }) =
            err.downcast_ref::<idem_dedup_store::DedupError>()
        {
            return Some(store.clone());
        }
        cur = err.source();
    }
    None
}

/// An error that says whether trying again can help.
pub trait Retriable {
    fn is_retriable(&self) -> bool;
}

impl Retriable for SinkError {
    fn is_retriable(&self) -> bool {
        SinkError::is_retriable(self)
    }
}

impl Retriable for idem_dedup_store::DedupError {
    fn is_retriable(&self) -> bool {
        idem_dedup_store::DedupError::is_retriable(self)
    }
}

/// The delay before retry `n` (0 for the first): `initial_backoff * 2^n`
/// capped at `max_backoff`, then jittered down to between half and all of
/// it, so that runners do not retry in step and the cap always holds.
pub fn backoff_delay(cfg: &RetryConfig, n: u32) -> Duration {
    use rand::{Rng, SeedableRng};
    let grown = cfg
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(n.min(31)));
    grown
        .min(cfg.max_backoff)
        .mul_f64(rand::rngs::SmallRng::from_os_rng().random_range(0.5..=1.0))
}

/// Capped exponential backoff with jitter on transient errors; permanent
/// errors (and `Fenced`) return at once. `stop` ends a backoff at once:
/// the last error is returned, and the caller, seeing `stop` cancelled,
/// abandons the operation instead of failing (see `RunError::retriable`).
pub async fn retry_transient<T, E, F, Fut>(
    cfg: &RetryConfig,
    stats: &Stats,
    what: &str,
    stop: &CancellationToken,
    mut f: F,
) -> Result<T, E>
where
    E: Retriable + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries: usize = 0;
    let result = loop {
        tries += 1;
        match f().await {
            Ok(v) => break Ok(v),
            Err(e) => {
                let more = cfg.max_attempts == 0 || tries < cfg.max_attempts;
                if !e.is_retriable() || !more || stop.is_cancelled() {
                    break Err(e);
                }
                let delay = backoff_delay(cfg, (tries - 1) as u32);
                stats.retrying(&format!("failed to {what}: {e}"));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "failed to {what}; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {
                        info!(error = %e, "stopping: no more tries to {what}");
                        break Err(e);
                    }
                }
            }
        }
    };
    match &result {
        Ok(_) => stats.succeeded(),
        Err(e) => {
            stats.error(&format!("failed to {what}: {e}"));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    //! The pipeline against in-memory sources and sinks.
    use super::*;
    use async_trait::async_trait;
    use idem_core::{CommitStats, Opened, StoredPosition};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// One partition `p`: line i at offset i.
    struct MemSource {
        lines: Vec<Vec<u8>>,
    }

    #[async_trait]
    impl Source for MemSource {
        fn name(&self) -> &str {
            "mem"
        }
        async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError> {
            Ok(Some(Assignment::Assigned(vec!["p".into()])))
        }
        async fn open(
            &self,
            _partition: &str,
            start: Option<u64>,
        ) -> Result<Box<dyn PartitionReader>, SourceError> {
            Ok(Box::new(MemReader {
                lines: self.lines.clone(),
                at: start.unwrap_or(0) as usize,
            }))
        }
    }

    struct MemReader {
        lines: Vec<Vec<u8>>,
        at: usize,
    }

    #[async_trait]
    impl PartitionReader for MemReader {
        async fn read(
            &mut self,
            max: usize,
            out: &mut Vec<Message>,
        ) -> Result<ReadStatus, SourceError> {
            if self.at >= self.lines.len() {
                return Ok(ReadStatus::End);
            }
            let end = (self.at + max).min(self.lines.len());
            for i in self.at..end {
                out.push(Message {
                    offset: i as u64,
                    next_offset: i as u64 + 1,
                    key: None,
                    value: Some(self.lines[i].clone()),
                    poison: None,
                    meta: Default::default(),
                });
            }
            self.at = end;
            Ok(ReadStatus::Data)
        }
    }

    #[derive(Default)]
    struct MemSink {
        /// (first_offset, next_offset, records) per successful commit.
        commits: Mutex<Vec<(u64, u64, usize)>>,
        attempts: AtomicUsize,
        transient_failures: AtomicUsize,
        permanent: bool,
        /// Ids whose records make a commit fail as refused data.
        refuse: Vec<i64>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("simulated")]
    struct Simulated;

    #[async_trait]
    impl Sink for MemSink {
        fn info(&self) -> idem_core::SinkInfo {
            idem_core::SinkInfo {
                guarantee: Guarantee::ExactlyOnce,
                why: "memory".into(),
                key_columns: vec![],
                deletes: false,
            }
        }
        async fn prepare(&self) -> Result<(), SinkError> {
            Ok(())
        }
        async fn open(&self, _p: &PartitionRef) -> Result<Opened, SinkError> {
            Ok(Opened {
                epoch: 1,
                next_offset: None,
            })
        }
        async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.permanent {
                return Err(SinkError::Permanent(Box::new(Simulated)));
            }
            if batch
                .records
                .iter()
                .any(|r| matches!(r.values[0], idem_core::Value::BigInt(id) if self.refuse.contains(&id)))
            {
                return Err(SinkError::Refused(Box::new(Simulated)));
            }
            if self
                .transient_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SinkError::Transient(Box::new(Simulated)));
            }
            self.commits.lock().unwrap().push((
                batch.first_offset,
                batch.next_offset,
                batch.records.len(),
            ));
            Ok(CommitStats {
                written: batch.records.len() as u64,
                deduplicated: 0,
                rejected: 0,
            })
        }
        async fn positions(&self, _c: &str) -> Result<Vec<StoredPosition>, SinkError> {
            Ok(vec![])
        }
        async fn describe(&self) -> Result<String, SinkError> {
            Ok("memory".into())
        }
    }

    fn connector(sink: Arc<MemSink>, lines: Vec<Vec<u8>>, batch: &str) -> Arc<Connector> {
        let dir = tempfile::tempdir().unwrap().keep();
        let text = format!(
            r#"
[connectors.t]
dead_letter = "{}"
[connectors.t.source]
type = "file"
path = "unused"
[connectors.t.sink]
type = "stdout"
[connectors.t.batch]
{batch}
[connectors.t.retry]
initial_backoff = "1ms"
max_backoff = "2ms"
max_attempts = 4
[[connectors.t.columns]]
name = "id"
type = "bigint"
required = true
"#,
            dir.join("dl.jsonl").display()
        );
        let cfg: crate::plugins::Config =
            idem_config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let (name, mut c) = cfg.connectors.into_iter().next().unwrap();
        c.guarantee = Guarantee::AtLeastOnce;
        let mut conn = Connector::build(&name, c).unwrap();
        conn.source = Arc::new(MemSource { lines });
        conn.sink = sink;
        Arc::new(conn)
    }

    fn lines(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{{\"id\":{i}}}").into_bytes())
            .collect()
    }

    async fn run_partition(conn: &Arc<Connector>) -> Result<(), RunError> {
        conn.clone()
            .run_partition("p", CancellationToken::new())
            .await
    }

    #[tokio::test]
    async fn batches_close_at_max_records_and_cover_every_offset() {
        let sink = Arc::new(MemSink::default());
        let conn = connector(sink.clone(), lines(25), "max_records = 10\nlinger = \"1h\"");
        run_partition(&conn).await.unwrap();
        assert_eq!(
            *sink.commits.lock().unwrap(),
            [(0, 10, 10), (10, 20, 10), (20, 25, 5)]
        );
        let s = conn.stats.snapshot();
        assert_eq!((s.read, s.written, s.batches), (25, 25, 3));
        assert_eq!(s.positions.get("p"), Some(&25));
    }

    #[tokio::test]
    async fn refused_records_are_isolated_dead_lettered_and_the_rest_commits() {
        let sink = Arc::new(MemSink {
            refuse: vec![3, 4, 17],
            ..Default::default()
        });
        let conn = connector(sink.clone(), lines(25), "max_records = 20\nlinger = \"1h\"");
        run_partition(&conn).await.unwrap();
        let commits = sink.commits.lock().unwrap().clone();
        // Every offset is covered once, in order, by the committed pieces.
        let mut at = 0;
        let mut rows = 0;
        for &(first, next, n) in &commits {
            assert_eq!(first, at, "{commits:?}");
            assert!(next > first || n == 0, "{commits:?}");
            at = next;
            rows += n;
        }
        assert_eq!((at, rows), (25, 22), "{commits:?}");
        let s = conn.stats.snapshot();
        assert_eq!((s.written, s.dead_lettered), (22, 3));
        let DeadLetters::File(f) = &*conn.dead_letters else {
            panic!("file dead letters")
        };
        let text = std::fs::read_to_string(f.path()).unwrap();
        let letters: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let offsets: Vec<u64> = letters
            .iter()
            .map(|l| l["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [3, 4, 17]);
        assert_eq!(letters[0]["error_class"], "refused");
        assert!(letters[0]["reason"].as_str().unwrap().contains("simulated"));
        assert_eq!(letters[0]["raw"], "{\"id\":3}");
    }

    #[test]
    fn backoff_grows_and_never_passes_its_cap_jitter_included() {
        let cfg = RetryConfig {
            max_attempts: 0,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
        };
        for n in 0..200 {
            let d = backoff_delay(&cfg, n);
            assert!(d <= cfg.max_backoff, "retry {n}: {d:?}");
            let uncapped = Duration::from_millis(100).saturating_mul(1 << n.min(20));
            assert!(d >= uncapped.min(cfg.max_backoff) / 2, "retry {n}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_backoff_at_once() {
        let cfg = RetryConfig {
            max_attempts: 0,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
        };
        let stats = Stats::default();
        let stop = CancellationToken::new();
        let tries = AtomicUsize::new(0);
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.cancel();
        });
        let started = Instant::now();
        let r: Result<(), SinkError> = retry_transient(&cfg, &stats, "commit", &stop, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(SinkError::Transient(Box::new(Simulated))) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        // Paused time: the stop came after 1 s, not after the 15-30 s backoff.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn batches_close_at_max_bytes() {
        let sink = Arc::new(MemSink::default());
        // Each line is 8 bytes: {"id":N}
        let conn = connector(sink.clone(), lines(10), "max_bytes = 24\nlinger = \"1h\"");
        run_partition(&conn).await.unwrap();
        let sizes: Vec<usize> = sink.commits.lock().unwrap().iter().map(|c| c.2).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
    }

    #[tokio::test]
    async fn transient_errors_resend_the_whole_batch() {
        let sink = Arc::new(MemSink::default());
        sink.transient_failures.store(2, Ordering::SeqCst);
        let conn = connector(sink.clone(), lines(5), "max_records = 100");
        run_partition(&conn).await.unwrap();
        assert_eq!(*sink.commits.lock().unwrap(), [(0, 5, 5)]);
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 3);
        assert_eq!(conn.stats.snapshot().retries, 2);
    }

    #[tokio::test]
    async fn transient_errors_give_up_after_max_attempts() {
        let sink = Arc::new(MemSink::default());
        sink.transient_failures.store(100, Ordering::SeqCst);
        let conn = connector(sink.clone(), lines(5), "max_records = 100");
        assert!(run_partition(&conn).await.is_err());
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 4);
        assert!(sink.commits.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let sink = Arc::new(MemSink {
            permanent: true,
            ..MemSink::default()
        });
        let conn = connector(sink.clone(), lines(5), "max_records = 100");
        let err = run_partition(&conn).await.unwrap_err();
        assert!(err.to_string().contains("simulated"), "{err}");
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dead_letters_advance_the_position_without_a_row() {
        let sink = Arc::new(MemSink::default());
        let mut input = lines(4);
        input[1] = b"nope".to_vec();
        input[3] = b"{\"id\":\"x\"}".to_vec();
        let conn = connector(sink.clone(), input, "max_records = 100");
        run_partition(&conn).await.unwrap();
        assert_eq!(*sink.commits.lock().unwrap(), [(0, 4, 2)]);
        let s = conn.stats.snapshot();
        assert_eq!((s.read, s.written, s.dead_lettered), (4, 2, 2));
        let dl = std::fs::read_to_string(conn.dead_letters.describe()).unwrap();
        assert_eq!(dl.lines().count(), 2);
    }
}
