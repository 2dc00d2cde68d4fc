//! The S3 sink's commit protocol against the test store (scripts/s3.sh),
//! driven through the `Sink` trait: a stale runner fenced, racing openers,
//! recovery of what a crash left, multipart uploads. Each test has its own
//! bucket. The binary-level tests are in runner/tests/s3.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_core::{Sink, SinkError};
use idem_sink_s3::{Format, S3Sink, S3SinkConfig};
use idem_testkit::s3::*;
use idem_testkit::*;

fn cfg(bucket: &str) -> S3SinkConfig {
    S3SinkConfig {
        bucket: bucket.into(),
        prefix: String::new(),
        endpoint: Some(ENDPOINT.into()),
        region: Some("us-east-1".into()),
        path_style: true,
        format: Format::Jsonl,
        compression: None,
        time_column: None,
        time_partition: None,
        partition_column: None,
        max_object_records: 1_000_000,
        max_object_bytes: 128 << 20,
        part_bytes: 5 << 20,
        manifest_max_objects: 1000,
    }
}

fn set_test_credentials() {
    // The sink reads credentials from the environment, as a runner would.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "idem-test"),
        ("AWS_SECRET_ACCESS_KEY", "idem-test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        if std::env::var(k).is_err() {
            std::env::set_var(k, v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_runner_is_fenced_and_leaves_no_object_behind() {
    set_test_credentials();
    let bucket = fresh_bucket("fence").await;
    let p = part("orders/0");
    let old = S3Sink::new(cfg(&bucket), &columns());
    old.prepare().await.unwrap();
    let a = old.open(&p).await.unwrap();
    assert_eq!((a.epoch, a.next_offset), (1, None));
    old.commit(batch(&p, a.epoch, vec![rec(0, "a", 1), rec(1, "b", 2)], 2))
        .await
        .unwrap();

    // A newer runner takes the partition (the old one is frozen).
    let new = S3Sink::new(cfg(&bucket), &columns());
    let b = new.open(&p).await.unwrap();
    assert_eq!((b.epoch, b.next_offset), (2, Some(2)));
    // The old runner wakes and commits: refused, its object removed.
    let stale = old
        .commit(batch(&p, a.epoch, vec![rec(2, "c", 3)], 3))
        .await;
    assert!(matches!(stale, Err(SinkError::Fenced { .. })), "{stale:?}");
    new.commit(batch(
        &p,
        b.epoch,
        vec![rec(2, "c", 30), rec(3, "d", 40)],
        4,
    ))
    .await
    .unwrap();

    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    let got: Vec<(String, i64)> = l
        .lines
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["v"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, pairs(&[("a", 1), ("b", 2), ("c", 30), ("d", 40)]));
    assert_eq!(l.positions.get("orders/0"), Some(&4));
}

/// 16 runners open one partition at once: each gets its own epoch, and
/// only the one with the highest can commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_sixteen_racing_openers_only_the_last_can_commit() {
    set_test_credentials();
    let bucket = fresh_bucket("race").await;
    let p = part("orders/0");
    let sinks: Vec<std::sync::Arc<S3Sink>> = (0..16)
        .map(|_| std::sync::Arc::new(S3Sink::new(cfg(&bucket), &columns())))
        .collect();
    let mut opening = tokio::task::JoinSet::new();
    for (i, s) in sinks.iter().enumerate() {
        let (s, p) = (s.clone(), p.clone());
        opening.spawn(async move { (i, s.open(&p).await.unwrap().epoch) });
    }
    let mut epochs: Vec<(usize, i64)> = opening.join_all().await;
    epochs.sort_by_key(|(_, e)| *e);
    assert_eq!(
        epochs.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        (1..=16).collect::<Vec<i64>>(),
        "every opener its own epoch"
    );
    let mut won = Vec::new();
    for (i, epoch) in &epochs {
        let r = sinks[*i]
            .commit(batch(
                &p,
                *epoch,
                vec![rec(0, &format!("by{i}"), *epoch)],
                1,
            ))
            .await;
        match r {
            Ok(_) => won.push(*epoch),
            Err(SinkError::Fenced { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, vec![16], "only the newest epoch commits");
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 1);
    assert_eq!(l.lines[0]["v"].as_i64(), Some(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_removes_what_a_crash_left_and_aborts_stale_uploads() {
    set_test_credentials();
    let bucket = fresh_bucket("recover").await;
    let p = part("orders/1");
    let sink = S3Sink::new(cfg(&bucket), &columns());
    sink.prepare().await.unwrap();
    let a = sink.open(&p).await.unwrap();
    sink.commit(batch(&p, a.epoch, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    // A crash after an upload, before the manifest named it; and a
    // multipart upload never completed.
    let prefix = "c/topic=orders/partition=1/";
    let orphan = format!("{prefix}orders+1+00000000000000000001+1.jsonl");
    put(&bucket, &orphan, b"{\"id\":\"x\"}\n").await;
    let upload = client()
        .create_multipart_upload()
        .bucket(&bucket)
        .key(format!("{prefix}orders+1+00000000000000000002+1.jsonl"))
        .send()
        .await
        .unwrap();
    assert!(upload.upload_id().is_some());

    let restarted = S3Sink::new(cfg(&bucket), &columns());
    let b = restarted.open(&p).await.unwrap();
    assert_eq!((b.epoch, b.next_offset), (2, Some(1)));
    assert!(
        !keys(&bucket, prefix).await.contains(&orphan),
        "orphan kept"
    );
    let open_uploads = client()
        .list_multipart_uploads()
        .bucket(&bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    assert!(
        open_uploads.uploads().is_empty(),
        "stale upload not aborted"
    );
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_go_up_in_parts_and_read_back_whole() {
    set_test_credentials();
    let bucket = fresh_bucket("multipart").await;
    let p = part("big/0");
    let sink = S3Sink::new(cfg(&bucket), &columns());
    sink.prepare().await.unwrap();
    let a = sink.open(&p).await.unwrap();
    // About 12 MiB: three parts of at most 5 MiB.
    let pad = "x".repeat(1000);
    let records: Vec<_> = (0..12_000u64)
        .map(|i| rec(i, &format!("{i}-{pad}"), i as i64))
        .collect();
    sink.commit(batch(&p, a.epoch, records, 12_000))
        .await
        .unwrap();
    let l = landed(&bucket, "", "c").await;
    assert_eq!(l.lines.len(), 12_000);
    let bytes = l.manifests[0]["objects"][0]["bytes"].as_u64().unwrap();
    assert!(bytes > 10 << 20, "{bytes}");
    let sum: i64 = l.lines.iter().map(|v| v["v"].as_i64().unwrap()).sum();
    assert_eq!(sum, (0..12_000).sum::<i64>());
}
