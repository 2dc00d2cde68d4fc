//! The crash test (`idem_testkit::crash`) against the PostgreSQL sink
//! (scripts/postgres.sh), each run in its own schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::crash::{crash, mode_lines, Landed};
use idem_testkit::*;

fn run(mode: &str) {
    let w = Workdir::new();
    let schema = fresh_schema(&format!("crash_{mode}"));
    let sink = format!(
        "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"events\"\n{}",
        pg_url(),
        mode_lines(mode)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    crash(&w, mode, &sink, || {
        rt.block_on(async {
            let client = pg().await;
            let rows = client
                .query(
                    &format!("SELECT id, n, _idem_partition, _idem_offset FROM \"{schema}\".events"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            let positions = client
                .query(
                    &format!(
                        "SELECT partition, next_offset FROM \"{schema}\".idem_offsets WHERE connector = 'crash'"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            Landed { rows, positions }
        })
    });
}

#[test]
fn append_killed_at_random_and_at_fail_points_every_message_lands_exactly_once() {
    run("append");
}

#[test]
fn upsert_killed_at_random_and_at_fail_points_every_id_holds_its_latest_value() {
    run("upsert");
}

/// Upsert with `[dedup] store = "sink"` on an event id: exact copies of
/// earlier events at later offsets never overwrite a newer value.
#[test]
fn latest_with_kept_ids_killed_at_random_and_at_fail_points_never_lets_a_copy_win() {
    run("latest");
}

#[test]
fn dedup_killed_at_random_and_at_fail_points_every_id_takes_effect_once() {
    run("dedup");
}

/// The runner's connections are terminated again and again mid-run (as a
/// server restart does): `idem run` retries, finishes with exit 0, and the
/// table holds every message exactly once.
#[test]
fn connections_terminated_mid_run_are_retried_and_lose_nothing() {
    let w = Workdir::new();
    let schema = fresh_schema("terminate");
    let app = schema.clone();
    let n = 60_000;
    let cfg = file_to_events(
        &w,
        &schema,
        n,
        &format!("url = \"{}?application_name={app}\"", pg_url()),
        "max_records = 200\nlinger = \"10ms\"\n[connectors.t.retry]\ninitial_backoff = \"20ms\"\nmax_backoff = \"200ms\"\nmax_attempts = 50",
    );
    let child = idem()
        .env("RUST_LOG", "warn")
        .arg("run")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut terminated = 0i64;
    rt.block_on(async {
        let client = pg().await;
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let row = client
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap();
            terminated += row.get::<_, i64>(0);
        }
    });
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "idem failed: {stderr}");
    assert!(
        terminated >= 5,
        "only {terminated} connections terminated: the test is too weak"
    );
    let summary = text(&out.stdout);
    eprintln!("{summary}");
    let retries: u64 = summary
        .split(" retries")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("retries in the summary");
    assert!(
        retries > 0,
        "no commit was retried: the terminations missed the runner"
    );
    assert!(
        text(&out.stdout).contains(&format!("{n} read -> {n} written")),
        "{}",
        text(&out.stdout)
    );
    rt.block_on(exactly_once(
        &schema,
        n,
        &format!("after {terminated} terminations"),
    ));
}

/// A runner frozen in the middle of a commit (SIGSTOP after its write,
/// before COMMIT: its transaction holds the partition's row lock) does not
/// hold the partition forever: the server aborts the idle transaction
/// after `idle_in_transaction_timeout`, a second runner takes the
/// partition and finishes, and the frozen one, woken, is fenced and
/// writes nothing twice.
#[test]
fn a_runner_frozen_mid_commit_lets_the_next_one_through() {
    let w = Workdir::new();
    let schema = fresh_schema("frozen");
    let n = 20_000;
    let cfg = file_to_events(
        &w,
        &schema,
        n,
        &format!(
            "url = \"{}\"\nidle_in_transaction_timeout = \"2s\"",
            pg_url()
        ),
        "max_records = 500",
    );
    let spawn = |failpoints: &str, log: &str| {
        idem()
            .env("IDEM_FAILPOINTS", failpoints)
            .arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(w.path(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let frozen = Reaped(spawn("after_write=2:stop", "frozen.log"));
    let started = std::time::Instant::now();
    while !is_stopped(frozen.0.id()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the first runner never reached its second write"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Without the timeout the second runner's open waits for the frozen
    // one's lock until it wakes, which it never does here.
    let mut next = Reaped(spawn("", "next.log"));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = next.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "the second runner is still waiting for the frozen one:\n{}",
            std::fs::read_to_string(w.path("next.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(w.path("next.log")).unwrap_or_default()
    );
    signal(frozen.0.id(), "CONT");
    let mut frozen = frozen;
    let woke = frozen.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("frozen.log")).unwrap_or_default();
    assert!(woke.success(), "the woken runner: {woke:?}\n{log}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(exactly_once(
        &schema,
        n,
        &format!("(the woken runner's log:\n{log})"),
    ));
}

/// `n` events `{"id": "eI", "n": I}` in a file, and connector `t` loading
/// them into `schema.events`; `sink` holds the sink's `url` line and any
/// more, `batch` the batch table's lines (and any tables after it).
fn file_to_events(
    w: &Workdir,
    schema: &str,
    n: i64,
    sink: &str,
    batch: &str,
) -> std::path::PathBuf {
    let lines: String = (0..n)
        .map(|i| format!("{{\"id\":\"e{i}\",\"n\":{i},\"pad\":\"x\"}}\n"))
        .collect();
    w.write("in-0.jsonl", &lines);
    w.write(
        "t.toml",
        &format!(
            r#"
[connectors.t]
[connectors.t.source]
type = "file"
path = "{src}"
[connectors.t.sink]
type = "postgres"
{sink}
schema = "{schema}"
table = "events"
[connectors.t.batch]
{batch}
[[connectors.t.columns]]
name = "id"
type = "text"
required = true
[[connectors.t.columns]]
name = "n"
type = "bigint"
"#,
            src = w.path("in-0.jsonl").display(),
        ),
    )
}

/// `schema.events` holds each of the `n` events once (`context` says what
/// happened on the way).
async fn exactly_once(schema: &str, n: i64, context: &str) {
    let row = pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT id), sum(n)::bigint FROM \"{schema}\".events"
            ),
            &[],
        )
        .await
        .unwrap();
    let (rows, distinct, sum): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (rows, distinct),
        (n, n),
        "lost or duplicated rows {context}"
    );
    assert_eq!(sum, (0..n).sum::<i64>());
}
