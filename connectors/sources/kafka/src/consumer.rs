//! The librdkafka side of the source: the client context (rebalances
//! hand assignments to the runner and close inboxes), the one task that
//! polls the consumer and hands each message to its partition's reader,
//! and partition names.

use idem_core::{Assignment, Message, Meta};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// `topic/partition`, the name positions are stored under.
pub fn partition_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

pub(crate) fn split_name(name: &str) -> Option<(&str, i32)> {
    let (topic, p) = name.rsplit_once('/')?;
    Some((topic, p.parse().ok()?))
}

/// Readers' inboxes, by partition name; shared with the rebalance callback.
pub(crate) type Inboxes = Arc<Mutex<HashMap<String, mpsc::Sender<Inbound>>>>;

/// How long the poller waits for a message before it reports positions.
const IDLE_POSITIONS: Duration = Duration::from_millis(500);

/// How long the request that wakes librdkafka's fetcher after a resume
/// waits for its (unused) answer: by then the fetcher has woken by itself.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a seek waits for the consumer's fetcher to take it.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Numbers the poller's reads of the consumer (each `recv`, each position
/// lookup) in the order they begin. librdkafka passes no message fetched
/// before a seek to the application once that seek, made with a timeout,
/// has returned; so only what a read begun after the seek returned brings
/// surely comes from the fetch at the seek's offset. Anything older may
/// come from an earlier reader's fetch, already past offsets the new
/// reader must not skip.
#[derive(Default)]
pub(crate) struct Reads {
    count: AtomicU64,
    /// A seek returned: the poller gives up the read it waits on and
    /// begins another, so the seek's first message comes to a read begun
    /// after it. (Else an idle partition whose reader's position holds no
    /// message, a transaction marker, would have that message dropped as
    /// possibly another fetch's at every seek back.)
    sought: tokio::sync::Notify,
}

impl Reads {
    /// The number of a read about to begin.
    fn begin(&self) -> u64 {
        self.count.fetch_add(1, Ordering::SeqCst)
    }

    /// The number the next read will get: reads numbered from here on
    /// began after this call.
    pub(crate) fn barrier(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

/// Seeks for the source's readers, one at a time, each made only for the
/// partition's current reader: a dropped reader's late seek back would
/// move the fetch of the reader that replaced it.
pub(crate) struct Seeker {
    consumer: Arc<StreamConsumer<Context>>,
    reads: Arc<Reads>,
    /// Each partition's current reader, by the number its open drew; held
    /// through each seek, which can take up to `SEEK_TIMEOUT`.
    readers: tokio::sync::Mutex<HashMap<String, u64>>,
    drawn: AtomicU64,
}

impl Seeker {
    pub(crate) fn new(consumer: Arc<StreamConsumer<Context>>, reads: Arc<Reads>) -> Seeker {
        Seeker {
            consumer,
            reads,
            readers: tokio::sync::Mutex::new(HashMap::new()),
            drawn: AtomicU64::new(0),
        }
    }

    /// Make a new reader of `partition` its current one; its number.
    pub(crate) async fn claim(&self, partition: &str) -> u64 {
        let reader = self.drawn.fetch_add(1, Ordering::SeqCst) + 1;
        self.readers
            .lock()
            .await
            .insert(partition.to_string(), reader);
        reader
    }

    /// Seek `partition` to `offset` for `reader`, waiting until the
    /// fetcher took it. `Ok(Some(barrier))`: the reads numbered from
    /// `barrier` on bring only what the fetch from `offset` returns;
    /// `Ok(None)`: another reader replaced this one, nothing was done.
    pub(crate) async fn seek(
        self: &Arc<Self>,
        partition: &str,
        reader: u64,
        offset: u64,
    ) -> Result<Option<u64>, KafkaError> {
        let Some((topic, p)) = split_name(partition) else {
            return Ok(None);
        };
        let (this, topic, name) = (self.clone(), topic.to_string(), partition.to_string());
        let offset = Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX));
        // librdkafka's seek blocks until its fetcher answers.
        let sought = tokio::task::spawn_blocking(move || {
            let readers = this.readers.blocking_lock();
            if readers.get(&name) != Some(&reader) {
                return Ok(None);
            }
            this.consumer.seek(&topic, p, offset, SEEK_TIMEOUT)?;
            let barrier = this.reads.barrier();
            this.reads.sought.notify_one();
            Ok(Some(barrier))
        })
        .await;
        sought.unwrap_or_else(|e| Err(KafkaError::Seek(format!("the seek's thread failed: {e}"))))
    }
}

