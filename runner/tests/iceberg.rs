//! The Iceberg sink end to end: `idem run` from a file into a table whose
//! catalog is on the test PostgreSQL and whose warehouse is a bucket of
//! the test S3 store, read back by PyIceberg (scripts/iceberg-tools.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::*;

fn config(w: &Workdir, sink: &str) -> String {
    format!(
        r#"
[connectors.ev]
dead_letter = "{dl}"
[connectors.ev.source]
type = "file"
path = "{src}"
[connectors.ev.sink]
{sink}
[connectors.ev.batch]
max_records = 1000
[[connectors.ev.columns]]
name = "id"
type = "text"
required = true
[[connectors.ev.columns]]
name = "n"
type = "bigint"
[[connectors.ev.columns]]
name = "at"
type = "timestamp"
[[connectors.ev.columns]]
name = "amount"
type = "numeric"
"#,
        dl = w.path("dead.jsonl").display(),
        src = w.path("ev.jsonl").display(),
    )
}

#[tokio::test]
async fn a_file_lands_once_in_a_table_pyiceberg_reads_a_rerun_adds_nothing_and_verify_audits_it() {
    let w = Workdir::new();
    let bucket = idem_testkit::s3::fresh_bucket("ice-e2e").await;
    let catalog = fresh_schema("ice_e2e");
    let warehouse = format!("s3://{bucket}/warehouse");
    let mut input = String::new();
    for i in 0..5000 {
        input.push_str(&format!(
            "{{\"id\":\"e{i}\",\"n\":{i},\"at\":\"2026-11-30T10:00:{:02}Z\",\"amount\":\"{i}.50\"}}\n",
            i % 60
        ));
        if i == 2500 {
            input.push_str("{\"id\": \"broken\n");
        }
    }
    w.write("ev.jsonl", &input);
    let sink = idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "lake.events");
    let cfg = w.write("c.toml", &config(&w, &sink));
    let out = run_ok(idem().arg("check").arg(&cfg));
    let said = text(&out.stdout);
    assert!(
        said.contains("exactly-once") && said.contains("catalog"),
        "{said}"
    );
    run_ok(idem().arg("run").arg(&cfg));
    let read = idem_testkit::iceberg::read(&catalog, &warehouse, "lake.events");
    assert_eq!(read.rows.len(), 5000);
    let mut ids: Vec<&str> = read
        .rows
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5000, "an id twice");
    let sum: i64 = read.rows.iter().map(|r| r["n"].as_i64().unwrap()).sum();
    assert_eq!(sum, (0..5000).sum::<i64>());
    let e7 = read.rows.iter().find(|r| r["id"] == "e7").unwrap();
    assert_eq!(e7["amount"], "7.50");
    assert_eq!(e7["at"], "2026-11-30 10:00:07+00:00");
    // The file's batches, all in the one snapshot that ended the run.
    assert_eq!(read.snapshots, 1);
    let src = std::fs::canonicalize(w.path("ev.jsonl")).unwrap();
    assert_eq!(
        read.positions("ev").get(&src.display().to_string()),
        Some(&(input.len() as i64))
    );
    let dead = std::fs::read_to_string(w.path("dead.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    // Run again: nothing new, nothing twice.
    run_ok(idem().arg("run").arg(&cfg));
    let again = idem_testkit::iceberg::read(&catalog, &warehouse, "lake.events");
    assert_eq!((again.rows.len(), again.snapshots), (5000, 1));
    // The audit reads the table back through the current snapshot.
    let out = run_ok(idem().arg("verify").arg(&cfg));
    let verdict = text(&out.stdout);
    assert!(
        verdict.contains(
            "✓ ev: 5001 messages (1 dead-lettered), 5000 rows: every message took effect exactly once"
        ),
        "{verdict}"
    );
    // Another writer's copy of a row fails it.
    idem_testkit::iceberg::append_copy(&catalog, &warehouse, "lake.events");
    let out = idem().arg("verify").arg(&cfg).output().unwrap();
    let verdict = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{verdict}");
    assert!(verdict.contains("duplicated"), "{verdict}");
}

#[tokio::test]
async fn a_partitioned_table_takes_the_spec_and_pyiceberg_finds_rows_by_partition() {
    let w = Workdir::new();
    let catalog = fresh_schema("ice_part");
    let warehouse = format!("file://{}", w.path("warehouse").display());
    // 3,000 events over three days.
    let days = ["2026-11-28", "2026-11-29", "2026-11-30"];
    let mut input = String::new();
    for i in 0..3000 {
        input.push_str(&format!(
            "{{\"id\":\"e{i}\",\"n\":{i},\"at\":\"{}T10:{:02}:00Z\",\"amount\":\"1\"}}\n",
            days[i % 3],
            i % 60
        ));
    }
    w.write("ev.jsonl", &input);
    let sink = format!(
        "{}partition_by = [\"day(at)\", \"bucket(4, id)\"]\n",
        idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "lake.events")
    );
    let cfg = w.write("c.toml", &config(&w, &sink));
    run_ok(idem().arg("run").arg(&cfg));
    let read = idem_testkit::iceberg::read(&catalog, &warehouse, "lake.events");
    assert_eq!(read.rows.len(), 3000);
    assert_eq!(read.spec, ["day(at)", "bucket[4](id)"]);
    // Each day's rows, as PyIceberg counts them from the manifests.
    let mut per_day = std::collections::BTreeMap::new();
    for p in &read.partitions {
        *per_day
            .entry(p["partition"]["at_day"].as_str().unwrap().to_string())
            .or_insert(0) += p["record_count"].as_i64().unwrap();
    }
    let want: std::collections::BTreeMap<String, i64> =
        days.iter().map(|d| (d.to_string(), 1000)).collect();
    assert_eq!(per_day, want, "{:?}", read.partitions);
    assert!(
        read.partitions.len() > 3,
        "one bucket a day: {:?}",
        read.partitions
    );
    // PyIceberg skips files by the partition values Idem wrote: a wrong
    // bucket or day hides the rows.
    let ids: Vec<String> = (0..40).map(|i| format!("'e{i}'")).collect();
    let some = idem_testkit::iceberg::read_where(
        &format!("id in ({})", ids.join(", ")),
        &catalog,
        &warehouse,
        "lake.events",
    );
    assert_eq!(some.rows.len(), 40);
    let day = idem_testkit::iceberg::read_where(
        "at >= '2026-11-29T00:00:00+00:00' and at < '2026-11-30T00:00:00+00:00'",
        &catalog,
        &warehouse,
        "lake.events",
    );
    assert_eq!(day.rows.len(), 1000);
    // Another spec for the same table is refused at check, naming both.
    let other = config(
        &w,
        &format!(
            "{}partition_by = [\"day(at)\"]\n",
            idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "lake.events")
        ),
    );
    let cfg2 = w.write("c2.toml", &other);
    let out = idem().arg("check").arg(&cfg2).output().unwrap();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("partitioned by day(at), bucket(4, id), partition_by says day(at)"),
        "{said}"
    );
}

