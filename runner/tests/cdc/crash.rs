//! Replicas through crashes: two source tables captured by Debezium while a
//! workload runs, applied by Idem into PostgreSQL and DuckDB while it is
//! killed at random and at every fail point; halfway, a column is added to
//! both source tables; then a slice of older events delivered again (a
//! Debezium restart replays from its last flushed position). Every replica,
//! which learns its columns from the events' schemas, must equal its source
//! table row for row, the new column included, and the change log on S3
//! hold every event of the topic once.

use crate::support::*;
use idem_testkit::*;
use rand::Rng as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TABLES: [&str; 2] = ["customers", "orders"];
/// The key of the row written last on each source table: once its event
/// is in the topic, every change before it is too.
const END_MARK: i64 = 999_999;
/// The columns compared: the workload's, and the one added halfway.
const COMPARED: &str = "id, name, n, note";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_exact_through_kills_fail_points_and_redelivery() {
    const KILLS: usize = 20;
    let failpoints = ["before_commit", "mid_write", "after_write", "after_commit"];
    let mut rng = crash_rng("cdc");

    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    let mut ddl = format!("CREATE SCHEMA \"{src}\";");
    for t in TABLES {
        ddl += &seeded(&src, t, 300);
    }
    db.batch_execute(&ddl).await.unwrap();
    let capture = Capture::start(&src, &TABLES, true).await;

    let w = Workdir::new();
    let duck_path = |t: &str| w.path(&format!("{t}.duckdb"));
    let bucket = idem_testkit::s3::fresh_bucket("cdc").await;
    let mut toml = String::new();
    for (t, topic) in TABLES.iter().zip(&capture.topics) {
        let duck_sink = format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"{t}\"\n",
            duck_path(t).display()
        );
        // Every connector lists its key only: the rest comes from the schema.
        let replica = Shape::Replica {
            versioned: true,
            learns: true,
        };
        for (name, sink, shape) in [
            (format!("pg_{t}"), postgres_sink(&dst, t), replica),
            (format!("duck_{t}"), duck_sink, replica),
            (
                format!("log_{t}"),
                // Objects roll every second: staged batches meet the kills.
                idem_testkit::s3::sink_lines(
                    &bucket,
                    "format = \"parquet\"\nroll_interval = \"1s\"\n",
                ),
                Shape::ChangeLog,
            ),
        ] {
            let dead = w.path(&format!("{name}.deadletter.jsonl"));
            toml += &connector(
                &name,
                topic,
                &format!("{src}_{name}"),
                &sink,
                shape,
                &dead,
                &[("id", "bigint")],
            );
            // Each restart finds its partitions after the session timeout.
            toml += &format!(
                "[connectors.{name}.source.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n"
            );
        }
    }
    let cfg = w.write("cdc.toml", &toml);

    // The workload runs through every crash: a transaction of one to three
    // random changes over both tables every few milliseconds.
    let stop = Arc::new(AtomicBool::new(false));
    let add_column = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicUsize::new(0));
    let workload = tokio::spawn({
        let (src, stop, changes) = (src.clone(), stop.clone(), changes.clone());
        let add_column = add_column.clone();
        let mut gen = Rng(rng.random::<u64>() | 1);
        async move {
            let db = pg().await;
            let mut i = 0;
            let mut noted = false;
            while !stop.load(Ordering::Relaxed) {
                if !noted && add_column.load(Ordering::Relaxed) {
                    // A nullable column, as a migration adds one; the
                    // changes after it set it.
                    for t in TABLES {
                        db.batch_execute(&format!(
                            "ALTER TABLE \"{src}\".{t} ADD COLUMN note text"
                        ))
                        .await
                        .unwrap();
                    }
                    noted = true;
                }
                let mut txn = String::from("BEGIN;");
                for _ in 0..=gen.next() % 3 {
                    let t = TABLES[(gen.next() % 2) as usize];
                    txn += &change(&src, t, &mut gen, i, noted);
                    txn += ";";
                    i += 1;
                }
                db.batch_execute(&(txn + "COMMIT;")).await.unwrap();
                changes.store(i, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for t in TABLES {
                db.batch_execute(&format!(
                    "INSERT INTO \"{src}\".{t} VALUES ({END_MARK}, 'end', 0, 'end')"
                ))
                .await
                .unwrap();
            }
        }
    });

    // Random kills, and a run per fail point among them. Partitions move
    // after the session timeout (6 s): aim before, around and after it.
    let mut rounds = Rounds::default();
    for round in 0..KILLS + failpoints.len() {
        let failpoint = (round % 6 == 5).then(|| failpoints[round / 6]);
        if round == KILLS / 2 {
            add_column.store(true, Ordering::Relaxed);
        }
        rounds.run(&cfg, failpoint, &mut rng, 300..9_000).await;
    }
    stop.store(true, Ordering::Relaxed);
    workload.await.unwrap();
    eprintln!(
        "cdc crash: {} source changes",
        changes.load(Ordering::Relaxed)
    );
    rounds.check("cdc", KILLS, &failpoints);

    // Older changes delivered again, after everything: a slice from the
    // middle of each topic, as a Debezium restart replays its last changes.
    let mut redelivered = 0;
    let mut delivered = Vec::new();
    for topic in &capture.topics {
        let mut events = read_until_end_mark(topic).await;
        let slice = events[events.len() / 3..events.len() / 2].to_vec();
        redelivered += slice.len();
        produce(topic, &slice).await;
        events.extend(slice);
        delivered.push(events);
    }

    // The last run reads to the end and stops by itself.
    let last = w.write(
        "last.toml",
        &toml.replace("group_id = ", "stop_at_end = true\ngroup_id = "),
    );
    let out = run_ok(idem().arg("run").arg(&last));
    let log = text(&out.stderr);

    for t in TABLES {
        let diff = differences(&src, &dst, t, COMPARED).await;
        assert_eq!(diff, 0, "{t}: {diff} rows differ in PostgreSQL\n{log}");
        let want = source_rows(&src, t).await;
        assert!(
            want.len() > 200,
            "{t}: the workload left only {} rows",
            want.len()
        );
        let noted = want.iter().filter(|r| r.3.is_some()).count();
        assert!(noted > 20, "{t}: only {noted} rows have a note");
        let conn = duck(&duck_path(t));
        let mut stmt = conn
            .prepare(&format!("SELECT {COMPARED} FROM {t} ORDER BY id"))
            .unwrap();
        let got: Vec<Row> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            got == want,
            "{t}: the DuckDB replica differs from the source\n{log}"
        );
    }
    // The change logs: every event of the topic (the copies too) once, as
    // (id, op, LSN, note); tombstones leave no row.
    for (t, events) in TABLES.iter().zip(&delivered) {
        let mut want: Vec<LogRow> = events
            .iter()
            .filter_map(|(_, v)| v.as_deref())
            .map(|v| {
                let e: serde_json::Value = serde_json::from_slice(v).unwrap();
                let e = &e["payload"];
                let op = e["op"].as_str().unwrap().to_string();
                let row = if op == "d" { &e["before"] } else { &e["after"] };
                (
                    row["id"].as_i64().unwrap(),
                    op,
                    e["source"]["lsn"].as_i64().unwrap(),
                    row["note"].as_str().map(str::to_string),
                )
            })
            .collect();
        assert!(
            want.iter().filter(|r| r.3.is_some()).count() > 20,
            "{t}: few events carry a note"
        );
        let landed = idem_testkit::s3::landed(&bucket, "", &format!("log_{t}")).await;
        landed.assert_only_named();
        let mut got: Vec<LogRow> = landed
            .lines
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r["op"].as_str().unwrap().to_string(),
                    r["lsn"].as_i64().unwrap(),
                    r["note"].as_str().map(str::to_string),
                )
            })
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got.len(), want.len(), "{t}: rows in the change log, events");
        assert!(
            got == want,
            "{t}: the change log differs from the topic's events"
        );
    }
    for entry in std::fs::read_dir(w.path("")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".deadletter.jsonl") {
            let dead = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(dead.is_empty(), "{}:\n{dead}", path.display());
        }
    }
    // `idem verify --against` agrees, on both kinds of target.
    for name in ["pg_customers", "duck_orders"] {
        let out = idem()
            .args(["verify", "--connector", name, "--against", &pg_url()])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "verify {name}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    eprintln!("cdc crash: {redelivered} events delivered again; every replica exact");
    capture.stop().await;
}

type Row = (i64, Option<String>, Option<i64>, Option<String>);
/// A change log's row: id, op, LSN and the column added halfway.
type LogRow = (i64, String, i64, Option<String>);
/// A Kafka message's key and value.
type Event = (Option<Vec<u8>>, Option<Vec<u8>>);

async fn source_rows(schema: &str, table: &str) -> Vec<Row> {
    pg().await
        .query(
            &format!("SELECT {COMPARED} FROM \"{schema}\".{table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Every message of `topic` (one partition, as Debezium creates it), up to
/// the change event of the end mark.
async fn read_until_end_mark(topic: &str) -> Vec<Event> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .set("group.id", format!("{topic}_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mark = format!("\"id\":{END_MARK}");
    let mut events = Vec::new();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{topic}: no end mark after {} events",
            events.len()
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        let value = m.payload().map(<[u8]>::to_vec);
        let done = value
            .as_deref()
            .is_some_and(|v| String::from_utf8_lossy(v).contains(&mark));
        events.push((m.key().map(<[u8]>::to_vec), value));
        if done {
            return events;
        }
    }
}

async fn produce(topic: &str, events: &[Event]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .create()
        .unwrap();
    for (key, value) in events {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}
