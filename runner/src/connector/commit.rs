//! One batch through the commit protocol, a function per step, in the
//! order docs/ARCHITECTURE.md gives them:
//!
//! 1. `check_dead_letter_cap`: stop a flood before anything is written.
//! 2. `write_dead_letters`: the batch's dead letters durable first.
//! 3. `reserve_ids`: the dedup stage drops copies and reserves the rest.
//! 4. `commit_isolating`: rows and position in one atomic step (refused
//!    records split out and dead-lettered).
//! 5. On failure, `release_ids`; on a store that lost the positions,
//!    `positions_lost`.
//! 6. `confirm_ids`, then `record_commit` (counters, the source's ack).

use super::partition::Pending;
use super::staged::{Reserved, Staged};
use super::{Connector, PartitionEnd, RunError};
use crate::deadletter::{DeadLetter, ErrorClass};
use crate::retry::retry_transient;
use crate::stats::Committed;
use idem_config::OnLoss;
use idem_core::failpoint::{self, AFTER_COMMIT, BEFORE_COMMIT};
use idem_core::{Batch, CommitStats, PartitionRef, Record, SinkError};
use idem_dedup_store::DedupStore;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

impl Connector {
    /// Commit what `pending` holds (taking it). `Some(end)`: the partition
    /// ends here (fenced, or to be opened again).
    pub(super) async fn flush(
        &self,
        pref: &PartitionRef,
        epoch: i64,
        pending: &mut Pending,
        staged: &mut Staged,
        stop: &CancellationToken,
    ) -> Result<Option<PartitionEnd>, RunError> {
        let Some((first_offset, next_offset)) = pending.range else {
            return Ok(None);
        };
        let taken = std::mem::take(pending);
        self.check_dead_letter_cap(pref, &taken.dead)?;
        self.write_dead_letters(pref, &taken.dead, stop).await?;
        let (mut records, skipped, reserved) = self
            .reserve_ids(
                pref,
                epoch,
                first_offset,
                staged.durable,
                taken.records,
                stop,
            )
            .await?;
        // Taken after every record was mapped: at least as wide as any.
        let route = self.route(&pref.partition);
        let columns = self.mapper.learnt_columns(route);
        if let Some(columns) = &columns {
            // A record mapped before a column was learnt has no value for
            // it: null, as the source's row had none then.
            for r in records
                .iter_mut()
                .filter(|r| r.values.len() < columns.len())
            {
                r.values.pad_to(columns.len());
            }
        }
        let batch = Arc::new(Batch {
            partition: pref.clone(),
            epoch,
            records,
            first_offset,
            next_offset,
            columns,
            key: self.mapper.learnt_key(route),
            attempt: 0,
        });
        failpoint::hit(BEFORE_COMMIT);
        if let Some(d) = failpoint::delay(BEFORE_COMMIT, &pref.partition) {
            tokio::time::sleep(d).await;
        }
        let started = Instant::now();
        let committed = self.commit_isolating(batch.clone(), stop).await;
        let elapsed = started.elapsed();
        let stats = match committed {
            Ok(stats) => stats,
            Err(SinkError::PositionsLost { store }) => {
                return self.positions_lost(pref, store).await.map(Some);
            }
            Err(e) => {
                self.release_ids(pref, &batch, reserved.as_ref()).await;
                return match e {
                    SinkError::Fenced { .. } => Ok(Some(PartitionEnd::Fenced)),
                    e => Err(RunError::Commit {
                        connector: self.name.clone(),
                        partition: pref.partition.to_string(),
                        first_offset,
                        next_offset,
                        source: e,
                    }),
                };
            }
        };
        failpoint::hit(AFTER_COMMIT);
        self.record_commit(&batch, skipped, taken.dead.len() as u64, stats, elapsed);
        staged.through = batch.next_offset;
        if let Some(reserved) = reserved {
            staged.waiting.push_back((batch.next_offset, reserved));
        }
        let durable = stats.durable_through.unwrap_or(batch.next_offset);
        self.made_durable(pref, staged, durable, stop).await;
        Ok(None)
    }

    /// Make durable what the sink staged for the partition (see
    /// `Sink::flush_staged`), when it staged anything. `Some(end)`: the
    /// partition ends here (fenced).
    pub(super) async fn flush_staged(
        &self,
        pref: &PartitionRef,
        staged: &mut Staged,
        stop: &CancellationToken,
    ) -> Result<Option<PartitionEnd>, RunError> {
        if staged.through == staged.durable {
            return Ok(None);
        }
        let flushed = retry_transient(
            &self.cfg.retry,
            &self.stats,
            "make staged batches durable",
            stop,
            || self.sink.flush_staged(pref),
        )
        .await;
        match flushed {
            Ok(durable) => {
                let durable = durable.unwrap_or(staged.through);
                self.made_durable(pref, staged, durable, stop).await;
                if staged.since.is_some() {
                    // Still behind (the sink keeps part of it staged): wait
                    // another `stage_for`, not at once again.
                    staged.since = Some(Instant::now());
                }
                Ok(None)
            }
            Err(SinkError::Fenced { .. }) => Ok(Some(PartitionEnd::Fenced)),
            Err(e) => Err(RunError::Commit {
                connector: self.name.clone(),
                partition: pref.partition.to_string(),
                first_offset: staged.durable,
                next_offset: staged.through,
                source: e,
            }),
        }
    }

