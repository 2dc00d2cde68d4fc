//! The `idem` binary end to end: config errors, guarantees, dead letters,
//! `errors = "fail"`, graceful shutdown, `check` on every example.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
}

fn connector(w: &Workdir, extra: &str, sink: &str) -> String {
    format!(
        r#"
[connectors.t]
dead_letter = "{dl}"
{extra}

[connectors.t.source]
type = "file"
path = "{src}"

[connectors.t.sink]
{sink}

[connectors.t.batch]
max_records = 3
linger = "20ms"

[[connectors.t.columns]]
name = "id"
type = "text"
required = true

[[connectors.t.columns]]
name = "n"
type = "bigint"
"#,
        dl = w.path("dl.jsonl").display(),
        src = w.path("in.jsonl").display(),
    )
}

fn duckdb_sink(w: &Workdir) -> String {
    format!(
        "type = \"duckdb\"\npath = \"{}\"\ntable = \"t\"\nmode = \"upsert\"\nkey = [\"id\"]",
        w.path("t.duckdb").display()
    )
}

#[test]
fn every_example_config_checks_and_prints_its_guarantee() {
    let w = Workdir::new();
    // The input files the examples read (check refuses a missing one).
    for input in [
        "data/orders-1.jsonl",
        "payments/p.jsonl",
        "quickstart/events.jsonl",
        "data/users-1.jsonl",
        "data/readings-1.jsonl",
    ] {
        std::fs::create_dir_all(w.path(input).parent().unwrap()).unwrap();
        w.write(input, "");
    }
    // The S3 example's bucket, on the test store (scripts/s3.sh).
    let bucket = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(idem_testkit::s3::fresh_bucket("examples"));
    // The Iceberg example's catalog: its own name, so its table points
    // into this run's bucket.
    let catalog = fresh_schema("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_root().join("config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = run_ok(
            idem()
                .current_dir(w.dir.path())
                .env("IDEM_S3_ENDPOINT", idem_testkit::s3::ENDPOINT)
                .env("IDEM_S3_BUCKET", &bucket)
                .env("IDEM_CATALOG_URL", pg_url())
                .env("IDEM_CATALOG_NAME", &catalog)
                .env("IDEM_SCHEMAS", repo_root().join("config/examples/schemas"))
                .arg("check")
                .arg(&path),
        );
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("✓")
                && (stdout.contains("exactly-once") || stdout.contains("at-least-once")),
            "{}: {stdout}",
            path.display()
        );
        assert!(stdout.contains("why:"), "{stdout}");
        if path.ends_with("kafka-avro.toml") {
            // The columns its schema gives, after the one listed.
            assert!(
                stdout.contains("card text, payment_id uuid, order_id bigint, amount numeric"),
                "{stdout}"
            );
        }
        if path.ends_with("users-latest.toml") {
            // Ids in the sink's own table, named before any run.
            assert!(
                stdout.contains("dedup: ids from /event_id in \"analytics\".\"idem_seen_user_state\", in each batch's transaction"),
                "{stdout}"
            );
            // No [batch]: the table sink's batch size.
            assert!(
                stdout.contains("batches: up to 100000 messages or 16777216 bytes of values, or 500ms after the first"),
                "{stdout}"
            );
            // Three batches and a quarter.
            assert!(
                stdout.contains("in memory: up to 325000 messages or 54525952 bytes of values at once, all partitions together"),
                "{stdout}"
            );
        }
        seen += 1;
    }
    assert!(seen >= 12, "examples found: {seen}");
}