/// The `uncommitted:` lines of `idem verify`, sorted, and its output.
fn uncommitted(cfg: &std::path::Path) -> (Vec<String>, String) {
    let out = idem().arg("verify").arg(cfg).output().unwrap();
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    let mut files: Vec<String> = said
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uncommitted: "))
        .map(String::from)
        .collect();
    files.sort();
    (files, said)
}

#[tokio::test]
async fn data_files_no_commit_names_are_listed_by_verify_and_never_committed() {
    let w = Workdir::new();
    let bucket = idem_testkit::s3::fresh_bucket("ice-left").await;
    let catalog = fresh_schema("ice_left");
    let warehouse = format!("s3://{bucket}/warehouse");
    let mut input = String::new();
    for i in 0..2500 {
        input.push_str(&format!(
            "{{\"id\":\"e{i}\",\"n\":{i},\"at\":\"2026-11-30T10:00:00Z\",\"amount\":\"1\"}}\n"
        ));
    }
    w.write("ev.jsonl", &input);
    let sink = idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "lake.events");
    let cfg = w.write("c.toml", &config(&w, &sink));
    // Killed between writing the batches' files and the catalog commit.
    let out = idem()
        .arg("run")
        .arg(&cfg)
        .env("IDEM_FAILPOINTS", "after_write=1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stderr));
    let (left, said) = uncommitted(&cfg);
    assert!(
        said.contains("files the sink wrote are in no commit"),
        "{said}"
    );
    // Three batches of up to 1,000 rows, a file each.
    assert_eq!(left.len(), 3, "{said}");
    for l in &left {
        assert!(
            l.starts_with(&format!("s3://{bucket}/warehouse/lake/events/data/idem-")),
            "{l}"
        );
    }
    // The rerun writes its own files and commits them; the old ones stay
    // out of every snapshot and are the only ones listed.
    run_ok(idem().arg("run").arg(&cfg));
    let (after, said) = uncommitted(&cfg);
    assert!(
        said.contains("2500 rows: every message took effect exactly once"),
        "{said}"
    );
    assert_eq!(after, left, "{said}");
    let read = idem_testkit::iceberg::read(&catalog, &warehouse, "lake.events");
    assert_eq!(read.rows.len(), 2500);
}

/// A REST catalog (Iceberg's own REST server, scripts/iceberg-rest.sh):
/// the rows land once and PyIceberg's RestCatalog reads them; a runner
/// frozen between checking its epoch and committing is fenced by the one
/// that took its partition over, whose epoch bump moved the table.
#[tokio::test]
async fn through_a_rest_catalog_rows_land_once_and_a_frozen_runner_is_fenced() {
    two_frozen_runners(Cat::Rest).await;
}

