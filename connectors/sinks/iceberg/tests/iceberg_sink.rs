//! The Iceberg sink through the `Sink` trait, against the test PostgreSQL
//! (the SQL catalog) and a warehouse on the local disk; the rows read back
//! with the iceberg crate's own scan.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use arrow::array::{Array, Int64Array, StringArray};
use futures_util::TryStreamExt;
use idem_config::ColumnConfig;
use idem_core::{Sink, SinkError};
use idem_sink_iceberg::{IcebergSink, IcebergSinkConfig};
use idem_testkit::*;
use std::sync::Arc;

/// One test's catalog (its own name in the shared catalog tables) and
/// warehouse directory.
struct Target {
    catalog: String,
    warehouse: tempfile::TempDir,
}

impl Target {
    fn new(name: &str) -> Target {
        Target {
            catalog: fresh_schema(name),
            warehouse: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, create: bool) -> IcebergSinkConfig {
        self.config_with(create, "0s")
    }

    fn config_with(&self, create: bool, commit_interval: &str) -> IcebergSinkConfig {
        toml::from_str(&format!(
            r#"
warehouse = "file://{}"
namespace = "idem.test"
table = "events"
create = {create}
commit_interval = "{commit_interval}"
[catalog]
type = "sql"
url = "{}"
name = "{}"
"#,
            self.warehouse.path().display(),
            pg_url(),
            self.catalog
        ))
        .unwrap()
    }

    fn sink_of(&self, columns: Vec<ColumnConfig>) -> Arc<dyn Sink> {
        Arc::new(IcebergSink::new(self.config(true), columns).unwrap())
    }

    fn sink(&self) -> Arc<dyn Sink> {
        self.sink_of(columns())
    }

    /// `(id, v)` of the table's current snapshot, ordered.
    async fn rows(&self) -> Vec<(String, i64)> {
        self.read().await.0
    }

    /// `(id, v)` rows and the table's snapshot count.
    async fn read(&self) -> (Vec<(String, i64)>, usize) {
        let client = pg().await;
        let location: String = client
            .query_one(
                "SELECT metadata_location FROM iceberg_tables WHERE catalog_name = $1",
                &[&self.catalog],
            )
            .await
            .unwrap()
            .get(0);
        let io = ::iceberg::io::FileIO::new_with_fs();
        let table = ::iceberg::table::StaticTable::from_metadata_file(
            &location,
            ::iceberg::TableIdent::from_strs(["idem", "test", "events"]).unwrap(),
            io,
        )
        .await
        .unwrap()
        .into_table();
        let mut rows = Vec::new();
        let snapshots = table.metadata().snapshots().count();
        if table.metadata().current_snapshot().is_none() {
            return (rows, snapshots);
        }
        let batches: Vec<_> = table
            .scan()
            .select(["id", "v"])
            .build()
            .unwrap()
            .to_arrow()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        for b in batches {
            let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let vs = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                rows.push((
                    ids.value(i).to_string(),
                    if vs.is_null(i) { -1 } else { vs.value(i) },
                ));
            }
        }
        rows.sort();
        (rows, snapshots)
    }
}

/// `b` as the runner's second try of it.
fn retry(b: &Arc<idem_core::Batch>) -> Arc<idem_core::Batch> {
    Arc::new(idem_core::Batch {
        attempt: 1,
        ..(**b).clone()
    })
}

#[tokio::test]
async fn batches_commit_with_their_position_and_a_restart_recovers_it() {
    let t = Target::new("ice_append");
    let p = part("a");
    let sink = t.sink();
    sink.prepare().await.unwrap();
    let opened = sink.open(&p).await.unwrap();
    assert_eq!((opened.epoch, opened.next_offset), (1, None));
    let s = sink
        .commit(batch(&p, 1, vec![rec(0, "x", 1), rec(10, "y", 2)], 20))
        .await
        .unwrap();
    assert_eq!(s.written, 2);
    sink.commit(batch(&p, 1, vec![rec(20, "z", 3)], 30))
        .await
        .unwrap();
    let held = sink.describe().await.unwrap();
    assert!(held.contains("holds 3 rows in 2 data files"), "{held}");
    drop(sink);
    // A restart: the epoch moves on, the position comes back.
    let again = t.sink();
    again.prepare().await.unwrap();
    let opened = again.open(&p).await.unwrap();
    assert_eq!((opened.epoch, opened.next_offset), (2, Some(30)));
    let pos = again.positions("c").await.unwrap();
    assert_eq!(pos.len(), 1);
    assert_eq!(
        (pos[0].partition.as_str(), pos[0].next_offset, pos[0].epoch),
        ("a", Some(30), 2)
    );
    assert_eq!(t.rows().await, pairs(&[("x", 1), ("y", 2), ("z", 3)]));
}