#[test]
fn config_mistakes_name_file_line_and_key() {
    let w = Workdir::new();
    let good = connector(&w, "", &duckdb_sink(&w));
    let cases = [
        (
            good.replace("linger = ", "lingr = "),
            "key `connectors.t.batch.lingr`",
            "unknown field",
        ),
        (
            good.replace("mode = \"upsert\"\nkey = [\"id\"]", "mode = \"upsert\""),
            "key `connectors.t.sink.key`",
            "needs key",
        ),
        (
            good.replace("in.jsonl", "${IDEM_TEST_UNSET_VAR}/in.jsonl"),
            "IDEM_TEST_UNSET_VAR is not set",
            "connectors.t.source",
        ),
        (
            good.replace("type = \"bigint\"", "type = \"bigin\""),
            "key `connectors.t.columns.1.type`",
            "unknown variant",
        ),
        (
            good.replace("mode = \"upsert\"", "mode = \"dedup\""),
            "key `connectors.t.sink.mode`",
            "not available on the duckdb sink",
        ),
        (
            good.replace("type = \"bigint\"", "type = \"numeric\""),
            "key `connectors.t.columns.1.type`",
            "no unbounded DECIMAL",
        ),
        (
            format!("{good}\n[connectors.t.dead_letters]\ntable = \"rejects\"\n"),
            "key `connectors.t.dead_letters.table`",
            "only used with destination = \"table\"",
        ),
        (
            format!("[runner.admin]\nlisten = \"localhost\"\n{good}"),
            "key `runner.admin.listen`",
            "must be an IP address and port",
        ),
    ];
    for (cfg, key, what) in cases {
        let path = w.write("bad.toml", &cfg);
        let out = idem().arg("check").arg(&path).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{}:", path.display())), "{err}");
        assert!(err.contains(key) && err.contains(what), "{err}");
        // The reported line holds the offending key (or its table).
        let line: usize = err
            .split(&format!("{}:", path.display()))
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no line number in {err}"));
        let at = cfg.lines().nth(line - 1).unwrap_or_default();
        let last = key
            .trim_end_matches('`')
            .rsplit(['.', '`'])
            .next()
            .unwrap_or_default();
        assert!(
            at.contains(last)
                || at.contains("bigin")
                || at.contains("IDEM_TEST_UNSET_VAR")
                || at.starts_with('['),
            "line {line} is `{at}` for {err}"
        );
    }
}

#[test]
fn exactly_once_is_refused_on_a_sink_that_cannot_give_it() {
    let w = Workdir::new();
    w.write(
        "in.jsonl",
        "{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n",
    );
    let cfg = w.write("c.toml", &connector(&w, "", "type = \"stdout\""));
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    // A config mistake: refused before anything starts, with the file.
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("c.toml:2:"), "{err}");
    assert!(
        err.contains("requires exactly-once")
            && err.contains("at-least-once")
            && err.contains("cannot store positions"),
        "{err}"
    );
    assert!(out.stdout.is_empty() || !text(&out.stdout).contains("\"id\""));

    let cfg = w.write(
        "c.toml",
        &connector(&w, "guarantee = \"at-least-once\"", "type = \"stdout\""),
    );
    let out = run_ok(idem().arg("run").arg(&cfg));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(r#"{"id":"a","n":1}"#) && stdout.contains(r#"{"id":"b","n":2}"#),
        "{stdout}"
    );
}

