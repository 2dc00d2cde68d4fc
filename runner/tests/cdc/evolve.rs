//! A column that changes type in the source, on a replica that learnt it
//! from the schema: the connector stops before the change, naming the
//! column and both types; the documented fix (alter the target column,
//! list it with its new type) resumes it with nothing lost.

use crate::support::*;
use idem_testkit::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learnt_column_that_changes_type_stops_until_it_is_listed() {
    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{src}\";
         CREATE TABLE \"{src}\".items (id bigint PRIMARY KEY, qty integer);
         INSERT INTO \"{src}\".items SELECT i, i * 10 FROM generate_series(1, 3) i;"
    ))
    .await
    .unwrap();
    let capture = Capture::start(&src, &["items"], true).await;
    // A migration changes the column's type, then a change uses it.
    db.batch_execute(&format!(
        "ALTER TABLE \"{src}\".items ALTER COLUMN qty TYPE text USING qty::text;
         UPDATE \"{src}\".items SET qty = 'many' WHERE id = 2;"
    ))
    .await
    .unwrap();

    let w = Workdir::new();
    let dead = w.path("items.deadletter.jsonl");
    let config = |columns: &[(&str, &str)]| {
        connector(
            "items",
            &capture.topics[0],
            &format!("{src}_items"),
            &postgres_sink(&dst, "items"),
            Shape::Replica {
                versioned: true,
                learns: true,
            },
            &dead,
            columns,
        )
    };
    let cfg = w.write("items.toml", &config(&[("id", "bigint")]));
    let mut runner = spawn_logged(&cfg, &w.path("idem.log"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = runner.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "idem run did not stop on the type change"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = std::fs::read_to_string(w.path("idem.log")).unwrap_or_default();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("column `qty` changed type")
            && log.contains("integer")
            && log.contains("text"),
        "{log}"
    );
    // What came before the change committed; the change did not.
    let rows: Vec<(i64, Option<i32>)> = db
        .query(
            &format!("SELECT id, qty FROM \"{dst}\".items ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [(1, Some(10)), (2, Some(20)), (3, Some(30))], "{log}");

    // The fix the error names: the target column altered, listed anew.
    db.batch_execute(&format!(
        "ALTER TABLE \"{dst}\".items ALTER COLUMN qty TYPE text"
    ))
    .await
    .unwrap();
    let cfg = w.write(
        "items.toml",
        &config(&[("id", "bigint"), ("qty", "text")])
            .replace("group_id = ", "stop_at_end = true\ngroup_id = "),
    );
    run_ok(idem().arg("run").arg(&cfg));
    let diff = differences(&src, &dst, "items", "id, qty").await;
    assert_eq!(diff, 0, "rows differ after the fix");
    let dead = std::fs::read_to_string(&dead).unwrap_or_default();
    assert!(dead.is_empty(), "dead letters:\n{dead}");
    capture.stop().await;
}
