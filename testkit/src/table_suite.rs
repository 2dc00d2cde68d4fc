//! The conformance suite every table sink passes, written once: append and
//! recovery, fencing, upsert (the later offset wins, replays and identical
//! copies change nothing, tombstones delete), a version column (an older
//! change never undoes a newer delete), a batch
//! that fails leaving neither rows nor position, checks of existing tables,
//! and every column type. A sink's test file implements [`TableTarget`] and
//! instantiates the suite with `table_suite!(Target)`; the crash harness
//! ([`crate::crash`]) is its other half.

use crate::*;
use async_trait::async_trait;
use idem_config::{ColumnConfig, ColumnType, WriteMode};
use idem_core::{Batch, Op, Record, Sink, SinkError, Value};
use std::sync::Arc;

/// One sink's database for one test, and a reader of it that is not the
/// sink.
#[async_trait]
pub trait TableTarget: Send + Sync {
    /// A target of its own (a fresh file or schema) for test `name`.
    fn new(name: &str) -> Self;
    /// A sink writing to `table` of it.
    fn sink(
        &self,
        table: &str,
        mode: WriteMode,
        key: &[&str],
        version: Option<&str>,
        create: bool,
        columns: Vec<ColumnConfig>,
    ) -> Arc<dyn Sink>;
    /// Another runner on the same table: a sink of its own where the
    /// database allows two writers, else `first` (DuckDB locks its file
    /// to one process).
    fn second_runner(&self, first: &Arc<dyn Sink>, table: &str) -> Arc<dyn Sink>;
    /// Statements in the target's own dialect (tables made by hand). The
    /// sinks of a test are dropped before: DuckDB locks its file.
    async fn execute(&self, sql: &str);
    /// `(id, v)` of `table`, ordered, read by the target's own client.
    async fn rows(&self, table: &str) -> Vec<(String, i64)>;
    /// `(id, column)` of `table` for a text `column`, ordered by id.
    async fn text_column(&self, table: &str, column: &str) -> Vec<(String, Option<String>)>;
    /// How the target names the types of text and bigint columns.
    fn type_names(&self) -> (&'static str, &'static str);
    /// A table name as written in `execute`'s statements.
    fn table(&self, name: &str) -> String;
    /// Whether an upsert table must have its key as primary key (DuckDB's
    /// sink keeps keys unique itself, and takes tables without one).
    fn upsert_needs_primary_key(&self) -> bool {
        true
    }
    /// The row of table `types` (see [`crate::all_types`]) as
    /// (t, b, i, d, ok, at in µs since the epoch, day, doc's t, u, raw).
    async fn types_row(&self) -> TypesRow;
    /// The sink of [`TableTarget::sink`] (columns [`crate::columns`]),
    /// keeping message ids for `retention` (`[dedup] store = "sink"`): for
    /// the targets that run the kept-ids cases (`table_suite!(kept_ids T)`).
    fn sink_keeping_ids(
        &self,
        _table: &str,
        _mode: WriteMode,
        _key: &[&str],
        _create: bool,
        _retention: std::time::Duration,
    ) -> Arc<dyn Sink> {
        unimplemented!("this target keeps no message ids")
    }
}

pub type TypesRow = (
    String,
    i64,
    i32,
    f64,
    bool,
    i64,
    String,
    String,
    String,
    Vec<u8>,
);

pub async fn append_commits_rows_and_position_and_recovers_them<T: TableTarget>(t: T) {
    let p = part("a");
    let sink = t.sink("t", WriteMode::Append, &[], None, true, columns());
    sink.prepare().await.unwrap();
    let opened = sink.open(&p).await.unwrap();
    assert_eq!((opened.epoch, opened.next_offset), (1, None));
    let stats = sink
        .commit(batch(&p, 1, vec![rec(0, "x", 1), rec(10, "x", 2)], 20))
        .await
        .unwrap();
    assert_eq!((stats.written, stats.deduplicated), (2, 0));
    assert!(sink.describe().await.unwrap().contains("holds 2 rows"));
    drop(sink);
    // A restart: a new sink, the epoch moves on, the position comes back.
    let again = t.sink("t", WriteMode::Append, &[], None, true, columns());
    again.prepare().await.unwrap();
    let opened = again.open(&p).await.unwrap();
    assert_eq!((opened.epoch, opened.next_offset), (2, Some(20)));
    let pos = again.positions("c").await.unwrap();
    assert_eq!(pos.len(), 1);
    assert_eq!(
        (pos[0].partition.as_str(), pos[0].next_offset),
        ("a", Some(20))
    );
    drop(again);
    assert_eq!(t.rows("t").await, pairs(&[("x", 1), ("x", 2)]));
}

