//! A partition's reader: messages from its inbox, in order, never below
//! where it started nor past a backfill's end, and only those its own
//! seek fetched; positions that step over transaction markers; seeks back
//! when the consumer fetches elsewhere.

use crate::consumer::{Inbound, Seeker};
use async_trait::async_trait;
use idem_core::{Message, PartitionReader, ReadStatus, SourceError};
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
    /// The first read (see `consumer::Reads`) made after this reader's
    /// latest seek: what earlier reads brought may come from another
    /// fetch, past offsets this one must not skip, and is dropped.
    barrier: u64,
    /// A message past `next` was dropped as read before the latest seek:
    /// nothing past `next` is taken until a seek back succeeds.
    resync: bool,
    /// The offset after the furthest message dropped past `next`. The
    /// consumer's position counts the messages it returned, dropped ones
    /// too: it says nothing of the gap before it until the reader has
    /// read this far itself.
    dropped_past: u64,
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
    seeker: Arc<Seeker>,
    partition: String,
    /// This reader's number (see `Seeker::claim`).
    reader: u64,
    last: Option<std::time::Instant>,
}

impl Reseek {
    pub(crate) fn new(seeker: Arc<Seeker>, partition: &str, reader: u64) -> Reseek {
        Reseek {
            seeker,
            partition: partition.to_string(),
            reader,
            last: None,
        }
    }

    /// Seek back to `next`; the new barrier if the seek was made.
    async fn to(&mut self, next: u64, seen: u64) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        let r = self.seeker.seek(&self.partition, self.reader, next).await;
        debug!(partition = %self.partition, next, seen, result = ?r, "fetched from elsewhere than the reader's position; seeking back");
        r.ok().flatten()
    }
}

