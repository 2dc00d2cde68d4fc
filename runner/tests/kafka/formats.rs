//! `format = "avro"`: values written by fastavro (`scripts/format-tools.sh`),
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

/// Lines through one of the format scripts (`scripts/avro-*.py`,
/// `scripts/proto-encode.py`, in the Python that `scripts/format-tools.sh`
/// installs) given `args`: a line out for each line in.
fn script_lines(script: &str, args: &[&std::ffi::OsStr], lines: Vec<String>) -> Vec<String> {
    use std::io::Write;
    let venv = std::env::var("IDEM_FORMATS_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/idem/formats/venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let python = format!("{venv}/bin/python");
    let mut child = std::process::Command::new(&python)
        .arg(format!(
            "{}/../scripts/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e}; install it with bash scripts/format-tools.sh"));
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed");
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// Each JSON line encoded by fastavro, as the bytes of one Avro value.
fn fastavro(schema: &std::path::Path, rows: &[String]) -> Vec<Vec<u8>> {
    script_lines("avro-encode.py", &[schema.as_os_str()], rows.to_vec())
        .iter()
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
    // Every value keyed by its id; one value that is not Avro of the
    // schema, at a known position.
    produce_values(&topic, &values).await;
    let producer: FutureProducer = client_config().create().unwrap();
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

    // Each row as the source wrote it.
    let got = json_rows(
        &pg().await,
        &format!(
            "SELECT json_build_object('id', id, 'name', name, 'price', price::text, 'day', day::text,
                    'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    'note', note, 'buyer', json_build_object('city', city))::text
               FROM \"{schema}\".events ORDER BY id"
        ),
    )
    .await;
    let want: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    same_rows(&got, &want, None);
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

/// A schema with a field of each kind Idem maps to a column type.
const WIDE: &str = r#"{
  "type": "record", "name": "Payment", "namespace": "shop",
  "fields": [
    {"name": "id", "type": "long"},
    {"name": "qty", "type": "int"},
    {"name": "paid", "type": "boolean"},
    {"name": "score", "type": "double"},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "buyer", "type": {"type": "record", "name": "Buyer", "fields": [{"name": "city", "type": "string"}]}}
  ]
}"#;

/// The columns of `schema.events` but Idem's own: (name, type), in order.
async fn pg_columns(client: &tokio_postgres::Client, schema: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
              WHERE table_schema = $1 AND table_name = 'events' AND column_name NOT LIKE '\\_idem\\_%'
              ORDER BY ordinal_position",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The rows of a query whose one column is each row as JSON text.
async fn json_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<serde_json::Value> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
}

/// Produce `values` to `topic`'s two partitions, value `i` to partition
/// `i % 2` (so the two writes of a row of [`wide_rows`], 120 apart, are in
/// one partition, in order), keyed by its index.
async fn produce_values(topic: &str, values: &[Vec<u8>]) {
    let producer: FutureProducer = client_config().create().unwrap();
    for (i, value) in values.iter().enumerate() {
        producer
            .send(
                FutureRecord::to(topic)
                    .partition((i % 2) as i32)
                    .key(&i.to_string())
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Rows for [`WIDE`]: every id twice (an update), in JSON as fastavro
/// takes them and as they should read back.
fn wide_rows() -> Vec<serde_json::Value> {
    (0..240i64)
        .map(|n| {
            let i = n % 120;
            let cents = (n * 7_919) % 200_000 - 100_000;
            let sign = if cents < 0 { "-" } else { "" };
            serde_json::json!({
                "id": i,
                "qty": n - 60,
                "paid": n % 2 == 0,
                "score": n as f64 / 8.0,
                "amount": format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100),
                "day": (chrono::NaiveDate::from_ymd_opt(1969, 12, 1).unwrap()
                    + chrono::Duration::days(n * 37)).to_string(),
                "at": format!("2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                    1 + n % 12, 1 + n % 28, n % 24, n % 60, (n * 7) % 60, (n * 130_013) % 1_000_000),
                "ref": format!("{:08x}-0000-4000-8000-{:012x}", n, n * 31),
                "state": if n % 3 == 0 { "NEW" } else { "PAID" },
                "note": (n % 4 != 0).then(|| format!("n{n} ✓")),
                "tags": (0..n % 3).map(|t| format!("t{t}")).collect::<Vec<_>>(),
                "buyer": {"city": format!("city {}", n % 5)},
            })
        })
        .collect()
}

/// A topic of [`wide_rows`] written by fastavro with [`WIDE`]; the
/// workdir holding the schema file.
async fn wide_topic(prefix: &str) -> (String, Workdir, std::path::PathBuf, Vec<serde_json::Value>) {
    let topic = fresh_topic(prefix, 2).await;
    let w = Workdir::new();
    let avsc = w.write("payment.avsc", WIDE);
    let rows = wide_rows();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    produce_values(&topic, &fastavro(&avsc, &lines)).await;
    (topic, w, avsc, rows)
}

/// No `[[columns]]`: each field of the writer's schema becomes a column of
/// the type its Avro type maps to, in the schema's order, created by Idem
/// in PostgreSQL and DuckDB, and keyed on a field the config names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_columns_the_schemas_fields_are_the_columns() {
    let (topic, w, avsc, rows) = wide_topic("idem_avro_cols").await;
    // The last write of each id, which an upsert keeps.
    let mut want: std::collections::BTreeMap<i64, serde_json::Value> = Default::default();
    for r in &rows {
        want.insert(r["id"].as_i64().unwrap(), r.clone());
    }

    let schema = fresh_schema("kafka_avro_cols");
    let db = w.path("k.duckdb");
    let sinks = [
        format!(
            "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"events\"",
            pg_url()
        ),
        format!(
            "type = \"duckdb\"\npath = \"{}\"\ntable = \"events\"",
            db.display()
        ),
    ];
    for (n, sink) in sinks.iter().enumerate() {
        let cfg = w.write(
            &format!("k{n}.toml"),
            &Conf::new(&topic, &schema)
                .source("stop_at_end = true")
                .connector("format = \"avro\"")
                .connector(&format!("schema_file = \"{}\"", avsc.display()))
                .sink(sink)
                .sink_line("mode = \"upsert\"\nkey = [\"id\"]")
                .columns("")
                .toml(),
        );
        run_ok(idem().arg("run").arg(&cfg));
    }

    // PostgreSQL: the columns Idem created, and every row as written.
    let client = pg().await;
    let types = pg_columns(&client, &schema).await;
    let named = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        types,
        named(&[
            ("id", "bigint"),
            ("qty", "integer"),
            ("paid", "boolean"),
            ("score", "double precision"),
            ("amount", "numeric"),
            ("day", "date"),
            ("at", "timestamp with time zone"),
            ("ref", "uuid"),
            ("state", "text"),
            ("note", "text"),
            ("tags", "jsonb"),
            ("buyer", "jsonb"),
        ])
    );
    let got = json_rows(&client, &format!(
                "SELECT json_build_object('id', id, 'qty', qty, 'paid', paid, 'score', score,
                        'amount', amount::text, 'day', day::text,
                        'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        'ref', ref::text, 'state', state, 'note', note, 'tags', tags, 'buyer', buyer)::text
                   FROM \"{schema}\".events ORDER BY id"
    ))
    .await;
    same_rows(&got, want.values(), Some("score"));

    // DuckDB: the same fields, the decimal's digits kept as text.
    let duck = duck(&db);
    let mut stmt = duck
        .prepare(
            "SELECT column_name, data_type FROM information_schema.columns
              WHERE table_name = 'events' AND column_name NOT LIKE '\\_idem\\_%' ESCAPE '\\'
              ORDER BY ordinal_position",
        )
        .unwrap();
    let types: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        types,
        named(&[
            ("id", "BIGINT"),
            ("qty", "INTEGER"),
            ("paid", "BOOLEAN"),
            ("score", "DOUBLE"),
            ("amount", "VARCHAR"),
            ("day", "DATE"),
            ("at", "TIMESTAMP WITH TIME ZONE"),
            ("ref", "UUID"),
            ("state", "VARCHAR"),
            ("note", "VARCHAR"),
            ("tags", "JSON"),
            ("buyer", "JSON"),
        ])
    );
    let mut stmt = duck
        .prepare(
            "SELECT to_json({'id': id, 'qty': qty, 'paid': paid, 'score': score, 'amount': amount,
                    'day': day::VARCHAR, 'at': strftime(timezone('UTC', \"at\"), '%Y-%m-%dT%H:%M:%S.%fZ'),
                    'ref': ref::VARCHAR, 'state': state, 'note': note, 'tags': tags, 'buyer': buyer})::VARCHAR
               FROM events ORDER BY id",
        )
        .unwrap();
    let got: Vec<serde_json::Value> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|s| serde_json::from_str(&s.unwrap()).unwrap())
        .collect();
    same_rows(&got, want.values(), Some("score"));
}