pub async fn a_fenced_runner_cannot_commit<T: TableTarget>(t: T) {
    let p = part("a");
    let runner_a = t.sink("t", WriteMode::Append, &[], None, true, columns());
    runner_a.prepare().await.unwrap();
    let a = runner_a.open(&p).await.unwrap();
    runner_a
        .commit(batch(&p, a.epoch, vec![rec(0, "a", 1)], 5))
        .await
        .unwrap();
    // Runner B takes the partition over.
    let runner_b = t.second_runner(&runner_a, "t");
    let b = runner_b.open(&p).await.unwrap();
    assert!(b.epoch > a.epoch);
    let err = runner_a
        .commit(batch(&p, a.epoch, vec![rec(5, "stale", 9)], 9))
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
    assert!(!err.is_retriable());
    // The new owner goes on from the committed position.
    assert_eq!(runner_b.open(&p).await.unwrap().next_offset, Some(5));
    drop((runner_a, runner_b));
    assert_eq!(t.rows("t").await, pairs(&[("a", 1)]));
}

/// `b` as the runner's second try of it.
fn retry(b: &Arc<Batch>) -> Arc<Batch> {
    Arc::new(Batch {
        attempt: 1,
        ..(**b).clone()
    })
}

/// The runner retries a batch whose commit failed in transit. When the
/// commit had landed and only its answer was lost, the retry finds the
/// position at the batch's end: it reports success and writes nothing.
pub async fn a_retried_batch_whose_commit_landed_is_not_written_twice<T: TableTarget>(t: T) {
    let p = part("a");
    let sink = t.sink("t", WriteMode::Append, &[], None, true, columns());
    sink.prepare().await.unwrap();
    let epoch = sink.open(&p).await.unwrap().epoch;
    let first = batch(&p, epoch, vec![rec(0, "a", 1), rec(10, "b", 2)], 20);
    sink.commit(first.clone()).await.unwrap();
    let again = sink.commit(retry(&first)).await.unwrap();
    assert_eq!(
        (again.written, again.deduplicated),
        (0, 2),
        "already there: counted as copies"
    );
    let held = sink.describe().await.unwrap();
    assert!(held.contains("holds 2 rows"), "{held}");
    sink.commit(batch(&p, epoch, vec![rec(20, "c", 3)], 30))
        .await
        .unwrap();
    // A retry finding a position inside the batch: not left by this
    // runner, refused for good, nothing written.
    let err = sink
        .commit(retry(&batch(&p, epoch, vec![rec(25, "d", 4)], 40)))
        .await
        .unwrap_err();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().contains("holds position 30"), "{err}");
    assert_eq!(sink.open(&p).await.unwrap().next_offset, Some(30));
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("a", 1), ("b", 2), ("c", 3)]));
}

pub async fn upsert_keeps_the_newest_and_never_lets_a_replay_win<T: TableTarget>(t: T) {
    let p = part("a");
    let sink = t.sink("t", WriteMode::Upsert, &["id"], None, true, columns());
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    // In one batch the later offset of a key wins.
    let s = sink
        .commit(batch(
            &p,
            e,
            vec![rec(0, "a", 1), rec(1, "b", 1), rec(2, "a", 2)],
            3,
        ))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (2, 1));
    // A replay of older offsets changes nothing.
    let s = sink
        .commit(batch(&p, e, vec![rec(0, "a", 1)], 3))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (0, 1));
    // A newer message with the same content is a duplicate too.
    let s = sink
        .commit(batch(&p, e, vec![rec(7, "b", 1)], 8))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (0, 1));
    // A tombstone deletes; a later upsert in the same batch recreates.
    let s = sink
        .commit(batch(
            &p,
            e,
            vec![del(8, "a"), del(9, "b"), rec(10, "b", 5)],
            11,
        ))
        .await
        .unwrap();
    assert_eq!(s.written, 2);
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("b", 5)]));
}

