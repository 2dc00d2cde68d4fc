//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into an Iceberg table (SQL catalog on the test PostgreSQL, warehouse on
//! the local disk), in one run:
//!   (a) `idem run`, exactly-once, the default `commit_interval` (60 s: a
//!       load this size ends in one or a few snapshots)
//!   (b) `idem run` with a snapshot per batch (`commit_interval = "0s"`)
//!   (c) PyIceberg (scripts/iceberg-tools.sh): PyArrow's JSON reader loads
//!       the same file, and one `append` writes the Parquet files and
//!       commits them in one snapshot: the hand-written load of the same
//!       rows, without positions or fencing
//! Every table is counted back by PyIceberg (every event once). Prints
//! events/s, MB/s of source NDJSON, snapshots, data files, peak RSS and the
//! ratio to (c). Figures, not assertions.
//!
//!     cargo bench -p idem --bench iceberg_load
//!     IDEM_BENCH_EVENTS=200000 IDEM_BENCH_BATCH=50000 cargo bench -p idem --bench iceberg_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem_testkit::iceberg::pyiceberg_command;
use std::time::{Duration, Instant};

struct Count {
    rows: u64,
    distinct: u64,
    snapshots: u64,
    data_files: u64,
}

fn count(catalog: &str, warehouse: &str, table: &str) -> Count {
    let out = pyiceberg_command("iceberg-bench.py", &["count"], catalog, warehouse, table)
        .output()
        .expect("PyIceberg: bash scripts/iceberg-tools.sh");
    assert!(
        out.status.success(),
        "count: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("count's JSON");
    let n = |k: &str| v[k].as_u64().expect(k);
    Count {
        rows: n("rows"),
        distinct: n("distinct_event_ids"),
        snapshots: n("snapshots"),
        data_files: n("data_files"),
    }
}

struct Phase {
    name: String,
    elapsed: Duration,
    peak_kib: u64,
    count: Count,
    latencies: Vec<f64>,
}

fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(100_000);
    let idem = env!("CARGO_BIN_EXE_idem");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("events.jsonl");
    let started = Instant::now();
    let bytes = generate(idem, &data, events);
    let mb = bytes as f64 / 1e6;
    eprintln!(
        "generated {events} events ({mb:.1} MB) in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let warehouse = format!("file://{}", dir.path().join("warehouse").display());
    let catalog = format!("bench_{}", run_id());

    let mut phases = Vec::new();
    for (name, table, extra) in [
        ("idem run, commit_interval 60 s", "bench.events_staged", ""),
        (
            "idem run, a snapshot per batch",
            "bench.events_per_batch",
            "commit_interval = \"0s\"\n",
        ),
    ] {
        let (namespace, t) = table.split_once('.').unwrap();
        let sink = format!(
            "type = \"iceberg\"\nwarehouse = \"{warehouse}\"\nnamespace = \"{namespace}\"\ntable = \"{t}\"\ncatalog = {{ type = \"sql\", url = \"{}\", name = \"{catalog}\" }}\n{extra}",
            pg_url()
        );
        let cfg = dir.path().join("bench.toml");
        std::fs::write(&cfg, config(&data, &sink, batch)).expect("config");
        let (elapsed, peak_kib, latencies) = run_idem(idem, &cfg);
        let count = count(&catalog, &warehouse, table);
        assert_eq!(
            (count.rows, count.distinct),
            (events as u64, events as u64),
            "{name}: every event once"
        );
        phases.push(Phase {
            name: format!("{name}, {}", batch_label(batch)),
            elapsed,
            peak_kib,
            count,
            latencies,
        });
    }

    let table = "bench.events_pyiceberg";
    let mut load = pyiceberg_command("iceberg-bench.py", &["load"], &catalog, &warehouse, table);
    load.arg(&data);
    let (elapsed, peak_kib, _) = run_measured(&mut load);
    let count = count(&catalog, &warehouse, table);
    assert_eq!(count.rows, events as u64, "PyIceberg loaded every event");
    phases.push(Phase {
        name: "PyIceberg: read_json + one append".into(),
        elapsed,
        peak_kib,
        count,
        latencies: Vec::new(),
    });

    let base = phases.last().map(|p| p.elapsed).unwrap_or_default();
    println!();
    println!(
        "Iceberg load, SQL catalog on PostgreSQL, warehouse on the local disk: {events} events, {mb:.1} MB NDJSON, 8 columns; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<52} {:>8} {:>10} {:>7} {:>9} {:>10} {:>9} {:>12}",
        "", "elapsed", "events/s", "MB/s", "snapshots", "data files", "peak RSS", "vs PyIceberg"
    );
    for p in &phases {
        let secs = p.elapsed.as_secs_f64();
        println!(
            "{:<52} {:>7.2}s {:>10.0} {:>7.1} {:>9} {:>10} {:>5} MiB {:>11.2}x",
            p.name,
            secs,
            events as f64 / secs,
            mb / secs,
            p.count.snapshots,
            p.count.data_files,
            p.peak_kib / 1024,
            base.as_secs_f64() / secs
        );
        if !p.latencies.is_empty() {
            println!("    {}", latency_line(&p.latencies));
        }
    }
}
