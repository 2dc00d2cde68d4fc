//! A partition's reader: messages from its inbox, in order, never below
//! where it started nor past a backfill's end; positions that step over
//! transaction markers; seeks back when the consumer fetches elsewhere.

use crate::consumer::{Context, Inbound};
use async_trait::async_trait;
use idem_core::{Message, PartitionReader, ReadStatus, SourceError};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Offset;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::debug;

pub(crate) struct KafkaReader {
    inbox: mpsc::Receiver<Inbound>,
    /// The offset after the last message handed out.
    next: u64,
    /// stop_at_end: the partition's end when it was opened.
    end: Option<u64>,
    /// Seeks the partition back to `next` when it was moved behind it.
    reseek: Option<Reseek>,
    /// The consumer's position the poller last reported, not yet looked at.
    position: Option<u64>,
    /// This reader has handed out a message.
    live: bool,
    /// Reads that timed out with nothing.
    idle_reads: u32,
    /// Offsets skipped at the start because the partition no longer held
    /// them (`out_of_range`), reported once by `lost`.
    lost: Option<(u64, u64)>,
}

/// A partition fetched from behind its reader's position (librdkafka reset
/// it after the reader's seek) is sent back there, at most once a second,
/// rather than read again from the start and dropped message by message.
pub(crate) struct Reseek {
    consumer: Arc<StreamConsumer<Context>>,
    topic: String,
    partition: i32,
    last: Option<std::time::Instant>,
}

impl Reseek {
    pub(crate) fn new(
        consumer: Arc<StreamConsumer<Context>>,
        topic: &str,
        partition: i32,
    ) -> Reseek {
        Reseek {
            consumer,
            topic: topic.to_string(),
            partition,
            last: None,
        }
    }

    fn to(&mut self, next: u64, seen: u64) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let offset = Offset::Offset(i64::try_from(next).unwrap_or(i64::MAX));
        // A zero timeout queues the seek without waiting for it.
        let r = self
            .consumer
            .seek(&self.topic, self.partition, offset, Duration::ZERO);
        debug!(topic = %self.topic, partition = self.partition, next, seen, result = ?r, "fetched from behind the reader's position; seeking back");
    }
}

/// A reader that keeps its private consumer alive.
impl KafkaReader {
    /// A reader of `inbox` from `next`, up to `end` for a backfill.
    pub(crate) fn new(
        inbox: mpsc::Receiver<Inbound>,
        next: u64,
        end: Option<u64>,
        reseek: Option<Reseek>,
    ) -> KafkaReader {
        KafkaReader {
            inbox,
            next,
            end,
            reseek,
            position: None,
            live: false,
            idle_reads: 0,
            lost: None,
        }
    }

    /// Offsets `from..to` the sink will never get (see `PartitionReader::lost`).
    pub(crate) fn with_lost(mut self, lost: Option<(u64, u64)>) -> KafkaReader {
        self.lost = lost;
        self
    }
}

pub(crate) struct AuditReader {
    _source: Arc<dyn std::any::Any + Send + Sync>,
    reader: Box<dyn PartitionReader>,
}

impl AuditReader {
    /// `source`: what must live as long as the reader (its private consumer).
    pub(crate) fn new(
        source: Arc<dyn std::any::Any + Send + Sync>,
        reader: Box<dyn PartitionReader>,
    ) -> AuditReader {
        AuditReader {
            _source: source,
            reader,
        }
    }
}

#[async_trait]
impl PartitionReader for AuditReader {
    async fn read(
        &mut self,
        max: usize,
        out: &mut Vec<Message>,
    ) -> Result<ReadStatus, SourceError> {
        self.reader.read(max, out).await
    }
}

