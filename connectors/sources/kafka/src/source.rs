//! A consumer group member. Kafka decides which partitions this runner
//! reads; the sink decides where each one starts. Offsets committed to the
//! group are advisory (for lag tools): correctness rests on the positions
//! stored in the sink and on its epochs.

use crate::config::{KafkaSourceConfig, OutOfRange, StartAt, OWNED};
use async_trait::async_trait;
use idem_core::{Assignment, Message, Meta, PartitionReader, ReadStatus, Source, SourceError};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Messages buffered per partition between the consumer and its reader.
const PARTITION_BUFFER: usize = 8192;

/// How long a librdkafka call that talks to the broker may block.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// `topic/partition`, the name positions are stored under.
pub fn partition_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

fn split_name(name: &str) -> Option<(&str, i32)> {
    let (topic, p) = name.rsplit_once('/')?;
    Some((topic, p.parse().ok()?))
}

/// Readers' inboxes, by partition name; shared with the rebalance callback.
type Inboxes = Arc<Mutex<HashMap<String, mpsc::Sender<Inbound>>>>;

/// How long the poller waits for a message before it reports positions.
const IDLE_POSITIONS: Duration = Duration::from_millis(500);

/// Send each reader its partition's consumer position (see [`Inbound`]).
/// A full inbox is skipped: its reader has messages to read first.
async fn send_positions(consumer: &StreamConsumer<Context>, inboxes: &Inboxes) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in positions.elements() {
        let Offset::Offset(o) = e.offset() else {
            continue;
        };
        let Ok(o) = u64::try_from(o) else { continue };
        let name = partition_name(e.topic(), e.partition());
        let inbox = inboxes.lock().ok().and_then(|i| i.get(&name).cloned());
        if let Some(inbox) = inbox {
            let _ = inbox.try_send(Inbound::Position(o));
        }
    }
}

/// What the polling task hands a partition's reader, in order.
enum Inbound {
    Message(Message),
    /// The consumer's position in the partition while the poller holds no
    /// message: every message before it was handed over already, so any
    /// gap up to it holds none (transaction markers, aborted records).
    Position(u64),
}

struct Context {
    assignments: mpsc::UnboundedSender<Assignment>,
    inboxes: Inboxes,
}

impl ClientContext for Context {
    // librdkafka reports every failed connection attempt, several times a
    // second while a broker is down; the poller reports them once per
    // change instead, and librdkafka's own lines stay at debug level.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        debug!(?level, facility = fac, "librdkafka: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(%error, "librdkafka: {reason}");
    }
}

fn names(tpl: &TopicPartitionList) -> Vec<String> {
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

/// Kafka topics read through a consumer group.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    /// Created on first use, so `idem check` and `idem status` build the
    /// source without touching the broker; the group is joined only by
    /// the first `next_assignment`.
    client: std::sync::OnceLock<Result<Client, String>>,
    subscribed: std::sync::atomic::AtomicBool,
    assigned_once: std::sync::atomic::AtomicBool,
    poller: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The private consumer `idem verify` reads through.
    audit: tokio::sync::OnceCell<Audit>,
}

struct Audit {
    source: Arc<KafkaSource>,
    /// Partitions assigned to it so far.
    assigned: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

struct Client {
    consumer: Arc<StreamConsumer<Context>>,
    assignments: tokio::sync::Mutex<mpsc::UnboundedReceiver<Assignment>>,
    inboxes: Inboxes,
}

fn setup(cfg: &KafkaSourceConfig, message: impl Into<String>) -> SourceError {
    SourceError::Setup {
        source_name: format!("kafka {}", cfg.brokers),
        message: message.into(),
    }
}

impl KafkaSource {
    /// No I/O: the consumer is created on first use.
    pub fn new(cfg: KafkaSourceConfig) -> Self {
        KafkaSource {
            cfg,
            client: std::sync::OnceLock::new(),
            subscribed: std::sync::atomic::AtomicBool::new(false),
            assigned_once: std::sync::atomic::AtomicBool::new(false),
            poller: Mutex::new(None),
            audit: tokio::sync::OnceCell::new(),
        }
    }

    fn client(&self) -> Result<&Client, SourceError> {
        self.client
            .get_or_init(|| self.create())
            .as_ref()
            .map_err(|e| setup(&self.cfg, e.clone()))
    }