/// Each row read back equals the one written, in order, the first that
/// differs named; the `number` field, if any, compared as a number (a
/// database prints 15.0 as 15; `985.90` and `985.9` are one double).
fn same_rows<'a>(
    got: &[serde_json::Value],
    want: impl IntoIterator<Item = &'a serde_json::Value>,
    number: Option<&str>,
) {
    let want: Vec<&serde_json::Value> = want.into_iter().collect();
    assert_eq!(got.len(), want.len(), "rows in the table");
    let as_number = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(field) = number {
            v[field] = serde_json::json!(v[field].as_f64());
        }
        v
    };
    for (got, want) in got.iter().zip(want) {
        assert_eq!(as_number(got), as_number(want));
    }
}

/// The events `idem generate` and `idem produce` write, as an Avro schema.
const EVENTS: &str = include_str!("../../../config/examples/schemas/events.avsc");

/// Every message of `topic`'s `partitions`, from the start to the end.
fn read_topic(topic: &str, partitions: i32) -> Vec<(i32, i64, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client_config()
        .set("group.id", format!("{topic}_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let want: i64 = end_offsets(topic, partitions).values().sum();
    let mut out = Vec::new();
    while (out.len() as i64) < want {
        let m = consumer
            .poll(Duration::from_secs(10))
            .expect("a message")
            .unwrap();
        use rdkafka::Message as _;
        out.push((
            m.partition(),
            m.offset(),
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    out
}

/// Each value decoded by fastavro (`scripts/avro-decode.py`), as JSON; a
/// value that is not of the schema is null.
fn fastavro_decode(schema: &std::path::Path, values: &[Vec<u8>]) -> Vec<serde_json::Value> {
    let lines = values
        .iter()
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v))
        .collect();
    script_lines("avro-decode.py", &[schema.as_os_str()], lines)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `idem produce --format avro` writes each generated event as the Avro
/// value fastavro reads back as that event, and each malformed one as a
/// value of no record; Idem loads the topic with its columns from the
/// schema, the malformed ones dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idem_produce_writes_avro_that_fastavro_and_idem_read() {
    let topic = fresh_topic("idem_avro_produce", 2).await;
    let w = Workdir::new();
    let avsc = w.write("event.avsc", EVENTS);
    let args = [
        "--count",
        "400",
        "--duplicates",
        "0",
        "--malformed",
        "3",
        "--seed",
        "9",
    ];
    run_ok(
        idem()
            .args([
                "produce",
                &topic,
                "--brokers",
                BROKERS,
                "--format",
                "avro",
                "--schema-file",
            ])
            .arg(&avsc)
            .args(args),
    );
    let generated = w.path("events.jsonl");
    run_ok(
        idem()
            .arg("generate")
            .args(args)
            .arg("--out")
            .arg(&generated),
    );
    let mut want: Vec<serde_json::Value> = std::fs::read_to_string(&generated)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // The malformed lines that are JSON lack an amount, or spell it.
        .filter(|e| e["amount"].is_number())
        .collect();
    assert_eq!(want.len(), 400);

    let messages = read_topic(&topic, 2);
    assert_eq!(messages.len(), 403);
    let values: Vec<Vec<u8>> = messages.iter().map(|m| m.2.clone()).collect();
    let mut got: Vec<serde_json::Value> = fastavro_decode(&avsc, &values);
    let malformed = got.iter().filter(|v| v.is_null()).count();
    assert_eq!(malformed, 3, "values of no record");
    got.retain(|v| !v.is_null());
    // fastavro prints a whole second without its fraction, as idem
    // generate does.
    let by_id = |v: &mut Vec<serde_json::Value>| {
        v.sort_by_key(|e| e["event_id"].as_str().unwrap().to_string())
    };
    by_id(&mut got);
    by_id(&mut want);
    same_rows(&got, &want, Some("amount"));

    // Idem reads them back: every event a row, every malformed value a
    // dead letter.
    let schema = fresh_schema("kafka_avro_produce");
    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .connector("format = \"avro\"")
            .connector(&format!("schema_file = \"{}\"", avsc.display()))
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .columns("")
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));
    let rows = pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT event_id), sum(user_id)::bigint, count(note)
                   FROM \"{schema}\".events"
            ),
            &[],
        )
        .await
        .unwrap();
    let users: i64 = want.iter().map(|e| e["user_id"].as_i64().unwrap()).sum();
    let notes = want.iter().filter(|e| !e["note"].is_null()).count() as i64;
    assert_eq!(
        (
            rows.get::<_, i64>(0),
            rows.get::<_, i64>(1),
            rows.get::<_, i64>(2),
            rows.get::<_, i64>(3)
        ),
        (400, 400, users, notes)
    );
    assert_eq!(std::fs::read_to_string(&dead).unwrap().lines().count(), 3);
}

