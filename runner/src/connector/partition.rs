//! One partition: open it in the sink, read and map its messages ahead of
//! the committer, and cut batches by count, bytes and linger.

use super::staged::Staged;
use super::{Connector, PartitionEnd, RunError};
use crate::deadletter::{DeadLetter, ErrorClass};
use crate::retry::retry_transient;
use idem_config::{BatchConfig, ErrorPolicy};
use idem_core::{Message, PartitionReader, PartitionRef, ReadStatus, Record, SinkError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Messages per read call, and per chunk sent to the committer.
const READ_CHUNK: usize = 1024;

/// Chunks of one partition mapped ahead of the one being sent.
const MAPPING_AHEAD: usize = 2;

/// How often a reader waiting for its share presses again.
const REPRESS: std::time::Duration = std::time::Duration::from_millis(100);

/// Messages and bytes of them held at once, as two semaphores.
struct Budget {
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_records: usize,
    max_bytes: usize,
}

impl Budget {
    /// `batches` batches' worth of `batch`.
    fn of(batch: &BatchConfig, batches: f64) -> Budget {
        let size = |n: usize| {
            let n = (n as f64 * batches).ceil();
            (n.min(Semaphore::MAX_PERMITS as f64) as usize).max(1)
        };
        let (max_records, max_bytes) = (size(batch.records()), size(batch.max_bytes));
        Budget {
            records: Arc::new(Semaphore::new(max_records)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_records,
            max_bytes,
        }
    }

    /// A share of `records` messages of `bytes`; one larger than the
    /// whole budget takes all of it.
    fn need(&self, records: usize, bytes: usize) -> (u32, u32) {
        let cap = |n: usize, max: usize| u32::try_from(n.clamp(1, max)).unwrap_or(u32::MAX);
        (cap(records, self.max_records), cap(bytes, self.max_bytes))
    }

    fn try_take(&self, records: usize, bytes: usize) -> Option<[OwnedSemaphorePermit; 2]> {
        let (n, b) = self.need(records, bytes);
        let records = self.records.clone().try_acquire_many_owned(n).ok()?;
        let bytes = self.bytes.clone().try_acquire_many_owned(b).ok()?;
        Some([records, bytes])
    }

    async fn take(&self, records: usize, bytes: usize) -> Option<[OwnedSemaphorePermit; 2]> {
        let (n, b) = self.need(records, bytes);
        let records = self.records.clone().acquire_many_owned(n).await.ok()?;
        let bytes = self.bytes.clone().acquire_many_owned(b).await.ok()?;
        Some([records, bytes])
    }
}

/// One partition's pipeline: a batch committing while the next fills and
/// is read ahead, and the quarter batch a chunk can straddle two by.
const PARTITION_BATCHES: f64 = 2.25;

/// A connector's, all partitions together: one partition's, and a batch
/// more for the others, so a partition whose commits are slow cannot hold
/// all of it.
const CONNECTOR_BATCHES: f64 = PARTITION_BATCHES + 1.0;

/// What a connector holds of its messages at a time: each partition at
/// most `PARTITION_BATCHES` batches' worth, in messages and in bytes, and
/// all of them together `CONNECTOR_BATCHES`, whatever their number. A
/// chunk takes its share when it is read and gives it back when the batch
/// it joined has committed, so the bound covers what is read and mapped
/// ahead, the batches filling and those committing.
pub(super) struct ReadAhead {
    all: Budget,
    /// How many times a reader has had to wait for a share: each time,
    /// the batches filling then commit rather than wait for their
    /// linger, to give their share back.
    presses: AtomicU64,
    pressed: Notify,
}

/// A partition's own budget within its connector's.
pub(super) struct PartitionBudget(Budget);

impl PartitionBudget {
    pub(super) fn new(batch: &BatchConfig) -> PartitionBudget {
        PartitionBudget(Budget::of(batch, PARTITION_BATCHES))
    }
}

/// A chunk's share of its partition's budget and of its connector's.
pub(super) struct Held {
    _own: [OwnedSemaphorePermit; 2],
    _all: [OwnedSemaphorePermit; 2],
}

impl ReadAhead {
    pub(super) fn new(batch: &BatchConfig) -> ReadAhead {
        ReadAhead {
            all: Budget::of(batch, CONNECTOR_BATCHES),
            presses: AtomicU64::new(0),
            pressed: Notify::new(),
        }
    }

    /// The share of `records` messages of `bytes`, if free now.
    fn try_hold(&self, own: &PartitionBudget, records: usize, bytes: usize) -> Option<Held> {
        let own = own.0.try_take(records, bytes)?;
        let all = self.all.try_take(records, bytes)?;
        Some(Held {
            _own: own,
            _all: all,
        })
    }

    /// The same share, once batches have committed and given theirs back;
    /// `None` if the budget is closed. Presses now, and again every
    /// `REPRESS` while it waits: a batch begun after a press (its reader
    /// had its share already) is not held past its next. The partition's
    /// own budget first: no two readers ever wait on each other's.
    async fn hold(&self, own: &PartitionBudget, records: usize, bytes: usize) -> Option<Held> {
        let held = async {
            let own = own.0.take(records, bytes).await?;
            let all = self.all.take(records, bytes).await?;
            Some(Held {
                _own: own,
                _all: all,
            })
        };
        tokio::pin!(held);
        loop {
            self.presses.fetch_add(1, Ordering::SeqCst);
            self.pressed.notify_waiters();
            tokio::select! {
                held = &mut held => return held,
                () = tokio::time::sleep(REPRESS) => {}
            }
        }
    }

    /// Messages and bytes, all partitions together.
    pub(super) fn allowance(&self) -> (usize, usize) {
        (self.all.max_records, self.all.max_bytes)
    }

    fn presses(&self) -> u64 {
        self.presses.load(Ordering::SeqCst)
    }
}

/// Chunks queued between a partition's reader and its committer: the
/// read-ahead bounds what they hold; this only bounds the queue itself
/// (a source that catches up often reads chunks of a few messages).
fn channel_chunks(max_records: usize) -> usize {
    max_records.clamp(16, 1 << 20)
}

/// A mapped chunk on its way to the committer, with the read-ahead it holds.
pub(super) struct Chunk {
    items: Vec<Item>,
    held: Option<Held>,
}

impl Connector {
    /// Open `partition` (fence it, find its position), then read, batch
    /// and commit it until its input ends, `stop`, or an error.
    pub(super) async fn run_partition(
        self: Arc<Self>,
        partition: &str,
        stop: CancellationToken,
    ) -> Result<PartitionEnd, RunError> {
        let pref = PartitionRef::new(&self.name, self.source.name(), partition);
        let retry = &self.cfg.retry;
        // Counted as opening until the reader is positioned: readiness waits.
        let opening = self.stats.opening();
        let opened = async {
            let opened =
                match retry_transient(retry, &self.stats, "open the partition", &stop, || {
                    self.sink.open(&pref)
                })
                .await
                {
                    Ok(opened) => opened,
                    // A newer runner opened it meanwhile.
                    Err(SinkError::Fenced { .. }) => return Ok(None),
                    Err(e) => return Err(self.sink_err(e)),
                };
            // A partition just moved here may not be ready to look up or
            // seek (the group is still settling): tried again, not failed.
            let reader = retry_transient(
                retry,
                &self.stats,
                "open the source partition",
                &stop,
                || self.source.open(partition, opened.next_offset),
            )
            .await
            .map_err(|e| self.source_err(e))?;
            Ok::<_, RunError>(Some((opened, reader)))
        }
        .await;
        drop(opening);
        let Some((opened, reader)) = opened? else {
            return Ok(PartitionEnd::Fenced);
        };
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
        if let Some((from, to)) = reader.lost() {
            let lost = to.saturating_sub(from);
            self.stats.lost(partition, lost);
            error!(
                connector = %self.name,
                partition,
                from,
                to,
                lost,
                "{lost} offsets of {partition} ({from}..{to}) were deleted by the source before they were committed: their messages will never reach the sink"
            );
        }
        let (tx, rx) = mpsc::channel(channel_chunks(self.cfg.batch.records()));
        let reading = tokio::spawn(read_loop(
            self.clone(),
            Arc::from(partition),
            reader,
            tx,
            stop.clone(),
        ));
        let position = opened.next_offset.unwrap_or(0);
        let result = self
            .commit_loop(&pref, opened.epoch, position, rx, &stop)
            .await;
        reading.abort();
        result
    }

    /// Batch what the reader sends; commit on size, bytes or linger. The
    /// partition opened at `position`. Effects a sink staged are made
    /// durable once they have waited its `stage_for`, and before the
    /// partition stops reading.
    async fn commit_loop(
        &self,
        pref: &PartitionRef,
        epoch: i64,
        position: u64,
        mut rx: mpsc::Receiver<Result<Chunk, RunError>>,
        stop: &CancellationToken,
    ) -> Result<PartitionEnd, RunError> {
        let batching = &self.cfg.batch;
        let stage_for = self.sink.stage_for();
        let mut pending = Pending::default();
        let mut staged = Staged::new(position);
        let mut deadline: Option<Instant> = None;
        let ahead = &self.read_ahead;
        // The presses made before the batch filling began: later ones are
        // for it (set as each batch begins, below).
        let mut answered = ahead.presses();
        loop {
            // Made before the count is read: a press after it wakes the
            // select below.
            let press = ahead.pressed.notified();
            let presses = ahead.presses();
            if !pending.is_empty() && presses > answered && rx.is_empty() {
                // A reader waits for what this batch holds, and nothing
                // more is on its way to it: commit it now.
                answered = presses;
                if let Some(end) = self
                    .flush(pref, epoch, &mut pending, &mut staged, stop)
                    .await?
                {
                    return Ok(end);
                }
                deadline = None;
                continue;
            }
            let linger = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let roll_at = staged
                .since
                .zip(stage_for)
                .map(|(since, wait)| since + wait);
            let roll = async {
                match roll_at {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                chunk = rx.recv() => match chunk {
                    Some(Ok(chunk)) => {
                        // Its share is given back once its batch commits.
                        pending.held.extend(chunk.held);
                        for item in chunk.items {
                            if let Item::Fatal { offset, reason } = item {
                                if let Some(end) = self.flush(pref, epoch, &mut pending, &mut staged, stop).await? {
                                    return Ok(end);
                                }
                                if let Some(end) = self.flush_staged(pref, &mut staged, stop).await? {
                                    return Ok(end);
                                }
                                return Err(RunError::BadMessage {
                                    connector: self.name.clone(),
                                    partition: pref.partition.to_string(),
                                    offset,
                                    reason,
                                });
                            }
                            if pending.is_empty() {
                                deadline = Some(Instant::now() + batching.linger);
                                // Presses before a batch began were for
                                // the batches before it.
                                answered = ahead.presses();
                            }
                            pending.push(item);
                            if pending.records.len() >= batching.records()
                                || pending.bytes >= batching.max_bytes
                            {
                                if let Some(end) = self.flush(pref, epoch, &mut pending, &mut staged, stop).await? {
                                    return Ok(end);
                                }
                                deadline = None;
                                // A reader that always has more ready would
                                // starve the roll timer below: check it here.
                                if staged.roll_due(stage_for) {
                                    if let Some(end) = self.flush_staged(pref, &mut staged, stop).await? {
                                        return Ok(end);
                                    }
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if let Some(end) = self.flush(pref, epoch, &mut pending, &mut staged, stop).await? {
                            return Ok(end);
                        }
                        if let Some(end) = self.flush_staged(pref, &mut staged, stop).await? {
                            return Ok(end);
                        }
                        return Err(e);
                    }
                    None => {
                        // Reader finished (end of input, or stop): commit the
                        // rest, and make what is staged durable.
                        if let Some(end) = self.flush(pref, epoch, &mut pending, &mut staged, stop).await? {
                            return Ok(end);
                        }
                        let end = self.flush_staged(pref, &mut staged, stop).await?;
                        return Ok(end.unwrap_or(PartitionEnd::Finished));
                    }
                },
                // Looked at again at the top of the loop.
                _ = press, if !pending.is_empty() => {}
                _ = linger => {
                    if let Some(end) = self.flush(pref, epoch, &mut pending, &mut staged, stop).await? {
                        return Ok(end);
                    }
                    deadline = None;
                }
                _ = roll => {
                    if let Some(end) = self.flush_staged(pref, &mut staged, stop).await? {
                        return Ok(end);
                    }
                }
            }
        }
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
    /// Offsets holding no message (see `ReadStatus::Skipped`): the
    /// position moves over them with the next commit.
    Skip { offset: u64, next_offset: u64 },
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) records: Vec<Record>,
    pub(super) dead: Vec<DeadLetter>,
    bytes: usize,
    /// First offset covered and the next offset after the last.
    pub(super) range: Option<(u64, u64)>,
    /// The share of the budgets (its partition's and its connector's)
    /// its messages hold until they commit.
    pub(super) held: Vec<Held>,
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
            Item::Skip {
                offset,
                next_offset,
            } => (offset, next_offset),
            Item::Fatal { .. } => return,
        };
        self.range = Some(match self.range {
            Some((first, _)) => (first, next),
            None => (offset, next),
        });
    }
}

pub fn map_message(conn: &Connector, partition: &str, msg: Message) -> Item {
    if conn.mapper.skips(&msg) {
        return Item::Skip {
            offset: msg.offset,
            next_offset: msg.next_offset,
        };
    }
    let failure = match &msg.poison {
        Some(reason) => Err((Some(ErrorClass::Poison), reason.clone())),
        None => conn
            .mapper
            .map_in(&msg, conn.route(partition))
            .map_err(|e| ((!e.stop).then_some(ErrorClass::Mapping), e.reason))
            .and_then(|record| {
                conn.sink
                    .check_record(&record)
                    .map(|()| record)
                    .map_err(|reason| (Some(ErrorClass::Mapping), reason))
            }),
    };
    let failure = match (failure, &conn.ids) {
        (Ok(mut record), Some(ids)) => ids
            .of(partition, &msg)
            .map(|id| {
                record.id = Some(id);
                record
            })
            .map_err(|reason| (Some(ErrorClass::MessageId), reason)),
        (other, _) => other,
    };
    match failure {
        Ok(record) => Item::Row {
            record,
            next_offset: msg.next_offset,
            bytes: msg.size(),
        },
        // `None`: every later message would fail alike, so stop.
        Err((None, reason)) => Item::Fatal {
            offset: msg.offset,
            reason,
        },
        Err((_, reason)) if conn.cfg.errors == ErrorPolicy::Fail => Item::Fatal {
            offset: msg.offset,
            reason,
        },
        Err((Some(class), reason)) => Item::Dead {
            next_offset: msg.next_offset,
            letter: DeadLetter::new(&msg, class, reason),
        },
    }
}

async fn read_loop(
    conn: Arc<Connector>,
    partition: Arc<str>,
    mut reader: Box<dyn PartitionReader>,
    tx: mpsc::Sender<Result<Chunk, RunError>>,
    stop: CancellationToken,
) {
    // Chunks being mapped on the runtime's threads while the next is read,
    // so a busy partition's parsing is not bound to one core; they leave
    // in read order.
    let mut mapping: VecDeque<tokio::task::JoinHandle<Chunk>> = VecDeque::new();
    // A chunk holds about a quarter of a batch, in bytes (sized from the
    // messages seen so far) and in messages, so the budgets are taken a
    // little at a time: 1 MB messages travel a few at
    // a time instead of 1,024.
    let chunk_bytes = (conn.cfg.batch.max_bytes / 4).max(1);
    let chunk_records = (conn.cfg.batch.records() / 4).clamp(1, READ_CHUNK);
    let own = PartitionBudget::new(&conn.cfg.batch);
    let mut chunk = 1;
    let mut paused = conn.paused();
    // Where the next message must be at the least: each position is
    // handed on once, in order.
    let mut floor: Option<u64> = None;
    loop {
        if *paused.borrow_and_update() {
            // Hand over everything read, so it commits; then wait.
            if !hand_over(&mut mapping, 0, &tx, &stop).await {
                return;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                resumed = paused.wait_for(|p| !*p) => if resumed.is_err() { return },
            }
        }
        let mut msgs = Vec::with_capacity(chunk);
        // A pause cancels a read that waits (a followed file, an idle
        // topic): what it had taken is kept and handed over.
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = paused.wait_for(|p| *p) => None,
            r = reader.read(chunk, &mut msgs) => Some(r),
        };
        let pausing = read.is_none();
        let status = read.unwrap_or(Ok(if msgs.is_empty() {
            ReadStatus::Idle
        } else {
            ReadStatus::Data
        }));
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(conn.source_err(e))).await;
                return;
            }
        };
        // A short read means the source has caught up: hand over all that
        // is mapped rather than hold it until more arrives.
        let caught_up = msgs.len() < chunk || status == ReadStatus::End || pausing;
        // Sources promise that; this makes a slip (a consumer delivering a
        // range again after a seek) cost a warning, never a second write.
        let read = msgs.len();
        msgs.retain(|m| {
            let new = floor.is_none_or(|f| m.offset >= f);
            if new {
                floor = Some(m.next_offset);
            }
            new
        });
        if msgs.len() < read {
            warn!(
                connector = %conn.name,
                %partition,
                dropped = read - msgs.len(),
                "the source handed out positions it had given already; they were dropped"
            );
        }
        if !msgs.is_empty() {
            let bytes: usize = msgs.iter().map(Message::size).sum::<usize>().max(1);
            let per_message = bytes.div_ceil(msgs.len());
            chunk = (chunk_bytes / per_message).clamp(1, chunk_records);
            conn.stats.read(&partition, msgs.len() as u64);
            let held = match conn.read_ahead.try_hold(&own, msgs.len(), bytes) {
                Some(held) => held,
                None => {
                    // What is mapped goes to the committer first: taking
                    // it is what frees the allowance.
                    if !hand_over(&mut mapping, 0, &tx, &stop).await {
                        return;
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        held = conn.read_ahead.hold(&own, msgs.len(), bytes) => match held {
                            Some(held) => held,
                            None => return,
                        },
                    }
                }
            };
            let held = Some(held);
            let conn = conn.clone();
            let partition = partition.clone();
            let stop = stop.clone();
            mapping.push_back(tokio::spawn(async move {
                // The writer schemas the chunk names, fetched before it is
                // mapped; one that cannot be had stops the connector at
                // its first message, after those before it.
                let mut fatal = None;
                if let Some(registry) = &conn.registry {
                    if let Err((offset, reason)) = registry
                        .fetch_for(&msgs, &conn.cfg.retry, &conn.stats, &stop)
                        .await
                    {
                        if stop.is_cancelled() {
                            return Chunk {
                                items: Vec::new(),
                                held,
                            };
                        }
                        msgs.retain(|m| m.offset < offset);
                        fatal = Some(Item::Fatal { offset, reason });
                    }
                }
                let items = msgs
                    .into_iter()
                    .map(|m| map_message(&conn, &partition, m))
                    .chain(fatal)
                    .collect();
                Chunk { items, held }
            }));
        }
        if let ReadStatus::Skipped { from, to } = status {
            floor = Some(floor.map_or(to, |f| f.max(to)));
            // In read order, behind the chunks being mapped.
            mapping.push_back(tokio::spawn(async move {
                Chunk {
                    items: vec![Item::Skip {
                        offset: from,
                        next_offset: to,
                    }],
                    held: None,
                }
            }));
        }
        let ahead = if caught_up { 0 } else { MAPPING_AHEAD };
        if !hand_over(&mut mapping, ahead, &tx, &stop).await || status == ReadStatus::End {
            return;
        }
    }
}

/// Send the mapped chunks, in read order, until at most `ahead` are left
/// being mapped. `false`: the partition is stopping.
async fn hand_over(
    mapping: &mut VecDeque<tokio::task::JoinHandle<Chunk>>,
    ahead: usize,
    tx: &mpsc::Sender<Result<Chunk, RunError>>,
    stop: &CancellationToken,
) -> bool {
    while mapping.len() > ahead {
        let Some(next) = mapping.pop_front() else {
            break;
        };
        let chunk = match next.await {
            Ok(chunk) => chunk,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return false, // the runtime is shutting down
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return false,
            sent = tx.send(Ok(chunk)) => if sent.is_err() { return false },
        }
    }
    true
}
