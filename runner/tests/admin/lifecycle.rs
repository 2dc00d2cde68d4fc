//! Stopping and starting again: SIGTERM mid-load exits 0 and a restart is
//! exact; a restart reopens the embedded dedup store the last run held.

use super::support::*;
use idem_testkit::*;

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
