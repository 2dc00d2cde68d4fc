//! What the Kafka tests share: topics of their own, producers, the
//! broker's view of offsets, connector configs, runners in the background.

use idem_testkit::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BROKERS: &str = "127.0.0.1:9092";

pub fn client_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", BROKERS);
    c
}

/// A topic of its own, with `partitions` partitions.
pub async fn fresh_topic(prefix: &str, partitions: i32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let topic = format!("{prefix}_{}_{nanos}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("Kafka broker at {BROKERS}: {e}; start one with bash scripts/kafka.sh")
        });
    for r in results {
        r.unwrap();
    }
    topic
}

/// `count` events `{"id": i, "v": i * 10}` keyed by id, spread over the
/// topic's partitions by key.
pub async fn produce(topic: &str, ids: std::ops::Range<i64>) {
    produce_values_of(topic, ids, |i| {
        format!(r#"{{"id":{i},"v":{}}}"#, i * 10).into_bytes()
    })
    .await;
}

/// The table fail points the crash tests arm in turn.
pub const FAILPOINTS: [&str; 3] = ["after_write", "mid_write", "after_commit"];

/// `rounds` runs of `cfg` while `produce(from..from + per_round)` writes
/// each round's events: even rounds SIGKILLed after a random time in
/// `kill_ms`, odd rounds aborted by the next of [`FAILPOINTS`]. Returns
/// how they ended, for [`Rounds::check`].
pub async fn crash_while_producing<F, Fut>(
    cfg: &std::path::Path,
    rng: &mut rand::rngs::StdRng,
    rounds: usize,
    per_round: i64,
    kill_ms: std::ops::Range<u64>,
    produce: F,
) -> Rounds
where
    F: Fn(std::ops::Range<i64>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut ended = Rounds::default();
    for round in 0..rounds {
        let from = round as i64 * per_round;
        // The producer keeps writing while the runner runs and dies.
        let producing = tokio::spawn(produce(from..from + per_round));
        let failpoint = (round % 2 == 1).then(|| FAILPOINTS[(round / 2) % FAILPOINTS.len()]);
        ended.run(cfg, failpoint, rng, kill_ms.clone()).await;
        producing.await.unwrap();
    }
    ended
}

/// Event `i` of `ids` keyed by `i`, its value `value(i)`.
pub async fn produce_values_of(
    topic: &str,
    ids: std::ops::Range<i64>,
    value: impl Fn(i64) -> Vec<u8>,
) {
    let producer: FutureProducer = client_config()
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for i in ids {
        let key = i.to_string();
        let value = value(i);
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(tokio::spawn(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e.to_string())
        }));
        if pending.len() >= 5000 {
            for p in pending.drain(..) {
                p.await.unwrap().unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// The topic's end offset per partition, named as Idem stores them.
pub fn end_offsets(topic: &str, partitions: i32) -> HashMap<String, i64> {
    let consumer: BaseConsumer = client_config().create().unwrap();
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            (format!("{topic}/{p}"), high)
        })
        .collect()
}

/// The offsets committed to the topic's group (`{topic}_group`).
pub fn group_offsets(topic: &str, partitions: i32) -> HashMap<String, i64> {
    let consumer: BaseConsumer = client_config()
        .set("group.id", format!("{topic}_group"))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                other => panic!(
                    "partition {} has no committed offset: {other:?}",
                    e.partition()
                ),
            };
            (format!("{topic}/{}", e.partition()), offset)
        })
        .collect()
}

/// Connector `k` reading `topic` in a group of its own; built up by the
/// tests and written out by `toml`.
#[derive(Clone)]
pub struct Conf {
    pub topic: String,
    /// Extra lines of the source table (`stop_at_end = true`, ...).
    pub source: String,
    /// Extra librdkafka properties.
    pub properties: String,
    /// The sink table's lines.
    pub sink: String,
    /// Extra lines of the connector table (`dead_letter = ...`).
    pub connector: String,
    pub max_records: usize,
    pub columns: String,
}

/// TOML for columns of the given names and types.
pub fn column_lines(list: &[(&str, &str)]) -> String {
    list.iter()
        .map(|(name, ty)| format!("[[connectors.k.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\n"))
        .collect()
}

