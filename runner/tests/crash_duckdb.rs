//! The crash test (`idem_testkit::crash`) against the DuckDB sink.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::crash::{crash, mode_lines, Landed, POSITIONS_SQL, ROWS_SQL};
use idem_testkit::*;

fn run(mode: &str) {
    let w = Workdir::new();
    let db = w.path("crash.duckdb");
    let sink = format!(
        "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"\n{}",
        db.display(),
        mode_lines(mode)
    );
    crash(&w, mode, &sink, || {
        let conn = duck(&db);
        let mut stmt = conn.prepare(ROWS_SQL).unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut stmt = conn.prepare(POSITIONS_SQL).unwrap();
        let positions = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        Landed { rows, positions }
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
