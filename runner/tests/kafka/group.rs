//! Runners in one consumer group: killed, added, frozen and fenced; a
//! backfill while the group holds partitions.

use super::support::*;
use idem_testkit::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_share_a_group_and_a_frozen_one_is_fenced() {
    group_scenario(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_cooperative_sticky_assignment() {
    group_scenario(&[("partition.assignment.strategy", "cooperative-sticky")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_the_consumer_group_protocol() {
    group_scenario(&[("group.protocol", "consumer")]).await;
}

/// Three runners in one group: one killed, one added, one frozen mid-batch
/// and fenced by the group; then every event exactly once. `properties`
/// are extra consumer settings.
async fn group_scenario(properties: &[(&str, &str)]) {
    let topic = fresh_topic("idem_group", 6).await;
    let schema = fresh_schema("kafka_group");
    let w = Workdir::new();
    let conf = properties
        .iter()
        .fold(Conf::new(&topic, &schema), |c, (k, v)| {
            if (*k, *v) == ("group.protocol", "consumer") {
                c.consumer_protocol()
            } else {
                c.property(k, v)
            }
        });
    let cfg = w.write("k.toml", &conf.max_records(500).toml());
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
    // The group, not the test, moves the partitions: A is dead and B
    // frozen, so the broker evicts both once their session times out (6 s)
    // and gives every partition to C and D, which open them under a new
    // epoch. Then B wakes with the batch it held.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let described = describe_group(&topic);
        let members: std::collections::HashSet<&str> =
            described.values().map(|(_, _, m)| m.as_str()).collect();
        if described.len() == 6 && members.len() == 2 && !members.contains("-") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never settled on the two live runners: {described:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then C and D open what they were given: wait until every partition
    // B held carries a newer epoch than B's (a busy machine may take a
    // while to get there after the broker's assignment), except those
    // whose offsets row B froze in the middle of a transaction holds
    // locked: their open waits for B (B commits first when it wakes, then
    // they open after it). The partition of B's frozen batch is not among
    // those (the fail point comes before its transaction), so its commit
    // is stale once B wakes.
    let held_by_b = opened_in(&std::fs::read_to_string(w.path("b.log")).unwrap());
    assert!(
        !held_by_b.is_empty(),
        "B opened no partition:\n{}",
        std::fs::read_to_string(w.path("b.log")).unwrap()
    );
    loop {
        let now = offsets_column(&schema, "epoch").await;
        let mut behind = Vec::new();
        for (p, e) in &held_by_b {
            if now.get(p).is_none_or(|n| n <= e) && !offsets_row_locked(&schema, p).await {
                behind.push(p);
            }
        }
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C and D never opened {behind:?}, which B held (their offsets rows are not locked)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(b.id(), "CONT");

    producing.await.unwrap();
    let started = Instant::now();
    while count(&schema).await.0 < TOTAL && started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, mut child) in [("B", b), ("C", c), ("D", d)] {
        signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "runner {name} after SIGTERM: {status:?}\n{}",
            std::fs::read_to_string(w.path(&format!("{}.log", name.to_lowercase())))
                .unwrap_or_default()
        );
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

/// Whether another session holds `partition`'s row of `schema`'s offsets
/// table locked (a runner frozen in the middle of a transaction on it).
async fn offsets_row_locked(schema: &str, partition: &str) -> bool {
    let mut client = pg().await;
    let txn = client.transaction().await.unwrap();
    let tried = txn
        .query(
            &format!(
                "SELECT 1 FROM \"{schema}\".idem_offsets WHERE connector = 'k' AND partition = $1 FOR UPDATE NOWAIT"
            ),
            &[&partition],
        )
        .await;
    txn.rollback().await.unwrap();
    match tried {
        Ok(_) => false,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => true,
        Err(e) => panic!("lock check on {partition}: {e}"),
    }
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

/// Pausing a connector through the admin API keeps its consumer in the
/// group with its partitions (the broker's own tool still names a member
/// for each while their lag grows); resumed, it reads on from where it
/// stopped and every event lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_connector_stays_in_its_group() {
    let topic = fresh_topic("idem_pause", 3).await;
    produce(&topic, 0..3_000).await;
    let schema = fresh_schema("kafka_pause");
    let w = Workdir::new();
    // A member that stops polling is dropped from the group after
    // max.poll.interval.ms: 6 s here, as the session timeout (Conf).
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .property("max.poll.interval.ms", "6000")
            .toml(),
    );
    let port = free_port();
    let api = format!("http://127.0.0.1:{port}/connectors/k");
    let log = w.path("run.log");
    let mut runner = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .env("IDEM_ADMIN_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let state = || async {
        let body = http.get(&api).send().await.unwrap().text().await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap_or("").to_string()
    };
    let wait_rows = |n: i64| {
        let schema = schema.clone();
        let log = log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while count(&schema).await.0 < n {
                assert!(
                    Instant::now() < deadline,
                    "{}",
                    std::fs::read_to_string(&log).unwrap()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_rows(3_000).await;

    let paused = http.post(format!("{api}/pause")).send().await.unwrap();
    assert_eq!(paused.status().as_u16(), 202);
    assert_eq!(state().await, "paused");
    produce(&topic, 3_000..6_000).await;
    // Longer than a member may go without polling.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        count(&schema).await,
        (3_000, 3_000),
        "a paused connector wrote"
    );
    let described = describe_group(&topic);
    assert_eq!(described.len(), 3, "{described:?}");
    assert_eq!(
        described.values().map(|(_, lag, _)| lag).sum::<i64>(),
        3_000
    );
    for (partition, (_, _, member)) in &described {
        assert_ne!(
            member, "-",
            "{partition} has no member: the paused runner left the group"
        );
    }

    let resumed = http.post(format!("{api}/resume")).send().await.unwrap();
    assert_eq!(resumed.status().as_u16(), 202);
    wait_rows(6_000).await;
    signal(runner.0.id(), "TERM");
    assert!(runner.0.wait().unwrap().success());
    assert_eq!(count(&schema).await, (6_000, 6_000));
    assert_eq!(positions(&schema).await, end_offsets(&topic, 3));
    // The partitions were never given up: each opened once, under the
    // epoch of its first opening.
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.matches("partition opened").count(), 3, "{log}");
    let epochs: Vec<i64> = pg()
        .await
        .query(
            &format!("SELECT epoch FROM \"{schema}\".idem_offsets WHERE connector = 'k'"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(epochs, [1, 1, 1]);
}
