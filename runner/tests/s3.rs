//! The `idem` binary with an S3 sink against the test stores (scripts/s3.sh,
//! scripts/s3s-fs.sh): objects named by a manifest, Parquet, compression,
//! folders by field and day, clear errors for a missing bucket, store or
//! credentials, a store restarted mid-run. Each test has its own bucket.
//! The sink's own protocol (fencing, recovery, multipart) is tested in
//! connectors/sinks/s3/tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::s3::*;
use idem_testkit::*;

fn file_config(w: &Workdir, sink: &str) -> String {
    format!(
        r#"
[connectors.lake]
[connectors.lake.source]
type = "file"
path = "{glob}"
[connectors.lake.sink]
{sink}
[connectors.lake.batch]
max_records = 1000
[[connectors.lake.columns]]
name = "id"
type = "text"
[[connectors.lake.columns]]
name = "n"
type = "bigint"
"#,
        glob = w.path("in-*.jsonl").display()
    )
}

/// `lake.toml`: the two files into `bucket`, with `extra` sink keys.
fn lake_config(w: &Workdir, bucket: &str, extra: &str) -> std::path::PathBuf {
    lake_config_with(w, bucket, extra, &[])
}

/// The same with more `(name, type)` columns.
fn lake_config_with(
    w: &Workdir,
    bucket: &str,
    extra: &str,
    columns: &[(&str, &str)],
) -> std::path::PathBuf {
    let mut conf = file_config(w, &sink_lines(bucket, extra));
    for (name, ty) in columns {
        conf += &format!("[[connectors.lake.columns]]\nname = \"{name}\"\ntype = \"{ty}\"\n");
    }
    w.write("lake.toml", &conf)
}

/// `range`'s records appended to `in-0.jsonl` and `in-1.jsonl`.
fn add_lines(w: &Workdir, range: std::ops::Range<usize>) {
    for part in 0..2 {
        w.append(&format!("in-{part}.jsonl"), &lines(part, range.clone()));
    }
}

/// `i` of a record whose id is `p{part}-{i}`.
fn index_of(r: &serde_json::Value) -> usize {
    let id = r["id"].as_str().unwrap();
    id.split_once('-').unwrap().1.parse().unwrap()
}

fn lines(part: usize, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| format!("{{\"id\":\"p{part}-{i}\",\"n\":{i}}}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_lands_once_in_objects_the_manifests_name() {
    let bucket = fresh_bucket("lands").await;
    let w = Workdir::new();
    add_lines(&w, 0..3000);
    let cfg = lake_config(
        &w,
        &bucket,
        "prefix = \"raw/\"\ncompression = \"gzip\"\nmax_object_records = 400",
    );
    run_ok(idem().arg("run").arg(&cfg));
    // More input, a second run: it resumes from the manifests.
    add_lines(&w, 3000..3500);
    run_ok(idem().arg("run").arg(&cfg));

    let l = landed(&bucket, "raw/", "lake").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 7000);
    assert_eq!(l.distinct_ids(), 7000, "a record in two objects");
    for part in 0..2 {
        let file = std::fs::canonicalize(w.path(&format!("in-{part}.jsonl"))).unwrap();
        let len = std::fs::metadata(&file).unwrap().len() as i64;
        assert_eq!(l.positions.get(&file.display().to_string()), Some(&len));
    }
    // 1000-record batches in objects of at most 400.
    for m in &l.manifests {
        for o in m["objects"].as_array().unwrap() {
            assert!(o["records"].as_u64().unwrap() <= 400, "{o}");
            let key = o["key"].as_str().unwrap();
            assert!(
                key.starts_with("raw/lake/topic=file/partition=") && key.ends_with(".jsonl.gz"),
                "{key}"
            );
        }
    }
}

