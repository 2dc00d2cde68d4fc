//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into DuckDB through `idem run` in exactly-once upsert mode, against
//! DuckDB's own bulk JSON load (`read_json`) into an identical table, in the
//! same run. Prints rates, their ratio, commit latency percentiles and the
//! peak memory of each process. Figures, not assertions.
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

    let idem_db = dir.path().join("idem.duckdb");
    let sink = format!(
        "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"\nmode = \"{mode}\"\n{mode_keys}",
        idem_db.display()
    );
    let config = config(&data, &sink, batch);
    let cfg = dir.path().join("bench.toml");
    std::fs::write(&cfg, config).expect("config");

    let (idem_time, idem_peak, latencies) = run_idem(idem, &cfg);
    let loaded = count(&idem_db);
    if !production {
        assert_eq!(loaded, events as i64, "idem loaded every event");
    }

    // The baseline table is created by the DDL DuckDB reports for Idem's.
    let ddl: String = duckdb::Connection::open(&idem_db)
        .expect("open")
        .query_row(
            "SELECT sql FROM duckdb_tables() WHERE table_name = 'events'",
            [],
            |r| r.get(0),
        )
        .expect("ddl");
    let ddl_file = dir.path().join("ddl.sql");
    std::fs::write(&ddl_file, ddl).expect("ddl file");
    let base_db = dir.path().join("baseline.duckdb");
    let mut child = Command::new(std::env::current_exe().expect("self"));
    child
        .arg("--baseline-child")
        .arg(&base_db)
        .arg(&data)
        .arg(&ddl_file);
    if production {
        child.arg("production");
    }
    let (base_time, base_peak, _) = run_measured(&mut child);
    // The same rows both ways: one per event id (the copies and the bad
    // lines dropped), or every event.
    assert_eq!(
        count(&base_db),
        loaded,
        "baseline and idem hold as many rows"
    );

    let rate = |t: Duration| events as f64 / t.as_secs_f64();
    let mbps = |t: Duration| mb / t.as_secs_f64();
    println!();
    println!(
        "DuckDB load: {events} events, {mb:.1} MB NDJSON, 8 columns{}{}; {} cores",
        if append {
            ", no key"
        } else {
            ", PRIMARY KEY (event_id)"
        },
        if production {
            format!(", random ids, 5% copies, {malformed} malformed lines: {loaded} rows")
        } else {
            String::new()
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<44} {:>9} {:>11} {:>8} {:>10}",
        "", "elapsed", "events/s", "MB/s", "peak RSS"
    );
    println!(
        "{:<44} {:>8.2}s {:>11.0} {:>8.1} {:>6} MiB",
        format!("idem run ({mode}, exactly-once, {})", batch_label(batch)),
        idem_time.as_secs_f64(),
        rate(idem_time),
        mbps(idem_time),
        idem_peak / 1024
    );
    println!(
        "{:<44} {:>8.2}s {:>11.0} {:>8.1} {:>6} MiB",
        if production {
            "duckdb INSERT .. SELECT read_json .. QUALIFY"
        } else {
            "duckdb INSERT .. SELECT FROM read_json"
        },
        base_time.as_secs_f64(),
        rate(base_time),
        mbps(base_time),
        base_peak / 1024
    );
    println!(
        "idem / baseline throughput: {:.2}x",
        base_time.as_secs_f64() / idem_time.as_secs_f64()
    );
    println!("idem {}", latency_line(&latencies));
}