/// The same through Glue's API (moto's, on the test store), read back by
/// PyIceberg's GlueCatalog. Moto does not refuse an update naming an old
/// table version, so this covers the requirement checks on the table the
/// Glue client loads, not the version check that settles two commits
/// landing at the same moment.
#[tokio::test]
async fn through_glue_rows_land_once_and_a_frozen_runner_is_fenced() {
    two_frozen_runners(Cat::Glue).await;
}

/// The same race through the SQL catalog, where the guard runs under the
/// table row's lock.
#[tokio::test]
async fn through_the_sql_catalog_a_runner_frozen_after_its_checks_is_fenced() {
    two_frozen_runners(Cat::Sql).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Cat {
    Sql,
    Rest,
    Glue,
}

/// Runner A freezes with its files written and its epoch checked; runner
/// B takes the file over (a newer epoch) and freezes likewise; A wakes
/// first and must be fenced, then B commits. Every line lands once.
async fn two_frozen_runners(cat: Cat) {
    let w = Workdir::new();
    let bucket = idem_testkit::s3::fresh_bucket("ice-rest").await;
    let namespace = fresh_schema("ice_frozen");
    let warehouse = format!("s3://{bucket}/warehouse");
    let table = format!("{namespace}.events");
    let read = |warehouse: &str, table: &str| match cat {
        Cat::Rest => idem_testkit::iceberg::read_rest(warehouse, table),
        Cat::Glue => idem_testkit::iceberg::read_glue(warehouse, table),
        Cat::Sql => idem_testkit::iceberg::read(&namespace, warehouse, table),
    };
    let n = 3000;
    let mut input = String::new();
    for i in 0..n {
        input.push_str(&format!(
            "{{\"id\":\"e{i}\",\"n\":{i},\"at\":\"2026-11-30T10:00:00Z\",\"amount\":\"1\"}}\n"
        ));
    }
    w.write("ev.jsonl", &input);
    let sink = match cat {
        Cat::Rest => idem_testkit::iceberg::rest_sink_lines(&warehouse, &table),
        Cat::Glue => idem_testkit::iceberg::glue_sink_lines(&warehouse, &table),
        Cat::Sql => idem_testkit::iceberg::sink_lines(&namespace, &warehouse, &table),
    };
    let cfg = w.write("c.toml", &config(&w, &sink));
    let out = run_ok(idem().arg("check").arg(&cfg));
    let said = text(&out.stdout);
    assert_eq!(said.contains("REST catalog"), cat == Cat::Rest, "{said}");
    assert_eq!(said.contains("Glue catalog"), cat == Cat::Glue, "{said}");
    // A frozen at its first commit, its files written and its epoch
    // checked on the table as loaded.
    let spawn = |failpoints: &str, log: &str| {
        idem()
            .env("IDEM_FAILPOINTS", failpoints)
            .env("RUST_LOG", "info")
            .arg("run")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(w.path(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let frozen = Reaped(spawn("before_catalog_commit=1:stop", "frozen.log"));
    wait_stopped(frozen.0.id(), &w.path("frozen.log"));
    // B opens the file's partition under a newer epoch (the bump is a
    // snapshot), writes its files and freezes before its commit too.
    let next = Reaped(spawn("before_catalog_commit=1:stop", "next.log"));
    wait_stopped(next.0.id(), &w.path("next.log"));
    // A wakes first: the table moved since it checked its epoch (B's bump),
    // so its commit is refused, and on a fresh load it finds itself fenced.
    signal(frozen.0.id(), "CONT");
    let mut frozen = frozen;
    frozen.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("frozen.log")).unwrap_or_default();
    assert!(log.contains("fenced"), "the woken runner:\n{log}");
    signal(next.0.id(), "CONT");
    let mut next = next;
    let status = next.0.wait().unwrap();
    let next_log = std::fs::read_to_string(w.path("next.log")).unwrap_or_default();
    assert!(status.success(), "{next_log}");
    let read = read(&warehouse, &table);
    let mut ids: Vec<&str> = read
        .rows
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (read.rows.len(), ids.len()),
        (n, n),
        "the woken runner:\n{log}\nthe next one:\n{next_log}"
    );
    let src = std::fs::canonicalize(w.path("ev.jsonl")).unwrap();
    assert_eq!(
        read.positions("ev").get(&src.display().to_string()),
        Some(&(input.len() as i64))
    );
    // A rerun adds nothing; the audit reads the table through the catalog.
    run_ok(idem().arg("run").arg(&cfg));
    let out = run_ok(idem().arg("verify").arg(&cfg));
    let verdict = text(&out.stdout);
    assert!(
        verdict.contains(&format!("{n} rows: every message took effect exactly once")),
        "{verdict}"
    );
}