/// Events `i` of partition `part` on day `i / 800` after 2026-11-01 (hour
/// `i % 24`): one file spans several days, and days change inside batches
/// of 1,000.
fn timed_lines(part: usize, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| {
            format!(
                "{{\"id\":\"p{part}-{i}\",\"n\":{i},\"ts\":\"2026-11-{:02}T{:02}:30:00Z\"}}\n",
                1 + i / 800,
                i % 24
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_objects_by_record_day_read_back_as_the_source() {
    let bucket = fresh_bucket("parquet").await;
    let w = Workdir::new();
    for part in 0..2 {
        w.append(&format!("in-{part}.jsonl"), &timed_lines(part, 0..2500));
    }
    let cfg = lake_config_with(
        &w,
        &bucket,
        "format = \"parquet\"\ntime_column = \"ts\"\nmax_object_records = 700",
        &[("ts", "timestamp")],
    );
    run_ok(idem().arg("run").arg(&cfg));
    for part in 0..2 {
        w.append(&format!("in-{part}.jsonl"), &timed_lines(part, 2500..3000));
    }
    run_ok(idem().arg("run").arg(&cfg));

    let l = landed(&bucket, "", "lake").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 6000);
    let mut seen = std::collections::BTreeSet::new();
    for v in &l.lines {
        let id = v["id"].as_str().unwrap();
        let (part, i) = id[1..].split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        assert_eq!(v["n"].as_i64(), Some(i as i64), "{v}");
        assert!(seen.insert((part.to_string(), i)), "{id} twice");
    }
    assert_eq!(seen.len(), 6000);
    // Each object sits in its records' day, holds at most 700 records, and
    // a new object starts where the day changes.
    for m in &l.manifests {
        for o in m["objects"].as_array().unwrap() {
            let key = o["key"].as_str().unwrap();
            assert!(key.ends_with(".parquet"), "{key}");
            assert!(o["records"].as_u64().unwrap() <= 700, "{o}");
            let rows = records(&bucket, key).await;
            for r in &rows {
                let i = index_of(r);
                let day = format!("/dt=2026-11-{:02}/", 1 + i / 800);
                assert!(key.contains(&day), "{i} in {key}");
            }
        }
    }
    let days: std::collections::BTreeSet<&str> = l
        .named
        .iter()
        .filter_map(|k| k.split('/').find(|s| s.starts_with("dt=")))
        .collect();
    assert_eq!(
        days.into_iter().collect::<Vec<_>>(),
        [
            "dt=2026-11-01",
            "dt=2026-11-02",
            "dt=2026-11-03",
            "dt=2026-11-04"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_json_lines_rotate_on_bytes() {
    let bucket = fresh_bucket("zstd").await;
    let w = Workdir::new();
    w.append("in-0.jsonl", &lines(0, 0..2000));
    let cfg = w.write(
        "lake.toml",
        &file_config(
            &w,
            &sink_lines(&bucket, "compression = \"zstd\"\nmax_object_bytes = 4096"),
        ),
    );
    run_ok(idem().arg("run").arg(&cfg));
    let l = landed(&bucket, "", "lake").await;
    l.assert_only_named();
    assert_eq!(l.lines.len(), 2000);
    let objects = l.manifests[0]["objects"].as_array().unwrap();
    // A record weighs 18 to 21 bytes by the sink's estimate: objects of
    // about 4 KiB hold 196 to 228 records, and 2,000 records need at
    // least 9 of them (without the limit: 2, one per 1,000-record batch).
    assert!(objects.len() >= 9, "{} objects", objects.len());
    for o in objects {
        assert!(o["key"].as_str().unwrap().ends_with(".jsonl.zst"), "{o}");
        assert!(o["records"].as_u64().unwrap() <= 228, "{o}");
    }
}

#[test]
fn a_missing_bucket_or_store_is_named_at_start() {
    let w = Workdir::new();
    w.write("in-0.jsonl", &lines(0, 0..3));
    let cfg = w.write(
        "lake.toml",
        &file_config(&w, &sink_lines("no-such-bucket-for-idem", "")),
    );
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bucket `no-such-bucket-for-idem` does not exist"),
        "{err}"
    );

    let cfg = w.write(
        "lake2.toml",
        &(file_config(&w, &sink_lines("b", "")).replace(ENDPOINT, "http://127.0.0.1:1")
            + "[connectors.lake.retry]\nmax_attempts = 2\ninitial_backoff = \"100ms\"\n"),
    );
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("no answer") && err.contains("scripts/s3.sh"),
        "{err}"
    );
}

/// No credentials anywhere (no keys, no profile, no instance role): named
/// at start as such, not as a store that does not answer, and not retried.
#[test]
fn missing_credentials_are_named_at_start() {
    let w = Workdir::new();
    w.write("in-0.jsonl", &lines(0, 0..3));
    let cfg = w.write("lake.toml", &file_config(&w, &sink_lines("b", "")));
    let out = idem()
        .arg("check")
        .arg(&cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RUST_LOG")
        .env("HOME", w.path(""))
        .output()
        .unwrap();
    let err = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no AWS credentials were found") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert!(!err.contains("no answer"), "{err}");
    assert!(err.lines().count() < 6, "a page of SDK warnings: {err}");
}

/// s3s-fs checks request signatures: a wrong secret is named at start,
/// before anything is read or written, without the secret in the message;
/// the right one writes everything (to a store that cannot list multipart
/// uploads, which recovery tolerates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_named_at_start() {
    let bucket = fresh_bucket("fs-creds").await;
    let w = Workdir::new();
    w.write("in-0.jsonl", &lines(0, 0..500));
    let cfg = lake_config(&w, &bucket, "");
    for cmd in ["check", "run"] {
        let out = idem()
            .arg(cmd)
            .arg(&cfg)
            .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
            .output()
            .unwrap();
        // `check` reports on stdout, `run` on stderr.
        let err = text(&out.stdout) + &text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains(&format!("access to bucket `{bucket}` was refused"))
                && err.contains("check the credentials"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("not-the-secret"), "the secret leaked: {err}");
    }
    assert_eq!(
        keys(&bucket, "").await,
        Default::default(),
        "nothing written"
    );

    let out = idem()
        .arg("run")
        .arg(&cfg)
        .env("AWS_SECRET_ACCESS_KEY", FS_SECRET_KEY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = landed(&bucket, "", "lake").await;
    got.assert_only_named();
    assert_eq!((got.lines.len(), got.distinct_ids()), (500, 500));
}

/// A store that ignores conditional headers (S3 before 2024, some
/// S3-compatible stores today) cannot fence a stale runner: Idem refuses it
/// at start. Such a store is moto behind a proxy that drops `If-None-Match`
/// and `If-Match` from every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_conditional_writes_is_refused_at_start() {
    let bucket = fresh_bucket("nocond").await;
    let proxy = proxy_without_conditions().await;
    let w = Workdir::new();
    w.write("in-0.jsonl", &lines(0, 0..10));
    let cfg = w.write(
        "lake.toml",
        &file_config(&w, &sink_lines(&bucket, "")).replace(ENDPOINT, &proxy),
    );
    for cmd in ["check", "run"] {
        let cfg = cfg.clone();
        let out = tokio::task::spawn_blocking(move || idem().arg(cmd).arg(&cfg).output())
            .await
            .unwrap()
            .unwrap();
        let err = text(&out.stdout) + &text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("ignored `If-None-Match: *`")
                && err.contains("lacks the conditional writes"),
            "{cmd}: {err}"
        );
    }
    // The probe cleans up after itself; no data or manifest was written.
    assert_eq!(keys(&bucket, "").await, Default::default());
}

/// `http://127.0.0.1:PORT`: a proxy to moto that drops the conditional
/// headers of each request (one request per connection).
async fn proxy_without_conditions() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 8192];
                let body = loop {
                    let n = client.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        break head.split_off(i + 4);
                    }
                };
                let mut out = String::new();
                for line in String::from_utf8_lossy(&head).split("\r\n") {
                    let l = line.to_ascii_lowercase();
                    let dropped = ["if-none-match:", "if-match:", "connection:"]
                        .iter()
                        .any(|h| l.starts_with(h));
                    if !line.is_empty() && !dropped {
                        out.push_str(line);
                        out.push_str("\r\n");
                    }
                }
                out.push_str("connection: close\r\n\r\n");
                let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5000").await else {
                    return;
                };
                if server.write_all(out.as_bytes()).await.is_ok()
                    && server.write_all(&body).await.is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