pub async fn upsert_with_a_version_column_ignores_older_events<T: TableTarget>(t: T) {
    let p = part("a");
    let sink = t.sink("t", WriteMode::Upsert, &["id"], Some("v"), true, columns());
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 10)], 1))
        .await
        .unwrap();
    // Later in the log but older by version: refused.
    let s = sink
        .commit(batch(&p, e, vec![rec(1, "a", 5)], 2))
        .await
        .unwrap();
    assert_eq!(s.written, 0);
    // Within a batch the larger version wins whatever the order.
    sink.commit(batch(&p, e, vec![rec(2, "b", 9), rec(3, "b", 3)], 4))
        .await
        .unwrap();
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("a", 10), ("b", 9)]));
}

/// A delete of a versioned key leaves no row to compare with: an older
/// change of that key re-delivered after it must still not bring it back.
pub async fn a_versioned_delete_is_not_undone_by_an_older_change<T: TableTarget>(t: T) {
    let del_v = |offset, id: &str, v| Record {
        offset,
        op: Op::Delete,
        values: vec![Value::Text(id.into()), Value::BigInt(v)].into(),
        id: None,
    };
    let p = part("a");
    let sink = t.sink("t", WriteMode::Upsert, &["id"], Some("v"), true, columns());
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 5), rec(1, "b", 5)], 2))
        .await
        .unwrap();
    sink.commit(batch(&p, e, vec![del_v(2, "a", 6)], 3))
        .await
        .unwrap();
    // Re-delivered (a replay that has not reached the delete yet): the
    // change before the delete.
    let s = sink
        .commit(batch(&p, e, vec![rec(3, "a", 5)], 4))
        .await
        .unwrap();
    assert_eq!(s.written, 0, "an older change brought a deleted row back");
    // An older delete leaves a newer row alone.
    let s = sink
        .commit(batch(&p, e, vec![del_v(5, "b", 4)], 6))
        .await
        .unwrap();
    assert_eq!(s.written, 0);
    // A change newer than the delete brings the key back; alone in its
    // batch (the direct path) or picked among others.
    sink.commit(batch(&p, e, vec![rec(6, "a", 7)], 7))
        .await
        .unwrap();
    // Within a batch the delete of the larger version wins; its grave then
    // holds off the older change that follows in the log.
    sink.commit(batch(&p, e, vec![del_v(7, "b", 9), rec(8, "b", 8)], 9))
        .await
        .unwrap();
    sink.commit(batch(&p, e, vec![rec(9, "b", 8), rec(10, "c", 1)], 11))
        .await
        .unwrap();
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("a", 7), ("c", 1)]));
}

pub async fn a_failed_batch_leaves_neither_rows_nor_position<T: TableTarget>(t: T) {
    let (text, bigint) = t.type_names();
    // A table made by hand with a constraint the second row breaks.
    t.execute(&format!(
        "CREATE TABLE {} (id {text}, v {bigint} CHECK (v < 100), _idem_partition {text} NOT NULL, _idem_offset {bigint} NOT NULL)",
        t.table("t")
    ))
    .await;
    let p = part("a");
    let sink = t.sink("t", WriteMode::Append, &[], None, false, columns());
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "ok", 1)], 1))
        .await
        .unwrap();
    let err = sink
        .commit(batch(&p, e, vec![rec(1, "x", 2), rec(2, "y", 500)], 3))
        .await
        .unwrap_err();
    assert!(
        !err.is_retriable(),
        "a constraint violation is permanent: {err}"
    );
    assert!(
        err.to_string().to_lowercase().contains("constraint"),
        "{err}"
    );
    assert_eq!(sink.open(&p).await.unwrap().next_offset, Some(1));
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("ok", 1)]));
}

