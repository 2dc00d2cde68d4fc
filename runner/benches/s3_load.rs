//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into the local S3-compatible store (scripts/s3.sh), in one run:
//!   (a) `idem run` into JSON lines objects, exactly-once
//!   (b) `idem run` into Parquet objects (zstd), exactly-once
//!   (c) plain PUTs of (a)'s bytes: every object (a) committed, read back
//!       and PUT again under other keys by one client, one after another,
//!       as `idem` does: the store's limit for the same bytes
//!   (d, e) events whose times spread over 28 days, interleaved (as late
//!       and backfilled events reach a day-partitioned lake), into Parquet
//!       by day (`time_column`): (d) every batch closing its objects
//!       (`roll_interval = "0s"`), (e) objects open across batches (the
//!       default roll); then DuckDB's `read_parquet` of each result,
//!       downloaded (a scan of every object: what the object count costs
//!       a reader).
//! Prints events/s, MB/s of source NDJSON (and of stored bytes), objects,
//! ratios to (c), commit latencies, peak RSS and scan times. Figures, not
//! assertions.
//!
//!     cargo bench -p idem --bench s3_load
//!     IDEM_BENCH_EVENTS=200000 IDEM_BENCH_BATCH=50000 cargo bench -p idem --bench s3_load
//!     IDEM_BENCH_PART_BYTES=67108864 cargo bench -p idem --bench s3_load   (one PUT per object)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use common::*;
use std::time::{Duration, Instant};

const ENDPOINT: &str = "http://127.0.0.1:5000";
const CREDENTIALS: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "idem-bench"),
    ("AWS_SECRET_ACCESS_KEY", "idem-bench"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

fn client() -> Client {
    let creds =
        aws_sdk_s3::config::Credentials::new("idem-bench", "idem-bench", None, None, "bench");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(ENDPOINT)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    Client::from_conf(conf)
}

/// Every key under `prefix` with its size.
async fn list(c: &Client, bucket: &str, prefix: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .expect("list (is the store running? bash scripts/s3.sh)");
        out.extend(page.contents().iter().map(|o| {
            (
                o.key().unwrap_or_default().to_string(),
                o.size().unwrap_or(0),
            )
        }));
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_string()),
            None => return out,
        }
    }
}

