//! Benchmark: the same 1,000,000 generated events (8 fields) as JSON and
//! as Avro (`config/examples/schemas/events.avsc`), each in a 6-partition
//! topic on the local broker (scripts/kafka.sh, written by `idem produce`
//! with one seed), loaded by `idem run` (append, exactly-once, one runner,
//! to the topic's end) into PostgreSQL and into DuckDB: the JSON topic
//! with the 8 columns listed, the Avro one with its columns taken from the
//! schema. Each Avro table must equal its JSON twin (count and sums).
//! Also decodes the same values in this process, JSON parse against Avro
//! decode, to split the decode's cost from the load's.
//!
//!     cargo bench -p idem --bench avro_load
//!     IDEM_BENCH_EVENTS=200000 cargo bench -p idem --bench avro_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem_core::mapping::avro::AvroSchema;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BROKERS: &str = "127.0.0.1:9092";
const PARTITIONS: i32 = 6;

fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/schemas/events.avsc")
}

/// `idem produce` the events into `topic`; returns the bytes of its values.
fn produce(idem: &str, topic: &str, events: usize, avro: bool) -> u64 {
    let mut cmd = Command::new(idem);
    cmd.args(["produce", topic, "--brokers", BROKERS])
        .args(["--duplicates", "0", "--malformed", "0", "--seed", "7"])
        .args([
            "--partitions",
            &PARTITIONS.to_string(),
            "-n",
            &events.to_string(),
        ]);
    if avro {
        cmd.args(["--format", "avro", "--schema-file"])
            .arg(schema_path());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "idem produce: {}; is the broker up? bash scripts/kafka.sh",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    read_topic(BROKERS, topic, PARTITIONS, events).1
}

fn config(topic: &str, sink: &str, batch: usize, avro: bool) -> String {
    let source = format!(
        "type = \"kafka\"\nbrokers = \"{BROKERS}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{topic}_load\"\nstop_at_end = true"
    );
    let config = config_with_source(&source, sink, batch);
    if !avro {
        return config;
    }
    // The Avro connector lists no columns: the schema gives them.
    let head = config
        .split("[[connectors.bench.columns]]")
        .next()
        .unwrap()
        .to_string();
    head.replace(
        "[connectors.bench]\n",
        &format!(
            "[connectors.bench]\nformat = \"avro\"\nschema_file = \"{}\"\n",
            schema_path().display()
        ),
    )
}

/// Decode each value `rounds` times in this process: JSON into a document
/// against Avro into the same document.
fn decode_only(idem: &str, dir: &Path, events: usize) -> (Duration, Duration, u64, u64) {
    let data = dir.join("events.jsonl");
    let out = Command::new(idem)
        .args([
            "generate",
            "--duplicates",
            "0",
            "--malformed",
            "0",
            "--seed",
            "7",
        ])
        .args(["--count", &events.to_string(), "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&data).unwrap();
    let json: Vec<&[u8]> = text.lines().map(str::as_bytes).collect();
    let schema = AvroSchema::parse(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    let avro: Vec<Vec<u8>> = json
        .iter()
        .map(|l| schema.encode(&serde_json::from_slice(l).unwrap()).unwrap())
        .collect();
    let started = Instant::now();
    let mut fields = 0;
    for l in &json {
        let doc: serde_json::Value = serde_json::from_slice(l).unwrap();
        fields += doc.as_object().map_or(0, serde_json::Map::len);
    }
    let json_time = started.elapsed();
    let started = Instant::now();
    for v in &avro {
        fields -= schema
            .decode(v)
            .unwrap()
            .as_object()
            .map_or(0, serde_json::Map::len);
    }
    let avro_time = started.elapsed();
    assert_eq!(fields, 0, "every value decodes to as many fields");
    (
        json_time,
        avro_time,
        json.iter().map(|l| l.len() as u64).sum(),
        avro.iter().map(|v| v.len() as u64).sum(),
    )
}

fn main() {
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(50_000);
    let idem = env!("CARGO_BIN_EXE_idem");
    let run = run_id();
    let dir = tempfile::tempdir().expect("tempdir");

    let (json_decode, avro_decode, json_src, avro_src) = decode_only(idem, dir.path(), events);
    let json_topic = format!("bench_json_{run}");
    let avro_topic = format!("bench_avro_{run}");
    let json_bytes = produce(idem, &json_topic, events, false);
    let avro_bytes = produce(idem, &avro_topic, events, true);

    let schema = format!("abench_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(conn);
    let pg_sink = |table: &str| {
        format!(
            "type = \"postgres\"\nsslmode = \"disable\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"{table}\"\noffsets_table = \"offsets_{table}\"",
            pg_url()
        )
    };
    let duck_sink = |name: &str| {
        format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"",
            dir.path().join(format!("{name}.duckdb")).display()
        )
    };
    // (label, elapsed, peak KiB, the table's count and sums)
    let mut results: Vec<(String, Duration, u64, String)> = Vec::new();
    for (target, avro) in [("pg", false), ("pg", true), ("duck", false), ("duck", true)] {
        let (topic, name) = if avro {
            (&avro_topic, format!("{target}_avro"))
        } else {
            (&json_topic, format!("{target}_json"))
        };
        let sink = if target == "pg" {
            pg_sink(&name)
        } else {
            duck_sink(&name)
        };
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, config(topic, &sink, batch, avro)).unwrap();
        let (elapsed, peak, _) = run_idem(idem, &cfg);
        let sums = "count(*) || ' ' || sum(user_id) || ' ' || round(sum(amount)::numeric, 2) || ' ' || count(note)";
        let check = if target == "pg" {
            rt.block_on(
                client.query_one(&format!("SELECT ({sums})::text FROM {schema}.{name}"), &[]),
            )
            .unwrap()
            .get::<_, String>(0)
        } else {
            let db = duckdb::Connection::open(dir.path().join(format!("{name}.duckdb"))).unwrap();
            db.query_row(&format!("SELECT ({sums})::VARCHAR FROM events"), [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert!(check.starts_with(&format!("{events} ")), "{name}: {check}");
        let label = format!(
            "{} -> {}",
            if avro {
                "Avro, columns from schema"
            } else {
                "JSON, 8 columns listed"
            },
            if target == "pg" {
                "PostgreSQL"
            } else {
                "DuckDB"
            }
        );
        results.push((label, elapsed, peak, check));
    }
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .unwrap();
    for pair in results.chunks(2) {
        assert_eq!(pair[0].3, pair[1].3, "the Avro table equals the JSON one");
    }

    println!();
    println!(
        "Avro against JSON: {events} events, 8 fields, {PARTITIONS} partitions, append, exactly-once, {}; {} cores",
        batch_label(batch),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "values in the topic: JSON {:.1} MB, Avro {:.1} MB ({:.2}x)",
        json_bytes as f64 / 1e6,
        avro_bytes as f64 / 1e6,
        avro_bytes as f64 / json_bytes as f64
    );
    println!(
        "decode only, in process: JSON {:.2} s ({:.0}/s, {:.1} MB), Avro {:.2} s ({:.0}/s, {:.1} MB): Avro at {:.2}x JSON's time",
        json_decode.as_secs_f64(),
        events as f64 / json_decode.as_secs_f64(),
        json_src as f64 / 1e6,
        avro_decode.as_secs_f64(),
        events as f64 / avro_decode.as_secs_f64(),
        avro_src as f64 / 1e6,
        avro_decode.as_secs_f64() / json_decode.as_secs_f64()
    );
    println!(
        "{:<42} {:>9} {:>11} {:>9} {:>10} {:>10}",
        "", "elapsed", "events/s", "MB/s", "vs JSON", "peak RSS"
    );
    for pair in results.chunks(2) {
        let json = pair[0].1.as_secs_f64();
        for (i, (label, elapsed, peak, _)) in pair.iter().enumerate() {
            let secs = elapsed.as_secs_f64();
            let bytes = if i == 0 { json_bytes } else { avro_bytes };
            println!(
                "{label:<42} {secs:>8.2}s {:>11.0} {:>9.1} {:>9.2}x {:>6} MiB",
                events as f64 / secs,
                bytes as f64 / 1e6 / secs,
                json / secs,
                peak / 1024
            );
        }
    }
}
