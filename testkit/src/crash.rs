//! The crash test every sink runs: the real `idem` binary is killed
//! (SIGKILL at random moments, abort at named fail points) again and again
//! while its input grows; after a final clean run the sink holds every
//! source message exactly once, and its stored positions equal the files'
//! ends. In append mode every message is a row; in upsert and dedup modes
//! some messages repeat an earlier id: upsert keeps the latest value, dedup
//! the first. In latest mode (upsert with `[dedup] store = "sink"` on an
//! event id) some messages are also exact copies of earlier ones at later
//! offsets, as a producer's retry makes: a copy of an older event must
//! never overwrite a newer one.

use crate::*;
use rand::Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Rounds of a CI run; `IDEM_CRASH_KILLS=N` (scripts/soak.sh) instead runs
/// rounds until the binary has died N times.
const ROUNDS: usize = 36;
const PER_ROUND: usize = 4000;
const FAILPOINTS: [&str; 3] = ["after_write", "after_commit", "mid_write"];

/// What a sink holds after the run, read back by the sink's own test.
pub struct Landed {
    /// (id, n, partition, offset) per row.
    pub rows: Vec<(String, i64, String, i64)>,
    /// Stored next offset per partition.
    pub positions: BTreeMap<String, i64>,
}

impl Landed {
    /// From rows read back as JSON objects (id, n, `_idem_partition`,
    /// `_idem_offset`), as the object-store sinks' readers give them.
    pub fn from_json<'a>(
        rows: impl IntoIterator<Item = &'a serde_json::Value>,
        positions: BTreeMap<String, i64>,
    ) -> Landed {
        let rows = rows
            .into_iter()
            .map(|v| {
                (
                    v["id"].as_str().expect("id").to_string(),
                    v["n"].as_i64().expect("n"),
                    v["_idem_partition"]
                        .as_str()
                        .expect("partition")
                        .to_string(),
                    v["_idem_offset"].as_i64().expect("offset"),
                )
            })
            .collect();
        Landed { rows, positions }
    }
}

/// What a table sink's test reads for [`Landed`], in SQL every table sink's
/// database takes: the rows of table `events` of the default schema...
pub const ROWS_SQL: &str = "SELECT id, n, _idem_partition, _idem_offset FROM events";
/// ...and the positions of connector `crash` in `idem_offsets`.
pub const POSITIONS_SQL: &str =
    "SELECT partition, next_offset FROM idem_offsets WHERE connector = 'crash'";

/// The `[connectors.crash.sink]` lines for `mode` ("append", "upsert",
/// "dedup" or "latest"; last in the section: "latest" opens the next).
pub fn mode_lines(mode: &str) -> &'static str {
    match mode {
        "upsert" => "mode = \"upsert\"\nkey = [\"id\"]",
        "latest" => "mode = \"upsert\"\nkey = [\"id\"]\n\n[connectors.crash.dedup]\nid = \"/ev\"\nstore = \"sink\"",
        "dedup" => "mode = \"dedup\"\nkey = [\"id\"]",
        _ => "mode = \"append\"",
    }
}

fn config(w: &Workdir, sink: &str) -> String {
    format!(
        r#"
[connectors.crash]
dead_letter = "{dl}"

[connectors.crash.source]
type = "file"
path = "{glob}"

[connectors.crash.sink]
{sink}

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
    )
}

