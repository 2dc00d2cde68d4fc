//! The admin API of the real `idem run` binary, against a real PostgreSQL
//! sink: metrics equal what was sent, pause and resume lose nothing,
//! readiness follows the sink's reachability, reload restarts only what
//! changed and refuses a bad file, SIGTERM mid-load exits 0 and a restart
//! loses and duplicates nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Lines `{"id":"{prefix}-{i}","n":i}` for i in `range`.
fn lines(prefix: &str, range: std::ops::Range<usize>) -> String {
    range
        .map(|i| format!("{{\"id\":\"{prefix}-{i}\",\"n\":{i}}}\n"))
        .collect()
}

/// One connector `name`: a followed file into PostgreSQL `schema`.`name`.
fn connector(w: &Workdir, name: &str, schema: &str, pg: &str, extra: &str) -> String {
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

fn admin_section(port: u16, token: bool) -> String {
    format!(
        "[runner]\nprogress_interval = \"1s\"\nshutdown_grace = \"20s\"\n[runner.admin]\nlisten = \"127.0.0.1:{port}\"\n{}",
        if token { "token_env = \"IDEM_TEST_ADMIN_TOKEN\"\n" } else { "" }
    )
}

fn start(cfg: &std::path::Path) -> Reaped {
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

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn json(&self, path: &str) -> Value {
        let (code, body) = self.get(path).await;
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        self.post_with(path, &headers).await
    }

    async fn post_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
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
    async fn up(&self, child: &mut Reaped) {
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
    async fn until(&self, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
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
fn metric(text: &str, name: &str, connector: &str) -> u64 {
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
async fn counts(schema: &str, table: &str) -> (i64, i64) {
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

async fn epoch(schema: &str, connector: &str) -> i64 {
    pg().await
        .query_one(
            &format!("SELECT max(epoch) FROM \"{schema}\".idem_offsets WHERE connector = $1"),
            &[&connector],
        )
        .await
        .unwrap()
        .get(0)
}

fn committed(v: &Value) -> u64 {
    v["partitions"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["committed"].as_u64()).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_and_pause_and_resume_lose_nothing() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_metrics");
    let port = free_port();
    let mut input = lines("a", 0..1000);
    for i in 0..10 {
        input.push_str(&format!("{{\"id\":\"bad-{i}\",\"n\":\"not a number\"}}\n"));
    }
    w.write("pay.jsonl", &input);
    let cfg = w.write(
        "c.toml",
        &(admin_section(port, true) + &connector(&w, "pay", &schema, &pg_url(), "")),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    let size = input.len() as u64;
    api.until("/connectors/pay", "everything committed", |v| {
        committed(v) == size
    })
    .await;

    let (code, text) = api.get("/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(&text, "idem_messages_read_total", "pay"),
        1010,
        "{text}"
    );
    assert_eq!(metric(&text, "idem_messages_written_total", "pay"), 1000);
    assert_eq!(
        metric(&text, "idem_messages_dead_lettered_total", "pay"),
        10
    );
    assert_eq!(metric(&text, "idem_messages_deduplicated_total", "pay"), 0);
    assert_eq!(metric(&text, "idem_committed_position", "pay"), size);
    assert_eq!(metric(&text, "idem_lag_messages", "pay"), 0);
    let batches = metric(&text, "idem_batches_committed_total", "pay");
    assert!(
        batches >= 10,
        "1,010 messages in batches of at most 100: {batches}"
    );
    assert_eq!(
        metric(&text, "idem_commit_duration_seconds_count", "pay"),
        batches
    );
    assert_eq!(metric(&text, "idem_connector_ready", "pay"), 1);
    assert!(text.contains("idem_connector_state{connector=\"pay\",state=\"running\"} 1"));
    assert_eq!(counts(&schema, "pay").await, (1000, 1000));

    let v = api.json("/connectors/pay").await;
    assert_eq!(v["state"], "running");
    assert_eq!(v["guarantee"], "exactly-once");
    assert_eq!(v["dead_lettered"], 10);
    assert_eq!(v["partitions"][0]["lag"], 0);

    // State changes need the token; reads do not.
    let (code, body) = api.post("/connectors/pay/pause", None).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = api.post("/connectors/pay/pause", Some("wrong")).await;
    assert_eq!(code, 401);
    let (code, body) = api
        .post("/connectors/nope/pause", Some("s3cret-token"))
        .await;
    assert_eq!(code, 404, "{body}");
    // A web page cannot drive it: a foreign origin or site is refused
    // before the token is looked at, and so is a form's content type. The
    // scheme is case-insensitive; the API's own origin passes.
    let auth = ("authorization", "Bearer s3cret-token");
    let own = format!("http://127.0.0.1:{port}");
    for (headers, want) in [
        (vec![auth, ("origin", "http://evil.example")], 403),
        (vec![("origin", "http://evil.example")], 403),
        (vec![auth, ("sec-fetch-site", "cross-site")], 403),
        (
            vec![auth, ("content-type", "application/x-www-form-urlencoded")],
            415,
        ),
        (vec![auth, ("content-type", "text/plain")], 415),
        (vec![("authorization", "bearer s3cret-token")], 404),
        (
            vec![
                auth,
                ("origin", own.as_str()),
                ("content-type", "application/json"),
            ],
            404,
        ),
        (vec![auth, ("sec-fetch-site", "same-origin")], 404),
    ] {
        let (code, body) = api.post_with("/connectors/nope/pause", &headers).await;
        assert_eq!(code, want, "{headers:?}: {body}");
    }
    let (code, body) = api
        .post("/connectors/pay/resume", Some("s3cret-token"))
        .await;
    assert_eq!(code, 409, "resume while running: {body}");

    let (code, body) = api
        .post("/connectors/pay/pause", Some("s3cret-token"))
        .await;
    assert_eq!(code, 202, "{body}");
    api.until("/connectors/pay", "paused", |v| v["state"] == "paused")
        .await;
    w.append("pay.jsonl", &lines("b", 0..500));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counts(&schema, "pay").await,
        (1000, 1000),
        "a paused connector wrote"
    );
    let (code, _) = api.get("/readyz").await;
    assert_eq!(code, 200, "paused on purpose is ready");

    let (code, body) = api
        .post("/connectors/pay/resume", Some("s3cret-token"))
        .await;
    assert_eq!(code, 202, "{body}");
    let size = size + lines("b", 0..500).len() as u64;
    api.until("/connectors/pay", "the rest committed", |v| {
        v["state"] == "running" && committed(v) == size
    })
    .await;
    assert_eq!(counts(&schema, "pay").await, (1500, 1500));

    // A restart reopens the partition under a new epoch, loses nothing.
    let before = epoch(&schema, "pay").await;
    let (code, _) = api
        .post("/connectors/pay/restart", Some("s3cret-token"))
        .await;
    assert_eq!(code, 202);
    api.until("/connectors/pay", "restarted", |v| {
        v["state"] == "running" && v["ready"] == true
    })
    .await;
    w.append("pay.jsonl", &lines("c", 0..100));
    let size = size + lines("c", 0..100).len() as u64;
    api.until("/connectors/pay", "after restart", |v| committed(v) == size)
        .await;
    assert_eq!(epoch(&schema, "pay").await, before + 1);
    assert_eq!(counts(&schema, "pay").await, (1600, 1600));
    let text = api.get("/metrics").await.1;
    assert_eq!(
        metric(&text, "idem_messages_written_total", "pay"),
        1600,
        "counters survive a restart"
    );

    // `idem status` reads the running process.
    let out = idem()
        .env_remove("IDEM_ADMIN_LISTEN")
        .arg("status")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = text_of(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text_of(&out.stderr));
    assert!(
        stdout.contains(&format!("idem at http://127.0.0.1:{port}")),
        "{stdout}"
    );
    let row = stdout.lines().find(|l| l.starts_with("pay ")).unwrap();
    assert!(
        row.contains("running") && row.contains(&size.to_string()),
        "{stdout}"
    );

    stop_cleanly(&mut child);
    // Stopped: `status` falls back to the positions in the sink.
    let out = idem()
        .env_remove("IDEM_ADMIN_LISTEN")
        .arg("status")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = text_of(&out.stdout);
    assert!(stdout.contains("no running idem answers"), "{stdout}");
    assert!(stdout.contains(&size.to_string()), "{stdout}");
}

/// SIGTERM, which must exit 0.
fn stop_cleanly(child: &mut Reaped) {
    signal(child.0.id(), "TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}");
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_sink_going_away_and_coming_back() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_ready");
    let port = free_port();
    let pg = pg_url();
    let target = pg
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_string();
    let proxy = TcpProxy::start(&target);
    let via_proxy = pg.replace(&target, &format!("127.0.0.1:{}", proxy.port));
    w.write("ev.jsonl", &lines("r", 0..200));
    let cfg = w.write(
        "c.toml",
        &(admin_section(port, false) + &connector(&w, "ev", &schema, &via_proxy, "")),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    api.until("/readyz", "ready", |v| v["ready"] == true).await;

    proxy.set_up(false);
    // Keep messages coming so commits run into the missing sink.
    let mut sent = 200;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        w.append("ev.jsonl", &lines("r", sent..sent + 20));
        sent += 20;
        let (code, body) = api.get("/readyz").await;
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never unready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reason.contains("retrying"), "{reason}");
    let v = api.json("/connectors/ev").await;
    assert!(v["failing"]["message"].is_string(), "{v}");
    let text = api.get("/metrics").await.1;
    assert_eq!(metric(&text, "idem_connector_ready", "ev"), 0);
    assert!(metric(&text, "idem_retries_total", "ev") > 0);
    assert!(metric(&text, "idem_last_error_timestamp_seconds", "ev") > 1_700_000_000);

    proxy.set_up(true);
    api.until("/readyz", "ready again", |v| v["ready"] == true)
        .await;
    let size = std::fs::metadata(w.path("ev.jsonl")).unwrap().len();
    api.until("/connectors/ev", "all committed", |v| committed(v) == size)
        .await;
    assert_eq!(counts(&schema, "ev").await, (sent as i64, sent as i64));
    stop_cleanly(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_only_what_changed_and_refuses_a_bad_file() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_reload");
    let port = free_port();
    let pg = pg_url();
    w.write("a.jsonl", &lines("a", 0..100));
    w.write("b.jsonl", &lines("b", 0..100));
    let text = |b_linger: &str| {
        admin_section(port, false)
            + &connector(&w, "a", &schema, &pg, "")
            + &connector(&w, "b", &schema, &pg, "")
                .replace("linger = \"20ms\"", &format!("linger = \"{b_linger}\""))
    };
    let cfg = w.write("c.toml", &text("20ms"));
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    let all = |v: &Value, a: u64, b: u64| {
        let c = |i: usize| committed(&v["connectors"][i]);
        c(0) == a && c(1) == b
    };
    let (a_size, b_size) = (
        lines("a", 0..100).len() as u64,
        lines("b", 0..100).len() as u64,
    );
    api.until("/connectors", "both committed", |v| all(v, a_size, b_size))
        .await;
    let (ea, eb) = (epoch(&schema, "a").await, epoch(&schema, "b").await);

    // B's linger changes: SIGHUP restarts B alone.
    std::fs::write(&cfg, text("30ms")).unwrap();
    signal(child.0.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while epoch(&schema, "b").await == eb {
        assert!(Instant::now() < deadline, "b was not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(epoch(&schema, "a").await, ea, "a was restarted");

    // A bad file: refused with file, line and key, nothing restarted.
    let (ea, eb) = (epoch(&schema, "a").await, epoch(&schema, "b").await);
    std::fs::write(
        &cfg,
        text("30ms").replace("max_records = 100", "max_records = \"many\""),
    )
    .unwrap();
    let (code, body) = api.post("/reload", None).await;
    assert_eq!(code, 400, "{body}");
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("c.toml") && err.contains("max_records"),
        "{err}"
    );
    assert!(err.contains("nothing changed"), "{err}");
    signal(child.0.id(), "HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = api.json("/connectors").await;
    assert_eq!(
        (
            v["connectors"][0]["state"].as_str(),
            v["connectors"][1]["state"].as_str()
        ),
        (Some("running"), Some("running"))
    );
    assert_eq!(
        (epoch(&schema, "a").await, epoch(&schema, "b").await),
        (ea, eb)
    );

    // Both still move data, once.
    w.append("a.jsonl", &lines("a", 100..150));
    w.append("b.jsonl", &lines("b", 100..150));
    let (a_size, b_size) = (
        lines("a", 0..150).len() as u64,
        lines("b", 0..150).len() as u64,
    );
    api.until("/connectors", "both committed again", |v| {
        all(v, a_size, b_size)
    })
    .await;
    assert_eq!(counts(&schema, "a").await, (150, 150));
    assert_eq!(counts(&schema, "b").await, (150, 150));
    stop_cleanly(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_zero_and_a_restart_loses_and_duplicates_nothing() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_term");
    let port = free_port();
    let n = 200_000;
    w.write("big.jsonl", &lines("t", 0..n));
    let cfg = w.write(
        "c.toml",
        &(admin_section(port, false)
            + &connector(&w, "big", &schema, &pg_url(), "")
                .replace("follow = true", "follow = false")
                .replace("max_records = 100", "max_records = 2000")),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    api.until("/connectors/big", "some batches committed", |v| {
        v["batches"].as_u64().unwrap_or(0) >= 5
    })
    .await;
    signal(child.0.id(), "TERM");
    let out = child.0.wait().unwrap();
    assert!(out.success(), "SIGTERM mid-load exits 0: {out}");
    let (rows, distinct) = counts(&schema, "big").await;
    assert!(rows < n as i64, "stopped mid-load, not after it: {rows}");
    assert_eq!(rows, distinct);
    // A restart finishes the file: every line once.
    let mut again = start(&cfg);
    assert!(again.0.wait().unwrap().success());
    assert_eq!(counts(&schema, "big").await, (n as i64, n as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_on_a_clean_table_and_finds_what_was_planted() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_verify");
    let pg_url = pg_url();
    let mut plain = lines("a", 0..300);
    plain.push_str("{\"id\":\"broken\n");
    w.write("plain.jsonl", &plain);
    // Keys repeat: the upsert table keeps each key's last message.
    let keyed: String = (0..300)
        .map(|i| format!("{{\"id\":\"k-{}\",\"n\":{i}}}\n", i % 40))
        .collect();
    w.write("keyed.jsonl", &keyed);
    let bounded = |name: &str| {
        connector(&w, name, &schema, &pg_url, "").replace("follow = true", "follow = false")
    };
    let cfg = w.write(
        "c.toml",
        &(bounded("plain")
            + &bounded("keyed").replace(
                "table = \"keyed\"",
                "table = \"keyed\"\nmode = \"upsert\"\nkey = [\"id\"]",
            )),
    );
    run_ok(idem().arg("run").arg(&cfg));
    let verify = || idem().arg("verify").arg(&cfg).output().unwrap();
    let out = verify();
    let stdout = text_of(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text_of(&out.stderr));
    assert!(
        stdout.contains("✓ plain: 301 messages (1 dead-lettered), 300 rows: every message took effect exactly once"),
        "{stdout}"
    );
    assert!(
        stdout.contains("✓ keyed: 300 messages (0 dead-lettered), 40 rows"),
        "{stdout}"
    );

    // Plant a copy, a loss and a row no message explains; one lost key.
    let db = pg().await;
    let t = format!("\"{schema}\".\"plain\"");
    for sql in [
        format!("INSERT INTO {t} SELECT * FROM {t} WHERE id = 'a-17'"),
        format!("DELETE FROM {t} WHERE id = 'a-99'"),
        format!("INSERT INTO {t} SELECT id || '-x', n, _idem_partition, _idem_offset + 1 FROM {t} WHERE id = 'a-5'"),
        format!("DELETE FROM \"{schema}\".\"keyed\" WHERE id = 'k-3'"),
        // k-5's row points at its first message, not its last.
        format!(
            "UPDATE \"{schema}\".\"keyed\" SET _idem_offset = {} WHERE id = 'k-5'",
            keyed.lines().take(5).map(|l| l.len() + 1).sum::<usize>()
        ),
    ] {
        db.execute(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let out = verify();
    let stdout = text_of(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("✗ plain: 301 messages (1 dead-lettered), 301 rows: 3 findings"),
        "{stdout}"
    );
    let a17 = lines("a", 0..17).len();
    let a99 = lines("a", 0..99).len();
    let a5 = lines("a", 0..5).len();
    let plain_path = w.path("plain.jsonl").display().to_string();
    for line in [
        format!("duplicated: {plain_path}@{a17}: 2 rows"),
        format!("missing: {plain_path}@{a99} (from {plain_path}@{a99}): no row"),
        format!(
            "unexplained row: a row from {plain_path}@{}: no mapped message there",
            a5 + 1
        ),
        "✗ keyed: 300 messages (0 dead-lettered), 39 rows: 2 findings".to_string(),
        "missing: key \"k-3\"".to_string(),
        "stale row: key \"k-5\": the row holds".to_string(),
    ] {
        assert!(stdout.contains(&line), "missing {line:?} in\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_a_table_once_per_position_and_a_cap_stops_a_flood() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_dlq");
    let pg_url = pg_url();
    let mut input = lines("d", 0..50);
    input.push_str("{\"id\":\"bad-json\n");
    input.push_str("{\"id\":\"no-number\",\"n\":\"x\"}\n");
    input.push_str(&lines("d", 50..100));
    w.write("dl.jsonl", &input);
    let cfg = w.write(
        "c.toml",
        &(connector(&w, "dl", &schema, &pg_url, "")
            .replace("follow = true", "follow = false")
            .replace(
                &format!("dead_letter = \"{}\"\n", w.path("dl.dead.jsonl").display()),
                "",
            )
            + "[connectors.dl.dead_letters]\ndestination = \"table\"\ntable = \"rejects\"\n"),
    );
    // The first run dies after the dead letters are stored, before its
    // batch commits: the rerun stores them again, and the table keeps one
    // row per position.
    let out = idem()
        .env("IDEM_FAILPOINTS", "before_commit=1")
        .arg("run")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the fail point should have aborted the run"
    );
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(counts(&schema, "dl").await, (100, 100));
    let rows = pg()
        .await
        .query(
            &format!("SELECT connector, partition, \"offset\", error_class, reason, raw FROM \"{schema}\".rejects ORDER BY \"offset\""),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "one row per dead-lettered position");
    let bad_at = lines("d", 0..50).len() as i64;
    let (c, p, o, class, _, raw): (String, String, i64, String, String, Vec<u8>) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
        rows[0].get(4),
        rows[0].get(5),
    );
    assert_eq!(
        (c.as_str(), p, o, class.as_str()),
        (
            "dl",
            w.path("dl.jsonl").display().to_string(),
            bad_at,
            "mapping"
        )
    );
    assert_eq!(raw, b"{\"id\":\"bad-json");
    let reason: String = rows[1].get(4);
    assert!(reason.contains('n'), "{reason}");

    // A cap of 1 in a fresh table: the second bad message stops the
    // connector before its batch commits; nothing after it is written.
    let schema2 = fresh_schema("admin_dlq_cap");
    let capped = w.write(
        "capped.toml",
        &std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&schema, &schema2)
            .replace("table = \"rejects\"", "table = \"rejects\"\nmax = 1"),
    );
    let out = idem().arg("run").arg(&capped).output().unwrap();
    let stderr = text_of(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than dead_letters.max = 1"),
        "{stderr}"
    );
    let (rows, _) = counts(&schema2, "dl").await;
    assert!(
        rows < 100,
        "the batch with the second dead letter committed: {rows}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reopens_the_embedded_dedup_store_the_last_run_held() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_restart_dedup");
    let port = free_port();
    let mut input = lines("e", 0..200);
    input.push_str(&lines("e", 0..50)); // copies: dropped by the dedup stage
    w.write("ids.jsonl", &input);
    let dedup = format!(
        "[connectors.ids.dedup]\nid = \"/id\"\npath = \"{}\"\n",
        w.path("ids.redb").display()
    );
    let cfg = w.write(
        "c.toml",
        &(admin_section(port, false) + &connector(&w, "ids", &schema, &pg_url(), &dedup)),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    let mut size = input.len() as u64;
    api.until("/connectors/ids", "committed", |v| committed(v) == size)
        .await;
    for round in 0..3 {
        let (code, body) = api.post("/connectors/ids/restart", None).await;
        assert_eq!(code, 202, "{body}");
        api.until("/connectors/ids", "running again", |v| {
            v["state"] == "running" && v["ready"] == true
        })
        .await;
        let more = lines("e", 200 + round * 10..210 + round * 10) + &lines("e", 0..5);
        w.append("ids.jsonl", &more);
        size += more.len() as u64;
        api.until("/connectors/ids", "committed after restart", |v| {
            committed(v) == size
        })
        .await;
    }
    assert_eq!(counts(&schema, "ids").await, (230, 230));
    let v = api.json("/connectors/ids").await;
    assert_eq!(v["deduplicated"], 65, "{v}");
    stop_cleanly(&mut child);
}