#[async_trait]
impl PartitionReader for KafkaReader {
    async fn read(
        &mut self,
        max: usize,
        out: &mut Vec<Message>,
    ) -> Result<ReadStatus, SourceError> {
        if self.end.is_some_and(|end| self.next >= end) {
            return Ok(ReadStatus::End);
        }
        match self.position.take() {
            // Once this reader had a message of its own, the consumer's
            // position belongs to this reader's fetch: what lies between
            // its last message and that position holds nothing to read.
            Some(to) if self.live => {
                // Never past the end a backfill stops at.
                let to = self.end.map_or(to, |end| to.min(end));
                if to > self.next {
                    let from = std::mem::replace(&mut self.next, to);
                    return Ok(ReadStatus::Skipped { from, to });
                }
            }
            // Before it, a position elsewhere than the reader's start means
            // the consumer fetches from elsewhere: an earlier assignment's
            // position, or librdkafka's own offset lookup answered after the
            // reader's seek. Send it back to where the reader starts.
            Some(at) if at != self.next => {
                if let Some(r) = self.reseek.as_mut() {
                    r.to(self.next, at);
                }
            }
            _ => {}
        }
        let before = out.len();
        // `recv` is cancel-safe; an idle partition reports Idle each second
        // so the runner can flush a lingering batch.
        let status = match tokio::time::timeout(Duration::from_secs(1), self.inbox.recv()).await {
            Err(_) => {
                // A backfill that knows messages wait before its end, and
                // has had none for 10 s: its fetch may have been moved
                // where there is nothing (see above); send it back.
                self.idle_reads += 1;
                if !self.live
                    && self.end.is_some_and(|end| self.next < end)
                    && self.idle_reads.is_multiple_of(10)
                {
                    if let Some(r) = self.reseek.as_mut() {
                        r.to(self.next, self.next);
                    }
                }
                Ok(ReadStatus::Idle)
            }
            // The partition was revoked: the runner is dropping this reader.
            Ok(None) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(ReadStatus::Idle)
            }
            Ok(Some(first)) => {
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        Inbound::Message(m) => out.push(m),
                        // Looked at on the next call, after these messages.
                        Inbound::Position(p) => {
                            self.position = Some(p);
                            break;
                        }
                    }
                    if out.len() < max {
                        next = self.inbox.try_recv().ok();
                    }
                }
                Ok(if out.len() > before {
                    ReadStatus::Data
                } else {
                    ReadStatus::Idle
                })
            }
        };
        // Never hand out a position twice or below where this reader
        // started: a message fetched before the seek to the sink's position
        // could otherwise slip in ahead of it, and after a seek back the
        // consumer can deliver a range again right behind its first copy,
        // within one call.
        let mut fresh = out.split_off(before);
        let mut floor = self.next;
        if let (Some(first), Some(r)) = (fresh.first(), self.reseek.as_mut()) {
            if first.offset < floor {
                r.to(floor, first.offset);
            }
        }
        fresh.retain(|m| {
            let new = m.offset >= floor;
            if new {
                floor = m.next_offset;
            }
            new
        });
        if let Some(end) = self.end {
            // Everything before `end`, and no further.
            if let Some(past) = fresh.iter().position(|m| m.offset >= end) {
                fresh.truncate(past);
            }
        }
        if let Some(last) = fresh.last() {
            self.next = self.next.max(last.next_offset);
            self.live = true;
        }
        out.append(&mut fresh);
        status
    }

    fn lost(&self) -> Option<(u64, u64)> {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64) -> Message {
        Message {
            offset,
            next_offset: offset + 1,
            key: None,
            value: Some(b"{}".to_vec()),
            poison: None,
            meta: Default::default(),
        }
    }

    #[tokio::test]
    async fn readers_skip_what_precedes_their_start_and_stop_at_the_end() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 5, Some(8), None);
        for o in [3, 4, 5, 6, 5, 7, 8, 9] {
            tx.send(Inbound::Message(msg(o))).await.unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(reader.read(3, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [5]);
        let mut out = Vec::new();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        // 5 again is dropped; 8 and 9 are past the end.
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [6, 7]);
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::End);
    }

    #[tokio::test]
    async fn a_range_delivered_twice_in_one_read_is_handed_out_once() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 5, None, None);
        for o in [5, 6, 7, 5, 6, 7, 8] {
            tx.send(Inbound::Message(msg(o))).await.unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(
            out.iter().map(|m| m.offset).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
    }

    #[tokio::test]
    async fn positions_move_a_reader_over_markers_once_it_read_a_message() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 10, Some(20), None);
        let mut out = Vec::new();
        // Before any message of its own: a position may be an earlier
        // assignment's, ahead of this reader; it is not followed.
        tx.send(Inbound::Position(15)).await.unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        assert_eq!(reader.read(0, &mut out).await.unwrap(), ReadStatus::Idle);
        // A message, then a commit marker at 11 and a position past it.
        tx.send(Inbound::Message(msg(10))).await.unwrap();
        tx.send(Inbound::Position(12)).await.unwrap();
        tx.send(Inbound::Message(msg(12))).await.unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [10]);
        assert_eq!(
            reader.read(10, &mut out).await.unwrap(),
            ReadStatus::Skipped { from: 11, to: 12 }
        );
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        // A position behind the reader is ignored; one past the end stops
        // at the end.
        tx.send(Inbound::Position(5)).await.unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        tx.send(Inbound::Position(99)).await.unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        assert_eq!(
            reader.read(10, &mut out).await.unwrap(),
            ReadStatus::Skipped { from: 13, to: 20 }
        );
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::End);
    }
}