    fn create(&self) -> Result<Client, String> {
        let cfg = &self.cfg;
        let (tx, rx) = mpsc::unbounded_channel();
        let inboxes: Inboxes = Arc::default();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .set("client.id", &cfg.client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            // Where a partition starts is the sink's position (or `start`),
            // set by a seek. librdkafka may still apply its own reset after
            // that seek (an answer to an offset query sent before it
            // restarts the query), so its reset only ever goes back to the
            // oldest offset: the reader drops what it already has and seeks
            // again. A reset to the end would skip messages silently.
            .set("auto.offset.reset", "earliest");
        // librdkafka's own lines reach the log at debug level (with
        // `debug = "..."` among the properties for its detailed traces).
        if tracing::enabled!(tracing::Level::DEBUG) {
            client.set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
        }
        for (k, v) in &cfg.properties {
            debug_assert!(!OWNED.contains(&k.as_str()));
            client.set(k, v.expose());
        }
        let consumer: StreamConsumer<Context> = client
            .create_with_context(Context {
                assignments: tx,
                inboxes: inboxes.clone(),
            })
            .map_err(|e| format!("cannot create the consumer: {e}"))?;
        Ok(Client {
            consumer: Arc::new(consumer),
            assignments: tokio::sync::Mutex::new(rx),
            inboxes,
        })
    }

    /// Join the group once.
    async fn subscribe(&self, client: &Client) -> Result<(), SourceError> {
        use std::sync::atomic::Ordering;
        if self.subscribed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // A broker that cannot be reached at start is a clear error, not
        // a silent wait: librdkafka would retry forever.
        let consumer = client.consumer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(None, BROKER_TIMEOUT).map(|m| {
                m.topics()
                    .iter()
                    .map(|t| {
                        let ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                        (t.name().to_string(), ids)
                    })
                    .collect::<Vec<_>>()
            })
        });
        let known = match metadata.await {
            Ok(Ok(names)) => names,
            Ok(Err(e)) => {
                self.subscribed.store(false, Ordering::SeqCst);
                return Err(setup(
                    &self.cfg,
                    format!(
                        "no broker answered at {} within {}s ({e}); is Kafka running there? (for Idem's tests: bash scripts/kafka.sh)",
                        self.cfg.brokers,
                        BROKER_TIMEOUT.as_secs()
                    ),
                ));
            }
            Err(e) => {
                self.subscribed.store(false, Ordering::SeqCst);
                return Err(setup(&self.cfg, format!("metadata lookup failed: {e}")));
            }
        };
        if self.cfg.stop_at_end {
            return self.assign_all(client, &known).inspect_err(|_| {
                self.subscribed.store(false, Ordering::SeqCst);
            });
        }
        for topic in self.cfg.topics.iter().filter(|t| !t.starts_with('^')) {
            if !known.iter().any(|(name, _)| name == topic) {
                warn!(topic, brokers = %self.cfg.brokers, "topic does not exist (yet); waiting for it");
            }
        }
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        client.consumer.subscribe(&topics).map_err(|e| {
            self.subscribed.store(false, Ordering::SeqCst);
            setup(&self.cfg, format!("cannot subscribe to {topics:?}: {e}"))
        })?;
        self.ensure_polling(client);
        Ok(())
    }

