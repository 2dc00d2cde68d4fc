//! Flow control per partition: a slow partition does not hold up the
//! others of its runner.

use super::support::*;
use idem_testkit::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One partition's commits are slowed (a fail point sleeps before each of
/// them) until its reader falls behind: the consumer keeps what it fetched
/// for it, pauses that partition alone and resumes it once the reader has
/// taken all of it. Every event lands exactly once; the time at which each
/// partition reached its end is printed (timing is not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_partition_does_not_hold_up_the_others() {
    let topic = fresh_topic("idem_slow", 3).await;
    produce(&topic, 0..60_000).await;
    let ends = end_offsets(&topic, 3);
    let schema = fresh_schema("kafka_slow");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .max_records(500)
            .toml(),
    );
    let slow = format!("{topic}/0");
    let log = w.path("run.log");
    let started = Instant::now();
    let mut runner = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .env("IDEM_FAILPOINTS", format!("before_commit@{slow}=sleep:400"))
            .env("RUST_LOG", "warn,idem_source_kafka::consumer=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut done: HashMap<String, Duration> = HashMap::new();
    // Where the slow partition was when the other two were done.
    let mut slow_then: Option<i64> = None;
    let status = loop {
        let now = positions_so_far(&schema).await;
        for (p, at) in &now {
            if Some(at) == ends.get(p) {
                done.entry(p.clone()).or_insert_with(|| started.elapsed());
            }
        }
        if slow_then.is_none() && done.keys().filter(|p| **p != slow).count() == 2 {
            slow_then = Some(now.get(&slow).copied().unwrap_or(0));
        }
        if let Some(status) = runner.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{log}");
    let mut times: Vec<_> = done.iter().collect();
    times.sort();
    eprintln!("each partition at its end after (the slow one is {slow}): {times:?}");

    assert!(
        log.lines()
            .any(|l| l.contains("partition paused until its inbox drains") && l.contains(&slow)),
        "the slow partition was never paused:\n{log}"
    );
    // Not a timing: the others must not have gone at the slow one's pace
    // (they did when one budget for all partitions let it hold all).
    let slow_end = ends[&slow];
    let slow_then = slow_then.expect("the other partitions reached their ends");
    assert!(
        slow_then < slow_end / 2,
        "the others finished only when the slow partition was at {slow_then} of {slow_end}"
    );
    assert_eq!(count(&schema).await, (60_000, 60_000));
    assert_eq!(positions(&schema).await, ends);
}

/// The sink's positions, none before its tables exist.
async fn positions_so_far(schema: &str) -> HashMap<String, i64> {
    pg().await
        .query(
            &format!("SELECT partition, next_offset FROM \"{schema}\".idem_offsets WHERE connector = 'k'"),
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r.get(0), r.get::<_, Option<i64>>(1)?)))
                .collect()
        })
        .unwrap_or_default()
}