impl Conf {
    /// `{"id", "v"}` events into the PostgreSQL table `schema.events`.
    pub fn new(topic: &str, schema: &str) -> Conf {
        Conf {
            topic: topic.to_string(),
            source: String::new(),
            // A killed runner's partitions move after this long (Kafka's
            // default: 45s).
            properties: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n"
                .to_string(),
            sink: format!(
                "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"events\"\n",
                pg_url()
            ),
            connector: String::new(),
            max_records: 5000,
            columns: column_lines(&[("id", "bigint"), ("v", "bigint")]),
        }
    }

    pub fn source(mut self, line: &str) -> Conf {
        self.source += &format!("{line}\n");
        self
    }

    /// The consumer group protocol (KIP-848): the broker assigns and
    /// times members out (`scripts/kafka.sh` sets 6 s), so the classic
    /// session settings are left out (librdkafka refuses them there).
    pub fn consumer_protocol(mut self) -> Conf {
        self.properties = "\"group.protocol\" = \"consumer\"\n".to_string();
        self
    }

    pub fn property(mut self, key: &str, value: &str) -> Conf {
        self.properties += &format!("\"{key}\" = \"{value}\"\n");
        self
    }

    pub fn sink(mut self, lines: &str) -> Conf {
        self.sink = format!("{lines}\n");
        self
    }

    pub fn sink_line(mut self, line: &str) -> Conf {
        self.sink += &format!("{line}\n");
        self
    }

    pub fn connector(mut self, line: &str) -> Conf {
        self.connector += &format!("{line}\n");
        self
    }

    pub fn max_records(mut self, n: usize) -> Conf {
        self.max_records = n;
        self
    }

    pub fn columns(mut self, toml: &str) -> Conf {
        self.columns = toml.to_string();
        self
    }

    pub fn more_columns(mut self, toml: &str) -> Conf {
        self.columns += toml;
        self
    }

    pub fn toml(&self) -> String {
        let Conf {
            topic,
            source,
            properties,
            sink,
            connector,
            max_records,
            columns,
        } = self;
        format!(
            r#"
[runner]
progress_interval = "1s"
shutdown_grace = "20s"
[connectors.k]
{connector}[connectors.k.source]
type = "kafka"
brokers = "{BROKERS}"
topics = ["{topic}"]
group_id = "{topic}_group"
{source}[connectors.k.source.properties]
{properties}[connectors.k.sink]
{sink}[connectors.k.batch]
max_records = {max_records}
linger = "200ms"
{columns}"#
        )
    }
}

pub async fn count(schema: &str) -> (i64, i64) {
    let row = pg()
        .await
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id) FROM \"{schema}\".events"),
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((0, 0));
    row
}

pub async fn positions(schema: &str) -> HashMap<String, i64> {
    offsets_column(schema, "next_offset").await
}

