//! The admin API: metrics equal what was sent, pause and resume lose
//! nothing, readiness follows the sink, reload restarts only what changed.

use super::support::*;
use idem_testkit::*;
use serde_json::Value;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_sink_going_away_and_coming_back() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_ready");
    let port = free_port();
    let (proxy, via_proxy) = pg_proxy();
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

/// A proxy in front of the test PostgreSQL, and the URL through it.
fn pg_proxy() -> (TcpProxy, String) {
    let pg = pg_url();
    let target = pg
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_string();
    let proxy = TcpProxy::start(&target);
    let via_proxy = pg.replace(&target, &format!("127.0.0.1:{}", proxy.port));
    (proxy, via_proxy)
}

/// A batch's COMMIT reaches PostgreSQL and the connection breaks before
/// the answer comes back: the runner retries the batch, which must find it
/// committed and not write it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_not_written_again() {
    let w = Workdir::new();
    let schema = fresh_schema("admin_lost");
    let port = free_port();
    let (proxy, via_proxy) = pg_proxy();
    w.write("ev.jsonl", &lines("l", 0..100));
    let cfg = w.write(
        "c.toml",
        // In clear, for the proxy to see the COMMIT.
        &(admin_section(port, false)
            + &connector(&w, "ev", &schema, &via_proxy, "").replace(
                "connect_timeout = \"1s\"",
                "connect_timeout = \"1s\"\nsslmode = \"disable\"",
            )),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    let size = std::fs::metadata(w.path("ev.jsonl")).unwrap().len();
    api.until("/connectors/ev", "the first lines committed", |v| {
        committed(v) == size
    })
    .await;
    // The next COMMIT is the next batch's (tokio-postgres sends it as a
    // simple query).
    proxy.lose_answer_to(b"COMMIT\0");
    w.append("ev.jsonl", &lines("l", 100..200));
    let size = std::fs::metadata(w.path("ev.jsonl")).unwrap().len();
    api.until("/connectors/ev", "the rest committed", |v| {
        committed(v) == size
    })
    .await;
    assert_eq!(proxy.answers_lost(), 1);
    let text = api.get("/metrics").await.1;
    assert!(metric(&text, "idem_retries_total", "ev") > 0, "{text}");
    stop_cleanly(&mut child);
    assert_eq!(counts(&schema, "ev").await, (200, 200));
    let log = output_of(&mut child);
    assert!(log.contains("had already committed"), "{log}");
}

/// The same for the Iceberg sink: the catalog's COMMIT (which moves the
/// table's metadata pointer, with the batch's files and position) lands
/// and its answer is lost; the retried commit finds its position there and
/// appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_commit_whose_answer_was_lost_is_not_appended_again() {
    let w = Workdir::new();
    let catalog = fresh_schema("admin_lost_ice");
    let warehouse = format!("file://{}", w.path("warehouse").display());
    let port = free_port();
    let (proxy, via_proxy) = pg_proxy();
    w.write("ev.jsonl", &lines("l", 0..100));
    // In clear, for the proxy to see the COMMIT; a snapshot per batch.
    let sink = idem_testkit::iceberg::sink_lines(&catalog, &warehouse, "lake.ev")
        .replace(&pg_url(), &format!("{via_proxy}?sslmode=disable"))
        + "commit_interval = \"0s\"\n";
    let pg_sink = format!(
        "type = \"postgres\"\nurl = \"{via_proxy}\"\nschema = \"{catalog}\"\ntable = \"ev\"\nconnect_timeout = \"1s\"\n"
    );
    let text = connector(&w, "ev", &catalog, &via_proxy, "");
    assert!(text.contains(&pg_sink), "{text}");
    let cfg = w.write(
        "c.toml",
        &(admin_section(port, false) + &text.replace(&pg_sink, &sink)),
    );
    let mut child = start(&cfg);
    let api = Api::new(port);
    api.up(&mut child).await;
    let size = std::fs::metadata(w.path("ev.jsonl")).unwrap().len();
    api.until("/connectors/ev", "the first lines committed", |v| {
        committed(v) == size
    })
    .await;
    proxy.lose_answer_to(b"COMMIT\0");
    w.append("ev.jsonl", &lines("l", 100..200));
    let size = std::fs::metadata(w.path("ev.jsonl")).unwrap().len();
    api.until("/connectors/ev", "the rest committed", |v| {
        committed(v) == size
    })
    .await;
    assert_eq!(proxy.answers_lost(), 1);
    stop_cleanly(&mut child);
    let read = idem_testkit::iceberg::read(&catalog, &warehouse, "lake.ev");
    let mut ids: Vec<&str> = read
        .rows
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((read.rows.len(), ids.len()), (200, 200));
    let log = output_of(&mut child);
    assert!(log.contains("had already committed"), "{log}");
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