async fn empty(c: &Client, bucket: &str) {
    for (key, _) in list(c, bucket, "").await {
        c.delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
}

/// The sink's lines for `bucket` on the local store, with `extra`.
fn s3_sink(bucket: &str, part_bytes: usize, extra: &str) -> String {
    format!(
        "type = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{ENDPOINT}\"\npath_style = true\npart_bytes = {part_bytes}\n{extra}"
    )
}

/// `idem run CONFIG` with the store's credentials.
fn idem_run(idem: &str, cfg: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(idem);
    cmd.arg("run").arg(cfg);
    for (k, v) in CREDENTIALS {
        cmd.env(k, v);
    }
    cmd
}

struct Phase {
    name: String,
    /// DuckDB's scan of what the run stored, median of 3.
    scan: Option<Duration>,
    elapsed: Duration,
    stored_bytes: u64,
    objects: usize,
    peak_kib: Option<u64>,
    latencies: Vec<f64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(100_000);
    // Objects above this go up in parts (the sink's default: 16 MiB).
    let part_bytes = env_usize("IDEM_BENCH_PART_BYTES", 16 << 20);
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

    let c = client();
    let bucket = format!("idem-bench-{}", std::process::id());
    c.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket (is the store running? bash scripts/s3.sh)");
    let mut phases = Vec::new();
    let mut jsonl_objects: Vec<Vec<u8>> = Vec::new();
    for (name, extra) in [
        ("idem run, JSON lines", "format = \"jsonl\""),
        ("idem run, Parquet (zstd)", "format = \"parquet\""),
    ] {
        let cfg = dir.path().join("bench.toml");
        let sink = s3_sink(&bucket, part_bytes, extra);
        std::fs::write(&cfg, config(&data, &sink, batch)).expect("config");
        let mut cmd = idem_run(idem, &cfg);
        cmd.env("RUST_LOG", "warn,idem::connector=debug")
            .args(["--log-format", "json"]);
        let (elapsed, peak, out) = run_measured(&mut cmd);
        let mut latencies: Vec<f64> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "batch committed")
            .filter_map(|v| v["fields"]["elapsed_ms"].as_f64())
            .collect();
        latencies.sort_by(f64::total_cmp);
        let data_objects: Vec<(String, i64)> = list(&c, &bucket, "bench/topic=")
            .await
            .into_iter()
            .collect();
        if jsonl_objects.is_empty() {
            for (key, _) in &data_objects {
                let o = c
                    .get_object()
                    .bucket(&bucket)
                    .key(key)
                    .send()
                    .await
                    .unwrap();
                jsonl_objects.push(o.body.collect().await.unwrap().into_bytes().to_vec());
            }
            let lines: usize = jsonl_objects
                .iter()
                .map(|o| o.iter().filter(|b| **b == b'\n').count())
                .sum();
            assert_eq!(lines, events, "idem wrote every event once");
        }
        phases.push(Phase {
            scan: None,
            name: format!("{name}, {}", batch_label(batch)),
            elapsed,
            stored_bytes: data_objects.iter().map(|(_, s)| *s as u64).sum(),
            objects: data_objects.len(),
            peak_kib: Some(peak),
            latencies,
        });
        empty(&c, &bucket).await;
    }

    // The baseline: the same objects PUT one after another by one client.
    let before = Instant::now();
    let mut stored = 0u64;
    for (i, body) in jsonl_objects.iter().enumerate() {
        stored += body.len() as u64;
        c.put_object()
            .bucket(&bucket)
            .key(format!("plain/{i:06}.jsonl"))
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
    }
    phases.push(Phase {
        scan: None,
        name: "plain PUTs of the JSON lines objects".into(),
        elapsed: before.elapsed(),
        stored_bytes: stored,
        objects: jsonl_objects.len(),
        peak_kib: None,
        latencies: Vec::new(),
    });
    empty(&c, &bucket).await;

    // Event times over 28 days, interleaved: Parquet by day.
    let spread = dir.path().join("spread.jsonl");
    generate_with(
        idem,
        &spread,
        events,
        &[
            "--duplicates",
            "0",
            "--malformed",
            "0",
            "--spread-days",
            "28",
        ],
    );
    let mut by_day = Vec::new();
    for (name, roll) in [
        (
            "Parquet by day, objects closed per batch",
            "roll_interval = \"0s\"",
        ),
        ("Parquet by day, objects open across batches", ""),
    ] {
        let cfg = dir.path().join("days.toml");
        let sink = s3_sink(
            &bucket,
            part_bytes,
            &format!("format = \"parquet\"\ntime_column = \"at\"\n{roll}"),
        );
        std::fs::write(&cfg, config(&spread, &sink, batch)).expect("config");
        let mut cmd = idem_run(idem, &cfg);
        cmd.env("RUST_LOG", "warn");
        let (elapsed, peak, _) = run_measured(&mut cmd);
        let objects = list(&c, &bucket, "bench/topic=").await;
        // Downloaded, for DuckDB to read each object as a file.
        let local = dir.path().join("objects");
        std::fs::remove_dir_all(&local).ok();
        std::fs::create_dir_all(&local).expect("objects dir");
        for (i, (key, _)) in objects.iter().enumerate() {
            let o = c
                .get_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            let body = o.body.collect().await.unwrap().into_bytes();
            std::fs::write(local.join(format!("{i:06}.parquet")), body).unwrap();
        }
        let db = duckdb::Connection::open_in_memory().expect("duckdb");
        let query = format!(
            "SELECT count(*), count(DISTINCT event_id), sum(amount) FROM read_parquet('{}/*.parquet')",
            local.display()
        );
        let mut scans = Vec::new();
        let mut rows = 0i64;
        for _ in 0..3 {
            let started = Instant::now();
            rows = db
                .query_row(&query, [], |r| r.get::<_, i64>(0))
                .expect("scan");
            scans.push(started.elapsed());
        }
        scans.sort();
        assert_eq!(rows as usize, events, "every event read back once");
        by_day.push(Phase {
            name: format!("{name}, {}", batch_label(batch)),
            elapsed,
            stored_bytes: objects.iter().map(|(_, s)| *s as u64).sum(),
            objects: objects.len(),
            peak_kib: Some(peak),
            latencies: Vec::new(),
            scan: Some(scans[1]),
        });
        empty(&c, &bucket).await;
    }
    c.delete_bucket().bucket(&bucket).send().await.ok();

    let base = phases.last().map(|p| p.elapsed).unwrap_or_default();
    println!();
    println!(
        "S3 load into {ENDPOINT} (moto): {events} events, {mb:.1} MB NDJSON, 8 columns, part_bytes {part_bytes}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<46} {:>8} {:>10} {:>8} {:>9} {:>8} {:>9} {:>9}",
        "", "elapsed", "events/s", "MB/s", "stored", "objects", "peak RSS", "vs PUTs"
    );
    for p in &phases {
        let secs = p.elapsed.as_secs_f64();
        println!(
            "{:<46} {:>7.2}s {:>10.0} {:>8.1} {:>6.1} MB {:>8} {:>9} {:>8.2}x",
            p.name,
            secs,
            events as f64 / secs,
            mb / secs,
            p.stored_bytes as f64 / 1e6,
            p.objects,
            p.peak_kib
                .map_or("-".to_string(), |k| format!("{} MiB", k / 1024)),
            base.as_secs_f64() / secs
        );
        if !p.latencies.is_empty() {
            println!("    {}", latency_line(&p.latencies));
        }
    }
    println!();
    println!("{events} events over 28 days, interleaved, into Parquet by day (dt=YYYY-MM-DD/)");
    println!(
        "{:<58} {:>8} {:>10} {:>8} {:>9} {:>9} {:>12}",
        "", "elapsed", "events/s", "objects", "stored", "peak RSS", "DuckDB scan"
    );
    for p in &by_day {
        let secs = p.elapsed.as_secs_f64();
        println!(
            "{:<58} {:>7.2}s {:>10.0} {:>8} {:>6.1} MB {:>9} {:>11.3}s",
            p.name,
            secs,
            events as f64 / secs,
            p.objects,
            p.stored_bytes as f64 / 1e6,
            p.peak_kib
                .map_or("-".to_string(), |k| format!("{} MiB", k / 1024)),
            p.scan.unwrap_or_default().as_secs_f64()
        );
    }
}
