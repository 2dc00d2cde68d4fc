//! Every event exactly once into PostgreSQL and DuckDB: six partitions to
//! the topics' end, kills while producing, transactions committed and
//! aborted, a backfill that stops at the end.

use super::support::*;
use idem_testkit::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    // And the broker's own tool shows every partition drained.
    let described = describe_group(&topic);
    assert_eq!(described.len(), 6, "{described:?}");
    for (partition, (offset, lag, _)) in &described {
        assert_eq!(
            (Some(offset), *lag),
            (ends.get(partition), 0),
            "{partition}"
        );
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_and_at_fail_points_while_producing_every_event_lands_once() {
    const ROUNDS: usize = 24;
    const PER_ROUND: i64 = 2_000;
    let mut rng = crash_rng("kafka");
    let topic = fresh_topic("idem_crash", 6).await;
    let schema = fresh_schema("kafka_crash");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema).max_records(300).toml(),
    );
    // The previous run's partitions move after the session timeout
    // (6 s): kills aim before, around and after it.
    let rounds = crash_while_producing(&cfg, &mut rng, ROUNDS, PER_ROUND, 300..10_000, |ids| {
        let topic = topic.clone();
        async move { produce(&topic, ids).await }
    })
    .await;
    rounds.check("kafka", 20, &FAILPOINTS);

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

/// A transactional producer dies with its transaction open on partition 0.
/// Under `read_committed` nothing after the open transaction can be read
/// (the partition's last stable offset stays before it): the events
/// committed later to partition 0 wait, partition 1 flows. Once the broker
/// aborts the transaction (its `transaction.timeout.ms`, 5 s here), they
/// land, once, and the open transaction's events never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_holds_its_partition_back_until_it_times_out() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let topic = fresh_topic("idem_open_tx", 2).await;
    let schema = fresh_schema("kafka_open_tx");
    let w = Workdir::new();
    let cfg = w.write("k.toml", &Conf::new(&topic, &schema).toml());
    let send = |producer: &BaseProducer, partition: i32, ids: std::ops::Range<i64>| {
        for i in ids {
            let (key, value) = (i.to_string(), format!(r#"{{"id":{i},"v":{}}}"#, i * 10));
            producer
                .send(
                    BaseRecord::to(&topic)
                        .key(&key)
                        .payload(&value)
                        .partition(partition),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    // The transaction left open: ids 1000..1100 on partition 0.
    let dead: BaseProducer = client_config()
        .set("transactional.id", format!("{topic}-dead"))
        .set("transaction.timeout.ms", "5000")
        .create()
        .unwrap();
    dead.init_transactions(Duration::from_secs(30)).unwrap();
    dead.begin_transaction().unwrap();
    send(&dead, 0, 1_000..1_100);
    let opened = Instant::now();
    drop(dead); // killed: neither committed nor aborted
                // Committed after it, on both partitions.
    let plain: BaseProducer = client_config().create().unwrap();
    send(&plain, 0, 0..100);
    send(&plain, 1, 100..200);

    let mut runner = Reaped(spawn_runner(&cfg, &w.path("run.log"), ""));
    let ids = |schema: String| async move {
        pg().await
            .query(
                &format!("SELECT id FROM \"{schema}\".events ORDER BY id"),
                &[],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // Partition 1 lands while partition 0 waits behind the open transaction.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids(schema.clone()).await != (100..200).collect::<Vec<_>>() {
        assert!(Instant::now() < deadline, "{:?}", ids(schema.clone()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held_for = opened.elapsed();
    assert!(
        held_for < Duration::from_secs(5),
        "the transaction timed out before partition 1 was checked ({held_for:?}): the test proves nothing"
    );
    // Then the broker aborts it, and partition 0's committed events land.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(schema.clone()).await.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "partition 0 still held back: {:?}",
            ids(schema.clone()).await.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "partition 0 was held back {:?} after the transaction opened (transaction.timeout.ms = 5000)",
        opened.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(runner.0.id(), "TERM");
    assert!(runner.0.wait().unwrap().success());
    assert_eq!(ids(schema.clone()).await, (0..200).collect::<Vec<_>>());
    assert_eq!(positions(&schema).await, end_offsets(&topic, 2));
}