    /// A backfill (`stop_at_end`) reads every partition of its topics to
    /// its end, so it does not join the group: members that still hold
    /// partitions there (a runner killed a moment ago, until its session
    /// times out) would leave it only the rest, and it would finish early.
    /// It assigns them all itself, paused until the sink gives each one's
    /// position; the sink's epochs fence as always.
    fn assign_all(&self, client: &Client, known: &[(String, Vec<i32>)]) -> Result<(), SourceError> {
        let mut wanted: Vec<(&str, i32)> = Vec::new();
        for topic in &self.cfg.topics {
            let matching: Vec<&(String, Vec<i32>)> = match topic.strip_prefix('^') {
                Some(_) => {
                    let re = regex::Regex::new(topic)
                        .map_err(|e| setup(&self.cfg, format!("topic pattern `{topic}`: {e}")))?;
                    known.iter().filter(|(name, _)| re.is_match(name)).collect()
                }
                None => known.iter().filter(|(name, _)| name == topic).collect(),
            };
            if matching.is_empty() {
                return Err(setup(
                    &self.cfg,
                    format!("stop_at_end: no topic `{topic}` exists on {}; a backfill reads what exists now", self.cfg.brokers),
                ));
            }
            for (name, ids) in matching {
                wanted.extend(ids.iter().map(|&p| (name.as_str(), p)));
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in &wanted {
            tpl.add_partition(topic, *p);
        }
        let fail = |what: &str, e: KafkaError| {
            setup(
                &self.cfg,
                format!(
                    "stop_at_end: cannot {what} {} partitions: {e}",
                    wanted.len()
                ),
            )
        };
        client
            .consumer
            .assign(&tpl)
            .map_err(|e| fail("assign", e))?;
        client.consumer.pause(&tpl).map_err(|e| fail("pause", e))?;
        info!(
            partitions = wanted.len(),
            "stop_at_end: reading every partition of the topics, outside the consumer group"
        );
        let _ = client
            .consumer
            .context()
            .assignments
            .send(Assignment::Assigned(names(&tpl)));
        self.ensure_polling(client);
        Ok(())
    }

    /// One task drives the consumer (rebalances happen while it polls) and
    /// hands each message to its partition's reader.
    fn ensure_polling(&self, client: &Client) {
        let Ok(mut poller) = self.poller.lock() else {
            return;
        };
        if poller.is_some() {
            return;
        }
        let consumer = client.consumer.clone();
        let inboxes = client.inboxes.clone();
        let limit = self.cfg.max_message_bytes;
        let brokers = self.cfg.brokers.clone();
        *poller = Some(tokio::spawn(async move {
            // The last error reported, and when: the same error is repeated
            // at most every 30 s while it lasts.
            let mut reported: Option<(String, std::time::Instant)> = None;
            loop {
                // Half a second without a message: the poller holds none,
                // so each partition's position tells its reader whether
                // offsets past its last message hold nothing to read.
                let received = match tokio::time::timeout(IDLE_POSITIONS, consumer.recv()).await {
                    Ok(r) => r,
                    Err(_) => {
                        send_positions(&consumer, &inboxes).await;
                        continue;
                    }
                };
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
                if inbox.send(Inbound::Message(message)).await.is_err() {
                    debug!(partition = %name, "reader gone; message dropped");
                }
            }
        }));
    }

    /// The partition's first offset still held and its end.
    async fn watermarks(
        &self,
        client: &Client,
        topic: &str,
        p: i32,
    ) -> Result<(u64, u64), SourceError> {
        let consumer = client.consumer.clone();
        let t = topic.to_string();
        let (low, high) =
            tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&t, p, BROKER_TIMEOUT))
                .await
                .map_err(|e| setup(&self.cfg, format!("watermark lookup failed: {e}")))?
                .map_err(|e| self.read_err(&partition_name(topic, p), e))?;
        Ok((
            u64::try_from(low).unwrap_or(0),
            u64::try_from(high).unwrap_or(0),
        ))
    }

    /// The sink's position `n` is not in `low..=high`.
    fn out_of_range(
        &self,
        partition: &str,
        n: u64,
        low: u64,
        high: u64,
    ) -> Result<u64, SourceError> {
        let why = if n < low {
            format!(
                "offsets {n}..{low} were deleted from the topic (retention) before they were written to the sink"
            )
        } else {
            format!(
                "the partition ends at {high}: the topic was probably deleted and made anew since"
            )
        };
        match self.cfg.out_of_range {
            OutOfRange::Fail => Err(SourceError::Read {
                source_name: format!("kafka {}", self.cfg.brokers),
                partition: partition.to_string(),
                message: format!(
                    "the sink's position {n} is outside the partition's range {low}..{high}: {why}; set out_of_range = \"earliest\" or \"latest\" in the source to go on from there"
                ),
                retriable: false,
            }),
            OutOfRange::Earliest => {
                warn!(partition, position = n, low, high, "{why}; going on from the oldest offset held ({low}) as out_of_range = \"earliest\" says");
                Ok(low)
            }
            OutOfRange::Latest => {
                warn!(partition, position = n, low, high, "{why}; going on from the end ({high}) as out_of_range = \"latest\" says");
                Ok(high)
            }
        }
    }

