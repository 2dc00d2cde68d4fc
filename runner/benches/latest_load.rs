//! Benchmark: the most common production shape, one row per entity holding
//! its latest event, with re-emitted copies of events dropped by event id.
//! 1,000,000 generated events (random 20-hex-digit event ids, 5% exact
//! copies of recent events at later offsets, 0.1% malformed lines; about
//! 10 events per `user_id`) upserted on `user_id` with
//! `[dedup] id = "/event_id"`, into DuckDB and into PostgreSQL, each three
//! ways in one run:
//!   (a) `idem run` with `store = "sink"`: the ids in the sink's own table,
//!       checked in each batch's transaction
//!   (b) `idem run` with a store of its own (DuckDB: the embedded file;
//!       PostgreSQL: `store = "postgres"`), a round trip before each commit
//!   (c) the best hand-written load of the same result in the same engine:
//!       DuckDB SQL over `read_json` (first row per event id, then the last
//!       per user, by line); for PostgreSQL the rows parsed beforehand, one
//!       binary `COPY` into a staging table, then one `INSERT .. SELECT
//!       DISTINCT ON` (event id, then user) `.. ON CONFLICT`
//!   (d) (c) keeping the event ids as (a) does, in the same transaction
//!       (without them a copy arriving later would win): DuckDB in a
//!       table like Idem's, PostgreSQL in one with a primary key (bytewise
//!       ids, `COLLATE "C"`, as Idem's)
//! Every variant must leave the same rows (checked), and runs
//! `IDEM_BENCH_ROUNDS` (3) times. Prints the median elapsed, events/s, the
//! ratios of the medians to (c) and (d), and the highest peak RSS. Figures,
//! not assertions.
//!
//!     cargo bench -p idem --bench latest_load
//!     IDEM_BENCH_SINK=duckdb IDEM_BENCH_EVENTS=200000 IDEM_BENCH_ROUNDS=1 cargo bench -p idem --bench latest_load
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pg::{parse, raw_copy};
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const READ_JSON_COLUMNS: &str = "{event_id: 'VARCHAR', user_id: 'BIGINT', kind: 'VARCHAR', amount: 'DOUBLE', currency: 'VARCHAR', ok: 'BOOLEAN', \"at\": 'TIMESTAMPTZ', note: 'VARCHAR'}";

/// The columns both sides write, in order.
const COLS: &str = "event_id, user_id, kind, amount, currency, ok, \"at\", note";

/// One line of the results table.
struct Line {
    label: String,
    elapsed: Duration,
    peak_kib: Option<u64>,
}

/// Child mode: DuckDB's own load of the same result into a table made
/// with `ddl`; with `keep_ids`, the event ids kept too, in a table like
/// Idem's, in the same transaction.
fn duckdb_baseline(db: &str, data: &str, ddl_file: &str, keep_ids: bool) {
    let ddl = std::fs::read_to_string(ddl_file).expect("ddl");
    let conn = duckdb::Connection::open(db).expect("open");
    conn.execute_batch(&ddl).expect("create table");
    // `row_number() OVER ()` numbers the lines in file order (DuckDB keeps
    // insertion order); the first copy of each event id, then the last
    // event per user.
    let firsts = format!(
        "WITH src AS (
             SELECT *, row_number() OVER () AS line
             FROM read_json('{data}', format = 'newline_delimited', columns = {READ_JSON_COLUMNS}, ignore_errors = true)
             WHERE event_id IS NOT NULL AND amount IS NOT NULL AND \"at\" IS NOT NULL)
         SELECT * FROM src QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY line) = 1"
    );
    let latest = "QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY line DESC) = 1";
    let sql = if keep_ids {
        format!(
            "BEGIN;
             CREATE TABLE seen (id VARCHAR NOT NULL, seen_at TIMESTAMP WITH TIME ZONE NOT NULL);
             CREATE TEMP TABLE firsts AS {firsts};
             INSERT INTO seen SELECT event_id, now() FROM firsts;
             INSERT INTO events SELECT {COLS}, 'bulk', line FROM firsts {latest};
             COMMIT"
        )
    } else {
        format!(
            "INSERT INTO events WITH firsts AS ({firsts}) SELECT {COLS}, 'bulk', line FROM firsts {latest}"
        )
    };
    conn.execute_batch(&sql).expect("bulk load");
}

