//! The HTTP sink and the dedup stage against a receiver on 127.0.0.1
//! (`idem_testkit::receiver`) and real Redis: delivery through faults, refusals
//! to the dead letters, the bearer token and headers, copies of an id
//! never sent twice (in one batch, across batches and across runs), a
//! missing receiver named, and a Redis that lost its ids stopping the
//! connector or not, as configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_testkit::receiver::{Faults, Receiver};
use idem_testkit::*;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

fn config(w: &Workdir, url: &str, sink_extra: &str, dedup: &str) -> std::path::PathBuf {
    w.write(
        "http.toml",
        &format!(
            r#"
[connectors.orders]
dead_letter = "{dl}"

[connectors.orders.source]
type = "file"
path = "{glob}"

[connectors.orders.sink]
type = "http"
url = "{url}"
timeout = "300ms"
{sink_extra}

[connectors.orders.dedup]
id = "/id"
{dedup}

[connectors.orders.batch]
max_records = 50
linger = "10ms"

[connectors.orders.retry]
initial_backoff = "5ms"
max_backoff = "50ms"
max_attempts = {attempts}

[[connectors.orders.columns]]
name = "id"
type = "text"
required = true

[[connectors.orders.columns]]
name = "n"
type = "bigint"

[[connectors.orders.columns]]
name = "reject"
type = "boolean"
"#,
            dl = w.path("dead.jsonl").display(),
            glob = w.path("in-*.jsonl").display(),
            // The receiver fails requests on purpose: one retry policy
            // tries each batch (only its unanswered requests) this often.
            attempts = 20,
        ),
    )
}

/// `count` events `{prefix}-{i}` with n = i; every 10th is refused by the
/// receiver; every 7th is followed by a copy of an earlier id.
fn events(prefix: &str, count: usize) -> (String, BTreeMap<String, i64>, usize) {
    let mut out = String::new();
    let mut expected = BTreeMap::new();
    let mut refused = 0;
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let reject = i % 10 == 9;
        out.push_str(&format!(
            "{{\"id\":\"{id}\",\"n\":{i},\"reject\":{reject}}}\n"
        ));
        if reject {
            refused += 1;
        } else {
            expected.insert(id, i as i64);
        }
        if i % 7 == 6 {
            // A copy of an earlier id, with another value: the first wins.
            let j = i / 2;
            out.push_str(&format!(
                "{{\"id\":\"{prefix}-{j}\",\"n\":-1,\"reject\":false}}\n"
            ));
        }
    }
    (out, expected, refused)
}

fn effects(r: &Receiver) -> BTreeMap<String, i64> {
    let log = r.log();
    let mut out = BTreeMap::new();
    for (key, body) in &log.effects {
        assert_eq!(Some(key.as_str()), body["id"].as_str());
        let old = out.insert(key.clone(), body["n"].as_i64().unwrap());
        assert!(old.is_none(), "two effects for {key}");
    }
    out
}

