//! Crash test: the real `idem` binary is killed (SIGKILL at random moments,
//! abort at named fail points) again and again while its input grows; after
//! a final clean run the DuckDB table holds every source message exactly
//! once, and the stored positions equal the files' ends. In append mode
//! every message is a row; in upsert mode some messages update an earlier
//! id and the latest one must win.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const ROUNDS: usize = 36;
const PER_ROUND: usize = 4000;
const FAILPOINTS: [&str; 3] = ["after_write", "after_commit", "mid_write"];

fn config(w: &Workdir, mode: &str) -> String {
    let mode = match mode {
        "upsert" => "mode = \"upsert\"\nkey = [\"id\"]",
        _ => "mode = \"append\"",
    };
    format!(
        r#"
[connectors.crash]
dead_letter = "{dl}"

[connectors.crash.source]
type = "file"
path = "{glob}"

[connectors.crash.sink]
type = "duckdb"
path = "{db}"
table = "events"
{mode}

[connectors.crash.batch]
max_records = 100
linger = "20ms"

[[connectors.crash.columns]]
name = "id"
type = "text"
required = true

[[connectors.crash.columns]]
name = "n"
type = "bigint"
required = true

[[connectors.crash.columns]]
name = "pad"
type = "text"
"#,
        dl = w.path("dead.jsonl").display(),
        glob = w.path("in-*.jsonl").display(),
        db = w.path("crash.duckdb").display(),
    )
}

#[test]
fn append_killed_at_random_and_at_fail_points_every_message_lands_exactly_once() {
    crash("append");
}

#[test]
fn upsert_killed_at_random_and_at_fail_points_every_id_holds_its_latest_value() {
    crash("upsert");
}

fn crash(mode: &str) {
    let w = Workdir::new();
    let cfg = w.write("crash.toml", &config(&w, mode));
    let upsert = mode == "upsert";
    let seed: u64 = std::env::var("IDEM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rngs::StdRng::from_os_rng().random());
    eprintln!("{mode} crash test seed: {seed} (IDEM_CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // id -> n; the source of truth for the final check.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    // Ids written so far per partition, for upsert's updates.
    let mut ids: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut malformed = 0usize;
    let mut killed = 0usize;
    let mut by_failpoint = BTreeMap::<&str, usize>::new();
    // How long a run takes to finish its round, to aim random kills inside it.
    let mut typical = Duration::from_millis(400);

    for round in 0..ROUNDS {
        // The producer keeps writing between crashes, into two partitions.
        for part in 0..2 {
            let mut chunk = String::new();
            for i in 0..PER_ROUND / 2 {
                // Upsert: one message in ten updates an id written earlier
                // to the same partition (a later offset: it must win).
                let id = if upsert && !ids[part].is_empty() && rng.random_bool(0.1) {
                    ids[part][rng.random_range(0..ids[part].len())].clone()
                } else {
                    let id = format!("r{round}-p{part}-{i}");
                    ids[part].push(id.clone());
                    id
                };
                let n: i64 = rng.random_range(0..1_000_000);
                chunk.push_str(&format!(
                    "{{\"id\":\"{id}\",\"n\":{n},\"pad\":\"{}\"}}\n",
                    "z".repeat(rng.random_range(10..80))
                ));
                expected.insert(id, n);
                if i % 500 == 250 {
                    chunk.push_str("{\"id\": \"truncated\n");
                    malformed += 1;
                }
            }
            w.append(&format!("in-{part}.jsonl"), &chunk);
        }

        let mut cmd = idem();
        cmd.arg("run").arg(&cfg);
        let failpoint = (round % 2 == 1).then(|| FAILPOINTS[(round / 2) % FAILPOINTS.len()]);
        if let Some(fp) = failpoint {
            cmd.env(
                "IDEM_FAILPOINTS",
                format!("{fp}={}", rng.random_range(1..=6)),
            );
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn idem");
        let status = match failpoint {
            Some(_) => child.wait().expect("wait"),
            None => {
                let aim = rng.random_range(5..(typical.as_millis() as u64 * 9 / 10).max(6));
                let deadline = started + Duration::from_millis(aim);
                loop {
                    if let Some(s) = child.try_wait().expect("try_wait") {
                        typical = typical.max(started.elapsed());
                        break s;
                    }
                    if Instant::now() >= deadline {
                        child.kill().expect("SIGKILL");
                        break child.wait().expect("wait");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        if !status.success() {
            killed += 1;
            *by_failpoint
                .entry(failpoint.unwrap_or("random SIGKILL"))
                .or_default() += 1;
        }
    }
    eprintln!("{mode}: rounds: {ROUNDS}, killed: {killed} {by_failpoint:?}");
    assert!(
        killed >= 30,
        "only {killed} of {ROUNDS} runs died mid-way: the test is too weak"
    );
    for fp in FAILPOINTS {
        assert!(
            by_failpoint.get(fp).copied().unwrap_or(0) > 0,
            "fail point {fp} never fired"
        );
    }

    // A clean run finishes what is left.
    let out = run_ok(idem().arg("run").arg(&cfg));
    eprintln!("{}", text(&out.stdout));

    let db = duck(&w.path("crash.duckdb"));
    let rows = query_i64(&db, "SELECT count(*) FROM events");
    let distinct = query_i64(&db, "SELECT count(DISTINCT id) FROM events");
    let positions = query_i64(
        &db,
        "SELECT count(*) FROM (SELECT DISTINCT _idem_partition, _idem_offset FROM events)",
    );
    let sum = query_i64(&db, "SELECT sum(n)::BIGINT FROM events");
    assert_eq!(
        rows as usize,
        expected.len(),
        "row count: lost or duplicated messages"
    );
    assert_eq!(distinct, rows, "duplicated ids");
    assert_eq!(positions, rows, "one source position written twice");
    assert_eq!(sum, expected.values().sum::<i64>(), "checksum of n");
    let mut stmt = db
        .prepare("SELECT id, n FROM events ORDER BY id")
        .expect("prepare");
    let actual: BTreeMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(actual == expected, "table content differs from the source");

    // Stored positions are the files' ends.
    for part in 0..2 {
        let file = std::fs::canonicalize(w.path(&format!("in-{part}.jsonl"))).expect("path");
        let len = std::fs::metadata(&file).expect("stat").len() as i64;
        let next = query_i64(
            &db,
            &format!(
                "SELECT next_offset FROM idem_offsets WHERE connector = 'crash' AND partition = '{}'",
                file.display()
            ),
        );
        assert_eq!(next, len, "position of {}", file.display());
    }

    // Dead letters are at-least-once: every malformed line is there, copies
    // share a position.
    let dl = std::fs::read_to_string(w.path("dead.jsonl")).expect("dead letters");
    let mut dl_positions = std::collections::BTreeSet::new();
    for line in dl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("dead letter is JSON");
        assert!(v["reason"]
            .as_str()
            .expect("reason")
            .contains("not valid JSON"));
        dl_positions.insert((
            v["partition"].to_string(),
            v["offset"].as_u64().expect("offset"),
        ));
    }
    assert_eq!(
        dl_positions.len(),
        malformed,
        "every malformed line dead-lettered"
    );
}
