//! DuckDB sink against a real DuckDB file: modes, types, the version guard,
//! tombstones, fencing, recovery, schema checks and atomicity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem_core::{Sink, SinkError};
use idem_sink_duckdb::{DuckDbSink, DuckDbSinkConfig, Mode};

fn sink_cfg(w: &Workdir, mode: Mode, key: &[&str]) -> DuckDbSinkConfig {
    DuckDbSinkConfig {
        path: w.path("t.duckdb").display().to_string(),
        table: "t".into(),
        mode,
        key: key.iter().map(|s| s.to_string()).collect(),
        version: None,
        delete_on_tombstone: mode == Mode::Upsert,
        create: true,
        offsets_table: "idem_offsets".into(),
        threads: Some(1),
        memory_limit: "1GB".into(),
        checkpoint_threshold: "256MB".into(),
    }
}

/// Rows of (id, v) ordered by id, read through a separate connection
/// after the sink is dropped (DuckDB locks the file).
fn rows(w: &Workdir) -> Vec<(String, i64)> {
    let db = duck(&w.path("t.duckdb"));
    let mut stmt = db.prepare("SELECT id, v FROM t ORDER BY id, v").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn append_commits_rows_and_position_and_recovers_them() {
    let w = Workdir::new();
    let p = part("a");
    {
        let sink = DuckDbSink::new(sink_cfg(&w, Mode::Append, &[]), columns());
        sink.prepare().await.unwrap();
        let opened = sink.open(&p).await.unwrap();
        assert_eq!((opened.epoch, opened.next_offset), (1, None));
        let stats = sink
            .commit(batch(&p, 1, vec![rec(0, "x", 1), rec(10, "x", 2)], 20))
            .await
            .unwrap();
        assert_eq!((stats.written, stats.deduplicated), (2, 0));
        assert!(sink.describe().await.unwrap().contains("holds 2 rows"));
    }
    // A restart: the epoch moves on and the position comes from the sink.
    let sink = DuckDbSink::new(sink_cfg(&w, Mode::Append, &[]), columns());
    sink.prepare().await.unwrap();
    let opened = sink.open(&p).await.unwrap();
    assert_eq!((opened.epoch, opened.next_offset), (2, Some(20)));
    let pos = sink.positions("c").await.unwrap();
    assert_eq!(pos.len(), 1);
    assert_eq!(
        (pos[0].partition.as_str(), pos[0].next_offset),
        ("a", Some(20))
    );
    drop(sink);
    assert_eq!(rows(&w), pairs(&[("x", 1), ("x", 2)]));
}

#[tokio::test]
async fn a_fenced_runner_cannot_commit() {
    let w = Workdir::new();
    let p = part("a");
    {
        let sink = DuckDbSink::new(sink_cfg(&w, Mode::Append, &[]), columns());
        sink.prepare().await.unwrap();
        let a = sink.open(&p).await.unwrap();
        sink.commit(batch(&p, a.epoch, vec![rec(0, "a", 1)], 5))
            .await
            .unwrap();
        // A second runner takes the partition over.
        let b = sink.open(&p).await.unwrap();
        assert!(b.epoch > a.epoch);
        let err = sink
            .commit(batch(&p, a.epoch, vec![rec(5, "stale", 9)], 9))
            .await
            .unwrap_err();
        assert!(matches!(err, SinkError::Fenced { .. }), "{err}");
        assert!(!err.is_retriable());
        // The new owner goes on from the committed position.
        let again = sink.open(&p).await.unwrap();
        assert_eq!(again.next_offset, Some(5));
    }
    assert_eq!(rows(&w), pairs(&[("a", 1)]));
}

#[tokio::test]
async fn upsert_keeps_the_newest_and_never_lets_a_replay_win() {
    let w = Workdir::new();
    let p = part("a");
    {
        let sink = DuckDbSink::new(sink_cfg(&w, Mode::Upsert, &["id"]), columns());
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
    }
    assert_eq!(rows(&w), pairs(&[("b", 5)]));
}

#[tokio::test]
async fn upsert_with_a_version_column_ignores_older_events() {
    let w = Workdir::new();
    let p = part("a");
    {
        let mut cfg = sink_cfg(&w, Mode::Upsert, &["id"]);
        cfg.version = Some("v".into());
        let sink = DuckDbSink::new(cfg, columns());
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
    }
    assert_eq!(rows(&w), pairs(&[("a", 10), ("b", 9)]));
}

#[tokio::test]
async fn a_failed_batch_leaves_neither_rows_nor_position() {
    let w = Workdir::new();
    let p = part("a");
    {
        // A table made by hand with a constraint the second row breaks.
        let db = duckdb::Connection::open(w.path("t.duckdb")).unwrap();
        db.execute_batch(
            "CREATE TABLE t (id VARCHAR, v BIGINT CHECK (v < 100), _idem_partition VARCHAR NOT NULL, _idem_offset BIGINT NOT NULL)",
        )
        .unwrap();
    }
    {
        let mut cfg = sink_cfg(&w, Mode::Append, &[]);
        cfg.create = false;
        let sink = DuckDbSink::new(cfg, columns());
        sink.prepare().await.unwrap();
        let e = sink.open(&p).await.unwrap().epoch;
        sink.commit(batch(&p, e, vec![rec(0, "ok", 1)], 1))
            .await
            .unwrap();
        let err = sink
            .commit(batch(&p, e, vec![rec(1, "x", 2), rec(2, "y", 500)], 3))
            .await;
        assert!(err.is_err());
        assert_eq!(sink.open(&p).await.unwrap().next_offset, Some(1));
    }
    assert_eq!(rows(&w), pairs(&[("ok", 1)]));
}

#[tokio::test]
async fn existing_tables_are_checked_before_the_first_write() {
    let w = Workdir::new();
    {
        let db = duckdb::Connection::open(w.path("t.duckdb")).unwrap();
        db.execute_batch(
            "CREATE TABLE t (id VARCHAR PRIMARY KEY, v VARCHAR, _idem_partition VARCHAR, _idem_offset BIGINT)",
        )
        .unwrap();
    }
    let sink = DuckDbSink::new(sink_cfg(&w, Mode::Upsert, &["id"]), columns());
    let err = sink.prepare().await.unwrap_err().to_string();
    assert!(
        err.contains("column `v` is VARCHAR") && err.contains("BIGINT"),
        "{err}"
    );

    let mut cfg = sink_cfg(&w, Mode::Append, &[]);
    cfg.table = "missing".into();
    cfg.create = false;
    let err = DuckDbSink::new(cfg, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`missing` does not exist"), "{err}");

    let mut cfg = sink_cfg(&w, Mode::Upsert, &["v"]);
    cfg.table = "nokey".into();
    {
        let db = duckdb::Connection::open(w.path("t.duckdb")).unwrap();
        db.execute_batch(
            "CREATE TABLE nokey (id VARCHAR, v BIGINT, _idem_partition VARCHAR, _idem_offset BIGINT)",
        )
        .unwrap();
    }
    let err = DuckDbSink::new(cfg, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("PRIMARY KEY (v)") && err.contains("none"),
        "{err}"
    );
}

#[tokio::test]
async fn every_column_type_round_trips() {
    let w = Workdir::new();
    let p = part("a");
    let (cols, record) = all_types();
    {
        let mut cfg = sink_cfg(&w, Mode::Append, &[]);
        cfg.table = "types".into();
        let sink = DuckDbSink::new(cfg, cols);
        sink.prepare().await.unwrap();
        let e = sink.open(&p).await.unwrap().epoch;
        sink.commit(batch(&p, e, vec![record], 1)).await.unwrap();
    }
    let db = duck(&w.path("t.duckdb"));
    let got: (String, i64, i32, f64, bool, i64, String, String) = db
        .query_row(
            "SELECT t, b, i, d, ok, epoch_us(\"at\"), day::VARCHAR, doc->>'$.t' FROM types",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        got,
        (
            "hé".into(),
            9007199254740993,
            -7,
            2.5,
            false,
            1_772_352_000_123_456, // 2026-03-01T08:00:00.123456Z
            "1969-12-31".into(),
            "hé".into()
        )
    );
    let (u, raw): (String, Vec<u8>) = db
        .query_row("SELECT u::VARCHAR, raw FROM types", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(u, "67e55044-10b1-426f-9247-bb680e5fe0c8");
    assert_eq!(raw, [0u8, 1, 2, 255]);
}