#[test]
fn every_message_has_one_effect_through_faults_and_copies_are_never_sent_twice() {
    let w = Workdir::new();
    let r = Receiver::start(Faults::some(), Some("s3cret-token"));
    let cfg = config(
        &w,
        &r.url,
        "bearer_token_env = \"IDEM_TEST_HTTP_TOKEN\"\nheaders = { \"X-Test\" = \"${IDEM_TEST_HEADER}\" }\nconcurrency = 4",
        &format!("path = \"{}\"", w.path("ids.redb").display()),
    );
    let (a, mut expected, refused_a) = events("a", 600);
    w.write("in-0.jsonl", &a);
    let (b, expected_b, refused_b) = events("b", 400);
    w.write("in-1.jsonl", &b);
    expected.extend(expected_b);
    let run = || {
        let out = run_ok(
            idem()
                .env("IDEM_TEST_HTTP_TOKEN", "s3cret-token")
                .env("IDEM_TEST_HEADER", "from-env")
                .arg("run")
                .arg(&cfg),
        );
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains("s3cret-token"), "the token leaked: {all}");
        all
    };
    let summary = run();
    assert_eq!(
        effects(&r),
        expected,
        "one effect per id, the first copy's value"
    );
    {
        let log = r.log();
        assert!(
            log.faults.values().sum::<u64>() > 10,
            "faults: {:?}",
            log.faults
        );
        assert_eq!(log.x_test.iter().collect::<Vec<_>>(), ["from-env"]);
        // Copies of an id are not sent: apart from retries of faulted
        // requests, each id is asked for once.
        let mut asked: BTreeMap<&str, u64> = BTreeMap::new();
        for (k, _) in &log.requests {
            *asked.entry(k).or_default() += 1;
        }
        let faulted: u64 = log.faults.values().sum();
        let resent: u64 = asked.values().map(|n| n - 1).sum();
        assert!(
            resent <= faulted,
            "{resent} requests repeated an id, only {faulted} were faulted: copies were sent"
        );
    }
    // Refusals are dead letters with the reason, the body and the position.
    let dl = std::fs::read_to_string(w.path("dead.jsonl")).unwrap();
    let letters: Vec<serde_json::Value> = dl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), refused_a + refused_b, "{dl}");
    for l in &letters {
        let reason = l["reason"].as_str().unwrap();
        assert!(reason.contains("HTTP 422"), "{reason}");
        assert!(reason.contains("this event is refused"), "{reason}");
        let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap()).unwrap();
        assert_eq!(raw["reject"], true);
        assert!(l["offset"].as_u64().is_some());
    }
    assert!(summary.contains("dead-lettered"), "{summary}");

    // A second run with copies of every earlier id and some new ones:
    // only the new ones are sent.
    let before = r.log().requests.len();
    let (again, _, _) = events("a", 600);
    w.append("in-0.jsonl", &again);
    w.append("in-1.jsonl", "{\"id\":\"c-1\",\"n\":1,\"reject\":false}\n");
    run();
    let log = r.log();
    let new: Vec<&str> = log.requests[before..]
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(
        new.iter().all(|k| *k == "c-1"),
        "ids confirmed in an earlier run were sent again: {:?}",
        &new[..new.len().min(10)]
    );
    assert!(new.contains(&"c-1"));
}

#[test]
fn check_says_what_the_guarantee_rests_on() {
    let w = Workdir::new();
    let r = Receiver::start(Faults::none(), None);
    w.write("in-1.jsonl", "");
    let cfg = config(
        &w,
        &r.url,
        "",
        &format!("path = \"{}\"", w.path("ids.redb").display()),
    );
    let out = run_ok(idem().arg("check").arg(&cfg));
    let s = text(&out.stdout);
    assert!(s.contains("exactly-once"), "{s}");
    assert!(s.contains("Idempotency-Key"), "{s}");
    assert!(s.contains("honour"), "{s}");
    assert!(s.contains("dedup: ids from /id"), "{s}");
    // Array mode is at-least-once, and exactly-once is refused.
    let cfg = config(&w, &r.url, "mode = \"array\"", "");
    let out = idem().arg("check").arg(&cfg).output().unwrap();
    // A config mistake, refused before anything starts.
    assert_eq!(out.status.code(), Some(2));
    let s = text(&out.stderr);
    assert!(s.contains("_idem_id"), "{s}");
    // The sink's own retry keys moved to [retry]: refused with where to.
    for key in [
        "max_attempts = 6",
        "initial_backoff = \"1s\"",
        "max_backoff = \"9s\"",
    ] {
        let cfg = config(&w, &r.url, key, "");
        let out = idem().arg("check").arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let s = text(&out.stderr);
        let name = key.split(' ').next().unwrap();
        assert!(s.contains(&format!("connectors.orders.sink.{name}")), "{s}");
        assert!(s.contains("[connectors.NAME.retry]"), "{s}");
    }
}

/// One retry policy: a batch whose requests partly failed is tried again
/// with only the requests not yet answered, so a message delivered once is
/// never sent again within a run, and every failure costs one request.
#[test]
fn a_retried_batch_sends_only_what_was_not_answered() {
    let w = Workdir::new();
    let r = Receiver::start(
        Faults {
            error_500_every: 5,
            ..Faults::none()
        },
        None,
    );
    let cfg = config(
        &w,
        &r.url,
        "",
        &format!("path = \"{}\"", w.path("ids.redb").display()),
    );
    let (a, expected, refused) = events("a", 300);
    w.write("in-0.jsonl", &a);
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(effects(&r), expected);
    let log = r.log();
    let failed: u64 = log.faults.values().sum();
    assert!(failed > 10, "the receiver failed only {failed} requests");
    // Each key: one request answered for good (delivered or refused), plus
    // one per failure. Re-sending what was delivered would add more.
    let keys: std::collections::HashSet<&str> =
        log.requests.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), expected.len() + refused);
    assert_eq!(log.requests.len() as u64, keys.len() as u64 + failed);
}