/// Run the crash rounds against the sink configured by `sink` (its TOML
/// lines, table `events`, columns id/n/pad), then check what `read` finds.
pub fn crash(w: &Workdir, mode: &str, sink: &str, read: impl Fn() -> Landed) {
    let cfg = w.write("crash.toml", &config(w, sink));
    // Both repeat ids: upsert keeps the latest value, dedup the first.
    let repeats = mode != "append";
    // Latest: lines written so far per partition, for exact copies.
    let copies = mode == "latest";
    let mut lines: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut rng = crate::crash_rng(mode);

    // id -> n; the source of truth for the final check.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    // Ids written so far per partition, for upsert's updates.
    let mut ids: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut malformed = 0usize;
    let mut killed = 0usize;
    let mut by_failpoint = BTreeMap::<&str, usize>::new();
    // How long a run takes to finish its round, to aim random kills inside it.
    let mut typical = Duration::from_millis(400);

    let want_kills: Option<usize> = std::env::var("IDEM_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok());
    let rounds = want_kills.map_or(ROUNDS, |k| k.saturating_mul(3).max(ROUNDS));
    let mut produced = 0usize;
    let mut ran = 0usize;
    for round in 0..rounds {
        if want_kills.is_some_and(|k| killed >= k) {
            break;
        }
        ran += 1;
        // The producer keeps writing between crashes, into two partitions.
        for part in 0..2 {
            let mut chunk = String::new();
            for i in 0..PER_ROUND / 2 {
                // Latest: one message in twenty is a copy of a recent one
                // (its event id too): it changes nothing.
                if copies && lines[part].len() > 1 && rng.random_bool(0.05) {
                    let from = lines[part].len().saturating_sub(500);
                    let copy = &lines[part][rng.random_range(from..lines[part].len())];
                    chunk.push_str(copy);
                    produced += 1;
                    continue;
                }
                // Upsert: one message in ten updates an id written earlier
                // to the same partition (a later offset: it must win).
                let id = if repeats && !ids[part].is_empty() && rng.random_bool(0.1) {
                    ids[part][rng.random_range(0..ids[part].len())].clone()
                } else {
                    let id = format!("r{round}-p{part}-{i}");
                    ids[part].push(id.clone());
                    id
                };
                let n: i64 = rng.random_range(0..1_000_000);
                let line = format!(
                    "{{\"id\":\"{id}\",\"ev\":\"ev{round}-{part}-{i}\",\"n\":{n},\"pad\":\"{}\"}}\n",
                    "z".repeat(rng.random_range(10..80))
                );
                chunk.push_str(&line);
                if copies {
                    lines[part].push(line);
                }
                produced += 1;
                if mode == "dedup" {
                    expected.entry(id).or_insert(n);
                } else {
                    expected.insert(id, n);
                }
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
        // Each commit logs "batch committed" at debug: random kills aim at
        // the commits, not only at the start-up before them.
        cmd.env("RUST_LOG", "warn,idem::connector::commit=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn idem");
        let first_commit = watch_first_commit(child.stderr.take().expect("stderr"));
        let status = match failpoint {
            Some(_) => child.wait().expect("wait"),
            None => {
                // One kill in four lands anywhere in the start-up (opening,
                // recovering); the rest after the first commit, within as
                // long again, while batches are being written.
                let early = rng.random_bool(0.25);
                let early_aim = rng.random_range(5..(typical.as_millis() as u64 * 4 / 5).max(6));
                let late_share: f64 = rng.random_range(0.0..1.0);
                let mut deadline = early.then(|| started + Duration::from_millis(early_aim));
                loop {
                    if let Some(s) = child.try_wait().expect("try_wait") {
                        // It finished first: aim within its latest duration.
                        typical = started.elapsed();
                        break s;
                    }
                    if deadline.is_none() {
                        if let Ok(at) = first_commit.try_recv() {
                            deadline = Some(at + (at - started).mul_f64(late_share));
                        }
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        child.kill().expect("SIGKILL");
                        break child.wait().expect("wait");
                    }
                    std::thread::sleep(Duration::from_millis(1));
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
    eprintln!("{mode}: rounds: {ran}, killed: {killed} {by_failpoint:?}");
    assert!(
        killed * 6 >= ran * 5,
        "only {killed} of {ran} runs died mid-way: the test is too weak"
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
    if copies {
        // `idem verify` agrees, copies and all.
        let out = run_ok(idem().arg("verify").arg(&cfg));
        assert!(
            text(&out.stdout).contains("every message took effect exactly once"),
            "{}",
            text(&out.stdout)
        );
    }

    let landed = read();
    let rows = landed.rows.len();
    let ids: std::collections::BTreeSet<&str> = landed.rows.iter().map(|r| r.0.as_str()).collect();
    let positions: std::collections::BTreeSet<(&str, i64)> =
        landed.rows.iter().map(|r| (r.2.as_str(), r.3)).collect();
    let sum: i64 = landed.rows.iter().map(|r| r.1).sum();
    assert_eq!(
        rows,
        expected.len(),
        "row count: lost or duplicated messages"
    );
    assert_eq!(ids.len(), rows, "duplicated ids");
    assert_eq!(positions.len(), rows, "one source position written twice");
    assert_eq!(sum, expected.values().sum::<i64>(), "checksum of n");
    let actual: BTreeMap<String, i64> = landed.rows.iter().map(|r| (r.0.clone(), r.1)).collect();
    assert!(actual == expected, "table content differs from the source");

    // Stored positions are the files' ends.
    for part in 0..2 {
        let file = std::fs::canonicalize(w.path(&format!("in-{part}.jsonl"))).expect("path");
        let len = std::fs::metadata(&file).expect("stat").len() as i64;
        let name = file.display().to_string();
        assert_eq!(
            landed.positions.get(&name),
            Some(&len),
            "position of {name}"
        );
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
    // One line for scripts/soak.sh to gather (the asserts above passed).
    eprintln!(
        "SOAK mode={mode} rounds={ran} kills={killed} failpoints={by_failpoint:?} messages={produced} malformed={malformed} rows={rows} result=exact"
    );
}

/// Drain the child's log on a thread (so it never blocks on a full pipe)
/// and send the moment its first batch committed.
fn watch_first_commit(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<Instant> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains("batch committed") {
                let _ = tx.send(Instant::now());
                sent = true;
            }
        }
    });
    rx
}