/// Columns learnt from the source's schema (`Batch::columns`): added in the
/// batch's transaction (a fenced batch adds nothing), again harmlessly
/// after a restart, and refused when the table holds another type.
pub async fn learnt_columns_are_added_in_the_batch_transaction<T: TableTarget>(t: T) {
    let p = part("a");
    let sink = t.sink("t", WriteMode::Upsert, &["id"], None, true, columns());
    if sink.info().adds_columns.is_none() {
        // The runner refuses `evolve` for this sink at start.
        return;
    }
    let learnt = |ty| {
        let mut c = columns();
        c.push(col("note", ty));
        Some(Arc::new(c))
    };
    let noted = |offset, id: &str, v, note: Option<&str>| Record {
        offset,
        op: Op::Upsert,
        values: vec![
            Value::Text(id.into()),
            Value::BigInt(v),
            note.map_or(Value::Null, |n| Value::Text(n.into())),
        ]
        .into(),
        id: None,
    };
    let with = |columns, records, next| {
        let mut b = Arc::unwrap_or_clone(batch(&p, 0, records, next));
        b.columns = columns;
        b
    };
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    // The partition is opened again (a newer runner): the stale batch
    // that brings the column is fenced, and its column goes with it.
    let newer = sink.open(&p).await.unwrap().epoch;
    let stale = Batch {
        epoch: e,
        ..with(
            learnt(ColumnType::Text),
            vec![noted(1, "b", 2, Some("x"))],
            2,
        )
    };
    let err = sink.commit(Arc::new(stale)).await.unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
    let fresh = Batch {
        epoch: newer,
        ..with(
            learnt(ColumnType::Text),
            vec![noted(1, "b", 2, Some("x")), noted(2, "a", 3, None)],
            3,
        )
    };
    sink.commit(Arc::new(fresh)).await.unwrap();
    drop(sink);
    // A restart: the sink starts from the configured columns and meets
    // the learnt one again, already in the table.
    let again = t.sink("t", WriteMode::Upsert, &["id"], None, true, columns());
    again.prepare().await.unwrap();
    let e = again.open(&p).await.unwrap().epoch;
    let next = Batch {
        epoch: e,
        ..with(
            learnt(ColumnType::Text),
            vec![noted(3, "c", 4, Some("y"))],
            4,
        )
    };
    again.commit(Arc::new(next)).await.unwrap();
    drop(again);
    // After another restart the schema says bigint (it changed while the
    // runner was down), the table holds text: refused, named.
    let again = t.sink("t", WriteMode::Upsert, &["id"], None, true, columns());
    again.prepare().await.unwrap();
    let e = again.open(&p).await.unwrap().epoch;
    let mut clash = rec(4, "d", 5);
    let mut values = clash.values.to_values();
    values.push(Value::BigInt(1));
    clash.values = values.into();
    let clash = Batch {
        epoch: e,
        ..with(learnt(ColumnType::Bigint), vec![clash], 5)
    };
    let err = again.commit(Arc::new(clash)).await.unwrap_err();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().contains("`note`"), "{err}");
    assert_eq!(again.open(&p).await.unwrap().next_offset, Some(4));
    drop(again);
    assert_eq!(t.rows("t").await, pairs(&[("a", 3), ("b", 2), ("c", 4)]));
    assert_eq!(
        t.text_column("t", "note").await,
        [
            ("a".to_string(), None),
            ("b".to_string(), Some("x".to_string())),
            ("c".to_string(), Some("y".to_string()))
        ]
    );
}

pub async fn existing_tables_are_checked_before_the_first_write<T: TableTarget>(t: T) {
    let (text, bigint) = t.type_names();
    t.execute(&format!(
        "CREATE TABLE {} (id {text} PRIMARY KEY, v {text}, _idem_partition {text}, _idem_offset {bigint})",
        t.table("t")
    ))
    .await;
    t.execute(&format!(
        "CREATE TABLE {} (id {text}, v {bigint}, _idem_partition {text}, _idem_offset {bigint})",
        t.table("nokey")
    ))
    .await;
    t.execute(&format!(
        "CREATE TABLE {} (id {text}, v {bigint}, _idem_partition {text}, _idem_offset {bigint}, PRIMARY KEY (id, v))",
        t.table("widekey")
    ))
    .await;
    let err = t
        .sink("t", WriteMode::Upsert, &["id"], None, true, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("column `v` is {text}")) && err.contains(bigint),
        "{err}"
    );
    let err = t
        .sink("missing", WriteMode::Append, &[], None, false, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing") && err.contains("does not exist"),
        "{err}"
    );
    let nokey = t
        .sink("nokey", WriteMode::Upsert, &["id"], None, true, columns())
        .prepare()
        .await;
    if t.upsert_needs_primary_key() {
        let err = nokey.unwrap_err().to_string();
        assert!(
            err.contains("PRIMARY KEY (id)") && err.contains("none"),
            "{err}"
        );
    } else {
        nokey.unwrap();
    }
    // A key of more columns would merge on the wrong rows.
    let err = t
        .sink("widekey", WriteMode::Upsert, &["id"], None, true, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs PRIMARY KEY (id); the table has PRIMARY KEY (id, v)"),
        "{err}"
    );
}