const ORDER_PROTO: &str = r#"syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";

enum Status { NEW = 0; PAID = 1; SHIPPED = 2; }
message Buyer { string city = 1; }
message Order {
  int64 id = 1;
  string name = 2;
  double price = 3;
  bool paid = 4;
  google.protobuf.Timestamp at = 5;
  Status status = 6;
  repeated string tags = 7;
  Buyer buyer = 8;
  bytes raw = 9;
  optional string note = 10;
  sint32 delta = 11;
}
"#;

/// `format = "protobuf"`: messages serialized by Google's protobuf runtime
/// from the same `.proto` (compiled by protoc, `scripts/proto-encode.py`)
/// land in PostgreSQL with no `[[columns]]`, each field a column of its
/// mapped type; a value that is not such a message is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_messages_written_by_googles_runtime_land_exactly() {
    let topic = fresh_topic("idem_proto", 2).await;
    let w = Workdir::new();
    let proto = w.write("order.proto", ORDER_PROTO);
    let rows: Vec<serde_json::Value> = (0..200i64)
        .map(|i| {
            let status = ["NEW", "PAID", "SHIPPED"][(i % 3) as usize];
            let mut row = serde_json::json!({
                "id": i * 1_000_000_007,
                "name": format!("order {i} ✓"),
                "price": i as f64 / 4.0,
                "paid": i % 2 == 0,
                "at": format!("2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                    1 + i % 12, 1 + i % 28, i % 24, i % 60, (i * 7) % 60, (i * 130_013) % 1_000_000),
                "status": status,
                "tags": (0..i % 3).map(|t| format!("t{t}")).collect::<Vec<_>>(),
                "buyer": {"city": format!("city {}", i % 5)},
                "raw": base64::engine::general_purpose::STANDARD.encode([i as u8, 255]),
                "delta": -i,
            });
            if i % 4 != 0 {
                row["note"] = format!("n{i}").into();
            }
            row
        })
        .collect();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    let mut values: Vec<Vec<u8>> = script_lines(
        "proto-encode.py",
        &[proto.as_os_str(), std::ffi::OsStr::new("shop.Order")],
        lines,
    )
    .iter()
    .map(|l| base64::engine::general_purpose::STANDARD.decode(l).unwrap())
    .collect();
    assert_eq!(values.len(), rows.len());
    // Field 1 (id) as a length-delimited field: no Order parses it.
    values.push(vec![0x0a, 0x03, b'a', b'b']);
    produce_values(&topic, &values).await;

    let schema = fresh_schema("kafka_proto");
    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .connector("format = \"protobuf\"")
            .connector(&format!("schema_file = \"{}\"", proto.display()))
            .connector("message = \"shop.Order\"")
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .sink_line("mode = \"upsert\"\nkey = [\"id\"]")
            .columns("")
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));

    let client = pg().await;
    let types: Vec<String> = pg_columns(&client, &schema)
        .await
        .into_iter()
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect();
    assert_eq!(
        types,
        [
            "id bigint",
            "name text",
            "price double precision",
            "paid boolean",
            "at timestamp with time zone",
            "status text",
            "tags jsonb",
            "buyer jsonb",
            "raw bytea",
            "note text",
            "delta integer",
        ]
    );
    let got = json_rows(&client, &format!(
                "SELECT json_build_object('id', id, 'name', name, 'price', price, 'paid', paid,
                        'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        'status', status, 'tags', tags, 'buyer', buyer, 'raw', encode(raw, 'base64'),
                        'note', note, 'delta', delta)::text
                   FROM \"{schema}\".events ORDER BY id"
    ))
    .await;
    // An unset optional is null.
    let want: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r.get("note").is_none() {
                r["note"] = serde_json::Value::Null;
            }
            r
        })
        .collect();
    same_rows(&got, &want, Some("price"));
    let letters = std::fs::read_to_string(&dead).unwrap();
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert!(letters.contains("not a shop.Order message"), "{letters}");
}