/// The store stops mid-run and comes back with its data (s3s-fs keeps it on
/// disk): the runner retries the batch it was writing, and every record
/// lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restarted_mid_run_loses_and_repeats_nothing() {
    let store_dir = Workdir::new();
    let port = free_port();
    let mut store = Reaped(start_s3s_fs(&store_dir.path("data"), port));
    let bucket = fresh_bucket(&format!("fs{port}-restart")).await;

    let w = Workdir::new();
    add_lines(&w, 0..3000);
    let cfg = w.write(
        "lake.toml",
        // Objects roll every 100 ms: flushes meet the outage too.
        &(file_config(&w, &sink_lines(&bucket, "roll_interval = \"100ms\"")).replace(
            "type = \"file\"",
            "type = \"file\"\nfollow = true\npoll_interval = \"50ms\"",
        ) + "[connectors.lake.retry]\nmax_attempts = 0\ninitial_backoff = \"100ms\"\nmax_backoff = \"500ms\"\n"),
    );
    let mut runner = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .env("AWS_SECRET_ACCESS_KEY", FS_SECRET_KEY)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Drained as it comes, so that the runner never blocks on a full pipe.
    let mut pipe = runner.0.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut err).unwrap();
        err
    });
    let want = |w: &Workdir| {
        (0..2)
            .map(|p| {
                let path = w.path(&format!("in-{p}.jsonl"));
                let len = std::fs::metadata(&path).unwrap().len() as i64;
                (path.display().to_string(), len)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let caught_up = |want: std::collections::BTreeMap<String, i64>| {
        let bucket = bucket.clone();
        async move {
            for _ in 0..600 {
                if landed(&bucket, "", "lake").await.positions == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("positions never reached {want:?}");
        }
    };
    caught_up(want(&w)).await;

    // The store goes away while more arrives; the runner keeps retrying.
    store.0.kill().unwrap();
    store.0.wait().unwrap();
    add_lines(&w, 3000..6000);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(runner.0.try_wait().unwrap().is_none(), "the runner gave up");
    let _store = Reaped(start_s3s_fs(&store_dir.path("data"), port));
    caught_up(want(&w)).await;

    signal(runner.0.id(), "TERM");
    let status = runner.0.wait().unwrap();
    let err = stderr.join().unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("no answer") || err.contains("retry"),
        "the outage was not reported: {err}"
    );
    let got = landed(&bucket, "", "lake").await;
    got.assert_only_named();
    assert_eq!((got.lines.len(), got.distinct_ids()), (12_000, 12_000));
}

/// A long history: the manifest keeps only the newest objects and names
/// the older ones through segments; recovery keeps every object a segment
/// names, removes a segment no manifest names, and leaves alone what a
/// newer epoch wrote (a runner that is already stale must not delete its
/// successor's work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_moves_to_segments_and_recovery_keeps_them() {
    let bucket = fresh_bucket("segments").await;
    let w = Workdir::new();
    add_lines(&w, 0..5000);
    let cfg = lake_config(
        &w,
        &bucket,
        // Every batch commits its objects: a history of many commits.
        "max_object_records = 100\nmanifest_max_objects = 3\nroll_interval = \"0s\"",
    );
    run_ok(idem().arg("run").arg(&cfg));
    let got = landed(&bucket, "", "lake").await;
    got.assert_only_named();
    assert_eq!(got.lines.len(), 10_000);
    for m in &got.manifests {
        let segments = m["segments"].as_array().unwrap();
        // Batches of up to 1,000 records in objects of 100: at least five
        // commits, each after the first moving the manifest's objects out.
        assert!(segments.len() >= 2, "{m}");
        assert!(m["objects"].as_array().unwrap().len() <= 12, "{m}");
    }

    // Plant a segment of epoch 1 that no manifest names, and a data object
    // of an epoch newer than any runner so far.
    let seg_key = got.manifests[0]["segments"][0]["key"].as_str().unwrap();
    let stray_segment = format!(
        "{}/{}-{}+1.json",
        seg_key.rsplit_once('/').unwrap().0,
        "9".repeat(20),
        "9".repeat(20)
    );
    put(&bucket, &stray_segment, b"{}").await;
    let data_key = got.manifests[0]["objects"][0]["key"].as_str().unwrap();
    let (head, _) = data_key.rsplit_once('+').unwrap();
    let newer = format!("{head}+999.jsonl");
    put(&bucket, &newer, b"{}\n").await;

    w.append("in-0.jsonl", &lines(0, 5000..6000));
    run_ok(idem().arg("run").arg(&cfg));
    let stored = keys(&bucket, "").await;
    assert!(!stored.contains(&stray_segment), "a stray segment survived");
    assert!(
        stored.contains(&newer),
        "a newer epoch's object was removed"
    );
    client()
        .delete_object()
        .bucket(&bucket)
        .key(&newer)
        .send()
        .await
        .unwrap();
    let got = landed(&bucket, "", "lake").await;
    got.assert_only_named();
    assert_eq!((got.lines.len(), got.distinct_ids()), (11_000, 11_000));
}

/// Records whose field and day alternate inside every batch: grouped into
/// one object per folder and batch (not one per change), each object
/// holding only its folder's records, every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_and_the_day_make_folders_and_records_are_grouped_into_them() {
    let bucket = fresh_bucket("field").await;
    let w = Workdir::new();
    let countries = [Some("US"), Some("DE"), Some("a/b"), None];
    for part in 0..2 {
        let text: String = (0..3000)
            .map(|i| {
                let country = countries[i % 4].map_or("null".into(), |c| format!("\"{c}\""));
                let day = 1 + (i / 4) % 2;
                format!("{{\"id\":\"p{part}-{i}\",\"n\":{i},\"country\":{country},\"ts\":\"2026-11-{day:02}T10:00:00Z\"}}\n")
            })
            .collect();
        w.write(&format!("in-{part}.jsonl"), &text);
    }
    let cfg = lake_config_with(
        &w,
        &bucket,
        "compression = \"gzip\"\npartition_column = \"country\"\ntime_column = \"ts\"\nmanifest_max_objects = 3",
        &[("country", "text"), ("ts", "timestamp")],
    );
    run_ok(idem().arg("run").arg(&cfg));

    let l = landed(&bucket, "", "lake").await;
    l.assert_only_named();
    assert_eq!((l.lines.len(), l.distinct_ids()), (6000, 6000));
    // Objects stay open across the batches of 1,000 until the run ends:
    // one per folder and partition (cut at every change it would be one
    // per record; closed with each batch, 8 per batch).
    let objects: Vec<&String> = l
        .named
        .iter()
        .filter(|k| !k.contains("/_segments/"))
        .collect();
    assert_eq!(objects.len(), 2 * 8, "{objects:?}");
    let mut folders = std::collections::BTreeSet::new();
    for key in objects {
        for r in records(&bucket, key).await {
            let country = match r["country"].as_str() {
                Some("a/b") => "a%2Fb",
                Some(c) => c,
                None => "__HIVE_DEFAULT_PARTITION__",
            };
            let i = index_of(&r);
            let day = format!("2026-11-{:02}", 1 + (i / 4) % 2);
            assert_eq!(r["ts"].as_str(), Some(&*format!("{day}T10:00:00.000000Z")));
            let folder = format!("/country={country}/dt={day}/");
            assert!(key.contains(&folder), "{r} in {key}");
            folders.insert(folder);
        }
    }
    assert_eq!(folders.len(), 8, "{folders:?}");
}