/// Upserts into tables made by hand: keyed on the key (any target), and,
/// where the target takes one, without a key: either way one row per key,
/// holding its newest message.
pub async fn upserts_into_hand_made_tables_keep_one_row_per_key<T: TableTarget>(t: T) {
    let (text, bigint) = t.type_names();
    let mut tables = vec![("keyed", ", PRIMARY KEY (id)")];
    if !t.upsert_needs_primary_key() {
        tables.push(("unkeyed", ""));
    }
    for (table, key) in tables {
        t.execute(&format!(
            "CREATE TABLE {} (id {text} NOT NULL, v {bigint}, _idem_partition {text} NOT NULL, _idem_offset {bigint} NOT NULL{key})",
            t.table(table)
        ))
        .await;
        // A partition per table: they share one offsets table.
        let p = part(table);
        let sink = t.sink(table, WriteMode::Upsert, &["id"], None, false, columns());
        sink.prepare().await.unwrap();
        let e = sink.open(&p).await.unwrap().epoch;
        let first = vec![rec(0, "a", 1), rec(1, "b", 2)];
        sink.commit(batch(&p, e, first, 2)).await.unwrap();
        let second = vec![rec(2, "a", 3), rec(3, "c", 4), rec(4, "c", 5)];
        let s = sink.commit(batch(&p, e, second, 5)).await.unwrap();
        assert_eq!(s.written, 2, "{table}: a updated, c inserted once");
        drop(sink);
        assert_eq!(
            t.rows(table).await,
            pairs(&[("a", 3), ("b", 2), ("c", 5)]),
            "{table}"
        );
    }
}

pub async fn every_column_type_round_trips<T: TableTarget>(t: T) {
    let p = part("a");
    let (cols, record) = all_types();
    let sink = t.sink("types", WriteMode::Append, &[], None, true, cols);
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![record], 1)).await.unwrap();
    drop(sink);
    assert_eq!(
        t.types_row().await,
        (
            "hé".into(),
            9007199254740993,
            -7,
            2.5,
            false,
            1_772_352_000_123_456, // 2026-03-01T08:00:00.123456Z
            "1969-12-31".into(),
            "hé".into(),
            "67e55044-10b1-426f-9247-bb680e5fe0c8".into(),
            vec![0u8, 1, 2, 255],
        )
    );
}

/// One `#[tokio::test]` per case of the suite, against `$target`.
/// `rec` carrying message id `id`.
fn with_id(offset: u64, key: &str, v: i64, id: &str) -> Record {
    Record {
        id: Some(id.into()),
        ..rec(offset, key, v)
    }
}

