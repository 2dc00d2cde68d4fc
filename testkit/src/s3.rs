//! The test S3 stores: moto_server on 127.0.0.1:5000 (scripts/s3.sh) for
//! most tests, s3s-fs on 127.0.0.1:5001 (scripts/s3s-fs.sh), which checks
//! credentials and keeps its data on disk, for buckets named `fs-*`. A
//! bucket per test, and what Idem's manifests say landed.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

pub const ENDPOINT: &str = "http://127.0.0.1:5000";
/// s3s-fs, and the one key it accepts (scripts/s3s-fs.sh).
pub const FS_ENDPOINT: &str = "http://127.0.0.1:5001";
pub const FS_ACCESS_KEY: &str = "idem-test";
pub const FS_SECRET_KEY: &str = "idem-test-secret";

/// The store holding `bucket`, and the secret key it takes: `fs-*` on
/// s3s-fs, `fsPORT-*` on a test's own s3s-fs at that port, others on moto.
fn store_of(bucket: &str) -> (String, &'static str) {
    let port = bucket
        .strip_prefix("fs")
        .and_then(|rest| rest.split_once('-'))
        .map(|(port, _)| port);
    match port {
        Some("") => (FS_ENDPOINT.into(), FS_SECRET_KEY),
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
            (format!("http://127.0.0.1:{p}"), FS_SECRET_KEY)
        }
        _ => (ENDPOINT.into(), "idem-test"),
    }
}

/// A test's own s3s-fs (built by scripts/s3s-fs.sh) on `port`, keeping its
/// buckets in `data`; it listens when this returns.
pub fn start_s3s_fs(data: &std::path::Path, port: u16) -> std::process::Child {
    std::fs::create_dir_all(data).unwrap();
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
    let mut child = std::process::Command::new(format!("{home}/bin/s3s-fs"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", FS_ACCESS_KEY, "--secret-key", FS_SECRET_KEY])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("s3s-fs: install it with bash scripts/s3s-fs.sh");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("s3s-fs did not listen on {port}");
}

pub fn client_at(endpoint: &str, secret: &str) -> Client {
    let creds = aws_sdk_s3::config::Credentials::new("idem-test", secret, None, None, "test");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    Client::from_conf(conf)
}

/// A client for the store that holds `bucket`.
pub fn client_for(bucket: &str) -> Client {
    let (endpoint, secret) = store_of(bucket);
    client_at(&endpoint, secret)
}

/// A client for moto's store.
pub fn client() -> Client {
    client_at(ENDPOINT, "idem-test")
}

/// A bucket of its own; on s3s-fs when `prefix` starts with `fs-`.
pub async fn fresh_bucket(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let bucket = format!("{prefix}-{}-{nanos}", std::process::id());
    let (endpoint, _) = store_of(&bucket);
    client_for(&bucket)
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "S3 store at {endpoint}: {}; start it with bash scripts/{}",
                aws_sdk_s3::error::DisplayErrorContext(&e),
                if endpoint == ENDPOINT {
                    "s3.sh"
                } else {
                    "s3s-fs.sh"
                }
            )
        });
    bucket
}

/// `[connectors.NAME.sink]` lines for `bucket` on the test store.
pub fn sink_lines(bucket: &str, extra: &str) -> String {
    let (endpoint, _) = store_of(bucket);
    format!("type = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\npath_style = true\n{extra}")
}

pub async fn get(bucket: &str, key: &str) -> Vec<u8> {
    // s3s-fs replaces an object's body (written aside, then renamed) and
    // its stored checksum in two steps, so a read racing a replacement (a
    // manifest, polled while the runner commits) can pair the new body with
    // the old checksum: the SDK then reports a checksum mismatch. Such a
    // read is tried again; S3 itself replaces both at once. Objects holding
    // data are never replaced with other bytes (their names carry the
    // writer's epoch and first offset; a retried PUT sends the same bytes).
    let mut tries = 0;
    let bytes = loop {
        tries += 1;
        let out = client_for(bucket)
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
        match out.body.collect().await {
            Ok(body) => break body.into_bytes().to_vec(),
            Err(e) if tries < 20 && format!("{e:?}").contains("ChecksumMismatch") => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("get {key}: {e:?}"),
        }
    };
    if key.ends_with(".gz") {
        let mut s = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut s)
            .unwrap();
        s
    } else if key.ends_with(".zst") {
        zstd::decode_all(&bytes[..]).unwrap()
    } else {
        bytes
    }
}

