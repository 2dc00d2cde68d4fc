//! The Kafka source against a real Kafka-API broker on 127.0.0.1:9092
//! (scripts/kafka.sh) and the PostgreSQL sink (scripts/postgres.sh): the
//! real binary in a consumer group, each test on its own topic and schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BROKERS: &str = "127.0.0.1:9092";

fn client_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", BROKERS);
    c
}

/// A topic of its own, with `partitions` partitions.
async fn fresh_topic(prefix: &str, partitions: i32) -> String {
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
async fn produce(topic: &str, ids: std::ops::Range<i64>) {
    let producer: FutureProducer = client_config()
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for i in ids {
        let key = i.to_string();
        let value = format!(r#"{{"id":{i},"v":{}}}"#, i * 10);
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
fn end_offsets(topic: &str, partitions: i32) -> HashMap<String, i64> {
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
fn group_offsets(topic: &str, partitions: i32) -> HashMap<String, i64> {
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
struct Conf {
    topic: String,
    /// Extra lines of the source table (`stop_at_end = true`, ...).
    source: String,
    /// Extra librdkafka properties.
    properties: String,
    /// The sink table's lines.
    sink: String,
    /// Extra lines of the connector table (`dead_letter = ...`).
    connector: String,
    max_records: usize,
    columns: String,
}

/// TOML for columns of the given names and types.
fn columns(list: &[(&str, &str)]) -> String {
    list.iter()
        .map(|(name, ty)| format!("[[connectors.k.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\n"))
        .collect()
}

impl Conf {
    /// `{"id", "v"}` events into the PostgreSQL table `schema.events`.
    fn new(topic: &str, schema: &str) -> Conf {
        Conf {
            topic: topic.to_string(),
            source: String::new(),
            properties: String::new(),
            sink: format!(
                "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"events\"\n",
                pg_url()
            ),
            connector: String::new(),
            max_records: 5000,
            columns: columns(&[("id", "bigint"), ("v", "bigint")]),
        }
    }

    fn source(mut self, line: &str) -> Conf {
        self.source += &format!("{line}\n");
        self
    }

    fn property(mut self, key: &str, value: &str) -> Conf {
        self.properties += &format!("\"{key}\" = \"{value}\"\n");
        self
    }

    fn sink(mut self, lines: &str) -> Conf {
        self.sink = format!("{lines}\n");
        self
    }

    fn sink_line(mut self, line: &str) -> Conf {
        self.sink += &format!("{line}\n");
        self
    }

    fn connector(mut self, line: &str) -> Conf {
        self.connector += &format!("{line}\n");
        self
    }

    fn max_records(mut self, n: usize) -> Conf {
        self.max_records = n;
        self
    }

    fn columns(mut self, toml: &str) -> Conf {
        self.columns = toml.to_string();
        self
    }

    fn more_columns(mut self, toml: &str) -> Conf {
        self.columns += toml;
        self
    }

    fn toml(&self) -> String {
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
# A killed runner's partitions move after this long (Kafka's default: 45s).
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
{properties}[connectors.k.sink]
{sink}[connectors.k.batch]
max_records = {max_records}
linger = "200ms"
{columns}"#
        )
    }
}

async fn count(schema: &str) -> (i64, i64) {
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

async fn positions(schema: &str) -> HashMap<String, i64> {
    pg().await
        .query(
            &format!("SELECT partition, next_offset FROM \"{schema}\".idem_offsets WHERE connector = 'k'"),
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
async fn run_until(cfg: &std::path::Path, schema: &str, want: i64) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_partitions_land_exactly_once_at_the_topics_end() {
    let topic = fresh_topic("idem_six", 6).await;
    let schema = fresh_schema("kafka_six");
    produce(&topic, 0..100_000).await;
    let w = Workdir::new();
    let cfg = w.write("k.toml", &Conf::new(&topic, &schema).toml());

    run_until(&cfg, &schema, 100_000).await;
    assert_eq!(count(&schema).await, (100_000, 100_000));
    let ends = end_offsets(&topic, 6);
    assert_eq!(ends.values().sum::<i64>(), 100_000);
    assert_eq!(
        positions(&schema).await,
        ends,
        "positions in the sink = the topic's end"
    );

    // The group's offsets follow the sink's positions, for lag tools.
    assert_eq!(
        group_offsets(&topic, 6),
        ends,
        "offsets committed to the group"
    );

    // More events, a restart: it resumes from the sink's positions, not
    // from the start (nothing twice) and not from the end (nothing lost).
    produce(&topic, 100_000..120_000).await;
    run_until(&cfg, &schema, 120_000).await;
    assert_eq!(count(&schema).await, (120_000, 120_000));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 6));

    // `idem verify` reads every partition back through a consumer of its
    // own and matches each row to its message; a planted copy is found.
    let verify = || idem().arg("verify").arg(&cfg).output().unwrap();
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("✓ k: 120000 messages (0 dead-lettered), 120000 rows"),
        "{stdout}"
    );
    pg().await
        .execute(
            &format!(
                "INSERT INTO \"{schema}\".events SELECT * FROM \"{schema}\".events WHERE id = 77"
            ),
            &[],
        )
        .await
        .unwrap();
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("1 findings") && stdout.contains("duplicated: "),
        "{stdout}"
    );
}

/// How each run of the crash test ended.
fn ended_by(status: std::process::ExitStatus) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(6) => "fail point (abort)",
        Some(9) => "SIGKILL",
        _ if status.success() => "clean exit",
        _ => "error exit",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_and_at_fail_points_while_producing_every_event_lands_once() {
    use rand::{Rng, SeedableRng};
    const ROUNDS: usize = 24;
    const PER_ROUND: i64 = 2_000;
    let seed: u64 = std::env::var("IDEM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rngs::StdRng::from_os_rng().random());
    eprintln!("kafka crash test seed: {seed} (IDEM_CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topic = fresh_topic("idem_crash", 6).await;
    let schema = fresh_schema("kafka_crash");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema).max_records(300).toml(),
    );
    let failpoints = ["after_write", "mid_write", "after_commit"];
    let mut ends: HashMap<&str, usize> = HashMap::new();
    let mut fired: HashMap<&str, usize> = HashMap::new();
    for round in 0..ROUNDS {
        let from = round as i64 * PER_ROUND;
        // The producer keeps writing while the runner runs and dies.
        let producing = tokio::spawn({
            let topic = topic.clone();
            async move { produce(&topic, from..from + PER_ROUND).await }
        });
        let mut cmd = idem();
        cmd.arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let failpoint = (round % 2 == 1).then(|| failpoints[(round / 2) % failpoints.len()]);
        if let Some(fp) = failpoint {
            cmd.env(
                "IDEM_FAILPOINTS",
                format!("{fp}={}", rng.random_range(1..=4)),
            );
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now()
            + match failpoint {
                Some(_) => Duration::from_secs(30),
                // The previous run's partitions move after the session
                // timeout (6 s): aim before, around and after it.
                None => Duration::from_millis(rng.random_range(300..10_000)),
            };
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap();
                break child.wait().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let how = ended_by(status);
        *ends.entry(how).or_default() += 1;
        if let (Some(fp), "fail point (abort)") = (failpoint, how) {
            *fired.entry(fp).or_default() += 1;
        }
        producing.await.unwrap();
    }
    eprintln!("kafka crash: {ROUNDS} runs ended by {ends:?}; fail points fired {fired:?}");
    let died = ends.get("SIGKILL").unwrap_or(&0) + ends.get("fail point (abort)").unwrap_or(&0);
    assert!(died >= 20, "only {died} of {ROUNDS} runs died mid-way");
    for fp in failpoints {
        assert!(
            fired.get(fp).copied().unwrap_or(0) > 0,
            "fail point {fp} never fired"
        );
    }

    let total = ROUNDS as i64 * PER_ROUND;
    run_until(&cfg, &schema, total).await;
    assert_eq!(
        count(&schema).await,
        (total, total),
        "lost or duplicated events"
    );
    let sum: i64 = pg()
        .await
        .query_one(
            &format!("SELECT sum(v)::bigint FROM \"{schema}\".events"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (0..total).map(|i| i * 10).sum::<i64>());
    assert_eq!(positions(&schema).await, end_offsets(&topic, 6));
}

/// `idem run` in the background, its log in `log`.
fn spawn_runner(
    cfg: &std::path::Path,
    log: &std::path::Path,
    failpoints: &str,
) -> std::process::Child {
    let mut cmd = idem();
    cmd.arg("run")
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if !failpoints.is_empty() {
        cmd.env("IDEM_FAILPOINTS", failpoints);
    }
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_share_a_group_and_a_frozen_one_is_fenced() {
    group_scenario(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_cooperative_sticky_assignment() {
    group_scenario(&[("partition.assignment.strategy", "cooperative-sticky")]).await;
}

/// Three runners in one group: one killed, one added, one frozen mid-batch
/// and fenced; then every event exactly once. `properties` are extra
/// consumer settings.
async fn group_scenario(properties: &[(&str, &str)]) {
    let topic = fresh_topic("idem_group", 6).await;
    let schema = fresh_schema("kafka_group");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &properties
            .iter()
            .fold(Conf::new(&topic, &schema), |c, (k, v)| c.property(k, v))
            .max_records(500)
            .toml(),
    );
    const TOTAL: i64 = 60_000;
    produce(&topic, 0..20_000).await;
    // The rest arrives while runners come, go and freeze.
    let producing = tokio::spawn({
        let topic = topic.clone();
        async move {
            for chunk in 0..20 {
                let from = 20_000 + chunk * 2_000;
                produce(&topic, from..from + 2_000).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let a = spawn_runner(&cfg, &w.path("a.log"), "");
    // B freezes just before its second commit, holding a batch.
    let b = spawn_runner(&cfg, &w.path("b.log"), "before_commit=2:stop");
    let c = spawn_runner(&cfg, &w.path("c.log"), "");
    let started = Instant::now();
    while !is_stopped(b.id()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "runner B never reached its second commit:\n{}",
            std::fs::read_to_string(w.path("b.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kill one, add one: A's partitions move to the others.
    let mut a = a;
    a.kill().unwrap();
    a.wait().unwrap();
    let d = spawn_runner(&cfg, &w.path("d.log"), "");
    // While B is frozen, a newer runner opens every partition, as it does
    // once the group moves B's partitions away (the broker evicts a silent
    // member after its session timeout; the test opens them itself at
    // once, with the same statement a runner's open runs). The statement may
    // wait for a row B locked before it froze: it runs beside the wake-up,
    // not before it, or each would wait for the other.
    let fence = tokio::spawn({
        let schema = schema.clone();
        async move {
            pg().await
                .batch_execute(&format!(
                    "UPDATE \"{schema}\".idem_offsets SET epoch = epoch + 1 WHERE connector = 'k'"
                ))
                .await
                .unwrap();
        }
    });
    // Past B's session timeout: on waking it rejoins the group.
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(b.id(), "CONT");
    fence.await.unwrap();

    producing.await.unwrap();
    let started = Instant::now();
    while count(&schema).await.0 < TOTAL && started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, mut child) in [("B", b), ("C", c), ("D", d)] {
        signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        assert!(status.success(), "runner {name} after SIGTERM: {status:?}");
    }
    let b_log = std::fs::read_to_string(w.path("b.log")).unwrap();
    assert!(
        b_log.contains("fenced by a newer runner"),
        "the frozen runner's stale commit was not refused:\n{b_log}"
    );
    assert_eq!(
        count(&schema).await,
        (TOTAL, TOTAL),
        "lost or duplicated events"
    );
    assert_eq!(positions(&schema).await, end_offsets(&topic, 6));
}

/// A backfill in the group of runners that were killed a moment ago
/// (members that hold partitions until their session times out) reads
/// every partition to its end, not only the ones the group leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_reads_every_partition_while_the_group_holds_some() {
    let topic = fresh_topic("idem_backfill", 6).await;
    let schema = fresh_schema("kafka_backfill");
    produce(&topic, 0..30_000).await;
    let w = Workdir::new();
    let live = w.write(
        "live.toml",
        &Conf::new(&topic, &schema).max_records(500).toml(),
    );
    // Two group members, frozen before their second commit, then killed.
    let members: Vec<Reaped> = ["a", "b"]
        .iter()
        .map(|n| {
            Reaped(spawn_runner(
                &live,
                &w.path(&format!("{n}.log")),
                "before_commit=2:stop",
            ))
        })
        .collect();
    let started = Instant::now();
    // At least one holds a batch, frozen; the group may have given the
    // other nothing yet.
    while !members.iter().any(|m| is_stopped(m.0.id())) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group members never reached their second commit:\n{}",
            std::fs::read_to_string(w.path("a.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(members);
    let backfill = w.write(
        "backfill.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .max_records(500)
            .toml(),
    );
    let out = run_ok(idem().env("RUST_LOG", "info").arg("run").arg(&backfill));
    // It took every partition itself: the group (which, on a broker that
    // keeps the dead members until their session times out, would hand it
    // only the rest) is not joined.
    let log = text(&out.stderr);
    assert!(
        log.contains("outside the consumer group") && log.contains("partitions=6"),
        "{log}"
    );
    assert_eq!(
        count(&schema).await,
        (30_000, 30_000),
        "the backfill finished early: {}",
        text(&out.stdout)
    );
    assert_eq!(positions(&schema).await, end_offsets(&topic, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_duckdb_a_backfill_stops_at_the_end_exactly_once() {
    let topic = fresh_topic("idem_duck", 6).await;
    produce(&topic, 0..100_000).await;
    let w = Workdir::new();
    let db = w.path("k.duckdb");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, "unused")
            .source("stop_at_end = true")
            .sink(&format!(
                "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"",
                db.display()
            ))
            .toml(),
    );
    // It finishes by itself at the end of every partition.
    run_ok(idem().arg("run").arg(&cfg));
    let conn = duck(&db);
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM events"), 100_000);
    assert_eq!(
        query_i64(&conn, "SELECT count(DISTINCT id) FROM events"),
        100_000
    );
    let mut stmt = conn
        .prepare("SELECT partition, next_offset FROM idem_offsets WHERE connector = 'k'")
        .unwrap();
    let stored: HashMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    drop(stmt);
    drop(conn);
    assert_eq!(
        stored,
        end_offsets(&topic, 6),
        "positions in the sink = the topic's end"
    );

    // Run again: nothing new, nothing written twice.
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(
        query_i64(&duck(&db), "SELECT count(*) FROM events"),
        100_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_positions() {
    let topic = fresh_topic("idem_poison", 2).await;
    let producer: FutureProducer = client_config().create().unwrap();
    let big = format!(r#"{{"id":9,"v":90,"pad":"{}"}}"#, "x".repeat(2000));
    let sends: [(i32, Option<&[u8]>); 7] = [
        (0, Some(br#"{"id":1,"v":10}"#)),
        (0, Some(b"not json")),
        (0, Some(br#"{"id":2,"v":20}"#)),
        (1, Some(&[0xff, 0xfe, 0x00])),
        (1, Some(big.as_bytes())),
        (1, None),
        (1, Some(br#"{"id":3,"v":30}"#)),
    ];
    for (partition, value) in sends {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).partition(partition);
        if let Some(v) = value {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_poison");
    let w = Workdir::new();
    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .source("max_message_bytes = 1000")
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));

    let ids: Vec<i64> = pg()
        .await
        .query(
            &format!("SELECT id FROM \"{schema}\".events ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    let letters: Vec<(String, u64, String)> = std::fs::read_to_string(&dead)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["partition"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let at = |p: i32, o: u64| {
        letters
            .iter()
            .find(|(lp, lo, _)| *lp == format!("{topic}/{p}") && *lo == o)
            .map(|l| l.2.clone())
            .unwrap_or_else(|| panic!("no dead letter for {p}/{o} in {letters:?}"))
    };
    assert!(at(0, 1).contains("not valid JSON"));
    assert!(at(1, 0).contains("not valid JSON"));
    assert!(at(1, 1).contains("larger than max_message_bytes"));
    assert!(at(1, 2).contains("tombstone"));
    assert_eq!(letters.len(), 4, "{letters:?}");
    // The partitions kept moving past their poison.
    assert_eq!(positions(&schema).await, end_offsets(&topic, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_to_a_topic_carry_position_reason_and_class() {
    use rdkafka::message::{Headers, Message};
    let topic = fresh_topic("idem_dlq_src", 1).await;
    let dlq = fresh_topic("idem_dlq", 1).await;
    let producer: FutureProducer = client_config().create().unwrap();
    for value in [
        &br#"{"id":1,"v":10}"#[..],
        b"not json",
        br#"{"id":2,"v":"twenty"}"#,
        br#"{"id":3,"v":30}"#,
    ] {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(&topic).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_dlq");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &(Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .toml()
            + &format!(
                "[connectors.k.dead_letters]\ndestination = \"topic\"\ntopic = \"{dlq}\"\n"
            )),
    );
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(count(&schema).await, (2, 2));

    let consumer: BaseConsumer = client_config()
        .set("group.id", format!("{dlq}_reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        got.push((
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            m.payload().unwrap_or_default().to_vec(),
            header("idem.offset"),
            header("idem.error_class"),
            header("idem.reason"),
            header("idem.connector"),
        ));
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, format!("{topic}/0@1"));
    assert_eq!(got[0].1, b"not json");
    assert_eq!((got[0].2.as_str(), got[0].3.as_str()), ("1", "mapping"));
    assert!(got[0].4.contains("not valid JSON"), "{got:?}");
    assert_eq!(got[0].5, "k");
    assert_eq!(got[1].0, format!("{topic}/0@2"));
    assert!(got[1].4.contains("v"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_writes_repeated_ids_that_upsert_takes_once() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let topic = format!("idem_produce_{}_{nanos}", std::process::id());
    let out = run_ok(idem().args([
        "produce",
        &topic,
        "--brokers",
        BROKERS,
        "--partitions",
        "3",
        "-n",
        "5000",
        "--duplicates",
        "0.2",
        "--malformed",
        "2",
    ]));
    let said = text(&out.stderr);
    let distinct: i64 = said
        .split(" messages to ")
        .nth(1)
        .and_then(|rest| rest.split('(').nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no distinct count in: {said}"));
    assert!(said.contains("wrote 5002 messages"), "{said}");
    assert!(
        distinct < 4500,
        "the load tool wrote too few repeats: {said}"
    );
    let ends = end_offsets(&topic, 3);
    assert_eq!(ends.values().sum::<i64>(), 5002);

    let schema = fresh_schema("kafka_produce");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .connector(&format!(
                "dead_letter = \"{}\"",
                w.path("dead.jsonl").display()
            ))
            .sink_line("mode = \"upsert\"")
            .sink_line("key = [\"event_id\"]")
            .columns(&columns(&[
                ("event_id", "text"),
                ("user_id", "bigint"),
                ("kind", "text"),
                ("amount", "double"),
                ("currency", "text"),
                ("ok", "boolean"),
                ("at", "timestamp"),
                ("note", "text"),
            ]))
            .toml(),
    );
    let out = run_ok(idem().arg("run").arg(&cfg));
    let rows: i64 = pg()
        .await
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".events"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows,
        distinct,
        "one row per event id:\n{}",
        text(&out.stdout)
    );
    let dead = std::fs::read_to_string(w.path("dead.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 2, "{dead}");
    assert_eq!(positions(&schema).await, ends);
}

#[tokio::test]
async fn a_missing_broker_is_named_at_start() {
    let schema = fresh_schema("kafka_down");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new("nothing", &schema)
            .toml()
            .replace(BROKERS, "127.0.0.1:1"),
    );
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no broker answered at 127.0.0.1:1") && err.contains("scripts/kafka.sh"),
        "{err}"
    );
    // One clear error, not librdkafka's retry chatter.
    assert!(err.lines().count() < 10, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_timestamp_and_headers_map_to_columns() {
    use rdkafka::message::{Header, OwnedHeaders};
    let topic = fresh_topic("idem_meta", 1).await;
    let producer: FutureProducer = client_config().create().unwrap();
    for i in 0..3i64 {
        let value = format!(r#"{{"id":{i},"v":{}}}"#, i * 10);
        let key = format!("user-{i}");
        let trace = format!("trace-{i}");
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&value)
            .timestamp(1_767_225_600_000 + i * 1_500)
            .headers(OwnedHeaders::new().insert(Header {
                key: "trace",
                value: Some(&trace),
            }));
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_meta");
    let w = Workdir::new();
    let cfg = Conf::new(&topic, &schema)
        .source("stop_at_end = true")
        .more_columns(
            r#"[[connectors.k.columns]]
name = "k"
pointer = "@key"
type = "text"
[[connectors.k.columns]]
name = "at"
pointer = "@timestamp"
type = "timestamp"
[[connectors.k.columns]]
name = "trace"
pointer = "@header/trace"
type = "text"
required = true
"#,
        )
        .toml();
    let cfg = w.write("k.toml", &cfg);
    run_ok(idem().arg("run").arg(&cfg));
    let rows: Vec<(i64, String, String, String)> = pg()
        .await
        .query(
            &format!(
                "SELECT id, k, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), trace FROM \"{schema}\".events ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let expected: Vec<(i64, String, String, String)> = (0..3)
        .map(|i| {
            (
                i,
                format!("user-{i}"),
                format!(
                    "2026-01-01 00:00:0{}.{}00",
                    (i * 3) / 2,
                    if i % 2 == 1 { 5 } else { 0 }
                ),
                format!("trace-{i}"),
            )
        })
        .collect();
    assert_eq!(rows, expected);
}

/// A message id from a header: two copies of one id at different offsets
/// (a producer retry) take effect once in dedup mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_from_a_header_takes_effect_once() {
    use rdkafka::message::{Header, OwnedHeaders};
    let topic = fresh_topic("idem_msgid", 1).await;
    let producer: FutureProducer = client_config().create().unwrap();
    for (id, v) in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)] {
        let value = format!(r#"{{"v":{v}}}"#);
        let record =
            FutureRecord::<(), _>::to(&topic)
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "message-id",
                    value: Some(id),
                }));
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_msgid");
    let w = Workdir::new();
    let cfg = Conf::new(&topic, &schema)
        .source("stop_at_end = true")
        .sink_line("mode = \"dedup\"")
        .sink_line("key = [\"mid\"]")
        .columns(
            r#"[[connectors.k.columns]]
name = "mid"
pointer = "@header/message-id"
type = "text"
[[connectors.k.columns]]
name = "v"
type = "bigint"
"#,
        )
        .toml();
    let cfg = w.write("k.toml", &cfg);
    run_ok(idem().arg("run").arg(&cfg));
    let rows: Vec<(String, i64)> = pg()
        .await
        .query(
            &format!("SELECT mid, v FROM \"{schema}\".events ORDER BY mid"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The first copy of each id wins; the later ones change nothing.
    assert_eq!(rows, pairs(&[("a", 1), ("b", 2), ("c", 4)]));
}

/// Wait until `log` says `n` partitions were opened.
async fn wait_opened(log: &std::path::Path, n: usize) {
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

/// `start = "latest"`: a partition the sink has never seen starts at its
/// end; once a position is committed, a restart resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_latest_skips_the_past_and_resumes_from_the_sink() {
    let topic = fresh_topic("idem_latest", 2).await;
    produce(&topic, 0..1_000).await;
    let schema = fresh_schema("kafka_latest");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("start = \"latest\"")
            .toml(),
    );
    let log = w.path("run.log");
    let mut child = idem()
        .env("RUST_LOG", "info")
        .arg("run")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_opened(&log, 2).await;
    produce(&topic, 1_000..1_500).await;
    let started = Instant::now();
    while count(&schema).await.0 < 500 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_eq!(
        count(&schema).await,
        (500, 500),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let min: i64 = pg()
        .await
        .query_one(&format!("SELECT min(id) FROM \"{schema}\".events"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(min, 1_000, "events from before the start were read");

    // Written while it was down: read on restart, from the sink's position.
    produce(&topic, 1_500..1_600).await;
    run_until(&cfg, &schema, 600).await;
    assert_eq!(count(&schema).await, (600, 600));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 2));
}

/// A sink position the topic no longer holds (the topic was made anew)
/// stops the runner with the partition, the position and the range; with
/// `out_of_range = "earliest"` it goes on from the partition's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_outside_the_topic_is_an_error_unless_told_otherwise() {
    let topic = fresh_topic("idem_range", 1).await;
    produce(&topic, 0..100).await;
    let schema = fresh_schema("kafka_range");
    let w = Workdir::new();
    let conf = Conf::new(&topic, &schema)
        .source("stop_at_end = true")
        .sink_line("mode = \"upsert\"")
        .sink_line("key = [\"id\"]");
    let cfg = w.write("k.toml", &conf.toml());
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(count(&schema).await, (100, 100));
    // As if the topic had been deleted and made anew with fewer messages.
    pg().await
        .batch_execute(&format!(
            "UPDATE \"{schema}\".idem_offsets SET next_offset = 500 WHERE connector = 'k'"
        ))
        .await
        .unwrap();
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{topic}/0"))
            && err.contains("position 500 is outside the partition's range 0..100")
            && err.contains("out_of_range"),
        "{err}"
    );

    produce(&topic, 100..110).await;
    let cfg = w.write(
        "k2.toml",
        &conf.source("out_of_range = \"earliest\"").toml(),
    );
    let out = run_ok(idem().arg("run").arg(&cfg));
    assert!(
        text(&out.stderr).contains("going on from the oldest offset"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count(&schema).await, (110, 110));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 1));
}

/// `idem check` (and `idem run`) warn when a topic keeps messages longer
/// than the dedup store remembers ids: a replay of older messages would
/// repeat their effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_a_topic_outlives_the_dedup_retention() {
    let w = Workdir::new();
    for (ms, says) in [
        ("2592000000", "keeps messages for 30days"),
        ("-1", "keeps messages forever"),
        ("3600000", ""),
    ] {
        let topic = format!("retention_{}_{}", std::process::id(), ms.replace('-', "m"));
        let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
        let created = admin
            .create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("retention.ms", ms)],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for r in created {
            r.unwrap();
        }
        let dedup = format!(
            "[connectors.k.dedup]\nid = \"/id\"\nretention = \"1d\"\npath = \"{}\"",
            w.path("ids.redb").display()
        );
        let sink = format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"",
            w.path("k.duckdb").display()
        );
        let cfg = w.write(
            "k.toml",
            &Conf::new(&topic, "unused")
                .connector(&dedup)
                .sink(&sink)
                .toml(),
        );
        let out = run_ok(idem().arg("check").arg(&cfg));
        let s = text(&out.stdout);
        assert!(s.contains("dedup: ids from /id"), "{s}");
        if says.is_empty() {
            assert!(!s.contains("longer than dedup.retention"), "{s}");
        } else {
            assert!(s.contains(&format!("topic `{topic}` {says}")), "{s}");
            assert!(s.contains("longer than dedup.retention (1day)"), "{s}");
        }
    }
}

/// Transactions of a transactional producer on `topic` (3 partitions):
/// each writes `per_tx` events spread over the partitions and is
/// committed, or aborted when `aborts(tx)`. Returns the ids committed.
fn produce_transactions(
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

/// A transactional producer commits some transactions and aborts others,
/// interleaved over three partitions, while runners are killed at random:
/// the table holds exactly the committed events, once, and the positions
/// step over the transactions' markers to the partitions' ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_committed_land_once_and_aborted_never() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::rngs::StdRng::from_os_rng().random();
    eprintln!("transactions test seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topic = fresh_topic("idem_tx", 3).await;
    let schema = fresh_schema("kafka_tx");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema).max_records(200).toml(),
    );
    const ROUNDS: i64 = 6;
    const TXS: i64 = 20;
    const PER_TX: i64 = 50;
    let mut committed = Vec::new();
    let mut killed = 0;
    for round in 0..ROUNDS {
        let producing = tokio::task::spawn_blocking({
            let topic = topic.clone();
            // One transaction in three is aborted.
            move || {
                produce_transactions(&topic, round * TXS..(round + 1) * TXS, PER_TX, |tx| {
                    tx % 3 == 1
                })
            }
        });
        let mut child = idem()
            .arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..4_000))).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        committed.extend(producing.await.unwrap());
    }
    assert!(killed >= ROUNDS - 1, "only {killed} runs were killed");
    // One last transaction over every partition, read by the final run: a
    // reader moves over markers once it has read a message of its own.
    let topic2 = topic.clone();
    committed.extend(
        tokio::task::spawn_blocking(move || {
            produce_transactions(&topic2, ROUNDS * TXS..ROUNDS * TXS + 1, PER_TX, |_| false)
        })
        .await
        .unwrap(),
    );
    let want = committed.len() as i64;
    // Transactions 1, 4, 7, ... of the first 120 were aborted: 40 of them.
    assert_eq!(want, (ROUNDS * TXS + 1 - 40) * PER_TX);
    run_until(&cfg, &schema, want).await;
    assert_eq!(
        count(&schema).await,
        (want, want),
        "lost, aborted or duplicated events"
    );
    let sum: i64 = pg()
        .await
        .query_one(
            &format!("SELECT sum(id)::bigint FROM \"{schema}\".events"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        sum,
        committed.iter().sum::<i64>(),
        "not the committed events"
    );
    // The last record of each partition is a commit marker: the position
    // steps over it, so the lag reads 0.
    assert_eq!(positions(&schema).await, end_offsets(&topic, 3));
}
