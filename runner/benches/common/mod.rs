//! Helpers shared by the benchmarks: run a process and sample its peak
//! memory, generate events, write a connector config, read commit latencies.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pg;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The 8 columns of `idem generate`'s events.
pub const COLUMNS: [(&str, &str); 8] = [
    ("event_id", "text"),
    ("user_id", "bigint"),
    ("kind", "text"),
    ("amount", "double"),
    ("currency", "text"),
    ("ok", "boolean"),
    ("at", "timestamp"),
    ("note", "text"),
];

/// The test PostgreSQL (scripts/postgres.sh), or `IDEM_TEST_PG_URL`.
pub fn pg_url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://idem:idem@127.0.0.1:5432/idem_test".into())
}

/// A name part no other run uses (topics, schemas): the process and the
/// clock.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("{}_{nanos}", std::process::id())
}

/// Read `events` messages of `topic`'s `partitions` at `brokers` from
/// the start, doing nothing else: (elapsed, bytes of their values).
pub fn read_topic(brokers: &str, topic: &str, partitions: i32, events: usize) -> (Duration, u64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}_plain"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    let started = Instant::now();
    consumer.assign(&tpl).unwrap();
    let (mut seen, mut bytes) = (0usize, 0u64);
    while seen < events {
        let Some(m) = consumer.poll(Duration::from_secs(10)) else {
            panic!("reading {topic} stalled at {seen} of {events}");
        };
        bytes += rdkafka::Message::payload(&m.unwrap()).map_or(0, <[u8]>::len) as u64;
        seen += 1;
    }
    (started.elapsed(), bytes)
}

/// The batch size a benchmark runs with: `IDEM_BENCH_BATCH`, else
/// `default`; `IDEM_BENCH_BATCH=default` gives 0, which leaves the batch
/// settings to the runner's defaults (the sink's `max_records`, 16 MiB).
pub fn bench_batch(default: usize) -> usize {
    match std::env::var("IDEM_BENCH_BATCH") {
        Ok(v) if v == "default" => 0,
        _ => env_usize("IDEM_BENCH_BATCH", default),
    }
}

/// "batch N", or "default batch" for [`bench_batch`]'s 0.
pub fn batch_label(batch: usize) -> String {
    if batch == 0 {
        "default batch".into()
    } else {
        format!("batch {batch}")
    }
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run `cmd`, sampling its peak resident set (VmHWM) until it exits.
pub fn run_measured(cmd: &mut Command) -> (Duration, u64, std::process::Output) {
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

/// `idem verify CONFIG`, measured: (elapsed, peak KiB). Its audit must
/// find every message exactly once.
pub fn verify_idem(idem: &str, config: &Path) -> (Duration, u64) {
    let (elapsed, peak, out) = run_measured(
        Command::new(idem)
            .env("IDEM_ADMIN_LISTEN", "127.0.0.1:0")
            .arg("verify")
            .arg(config),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("every message took effect exactly once"),
        "idem verify: {said}"
    );
    (elapsed, peak)
}

/// The line a bench prints for [`verify_idem`] of `what`.
pub fn verify_line(what: &str, (elapsed, peak): (Duration, u64)) -> String {
    format!(
        "idem verify of {what}: {:.2}s, peak RSS {} MiB",
        elapsed.as_secs_f64(),
        peak / 1024
    )
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `idem generate` `events` events into `data`, no copies, nothing
/// malformed; returns its size in bytes.
pub fn generate(idem: &str, data: &Path, events: usize) -> u64 {
    generate_with(
        idem,
        data,
        events,
        &["--duplicates", "0", "--malformed", "0"],
    )
}

/// `IDEM_BENCH_IDS=random`: whether the bench asks for data shaped like
/// production; then `idem generate`s `events` events either way (see
/// [`generate_production`]) and returns (shaped, bytes).
pub fn generate_as_asked(idem: &str, data: &Path, events: usize) -> (bool, u64) {
    let production = std::env::var("IDEM_BENCH_IDS").is_ok_and(|m| m == "random");
    let bytes = if production {
        generate_production(idem, data, events)
    } else {
        generate(idem, data, events)
    };
    (production, bytes)
}

/// `idem generate` `events` events shaped like production data: random
/// 20-hex-digit ids, 5% exact copies of recent events at later offsets,
/// 0.1% malformed lines; returns its size in bytes.
pub fn generate_production(idem: &str, data: &Path, events: usize) -> u64 {
    let malformed = (events / 1000).to_string();
    generate_with(
        idem,
        data,
        events,
        &[
            "--random-ids",
            "--duplicates",
            "0.05",
            "--malformed",
            &malformed,
        ],
    )
}

/// `idem generate` with `args` (`--random-ids`, `--duplicates 0.05`...).
pub fn generate_with(idem: &str, data: &Path, events: usize, args: &[&str]) -> u64 {
    let out = Command::new(idem)
        .arg("generate")
        .args(args)
        .arg("--count")
        .arg(events.to_string())
        .arg("--out")
        .arg(data)
        .output()
        .expect("generate");
    assert!(out.status.success());
    std::fs::metadata(data).expect("stat").len()
}

/// A one-connector config reading `data` into the sink described by `sink`.
/// Its dead letters go beside `data`, not into the working directory.
pub fn config(data: &Path, sink: &str, batch: usize) -> String {
    let source = format!("type = \"file\"\npath = \"{}\"", data.display());
    let dead = data.with_extension("dead.jsonl");
    config_with_source(&source, sink, batch).replacen(
        "[connectors.bench]\n",
        &format!("[connectors.bench]\ndead_letter = \"{}\"\n", dead.display()),
        1,
    )
}

/// A one-connector config from `source` into `sink` with the 8 columns;
/// `batch` 0 keeps the runner's default batch settings. Lines in
/// `IDEM_BENCH_SINK_EXTRA` join the sink's settings (e.g.
/// `memory_limit = "256MB"`).
pub fn config_with_source(source: &str, sink: &str, batch: usize) -> String {
    let extra = std::env::var("IDEM_BENCH_SINK_EXTRA").unwrap_or_default();
    let batching = if batch == 0 {
        String::new()
    } else {
        format!(
            "[connectors.bench.batch]\nmax_records = {batch}\nmax_bytes = 268435456\nlinger = \"1s\"\n"
        )
    };
    let mut config = format!(
        r#"
[runner]
progress_interval = "1h"
[connectors.bench]
[connectors.bench.source]
{source}
[connectors.bench.sink]
{sink}
{extra}
{batching}"#,
    );
    for (name, ty) in COLUMNS {
        config.push_str(&format!(
            "[[connectors.bench.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\n"
        ));
    }
    config
}

/// Run `idem run CONFIG` measured; returns (elapsed, peak KiB, sorted
/// commit latencies in ms from its debug log).
pub fn run_idem(idem: &str, config: &Path) -> (Duration, u64, Vec<f64>) {
    let (elapsed, peak, out) = run_measured(
        Command::new(idem)
            .env("RUST_LOG", "warn,idem::connector=debug")
            // Not the default admin port: an idem running on this host
            // keeps it.
            .env("IDEM_ADMIN_LISTEN", "127.0.0.1:0")
            .args(["--log-format", "json", "run"])
            .arg(config),
    );
    let mut latencies: Vec<f64> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "batch committed")
        .filter_map(|v| v["fields"]["elapsed_ms"].as_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    (elapsed, peak, latencies)
}

pub fn latency_line(latencies: &[f64]) -> String {
    format!(
        "commit latency over {} batches: p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(latencies, 0.50),
        percentile(latencies, 0.95),
        percentile(latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    )
}
