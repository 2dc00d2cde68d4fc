//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into DuckDB through `idem run` in exactly-once upsert mode, against
//! DuckDB's own bulk JSON load (`read_json`) into an identical table and,
//! for upserts, into the same table with a primary key on the key (Idem's
//! has none), in the same run, each `IDEM_BENCH_ROUNDS` (3) times. Prints
//! median rates, the ratios, commit latency percentiles and the peak
//! memory of each process. Figures, not assertions.
//!
//!     cargo bench -p idem --bench duckdb_load
//!     IDEM_BENCH_EVENTS=200000 IDEM_BENCH_BATCH=10000 cargo bench -p idem --bench duckdb_load
//!     IDEM_BENCH_MODE=append cargo bench -p idem --bench duckdb_load   (no key, no merge)
//!     IDEM_BENCH_IDS=random cargo bench -p idem --bench duckdb_load
//!         (production-shaped: random 20-hex event ids, 5% re-emitted
//!         copies at later offsets, 0.1% malformed lines; the baseline then
//!         skips the bad lines and keeps one row per id with QUALIFY)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const READ_JSON_COLUMNS: &str = "{event_id: 'VARCHAR', user_id: 'BIGINT', kind: 'VARCHAR', amount: 'DOUBLE', currency: 'VARCHAR', ok: 'BOOLEAN', \"at\": 'TIMESTAMPTZ', note: 'VARCHAR'}";

fn count(db: &Path) -> i64 {
    let conn = duckdb::Connection::open(db).expect("open");
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count")
}

