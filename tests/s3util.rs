//! The test S3 store (scripts/s3.sh, moto_server on 127.0.0.1:5000): a
//! bucket per test, and what Idem's manifests say landed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

pub const ENDPOINT: &str = "http://127.0.0.1:5000";

pub fn client() -> Client {
    let creds = aws_sdk_s3::config::Credentials::new("idem-test", "idem-test", None, None, "test");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(ENDPOINT)
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    Client::from_conf(conf)
}

/// A bucket of its own.
pub async fn fresh_bucket(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let bucket = format!("{prefix}-{}-{nanos}", std::process::id());
    client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "S3 store at {ENDPOINT}: {}; start it with bash scripts/s3.sh",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
    bucket
}

/// `[connectors.NAME.sink]` lines for `bucket` on the test store.
pub fn sink_lines(bucket: &str, extra: &str) -> String {
    format!("type = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{ENDPOINT}\"\npath_style = true\n{extra}")
}

pub async fn get(bucket: &str, key: &str) -> Vec<u8> {
    let out = client()
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
    let bytes = out.body.collect().await.unwrap().into_bytes().to_vec();
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
    client()
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
        let page = client()
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
    /// Keys the manifests name.
    pub named: BTreeSet<String>,
    /// Every data object under the connector's prefix.
    pub stored: BTreeSet<String>,
    pub manifests: Vec<serde_json::Value>,
}

pub async fn landed(bucket: &str, prefix: &str, connector: &str) -> S3Landed {
    let root = format!("{prefix}{connector}/");
    let all = keys(bucket, &root).await;
    let manifest_keys: Vec<&String> = all
        .iter()
        .filter(|k| k.starts_with(&format!("{root}_manifests/")))
        .collect();
    let mut out = S3Landed {
        lines: Vec::new(),
        positions: BTreeMap::new(),
        named: BTreeSet::new(),
        stored: all
            .iter()
            .filter(|k| !k.starts_with(&format!("{root}_manifests/")))
            .cloned()
            .collect(),
        manifests: Vec::new(),
    };
    for mk in manifest_keys {
        let m: serde_json::Value = serde_json::from_slice(&get(bucket, mk).await).unwrap();
        let partition = m["partition"].as_str().unwrap().to_string();
        out.positions
            .insert(partition.clone(), m["next_offset"].as_i64().unwrap_or(-1));
        // The named objects tile the offsets they cover, in order.
        let mut expect_first: Option<u64> = None;
        for o in m["objects"].as_array().unwrap() {
            let key = o["key"].as_str().unwrap().to_string();
            let first = o["first_offset"].as_u64().unwrap();
            if let Some(e) = expect_first {
                assert_eq!(first, e, "a gap or overlap before {key}");
            }
            expect_first = Some(o["next_offset"].as_u64().unwrap());
            let mut n = 0;
            for v in records(bucket, &key).await {
                assert_eq!(v["_idem_partition"].as_str(), Some(partition.as_str()));
                let off = v["_idem_offset"].as_u64().unwrap();
                assert!(
                    off >= first && off < o["next_offset"].as_u64().unwrap(),
                    "offset {off} outside the range of {key}"
                );
                out.lines.push(v);
                n += 1;
            }
            assert_eq!(Some(n), o["records"].as_u64(), "records of {key}");
            assert!(out.named.insert(key), "an object named twice");
        }
        if let Some(e) = expect_first {
            assert_eq!(
                Some(e as i64),
                m["next_offset"].as_i64(),
                "the last object ends at the position"
            );
        }
        out.manifests.push(m);
    }
    out
}

impl S3Landed {
    /// Every stored data object is named by a manifest, and every named
    /// object is stored.
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
