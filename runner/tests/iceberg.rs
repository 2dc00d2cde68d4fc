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