/// Send each reader its partition's consumer position (see [`Inbound`]).
/// A full inbox is skipped: its reader has messages to read first. So is a
/// held partition: messages before its consumer position wait in `Held`.
async fn send_positions(
    consumer: &StreamConsumer<Context>,
    inboxes: &Inboxes,
    held: &Held,
    reads: &Reads,
) {
    let read = reads.begin();
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in positions.elements() {
        let Offset::Offset(o) = e.offset() else {
            continue;
        };
        let Ok(o) = u64::try_from(o) else { continue };
        let name = partition_name(e.topic(), e.partition());
        if held.parts.contains_key(&name) {
            continue;
        }
        let inbox = inboxes.lock().ok().and_then(|i| i.get(&name).cloned());
        if let Some(inbox) = inbox {
            let _ = inbox.try_send(Inbound::Position { next: o, read });
        }
    }
}

/// Flow control per partition: the poller waits on one reader at most
/// `PATIENCE` at a time, so a slow partition (its sink commits slowly)
/// does not hold up the others.
/// What a reader with a full inbox cannot take yet waits here, in order,
/// and goes to it as its inbox frees up. Past `STASH` waiting messages the
/// poller first waits for that reader, up to `PATIENCE`: a reader that only
/// maps more slowly than the poller fetches sets the pace that way. One
/// still behind after that (its batch commits slowly) has its partition
/// paused in the consumer, resumed where the consumer left it once all of
/// them are handed over and the inbox is half empty, and the others go on.
/// Nothing is dropped or fetched twice.
#[derive(Default)]
struct Held {
    parts: HashMap<String, Overflow>,
}

struct Overflow {
    /// The reader it waits for: a new reader (reopened) starts afresh.
    inbox: mpsc::Sender<Inbound>,
    /// Fetched, not handed over yet, with the read that brought each.
    waiting: std::collections::VecDeque<(Message, u64)>,
    /// Paused in the consumer: more than `STASH` messages waited for
    /// longer than `PATIENCE`.
    paused: bool,
    /// Since when more than `STASH` messages wait, not paused yet.
    over: Option<std::time::Instant>,
}

/// Messages kept for a reader whose inbox is full before its partition is
/// paused: a reader only briefly behind catches up without a pause, whose
/// resume costs a fetch round trip (librdkafka drops what it prefetched
/// for a paused partition).
const STASH: usize = 4096;

/// How long the poller waits for a reader with `STASH` messages waiting
/// before it pauses the partition. A pause drops what librdkafka fetched
/// ahead for it (up to `queued.min.messages`), which is fetched again on
/// resume: with a reader that maps more slowly than the poller reads,
/// pausing at once refetched a one-partition topic every few thousand
/// messages (and, before `set_paused` woke the fetcher, stalled it for
/// up to a second each time).
const PATIENCE: Duration = Duration::from_millis(100);

