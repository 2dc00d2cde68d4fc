//! `format = "avro"`: values written by fastavro (`scripts/avro-tools.sh`),
//! an Avro library Idem does not use, land in PostgreSQL with their logical
//! types exact; a value that is not Avro of the schema is a dead letter
//! with its position, and the partition moves past it.

use crate::support::*;
use base64::Engine as _;
use idem_testkit::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

const SCHEMA: &str = r#"{
  "type": "record", "name": "Order", "namespace": "shop",
  "fields": [
    {"name": "id", "type": "long"},
    {"name": "name", "type": "string"},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "buyer", "type": {"type": "record", "name": "Buyer", "fields": [{"name": "city", "type": "string"}]}}
  ]
}"#;

/// Each JSON line encoded by fastavro, as the bytes of one Avro value.
fn fastavro(schema: &std::path::Path, rows: &[String]) -> Vec<Vec<u8>> {
    use std::io::Write;
    let venv = std::env::var("IDEM_AVRO_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/idem/avro/venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let python = format!("{venv}/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/avro-encode.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .arg(schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{python}: {e}; install fastavro with bash scripts/avro-tools.sh")
        });
    let mut stdin = child.stdin.take().unwrap();
    for row in rows {
        writeln!(stdin, "{row}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "avro-encode.py failed");
    text(&out.stdout)
        .lines()
        .map(|l| base64::engine::general_purpose::STANDARD.decode(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_values_written_by_fastavro_land_exactly() {
    let topic = fresh_topic("idem_avro", 2).await;
    let schema = fresh_schema("kafka_avro");
    let w = Workdir::new();
    let avsc = w.write("order.avsc", SCHEMA);
    // Negative and whole prices, dates before 1970, optional notes, text
    // beyond ASCII.
    let rows: Vec<String> = (0..300i64)
        .map(|i| {
            let cents = (i * 7_919) % 200_000 - 100_000;
            let note = (i % 3 != 0).then(|| format!("n{i} ✓"));
            let sign = if cents < 0 { "-" } else { "" };
            let day = chrono::NaiveDate::from_ymd_opt(1969, 12, 1).unwrap()
                + chrono::Duration::days(i * 37);
            serde_json::json!({
                "id": i,
                "name": format!("name {i} é"),
                "price": format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100),
                "day": day.to_string(),
                "at": format!(
                    "2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                    1 + i % 12, 1 + i % 28, i % 24, i % 60, (i * 7) % 60, (i * 13) % 1000
                ),
                "note": note,
                "buyer": {"city": format!("city {}", i % 5)},
            })
            .to_string()
        })
        .collect();
    let values = fastavro(&avsc, &rows);
    assert_eq!(values.len(), rows.len());
    let producer: FutureProducer = client_config().create().unwrap();
    // Every value keyed by its id; one value that is not Avro of the
    // schema, at a known position.
    for (i, value) in values.iter().enumerate() {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition((i % 2) as i32)
                    .key(&i.to_string())
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let delivered = producer
        .send(
            FutureRecord::<str, [u8]>::to(&topic)
                .partition(1)
                .payload(&[0x02, 0x00][..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let (partition, offset) = (delivered.partition, delivered.offset);

    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .connector("format = \"avro\"")
            .connector(&format!("schema_file = \"{}\"", avsc.display()))
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .columns(&column_lines(&[
                ("id", "bigint"),
                ("name", "text"),
                ("price", "numeric"),
                ("day", "date"),
                ("at", "timestamp"),
                ("note", "text"),
            ]))
            .more_columns("[[connectors.k.columns]]\nname = \"city\"\ntype = \"text\"\npointer = \"/buyer/city\"\n")
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));

    // Each row as the source wrote it, compared as text.
    let got: Vec<String> = pg()
        .await
        .query(
            &format!(
                "SELECT json_build_object('id', id, 'name', name, 'price', price::text, 'day', day::text,
                        'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        'note', note, 'buyer', json_build_object('city', city))::text
                   FROM \"{schema}\".events ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got.len(), rows.len(), "rows in the table");
    for (want, got) in rows.iter().zip(&got) {
        let want: serde_json::Value = serde_json::from_str(want).unwrap();
        let got: serde_json::Value = serde_json::from_str(got).unwrap();
        assert_eq!(got, want);
    }
    let letters = std::fs::read_to_string(&dead).unwrap();
    let letter: serde_json::Value = serde_json::from_str(letters.trim()).unwrap();
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert_eq!(letter["partition"], format!("{topic}/{partition}"));
    assert_eq!(letter["offset"].as_i64(), Some(offset));
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("not an Avro value of the schema"),
        "{letter}"
    );
    assert_eq!(positions(&schema).await, end_offsets(&topic, 2));
}