/// Objects open across batches: the admin API shows how far the runner
/// has written and, apart, how far a manifest has committed; `idem
/// status` says which partitions hold batches not yet committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_written_and_not_yet_committed_show_in_the_admin_api() {
    let bucket = fresh_bucket("written").await;
    let w = Workdir::new();
    add_lines(&w, 0..500);
    let port = free_port();
    let conf = format!("[runner.admin]\nlisten = \"127.0.0.1:{port}\"\n")
        + &file_config(&w, &sink_lines(&bucket, "roll_interval = \"1h\"")).replace(
            "type = \"file\"",
            "type = \"file\"\nfollow = true\npoll_interval = \"50ms\"",
        );
    let cfg = w.write("lake.toml", &conf);
    // The config's admin address, not the tests' own port per idem.
    let mut runner = Reaped(
        idem()
            .env_remove("IDEM_ADMIN_LISTEN")
            .arg("run")
            .arg(&cfg)
            .spawn()
            .unwrap(),
    );
    let sizes: Vec<(String, u64)> = (0..2)
        .map(|p| {
            let path = w.path(&format!("in-{p}.jsonl"));
            let len = std::fs::metadata(&path).unwrap().len();
            (path.display().to_string(), len)
        })
        .collect();
    let url = format!("http://127.0.0.1:{port}/connectors/lake");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut seen = serde_json::Value::Null;
    for _ in 0..200 {
        if let Ok(r) = http.get(&url).send().await {
            let body = r.text().await.unwrap_or_default();
            seen = serde_json::from_str(&body).unwrap_or_default();
            let written: Vec<u64> = seen["partitions"]
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["written"].as_u64()).collect())
                .unwrap_or_default();
            if written.len() == 2 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (path, len) in &sizes {
        let p = seen["partitions"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["partition"] == path.as_str()))
            .unwrap_or_else(|| panic!("{path} not listed: {seen}"));
        assert_eq!(p["written"].as_u64(), Some(*len), "{seen}");
        assert_eq!(
            p["committed"].as_u64(),
            Some(0),
            "committed before the roll: {seen}"
        );
    }
    let out = idem()
        .env_remove("IDEM_ADMIN_LISTEN")
        .arg("status")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("not yet committed"),
        "{}",
        text(&out.stdout)
    );
    assert!(landed(&bucket, "", "lake").await.lines.is_empty());

    // A stop commits what was written.
    signal(runner.0.id(), "TERM");
    assert!(runner.0.wait().unwrap().success());
    let got = landed(&bucket, "", "lake").await;
    got.assert_only_named();
    assert_eq!((got.lines.len(), got.distinct_ids()), (1000, 1000));
    for (path, len) in &sizes {
        assert_eq!(got.positions.get(path), Some(&(*len as i64)));
    }
}
