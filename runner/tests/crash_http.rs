//! The crash test (`idem_testkit::crash`) against the HTTP sink and a receiver
//! that honours idempotency keys and fails some requests on purpose
//! (500, 429, 503 after applying, answers past the timeout): after kill -9
//! at random moments and aborts at fail points, every message id has
//! exactly one effect, with the value of its first copy, and the stored
//! positions are the files' ends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_dedup_store::{DedupStore, EmbeddedDedupStore};
use idem_testkit::crash::{crash, Landed};
use idem_testkit::receiver::{Faults, Receiver};
use idem_testkit::*;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn killed_at_random_and_at_fail_points_every_message_id_has_exactly_one_effect() {
    // Answers past the timeout are rarer than in Faults::some(): each one
    // holds a request slot for the whole timeout.
    let faults = Faults {
        slow_every: 397,
        slow: Duration::from_millis(400),
        ..Faults::some()
    };
    let receiver = Receiver::start(faults, None);
    let w = Workdir::new();
    let store = w.path("crash.dedup.redb");
    let sink = format!(
        r#"type = "http"
url = "{}"
timeout = "150ms"
concurrency = 4

[connectors.crash.retry]
initial_backoff = "5ms"
max_backoff = "50ms"
max_attempts = 30

[connectors.crash.dedup]
id = "/id"
path = "{}"
"#,
        receiver.url,
        store.display()
    );
    crash(&w, "dedup", &sink, || {
        let log = receiver.log();
        let rows = log
            .effects
            .iter()
            .enumerate()
            .map(|(i, (key, body))| {
                let id = body["id"].as_str().unwrap().to_string();
                assert_eq!(key, &id, "the idempotency key is the message id");
                (
                    id,
                    body["n"].as_i64().unwrap(),
                    "http".to_string(),
                    i as i64,
                )
            })
            .collect();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let positions = rt.block_on(async {
            let s = Arc::new(
                EmbeddedDedupStore::open(&store, "crash", Duration::from_secs(3600)).unwrap(),
            );
            s.positions()
                .await
                .unwrap()
                .into_iter()
                .map(|(key, p)| {
                    let (_, file) = key.split_once('\t').unwrap();
                    (file.to_string(), p.next_offset.unwrap() as i64)
                })
                .collect()
        });
        eprintln!(
            "receiver: {} requests, {} effects, faults {:?}",
            log.requests.len(),
            log.effects.len(),
            log.faults
        );
        for status in [500, 429, 503, 0] {
            assert!(
                log.faults.get(&status).copied().unwrap_or(0) > 0,
                "fault {status} never fired"
            );
        }
        Landed { rows, positions }
    });
}
