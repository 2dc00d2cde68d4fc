//! Benchmark: 1,000,000 change events of one table (50% inserts, 35%
//! updates, 15% deletes), as Debezium writes them (JSON converter without
//! schemas, ~430 bytes), applied by `idem run` with `envelope = "debezium"`
//! into PostgreSQL (scripts/postgres.sh) and DuckDB, each against the
//! plain-JSON path of the same rows in the same run: flat messages
//! (~130 bytes) with a `deleted` flag and the same version column. Both
//! upsert keyed on `id` with the LSN as the version guard. The targets of
//! both paths are checked equal. Prints events/s, MB/s, peak RSS, commit
//! latencies and the ratio CDC / plain. A third path sends the same events
//! with the JSON converter's schema (`schemas.enable = true`, ~2.3 KB each)
//! and learns every column but the key and the LSN from it (`evolve =
//! "add_columns"`): what a schema costs to read and to learn from. Figures,
//! not assertions.
//!
//!     cargo bench -p idem --bench cdc_load
//!     IDEM_BENCH_EVENTS=200000 cargo bench -p idem --bench cdc_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The schema Debezium's JSON converter sends with every event of the
/// table (`schemas.enable = true`).
fn event_schema() -> String {
    let row = |side: &str| {
        format!(
            r#"{{"type":"struct","fields":[{{"type":"int64","optional":false,"field":"id"}},{{"type":"string","optional":true,"field":"name"}},{{"type":"int64","optional":true,"field":"n"}},{{"type":"double","optional":true,"field":"amount"}},{{"type":"string","optional":true,"field":"note"}}],"optional":true,"name":"dbserver1.inventory.customers.Value","field":"{side}"}}"#
        )
    };
    let source = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"version"},{"type":"string","optional":false,"field":"connector"},{"type":"string","optional":false,"field":"name"},{"type":"int64","optional":false,"field":"ts_ms"},{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,last,false,incremental"},"default":"false","field":"snapshot"},{"type":"string","optional":false,"field":"db"},{"type":"string","optional":true,"field":"sequence"},{"type":"string","optional":false,"field":"schema"},{"type":"string","optional":false,"field":"table"},{"type":"int64","optional":true,"field":"txId"},{"type":"int64","optional":true,"field":"lsn"},{"type":"int64","optional":true,"field":"xmin"}],"optional":false,"name":"io.debezium.connector.postgresql.Source","field":"source"}"#;
    let transaction = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"}"#;
    format!(
        r#"{{"type":"struct","fields":[{},{},{source},{transaction},{{"type":"string","optional":false,"field":"op"}},{{"type":"int64","optional":true,"field":"ts_ms"}}],"optional":false,"name":"dbserver1.inventory.customers.Envelope","version":2}}"#,
        row("before"),
        row("after")
    )
}

/// The same changes written three times: as Debezium events, the same with
/// the converter's schema, and as flat rows. Returns (bytes of each file,
/// rows left at the end).
fn generate_changes(
    events: usize,
    cdc: &Path,
    schemas: &Path,
    plain: &Path,
) -> (u64, u64, u64, usize) {
    let schema = event_schema();
    let mut with_schema = String::new();
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
        let event = format!(
            r#"{{"before":{before},"after":{after},"source":{source},"transaction":null,"op":"{op}","ts_ms":{ts}}}"#
        );
        writeln!(with_schema, r#"{{"schema":{schema},"payload":{event}}}"#).unwrap();
        writeln!(a, "{event}").unwrap();
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
    std::fs::write(schemas, &with_schema).unwrap();
    std::fs::write(plain, &b).unwrap();
    (
        a.len() as u64,
        with_schema.len() as u64,
        b.len() as u64,
        live.len(),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Path3 {
    /// Debezium events, columns listed.
    Debezium,
    /// With the converter's schema, columns learnt from it.
    Learnt,
    /// Flat rows with a `deleted` flag.
    Plain,
}

/// A connector reading `data` into `sink` (upsert on id, version lsn),
/// by `path`.
fn change_config(data: &Path, sink: &str, batch: usize, path: Path3) -> String {
    let (envelope, lsn, tombstone) = match path {
        Path3::Debezium => ("envelope = \"debezium\"\n", "@source/lsn", ""),
        Path3::Learnt => (
            "envelope = \"debezium\"\nevolve = \"add_columns\"\n",
            "@source/lsn",
            "",
        ),
        Path3::Plain => ("", "/lsn", "tombstone_field = \"/deleted\"\n"),
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
        if path == Path3::Learnt && !["id", "lsn"].contains(&name) {
            continue;
        }
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
    let (cdc, schemas, plain) = (
        dir.path().join("cdc.jsonl"),
        dir.path().join("schemas.jsonl"),
        dir.path().join("plain.jsonl"),
    );
    let (cdc_bytes, schema_bytes, plain_bytes, left) =
        generate_changes(events, &cdc, &schemas, &plain);
    eprintln!(
        "generated {events} changes: {:.1} MB as Debezium events, {:.1} MB with schemas, {:.1} MB flat; {left} rows at the end",
        cdc_bytes as f64 / 1e6,
        schema_bytes as f64 / 1e6,
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
        for (path, kind, data, bytes) in [
            ("debezium", Path3::Debezium, &cdc, cdc_bytes),
            ("schema", Path3::Learnt, &schemas, schema_bytes),
            ("plain", Path3::Plain, &plain, plain_bytes),
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
            std::fs::write(&cfg, change_config(data, &sink, batch, kind)).unwrap();
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
    for other in ["debezium", "schema"] {
        let diff: i64 = rt
            .block_on(client.query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM (SELECT id, name, n, amount, note, lsn FROM {schema}.customers_{other}
                             EXCEPT SELECT id, name, n, amount, note, lsn FROM {schema}.customers_plain) a)
                          + (SELECT count(*) FROM (SELECT id, name, n, amount, note, lsn FROM {schema}.customers_plain
                             EXCEPT SELECT id, name, n, amount, note, lsn FROM {schema}.customers_{other}) b)"
                ),
                &[],
            ))
            .unwrap()
            .get(0);
        assert_eq!(
            diff, 0,
            "the PostgreSQL targets of {other} and plain differ"
        );
    }
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
    for three in runs.chunks(3) {
        let plain = three[2].elapsed.as_secs_f64();
        println!(
            "{}: throughput against plain rows: Debezium events {:.2}x, with schemas and learnt columns {:.2}x",
            three[0].label.split(',').next().unwrap_or_default(),
            plain / three[0].elapsed.as_secs_f64(),
            plain / three[1].elapsed.as_secs_f64()
        );
    }
}