/// `[dedup] store = "sink"`, appending: a copy of an id is dropped in its
/// batch, in a later batch, in another partition and after a restart; a
/// batch that fails
/// after its ids were recorded leaves none of them; ids past the
/// retention are forgotten.
pub async fn kept_ids_drop_copies_of_appended_messages<T: TableTarget>(t: T) {
    let hour = std::time::Duration::from_secs(3600);
    let (p, q) = (part("a"), part("b"));
    let sink = t.sink_keeping_ids("t", WriteMode::Append, &[], true, hour);
    assert!(sink.info().ids_table.is_some());
    sink.prepare().await.unwrap();
    let (e, eq) = (
        sink.open(&p).await.unwrap().epoch,
        sink.open(&q).await.unwrap().epoch,
    );
    let three = vec![
        with_id(0, "x", 1, "e1"),
        with_id(1, "y", 2, "e2"),
        with_id(2, "x", 1, "e1"),
    ];
    let s = sink.commit(batch(&p, e, three, 3)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (2, 1));
    let two = vec![with_id(0, "y", 2, "e2"), with_id(1, "z", 3, "e3")];
    let s = sink.commit(batch(&q, eq, two, 2)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    drop(sink);
    // A restarted sink has recorded nothing lately: it meets e3 in the
    // table (a PostgreSQL sink's `COPY` of new-looking ids fails on it and
    // the batch checks every id instead).
    let sink = t.sink_keeping_ids("t", WriteMode::Append, &[], true, hour);
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    let late = vec![with_id(3, "z", 3, "e3"), with_id(4, "w", 4, "e4")];
    let s = sink.commit(batch(&p, e, late, 5)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    drop(sink);
    assert_eq!(
        t.rows("t").await,
        pairs(&[("w", 4), ("x", 1), ("y", 2), ("z", 3)])
    );

    // A hand-made table whose constraint the batch breaks after its ids
    // went in: retried with a good value, every id is still new.
    let (text, bigint) = t.type_names();
    t.execute(&format!(
        "CREATE TABLE {} (id {text}, v {bigint} CHECK (v < 100), _idem_partition {text} NOT NULL, _idem_offset {bigint} NOT NULL)",
        t.table("c")
    ))
    .await;
    let sink = t.sink_keeping_ids("c", WriteMode::Append, &[], false, hour);
    sink.prepare().await.unwrap();
    // A partition of its own: `t`'s is past these offsets.
    let p = part("c");
    let e = sink.open(&p).await.unwrap().epoch;
    let bad = vec![with_id(0, "x", 1, "f1"), with_id(1, "y", 500, "f2")];
    sink.commit(batch(&p, e, bad, 2)).await.unwrap_err();
    let good = vec![with_id(0, "x", 1, "f1"), with_id(1, "y", 5, "f2")];
    let s = sink.commit(batch(&p, e, good, 2)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (2, 0));
    drop(sink);

    // Ids are forgotten after the retention: a new sink purges at its
    // first commit.
    let short = std::time::Duration::from_millis(1);
    let sink = t.sink_keeping_ids("c", WriteMode::Append, &[], false, short);
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let again = vec![with_id(2, "x", 1, "f1")];
    let s = sink.commit(batch(&p, e, again, 3)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 0));
    drop(sink);
    assert_eq!(t.rows("c").await, pairs(&[("x", 1), ("x", 1), ("y", 5)]));
}

/// `[dedup] store = "sink"`, upserting the latest message per key: a
/// re-emitted copy of an older event, at a later offset, in a later batch
/// or the same one, never overwrites the newer row.
pub async fn kept_ids_keep_a_replayed_old_event_from_winning<T: TableTarget>(t: T) {
    let hour = std::time::Duration::from_secs(3600);
    let p = part("a");
    let sink = t.sink_keeping_ids("t", WriteMode::Upsert, &["id"], true, hour);
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    let first = vec![with_id(0, "x", 1, "e1"), with_id(1, "x", 2, "e2")];
    sink.commit(batch(&p, e, first, 2)).await.unwrap();
    let copy = vec![with_id(2, "x", 1, "e1"), with_id(3, "y", 7, "e3")];
    let s = sink.commit(batch(&p, e, copy, 4)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    // In one batch: y's newer event, then a copy of its older one.
    let mixed = vec![with_id(4, "y", 8, "e4"), with_id(5, "y", 7, "e3")];
    let s = sink.commit(batch(&p, e, mixed, 6)).await.unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    drop(sink);
    assert_eq!(t.rows("t").await, pairs(&[("x", 2), ("y", 8)]));
}

#[macro_export]
macro_rules! table_suite {
    ($target:ty) => {
        $crate::table_suite!(@cases $target;
            append_commits_rows_and_position_and_recovers_them,
            a_fenced_runner_cannot_commit,
            a_retried_batch_whose_commit_landed_is_not_written_twice,
            upsert_keeps_the_newest_and_never_lets_a_replay_win,
            upsert_with_a_version_column_ignores_older_events,
            a_versioned_delete_is_not_undone_by_an_older_change,
            a_failed_batch_leaves_neither_rows_nor_position,
            learnt_columns_are_added_in_the_batch_transaction,
            existing_tables_are_checked_before_the_first_write,
            upserts_into_hand_made_tables_keep_one_row_per_key,
            every_column_type_round_trips,
        );
    };
    (kept_ids $target:ty) => {
        $crate::table_suite!(@cases $target;
            kept_ids_drop_copies_of_appended_messages,
            kept_ids_keep_a_replayed_old_event_from_winning,
        );
    };
    (@cases $target:ty; $($case:ident,)*) => {
        $(
            #[tokio::test]
            async fn $case() {
                use $crate::table_suite::TableTarget;
                $crate::table_suite::$case(<$target>::new(stringify!($case))).await;
            }
        )*
    };
}
