//! Benchmark: 1,000,000 generated events (~200 bytes, 8 columns) from a file
//! into PostgreSQL (scripts/postgres.sh), in one run:
//!   (a) `idem run`, upsert, exactly-once
//!   (b) `idem run`, append, exactly-once
//!   (c1, c2) the same rows, parsed beforehand, through one raw binary `COPY`
//!       into a table like (a)'s (primary key) and one like (b)'s (none):
//!       the physical limit of this machine for each shape
//!   (c3) with production data, (c2) with its rows sorted by the key, as
//!       Idem sends new keys
//!   (d) row-by-row `INSERT .. ON CONFLICT DO NOTHING`, one autocommit
//!       statement per event, what a hand-written idempotent consumer does
//!       (a sample of IDEM_BENCH_ROWWISE events; its rate is what counts)
//! Idem connects without TLS here, as the raw COPY does. Prints events/s,
//! MB/s, ratios to the COPY of the same shape, commit latencies, peak RSS.
//!
//! With `IDEM_BENCH_IDS=random` the events are shaped like production
//! (random 20-hex ids, 5% re-emitted copies at later offsets, 0.1%
//! malformed lines) and (b) is `mode = "dedup"` on `event_id` instead of
//! append; both COPYs then load the first row of each id (the bad lines
//! skipped) into tables like (a)'s and (b)'s, both keyed on `event_id`.
//!
//!     cargo bench -p idem --bench postgres_load
//!     IDEM_BENCH_EVENTS=200000 cargo bench -p idem --bench postgres_load
//!     IDEM_BENCH_IDS=random cargo bench -p idem --bench postgres_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pg::{parse, raw_copy, Event};
use common::*;
use std::time::{Duration, Instant};

fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(50_000);
    let rowwise = env_usize("IDEM_BENCH_ROWWISE", 20_000).min(events);
    let idem = env!("CARGO_BIN_EXE_idem");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("events.jsonl");
    let (production, bytes) = generate_as_asked(idem, &data, events);
    let mb = bytes as f64 / 1e6;
    let schema = format!("bench_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = common::pg::connect(&rt, &schema);

    // Rows parsed beforehand, for the raw COPY baselines and (d): with
    // production data, the first row of each id (what every variant keeps).
    let text = std::fs::read_to_string(&data).unwrap();
    let mut seen = std::collections::HashSet::new();
    let rows: Vec<Event> = text
        .lines()
        .filter_map(|l| {
            let e = parse(l);
            assert!(production || e.is_some(), "a well-formed event: {l}");
            e
        })
        .filter(|e| seen.insert(e.event_id.clone()))
        .collect();
    drop((text, seen));
    let expected = rows.len() as i64;
    let second = if production { "dedup" } else { "append" };

    // The server's timing drifts between loads (checkpoints, autovacuum of
    // the previous round's tables), so every variant runs `rounds` times,
    // interleaved, each into fresh tables; the median is reported.
    let rounds = env_usize("IDEM_BENCH_ROUNDS", 3).max(1);
    let labels = [
        "(a) idem upsert".to_string(),
        format!("(b) idem {second}"),
        "(c1) raw binary COPY, upsert's table".to_string(),
        format!("(c2) raw binary COPY, {second}'s table"),
    ];
    // (c3), with production data: the keyed COPY with its rows sorted by
    // the key, as Idem sends new keys (a unique index takes them faster).
    let sorted: Vec<Event> = if production {
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        sorted
    } else {
        Vec::new()
    };
    let mut sorted_times: Vec<Duration> = Vec::new();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); labels.len()];
    let mut peaks = [0u64; 2];
    let mut latencies: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut audits = Vec::new();
    for round in 0..rounds {
        for (i, mode) in ["upsert", second].into_iter().enumerate() {
            let table = format!("events_{mode}_{round}");
            let keys = if mode == "append" {
                ""
            } else {
                "key = [\"event_id\"]"
            };
            let sink = format!(
                "type = \"postgres\"\nsslmode = \"disable\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"{table}\"\noffsets_table = \"offsets_{mode}_{round}\"\nmode = \"{mode}\"\n{keys}",
                pg_url()
            );
            let cfg = dir.path().join(format!("{mode}.toml"));
            std::fs::write(&cfg, config(&data, &sink, batch)).unwrap();
            let (elapsed, peak, mut lat) = run_idem(idem, &cfg);
            let n: i64 = rt
                .block_on(client.query_one(&format!("SELECT count(*) FROM {schema}.{table}"), &[]))
                .unwrap()
                .get(0);
            assert_eq!(n, expected, "{} loaded every event", labels[i]);
            times[i].push(elapsed);
            peaks[i] = peaks[i].max(peak);
            latencies[i].append(&mut lat);
            if round + 1 == rounds {
                // The audit of one load of each mode: its time and memory.
                audits.push((labels[i].clone(), verify_idem(idem, &cfg)));
            }
        }
        // Each Idem mode against a COPY into a table of its own shape: the
        // upsert table has a primary key to maintain, the append table none.
        for (i, like) in [(2, "upsert"), (3, second)] {
            let table = format!("{schema}.copy_{like}_{round}");
            rt.block_on(client.batch_execute(&format!(
                "CREATE TABLE {table} (LIKE {schema}.events_{like}_0 INCLUDING ALL)"
            )))
            .unwrap();
            times[i].push(rt.block_on(raw_copy(&client, &table, &rows)));
        }
        if production {
            let table = format!("{schema}.copy_sorted_{round}");
            rt.block_on(client.batch_execute(&format!(
                "CREATE TABLE {table} (LIKE {schema}.events_{second}_0 INCLUDING ALL)"
            )))
            .unwrap();
            sorted_times.push(rt.block_on(raw_copy(&client, &table, &sorted)));
        }
    }
    for (i, lat) in latencies.iter_mut().enumerate() {
        lat.sort_by(f64::total_cmp);
        eprintln!("{}: {}", labels[i], latency_line(lat));
    }
    let mut results = Vec::new();
    let mut baselines = Vec::new();
    let mut b_median = Duration::ZERO;
    for (i, mut t) in times.into_iter().enumerate() {
        t.sort();
        let spread = format!(
            "{:.2}-{:.2}s",
            t[0].as_secs_f64(),
            t[t.len() - 1].as_secs_f64()
        );
        let median = t[t.len() / 2];
        if i == 1 {
            b_median = median;
        }
        if i >= 2 {
            baselines.push(events as f64 / median.as_secs_f64());
        }
        let peak = (i < 2).then(|| peaks[i]);
        let base = i % 2;
        results.push((labels[i].clone(), events, median, peak, base, spread));
    }
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE {schema}.events_rowwise (LIKE {schema}.events_upsert_0 INCLUDING ALL)"
    )))
    .unwrap();

    // (d) one autocommit INSERT .. ON CONFLICT per event.
    let rowwise_time = rt.block_on(async {
        let stmt = client
            .prepare(&format!(
                "INSERT INTO {schema}.events_rowwise (event_id, user_id, kind, amount, currency, ok, at, note, _idem_partition, _idem_offset)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'bench', $9) ON CONFLICT (event_id) DO NOTHING"
            ))
            .await
            .unwrap();
        let started = Instant::now();
        for (i, e) in rows.iter().take(rowwise).enumerate() {
            let offset = i as i64;
            client
                .execute(
                    &stmt,
                    &[&e.event_id, &e.user_id, &e.kind, &e.amount, &e.currency, &e.ok, &e.at, &e.note, &offset],
                )
                .await
                .unwrap();
        }
        started.elapsed()
    });
    results.push((
        format!("(d) row-by-row INSERT ON CONFLICT ({rowwise} events)"),
        rowwise,
        rowwise_time,
        None,
        0,
        String::from("1 run"),
    ));
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .unwrap();

    println!();
    println!(
        "PostgreSQL load: {events} events, {mb:.1} MB NDJSON, 8 columns{}; {}, {} cores; median of {rounds} runs",
        if production {
            format!(", random ids, 5% copies, 0.1% malformed: {expected} rows")
        } else {
            String::new()
        },
        batch_label(batch),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<48} {:>9} {:>13} {:>11} {:>8} {:>8} {:>10}",
        "", "median", "range", "events/s", "MB/s", "vs COPY", "peak RSS"
    );
    // Ratios are to the COPY into a table of the same shape: (a) and (d)
    // to (c1), (b) to (c2) (keyed too when it deduplicates by the key).
    for (label, n, elapsed, peak, base, spread) in results {
        let rate = n as f64 / elapsed.as_secs_f64();
        let mbps = mb * (n as f64 / events as f64) / elapsed.as_secs_f64();
        println!(
            "{label:<48} {:>8.2}s {spread:>13} {rate:>11.0} {mbps:>8.1} {:>7.2}x {:>10}",
            elapsed.as_secs_f64(),
            rate / baselines[base],
            peak.map_or("-".into(), |kib| format!("{} MiB", kib / 1024)),
        );
    }
    if !sorted_times.is_empty() {
        sorted_times.sort();
        let median = sorted_times[sorted_times.len() / 2];
        println!(
            "(c3) raw binary COPY in key order, {second}'s table: median {:.2}s ({:.0} events/s); (b) runs at {:.2}x of it",
            median.as_secs_f64(),
            events as f64 / median.as_secs_f64(),
            median.as_secs_f64() / b_median.as_secs_f64()
        );
    }
    for (label, audit) in audits {
        println!("{}", verify_line(&label, audit));
    }
}
