//! The crash test (`idem_testkit::crash`) against the S3 sink on the test store
//! (scripts/s3.sh), a bucket per run: every message in exactly one object a
//! manifest names, and no object outside them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::crash::{crash, Landed};
use idem_testkit::*;

#[test]
fn killed_at_random_and_at_fail_points_every_message_lands_in_exactly_one_named_object() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(idem_testkit::s3::fresh_bucket("crash"));
    let w = Workdir::new();
    // Objects stay open across batches of 100 for up to 100 ms, and close
    // at 70 records, inside a batch or across two: kills land between a
    // batch staged and the manifest that commits it. A manifest of at
    // most 3 objects: segments are written and recovered under the
    // crashes too.
    let sink = idem_testkit::s3::sink_lines(
        &bucket,
        "compression = \"gzip\"\nmax_object_records = 70\nroll_interval = \"100ms\"\nmanifest_max_objects = 3",
    );
    crash(&w, "append", &sink, || {
        rt.block_on(async {
            let l = idem_testkit::s3::landed(&bucket, "", "crash").await;
            l.assert_only_named();
            assert!(l.segments > 0, "no segment was written");
            Landed::from_json(&l.lines, l.positions)
        })
    });
}