impl Held {
    /// Hand `message` of `name` to `inbox`, or keep it behind what waits.
    fn deliver(&mut self, name: &str, inbox: mpsc::Sender<Inbound>, message: Message, read: u64) {
        if let Some(o) = self.parts.get_mut(name) {
            if o.inbox.same_channel(&inbox) {
                o.waiting.push_back((message, read));
                if !o.paused && o.waiting.len() > STASH && o.over.is_none() {
                    o.over = Some(std::time::Instant::now());
                }
                return;
            }
            // Reopened since: its reader seeked where the sink says.
            self.parts.remove(name);
        }
        match inbox.try_send(Inbound::Message { message, read }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Inbound::Message { message, read })) => {
                self.parts.insert(
                    name.to_string(),
                    Overflow {
                        inbox,
                        waiting: std::collections::VecDeque::from([(message, read)]),
                        paused: false,
                        over: None,
                    },
                );
            }
            Err(_) => debug!(partition = %name, "reader gone; message dropped"),
        }
    }

    /// Hand over what waits as inboxes free up; resume the partitions
    /// whose waiting messages are all handed over and whose inbox is half
    /// empty; forget those whose reader is gone.
    fn drain(&mut self, consumer: &Arc<StreamConsumer<Context>>) {
        self.parts.retain(|name, o| {
            if o.inbox.is_closed() {
                return false; // reader gone: reopened, it fetches again
            }
            while let Some((message, read)) = o.waiting.pop_front() {
                match o.inbox.try_send(Inbound::Message { message, read }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Inbound::Message { message, read })) => {
                        o.waiting.push_front((message, read));
                        if o.waiting.len() <= STASH {
                            o.over = None;
                        }
                        return true;
                    }
                    Err(_) => return false, // reader gone
                }
            }
            o.over = None;
            if !o.paused {
                return false; // all handed over, never paused
            }
            if o.inbox.capacity() < o.inbox.max_capacity() / 2 {
                return true;
            }
            match set_paused(consumer, name, false) {
                Ok(()) => {
                    debug!(partition = %name, "reader caught up: partition resumed");
                    false
                }
                Err(e) => {
                    debug!(partition = %name, error = %e, "partition not resumed yet; trying again");
                    true
                }
            }
        });
    }

    /// When the first partition with more than `STASH` messages waiting
    /// (not paused) runs out of patience.
    fn overdue_at(&self) -> Option<std::time::Instant> {
        self.parts
            .values()
            .filter_map(|o| o.over)
            .min()
            .map(|t| t + PATIENCE)
    }

    /// Pause the partitions whose readers stayed `STASH` behind for
    /// `PATIENCE`: the others go on.
    fn pause_overdue(&mut self, consumer: &Arc<StreamConsumer<Context>>) {
        for (name, o) in &mut self.parts {
            if o.paused || o.over.is_none_or(|t| t.elapsed() < PATIENCE) {
                continue;
            }
            if let Err(e) = set_paused(consumer, name, true) {
                warn!(partition = %name, error = %e, "could not pause a partition whose reader is behind");
            }
            debug!(partition = %name, "reader behind: partition paused until its inbox drains");
            o.paused = true;
            o.over = None;
        }
    }

    /// Ready when a held partition's reader has room: for its next waiting
    /// message, or (none waiting) for half its inbox, when it is resumed.
    /// Never ready without held partitions.
    async fn room(&self) {
        if self.parts.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.parts.values().map(|o| {
            // Woken for a quarter inbox at a time when many wait, not for
            // every message.
            let n = if o.waiting.is_empty() {
                (o.inbox.max_capacity() / 2).max(1)
            } else {
                o.waiting.len().min(o.inbox.max_capacity() / 4).max(1)
            };
            Box::pin(async move {
                // The permits go back at once: `drain` sends.
                let _ = o.inbox.reserve_many(n).await;
            })
        });
        futures_util::future::select_all(waits).await;
    }
}

/// Pause or resume one partition (`topic/N`) in the consumer.
pub(crate) fn set_paused(
    consumer: &Arc<StreamConsumer<Context>>,
    name: &str,
    paused: bool,
) -> Result<(), KafkaError> {
    let Some((topic, partition)) = split_name(name) else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if paused {
        return consumer.pause(&tpl);
    }
    consumer.resume(&tpl)?;
    wake_fetcher(consumer, name);
    Ok(())
}

/// Partitions resumed whose fetcher is still to be woken, and whether a
/// thread is waking them.
#[derive(Default)]
pub(crate) struct Wakes {
    pending: HashSet<String>,
    running: bool,
}

