//! HTTP sink: messages delivered per second to a receiver on 127.0.0.1
//! (the tests' receiver: applies each idempotency key once, no faults),
//! against a baseline in the same run: a plain reqwest client POSTing the
//! same events with the same keys and the same number of requests in
//! flight, no positions and no dedup store.
//!
//! `cargo bench -p idem --bench http_load`; `IDEM_BENCH_EVENTS` (default
//! 100,000) events, `IDEM_BENCH_CONCURRENCY` (default 8) requests in flight.
//! The Redis run needs scripts/redis.sh.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use futures_util::StreamExt;
use idem_testkit::receiver::{Faults, Receiver};
use std::time::Instant;

fn baseline(url: &str, lines: &[String], concurrency: usize) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let started = Instant::now();
        futures_util::stream::iter(lines.iter().map(|line| {
            let doc: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = doc["event_id"].as_str().unwrap().to_string();
            let client = client.clone();
            let body = line.clone();
            async move {
                let r = client
                    .post(url)
                    .header("Idempotency-Key", key)
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }))
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
        started.elapsed().as_secs_f64()
    })
}

fn main() {
    let idem = env!("CARGO_BIN_EXE_idem");
    let events = common::env_usize("IDEM_BENCH_EVENTS", 100_000);
    let concurrency = common::env_usize("IDEM_BENCH_CONCURRENCY", 8);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("events.jsonl");
    let bytes = common::generate(idem, &data, events);
    let lines: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    println!(
        "http_load: {events} events ({:.1} MB), {concurrency} requests in flight, receiver on 127.0.0.1 (axum, keys applied once)",
        bytes as f64 / 1e6
    );

    let r = Receiver::start(Faults::none(), None);
    let secs = baseline(&r.url, &lines, concurrency);
    assert_eq!(r.log().effects.len(), events);
    let base_rate = events as f64 / secs;
    println!(
        "  baseline: plain reqwest POSTs            {secs:>6.2} s  {base_rate:>9.0} msg/s  1.00x"
    );

    let embedded = format!(
        "store = \"embedded\"\npath = \"{}\"",
        dir.path().join("ids.redb").display()
    );
    let stores = [
        ("embedded", embedded),
        (
            "redis",
            "store = \"redis\"\nurl = \"redis://127.0.0.1:6379\"".to_string(),
        ),
    ];
    for (name, store) in stores {
        let r = Receiver::start(Faults::none(), None);
        let sink = format!(
            "type = \"http\"\nurl = \"{}\"\nconcurrency = {concurrency}",
            r.url
        );
        let mut cfg = common::config(&data, &sink, 1000);
        cfg.push_str(&format!(
            "[connectors.bench.dedup]\nid = \"/event_id\"\nnamespace = \"bench-{}\"\n{store}\n",
            std::process::id()
        ));
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let (elapsed, peak_kib, latencies) = common::run_idem(idem, &path);
        assert_eq!(r.log().effects.len(), events, "{name}: effects");
        let secs = elapsed.as_secs_f64();
        let rate = events as f64 / secs;
        println!(
            "  idem -> http, {name:<8} dedup store       {secs:>6.2} s  {rate:>9.0} msg/s  {:.2}x  peak RSS {} MiB",
            rate / base_rate,
            peak_kib / 1024
        );
        println!("    {}", common::latency_line(&latencies));
    }
}