/// One column of connector `k`'s offsets table, by partition.
pub async fn offsets_column(schema: &str, column: &str) -> HashMap<String, i64> {
    pg().await
        .query(
            &format!(
                "SELECT partition, {column} FROM \"{schema}\".idem_offsets WHERE connector = 'k'"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Run until the table holds `want` rows (or a minute passes), then stop
/// with SIGTERM, which must exit 0.
pub async fn run_until(cfg: &std::path::Path, schema: &str, want: i64) {
    let mut child = idem().arg("run").arg(cfg).spawn().unwrap();
    let started = Instant::now();
    while count(schema).await.0 < want && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let a wrong extra batch land, if the code would write one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "idem run after SIGTERM: {status:?}");
}

/// `idem run` in the background, its log in `log`.
pub fn spawn_runner(
    cfg: &std::path::Path,
    log: &std::path::Path,
    failpoints: &str,
) -> std::process::Child {
    let mut cmd = idem();
    // Which partitions it opened, and under which epoch, too.
    cmd.env("RUST_LOG", "warn,idem::connector::partition=info")
        .arg("run")
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if !failpoints.is_empty() {
        cmd.env("IDEM_FAILPOINTS", failpoints);
    }
    cmd.spawn().unwrap()
}

/// Wait until `log` says `n` partitions were opened.
pub async fn wait_opened(log: &std::path::Path, n: usize) {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches("partition opened").count() >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} partitions never opened:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Transactions of a transactional producer on `topic` (3 partitions):
/// each writes `per_tx` events spread over the partitions and is
/// committed, or aborted when `aborts(tx)`. Returns the ids committed.
pub fn produce_transactions(
    topic: &str,
    txs: std::ops::Range<i64>,
    per_tx: i64,
    aborts: impl Fn(i64) -> bool,
) -> Vec<i64> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = client_config()
        .set("transactional.id", format!("{topic}-tx"))
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    producer.init_transactions(t).unwrap();
    let mut committed = Vec::new();
    for tx in txs {
        producer.begin_transaction().unwrap();
        let ids: Vec<i64> = (tx * per_tx..(tx + 1) * per_tx).collect();
        for &i in &ids {
            let key = i.to_string();
            let value = format!(r#"{{"id":{i},"v":{}}}"#, i * 10);
            let record = BaseRecord::to(topic)
                .key(&key)
                .payload(&value)
                .partition((i % 3) as i32);
            let mut record = Some(record);
            while let Some(r) = record.take() {
                if let Err((_, r)) = producer.send(r) {
                    producer.poll(Duration::from_millis(10));
                    record = Some(r);
                }
            }
        }
        // Sent for real before the abort: it then has something to undo.
        producer.flush(t).unwrap();
        if aborts(tx) {
            producer.abort_transaction(t).unwrap();
        } else {
            producer.commit_transaction(t).unwrap();
            committed.extend(ids);
        }
    }
    committed
}

/// `kafka-consumer-groups --describe` of the topic's group, the broker's
/// own tool (scripts/kafka.sh writes it): partition -> (committed offset,
/// lag, member holding it or `-`) as the broker reports them.
pub fn describe_group(topic: &str) -> HashMap<String, (i64, i64, String)> {
    let home = std::env::var("HOME").unwrap();
    let tool = format!("{home}/.cache/idem/kafka-4.4.0/bin/kafka-consumer-groups");
    let out = std::process::Command::new(&tool)
        .args(["--describe", "--group", &format!("{topic}_group")])
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (bash scripts/kafka.sh writes it)"));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{tool}: {stdout}{}",
        text(&out.stderr)
    );
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 7 && cols[1] == topic)
        .map(|cols| {
            (
                format!("{topic}/{}", cols[2]),
                // `-`: nothing committed yet (offset and lag unknown).
                (
                    cols[3].parse().unwrap_or(-1),
                    cols[5].parse().unwrap_or(-1),
                    cols[6].to_string(),
                ),
            )
        })
        .collect()
}

/// The partitions a runner's log says it opened, with the last epoch each
/// was opened under.
pub fn opened_in(log: &str) -> std::collections::HashMap<String, i64> {
    let field = |rest: &str, key: &str| {
        rest.split_whitespace()
            .find_map(|t| t.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_string())
    };
    log.lines()
        .filter_map(|l| l.split_once("partition opened").map(|(_, rest)| rest))
        .filter_map(|rest| {
            Some((
                field(rest, "partition=")?,
                field(rest, "epoch=")?.parse().ok()?,
            ))
        })
        .collect()
}

/// Where the events `{"id": i, ..}` of `missing` sit in `topic`: per
/// partition, the runs of offsets they occupy. A failure message names
/// them so a loss can be traced in the runners' logs.
pub fn locate(topic: &str, partitions: i32, missing: &std::collections::HashSet<i64>) -> String {
    use rdkafka::message::Message as _;
    let consumer: BaseConsumer = client_config()
        .set("group.id", format!("{topic}_locate"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let ends = end_offsets(topic, partitions);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let total: i64 = ends.values().sum();
    let mut found: Vec<(i32, i64)> = Vec::new();
    let (mut seen, started) = (0, Instant::now());
    while seen < total && started.elapsed() < Duration::from_secs(60) {
        let Some(Ok(m)) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        seen += 1;
        let id = m
            .payload()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
            .and_then(|v| v["id"].as_i64());
        if id.is_some_and(|id| missing.contains(&id)) {
            found.push((m.partition(), m.offset()));
        }
    }
    found.sort_unstable();
    let mut runs: Vec<(i32, i64, i64)> = Vec::new();
    for (p, o) in found {
        match runs.last_mut() {
            Some((lp, _, to)) if *lp == p && *to == o => *to = o + 1,
            _ => runs.push((p, o, o + 1)),
        }
    }
    runs.iter()
        .map(|(p, from, to)| format!("{topic}/{p} offsets {from}..{to}"))
        .collect::<Vec<_>>()
        .join(", ")
}