/// Avro values, their columns from the schema, while the runner is killed
/// at random and at fail points as they are produced: every event lands
/// exactly once, its values exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_killed_at_random_and_at_fail_points_lands_every_value_once() {
    const ROUNDS: usize = 12;
    const PER_ROUND: i64 = 1_500;
    const EVENT: &str = r#"{"type": "record", "name": "E", "fields": [
        {"name": "id", "type": "long"}, {"name": "v", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": null}]}"#;
    let mut rng = crash_rng("kafka-avro");
    let topic = fresh_topic("idem_avro_crash", 3).await;
    let schema = fresh_schema("kafka_avro_crash");
    let w = Workdir::new();
    let avsc = w.write("e.avsc", EVENT);
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .max_records(300)
            .connector("format = \"avro\"")
            .connector(&format!("schema_file = \"{}\"", avsc.display()))
            .columns("")
            .toml(),
    );
    let encoder = std::sync::Arc::new(idem_core::mapping::avro::AvroSchema::parse(EVENT).unwrap());
    let rounds = crash_while_producing(&cfg, &mut rng, ROUNDS, PER_ROUND, 300..8_000, |ids| {
        let (topic, encoder) = (topic.clone(), encoder.clone());
        async move {
            produce_values_of(&topic, ids, |i| {
                let note = (i % 3 == 0).then(|| format!("n{i}"));
                encoder
                    .encode(&serde_json::json!({"id": i, "v": i * 10, "note": note}))
                    .unwrap()
            })
            .await
        }
    })
    .await;
    rounds.check("kafka-avro", 8, &FAILPOINTS);

    let total = ROUNDS as i64 * PER_ROUND;
    run_until(&cfg, &schema, total).await;
    assert_eq!(
        count(&schema).await,
        (total, total),
        "lost or duplicated events"
    );
    let row = pg()
        .await
        .query_one(
            &format!("SELECT sum(v)::bigint, count(note), sum(length(note))::bigint FROM \"{schema}\".events"),
            &[],
        )
        .await
        .unwrap();
    let notes: Vec<String> = (0..total)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("n{i}"))
        .collect();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (
            (0..total).map(|i| i * 10).sum::<i64>(),
            notes.len() as i64,
            notes.iter().map(|n| n.len() as i64).sum::<i64>()
        )
    );
    assert_eq!(positions(&schema).await, end_offsets(&topic, 3));
}