    /// Steps 6 and 7 once the sink holds the partition durable through
    /// `durable`: confirm the ids of every batch before it, then report
    /// and acknowledge the position.
    async fn made_durable(
        &self,
        pref: &PartitionRef,
        staged: &mut Staged,
        durable: u64,
        stop: &CancellationToken,
    ) {
        let mut ready = Vec::new();
        while staged.waiting.front().is_some_and(|(n, _)| *n <= durable) {
            ready.extend(staged.waiting.pop_front().map(|(_, r)| r));
        }
        self.confirm_ids(pref, &ready, stop).await;
        staged.since = match staged.through > durable {
            true => staged.since.or_else(|| Some(Instant::now())),
            false => None,
        };
        self.stats
            .set_written(&pref.partition, staged.through, durable.max(staged.durable));
        if durable <= staged.durable {
            return;
        }
        staged.durable = durable;
        self.stats.set_position(&pref.partition, durable);
        if let Err(e) = self.source.ack(&pref.partition, durable).await {
            warn!(connector = %self.name, partition = %pref.partition, error = %e, "ack to the source failed");
        }
    }

    /// Step 1: `dead_letters.max` counts this run's dead letters; a batch
    /// that would pass it stops the connector before anything is written.
    fn check_dead_letter_cap(
        &self,
        pref: &PartitionRef,
        dead: &[DeadLetter],
    ) -> Result<(), RunError> {
        match dead.first() {
            Some(first) if self.over_dead_letter_cap(dead.len() as u64) => {
                Err(self.too_many_dead_letters(pref, first.offset))
            }
            _ => Ok(()),
        }
    }

    /// Whether `more` dead letters would pass `dead_letters.max` (0: no cap).
    fn over_dead_letter_cap(&self, more: u64) -> bool {
        let max = self.cfg.dead_letters.max;
        max > 0 && self.stats.snapshot().dead_lettered + more > max
    }

    fn too_many_dead_letters(&self, pref: &PartitionRef, offset: u64) -> RunError {
        RunError::TooManyDeadLetters {
            connector: self.name.clone(),
            partition: pref.partition.to_string(),
            offset,
            max: self.cfg.dead_letters.max,
        }
    }

    /// Step 2: dead letters are durable before the position that passes them.
    async fn write_dead_letters(
        &self,
        pref: &PartitionRef,
        dead: &[DeadLetter],
        stop: &CancellationToken,
    ) -> Result<(), RunError> {
        retry_transient(
            &self.cfg.retry,
            &self.stats,
            "write dead letters",
            stop,
            || self.dead_letters.write(pref, dead),
        )
        .await
        .map_err(|source| RunError::DeadLetter {
            connector: self.name.clone(),
            source,
        })
    }

    /// Step 3: with a dedup stage, drop records whose id took effect
    /// elsewhere and reserve the rest for this batch. Returns the records
    /// to commit and how many were dropped.
    async fn reserve_ids(
        &self,
        pref: &PartitionRef,
        epoch: i64,
        first_offset: u64,
        durable: u64,
        records: Vec<Record>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Record>, u64, Option<Reserved>), RunError> {
        let Some(stage) = &self.dedup else {
            return Ok((records, 0, None));
        };
        let filtered = retry_transient(
            &self.cfg.retry,
            &self.stats,
            "reserve message ids",
            stop,
            || stage.filter(&pref.partition, epoch, first_offset, durable, &records),
        )
        .await
        .map_err(|e| self.dedup_err(e))?;
        let kept = filtered.kept(records);
        Ok((
            kept,
            filtered.skipped,
            Some(Reserved {
                owner: filtered.owner,
                confirm: filtered.confirm,
            }),
        ))
    }

    /// Step 5, on a commit given up: the ids are free again (a crash
    /// leaves them reserved instead; the next owner resolves them).
    async fn release_ids(&self, pref: &PartitionRef, batch: &Batch, reserved: Option<&Reserved>) {
        let (Some(stage), Some(reserved)) = (&self.dedup, reserved) else {
            return;
        };
        let ids: Vec<&str> = batch
            .records
            .iter()
            .filter_map(|r| r.id.as_deref())
            .collect();
        if let Err(e) = stage.store.release(&reserved.owner, &ids).await {
            warn!(connector = %self.name, partition = %pref.partition, error = %e, "could not release the batch's message ids");
        }
    }

