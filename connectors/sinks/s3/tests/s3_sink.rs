//! The S3 sink's commit protocol against the test store (scripts/s3.sh),
//! driven through the `Sink` trait: a stale runner fenced, racing openers,
//! recovery of what a crash left, multipart uploads, objects kept open
//! across batches. Each test has its own
//! bucket. The binary-level tests are in runner/tests/s3.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_core::{PartitionRef, Record, Sink, SinkError};
use idem_sink_s3::{Format, S3Sink, S3SinkConfig};
use idem_testkit::s3::*;
use idem_testkit::*;
use std::sync::Arc;
use std::time::Duration;

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
        // Every commit names its objects; the staging tests set their own.
        roll_interval: Duration::ZERO,
        max_open_bytes: 64 << 20,
    }
}

fn staging(bucket: &str) -> S3SinkConfig {
    S3SinkConfig {
        roll_interval: Duration::from_secs(60),
        ..cfg(bucket)
    }
}

/// A sink with `cfg`, prepared, that opened `p`; and its epoch.
async fn opened(cfg: S3SinkConfig, p: &PartitionRef) -> (S3Sink, i64) {
    let sink = S3Sink::new(cfg, &columns());
    sink.prepare().await.unwrap();
    let epoch = sink.open(p).await.unwrap().epoch;
    (sink, epoch)
}

/// Records at `offsets`, each with an id of about 1 KB and its offset as
/// `v`: a MiB per thousand.
fn padded(offsets: std::ops::Range<u64>) -> Vec<Record> {
    let pad = "x".repeat(1000);
    offsets
        .map(|i| rec(i, &format!("{i}-{pad}"), i as i64))
        .collect()
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
    assert_eq!(
        values(&l),
        pairs(&[("a", 1), ("b", 2), ("c", 30), ("d", 40)])
    );
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
    let (sink, epoch) = opened(cfg(&bucket), &p).await;
    // About 12 MiB: three parts of at most 5 MiB.
    let records = padded(0..12_000);
    sink.commit(batch(&p, epoch, records, 12_000))
        .await
        .unwrap();
    let l = landed(&bucket, "", "c").await;
    assert_eq!(l.lines.len(), 12_000);
    let bytes = l.manifests[0]["objects"][0]["bytes"].as_u64().unwrap();
    assert!(bytes > 10 << 20, "{bytes}");
    let sum: i64 = v_column(&l).iter().sum();
    assert_eq!(sum, (0..12_000).sum::<i64>());
}

/// `v` of what landed, in object and line order.
fn v_column(l: &S3Landed) -> Vec<i64> {
    l.lines.iter().map(|v| v["v"].as_i64().unwrap()).collect()
}

