//! What the CDC tests share: a Debezium connector capturing tables of a
//! schema, a random workload of changes, and row-for-row comparisons.

use idem_testkit::*;
use rdkafka::consumer::Consumer;
use std::time::{Duration, Instant};

const CONNECT: &str = "http://127.0.0.1:8083";

/// The columns of the workload's tables, as compared.
pub const COLUMNS: &str = "id, name, n";

/// What a connector makes of the change events.
#[derive(Clone, Copy)]
pub enum Shape {
    /// A replica of the table. `versioned`: the recommended set-up, the
    /// source's LSN as the version column. `learns`: the columns not
    /// listed come from the events' schemas (`evolve = "add_columns"`).
    Replica { versioned: bool, learns: bool },
    /// An append-only log of every event, with its op and LSN, its other
    /// columns learnt from the events' schemas.
    ChangeLog,
}

/// The workload tables' columns.
pub const WORKLOAD_COLUMNS: [(&str, &str); 3] =
    [("id", "bigint"), ("name", "text"), ("n", "bigint")];

/// A `[connectors.NAME]` applying the change events of `topic` to `sink`
/// (its section's lines) in `shape`, with `(name, type)` columns keyed on
/// `id`.
pub fn connector(
    name: &str,
    topic: &str,
    group: &str,
    sink: &str,
    shape: Shape,
    dead: &std::path::Path,
    columns: &[(&str, &str)],
) -> String {
    let column = |col: &str, ty: &str, pointer: &str| {
        format!("[[connectors.{name}.columns]]\nname = \"{col}\"\ntype = \"{ty}\"\npointer = \"{pointer}\"\n")
    };
    let evolve = match shape {
        Shape::Replica { learns: true, .. } | Shape::ChangeLog => "evolve = \"add_columns\"\n",
        _ => "",
    };
    let (mode, extra) = match shape {
        Shape::Replica { versioned, .. } => (
            format!(
                "mode = \"upsert\"\nkey = [\"id\"]\ndelete_on_tombstone = true\n{}",
                if versioned { "version = \"lsn\"\n" } else { "" }
            ),
            if versioned {
                column("lsn", "bigint", "@source/lsn")
            } else {
                String::new()
            },
        ),
        Shape::ChangeLog => (
            String::new(),
            column("lsn", "bigint", "@source/lsn") + &column("op", "text", "@op"),
        ),
    };
    let columns: String = columns
        .iter()
        .map(|(col, ty)| {
            format!("[[connectors.{name}.columns]]\nname = \"{col}\"\ntype = \"{ty}\"\n")
        })
        .collect();
    format!(
        r#"
[connectors.{name}]
envelope = "debezium"
{evolve}dead_letter = "{dead}"
[connectors.{name}.source]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["{topic}"]
group_id = "{group}"
[connectors.{name}.sink]
{sink}{mode}[connectors.{name}.batch]
max_records = 100
linger = "100ms"
{columns}{extra}"#,
        dead = dead.display(),
    )
}