    /// Step 5, when the store keeping the sink's positions lost its data
    /// between this batch's reservation and its position: ids and
    /// positions are gone alike. `on_loss = "warn"` reopens the partition;
    /// otherwise the connector stops with the advice.
    async fn positions_lost(
        &self,
        pref: &PartitionRef,
        store: String,
    ) -> Result<PartitionEnd, RunError> {
        let Some(stage) = self.dedup.as_ref().filter(|s| s.on_loss == OnLoss::Warn) else {
            return Err(self.dedup_err(idem_dedup_store::DedupError::Lost { store }));
        };
        warn!(connector = %self.name, partition = %pref.partition, store, "the dedup store lost its ids and this partition's position: copies of messages processed before now will not be recognised; the partition is read again from the source's start and the receiver's idempotency keys keep repeated effects single (on_loss = \"warn\")");
        stage
            .store
            .accept_loss()
            .await
            .map_err(|e| self.dedup_err(e))?;
        Ok(PartitionEnd::Reopen)
    }

    /// Step 6: confirm the ids of batches now durable. Advisory: an
    /// unconfirmed reservation behind a durable position already reads as
    /// done (see `Stage::filter`).
    async fn confirm_ids(
        &self,
        pref: &PartitionRef,
        reserved: &[Reserved],
        stop: &CancellationToken,
    ) {
        let Some(stage) = &self.dedup else {
            return;
        };
        let ids: Vec<&str> = reserved
            .iter()
            .flat_map(|r| r.confirm.iter().map(String::as_str))
            .collect();
        if ids.is_empty() {
            return;
        }
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

    /// Step 6: count the batch.
    fn record_commit(
        &self,
        batch: &Batch,
        skipped: u64,
        dead: u64,
        stats: CommitStats,
        elapsed: Duration,
    ) {
        let pref = &batch.partition;
        debug!(
            connector = %self.name,
            partition = %pref.partition,
            first_offset = batch.first_offset,
            next_offset = batch.next_offset,
            records = batch.records.len(),
            skipped,
            dead,
            elapsed_ms = elapsed.as_millis() as u64,
            "batch committed"
        );
        self.stats.committed(Committed {
            partition: &pref.partition,
            written: stats.written,
            deduplicated: stats.deduplicated + skipped,
            dead_lettered: dead + stats.rejected,
            elapsed,
        });
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
        let first = retry_transient(
            &self.cfg.retry,
            &self.stats,
            "commit a batch",
            stop,
            counting(&batch, |b| self.sink.commit(b)),
        )
        .await;
        let reason = match first {
            Err(SinkError::Refused(e)) if !batch.records.is_empty() => e,
            other => return other,
        };
        let pref = &batch.partition;
        warn!(connector = %self.name, partition = %pref.partition, first_offset = batch.first_offset, next_offset = batch.next_offset, error = %reason, "the sink refused data in this batch: finding the message(s) it refuses");
        let names: Vec<String> = batch
            .columns
            .as_deref()
            .unwrap_or(&self.cfg.columns)
            .iter()
            .map(|c| c.name.clone())
            .collect();
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
                columns: batch.columns.clone(),
                key: batch.key.clone(),
                attempt: 0,
            });
            let committed = retry_transient(
                &self.cfg.retry,
                &self.stats,
                "commit part of a batch",
                stop,
                counting(&piece, |b| self.sink.commit(b)),
            )
            .await;
            let refused = match committed {
                Ok(s) => {
                    total.written += s.written;
                    total.deduplicated += s.deduplicated;
                    total.rejected += s.rejected;
                    // Pieces commit in order: the last says how far the
                    // sink is durable.
                    total.durable_through = s.durable_through;
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
            if self.over_dead_letter_cap(total.rejected + 1) {
                return Err(SinkError::Permanent(Box::new(
                    self.too_many_dead_letters(pref, records[0].offset),
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

/// `commit` of `batch` for each try of it, the tries after the first
/// marked as such ([`Batch::attempt`]): a try may follow one whose commit
/// landed and only its answer was lost.
fn counting<'a, F, T>(batch: &'a Arc<Batch>, commit: F) -> impl FnMut() -> T + 'a
where
    F: Fn(Arc<Batch>) -> T + 'a,
{
    let mut tries = 0u32;
    move || {
        let b = if tries == 0 {
            batch.clone()
        } else {
            Arc::new(Batch {
                attempt: tries,
                ..(**batch).clone()
            })
        };
        tries = tries.saturating_add(1);
        commit(b)
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
