//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) in a
//! 6-partition topic on the local broker (scripts/kafka.sh), in one run:
//!   (a) a plain consumer that only reads the topic to its end: the
//!       source's limit on this machine
//!   (b) `idem run` into DuckDB, append, exactly-once, one runner
//!   (c) `idem run` into PostgreSQL, append, exactly-once, one runner
//!   (d) the same with two runners in one consumer group
//! (b) and (c) use `stop_at_end` and are timed to their exit; (d) follows
//! the topic and is timed until the table holds every event. Prints
//! events/s, the ratio to (a), and peak RSS.
//!
//!     cargo bench -p idem --bench kafka_load
//!     IDEM_BENCH_EVENTS=200000 cargo bench -p idem --bench kafka_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const BROKERS: &str = "127.0.0.1:9092";
const PARTITIONS: i32 = 6;

fn source(topic: &str, group: &str, stop_at_end: bool) -> String {
    format!(
        "type = \"kafka\"\nbrokers = \"{BROKERS}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\nstop_at_end = {stop_at_end}\n[connectors.bench.source.properties]\n\"session.timeout.ms\" = \"6000\""
    )
}

fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(50_000);
    let idem = env!("CARGO_BIN_EXE_idem");
    let topic = format!("bench_{}", run_id());
    let dir = tempfile::tempdir().expect("tempdir");

    let produced = Command::new(idem)
        .args([
            "produce",
            &topic,
            "--brokers",
            BROKERS,
            "--duplicates",
            "0",
            "--malformed",
            "0",
        ])
        .args([
            "--partitions",
            &PARTITIONS.to_string(),
            "-n",
            &events.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        produced.status.success(),
        "idem produce: {}; is the broker up? bash scripts/kafka.sh",
        String::from_utf8_lossy(&produced.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&produced.stderr));

    let mut results: Vec<(String, Duration, Option<u64>)> = Vec::new();
    let (plain, bytes) = read_topic(BROKERS, &topic, PARTITIONS, events);
    assert!(bytes > 0);
    results.push(("(a) plain consumer, reads only".into(), plain, None));

    // (b) DuckDB, one runner, to the end.
    let db = dir.path().join("bench.duckdb");
    let sink = format!(
        "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"",
        db.display()
    );
    let cfg = dir.path().join("duck.toml");
    std::fs::write(
        &cfg,
        config_with_source(
            &source(&topic, &format!("{topic}_duck"), true),
            &sink,
            batch,
        ),
    )
    .unwrap();
    let (elapsed, peak, _) = run_idem(idem, &cfg);
    results.push(("(b) idem -> DuckDB, 1 runner".into(), elapsed, Some(peak)));

    // (c) PostgreSQL, one runner, to the end.
    let schema = format!("kbench_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(conn);
    let pg_sink = |table: &str| {
        format!(
            // Each run its own positions: the same connector name in one
            // offsets table would resume where the previous run ended.
            "type = \"postgres\"\nsslmode = \"disable\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"{table}\"\noffsets_table = \"offsets_{table}\"",
            pg_url()
        )
    };
    let cfg = dir.path().join("pg1.toml");
    std::fs::write(
        &cfg,
        config_with_source(
            &source(&topic, &format!("{topic}_pg1"), true),
            &pg_sink("one"),
            batch,
        ),
    )
    .unwrap();
    let (elapsed, peak, _) = run_idem(idem, &cfg);
    let count = |table: &str| -> i64 {
        rt.block_on(client.query_one(&format!("SELECT count(*) FROM {schema}.{table}"), &[]))
            .map(|r| r.get(0))
            .unwrap_or(0)
    };
    assert_eq!(count("one"), events as i64);
    results.push((
        "(c) idem -> PostgreSQL, 1 runner".into(),
        elapsed,
        Some(peak),
    ));

    // (d) PostgreSQL, two runners in one group, following the topic.
    let cfg = dir.path().join("pg2.toml");
    std::fs::write(
        &cfg,
        config_with_source(
            &source(&topic, &format!("{topic}_pg2"), false),
            &pg_sink("two"),
            batch,
        ),
    )
    .unwrap();
    let started = Instant::now();
    let logs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("runner{i}.log")))
        .collect();
    let runners: Vec<_> = logs
        .iter()
        .map(|log| {
            Command::new(idem)
                .args(["run"])
                .arg(&cfg)
                // Two runners on one host: an admin API port each.
                .env("IDEM_ADMIN_LISTEN", "127.0.0.1:0")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    while count("two") < events as i64 {
        if started.elapsed() > Duration::from_secs(180) {
            for log in &logs {
                eprintln!(
                    "{}:\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            panic!("two runners stalled at {} of {events}", count("two"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    for (mut r, log) in runners.into_iter().zip(&logs) {
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", r.id())])
            .status();
        let status = r.wait().unwrap();
        assert!(
            status.success(),
            "a runner after SIGTERM: {status:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    assert_eq!(count("two"), events as i64);
    results.push(("(d) idem -> PostgreSQL, 2 runners".into(), elapsed, None));
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .unwrap();

    let plain_rate = events as f64 / plain.as_secs_f64();
    println!();
    println!(
        "Kafka load: {events} events in {PARTITIONS} partitions, 8 columns; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<40} {:>9} {:>11} {:>8} {:>10}",
        "", "elapsed", "events/s", "vs (a)", "peak RSS"
    );
    for (label, elapsed, peak) in results {
        let rate = events as f64 / elapsed.as_secs_f64();
        println!(
            "{label:<40} {:>8.2}s {rate:>11.0} {:>7.2}x {:>10}",
            elapsed.as_secs_f64(),
            rate / plain_rate,
            peak.map_or("-".into(), |kib| format!("{} MiB", kib / 1024)),
        );
    }
}