/// librdkafka's fetcher learns of a resume only when it next wakes up, up
/// to a second later: with every partition it fetches paused (a
/// one-partition topic, a partition just opened) nothing wakes it sooner,
/// and each resume stalled that long. Any request it sends wakes it; here
/// a look-up of the partition's bounds, whose answer is not needed. One
/// thread sends them one after another, so a runner opening hundreds of
/// partitions does not start a thread for each.
fn wake_fetcher(consumer: &Arc<StreamConsumer<Context>>, name: &str) {
    let wakes = &consumer.context().wakes;
    {
        let Ok(mut w) = wakes.lock() else { return };
        w.pending.insert(name.to_string());
        if std::mem::replace(&mut w.running, true) {
            return; // the running thread takes it
        }
    }
    let consumer = consumer.clone();
    tokio::task::spawn_blocking(move || loop {
        let next = {
            let Ok(mut w) = consumer.context().wakes.lock() else {
                return;
            };
            match w.pending.iter().next().cloned() {
                Some(name) => w.pending.take(&name),
                None => {
                    w.running = false;
                    return;
                }
            }
        };
        let Some((topic, partition)) = next.as_deref().and_then(split_name) else {
            continue;
        };
        if consumer
            .fetch_watermarks(topic, partition, WAKE_TIMEOUT)
            .is_err()
        {
            // No answer (a broker down): the fetchers wake by themselves
            // meanwhile, and a second each for the rest would only hold up
            // a runner that is stopping.
            if let Ok(mut w) = consumer.context().wakes.lock() {
                w.pending.clear();
            }
        }
    });
}

/// What the polling task hands a partition's reader, in order, each with
/// the number of the read that brought it (see [`Reads`]).
pub(crate) enum Inbound {
    Message {
        message: Message,
        read: u64,
    },
    /// The consumer's position in the partition while the poller holds no
    /// message: every message before it was handed over already, so any
    /// gap up to it holds none (transaction markers, aborted records).
    Position {
        next: u64,
        read: u64,
    },
}

pub(crate) struct Context {
    pub(crate) assignments: mpsc::UnboundedSender<Assignment>,
    pub(crate) inboxes: Inboxes,
    /// What librdkafka last said went wrong (a refused password, a
    /// certificate that does not verify), for the error a failed start
    /// gives instead of a bare "no broker answered".
    pub(crate) last_error: Mutex<Option<String>>,
    /// Resumed partitions whose fetcher is to be woken (see `set_paused`).
    pub(crate) wakes: Mutex<Wakes>,
}

impl Context {
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// librdkafka's reasons name the broker and the cause; they hold no
    /// secret (a password is never echoed).
    fn remember(&self, reason: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(reason.to_string());
        }
    }
}

impl ClientContext for Context {
    // librdkafka reports every failed connection attempt, several times a
    // second while a broker is down; the poller reports them once per
    // change instead, and librdkafka's own lines stay at debug level.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        debug!(?level, facility = fac, "librdkafka: {message}");
        // A failed connection, logged from librdkafka's own threads at
        // once (its error events wait for a poll, which a start that
        // waits for metadata does not make).
        use rdkafka::config::RDKafkaLogLevel as L;
        let failed = matches!(
            level,
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning
        );
        if fac == "FAIL" && failed {
            let reason = message.split_once("]: ").map_or(message, |(_, rest)| rest);
            self.remember(reason);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(%error, "librdkafka: {reason}");
        // "All brokers are down" follows the error that says why.
        let summary = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        if !summary {
            self.remember(reason);
        }
    }
}

