//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into DuckDB through `idem run` in exactly-once upsert mode, against
//! DuckDB's own bulk JSON load (`read_json`) into an identical table, in the
//! same run. Prints rates, their ratio, commit latency percentiles and the
//! peak memory of each process. Figures, not assertions.
//!
//!     cargo bench -p idem --bench duckdb_load
//!     IDEM_BENCH_EVENTS=200000 IDEM_BENCH_BATCH=10000 cargo bench -p idem --bench duckdb_load
//!     IDEM_BENCH_MODE=append cargo bench -p idem --bench duckdb_load   (no key, no merge)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const COLUMNS: &str = "{event_id: 'VARCHAR', user_id: 'BIGINT', kind: 'VARCHAR', amount: 'DOUBLE', currency: 'VARCHAR', ok: 'BOOLEAN', \"at\": 'TIMESTAMPTZ', note: 'VARCHAR'}";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run `cmd`, sampling its peak resident set (VmHWM) until it exits.
fn run_measured(cmd: &mut Command) -> (Duration, u64, std::process::Output) {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let sampler = std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        loop {
            if let Ok(s) = std::fs::read_to_string(&status_path) {
                if let Some(kib) = s
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
            }
            if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
                return peak_kib;
            }
        }
    });
    let out = child.wait_with_output().expect("wait");
    let elapsed = started.elapsed();
    tx.send(()).ok();
    let peak = sampler.join().expect("sampler");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    (elapsed, peak, out)
}

fn count(db: &Path) -> i64 {
    let conn = duckdb::Connection::open(db).expect("open");
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count")
}

/// Child mode: DuckDB's own bulk load into a table made with `ddl`.
fn baseline(db: &str, data: &str, ddl_file: &str) {
    let ddl = std::fs::read_to_string(ddl_file).expect("ddl");
    let conn = duckdb::Connection::open(db).expect("open");
    conn.execute_batch(&ddl).expect("create table");
    let sql = format!(
        "INSERT INTO events SELECT event_id, user_id, kind, amount, currency, ok, \"at\", note, 'bulk', 0
         FROM read_json('{data}', format = 'newline_delimited', columns = {COLUMNS})"
    );
    conn.execute_batch(&sql).expect("bulk load");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-child") {
        baseline(&args[i + 1], &args[i + 2], &args[i + 3]);
        return;
    }
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = env_usize("IDEM_BENCH_BATCH", 50_000);
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
    let gen = Command::new(idem)
        .args([
            "generate",
            "--duplicates",
            "0",
            "--malformed",
            "0",
            "--count",
        ])
        .arg(events.to_string())
        .arg("--out")
        .arg(&data)
        .output()
        .expect("generate");
    assert!(gen.status.success());
    let bytes = std::fs::metadata(&data).expect("stat").len();
    let mb = bytes as f64 / 1e6;
    eprintln!(
        "generated {events} events ({mb:.1} MB) in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let idem_db = dir.path().join("idem.duckdb");
    let mut config = format!(
        r#"
[runner]
progress_interval = "1h"
[connectors.bench]
[connectors.bench.source]
type = "file"
path = "{data}"
[connectors.bench.sink]
type = "duckdb"
path = "{db}"
table = "events"
mode = "{mode}"
{mode_keys}
[connectors.bench.batch]
max_records = {batch}
max_bytes = 268435456
linger = "1s"
"#,
        data = data.display(),
        db = idem_db.display(),
    );
    for (name, ty) in [
        ("event_id", "text"),
        ("user_id", "bigint"),
        ("kind", "text"),
        ("amount", "double"),
        ("currency", "text"),
        ("ok", "boolean"),
        ("at", "timestamp"),
        ("note", "text"),
    ] {
        config.push_str(&format!(
            "[[connectors.bench.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\n"
        ));
    }
    let cfg = dir.path().join("bench.toml");
    std::fs::write(&cfg, config).expect("config");

    let (idem_time, idem_peak, out) = run_measured(
        Command::new(idem)
            .env("RUST_LOG", "warn,idem::pipeline=debug")
            .args(["--log-format", "json", "run"])
            .arg(&cfg),
    );
    let mut latencies: Vec<f64> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "batch committed")
        .filter_map(|v| v["fields"]["elapsed_ms"].as_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    assert_eq!(count(&idem_db), events as i64, "idem loaded every event");

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
    let (base_time, base_peak, _) = run_measured(
        Command::new(std::env::current_exe().expect("self"))
            .arg("--baseline-child")
            .arg(&base_db)
            .arg(&data)
            .arg(&ddl_file),
    );
    assert_eq!(
        count(&base_db),
        events as i64,
        "baseline loaded every event"
    );

    let rate = |t: Duration| events as f64 / t.as_secs_f64();
    let mbps = |t: Duration| mb / t.as_secs_f64();
    println!();
    println!(
        "DuckDB load: {events} events, {mb:.1} MB NDJSON, 8 columns{}; {} cores",
        if append {
            ", no key"
        } else {
            ", PRIMARY KEY (event_id)"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<44} {:>9} {:>11} {:>8} {:>10}",
        "", "elapsed", "events/s", "MB/s", "peak RSS"
    );
    println!(
        "{:<44} {:>8.2}s {:>11.0} {:>8.1} {:>6} MiB",
        format!("idem run ({mode}, exactly-once, batch {batch})"),
        idem_time.as_secs_f64(),
        rate(idem_time),
        mbps(idem_time),
        idem_peak / 1024
    );
    println!(
        "{:<44} {:>8.2}s {:>11.0} {:>8.1} {:>6} MiB",
        "duckdb INSERT .. SELECT FROM read_json",
        base_time.as_secs_f64(),
        rate(base_time),
        mbps(base_time),
        base_peak / 1024
    );
    println!(
        "idem / baseline throughput: {:.2}x",
        base_time.as_secs_f64() / idem_time.as_secs_f64()
    );
    println!(
        "idem commit latency over {} batches: p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
}
