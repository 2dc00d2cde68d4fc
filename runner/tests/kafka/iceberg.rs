//! Two runners in one consumer group writing one Iceberg table (the catalog
//! on the test PostgreSQL, the warehouse on the local disk), read back by
//! PyIceberg (scripts/iceberg-tools.sh).

use super::support::*;
use idem_testkit::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Runner B freezes with the data files of a snapshot written and the
/// catalog commit not made; the group gives its partitions to A, which
/// opens them under a newer epoch and commits; B, woken, is refused. Every
/// message is in the table once, and the positions are the topic's ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_share_an_iceberg_table_and_a_frozen_ones_commit_is_refused() {
    let topic = fresh_topic("idem_ice_group", 4).await;
    let catalog = fresh_schema("ice_group");
    let w = Workdir::new();
    let warehouse = format!("file://{}", w.path("warehouse").display());
    let table = "idem.events";
    // B may freeze inside another task's catalog transaction, holding the
    // table's row lock: the server aborts it after 5 s, and A goes on.
    let sink = idem_testkit::iceberg::sink_lines(&catalog, &warehouse, table)
        .replace(" }\n", ", idle_in_transaction_timeout = \"5s\" }\n")
        + "commit_interval = \"500ms\"\n";
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &catalog)
            // B may freeze while the group rebalances: the broker then
            // waits this long (the rebalance timeout), not the default 5
            // minutes, for it to rejoin before giving A everything.
            .property("max.poll.interval.ms", "10000")
            .sink(&sink)
            .max_records(500)
            .toml(),
    );
    const TOTAL: i64 = 30_000;
    produce(&topic, 0..10_000).await;
    // The rest arrives while B freezes and the group moves its partitions.
    let producing = tokio::spawn({
        let topic = topic.clone();
        async move {
            for chunk in 0..20 {
                let from = 10_000 + chunk * 1_000;
                produce(&topic, from..from + 1_000).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let a = spawn_runner(&cfg, &w.path("a.log"), "");
    // B stops at its second snapshot with the data files written and the
    // table checked, before the catalog commit that would make them part
    // of the table. (B may hold the SQL catalog's lock there, which slows
    // A's opens: the group then often takes a partition from A and gives
    // it back while A opens it, and A opens it twice in a second.)
    let b = spawn_runner(&cfg, &w.path("b.log"), "before_catalog_commit=2:stop");
    let log = |name: &str| std::fs::read_to_string(w.path(name)).unwrap_or_default();
    let started = Instant::now();
    while !is_stopped(b.id()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "runner B never reached its second snapshot:\n{}",
            log("b.log")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held_by_b = opened_in(&log("b.log"));
    assert!(
        !held_by_b.is_empty(),
        "B opened no partition:\n{}",
        log("b.log")
    );
    // B misses its heartbeats: once its session times out (6 s) the group
    // gives A every partition, and A opens them under a newer epoch,
    // stored in the table's properties.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let read = idem_testkit::iceberg::read(&catalog, &warehouse, table);
        let behind: Vec<&String> = held_by_b
            .iter()
            .filter(|(p, e)| {
                read.properties
                    .iter()
                    .find(|(k, _)| k.starts_with("idem.epoch/k/") && k.ends_with(&format!("/{p}")))
                    .and_then(|(_, v)| v.parse::<i64>().ok())
                    .is_none_or(|now| now <= **e)
            })
            .map(|(p, _)| p)
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never opened {behind:?}, which B held:\n{}",
            log("a.log")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(b.id(), "CONT");

    producing.await.unwrap();
    let started = Instant::now();
    let distinct = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<HashSet<i64>>()
            .len() as i64
    };
    loop {
        let read = idem_testkit::iceberg::read(&catalog, &warehouse, table);
        if distinct(&read.rows) >= TOTAL || started.elapsed() > Duration::from_secs(90) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for (name, mut child) in [("a", a), ("b", b)] {
        signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "runner {name} after SIGTERM: {status:?}\n{}",
            log(&format!("{name}.log"))
        );
    }
    let read = idem_testkit::iceberg::read(&catalog, &warehouse, table);
    let mut missing: HashSet<i64> = (0..TOTAL).collect();
    for r in &read.rows {
        missing.remove(&r["id"].as_i64().unwrap());
    }
    assert_eq!(
        (read.rows.len() as i64, distinct(&read.rows)),
        (TOTAL, TOTAL),
        "lost or duplicated events; missing: {}; positions {:?} of {:?}\nA:\n{}\nB:\n{}",
        locate(&topic, 4, &missing),
        read.positions("k"),
        end_offsets(&topic, 4),
        log("a.log"),
        log("b.log")
    );
    let positions: HashMap<String, i64> = read.positions("k").into_iter().collect();
    assert_eq!(positions, end_offsets(&topic, 4));
    assert!(
        log("b.log").contains("fenced by a newer runner"),
        "the frozen runner's stale commit was not refused:\n{}",
        log("b.log")
    );
}
