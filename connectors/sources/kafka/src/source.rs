//! A consumer group member. Kafka decides which partitions this runner
//! reads; the sink decides where each one starts. Offsets committed to the
//! group are advisory (for lag tools): correctness rests on the positions
//! stored in the sink and on its epochs.

use crate::config::{KafkaSourceConfig, OutOfRange, StartAt, OWNED};
use crate::consumer::{
    names, partition_name, poll, set_paused, split_name, Context, Inboxes, Reads, Seeker,
};
use crate::reader::{AuditReader, KafkaReader, Reseek};
use async_trait::async_trait;
use idem_core::{Assignment, PartitionReader, Source, SourceError};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Messages buffered per partition between the consumer and its reader.
const PARTITION_BUFFER: usize = 8192;

/// How long a librdkafka call that talks to the broker may block.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

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
    reads: Arc<Reads>,
    seeker: Arc<Seeker>,
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
            .set("auto.offset.reset", "earliest")
            // Once its queue holds `queued.min.messages`, librdkafka stops
            // fetching a partition for this long (1 s by default), even
            // after the poller has emptied the queue: with a few busy
            // partitions that capped reading at a third of what the
            // runner maps and commits. The poller drains the queue
            // continuously, so a short wait costs nothing.
            .set("fetch.queue.backoff.ms", "10")
            // What librdkafka fetches ahead per partition: 100,000
            // messages by default, about 50 MB of a six-partition runner's
            // memory with 200-byte messages. The poller hands messages on
            // as they come, and fetching again takes 10 ms.
            .set("queued.min.messages", "20000");
        if cfg.topics.iter().any(|t| t.starts_with('^')) {
            // A pattern takes in topics created later (Debezium makes one
            // per new table) at the next metadata refresh: every 30 s
            // rather than librdkafka's 5 minutes. `properties` may say
            // otherwise.
            client.set("topic.metadata.refresh.interval.ms", "30000");
        }
        // librdkafka's own lines reach the log at debug level (with
        // `debug = "..."` among the properties for its detailed traces).
        // Its warnings and errors always reach the context, which keeps
        // the last failed connection's reason for a failed start.
        client.set_log_level(if tracing::enabled!(tracing::Level::DEBUG) {
            rdkafka::config::RDKafkaLogLevel::Debug
        } else {
            rdkafka::config::RDKafkaLogLevel::Warning
        });
        for (k, v) in &cfg.properties {
            debug_assert!(!OWNED.contains(&k.as_str()));
            client.set(k, v.expose());
        }
        let consumer: StreamConsumer<Context> = client
            .create_with_context(Context {
                assignments: tx,
                inboxes: inboxes.clone(),
                last_error: Default::default(),
                wakes: Default::default(),
            })
            .map_err(|e| format!("cannot create the consumer: {e}"))?;
        let consumer = Arc::new(consumer);
        let reads = Arc::new(Reads::default());
        Ok(Client {
            seeker: Arc::new(Seeker::new(consumer.clone(), reads.clone())),
            consumer,
            assignments: tokio::sync::Mutex::new(rx),
            inboxes,
            reads,
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
                let brokers = &self.cfg.brokers;
                let secs = BROKER_TIMEOUT.as_secs();
                // A broker that answered but refused us (credentials, TLS)
                // says why; silence means nothing listens there. librdkafka
                // queues its reasons until the consumer is polled: poll it.
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), client.consumer.recv()).await;
                let why = match client.consumer.context().last_error() {
                    Some(reason) if !reason.contains("Connection refused") => format!(
                        "could not connect to {brokers} within {secs}s: {reason}; check the connection settings in [source.properties] (security.protocol, sasl.*, ssl.*)"
                    ),
                    _ => format!(
                        "no broker answered at {brokers} within {secs}s ({e}); is Kafka running there? (for Idem's tests: bash scripts/kafka.sh)"
                    ),
                };
                return Err(setup(&self.cfg, why));
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
            // From the beginning, not the group's offsets (see
            // `Context::rebalance`); the reader's seek says where.
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| setup(&self.cfg, format!("stop_at_end: {topic}/{p}: {e}")))?;
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
        let reads = client.reads.clone();
        let limit = self.cfg.max_message_bytes;
        let brokers = self.cfg.brokers.clone();
        *poller = Some(tokio::spawn(poll(consumer, inboxes, reads, limit, brokers)));
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
            // The runner reports what the sink will never get (`lost`).
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
        // From here on an earlier reader's seek back no longer applies.
        let reader = client.seeker.claim(partition).await;
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
        // Right after an assignment the partition may not be ready to seek.
        let mut attempt = 0;
        // Revoked while opening, or opened again since: a reader that
        // never yields; the runner drops it with the partition.
        let closed = || -> Result<Box<dyn PartitionReader>, SourceError> {
            let (_, closed) = mpsc::channel(1);
            Ok(Box::new(KafkaReader::new(closed, 0, None, None, 0)))
        };
        let barrier = loop {
            let still_ours = client
                .inboxes
                .lock()
                .map(|i| i.contains_key(partition))
                .unwrap_or(false);
            if !still_ours {
                return closed();
            }
            match client.seeker.seek(partition, reader, from).await {
                Ok(Some(barrier)) => break barrier,
                Ok(None) => return closed(),
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    debug!(partition, error = %e, "seek not possible yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.read_err(partition, e)),
            }
        };
        set_paused(&client.consumer, partition, false).map_err(|e| self.read_err(partition, e))?;
        // With stop_at_end: read up to where this partition ends now.
        let end = self.cfg.stop_at_end.then_some(high);
        let next = from;
        let reseek = Reseek::new(client.seeker.clone(), partition, reader);
        // Below the log start: the offsets up to where reading goes on
        // were deleted before the sink had them. (Above the end the topic
        // is a new one: nothing of it was skipped.)
        let lost = start.filter(|&n| n < low).map(|n| (n, from));
        Ok(Box::new(
            KafkaReader::new(rx, next, end, Some(reseek), barrier).with_lost(lost),
        ))
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
        Ok(Box::new(AuditReader::new(source, reader)))
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