/// `idem run CFG` in the background, its log in `log`.
pub fn spawn_logged(cfg: &std::path::Path, log: &std::path::Path) -> Reaped {
    Reaped(
        idem()
            .arg("run")
            .arg(cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The sink lines of a PostgreSQL target `schema.table`.
pub fn postgres_sink(schema: &str, table: &str) -> String {
    format!(
        "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"{table}\"\n",
        pg_url()
    )
}

/// Rows of `table` (its `columns`) in one schema and not the other, both
/// ways; -1 while the target table does not exist.
pub async fn differences(src: &str, dst: &str, table: &str, columns: &str) -> i64 {
    let q = format!(
        "SELECT (SELECT count(*) FROM (SELECT {columns} FROM \"{src}\".{table}
                 EXCEPT SELECT {columns} FROM \"{dst}\".{table}) a)
              + (SELECT count(*) FROM (SELECT {columns} FROM \"{dst}\".{table}
                 EXCEPT SELECT {columns} FROM \"{src}\".{table}) b)"
    );
    // The target table exists once Idem's first batch landed.
    pg().await
        .query_one(&q, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// A Debezium connector capturing `tables` of `schema`, a topic each.
pub struct Capture {
    name: String,
    pub topics: Vec<String>,
}

impl Capture {
    pub async fn start(schema: &str, tables: &[&str], schemas: bool) -> Capture {
        let include = tables
            .iter()
            .map(|t| format!("{schema}.{t}"))
            .collect::<Vec<_>>()
            .join(",");
        Capture::start_with(schema, &include, tables, schemas).await
    }

    /// Capturing every table of `schema` (one created later once it joins
    /// the publication, named after `schema`), with schemas; ready once
    /// the topics of `tables` exist.
    pub async fn start_all(schema: &str, tables: &[&str]) -> Capture {
        Capture::start_with(schema, &format!("{schema}[.].*"), tables, true).await
    }

    async fn start_with(schema: &str, include: &str, tables: &[&str], schemas: bool) -> Capture {
        let http = reqwest::Client::new();
        let listed = http
            .get(format!("{CONNECT}/connectors"))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("Kafka Connect at {CONNECT}: {e} (start it: bash scripts/connect.sh)")
            })
            .text()
            .await
            .unwrap();
        // What an earlier test process left (it failed before its clean-up):
        // its connectors and slots would go on capturing.
        let mine = format!("cdc_src_{}_", std::process::id());
        let names: Vec<String> = serde_json::from_str(&listed).unwrap_or_default();
        for name in names {
            if name.starts_with("cdc_src_") && !name.starts_with(&mine) {
                Capture {
                    topics: Vec::new(),
                    name,
                }
                .stop()
                .await;
            }
        }
        let config = serde_json::json!({
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "plugin.name": "pgoutput",
            "database.hostname": "127.0.0.1",
            "database.port": "5432",
            "database.user": "idem",
            "database.password": "idem",
            "database.dbname": "idem_test",
            "topic.prefix": schema,
            "table.include.list": include,
            "slot.name": schema,
            "publication.name": schema,
            "publication.autocreate.mode": "filtered",
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": schemas.to_string(),
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": schemas.to_string(),
        });
        let r = http
            .put(format!("{CONNECT}/connectors/{schema}/config"))
            .header("content-type", "application/json")
            .body(config.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
        // Running once its task is.
        let started = Instant::now();
        loop {
            let body = http
                .get(format!("{CONNECT}/connectors/{schema}/status"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            let s: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if s["tasks"][0]["state"] == "RUNNING" {
                break;
            }
            assert!(
                s["tasks"][0]["state"] != "FAILED" && started.elapsed() < Duration::from_secs(60),
                "the Debezium connector did not start: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The snapshot's first event of each table creates its topic.
        let topics: Vec<String> = tables
            .iter()
            .map(|t| format!("{schema}.{schema}.{t}"))
            .collect();
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .create()
            .unwrap();
        for topic in &topics {
            let started = Instant::now();
            loop {
                let known = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .is_ok_and(|m| {
                        m.topics()
                            .iter()
                            .any(|t| t.error().is_none() && !t.partitions().is_empty())
                    });
                if known {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "Debezium never created {topic}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Capture {
            name: schema.to_string(),
            topics,
        }
    }

    /// Remove the connector, then its replication slot (which would keep
    /// the server's write-ahead log forever) and publication.
    pub async fn stop(self) {
        let http = reqwest::Client::new();
        let _ = http
            .delete(format!("{CONNECT}/connectors/{}", self.name))
            .send()
            .await;
        let db = pg().await;
        let started = Instant::now();
        loop {
            let dropped = db
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE slot_name = $1 AND NOT active",
                    &[&self.name],
                )
                .await;
            let left: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.name],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replication slot {} still there: {dropped:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        db.batch_execute(&format!("DROP PUBLICATION IF EXISTS \"{}\"", self.name))
            .await
            .unwrap();
    }
}

/// A xorshift generator: the same workload on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One random change to `schema.table` (`id bigint PRIMARY KEY, name
/// text, n bigint`): an update, a delete, an insert, or a primary-key
/// update (Debezium sends a delete of the old key and a create of the new).
/// `noted`: the table has a column `note text` too, which updates and
/// inserts set.
pub fn change(schema: &str, table: &str, rng: &mut Rng, i: usize, noted: bool) -> String {
    let id = rng.next() % 400 + 1;
    let t = format!("\"{schema}\".{table}");
    let (set_note, note) = if noted {
        (format!(", note = 'note {i}'"), format!(", 'note {i}'"))
    } else {
        (String::new(), String::new())
    };
    match rng.next() % 4 {
        0 => format!("UPDATE {t} SET name = 'renamed {i}', n = n + 1{set_note} WHERE id = {id}"),
        1 => format!("DELETE FROM {t} WHERE id = {id}"),
        2 => format!(
            "INSERT INTO {t} VALUES ({id}, 'new {i}', {i}{note}) ON CONFLICT (id) DO UPDATE SET n = excluded.n"
        ),
        _ => format!(
            "UPDATE {t} SET id = id + 1000 WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM {t} WHERE id = {id} + 1000)"
        ),
    }
}

/// `CREATE TABLE schema.table` with `rows` rows.
pub fn seeded(schema: &str, table: &str, rows: u32) -> String {
    format!(
        "CREATE TABLE \"{schema}\".{table} (id bigint PRIMARY KEY, name text, n bigint);
         INSERT INTO \"{schema}\".{table} SELECT i, 'name ' || i, i * 10 FROM generate_series(1, {rows}) i;"
    )
}