#[test]
fn bad_lines_go_to_the_dead_letters_and_the_run_goes_on() {
    let w = Workdir::new();
    let input = "{\"id\":\"a\",\"n\":1}\nnot json\n{\"n\":2}\n{\"id\":\"c\",\"n\":\"three\"}\n{\"id\":\"d\",\"n\":4}\n{\"id\":\"a\",\"n\":1}\n";
    w.write("in.jsonl", input);
    let cfg = w.write("c.toml", &connector(&w, "", &duckdb_sink(&w)));
    let out = run_ok(idem().arg("run").arg(&cfg));
    let summary = text(&out.stdout);
    assert!(
        summary.contains("6 read -> 2 written, 1 deduplicated, 3 dead-lettered"),
        "{summary}"
    );
    let dl: Vec<serde_json::Value> = std::fs::read_to_string(w.path("dl.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dl.len(), 3);
    let offset_of = |needle: &str| input.find(needle).unwrap() as u64;
    assert_eq!(dl[0]["offset"].as_u64(), Some(offset_of("not json")));
    assert_eq!(dl[0]["raw"], "not json");
    assert!(dl[0]["reason"].as_str().unwrap().contains("not valid JSON"));
    assert_eq!(dl[1]["offset"].as_u64(), Some(offset_of("{\"n\":2}")));
    assert!(dl[1]["reason"]
        .as_str()
        .unwrap()
        .contains("key column `id`"));
    assert!(dl[2]["reason"].as_str().unwrap().contains("column `n`"));
    assert!(dl[2]["reason"].as_str().unwrap().contains("\"three\""));
    let db = duck(&w.path("t.duckdb"));
    assert_eq!(query_i64(&db, "SELECT count(*) FROM t"), 2);
    // Every position is committed, dead letters included.
    assert_eq!(
        query_i64(&db, "SELECT next_offset FROM idem_offsets"),
        input.len() as i64
    );
    drop(db);
    // The audit agrees: the copy of `a` left one row, the bad lines none.
    let out = run_ok(idem().arg("verify").arg(&cfg));
    let verdict = text(&out.stdout);
    assert!(
        verdict.contains(
            "✓ t: 6 messages (3 dead-lettered), 2 rows: every message took effect exactly once"
        ),
        "{verdict}"
    );
    // A row no message explains fails it.
    let db = duckdb::Connection::open(w.path("t.duckdb")).unwrap();
    db.execute_batch("INSERT INTO t SELECT 'z', n, _idem_partition, 1 FROM t LIMIT 1")
        .unwrap();
    drop(db);
    let out = idem().arg("verify").arg(&cfg).output().unwrap();
    let verdict = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{verdict}");
    assert!(verdict.contains("unexplained row: a row from"), "{verdict}");
}

#[test]
fn errors_fail_stops_at_the_bad_message_after_committing_what_came_before() {
    let w = Workdir::new();
    let input = "{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n{\"id\":\"c\",\"n\":\"x\"}\n{\"id\":\"d\",\"n\":4}\n";
    w.write("in.jsonl", input);
    let cfg = w.write(
        "c.toml",
        &connector(&w, "errors = \"fail\"", &duckdb_sink(&w)),
    );
    for _ in 0..2 {
        let out = idem().arg("run").arg(&cfg).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let bad = input.find("{\"id\":\"c\"").unwrap();
        assert!(
            err.contains(&format!("offset {bad}")) && err.contains("column `n`"),
            "{err}"
        );
    }
    assert!(!w.path("dl.jsonl").exists());
    let db = duck(&w.path("t.duckdb"));
    assert_eq!(query_i64(&db, "SELECT count(*) FROM t"), 2);
    assert_eq!(
        query_i64(&db, "SELECT next_offset FROM idem_offsets"),
        input.find("{\"id\":\"c\"").unwrap() as i64
    );
}

fn count_rows(w: &Workdir) -> i64 {
    query_i64(&duck(&w.path("t.duckdb")), "SELECT count(*) FROM t")
}

#[test]
fn sigterm_in_follow_mode_commits_and_exits_zero_and_restart_resumes() {
    let w = Workdir::new();
    let lines = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!("{{\"id\":\"e{i}\",\"n\":{i}}}\n"))
            .collect()
    };
    w.write("in.jsonl", &lines(0, 50));
    let sink = duckdb_sink(&w).replace("mode = \"upsert\"\nkey = [\"id\"]", "mode = \"append\"");
    let cfg = connector(&w, "", &sink).replace(
        "type = \"file\"",
        "type = \"file\"\nfollow = true\npoll_interval = \"20ms\"",
    );
    let cfg = w.write("c.toml", &cfg);
    for round in 0..2 {
        let child = idem()
            .env("RUST_LOG", "info")
            .arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Let it catch up, then write more while it follows.
        std::thread::sleep(Duration::from_millis(700));
        w.append("in.jsonl", &lines(50 + round * 50, 100 + round * 50));
        std::thread::sleep(Duration::from_millis(700));
        let started = Instant::now();
        signal(child.id(), "TERM");
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "round {round}: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            text(&out.stderr).contains("SIGTERM"),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(count_rows(&w), 100 + round as i64 * 50, "round {round}");
    }
    let db = duck(&w.path("t.duckdb"));
    assert_eq!(query_i64(&db, "SELECT count(DISTINCT id) FROM t"), 150);
    drop(db);
    // The audit of a followed file reads up to the committed position and
    // ends: lines past it are not waited for (it used to fail after 30 s).
    w.append("in.jsonl", &lines(150, 160));
    let out = run_ok(idem().arg("verify").arg(&cfg));
    let verdict = text(&out.stdout);
    assert!(
        verdict.contains("✓ t: 150 messages") && verdict.contains("exactly once"),
        "{verdict}"
    );
}

#[test]
fn status_shows_committed_positions_and_lag() {
    let w = Workdir::new();
    let first = "{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n";
    w.write("in.jsonl", first);
    let cfg = w.write("c.toml", &connector(&w, "", &duckdb_sink(&w)));
    run_ok(idem().arg("run").arg(&cfg));
    let more = "{\"id\":\"c\",\"n\":3}\n";
    w.append("in.jsonl", more);
    let out = run_ok(idem().arg("status").arg(&cfg));
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("t "))
        .unwrap_or_else(|| panic!("no row for connector t in:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    let (next, end, lag) = (first.len(), first.len() + more.len(), more.len());
    assert_eq!(
        cells[2..5],
        [next.to_string(), end.to_string(), lag.to_string()],
        "{table}"
    );
}