/// An object's records as JSON values: its lines, or its Parquet rows.
pub async fn records(bucket: &str, key: &str) -> Vec<serde_json::Value> {
    let body = get(bucket, key).await;
    if key.ends_with(".parquet") {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let reader = SerializedFileReader::new(bytes::Bytes::from(body)).unwrap();
        reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| {
                use parquet::record::Field;
                let row = row.unwrap();
                let obj = row.get_column_iter().map(|(name, f)| {
                    let v = match f {
                        Field::Null => serde_json::Value::Null,
                        Field::Str(s) => s.clone().into(),
                        Field::Long(n) => (*n).into(),
                        Field::Int(n) => (*n).into(),
                        Field::Double(x) => (*x).into(),
                        Field::Bool(b) => (*b).into(),
                        other => other.to_string().into(),
                    };
                    (name.clone(), v)
                });
                serde_json::Value::Object(obj.collect())
            })
            .collect()
    } else {
        String::from_utf8(body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub async fn put(bucket: &str, key: &str, body: &[u8]) {
    client_for(bucket)
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

pub async fn keys(bucket: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut token = None;
    loop {
        let page = client_for(bucket)
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        out.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_string()),
            None => return out,
        }
    }
}

/// What the manifests of `connector` (under `prefix`) say landed.
pub struct S3Landed {
    /// Every line of every object a manifest names.
    pub lines: Vec<serde_json::Value>,
    /// Partition -> next offset.
    pub positions: BTreeMap<String, i64>,
    /// Keys the manifests name (data objects and segments).
    pub named: BTreeSet<String>,
    /// Every data object and segment under the connector's prefix.
    pub stored: BTreeSet<String>,
    pub manifests: Vec<serde_json::Value>,
    /// How many segments the manifests name.
    pub segments: usize,
}

pub async fn landed(bucket: &str, prefix: &str, connector: &str) -> S3Landed {
    let root = format!("{prefix}{connector}/");
    let manifests = format!("{root}_manifests/");
    let all = keys(bucket, &root).await;
    let mut out = S3Landed {
        lines: Vec::new(),
        positions: BTreeMap::new(),
        named: BTreeSet::new(),
        stored: all
            .iter()
            .filter(|k| !k.starts_with(&manifests))
            .cloned()
            .collect(),
        manifests: Vec::new(),
        segments: 0,
    };
    for mk in all.iter().filter(|k| k.starts_with(&manifests)) {
        let m: serde_json::Value = serde_json::from_slice(&get(bucket, mk).await).unwrap();
        let partition = m["partition"].as_str().unwrap().to_string();
        out.positions
            .insert(partition.clone(), m["next_offset"].as_i64().unwrap_or(-1));
        // The committed objects: the segments' (in order), then the
        // manifest's own.
        let mut objects = Vec::new();
        for s in m["segments"].as_array().into_iter().flatten() {
            let key = s["key"].as_str().unwrap().to_string();
            let seg: serde_json::Value = serde_json::from_slice(&get(bucket, &key).await).unwrap();
            let inner = seg["objects"].as_array().unwrap().clone();
            assert_eq!(Some(inner.len() as u64), s["objects"].as_u64(), "{key}");
            let lowest = inner
                .iter()
                .map(|o| o["first_offset"].as_u64().unwrap())
                .min();
            let highest = inner
                .iter()
                .map(|o| o["next_offset"].as_u64().unwrap())
                .max();
            assert_eq!(lowest, s["first_offset"].as_u64(), "{key}");
            assert_eq!(highest, s["next_offset"].as_u64(), "{key}");
            objects.extend(inner);
            assert!(out.named.insert(key), "a segment named twice");
            out.segments += 1;
        }
        objects.extend(m["objects"].as_array().unwrap().iter().cloned());
        // Each object's records lie in its offset range, starting at its
        // first; no offset is in two objects; all lie before the position.
        let mut offsets = BTreeSet::new();
        for o in &objects {
            let key = o["key"].as_str().unwrap().to_string();
            let first = o["first_offset"].as_u64().unwrap();
            let next = o["next_offset"].as_u64().unwrap();
            let mut n = 0;
            let mut lowest = u64::MAX;
            for v in records(bucket, &key).await {
                assert_eq!(v["_idem_partition"].as_str(), Some(partition.as_str()));
                let off = v["_idem_offset"].as_u64().unwrap();
                assert!(
                    off >= first && off < next,
                    "offset {off} outside the range of {key}"
                );
                assert!(offsets.insert(off), "offset {off} in two objects");
                lowest = lowest.min(off);
                out.lines.push(v);
                n += 1;
            }
            assert_eq!(lowest, first, "{key} does not start at its first offset");
            assert_eq!(Some(n), o["records"].as_u64(), "records of {key}");
            assert!(out.named.insert(key), "an object named twice");
        }
        if let Some(last) = offsets.last() {
            assert!(
                (*last as i64) < m["next_offset"].as_i64().unwrap(),
                "a record at or past the position"
            );
        }
        out.manifests.push(m);
    }
    out
}

impl S3Landed {
    /// How many distinct `id`s the records hold.
    pub fn distinct_ids(&self) -> usize {
        let ids: BTreeSet<&str> = self.lines.iter().filter_map(|v| v["id"].as_str()).collect();
        ids.len()
    }

    /// Every stored data object and segment is named by a manifest, and
    /// every named one is stored.
    pub fn assert_only_named(&self) {
        let extra: Vec<&String> = self.stored.difference(&self.named).collect();
        let missing: Vec<&String> = self.named.difference(&self.stored).collect();
        assert!(
            extra.is_empty(),
            "{} stored objects no manifest names, e.g. {:?}",
            extra.len(),
            &extra[..extra.len().min(3)]
        );
        assert!(
            missing.is_empty(),
            "{} objects named by a manifest are missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
    }
}