    fn read_err(&self, partition: &str, e: KafkaError) -> SourceError {
        SourceError::Read {
            source_name: format!("kafka {}", self.cfg.brokers),
            partition: partition.to_string(),
            message: e.to_string(),
            retriable: true,
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        if let Ok(mut poller) = self.poller.lock() {
            if let Some(task) = poller.take() {
                task.abort();
            }
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn name(&self) -> &str {
        "kafka"
    }

    async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError> {
        let client = self.client()?;
        self.subscribe(client).await?;
        use std::sync::atomic::Ordering;
        if self.cfg.stop_at_end && self.assigned_once.load(Ordering::SeqCst) {
            // A backfill reads what it was first given, then finishes.
            return Ok(None);
        }
        let next = client.assignments.lock().await.recv().await;
        if matches!(next, Some(Assignment::Assigned(_))) {
            self.assigned_once.store(true, Ordering::SeqCst);
        }
        Ok(next)
    }

    async fn open(
        &self,
        partition: &str,
        start: Option<u64>,
    ) -> Result<Box<dyn PartitionReader>, SourceError> {
        let (topic, p) = split_name(partition)
            .ok_or_else(|| setup(&self.cfg, format!("`{partition}` is not topic/partition")))?;
        let client = self.client()?;
        let (tx, rx) = mpsc::channel(PARTITION_BUFFER);
        if let Ok(mut inboxes) = client.inboxes.lock() {
            inboxes.insert(partition.to_string(), tx);
        }
        // Where the partition begins and ends now: a position outside that
        // range was deleted (retention) or belongs to an older topic of the
        // same name, and librdkafka would silently jump elsewhere.
        let (low, high) = self.watermarks(client, topic, p).await?;
        let from = match start {
            Some(n) if n < low || n > high => self.out_of_range(partition, n, low, high)?,
            Some(n) => n,
            None => match self.cfg.start {
                StartAt::Earliest => low,
                StartAt::Latest => high,
            },
        };
        let offset = Offset::Offset(i64::try_from(from).unwrap_or(i64::MAX));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        // Right after an assignment the partition may not be ready to seek.
        let mut attempt = 0;
        loop {
            let still_ours = client
                .inboxes
                .lock()
                .map(|i| i.contains_key(partition))
                .unwrap_or(false);
            if !still_ours {
                // Revoked while opening: a reader that never yields; the
                // runner drops it with the partition.
                let (_, closed) = mpsc::channel(1);
                return Ok(Box::new(KafkaReader {
                    inbox: closed,
                    next: 0,
                    end: None,
                    reseek: None,
                    position: None,
                    live: false,
                    idle_reads: 0,
                }));
            }
            match client.consumer.seek(topic, p, offset, BROKER_TIMEOUT) {
                Ok(()) => break,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    debug!(partition, error = %e, "seek not possible yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.read_err(partition, e)),
            }
        }
        client
            .consumer
            .resume(&tpl)
            .map_err(|e| self.read_err(partition, e))?;
        // With stop_at_end: read up to where this partition ends now.
        let end = self.cfg.stop_at_end.then_some(high);
        let next = from;
        Ok(Box::new(KafkaReader {
            inbox: rx,
            next,
            end,
            reseek: Some(Reseek {
                consumer: client.consumer.clone(),
                topic: topic.to_string(),
                partition: p,
                last: None,
            }),
            position: None,
            live: false,
            idle_reads: 0,
        }))
    }

    /// A private consumer group of one (a fresh group id, nothing ever
    /// committed): it is assigned every partition and leaves the
    /// connector's group alone. One per source, shared by its partitions.
    async fn open_audit(&self, partition: &str) -> Result<Box<dyn PartitionReader>, SourceError> {
        let (topic, p) = split_name(partition)
            .ok_or_else(|| setup(&self.cfg, format!("`{partition}` is not topic/partition")))?;
        let audit = self
            .audit
            .get_or_init(|| async {
                let mut cfg = self.cfg.clone();
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                cfg.group_id = format!("{}-verify-{}-{nanos}", cfg.group_id, std::process::id());
                cfg.stop_at_end = true;
                Audit {
                    source: Arc::new(KafkaSource::new(cfg)),
                    assigned: tokio::sync::Mutex::new(std::collections::HashSet::new()),
                }
            })
            .await;
        {
            let mut assigned = audit.assigned.lock().await;
            while !assigned.contains(partition) {
                let next =
                    tokio::time::timeout(Duration::from_secs(60), audit.source.next_assignment())
                        .await
                        .map_err(|_| {
                            setup(
                                &self.cfg,
                                format!(
                                    "the audit's consumer was not assigned {partition} within 60 s"
                                ),
                            )
                        })??;
                match next {
                    Some(Assignment::Assigned(parts)) => assigned.extend(parts),
                    Some(Assignment::Revoked(_)) => {}
                    None => {
                        return Err(setup(
                            &self.cfg,
                            format!("the audit's consumer was not assigned {partition}"),
                        ))
                    }
                }
            }
        }
        let source = audit.source.clone();
        let (low, _) = source.watermarks(source.client()?, topic, p).await?;
        let reader = source.open(partition, Some(low)).await?;
        Ok(Box::new(AuditReader {
            _source: source,
            reader,
        }))
    }

    async fn ack(&self, partition: &str, next_offset: u64) -> Result<(), SourceError> {
        let Some((topic, p)) = split_name(partition) else {
            return Ok(());
        };
        let Ok(client) = self.client() else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        let offset = Offset::Offset(i64::try_from(next_offset).unwrap_or(i64::MAX));
        if tpl.add_partition_offset(topic, p, offset).is_ok() {
            // Advisory, for lag tools: a failure is logged, never fatal.
            if let Err(e) = client.consumer.commit(&tpl, CommitMode::Async) {
                debug!(partition, error = %e, "group offset commit failed");
            }
        }
        Ok(())
    }

    fn still_assigned(&self, partition: &str) -> bool {
        // Revocation removes the inbox; an assignment (re)creates it.
        self.client()
            .ok()
            .and_then(|c| c.inboxes.lock().ok().map(|i| i.contains_key(partition)))
            .unwrap_or(false)
    }

    async fn retention(&self) -> Vec<(String, Option<Option<Duration>>)> {
        let topics: Vec<&String> = self
            .cfg
            .topics
            .iter()
            .filter(|t| !t.starts_with('^'))
            .collect();
        if topics.is_empty() {
            return Vec::new();
        }
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.cfg.brokers);
        for (k, v) in &self.cfg.properties {
            // Security settings apply; consumer-only ones would be noise.
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                client.set(k, v.expose());
            }
        }
        let admin: AdminClient<DefaultClientContext> = match client.create() {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "no admin client for the topics' retention");
                return topics.iter().map(|t| (t.to_string(), None)).collect();
            }
        };
        let specs: Vec<ResourceSpecifier> = topics
            .iter()
            .map(|t| ResourceSpecifier::Topic(t.as_str()))
            .collect();
        let opts = AdminOptions::new().request_timeout(Some(BROKER_TIMEOUT));
        let answers = match admin.describe_configs(&specs, &opts).await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "the broker did not describe the topics");
                Vec::new()
            }
        };
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ms = answers
                    .get(i)
                    .and_then(|a| a.as_ref().ok())
                    .and_then(|r| r.get("retention.ms"))
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse::<i64>().ok());
                let retention = ms.map(|ms| u64::try_from(ms).ok().map(Duration::from_millis));
                (t.to_string(), retention)
            })
            .collect()
    }

    async fn end_offset(&self, partition: &str) -> Option<u64> {
        let (topic, p) = split_name(partition)?;
        let client = self.client().ok()?;
        self.watermarks(client, topic, p)
            .await
            .ok()
            .map(|(_, high)| high)
    }
}

