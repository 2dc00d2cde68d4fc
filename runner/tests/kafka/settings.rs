//! What the source's settings do: key, timestamp and headers as columns, a
//! message id from a header, `start = "latest"`, positions outside the
//! topic, retention warnings, a missing broker, and `idem produce`.

use super::support::*;
use idem_testkit::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
            .columns(&column_lines(&[
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

/// Retention deleted offsets the sink had not committed yet: with
/// `out_of_range = "earliest"` the runner goes on from the oldest offset
/// held and says how many were lost, in its log, `/metrics`, the admin API
/// and `idem status`, and in its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_deleted_by_retention_are_reported_as_lost() {
    let topic = fresh_topic("idem_lost", 1).await;
    produce(&topic, 0..100).await;
    let schema = fresh_schema("kafka_lost");
    let w = Workdir::new();
    let conf = Conf::new(&topic, &schema)
        .source("out_of_range = \"earliest\"")
        .sink_line("mode = \"upsert\"")
        .sink_line("key = [\"id\"]");
    let backfill = w.write("b.toml", &conf.clone().source("stop_at_end = true").toml());
    run_ok(idem().arg("run").arg(&backfill));
    assert_eq!(count(&schema).await, (100, 100));

    // 100 more arrive while no runner is up, and retention deletes the
    // partition up to offset 150: 100..150 never reach the sink.
    produce(&topic, 100..200).await;
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let mut upto = rdkafka::TopicPartitionList::new();
    upto.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(150))
        .unwrap();
    admin
        .delete_records(&upto, &AdminOptions::new())
        .await
        .unwrap();

    let port = free_port();
    let log = w.path("run.log");
    let cfg = w.write("k.toml", &conf.toml());
    let mut runner = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .env("IDEM_ADMIN_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&schema).await.0 < 150 {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partition = format!("{topic}/0");
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line =
        format!("idem_source_offsets_lost_total{{connector=\"k\",partition=\"{partition}\"}} 50");
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    let status = idem()
        .args(["status", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    let status = text(&status.stdout);
    assert!(
        status.contains(&format!(
            "k: LOST 50 offsets the source deleted before they were committed (50 in {partition})"
        )),
        "{status}"
    );
    let mut stdout = runner.0.stdout.take().unwrap();
    signal(runner.0.id(), "TERM");
    assert!(runner.0.wait().unwrap().success());
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut summary).unwrap();
    assert!(
        summary.contains(&format!(
            "LOST: 50 offsets the source deleted before they were committed (50 in {partition})"
        )),
        "{summary}"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(&format!("50 offsets of {partition} (100..150) were deleted by the source before they were committed")),
        "{log}"
    );
    // Everything the topic still held landed, once; the position is its end.
    assert_eq!(count(&schema).await, (150, 150));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 1));
}

/// A pattern subscription takes in a matching topic created while it runs
/// (Debezium makes one per new table) without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_takes_in_a_topic_created_while_it_runs() {
    let base = fresh_topic("idem_pattern", 1).await;
    let first = fresh_topic(&base, 1).await;
    produce(&first, 0..100).await;
    let schema = fresh_schema("kafka_pattern");
    let w = Workdir::new();
    let cfg = w.write("k.toml", &Conf::new(&format!("^{base}_.*"), &schema).toml());
    let mut child = idem()
        .arg("run")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while count(&schema).await.0 < 100 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count(&schema).await.0, 100, "the first topic");
    let second = fresh_topic(&base, 1).await;
    produce(&second, 100..200).await;
    let created = Instant::now();
    // librdkafka's default refresh (5 minutes) would miss this.
    while count(&schema).await.0 < 200 && created.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the new topic's events landed {:.1} s after it was made",
        created.elapsed().as_secs_f64()
    );
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_eq!(count(&schema).await, (200, 200), "the topic made later");
}