#[test]
fn a_missing_receiver_is_named_and_nothing_is_lost() {
    let w = Workdir::new();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/events");
    let cfg = config(
        &w,
        &url,
        "",
        &format!("path = \"{}\"", w.path("ids.redb").display()),
    );
    let written = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        written.replace("max_attempts = 20", "max_attempts = 2"),
    )
    .unwrap();
    let (a, expected, _) = events("a", 50);
    w.write("in-0.jsonl", &a);
    let out = idem().arg("run").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("is the receiver running?"), "{err}");
    // Started later on that port, the receiver gets everything.
    let listener_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    assert!(listener_free);
    let r = Receiver::start(Faults::none(), None);
    let cfg = config(
        &w,
        &r.url,
        "",
        &format!("path = \"{}\"", w.path("ids.redb").display()),
    );
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(effects(&r), expected);
}

/// A private Redis without persistence holds the ids and is restarted
/// under a running connector: with on_loss = "fail" the connector stops
/// before sending anything more and says what the loss means; with "warn"
/// it says so and goes on, and the receiver's keys keep the effects single.
#[test]
fn a_redis_restarted_mid_run_stops_the_connector_or_not_as_configured() {
    for on_loss in ["fail", "warn"] {
        redis_restarted_mid_run(on_loss);
    }
}

