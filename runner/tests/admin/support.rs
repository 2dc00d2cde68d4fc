//! What the admin tests share: configs, a runner in the background, its
//! admin API, metrics and what PostgreSQL holds.

use idem_testkit::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Lines `{"id":"{prefix}-{i}","n":i}` for i in `range`.
pub fn lines(prefix: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| format!("{{\"id\":\"{prefix}-{i}\",\"n\":{i}}}\n"))
        .collect()
}

/// One connector `name`: a followed file into PostgreSQL `schema`.`name`.
pub fn connector(w: &Workdir, name: &str, schema: &str, pg: &str, extra: &str) -> String {
    format!(
        r#"
[connectors.{name}]
dead_letter = "{dl}"
[connectors.{name}.source]
type = "file"
path = "{src}"
follow = true
poll_interval = "20ms"
[connectors.{name}.sink]
type = "postgres"
url = "{pg}"
schema = "{schema}"
table = "{name}"
connect_timeout = "1s"
[connectors.{name}.batch]
max_records = 100
linger = "20ms"
[connectors.{name}.retry]
max_attempts = 0
initial_backoff = "50ms"
max_backoff = "300ms"
{extra}
[[connectors.{name}.columns]]
name = "id"
type = "text"
required = true
[[connectors.{name}.columns]]
name = "n"
type = "bigint"
required = true
"#,
        dl = w.path(&format!("{name}.dead.jsonl")).display(),
        src = w.path(&format!("{name}.jsonl")).display(),
    )
}

pub fn admin_section(port: u16, token: bool) -> String {
    format!(
        "[runner]\nprogress_interval = \"1s\"\nshutdown_grace = \"20s\"\n[runner.admin]\nlisten = \"127.0.0.1:{port}\"\n{}",
        if token { "token_env = \"IDEM_TEST_ADMIN_TOKEN\"\n" } else { "" }
    )
}

pub fn start(cfg: &std::path::Path) -> Reaped {
    Reaped(
        idem()
            .env_remove("IDEM_ADMIN_LISTEN")
            .env("IDEM_TEST_ADMIN_TOKEN", "s3cret-token")
            .env("RUST_LOG", "info")
            .arg("run")
            .arg(cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn json(&self, path: &str) -> Value {
        let (code, body) = self.get(path).await;
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        self.post_with(path, &headers).await
    }

    pub async fn post_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        (
            code,
            serde_json::from_str(&r.text().await.unwrap()).unwrap(),
        )
    }

    /// Wait until the API answers (the process has bound its port).
    pub async fn up(&self, child: &mut Reaped) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .0
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("idem exited with {status} before its admin API answered:\n{err}");
            }
            if self
                .http
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(Instant::now() < deadline, "the admin API never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll `GET path` until `ok` holds of its JSON.
    pub async fn until(&self, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = self.get(path).await;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last {path}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `name_total{connector="c",...} N` summed over the partitions.
pub fn metric(text: &str, name: &str, connector: &str) -> u64 {
    let label = format!("connector=\"{connector}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bad sample {l}")) as u64
        })
        .sum()
}

/// (rows, distinct ids) in schema.table.
pub async fn counts(schema: &str, table: &str) -> (i64, i64) {
    let row = pg()
        .await
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id) FROM \"{schema}\".\"{table}\""),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

pub async fn epoch(schema: &str, connector: &str) -> i64 {
    pg().await
        .query_one(
            &format!("SELECT max(epoch) FROM \"{schema}\".idem_offsets WHERE connector = $1"),
            &[&connector],
        )
        .await
        .unwrap()
        .get(0)
}

pub fn committed(v: &Value) -> u64 {
    v["partitions"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["committed"].as_u64()).sum())
        .unwrap_or(0)
}

/// SIGTERM, which must exit 0.
/// What a finished runner wrote, stderr then stdout.
pub fn output_of(child: &mut Reaped) -> String {
    use std::io::Read;
    let mut log = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_string(&mut log).unwrap();
    }
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_string(&mut log).unwrap();
    }
    log
}

pub fn stop_cleanly(child: &mut Reaped) {
    signal(child.0.id(), "TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}");
}

pub fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
