//! Change data capture end to end: PostgreSQL -> Debezium's PostgreSQL
//! connector on Kafka Connect (`scripts/connect.sh`) -> Apache Kafka
//! (`scripts/kafka.sh`) -> `idem run` with `envelope = "debezium"` ->
//! PostgreSQL. The target must equal the source table row for row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::*;
use rdkafka::consumer::Consumer;
use std::time::{Duration, Instant};

const CONNECT: &str = "http://127.0.0.1:8083";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_replicate_a_table_exactly() {
    replicate(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_the_json_converters_schemas() {
    replicate(true).await;
}

/// A snapshot, then inserts, updates, deletes and primary-key updates,
/// captured by Debezium while Idem runs.
async fn replicate(schemas: bool) {
    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{src}\";
         CREATE TABLE \"{src}\".customers (id bigint PRIMARY KEY, name text, n bigint);
         INSERT INTO \"{src}\".customers SELECT i, 'name ' || i, i * 10 FROM generate_series(1, 200) i;"
    ))
    .await
    .unwrap();
    let capture = Capture::start(&src, schemas).await;

    let w = Workdir::new();
    let cfg = w.write(
        "cdc.toml",
        &format!(
            r#"
[connectors.cdc]
envelope = "debezium"
dead_letter = "{dead}"
[connectors.cdc.source]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["{topic}"]
group_id = "{src}_idem"
[connectors.cdc.sink]
type = "postgres"
url = "{url}"
schema = "{dst}"
table = "customers"
mode = "upsert"
key = ["id"]
delete_on_tombstone = true
[connectors.cdc.batch]
max_records = 100
linger = "100ms"
[[connectors.cdc.columns]]
name = "id"
type = "bigint"
[[connectors.cdc.columns]]
name = "name"
type = "text"
[[connectors.cdc.columns]]
name = "n"
type = "bigint"
"#,
            topic = capture.topic,
            url = pg_url(),
            dead = w.path("cdc.deadletter.jsonl").display(),
        ),
    );
    let mut idem = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(w.path("idem.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    // Changes while it runs: updates, deletes, inserts, key updates.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..600 {
        let id = (next() % 400 + 1) as i64;
        let sql = match next() % 4 {
            0 => format!("UPDATE \"{src}\".customers SET name = 'renamed {i}', n = n + 1 WHERE id = {id}"),
            1 => format!("DELETE FROM \"{src}\".customers WHERE id = {id}"),
            2 => format!(
                "INSERT INTO \"{src}\".customers VALUES ({id}, 'new {i}', {i}) ON CONFLICT (id) DO UPDATE SET n = excluded.n"
            ),
            // A primary-key update: Debezium sends a delete of the old key
            // and a create of the new one.
            _ => format!(
                "UPDATE \"{src}\".customers SET id = id + 1000 WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM \"{src}\".customers WHERE id = {id} + 1000)"
            ),
        };
        db.batch_execute(&sql).await.unwrap();
    }

    let started = Instant::now();
    let mut diff = differences(&src, &dst).await;
    while diff != 0 && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        diff = differences(&src, &dst).await;
    }
    signal(idem.0.id(), "TERM");
    let status = idem.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("idem.log")).unwrap_or_default();
    assert!(status.success(), "idem run: {status:?}\n{log}");
    let rows: i64 = db
        .query_one(&format!("SELECT count(*) FROM \"{src}\".customers"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 100, "the workload left only {rows} rows: too weak");
    let dead = std::fs::read_to_string(w.path("cdc.deadletter.jsonl")).unwrap_or_default();
    assert_eq!(
        diff, 0,
        "{diff} rows differ between the source and the target\n{log}\ndead letters:\n{dead}"
    );
    assert!(dead.is_empty(), "dead letters:\n{dead}");
    capture.stop().await;
}

/// Rows in one table and not the other, both ways.
async fn differences(src: &str, dst: &str) -> i64 {
    let q = format!(
        "SELECT (SELECT count(*) FROM (SELECT id, name, n FROM \"{src}\".customers
                 EXCEPT SELECT id, name, n FROM \"{dst}\".customers) a)
              + (SELECT count(*) FROM (SELECT id, name, n FROM \"{dst}\".customers
                 EXCEPT SELECT id, name, n FROM \"{src}\".customers) b)"
    );
    // The target table exists once Idem's first batch landed.
    pg().await
        .query_one(&q, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// A Debezium connector capturing `schema.customers` into its topic.
struct Capture {
    name: String,
    topic: String,
}

impl Capture {
    async fn start(schema: &str, schemas: bool) -> Capture {
        let http = reqwest::Client::new();
        let listed = http
            .get(format!("{CONNECT}/connectors"))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("Kafka Connect at {CONNECT}: {e} (start it: bash scripts/connect.sh)")
            })
            .text()
            .await
            .unwrap();
        // What an earlier test process left (it failed before its clean-up):
        // its connectors and slots would go on capturing.
        let mine = format!("cdc_src_{}_", std::process::id());
        let names: Vec<String> = serde_json::from_str(&listed).unwrap_or_default();
        for name in names {
            if name.starts_with("cdc_src_") && !name.starts_with(&mine) {
                Capture {
                    topic: String::new(),
                    name,
                }
                .stop()
                .await;
            }
        }
        let config = serde_json::json!({
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "plugin.name": "pgoutput",
            "database.hostname": "127.0.0.1",
            "database.port": "5432",
            "database.user": "idem",
            "database.password": "idem",
            "database.dbname": "idem_test",
            "topic.prefix": schema,
            "table.include.list": format!("{schema}.customers"),
            "slot.name": schema,
            "publication.name": schema,
            "publication.autocreate.mode": "filtered",
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": schemas.to_string(),
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": schemas.to_string(),
        });
        let r = http
            .put(format!("{CONNECT}/connectors/{schema}/config"))
            .header("content-type", "application/json")
            .body(config.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
        // Running once its task is.
        let started = Instant::now();
        loop {
            let body = http
                .get(format!("{CONNECT}/connectors/{schema}/status"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            let s: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if s["tasks"][0]["state"] == "RUNNING" {
                break;
            }
            assert!(
                s["tasks"][0]["state"] != "FAILED" && started.elapsed() < Duration::from_secs(60),
                "the Debezium connector did not start: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The snapshot's first event creates the topic.
        let topic = format!("{schema}.{schema}.customers");
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .create()
            .unwrap();
        let started = Instant::now();
        loop {
            let known = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .is_ok_and(|m| {
                    m.topics()
                        .iter()
                        .any(|t| t.error().is_none() && !t.partitions().is_empty())
                });
            if known {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "Debezium never created {topic}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Capture {
            name: schema.to_string(),
            topic,
        }
    }

    /// Remove the connector, then its replication slot (which would keep
    /// the server's write-ahead log forever) and publication.
    async fn stop(self) {
        let http = reqwest::Client::new();
        let _ = http
            .delete(format!("{CONNECT}/connectors/{}", self.name))
            .send()
            .await;
        let db = pg().await;
        let started = Instant::now();
        loop {
            let dropped = db
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE slot_name = $1 AND NOT active",
                    &[&self.name],
                )
                .await;
            let left: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.name],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replication slot {} still there: {dropped:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        db.batch_execute(&format!("DROP PUBLICATION IF EXISTS \"{}\"", self.name))
            .await
            .unwrap();
    }
}