/// Ids and values of what landed, in object and line order.
fn values(l: &S3Landed) -> Vec<(String, i64)> {
    l.lines
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["v"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_stay_open_across_batches_until_the_partition_flushes() {
    set_test_credentials();
    let bucket = fresh_bucket("staged").await;
    let p = part("orders/0");
    let (sink, epoch) = opened(staging(&bucket), &p).await;
    assert_eq!(sink.stage_for(), Some(Duration::from_secs(60)));
    for n in 0..3u64 {
        let b = batch(
            &p,
            epoch,
            vec![rec(2 * n, "a", 1), rec(2 * n + 1, "b", 2)],
            2 * n + 2,
        );
        let stats = sink.commit(b.clone()).await.unwrap();
        // Staged, not durable: the manifest still says nothing.
        assert_eq!(stats.durable_through, Some(0));
        if n == 1 {
            // A retry of a staged batch stages nothing twice.
            sink.commit(b).await.unwrap();
        }
        let l = landed(&bucket, "", "c").await;
        assert!(l.lines.is_empty(), "visible before the manifest names it");
        // The manifest holds no position yet (-1).
        assert_eq!(l.positions.get("orders/0"), Some(&-1));
    }
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(6));
    assert_eq!(sink.flush_staged(&p).await.unwrap(), None, "nothing left");
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.named.len(), 1, "one object for the three batches");
    assert_eq!(
        values(&l),
        pairs(&[("a", 1), ("b", 2), ("a", 1), ("b", 2), ("a", 1), ("b", 2)])
    );
    assert_eq!(l.positions.get("orders/0"), Some(&6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_object_sends_its_parts_as_batches_fill_them() {
    set_test_credentials();
    let bucket = fresh_bucket("parts").await;
    let p = part("big/0");
    let (sink, epoch) = opened(staging(&bucket), &p).await;
    // Four batches of about 3 MiB into one object: parts of 5 MiB go up
    // while it is open, so the runner holds about a part, not the object.
    let uploads = || async {
        client()
            .list_multipart_uploads()
            .bucket(&bucket)
            .send()
            .await
            .unwrap()
            .uploads()
            .len()
    };
    for n in 0..4u64 {
        let records = padded(n * 3000..(n + 1) * 3000);
        sink.commit(batch(&p, epoch, records, (n + 1) * 3000))
            .await
            .unwrap();
        // The first part goes up with the second batch.
        assert_eq!(uploads().await, usize::from(n >= 1), "after batch {n}");
    }
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(12_000));
    assert_eq!(uploads().await, 0);
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.named.len(), 1);
    assert_eq!(l.lines.len(), 12_000);
    let bytes = l.manifests[0]["objects"][0]["bytes"].as_u64().unwrap();
    assert!(bytes > 10 << 20, "{bytes}");
    let offsets: Vec<i64> = v_column(&l);
    assert_eq!(
        offsets,
        (0..12_000).collect::<Vec<i64>>(),
        "every record once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_lost_its_staged_objects_is_fenced_and_the_new_owner_reads_them_again() {
    set_test_credentials();
    let bucket = fresh_bucket("stalestage").await;
    let p = part("big/0");
    let (old, epoch) = opened(staging(&bucket), &p).await;
    let pad = "x".repeat(1000);
    let records = |from: u64, to: u64, v: i64| -> Vec<idem_core::Record> {
        (from..to)
            .map(|i| rec(i, &format!("{i}-{pad}"), v))
            .collect()
    };
    // Staged with a part up, then the runner freezes.
    for n in 0..2u64 {
        old.commit(batch(
            &p,
            epoch,
            records(n * 3000, (n + 1) * 3000, 1),
            (n + 1) * 3000,
        ))
        .await
        .unwrap();
    }
    // A newer runner opens: nothing was committed, the upload is aborted.
    let new = S3Sink::new(staging(&bucket), &columns());
    let b = new.open(&p).await.unwrap();
    assert_eq!((b.epoch, b.next_offset), (2, None));
    // The old runner wakes: its next part or its flush is refused.
    let stale = old
        .commit(batch(&p, epoch, records(6000, 9000, 1), 9000))
        .await;
    let stale = match stale {
        Ok(_) => old.flush_staged(&p).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(matches!(stale, Err(SinkError::Fenced { .. })), "{stale:?}");
    new.commit(batch(&p, b.epoch, records(0, 3000, 2), 3000))
        .await
        .unwrap();
    assert_eq!(new.flush_staged(&p).await.unwrap(), Some(3000));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 3000);
    assert!(
        l.lines.iter().all(|v| v["v"].as_i64() == Some(2)),
        "only the new owner's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_schema_closes_the_open_object_and_starts_a_wider_one() {
    set_test_credentials();
    let bucket = fresh_bucket("wider").await;
    let p = part("orders/0");
    let (sink, epoch) = opened(staging(&bucket), &p).await;
    sink.commit(batch(&p, epoch, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    let mut wider = columns();
    wider.push(idem_config::ColumnConfig {
        name: "extra".into(),
        pointer: None,
        ty: idem_config::ColumnType::Text,
        required: false,
    });
    let mut r = rec(1, "b", 2);
    let mut values = r.values.to_values();
    values.push(idem_core::Value::Text("more".into()));
    r.values = values.into();
    let mut b = Arc::into_inner(batch(&p, epoch, vec![r], 2)).unwrap();
    b.columns = Some(Arc::new(wider));
    sink.commit(Arc::new(b)).await.unwrap();
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(2));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.named.len(), 2, "the open object closed with its schema");
    assert_eq!(l.lines[0].get("extra"), None);
    assert_eq!(l.lines[1]["extra"], "more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_object_open_across_batches_goes_up_in_parts_and_reads_back_whole() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    set_test_credentials();
    let bucket = fresh_bucket("pqparts").await;
    let p = part("big/0");
    let cfg = S3SinkConfig {
        format: Format::Parquet,
        compression: Some(idem_sink_s3::Compression::None),
        ..staging(&bucket)
    };
    let (sink, epoch) = opened(cfg, &p).await;
    // Distinct 1 KB values, uncompressed: about 12 MiB of column data, so
    // row groups close at 5 MiB and their bytes go up as parts.
    for n in 0..4u64 {
        let records: Vec<_> = (n * 3000..(n + 1) * 3000)
            .map(|i| rec(i, &format!("{i:06}-{}", "y".repeat(1000)), i as i64))
            .collect();
        sink.commit(batch(&p, epoch, records, (n + 1) * 3000))
            .await
            .unwrap();
    }
    let open = client()
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(open.uploads().len(), 1, "parts went up while it was open");
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(12_000));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    let key = l.manifests[0]["objects"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let reader = SerializedFileReader::new(bytes::Bytes::from(get(&bucket, &key).await)).unwrap();
    assert!(reader.metadata().num_row_groups() >= 2, "one row group");
    let values: Vec<i64> = v_column(&l);
    assert_eq!(
        values,
        (0..12_000).collect::<Vec<i64>>(),
        "every record once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_open_bytes_a_partition_commits_before_its_roll() {
    set_test_credentials();
    let bucket = fresh_bucket("budget").await;
    let p = part("orders/0");
    let (sink, epoch) = opened(
        S3SinkConfig {
            max_open_bytes: 50_000,
            ..staging(&bucket)
        },
        &p,
    )
    .await;
    // About 30 KB of JSON lines a batch: the first stays open, the second
    // passes 50,000 bytes and commits both.
    let pad = "z".repeat(250);
    let records = |from: u64| -> Vec<idem_core::Record> {
        (from..from + 100)
            .map(|i| rec(i, &format!("{i}-{pad}"), i as i64))
            .collect()
    };
    let first = sink
        .commit(batch(&p, epoch, records(0), 100))
        .await
        .unwrap();
    assert_eq!(first.durable_through, Some(0));
    let second = sink
        .commit(batch(&p, epoch, records(100), 200))
        .await
        .unwrap();
    assert_eq!(second.durable_through, Some(200), "committed early");
    let third = sink
        .commit(batch(&p, epoch, records(200), 300))
        .await
        .unwrap();
    assert_eq!(third.durable_through, Some(200), "a new object, open again");
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(300));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.named.len(), 2);
    let values: Vec<i64> = v_column(&l);
    assert_eq!(values, (0..300).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_open_bytes_parquet_row_groups_close_before_the_objects_do() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    set_test_credentials();
    let bucket = fresh_bucket("rowgroups").await;
    let p = part("orders/0");
    // Row groups in memory pass 150 KB; compressed, the same rows are a
    // few KB: the row groups close, the objects stay open.
    let (sink, epoch) = opened(
        S3SinkConfig {
            format: Format::Parquet,
            max_open_bytes: 150_000,
            ..staging(&bucket)
        },
        &p,
    )
    .await;
    let pad = "q".repeat(500);
    for n in 0..3u64 {
        let records = (n * 400..(n + 1) * 400)
            .map(|i| rec(i, &format!("{i}-{pad}"), i as i64))
            .collect();
        let stats = sink
            .commit(batch(&p, epoch, records, (n + 1) * 400))
            .await
            .unwrap();
        assert_eq!(stats.durable_through, Some(0), "batch {n} committed early");
    }
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(1200));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 1200);
    let key = l.manifests[0]["objects"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let reader = SerializedFileReader::new(bytes::Bytes::from(get(&bucket, &key).await)).unwrap();
    assert!(reader.metadata().num_row_groups() >= 2, "one row group");
}

/// A TCP proxy to the test store that can drop every connection and
/// refuse new ones while `down` is set: the store gone mid-commit.
async fn switchable_proxy() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let down = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = ENDPOINT.trim_start_matches("http://").to_string();
    let flag = down.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            if flag.load(Ordering::SeqCst) {
                continue; // dropped: the connection closes
            }
            let (store, flag) = (store.clone(), flag.clone());
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&store).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                tokio::pin!(copy);
                loop {
                    tokio::select! {
                        _ = &mut copy => return,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {
                            if flag.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_part_failed_midway_resumes_after_what_it_staged() {
    use std::sync::atomic::Ordering;
    set_test_credentials();
    let bucket = fresh_bucket("resume").await;
    let (endpoint, down) = switchable_proxy().await;
    let p = part("big/0");
    let (sink, epoch) = opened(
        S3SinkConfig {
            endpoint: Some(endpoint),
            ..staging(&bucket)
        },
        &p,
    )
    .await;
    // About 8 MB: staged in chunks of half a part (2.5 MiB); the first
    // 5 MiB part goes up after the second chunk, while the store is gone.
    let records = padded(0..8000);
    let b = batch(&p, epoch, records, 8000);
    down.store(true, Ordering::SeqCst);
    let failed = sink.commit(b.clone()).await;
    assert!(matches!(&failed, Err(e) if e.is_retriable()), "{failed:?}");
    // The store is back: the runner's retry sends the same batch.
    down.store(false, Ordering::SeqCst);
    sink.commit(b).await.unwrap();
    assert_eq!(sink.flush_staged(&p).await.unwrap(), Some(8000));
    let l = landed(&bucket, "", "c").await;
    l.assert_only_named();
    let values: Vec<i64> = v_column(&l);
    assert_eq!(
        values,
        (0..8000).collect::<Vec<i64>>(),
        "every record once, in order"
    );
}
