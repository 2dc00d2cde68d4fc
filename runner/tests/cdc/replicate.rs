//! One table replicated while Idem runs, with and without the JSON
//! converter's schemas, and into a table of the user's own whose columns
//! Idem takes (`columns_from = "table"`).

use crate::support::*;
use idem_testkit::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_replicate_a_table_exactly() {
    replicate(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_the_json_converters_schemas() {
    replicate(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_into_an_existing_table_whose_columns_idem_takes() {
    replicate(false, true).await;
}

/// A snapshot, then inserts, updates, deletes and primary-key updates,
/// captured by Debezium while Idem runs. With `from_table`, the target is
/// created beforehand (a `varchar` column, and one of its own the source
/// lacks) and only the key and version columns are listed.
async fn replicate(schemas: bool, from_table: bool) {
    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{src}\"; {}",
        seeded(&src, "customers", 200)
    ))
    .await
    .unwrap();
    if from_table {
        db.batch_execute(&format!(
            "CREATE SCHEMA \"{dst}\";
             CREATE TABLE \"{dst}\".customers (id bigint PRIMARY KEY, name varchar(100), n bigint,
                 lsn bigint, loaded_at timestamptz DEFAULT now(),
                 _idem_partition text, _idem_offset bigint);"
        ))
        .await
        .unwrap();
    }
    let capture = Capture::start(&src, &["customers"], schemas).await;

    let w = Workdir::new();
    // With the schemas, no version column: the guard is optional.
    let mut toml = connector(
        "cdc",
        &capture.topics[0],
        &format!("{src}_idem"),
        &postgres_sink(&dst, "customers"),
        Shape::Replica {
            versioned: !schemas,
            learns: false,
        },
        &w.path("cdc.deadletter.jsonl"),
        if from_table {
            &[("id", "bigint")]
        } else {
            &WORKLOAD_COLUMNS
        },
    );
    if from_table {
        toml = toml
            .replace(
                "envelope = \"debezium\"\n",
                "envelope = \"debezium\"\ncolumns_from = \"table\"\n",
            )
            .replace(
                "type = \"postgres\"\n",
                "type = \"postgres\"\ncreate = false\n",
            );
    }
    let cfg = w.write("cdc.toml", &toml);
    let mut runner = spawn_logged(&cfg, &w.path("idem.log"));

    // Changes while it runs: updates, deletes, inserts, key updates.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..600 {
        db.batch_execute(&change(&src, "customers", &mut rng, i, false))
            .await
            .unwrap();
    }

    let started = Instant::now();
    let mut diff = differences(&src, &dst, "customers", COLUMNS).await;
    while diff != 0 && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        diff = differences(&src, &dst, "customers", COLUMNS).await;
    }
    signal(runner.0.id(), "TERM");
    let status = runner.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("idem.log")).unwrap_or_default();
    assert!(status.success(), "idem run: {status:?}\n{log}");
    let rows: i64 = db
        .query_one(&format!("SELECT count(*) FROM \"{src}\".customers"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 100, "the workload left only {rows} rows: too weak");
    let dead = std::fs::read_to_string(w.path("cdc.deadletter.jsonl")).unwrap_or_default();
    assert_eq!(
        diff, 0,
        "{diff} rows differ between the source and the target\n{log}\ndead letters:\n{dead}"
    );
    assert!(dead.is_empty(), "dead letters:\n{dead}");
    assert_eq!(
        log.contains("without a version column"),
        schemas,
        "the start-up warning about the version guard\n{log}"
    );

    // `idem verify --against` agrees, then finds what is planted.
    let verify = || {
        idem()
            .arg("verify")
            .arg(&cfg)
            .arg("--against")
            .arg(pg_url())
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(
        out.status.success() && text(&out.stdout).contains("equals the source row for row"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let t = format!("\"{dst}\".customers");
    let (gone, changed): (i64, i64) = {
        let r = db
            .query_one(&format!("SELECT min(id), max(id) FROM {t}"), &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    db.batch_execute(&format!(
        "DELETE FROM {t} WHERE id = {gone};
         UPDATE {t} SET name = 'tampered' WHERE id = {changed};
         INSERT INTO {t} (id, name, n, _idem_partition, _idem_offset) VALUES (-7, 'stray', 0, 'x', 0);"
    ))
    .await
    .unwrap();
    let out = verify();
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for finding in [
        format!("missing: id={gone}"),
        format!("differs: id={changed}: column `name`"),
        "not in the source: id=-7".to_string(),
        "3 findings".to_string(),
    ] {
        assert!(said.contains(&finding), "no `{finding}` in:\n{said}");
    }
    capture.stop().await;
}