/// `format = "json_schema"`: JSON after the registry's 5-byte prefix, as
/// Confluent's JSON Schema serializer frames it, maps as JSON does; a
/// value without the prefix is a dead letter that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_after_a_registry_prefix_maps_as_json() {
    let topic = fresh_topic("idem_json_schema", 2).await;
    let mut values: Vec<Vec<u8>> = (0..100i64)
        .map(|i| {
            let mut v = vec![0, 0, 0, 1, 7]; // schema id 263
            v.extend(format!(r#"{{"id":{i},"v":{}}}"#, i * 10).into_bytes());
            v
        })
        .collect();
    values.push(br#"{"id":100,"v":1000}"#.to_vec());
    produce_values(&topic, &values).await;
    let schema = fresh_schema("kafka_json_schema");
    let w = Workdir::new();
    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .connector("format = \"json_schema\"")
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(count(&schema).await, (100, 100));
    let sum: i64 = pg()
        .await
        .query_one(
            &format!("SELECT sum(v)::bigint FROM \"{schema}\".events"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (0..100).map(|i| i * 10).sum::<i64>());
    let letters = std::fs::read_to_string(&dead).unwrap();
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert!(letters.contains("starts with byte 0x7b"), "{letters}");
}

/// The same Avro values with their columns from the schema, as Parquet on
/// S3: DuckDB's Parquet reader finds each field a column of its mapped
/// type and every value as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_into_parquet_on_s3_reads_back_in_duckdb() {
    let (topic, w, avsc, rows) = wide_topic("idem_avro_s3").await;
    let bucket = idem_testkit::s3::fresh_bucket("avro").await;
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, "unused")
            .source("stop_at_end = true")
            .connector("format = \"avro\"")
            .connector(&format!("schema_file = \"{}\"", avsc.display()))
            .sink(&idem_testkit::s3::sink_lines(
                &bucket,
                "format = \"parquet\"\nprefix = \"payments/\"",
            ))
            .columns("")
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));

    // Every Parquet object, downloaded for DuckDB to read.
    let dir = w.path("objects");
    std::fs::create_dir_all(&dir).unwrap();
    let keys: Vec<String> = idem_testkit::s3::keys(&bucket, "payments/")
        .await
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .collect();
    assert!(!keys.is_empty());
    for (i, key) in keys.iter().enumerate() {
        let body = idem_testkit::s3::get(&bucket, key).await;
        std::fs::write(dir.join(format!("{i}.parquet")), body).unwrap();
    }
    let duck = duckdb::Connection::open_in_memory().unwrap();
    let files = format!("{}/*.parquet", dir.display());
    let mut stmt = duck
        .prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{files}'))"
        ))
        .unwrap();
    let types: Vec<String> = stmt
        .query_map([], |r| {
            Ok(format!(
                "{} {}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .filter(|c| !c.starts_with("_idem_"))
        .collect();
    assert_eq!(
        types,
        [
            "id BIGINT",
            "qty INTEGER",
            "paid BOOLEAN",
            "score DOUBLE",
            "amount VARCHAR",
            "day DATE",
            "at TIMESTAMP WITH TIME ZONE",
            "ref VARCHAR",
            "state VARCHAR",
            "note VARCHAR",
            "tags VARCHAR",
            "buyer VARCHAR",
        ]
    );
    // Every value written, each once (the topic's two writes of an id are
    // two records: the sink appends).
    let mut stmt = duck
        .prepare(&format!(
            "SELECT to_json({{'id': id, 'qty': qty, 'paid': paid, 'score': score, 'amount': amount,
                    'day': day::VARCHAR, 'at': strftime(timezone('UTC', \"at\"), '%Y-%m-%dT%H:%M:%S.%fZ'),
                    'ref': ref, 'state': state, 'note': note, 'tags': tags::JSON, 'buyer': buyer::JSON}})::VARCHAR
               FROM read_parquet('{files}') ORDER BY id, qty"
        ))
        .unwrap();
    let got: Vec<serde_json::Value> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|s| serde_json::from_str(&s.unwrap()).unwrap())
        .collect();
    let mut want = rows.clone();
    want.sort_by_key(|r| (r["id"].as_i64(), r["qty"].as_i64()));
    same_rows(&got, &want, Some("score"));
}