pub(crate) fn names(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| partition_name(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = names(tpl);
            // From now on nothing reaches their readers; the runner drops
            // them. A commit in flight either lands before the new owner
            // fences the partition or is refused by the sink's epoch.
            if let Ok(mut inboxes) = self.inboxes.lock() {
                for name in &revoked {
                    inboxes.remove(name);
                }
            }
            debug!(partitions = ?revoked, "partitions revoked");
            let _ = self.assignments.send(Assignment::Revoked(revoked));
        }
    }

    /// rdkafka's own rebalance (assign or unassign, eager or cooperative,
    /// between the two callbacks), except where assigned partitions start:
    /// at the log's beginning, not at the group's committed offset. Those
    /// offsets are advisory and may be ahead of the sink (an operator's
    /// `--reset-offsets --to-latest`); librdkafka may apply a start it
    /// looked up after the reader's seek, and one behind the reader only
    /// costs a seek back, while one ahead would skip messages.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(e) = tpl.set_all_offsets(Offset::Beginning) {
                    warn!(error = %e, "could not set where newly assigned partitions start");
                }
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let done = match cooperative {
                    true => consumer.incremental_assign(tpl),
                    false => consumer.assign(tpl),
                };
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
                done
            }
            other => {
                let rebalance = match other {
                    E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
                    code => Rebalance::Error(KafkaError::Rebalance(code.into())),
                };
                self.pre_rebalance(consumer, &rebalance);
                let done = match cooperative {
                    true => consumer.incremental_unassign(tpl),
                    false => consumer.unassign(),
                };
                self.post_rebalance(consumer, &rebalance);
                done
            }
        };
        if let Err(e) = done {
            warn!(error = %e, "the consumer did not take its new assignment");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Nothing is fetched until the sink says where to start.
                if let Err(e) = consumer.pause(tpl) {
                    warn!(error = %e, "could not pause newly assigned partitions");
                }
                let assigned = names(tpl);
                debug!(partitions = ?assigned, "partitions assigned");
                let _ = self.assignments.send(Assignment::Assigned(assigned));
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Drive the consumer (rebalances happen while it polls) and hand each
/// message to its partition's reader; report positions when idle.
pub(crate) async fn poll(
    consumer: Arc<StreamConsumer<Context>>,
    inboxes: Inboxes,
    reads: Arc<Reads>,
    limit: usize,
    brokers: String,
) {
    // The last error reported, and when: the same error is repeated
    // at most every 30 s while it lasts.
    let mut reported: Option<(String, std::time::Instant)> = None;
    let mut held = Held::default();
    let mut last_message = std::time::Instant::now();
    loop {
        held.drain(&consumer);
        if let Some(at) = held.overdue_at() {
            // A reader `STASH` behind: wait for it rather than fetch more,
            // until it has room or runs out of patience.
            tokio::select! {
                () = held.room() => {}
                () = tokio::time::sleep_until(at.into()) => held.pause_overdue(&consumer),
                () = reads.sought.notified() => {}
            }
            continue;
        }
        // A message, or room for what waits (a paused partition brings no
        // message that would wake the loop).
        let read = reads.begin();
        let next = tokio::select! {
            received = tokio::time::timeout(IDLE_POSITIONS, consumer.recv()) => received,
            () = held.room() => continue,
            // `recv` is cancel-safe: nothing is taken from the consumer.
            () = reads.sought.notified() => continue,
        };
        let received = match next {
            Ok(r) => r,
            Err(_) => {
                // Half a second without a message: the poller holds none,
                // so each partition's position tells its reader whether
                // offsets past its last message hold nothing to read.
                if last_message.elapsed() >= IDLE_POSITIONS {
                    send_positions(&consumer, &inboxes, &held, &reads).await;
                }
                continue;
            }
        };
        last_message = std::time::Instant::now();
        let msg = match received {
            Ok(m) => {
                if reported.take().is_some() {
                    tracing::info!(brokers = %brokers, "kafka consumer recovered");
                }
                m
            }
            Err(e) => {
                let text = e.to_string();
                let repeat = reported.as_ref().is_some_and(|(last, at)| {
                    *last == text && at.elapsed() < Duration::from_secs(30)
                });
                if !repeat {
                    warn!(brokers = %brokers, error = %text, "kafka consumer error; retrying");
                    reported = Some((text, std::time::Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let name = partition_name(msg.topic(), msg.partition());
        let inbox = inboxes.lock().ok().and_then(|i| i.get(&name).cloned());
        // No reader yet (or any more): it will be fetched again
        // from the sink's position when one opens.
        let Some(inbox) = inbox else { continue };
        let Ok(offset) = u64::try_from(msg.offset()) else {
            continue;
        };
        let value = msg.payload().map(<[u8]>::to_vec);
        let poison = value.as_ref().and_then(|v| {
            (v.len() > limit).then(|| {
                format!(
                    "message of {} bytes is larger than max_message_bytes = {limit}",
                    v.len()
                )
            })
        });
        let meta = Meta {
            timestamp_ms: msg.timestamp().to_millis(),
            headers: msg
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let message = Message {
            offset,
            next_offset: offset + 1,
            key: msg.key().map(<[u8]>::to_vec),
            value: if poison.is_some() { None } else { value },
            poison,
            meta,
        };
        drop(msg);
        held.deliver(&name, inbox, message, read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        assert_eq!(
            split_name(&partition_name("a.b-c", 12)),
            Some(("a.b-c", 12))
        );
        assert_eq!(split_name("nopartition"), None);
    }
}
