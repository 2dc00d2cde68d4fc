//! Many tables through one connector: a topic pattern over a schema's
//! Debezium topics and `table = "{source.table}"` write each source table
//! to its own target table, created on first sight, a table created while
//! Idem runs included, through a kill and restart; into PostgreSQL, and
//! into one DuckDB file. No key is listed: each table is keyed on its
//! source table's primary key, taken from the message key (the table
//! created mid-run has a two-column key, named otherwise and ordered
//! unlike its columns).

use crate::support::*;
use idem_testkit::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connector_replicates_every_table_of_a_schema() {
    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{src}\"; CREATE SCHEMA \"{dst}\"; {} {}",
        seeded(&src, "customers", 100),
        seeded(&src, "orders", 100)
    ))
    .await
    .unwrap();
    let capture = Capture::start_all(&src, &["customers", "orders"]).await;

    let w = Workdir::new();
    let duck_file = w.path("all.duckdb");
    let mut toml = String::new();
    for (name, sink) in [
        ("all", postgres_sink(&dst, "{source.table}")),
        (
            "duck_all",
            format!(
                "type = \"duckdb\"\npath = \"{}\"\ntable = \"{{source.table}}\"\n",
                duck_file.display()
            ),
        ),
    ] {
        // Only the version column is listed; the key and the rest are learnt.
        toml += &connector(
            name,
            &format!("^{src}[.]{src}[.].*"),
            &format!("{src}_{name}"),
            &sink,
            Shape::Replica {
                versioned: true,
                learns: true,
            },
            &w.path(&format!("{name}.deadletter.jsonl")),
            &[],
        )
        .replace("key = [\"id\"]\n", "");
        toml += &format!("[connectors.{name}.source.properties]\n\"topic.metadata.refresh.interval.ms\" = \"1000\"\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n");
    }
    let cfg = w.write("all.toml", &toml);
    let mut runner = spawn_logged(&cfg, &w.path("idem.log"));

    let mut rng = Rng(0x5eed_1234_abcd);
    for i in 0..200 {
        let t = ["customers", "orders"][i % 2];
        db.batch_execute(&change(&src, t, &mut rng, i, false))
            .await
            .unwrap();
    }
    // A table created while Idem runs (joining Debezium's publication, as
    // an operator adds it), then a kill and a restart.
    db.batch_execute(&format!(
        "CREATE TABLE \"{src}\".payments (seq bigint, zone text, amount numeric(10,2), note text, PRIMARY KEY (zone, seq));
         ALTER PUBLICATION \"{src}\" ADD TABLE \"{src}\".payments;
         INSERT INTO \"{src}\".payments SELECT i, 'r' || (i % 3), i * 1.5, 'p' || i FROM generate_series(1, 60) i;"
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(runner.0.id(), "KILL");
    let _ = runner.0.wait();
    runner = spawn_logged(&cfg, &w.path("idem2.log"));
    for i in 200..400 {
        let t = ["customers", "orders"][i % 2];
        db.batch_execute(&change(&src, t, &mut rng, i, false))
            .await
            .unwrap();
        if i % 70 == 0 {
            // More kills mid-stream: each restart opens the partitions
            // before any table's key is known again.
            tokio::time::sleep(Duration::from_millis(rng.next() % 1500)).await;
            signal(runner.0.id(), "KILL");
            let _ = runner.0.wait();
            runner = spawn_logged(&cfg, &w.path("idem2.log"));
        }
    }
    db.batch_execute(&format!(
        "UPDATE \"{src}\".payments SET note = 'paid' WHERE seq % 4 = 0;
         DELETE FROM \"{src}\".payments WHERE seq % 7 = 0;
         UPDATE \"{src}\".payments SET zone = 'moved' WHERE seq % 5 = 0;"
    ))
    .await
    .unwrap();

    let compared = [
        ("customers", COLUMNS),
        ("orders", COLUMNS),
        ("payments", "seq, zone, amount, note"),
    ];
    let started = Instant::now();
    loop {
        let mut diffs = Vec::new();
        for (t, cols) in compared {
            diffs.push(differences(&src, &dst, t, cols).await);
        }
        if diffs.iter().all(|d| *d == 0) {
            break;
        }
        let log = std::fs::read_to_string(w.path("idem2.log")).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "rows differ (customers, orders, payments; -1: no table): {diffs:?}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(runner.0.id(), "TERM");
    let status = runner.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("idem2.log")).unwrap_or_default();
    assert!(status.success(), "{status:?}\n{log}");
    // Each table learnt its own columns, and only those.
    for (t, want) in [
        ("customers", "_idem_offset,_idem_partition,id,lsn,n,name"),
        (
            "payments",
            "_idem_offset,_idem_partition,amount,lsn,note,seq,zone",
        ),
    ] {
        let got: String = db
            .query_one(
                "SELECT string_agg(column_name::text, ',' ORDER BY column_name) FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&dst, &t],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{t}'s columns");
    }
    // Each table is keyed as its source table is, in the key's order.
    for (t, want) in [
        ("customers", "id"),
        ("orders", "id"),
        ("payments", "zone,seq"),
    ] {
        let got: String = db
            .query_one(
                "SELECT string_agg(a.attname::text, ',' ORDER BY k.i)
                   FROM pg_index x
                   CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, i)
                   JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                  WHERE x.indisprimary AND x.indrelid = format('%I.%I', $1::text, $2::text)::regclass",
                &[&dst, &t],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{t}'s primary key");
    }
    // Each table kept its own position, in the one offsets table.
    let positions: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM \"{dst}\".idem_offsets WHERE connector = 'all'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(positions, 3, "one position per topic partition");
    // The DuckDB replicas, finished by a run that stops at the end.
    run_ok(idem().arg("run").arg(w.write(
        "last.toml",
        &toml.replace("group_id = ", "stop_at_end = true\ngroup_id = "),
    )));
    let duck = duck(&duck_file);
    for (t, cols) in compared {
        let as_text = cols
            .split(", ")
            .map(|c| format!("CAST({c} AS VARCHAR)"))
            .collect::<Vec<_>>()
            .join(", ");
        let want: Vec<Vec<Option<String>>> = db
            .query(&format!("SELECT {as_text} FROM \"{src}\".{t}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
            .collect();
        let n = want.first().map_or(0, Vec::len);
        let mut stmt = duck.prepare(&format!("SELECT {as_text} FROM {t}")).unwrap();
        let got: Vec<Vec<Option<String>>> = stmt
            .query_map([], |r| (0..n).map(|i| r.get(i)).collect())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        // Sorted here, as text: the two servers order differently.
        let (mut want, mut got) = (want, got);
        want.sort();
        got.sort();
        assert!(want.len() > 20, "{t}: {} rows", want.len());
        let first = want.iter().zip(&got).find(|(a, b)| a != b);
        assert!(
            got == want,
            "{t}: the DuckDB replica differs from the source: {} rows, {} in the source; first difference {first:?}",
            got.len(),
            want.len()
        );
    }
    // Keyed on the source's primary key: its columns NOT NULL, kept unique
    // by the merge (DuckDB tables get no PRIMARY KEY: docs/sinks/duckdb.md).
    let (key, distinct): (String, bool) = duck
        .query_row(
            "SELECT (SELECT string_agg(column_name, ',' ORDER BY column_name) FROM duckdb_columns()
                     WHERE table_name = 'payments' AND NOT is_nullable AND column_name NOT LIKE '\\_idem\\_%' ESCAPE '\\'),
                    (SELECT count(*) = count(DISTINCT (zone, seq)) FROM payments)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(key, "seq,zone", "payments' key columns in DuckDB");
    assert!(distinct, "one row per (zone, seq) in DuckDB");
    drop(duck);
    // `idem verify --against` compares every table, each by its source's
    // primary key; a row changed behind Idem's back is found.
    let verify = |name: &str| {
        idem()
            .args(["verify", "--connector", name, "--against", &pg_url()])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    for name in ["all", "duck_all"] {
        let out = verify(name);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "verify {name}: {said}");
        for t in ["customers", "orders", "payments"] {
            assert!(
                said.contains(&format!("✓ {name}: ")) && said.contains(&format!("{src}.{t} on")),
                "verify {name} compared {t}: {said}"
            );
        }
    }
    db.batch_execute(&format!(
        "UPDATE \"{dst}\".payments SET note = 'tampered' WHERE seq = 1"
    ))
    .await
    .unwrap();
    let out = verify("all");
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("zone=r1, seq=1: column `note`"),
        "the changed row, by its two-column key: {said}"
    );
    for name in ["all", "duck_all"] {
        let dead = std::fs::read_to_string(w.path(&format!("{name}.deadletter.jsonl")))
            .unwrap_or_default();
        assert!(dead.is_empty(), "{name} dead letters:\n{dead}");
    }
    capture.stop().await;
}
