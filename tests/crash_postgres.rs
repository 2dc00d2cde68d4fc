//! The crash test (tests/crash.rs) against the PostgreSQL sink
//! (scripts/postgres.sh), each run in its own schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod crash;

use common::*;
use crash::{crash, mode_lines, Landed};

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
