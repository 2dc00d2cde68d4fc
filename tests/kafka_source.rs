//! The Kafka source against a real Kafka-API broker on 127.0.0.1:9092
//! (scripts/kafka.sh) and the PostgreSQL sink (scripts/postgres.sh): the
//! real binary in a consumer group, each test on its own topic and schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
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

fn config(topic: &str, schema: &str) -> String {
    format!(
        r#"
[runner]
progress_interval = "1s"
shutdown_grace = "20s"
[connectors.k]
[connectors.k.source]
type = "kafka"
brokers = "{BROKERS}"
topics = ["{topic}"]
group_id = "{topic}_group"
[connectors.k.sink]
type = "postgres"
url = "{url}"
schema = "{schema}"
table = "events"
[connectors.k.batch]
max_records = 5000
linger = "200ms"
[[connectors.k.columns]]
name = "id"
type = "bigint"
[[connectors.k.columns]]
name = "v"
type = "bigint"
"#,
        url = pg_url()
    )
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

/// The shell's builtin `kill`: no unsafe code, no dependency on procps.
fn signal(pid: u32, name: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{name} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_partitions_land_exactly_once_at_the_topics_end() {
    let topic = fresh_topic("idem_six", 6).await;
    let schema = fresh_schema("kafka_six");
    produce(&topic, 0..100_000).await;
    let w = Workdir::new();
    let cfg = w.write("k.toml", &config(&topic, &schema));

    run_until(&cfg, &schema, 100_000).await;
    assert_eq!(count(&schema).await, (100_000, 100_000));
    let ends = end_offsets(&topic, 6);
    assert_eq!(ends.values().sum::<i64>(), 100_000);
    assert_eq!(
        positions(&schema).await,
        ends,
        "positions in the sink = the topic's end"
    );

    // More events, a restart: it resumes from the sink's positions, not
    // from the start (nothing twice) and not from the end (nothing lost).
    produce(&topic, 100_000..120_000).await;
    run_until(&cfg, &schema, 120_000).await;
    assert_eq!(count(&schema).await, (120_000, 120_000));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 6));
}
