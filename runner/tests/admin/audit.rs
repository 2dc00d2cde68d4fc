//! `idem verify` on a clean table and on planted faults; dead letters in a
//! table, once per position, and the cap on a flood.

use super::support::*;
use idem_testkit::*;

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
    // Ids repeat: the sink keeps each id's first message (`store = "sink"`).
    let copies: String = (0..300)
        .map(|i| format!("{{\"id\":\"c-{}\",\"n\":{i}}}\n", i % 200))
        .collect();
    w.write("copies.jsonl", &copies);
    let bounded = |name: &str| {
        connector(&w, name, &schema, &pg_url, "").replace("follow = true", "follow = false")
    };
    let cfg = w.write(
        "c.toml",
        &(bounded("plain")
            + &bounded("keyed").replace(
                "table = \"keyed\"",
                "table = \"keyed\"\nmode = \"upsert\"\nkey = [\"id\"]",
            )
            + &bounded("copies").replace(
                "linger = \"20ms\"",
                "linger = \"20ms\"\n[connectors.copies.dedup]\nid = \"/id\"\nstore = \"sink\"",
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
    assert!(
        stdout.contains("✓ copies: 300 messages (0 dead-lettered), 200 rows"),
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
        // A row from c-7's second message, which the sink dropped.
        format!(
            "INSERT INTO \"{schema}\".\"copies\" SELECT id, n, _idem_partition, {} FROM \"{schema}\".\"copies\" WHERE id = 'c-7'",
            copies.lines().take(207).map(|l| l.len() + 1).sum::<usize>()
        ),
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
        format!(
            "duplicated: the id of {}@{}: 2 rows",
            w.path("copies.jsonl").display(),
            copies.lines().take(7).map(|l| l.len() + 1).sum::<usize>()
        ),
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