fn redis_restarted_mid_run(on_loss: &str) {
    let w = Workdir::new();
    let port = free_port();
    let redis = || private_redis(port, w.dir.path());
    let r = Receiver::start(Faults::none(), None);
    let dedup =
        format!("store = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\non_loss = \"{on_loss}\"");
    let cfg = config(&w, &r.url, "", &dedup);
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace(
        "type = \"file\"",
        "type = \"file\"\nfollow = true\npoll_interval = \"50ms\"",
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let (a, expected, _) = events("a", 100);
    w.write("in-0.jsonl", &a);
    let server = redis();
    let stderr = w.path("stderr.log");
    let mut runner = Reaped(
        idem()
            .arg("run")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        for _ in 0..400 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: {}", std::fs::read_to_string(&stderr).unwrap());
    };
    wait_for("first events", &|| effects(&r).len() == expected.len());
    assert_eq!(effects(&r), expected);

    drop(server);
    let _server = redis();
    let before = r.log().requests.len();
    // A copy of an earlier id and a new one, after the loss.
    w.append(
        "in-0.jsonl",
        "{\"id\":\"a-1\",\"n\":5,\"reject\":false}\n{\"id\":\"z\",\"n\":7,\"reject\":false}\n",
    );
    if on_loss == "fail" {
        let mut status = None;
        for _ in 0..400 {
            status = runner.0.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = status.unwrap_or_else(|| {
            panic!(
                "the runner did not stop:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        assert!(!status.success());
        let err = std::fs::read_to_string(&stderr).unwrap();
        assert!(err.contains("lost its ids"), "{err}");
        assert!(err.contains("on_loss = \"warn\""), "{err}");
        assert_eq!(
            r.log().requests.len(),
            before,
            "sent after the ids were lost"
        );
    } else {
        wait_for("the new event", &|| effects(&r).contains_key("z"));
        let err = std::fs::read_to_string(&stderr).unwrap();
        assert!(err.contains("lost its ids"), "{err}");
        assert!(err.contains("will not be recognised"), "{err}");
        // The copy of a-1 was sent again (its id was forgotten); the
        // receiver's key kept its effect single.
        let log = r.log();
        assert!(log.requests[before..].iter().any(|(k, _)| k == "a-1"));
        drop(log);
        let mut want = expected.clone();
        want.insert("z".into(), 7);
        assert_eq!(effects(&r), want);
        signal(runner.0.id(), "TERM");
        assert!(runner.0.wait().unwrap().success());
    }
}

/// Redis loses its data while a batch is in flight: its ids were reserved
/// before, its position is saved after. The loss is reported as a loss (not
/// as a newer owner fencing the partition): "fail" stops the connector;
/// "warn" reads the partition again from the start and the receiver's keys
/// keep one effect per id.
#[test]
fn a_redis_lost_between_a_batchs_reservation_and_its_position() {
    for on_loss in ["fail", "warn"] {
        let w = Workdir::new();
        let port = free_port();
        let r = Receiver::start(Faults::none(), None);
        let dedup = format!(
            "store = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\non_loss = \"{on_loss}\""
        );
        let cfg = config(&w, &r.url, "", &dedup);
        let (a, expected, _) = events("a", 100);
        w.write("in-0.jsonl", &a);
        let server = private_redis(port, w.dir.path());
        let stderr = w.path("stderr.log");
        // Stopped (SIGSTOP) right after the first request is answered.
        let mut runner = Reaped(
            idem()
                .env("IDEM_FAILPOINTS", "mid_write=1:stop")
                .arg("run")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap(),
        );
        let pid = runner.0.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !is_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "never reached mid_write"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(server);
        let _server = private_redis(port, w.dir.path());
        signal(pid, "CONT");
        let status = runner.0.wait().unwrap();
        let err = std::fs::read_to_string(&stderr).unwrap();
        assert!(!err.contains("fenced"), "a loss is not a fence: {err}");
        assert!(err.contains("lost its ids"), "{err}");
        if on_loss == "fail" {
            assert!(!status.success(), "{err}");
            assert!(err.contains("on_loss = \"warn\""), "{err}");
        } else {
            assert!(status.success(), "{err}");
            assert!(err.contains("read again from the source's start"), "{err}");
            assert_eq!(effects(&r), expected);
        }
    }
}

/// The dedup stage in front of a table sink (DuckDB, append mode): copies
/// of an id in one batch, across batches, across partitions and across
/// runs leave one row; a message without an id is a dead letter that says
/// so.
#[test]
fn the_dedup_stage_works_in_front_of_a_table_sink() {
    let w = Workdir::new();
    let cfg = w.write(
        "duck.toml",
        &format!(
            r#"
[connectors.t]
dead_letter = "{dl}"
[connectors.t.source]
type = "file"
path = "{glob}"
[connectors.t.sink]
type = "duckdb"
path = "{db}"
table = "t"
[connectors.t.dedup]
id = "/uid"
path = "{ids}"
[connectors.t.batch]
max_records = 3
linger = "10ms"
[[connectors.t.columns]]
name = "uid"
type = "text"
[[connectors.t.columns]]
name = "v"
type = "bigint"
"#,
            dl = w.path("dead.jsonl").display(),
            glob = w.path("in-*.jsonl").display(),
            db = w.path("t.duckdb").display(),
            ids = w.path("ids.redb").display(),
        ),
    );
    let line = |uid: &str, v: i64| format!("{{\"uid\":\"{uid}\",\"v\":{v}}}\n");
    // In-0: u1 twice in one batch, u2 again two batches later, one line
    // without uid. In-1: u1 and u3, u3 twice.
    let in0 = [
        line("u1", 1),
        line("u1", 2),
        line("u2", 3),
        line("u4", 4),
        "{\"v\":5}\n".to_string(),
        line("u5", 6),
        line("u2", 7),
    ]
    .concat();
    w.write("in-0.jsonl", &in0);
    w.write(
        "in-1.jsonl",
        &[line("u1", 8), line("u3", 9), line("u3", 10)].concat(),
    );
    let out = run_ok(idem().arg("run").arg(&cfg));
    let summary = text(&out.stdout);
    let ids = || {
        let db = duck(&w.path("t.duckdb"));
        let mut stmt = db.prepare("SELECT uid FROM t ORDER BY uid").unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(), ["u1", "u2", "u3", "u4", "u5"], "{summary}");
    assert!(summary.contains("4 deduplicated"), "{summary}");
    let dl = std::fs::read_to_string(w.path("dead.jsonl")).unwrap();
    assert_eq!(dl.lines().count(), 1, "{dl}");
    assert!(
        dl.contains("message id: field `/uid` is missing or null"),
        "{dl}"
    );
    // Copies in a later run are recognised too.
    w.append("in-1.jsonl", &[line("u4", 11), line("u6", 12)].concat());
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(ids(), ["u1", "u2", "u3", "u4", "u5", "u6"]);
}