/// Child mode: DuckDB's own bulk load into a table made with `ddl`; with
/// `production`, bad lines skipped and one row per event id.
fn baseline(db: &str, data: &str, ddl_file: &str, production: bool) {
    let ddl = std::fs::read_to_string(ddl_file).expect("ddl");
    let conn = duckdb::Connection::open(db).expect("open");
    conn.execute_batch(&ddl).expect("create table");
    let sql = if production {
        format!(
            "INSERT INTO events SELECT event_id, user_id, kind, amount, currency, ok, \"at\", note, 'bulk', 0
             FROM read_json('{data}', format = 'newline_delimited', columns = {READ_JSON_COLUMNS}, ignore_errors = true)
             WHERE event_id IS NOT NULL AND amount IS NOT NULL AND \"at\" IS NOT NULL
             QUALIFY row_number() OVER (PARTITION BY event_id) = 1"
        )
    } else {
        format!(
            "INSERT INTO events SELECT event_id, user_id, kind, amount, currency, ok, \"at\", note, 'bulk', 0
             FROM read_json('{data}', format = 'newline_delimited', columns = {READ_JSON_COLUMNS})"
        )
    };
    conn.execute_batch(&sql).expect("bulk load");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-child") {
        baseline(&args[i + 1], &args[i + 2], &args[i + 3], args.len() > i + 4);
        return;
    }
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(50_000);
    let append = std::env::var("IDEM_BENCH_MODE").is_ok_and(|m| m == "append");
    let (mode, mode_keys) = if append {
        ("append", "")
    } else {
        ("upsert", "key = [\"event_id\"]")
    };
    let idem = env!("CARGO_BIN_EXE_idem");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("events.jsonl");
    let started = Instant::now();
    let malformed = events / 1000;
    let (production, bytes) = generate_as_asked(idem, &data, events);
    let mb = bytes as f64 / 1e6;
    eprintln!(
        "generated {events} events ({mb:.1} MB) in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Every variant runs `rounds` times, interleaved, each into a fresh
    // file: this machine's timing drifts by a quarter from run to run.
    let rounds = env_usize("IDEM_BENCH_ROUNDS", 3).max(1);
    let mut runs: Vec<Variant> = Vec::new();
    let mut latencies = Vec::new();
    let mut loaded = 0;
    let mut audited = None;
    for round in 0..rounds {
        let idem_db = dir.path().join(format!("idem{round}.duckdb"));
        let sink = format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"\nmode = \"{mode}\"\n{mode_keys}",
            idem_db.display()
        );
        let cfg = dir.path().join("bench.toml");
        std::fs::write(&cfg, config(&data, &sink, batch)).expect("config");
        let (t, peak, mut lat) = run_idem(idem, &cfg);
        latencies.append(&mut lat);
        loaded = count(&idem_db);
        if !production {
            assert_eq!(loaded, events as i64, "idem loaded every event");
        }
        record(
            &mut runs,
            &format!("idem run ({mode}, exactly-once, {})", batch_label(batch)),
            t,
            peak,
        );
        if round + 1 == rounds {
            // The audit of one load: its time and memory.
            audited = Some(verify_idem(idem, &cfg));
        }

        // The baseline's table is made by the DDL DuckDB reports for
        // Idem's; for upserts also with a primary key on the key, the
        // load `INSERT OR REPLACE` would need (Idem's table has none).
        let ddl: String = duckdb::Connection::open(&idem_db)
            .expect("open")
            .query_row(
                "SELECT sql FROM duckdb_tables() WHERE table_name = 'events'",
                [],
                |r| r.get(0),
            )
            .expect("ddl");
        let mut tables = vec![("Idem's table", ddl.clone())];
        if !append {
            let cut = ddl.rfind(')').expect("a column list");
            let keyed = format!("{}, PRIMARY KEY (event_id){}", &ddl[..cut], &ddl[cut..]);
            tables.push(("PRIMARY KEY (event_id)", keyed));
        }
        for (i, (label, ddl)) in tables.into_iter().enumerate() {
            let ddl_file = dir.path().join("ddl.sql");
            std::fs::write(&ddl_file, ddl).expect("ddl file");
            let base_db = dir.path().join(format!("baseline{round}_{i}.duckdb"));
            let mut child = Command::new(std::env::current_exe().expect("self"));
            child
                .arg("--baseline-child")
                .arg(&base_db)
                .arg(&data)
                .arg(&ddl_file);
            if production {
                child.arg("production");
            }
            let (t, peak, _) = run_measured(&mut child);
            // The same rows both ways: one per event id (the copies and
            // the bad lines dropped), or every event.
            assert_eq!(
                count(&base_db),
                loaded,
                "baseline and idem hold as many rows"
            );
            let what = if production {
                "duckdb read_json .. QUALIFY"
            } else {
                "duckdb read_json"
            };
            record(&mut runs, &format!("{what}, {label}"), t, peak);
        }
    }

    println!();
    println!(
        "DuckDB load: {events} events, {mb:.1} MB NDJSON, 8 columns{}{}; {} cores; median of {rounds}",
        if append { ", no key" } else { ", upsert on event_id" },
        if production {
            format!(", random ids, 5% copies, {malformed} malformed lines: {loaded} rows")
        } else {
            String::new()
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<58} {:>9} {:>13} {:>11} {:>8} {:>8} {:>10}",
        "", "median", "range", "events/s", "MB/s", "idem/it", "peak RSS"
    );
    let idem_median = runs[0].median();
    for v in &mut runs {
        let t = v.median();
        let (lo, hi) = (v.times[0], v.times[v.times.len() - 1]);
        println!(
            "{:<58} {:>8.2}s {:>13} {:>11.0} {:>8.1} {:>7.2}x {:>6} MiB",
            v.label,
            t.as_secs_f64(),
            format!("{:.2}-{:.2}s", lo.as_secs_f64(), hi.as_secs_f64()),
            events as f64 / t.as_secs_f64(),
            mb / t.as_secs_f64(),
            t.as_secs_f64() / idem_median.as_secs_f64(),
            v.peak / 1024
        );
    }
    println!("idem/it: Idem's events/s as a fraction of the line's");
    latencies.sort_by(f64::total_cmp);
    println!("idem {}", latency_line(&latencies));
    if let Some(audit) = audited {
        println!("{}", verify_line("the last idem run", audit));
    }
}

/// One line of the table: its runs' times and peak memory.
struct Variant {
    label: String,
    times: Vec<Duration>,
    peak: u64,
}

impl Variant {
    /// Sorts the times; the middle one.
    fn median(&mut self) -> Duration {
        self.times.sort();
        self.times[self.times.len() / 2]
    }
}

fn record(runs: &mut Vec<Variant>, label: &str, t: Duration, peak: u64) {
    match runs.iter_mut().find(|v| v.label == label) {
        Some(v) => {
            v.times.push(t);
            v.peak = v.peak.max(peak);
        }
        None => runs.push(Variant {
            label: label.to_string(),
            times: vec![t],
            peak,
        }),
    }
}
