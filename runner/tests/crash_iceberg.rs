//! The crash test (`idem_testkit::crash`) against the Iceberg sink: the
//! catalog on the test PostgreSQL, the warehouse on the local disk (the
//! S3 warehouse runs in `tests/iceberg.rs`: on the test store a commit
//! takes about a second, which the hundreds of commits here cannot
//! afford); the table read back by PyIceberg (scripts/iceberg-tools.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::crash::{crash, Landed};
use idem_testkit::*;

#[test]
fn killed_at_random_and_at_fail_points_every_message_lands_exactly_once() {
    let catalog = fresh_schema("crash_ice");
    let w = Workdir::new();
    let warehouse = format!("file://{}", w.path("warehouse").display());
    // Batches of 100 stage their files; a snapshot commits every
    // partition's staged files every 100 ms: kills land between files
    // written and the catalog commit, and within it.
    let sink = idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "idem.events")
        + "commit_interval = \"100ms\"\n";
    crash(&w, "append", &sink, || {
        let read = idem_testkit::iceberg::read(&catalog, &warehouse, "idem.events");
        let positions = read.positions("crash");
        Landed::from_json(&read.rows, positions)
    });
}
