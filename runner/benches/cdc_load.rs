//! Benchmark: 1,000,000 change events of one table (50% inserts, 35%
//! updates, 15% deletes), as Debezium writes them (JSON converter without
//! schemas, ~430 bytes), applied by `idem run` with `envelope = "debezium"`
//! into PostgreSQL (scripts/postgres.sh) and DuckDB, each against the
//! plain-JSON path of the same rows in the same run: flat messages
//! (~130 bytes) with a `deleted` flag and the same version column. Both
//! upsert keyed on `id` with the LSN as the version guard. The targets of
//! both paths are checked equal. Prints events/s, MB/s, peak RSS, commit
//! latencies and the ratio CDC / plain. Figures, not assertions.
//!
//!     cargo bench -p idem --bench cdc_load
//!     IDEM_BENCH_EVENTS=200000 cargo bench -p idem --bench cdc_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

fn pg_url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://idem:idem@127.0.0.1:5432/idem_test".into())
}

/// The same changes written twice: as Debezium events and as flat rows.
/// Returns (bytes of each file, rows left at the end).
fn generate_changes(events: usize, cdc: &Path, plain: &Path) -> (u64, u64, usize) {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut live: Vec<i64> = Vec::new();
    let mut next_id = 1_i64;
    let (mut a, mut b) = (String::new(), String::new());
    for i in 0..events {
        let lsn = 24_000_000 + i as i64 * 56;
        let ts = 1_767_225_600_000_i64 + i as i64;
        let roll = next() % 100;
        let (op, id) = if live.is_empty() || roll < 50 {
            live.push(next_id);
            next_id += 1;
            ("c", next_id - 1)
        } else if roll < 85 {
            ("u", live[(next() % live.len() as u64) as usize])
        } else {
            let at = (next() % live.len() as u64) as usize;
            ("d", live.swap_remove(at))
        };
        let row = format!(
            r#"{{"id":{id},"name":"customer {id} rev {i}","n":{i},"amount":{amount},"note":"a note of forty characters, give or take"}}"#,
            amount = i as f64 * 0.25
        );
        let source = format!(
            r#"{{"version":"3.6.1.Final","connector":"postgresql","name":"dbserver1","ts_ms":{ts},"snapshot":"false","db":"shop","sequence":"[null,\"{lsn}\"]","schema":"inventory","table":"customers","txId":{tx},"lsn":{lsn},"xmin":null}}"#,
            tx = 700 + i / 3
        );
        let (before, after, deleted) = if op == "d" {
            (
                format!(r#"{{"id":{id},"name":null,"n":null,"amount":null,"note":null}}"#),
                "null".to_string(),
                true,
            )
        } else {
            ("null".to_string(), row.clone(), false)
        };
        writeln!(
            a,
            r#"{{"before":{before},"after":{after},"source":{source},"transaction":null,"op":"{op}","ts_ms":{ts}}}"#
        )
        .unwrap();
        let flat = if deleted {
            format!(r#"{{"id":{id},"lsn":{lsn},"deleted":true}}"#)
        } else {
            format!(
                "{},\"lsn\":{lsn},\"deleted\":false}}",
                row.strip_suffix('}').unwrap()
            )
        };
        writeln!(b, "{flat}").unwrap();
    }
    std::fs::write(cdc, &a).unwrap();
    std::fs::write(plain, &b).unwrap();
    (a.len() as u64, b.len() as u64, live.len())
}

/// A connector reading `data` into `sink` (upsert on id, version lsn);
/// `cdc`: through the Debezium envelope, else flat rows with a flag.
fn change_config(data: &Path, sink: &str, batch: usize, cdc: bool) -> String {
    let (envelope, lsn, tombstone) = if cdc {
        ("envelope = \"debezium\"\n", "@source/lsn", "")
    } else {
        ("", "/lsn", "tombstone_field = \"/deleted\"\n")
    };
    let mut c = format!(
        r#"
[runner]
progress_interval = "1h"
[connectors.bench]
{envelope}{tombstone}[connectors.bench.source]
type = "file"
path = "{data}"
[connectors.bench.sink]
{sink}
mode = "upsert"
key = ["id"]
version = "lsn"
delete_on_tombstone = true
[connectors.bench.batch]
max_records = {batch}
max_bytes = 268435456
linger = "1s"
"#,
        data = data.display()
    );
    for (name, ty, pointer) in [
        ("id", "bigint", "/id"),
        ("name", "text", "/name"),
        ("n", "bigint", "/n"),
        ("amount", "double", "/amount"),
        ("note", "text", "/note"),
        ("lsn", "bigint", lsn),
    ] {
        write!(
            c,
            "[[connectors.bench.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\npointer = \"{pointer}\"\n"
        )
        .unwrap();
    }
    c
}

struct Run {
    label: String,
    elapsed: Duration,
    peak_kib: u64,
    latencies: Vec<f64>,
    mb: f64,
}

fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = env_usize("IDEM_BENCH_BATCH", 10_000);
    let idem = env!("CARGO_BIN_EXE_idem");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cdc, plain) = (dir.path().join("cdc.jsonl"), dir.path().join("plain.jsonl"));
    let (cdc_bytes, plain_bytes, left) = generate_changes(events, &cdc, &plain);
    eprintln!(
        "generated {events} changes: {:.1} MB as Debezium events, {:.1} MB flat; {left} rows at the end",
        cdc_bytes as f64 / 1e6,
        plain_bytes as f64 / 1e6
    );

    let schema = format!("bench_cdc_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(async {
            let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        })
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {}: {e} (start it: bash scripts/postgres.sh)",
                pg_url()
            )
        });
    rt.block_on(client.batch_execute(&format!("CREATE SCHEMA {schema}")))
        .unwrap();

    let mut runs: Vec<Run> = Vec::new();
    let mut sums = Vec::new();
    for (target, is_pg) in [("PostgreSQL", true), ("DuckDB", false)] {
        for (path, data, bytes) in [
            ("debezium", &cdc, cdc_bytes),
            ("plain", &plain, plain_bytes),
        ] {
            let table = format!("customers_{path}");
            let duck = dir.path().join(format!("{path}.duckdb"));
            let sink = if is_pg {
                format!(
                    "type = \"postgres\"\nsslmode = \"disable\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"{table}\"",
                    pg_url()
                )
            } else {
                format!(
                    "type = \"duckdb\"\npath = \"{}\"\ntable = \"{table}\"",
                    duck.display()
                )
            };
            let cfg = dir.path().join(format!("{path}.toml"));
            std::fs::write(&cfg, change_config(data, &sink, batch, path == "debezium")).unwrap();
            let (elapsed, peak_kib, latencies) = run_idem(idem, &cfg);
            let check = format!("SELECT count(*), sum(n)::bigint, sum(lsn)::bigint FROM {table}");
            let got: (i64, i64, i64) = if is_pg {
                let r = rt
                    .block_on(
                        client.query_one(&check.replace("FROM ", &format!("FROM {schema}.")), &[]),
                    )
                    .unwrap();
                (r.get(0), r.get(1), r.get(2))
            } else {
                duckdb::Connection::open(&duck)
                    .unwrap()
                    .query_row(&check, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap()
            };
            assert_eq!(got.0, left as i64, "{target} {path}: rows left");
            sums.push(got);
            runs.push(Run {
                label: format!("{target}, {path}"),
                elapsed,
                peak_kib,
                latencies,
                mb: bytes as f64 / 1e6,
            });
        }
    }
    assert!(
        sums.windows(2).all(|w| w[0] == w[1]),
        "the targets differ: {sums:?}"
    );
    let diff: i64 = rt
        .block_on(client.query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT id, name, n, amount, note, lsn FROM {schema}.customers_debezium
                         EXCEPT SELECT id, name, n, amount, note, lsn FROM {schema}.customers_plain) a)
                      + (SELECT count(*) FROM (SELECT id, name, n, amount, note, lsn FROM {schema}.customers_plain
                         EXCEPT SELECT id, name, n, amount, note, lsn FROM {schema}.customers_debezium) b)"
            ),
            &[],
        ))
        .unwrap()
        .get(0);
    assert_eq!(diff, 0, "the PostgreSQL targets of both paths differ");
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .unwrap();

    println!();
    println!(
        "Change events: {events} (50% inserts, 35% updates, 15% deletes), upsert on id with the LSN as version, batch {batch}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<24} {:>9} {:>11} {:>8} {:>10}   commit latency",
        "", "elapsed", "events/s", "MB/s", "peak RSS"
    );
    for r in &runs {
        println!(
            "{:<24} {:>8.2}s {:>11.0} {:>8.1} {:>6} MiB   {}",
            r.label,
            r.elapsed.as_secs_f64(),
            events as f64 / r.elapsed.as_secs_f64(),
            r.mb / r.elapsed.as_secs_f64(),
            r.peak_kib / 1024,
            latency_line(&r.latencies)
        );
    }
    for pair in runs.chunks(2) {
        println!(
            "{}: Debezium events / plain rows throughput: {:.2}x",
            pair[0].label.split(',').next().unwrap_or_default(),
            pair[1].elapsed.as_secs_f64() / pair[0].elapsed.as_secs_f64()
        );
    }
}