/// A reader that keeps its private consumer alive.
impl KafkaReader {
    /// A reader of `inbox` from `next`, up to `end` for a backfill, of
    /// what reads from `barrier` on bring.
    pub(crate) fn new(
        inbox: mpsc::Receiver<Inbound>,
        next: u64,
        end: Option<u64>,
        reseek: Option<Reseek>,
        barrier: u64,
    ) -> KafkaReader {
        KafkaReader {
            inbox,
            next,
            end,
            reseek,
            barrier,
            resync: false,
            dropped_past: 0,
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

impl KafkaReader {
    /// Seek back to `next`, having seen the consumer at `seen`; reads made
    /// before the seek no longer count.
    async fn reseek(&mut self, seen: u64) {
        if let Some(r) = self.reseek.as_mut() {
            if let Some(barrier) = r.to(self.next, seen).await {
                self.barrier = barrier;
                self.resync = false;
            }
        }
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
            Some(to) if self.live && self.next >= self.dropped_past => {
                // Never past the end a backfill stops at.
                let to = self.end.map_or(to, |end| to.min(end));
                if to > self.next {
                    let from = std::mem::replace(&mut self.next, to);
                    return Ok(ReadStatus::Skipped { from, to });
                }
            }
            // Before it, a position elsewhere than the reader's start means
            // the consumer fetches from elsewhere: librdkafka's own offset
            // lookup answered after the reader's seek. Send it back to
            // where the reader starts.
            Some(at) if at != self.next => self.reseek(at).await,
            _ => {}
        }
        // Messages with the read that brought each.
        let mut got: Vec<(Message, u64)> = Vec::new();
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
                    self.reseek(self.next).await;
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
                        Inbound::Message { message, read } => got.push((message, read)),
                        // A position looked up before this reader's seek
                        // may be another fetch's: not followed.
                        Inbound::Position { read, .. } if read < self.barrier => {}
                        // Looked at on the next call, after these messages.
                        Inbound::Position { next, .. } => {
                            self.position = Some(next);
                            break;
                        }
                    }
                    if got.len() < max {
                        next = self.inbox.try_recv().ok();
                    }
                }
                Ok(if got.is_empty() {
                    ReadStatus::Idle
                } else {
                    ReadStatus::Data
                })
            }
        };
        // Never hand out a position twice or below where this reader
        // started: a message fetched before the seek to the sink's position
        // could otherwise slip in ahead of it, and after a seek back the
        // consumer can deliver a range again right behind its first copy,
        // within one call.
        let behind = got
            .iter()
            .find(|(_, read)| *read >= self.barrier)
            .is_some_and(|(m, _)| m.offset < self.next);
        let mut floor = self.next;
        let mut fresh = Vec::with_capacity(got.len());
        for (m, read) in got {
            if m.offset < floor {
                continue;
            }
            // Past the reader's position, only what a read begun after its
            // seek brought: one begun before may bring another fetch's
            // message, past offsets this reader has not had. (It may also
            // bring the seek's own first message, late: seeking again
            // fetches that anew.)
            if m.offset > floor && (read < self.barrier || self.resync) {
                if !self.resync {
                    debug!(offset = m.offset, next = floor, "a message read before the reader's seek, past its position: dropped; seeking again");
                }
                self.resync = true;
                self.dropped_past = self.dropped_past.max(m.next_offset);
                continue;
            }
            floor = m.next_offset;
            fresh.push(m);
        }
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
        let status = match status {
            // Everything read was dropped.
            Ok(ReadStatus::Data) if fresh.is_empty() => Ok(ReadStatus::Idle),
            other => other,
        };
        // Handed out before the seek's wait: a read cancelled there (the
        // runner pauses a connector that way) leaves them with the caller,
        // past whom `next` has already moved.
        out.append(&mut fresh);
        if behind || self.resync {
            self.reseek(self.next).await;
        }
        status
    }

    fn lost(&self) -> Option<(u64, u64)> {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Message `offset`, brought by read number `read`.
    fn inbound(offset: u64, read: u64) -> Inbound {
        Inbound::Message {
            message: msg(offset),
            read,
        }
    }

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
        let mut reader = KafkaReader::new(rx, 5, Some(8), None, 0);
        for o in [3, 4, 5, 6, 5, 7, 8, 9] {
            tx.send(Inbound::Message {
                message: msg(o),
                read: 0,
            })
            .await
            .unwrap();
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
        let mut reader = KafkaReader::new(rx, 5, None, None, 0);
        for o in [5, 6, 7, 5, 6, 7, 8] {
            tx.send(Inbound::Message {
                message: msg(o),
                read: 0,
            })
            .await
            .unwrap();
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
        let mut reader = KafkaReader::new(rx, 10, Some(20), None, 0);
        let mut out = Vec::new();
        // Before any message of its own: a position may be an earlier
        // assignment's, ahead of this reader; it is not followed.
        tx.send(Inbound::Position { next: 15, read: 0 })
            .await
            .unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        assert_eq!(reader.read(0, &mut out).await.unwrap(), ReadStatus::Idle);
        // A message, then a commit marker at 11 and a position past it.
        tx.send(Inbound::Message {
            message: msg(10),
            read: 0,
        })
        .await
        .unwrap();
        tx.send(Inbound::Position { next: 12, read: 0 })
            .await
            .unwrap();
        tx.send(Inbound::Message {
            message: msg(12),
            read: 0,
        })
        .await
        .unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [10]);
        assert_eq!(
            reader.read(10, &mut out).await.unwrap(),
            ReadStatus::Skipped { from: 11, to: 12 }
        );
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        // A position behind the reader is ignored; one past the end stops
        // at the end.
        tx.send(Inbound::Position { next: 5, read: 0 })
            .await
            .unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        tx.send(Inbound::Position { next: 99, read: 0 })
            .await
            .unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        assert_eq!(
            reader.read(10, &mut out).await.unwrap(),
            ReadStatus::Skipped { from: 13, to: 20 }
        );
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::End);
    }

    /// A partition opened again right after its earlier reader's fetch
    /// had run ahead: what the poller read before the new reader's seek
    /// returned is dropped when it lies past the reader's position, and
    /// the fetch from its own seek is read from the start.
    #[tokio::test]
    async fn what_was_read_before_the_readers_seek_is_taken_only_at_its_position() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 3000, None, None, 7);
        let offsets = |out: &[Message]| out.iter().map(|m| m.offset).collect::<Vec<_>>();
        for item in [
            inbound(3443, 5),
            inbound(3444, 6),
            Inbound::Position {
                next: 3445,
                read: 6,
            },
        ] {
            tx.send(item).await.unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        assert!(out.is_empty());
        // The seek's own first message, brought by a read begun before
        // the seek returned, is at the reader's position: taken.
        for item in [inbound(3000, 6), inbound(3001, 7), inbound(3002, 8)] {
            tx.send(item).await.unwrap();
        }
        // The position read before the seek was not taken: no skip.
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(offsets(&out), [3000, 3001, 3002]);
        // A stale position, once live, is not followed either.
        tx.send(Inbound::Position {
            next: 3500,
            read: 6,
        })
        .await
        .unwrap();
        tx.send(inbound(3003, 9)).await.unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.last().map(|m| m.offset), Some(3003));
    }

    /// Once a message past its position was dropped, a reader takes
    /// nothing past its position (only what continues it) until a seek
    /// back succeeds: the dropped one may have been the seek's own.
    #[tokio::test]
    async fn after_dropping_a_message_past_its_position_a_reader_waits_for_a_seek() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 10, None, None, 7);
        // 12, read before the seek returned, is dropped; 13, read after,
        // may follow it in the same fetch and is not taken either; 10 and
        // 11 continue the reader.
        for item in [
            inbound(12, 6),
            inbound(13, 7),
            inbound(10, 8),
            inbound(11, 9),
        ] {
            tx.send(item).await.unwrap();
        }
        let mut out = Vec::new();
        reader.read(10, &mut out).await.unwrap();
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [10, 11]);
        tx.send(inbound(13, 9)).await.unwrap();
        tx.send(inbound(15, 9)).await.unwrap();
        reader.read(10, &mut out).await.unwrap();
        assert_eq!(out.last().map(|m| m.offset), Some(11));
    }

    /// The consumer's position counts messages the reader dropped: it
    /// moves the reader over nothing until the reader has read as far as
    /// the furthest of them.
    #[tokio::test]
    async fn a_position_past_dropped_messages_is_not_followed() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader::new(rx, 10, None, None, 7);
        // 11 comes first from another fetch and is dropped; 10 is taken.
        for item in [
            inbound(11, 6),
            inbound(10, 8),
            Inbound::Position { next: 12, read: 9 },
        ] {
            tx.send(item).await.unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        // Not a skip over 11, which the reader never had.
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        tx.send(inbound(11, 10)).await.unwrap();
        tx.send(Inbound::Position { next: 14, read: 11 })
            .await
            .unwrap();
        assert_eq!(reader.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [10, 11]);
        // Read as far as the dropped one: positions count again.
        assert_eq!(
            reader.read(10, &mut out).await.unwrap(),
            ReadStatus::Skipped { from: 12, to: 14 }
        );
    }
}