#[tokio::test]
async fn a_fenced_runner_cannot_commit_and_the_new_owner_goes_on() {
    let t = Target::new("ice_fence");
    let p = part("a");
    let a = t.sink();
    a.prepare().await.unwrap();
    let ea = a.open(&p).await.unwrap().epoch;
    a.commit(batch(&p, ea, vec![rec(0, "a", 1)], 5))
        .await
        .unwrap();
    // Runner B takes the partition over.
    let b = t.sink();
    let opened = b.open(&p).await.unwrap();
    assert!(opened.epoch > ea);
    assert_eq!(opened.next_offset, Some(5));
    let err = a
        .commit(batch(&p, ea, vec![rec(5, "stale", 9)], 9))
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
    b.commit(batch(&p, opened.epoch, vec![rec(5, "b", 2)], 9))
        .await
        .unwrap();
    assert_eq!(t.rows().await, pairs(&[("a", 1), ("b", 2)]));
}

#[tokio::test]
async fn a_retried_batch_that_committed_is_not_appended_twice() {
    let t = Target::new("ice_retry");
    let p = part("a");
    let sink = t.sink();
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    let first = batch(&p, e, vec![rec(0, "a", 1), rec(10, "b", 2)], 20);
    sink.commit(first.clone()).await.unwrap();
    let again = sink.commit(retry(&first)).await.unwrap();
    assert_eq!((again.written, again.deduplicated), (0, 2));
    // A retry finding the position inside the batch: refused for good.
    let err = sink
        .commit(retry(&batch(&p, e, vec![rec(15, "c", 3)], 30)))
        .await
        .unwrap_err();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().contains("holds position 20"), "{err}");
    // A batch of dead letters alone moves the position, no data file.
    sink.commit(batch(&p, e, vec![], 25)).await.unwrap();
    assert_eq!(sink.open(&p).await.unwrap().next_offset, Some(25));
    assert_eq!(t.rows().await, pairs(&[("a", 1), ("b", 2)]));
}

#[tokio::test]
async fn an_existing_table_is_checked_against_the_columns() {
    let t = Target::new("ice_check");
    t.sink().prepare().await.unwrap();
    let mut other = columns();
    other[1] = col("v", idem_config::ColumnType::Double);
    let err = t.sink_of(other).prepare().await.unwrap_err();
    assert!(err.to_string().contains("column `v` is long"), "{err}");
    let missing = IcebergSink::new(
        {
            let mut c = t.config(false);
            c.table = "absent".into();
            c
        },
        columns(),
    )
    .unwrap();
    let err = missing.prepare().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("does not exist and create = false"),
        "{err}"
    );
}

#[tokio::test]
async fn staged_batches_of_all_partitions_commit_in_one_snapshot() {
    let t = Target::new("ice_staged");
    let (a, b) = (part("a"), part("b"));
    let sink: Arc<dyn Sink> =
        Arc::new(IcebergSink::new(t.config_with(true, "1h"), columns()).unwrap());
    sink.prepare().await.unwrap();
    assert_eq!(sink.stage_for(), Some(std::time::Duration::from_secs(3600)));
    let ea = sink.open(&a).await.unwrap().epoch;
    let eb = sink.open(&b).await.unwrap().epoch;
    for i in 0..3u64 {
        let s = sink
            .commit(batch(
                &a,
                ea,
                vec![rec(i * 10, &format!("a{i}"), 1)],
                i * 10 + 10,
            ))
            .await
            .unwrap();
        // Staged, nothing durable yet.
        assert_eq!((s.written, s.durable_through), (1, Some(0)));
    }
    let one = batch(&b, eb, vec![rec(0, "b0", 2)], 5);
    sink.commit(one.clone()).await.unwrap();
    // A retry of a staged batch is not staged twice.
    assert_eq!(sink.commit(one).await.unwrap().deduplicated, 1);
    assert_eq!(
        t.read().await,
        (vec![], 0),
        "nothing visible before the flush"
    );
    // One flush commits both partitions' batches in one snapshot.
    assert_eq!(sink.flush_staged(&a).await.unwrap(), Some(30));
    let (rows, snapshots) = t.read().await;
    assert_eq!(rows, pairs(&[("a0", 1), ("a1", 1), ("a2", 1), ("b0", 2)]));
    assert_eq!(snapshots, 1);
    assert_eq!(sink.flush_staged(&b).await.unwrap(), Some(5));
    assert_eq!(t.read().await.1, 1, "nothing left to commit");
    let pos = sink.positions("c").await.unwrap();
    let got: Vec<_> = pos
        .iter()
        .map(|p| (p.partition.as_str(), p.next_offset))
        .collect();
    assert_eq!(got, vec![("a", Some(30)), ("b", Some(5))]);

    // A partition another runner took is dropped from the commit; the
    // other's batches still commit.
    sink.commit(batch(&a, ea, vec![rec(30, "a3", 1)], 40))
        .await
        .unwrap();
    sink.commit(batch(&b, eb, vec![rec(5, "stale", 9)], 9))
        .await
        .unwrap();
    let other = t.sink();
    other.open(&b).await.unwrap();
    assert_eq!(sink.flush_staged(&a).await.unwrap(), Some(40));
    let err = sink.flush_staged(&b).await.unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
    let (rows, snapshots) = t.read().await;
    assert_eq!(
        rows,
        pairs(&[("a0", 1), ("a1", 1), ("a2", 1), ("a3", 1), ("b0", 2)])
    );
    assert_eq!(snapshots, 2);
}