/// Rows of `a` and `b` (DuckDB files, table `events`) that differ.
fn duckdb_differences(a: &Path, b: &Path) -> i64 {
    let conn = duckdb::Connection::open_in_memory().expect("memory");
    conn.execute_batch(&format!(
        "ATTACH '{}' AS a (READ_ONLY); ATTACH '{}' AS b (READ_ONLY)",
        a.display(),
        b.display()
    ))
    .expect("attach");
    conn.query_row(
        "SELECT count(*) FROM a.events x FULL JOIN b.events y USING (user_id)
         WHERE x.event_id IS DISTINCT FROM y.event_id OR x.amount IS DISTINCT FROM y.amount",
        [],
        |r| r.get(0),
    )
    .expect("compare")
}

fn idem_config(data: &Path, sink: &str, dedup: &str, batch: usize) -> String {
    format!(
        "{}\n[connectors.bench.dedup]\nid = \"/event_id\"\n{dedup}\n",
        config(data, sink, batch)
    )
}

fn run_duckdb(idem: &str, dir: &Path, data: &Path, batch: usize) -> (Vec<Line>, i64) {
    let mut lines = Vec::new();
    let mut dbs = Vec::new();
    for (label, dedup) in [
        (
            "(a) idem, ids in the sink (store = \"sink\")",
            "store = \"sink\"".to_string(),
        ),
        (
            "(b) idem, embedded dedup store",
            format!(
                "store = \"embedded\"\npath = \"{}\"",
                dir.join("ids.redb").display()
            ),
        ),
    ] {
        let db = dir.join(format!("idem{}.duckdb", dbs.len()));
        let sink = format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"\nmode = \"upsert\"\nkey = [\"user_id\"]",
            db.display()
        );
        let cfg = dir.join("duck.toml");
        std::fs::write(&cfg, idem_config(data, &sink, &dedup, batch)).expect("config");
        let (elapsed, peak, latencies) = run_idem(idem, &cfg);
        eprintln!("duckdb {label}: {}", latency_line(&latencies));
        lines.push(Line {
            label: label.to_string(),
            elapsed,
            peak_kib: Some(peak),
        });
        dbs.push(db);
    }
    let ddl: String = duckdb::Connection::open(&dbs[0])
        .expect("open")
        .query_row(
            "SELECT sql FROM duckdb_tables() WHERE table_name = 'events'",
            [],
            |r| r.get(0),
        )
        .expect("ddl");
    let ddl_file = dir.join("ddl.sql");
    std::fs::write(&ddl_file, ddl).expect("ddl file");
    // DuckDB's own load in a child process of its own (its peak RSS apart
    // from ours), into `db`; `keep_ids` keeps the event ids too.
    let sql_load = |label: &str, db: &Path, keep_ids: bool| {
        let mut child = Command::new(std::env::current_exe().expect("self"));
        child
            .arg("--duckdb-baseline")
            .arg(db)
            .arg(data)
            .arg(&ddl_file);
        if keep_ids {
            child.arg("keep-ids");
        }
        let (elapsed, peak, _) = run_measured(&mut child);
        Line {
            label: label.into(),
            elapsed,
            peak_kib: Some(peak),
        }
    };
    let base = dir.join("baseline.duckdb");
    lines.push(sql_load(
        "(c) DuckDB SQL: read_json, QUALIFY by id then user",
        &base,
        false,
    ));
    let with_ids = dir.join("baseline_ids.duckdb");
    lines.push(sql_load(
        "(d) as (c), keeping the event ids",
        &with_ids,
        true,
    ));
    dbs.push(with_ids);
    for db in &dbs {
        assert_eq!(
            duckdb_differences(db, &base),
            0,
            "{} holds other rows than the SQL",
            db.display()
        );
    }
    let rows = duckdb::Connection::open(&base)
        .expect("open")
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count");
    (lines, rows)
}