struct KafkaReader {
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
}

/// A partition fetched from behind its reader's position (librdkafka reset
/// it after the reader's seek) is sent back there, at most once a second,
/// rather than read again from the start and dropped message by message.
struct Reseek {
    consumer: Arc<StreamConsumer<Context>>,
    topic: String,
    partition: i32,
    last: Option<std::time::Instant>,
}

impl Reseek {
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
struct AuditReader {
    _source: Arc<KafkaSource>,
    reader: Box<dyn PartitionReader>,
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
        // could otherwise slip in ahead of it.
        let mut fresh = out.split_off(before);
        let floor = self.next;
        if let (Some(first), Some(r)) = (fresh.first(), self.reseek.as_mut()) {
            if first.offset < floor {
                r.to(floor, first.offset);
            }
        }
        fresh.retain(|m| m.offset >= floor);
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
        let mut reader = KafkaReader {
            inbox: rx,
            next: 5,
            end: Some(8),
            reseek: None,
            position: None,
            live: false,
            idle_reads: 0,
        };
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
    async fn positions_move_a_reader_over_markers_once_it_read_a_message() {
        let (tx, rx) = mpsc::channel(16);
        let mut reader = KafkaReader {
            inbox: rx,
            next: 10,
            end: Some(20),
            reseek: None,
            position: None,
            live: false,
            idle_reads: 0,
        };
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

    #[test]
    fn partition_names_round_trip() {
        assert_eq!(
            split_name(&partition_name("a.b-c", 12)),
            Some(("a.b-c", 12))
        );
        assert_eq!(split_name("nopartition"), None);
    }
}
