//! Column types through Debezium's encodings: decimals as bytes (fixed and
//! variable scale), dates as days, timestamps as microseconds, JSON as
//! strings, with the JSON converter's schemas. The replicas in PostgreSQL
//! and DuckDB, with their columns listed or learnt from the schema
//! (`evolve = "add_columns"`), must equal the source by `idem verify
//! --against`.

use crate::support::*;
use idem_testkit::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_types_replicate_with_the_converters_schemas() {
    let src = fresh_schema("cdc_src");
    let dst = fresh_schema("cdc_dst");
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{src}\";
         CREATE TABLE \"{src}\".typed (
           id bigint PRIMARY KEY, price numeric(12,2), amount numeric, ratio double precision,
           born date, seen timestamp, at timestamptz, doc jsonb, u uuid, raw bytea,
           ok boolean, note text);
         INSERT INTO \"{src}\".typed VALUES
           (1, 12.34, 123.456789, 0.25, '2026-01-01', '2026-03-01 08:00:00.123456',
            '2026-03-01 08:00:00.123456+02', '{{\"b\": 1, \"a\": [1, 2]}}',
            '67e55044-10b1-426f-9247-bb680e5fe0c8', '\\x0001ff', true, 'hé'),
           (2, -0.05, -1, -1e300, '1969-12-31', '1900-01-01 00:00:00', '1999-12-31 23:59:59.999999+00',
            '[]', NULL, '\\x', false, ''),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
           (4, 9999999999.99, 0.0000000001, 1e-300, '9999-12-31', '2262-04-11 23:47:16.854775',
            now(), '{{\"nested\": {{\"z\": null, \"y\": \"x\"}}}}', gen_random_uuid(), '\\xdeadbeef', NULL, 'a \"quoted\" note');"
    ))
    .await
    .unwrap();
    let capture = Capture::start(&src, &["typed"], true).await;

    let w = Workdir::new();
    let duck = w.path("typed.duckdb");
    let mut toml = String::new();
    // DuckDB has no unbounded DECIMAL: its decimals are kept as text.
    for (name, sink, decimal) in [
        ("typed_pg", postgres_sink(&dst, "typed"), "numeric"),
        (
            "typed_duck",
            format!(
                "type = \"duckdb\"\npath = \"{}\"\ntable = \"typed\"\n",
                duck.display()
            ),
            "text",
        ),
    ] {
        let columns = [
            ("id", "bigint"),
            ("price", decimal),
            ("amount", decimal),
            ("ratio", "double"),
            ("born", "date"),
            ("seen", "timestamp"),
            ("at", "timestamp"),
            ("doc", "json"),
            ("u", "uuid"),
            ("raw", "bytea"),
            ("ok", "boolean"),
            ("note", "text"),
        ];
        toml += &connector(
            name,
            &capture.topics[0],
            &format!("{src}_{name}"),
            &sink,
            Shape::Replica {
                versioned: false,
                learns: false,
            },
            &w.path(&format!("{name}.deadletter.jsonl")),
            &columns,
        );
        // The same with the key listed only: the rest learnt, typed by
        // the schema.
        let learnt = format!("{name}_learnt");
        toml += &connector(
            &learnt,
            &capture.topics[0],
            &format!("{src}_{learnt}"),
            &sink
                .replace("typed.duckdb", "learnt.duckdb")
                .replace("table = \"typed\"", "table = \"typed_learnt\""),
            Shape::Replica {
                versioned: false,
                learns: true,
            },
            &w.path(&format!("{learnt}.deadletter.jsonl")),
            &columns[..1],
        );
    }
    let cfg = w.write("typed.toml", &toml);
    let mut runner = spawn_logged(&cfg, &w.path("idem.log"));
    db.batch_execute(&format!(
        "UPDATE \"{src}\".typed SET price = price * 2, born = born + 1, doc = '{{\"changed\": true}}' WHERE id IN (1, 2);
         DELETE FROM \"{src}\".typed WHERE id = 3;
         INSERT INTO \"{src}\".typed (id, price, seen) VALUES (5, 0, '2000-02-29 12:00:00');"
    ))
    .await
    .unwrap();

    let verify = |connector: &str| {
        idem()
            .args(["verify", "--connector", connector, "--against", &pg_url()])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let started = Instant::now();
    let mut out = verify("typed_pg");
    while !out.status.success() && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        out = verify("typed_pg");
    }
    signal(runner.0.id(), "TERM");
    let status = runner.0.wait().unwrap();
    let log = std::fs::read_to_string(w.path("idem.log")).unwrap_or_default();
    assert!(status.success(), "idem run: {status:?}\n{log}");
    assert!(
        out.status.success(),
        "the PostgreSQL replica: {}{}\n{log}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The DuckDB replica, finished by a run that stops at the end.
    run_ok(idem().arg("run").arg(w.write(
        "last.toml",
        &toml.replace("group_id = ", "stop_at_end = true\ngroup_id = "),
    )));
    for name in ["typed_duck", "typed_pg_learnt", "typed_duck_learnt"] {
        let out = verify(name);
        assert!(
            out.status.success(),
            "the replica of {name}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // The learnt columns have the schema's types.
    let learnt: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = 'typed_learnt' ORDER BY column_name",
            &[&dst],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for want in [
        ("amount", "numeric"),
        ("at", "timestamp with time zone"),
        ("born", "date"),
        ("doc", "jsonb"),
        ("ok", "boolean"),
        ("price", "numeric"),
        ("ratio", "double precision"),
        ("raw", "bytea"),
        ("u", "uuid"),
    ] {
        assert!(
            learnt.iter().any(|(n, t)| (n.as_str(), t.as_str()) == want),
            "{want:?} not among {learnt:?}"
        );
    }
    for name in [
        "typed_pg",
        "typed_duck",
        "typed_pg_learnt",
        "typed_duck_learnt",
    ] {
        let dead = std::fs::read_to_string(w.path(&format!("{name}.deadletter.jsonl")))
            .unwrap_or_default();
        assert!(dead.is_empty(), "{name} dead letters:\n{dead}");
    }
    capture.stop().await;
}