/// The statement both PostgreSQL hand-written loads end with: the last
/// event per user of `from` into `target`, replacing an older row.
fn latest_per_user(target: &str, from: &str) -> String {
    format!(
        "INSERT INTO {target} ({COLS}, _idem_partition, _idem_offset)
         SELECT DISTINCT ON (user_id) {COLS}, _idem_partition, _idem_offset
         FROM {from}
         ORDER BY user_id, _idem_offset DESC
         ON CONFLICT (user_id) DO UPDATE SET event_id = excluded.event_id, kind = excluded.kind,
             amount = excluded.amount, currency = excluded.currency, ok = excluded.ok,
             \"at\" = excluded.\"at\", note = excluded.note,
             _idem_partition = excluded._idem_partition, _idem_offset = excluded._idem_offset"
    )
}

fn run_postgres(idem: &str, dir: &Path, data: &Path, batch: usize) -> (Vec<Line>, i64) {
    let schema = format!("bench_latest_{}", run_id());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = common::pg::connect(&rt, &schema);
    let mut lines = Vec::new();
    for (i, (label, dedup)) in [
        (
            "(a) idem, ids in the sink (store = \"sink\")",
            "store = \"sink\"".to_string(),
        ),
        (
            "(b) idem, PostgreSQL dedup store",
            format!(
                "store = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"ids\"",
                pg_url()
            ),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let sink = format!(
            "type = \"postgres\"\nsslmode = \"disable\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"events{i}\"\noffsets_table = \"offsets{i}\"\nmode = \"upsert\"\nkey = [\"user_id\"]",
            pg_url()
        );
        let cfg = dir.join("pg.toml");
        std::fs::write(&cfg, idem_config(data, &sink, &dedup, batch)).expect("config");
        let (elapsed, peak, latencies) = run_idem(idem, &cfg);
        eprintln!("postgres {label}: {}", latency_line(&latencies));
        lines.push(Line {
            label: label.to_string(),
            elapsed,
            peak_kib: Some(peak),
        });
    }
    // The baseline: rows parsed beforehand (not timed), COPY into a
    // staging table, one statement to the target.
    let text = std::fs::read_to_string(data).expect("data");
    let rows: Vec<_> = text.lines().filter_map(parse).collect();
    drop(text);
    // Each hand-written load: its tables, the rows' COPY into its staging
    // table, one statement; the COPY and the statement are timed.
    let hand_load = |stage: &str, tables: String, statement: String| {
        rt.block_on(client.batch_execute(&tables)).expect("tables");
        let copied = rt.block_on(raw_copy(&client, stage, &rows));
        let started = Instant::now();
        rt.block_on(client.batch_execute(&statement))
            .expect("hand-written load");
        copied + started.elapsed()
    };
    let t = format!("{schema}.base");
    lines.push(Line {
        label: "(c) COPY (parsed beforehand) + INSERT DISTINCT ON".into(),
        elapsed: hand_load(
            "stage",
            format!(
                "CREATE TABLE {t} (LIKE {schema}.events0 INCLUDING ALL);
                 CREATE TEMP TABLE stage (LIKE {schema}.events0)"
            ),
            latest_per_user(
                &t,
                "(SELECT DISTINCT ON (event_id) * FROM stage ORDER BY event_id, _idem_offset) firsts",
            ),
        ),
        peak_kib: None,
    });
    // (c) keeps no ids, which a stream cannot do without: a copy arriving
    // after the load would win. (d) is (c) keeping them as (a) does, in a
    // table with a primary key, in the same statement.
    let d = format!("{schema}.base_ids");
    lines.push(Line {
        label: "(d) as (c), keeping the event ids (primary key)".into(),
        elapsed: hand_load(
            "stage_d",
            format!(
                "CREATE TABLE {d} (LIKE {schema}.events0 INCLUDING ALL);
                 CREATE TABLE {d}_seen (id text COLLATE \"C\" PRIMARY KEY, seen_at timestamptz NOT NULL);
                 CREATE TEMP TABLE stage_d (LIKE {schema}.events0)"
            ),
            format!(
                "WITH firsts AS (SELECT DISTINCT ON (event_id) * FROM stage_d ORDER BY event_id, _idem_offset),
                      fresh AS (INSERT INTO {d}_seen SELECT event_id, now() FROM firsts
                                ON CONFLICT DO NOTHING RETURNING id)
                 {}",
                latest_per_user(&d, "firsts JOIN fresh ON fresh.id = firsts.event_id")
            ),
        ),
        peak_kib: None,
    });
    let targets = [
        format!("{schema}.events0"),
        format!("{schema}.events1"),
        d.clone(),
    ];
    for (target, line) in targets.iter().zip([&lines[0], &lines[1], &lines[3]]) {
        let differ: i64 = rt
            .block_on(client.query_one(
                &format!(
                    "SELECT count(*) FROM {target} x FULL JOIN {t} y USING (user_id)
                     WHERE x.event_id IS DISTINCT FROM y.event_id OR x.amount IS DISTINCT FROM y.amount"
                ),
                &[],
            ))
            .expect("compare")
            .get(0);
        assert_eq!(differ, 0, "{} holds other rows than the SQL", line.label);
    }
    let n: i64 = rt
        .block_on(client.query_one(&format!("SELECT count(*) FROM {t}"), &[]))
        .expect("count")
        .get(0);
    rt.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .expect("drop schema");
    (lines, n)
}

/// Each line against (c), and against (d) where there is one (medians).
fn print(engine: &str, events: usize, rows: i64, rounds: usize, lines: &[Line]) {
    let base = |tag: &str| {
        lines
            .iter()
            .find(|l| l.label.starts_with(tag))
            .map(|l| l.elapsed.as_secs_f64())
    };
    let (c, d) = (base("(c)").expect("baseline (c)"), base("(d)"));
    println!();
    println!(
        "{engine}: {events} events -> {rows} rows (latest per user_id, copies dropped by event_id); median of {rounds}"
    );
    println!(
        "{:<54} {:>9} {:>10} {:>8} {:>8} {:>10}",
        "", "median", "events/s", "vs (c)", "vs (d)", "peak RSS"
    );
    for l in lines {
        let secs = l.elapsed.as_secs_f64();
        println!(
            "{:<54} {:>8.2}s {:>10.0} {:>7.2}x {:>8} {:>10}",
            l.label,
            secs,
            events as f64 / secs,
            c / secs,
            d.map_or("-".to_string(), |d| format!("{:.2}x", d / secs)),
            l.peak_kib
                .map_or("-".to_string(), |k| format!("{} MiB", k / 1024))
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--duckdb-baseline") {
        duckdb_baseline(&args[i + 1], &args[i + 2], &args[i + 3], args.len() > i + 4);
        return;
    }
    let events = env_usize("IDEM_BENCH_EVENTS", 1_000_000);
    let batch = bench_batch(50_000);
    let which = std::env::var("IDEM_BENCH_SINK").unwrap_or_default();
    let idem = env!("CARGO_BIN_EXE_idem");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("events.jsonl");
    let bytes = generate_production(idem, &data, events);
    eprintln!(
        "generated {events} events ({:.1} MB), {}",
        bytes as f64 / 1e6,
        batch_label(batch)
    );
    // Every variant runs `rounds` times (each round in files and a schema
    // of its own); single runs drift by up to 2x on a small machine.
    let rounds = env_usize("IDEM_BENCH_ROUNDS", 3).max(1);
    type Run = fn(&str, &Path, &Path, usize) -> (Vec<Line>, i64);
    for (engine, tag, run) in [
        ("DuckDB", "duckdb", run_duckdb as Run),
        ("PostgreSQL", "postgres", run_postgres as Run),
    ] {
        if !which.is_empty() && which != tag {
            continue;
        }
        let mut all = Vec::new();
        let mut rows = 0;
        for round in 0..rounds {
            let sub = dir.path().join(format!("{tag}{round}"));
            std::fs::create_dir_all(&sub).expect("round dir");
            let (lines, n) = run(idem, &sub, &data, batch);
            all.push(lines);
            rows = n;
        }
        print(engine, events, rows, rounds, &medians(&all));
    }
}

/// Each line's median time and highest peak over the rounds.
fn medians(rounds: &[Vec<Line>]) -> Vec<Line> {
    rounds[0]
        .iter()
        .enumerate()
        .map(|(i, first)| {
            let mut times: Vec<Duration> = rounds.iter().map(|r| r[i].elapsed).collect();
            times.sort();
            Line {
                label: first.label.clone(),
                elapsed: times[times.len() / 2],
                peak_kib: rounds.iter().filter_map(|r| r[i].peak_kib).max(),
            }
        })
        .collect()
}
