//! The pipeline against in-memory sources and sinks.
use super::*;
use async_trait::async_trait;
use idem_core::{
    Batch, CommitStats, Message, Opened, PartitionReader, PartitionRef, ReadStatus, StoredPosition,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// One partition `p`: line i at offset i.
struct MemSource {
    lines: Vec<Vec<u8>>,
    /// Each read hands out its range twice, and the last message of the
    /// read before once more (a source that slips).
    stutter: bool,
    /// At the end, idle (waiting for more) instead of finished.
    follow: bool,
}

#[async_trait]
impl Source for MemSource {
    fn name(&self) -> &str {
        "mem"
    }
    async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError> {
        Ok(Some(Assignment::Assigned(vec!["p".into()])))
    }
    async fn open(
        &self,
        _partition: &str,
        start: Option<u64>,
    ) -> Result<Box<dyn PartitionReader>, SourceError> {
        Ok(Box::new(MemReader {
            lines: self.lines.clone(),
            at: start.unwrap_or(0) as usize,
            stutter: self.stutter,
            follow: self.follow,
        }))
    }
}

struct MemReader {
    lines: Vec<Vec<u8>>,
    at: usize,
    stutter: bool,
    follow: bool,
}

fn mem_message(i: usize, line: &[u8]) -> Message {
    Message {
        offset: i as u64,
        next_offset: i as u64 + 1,
        key: None,
        value: Some(line.to_vec()),
        poison: None,
        meta: Default::default(),
    }
}

#[async_trait]
impl PartitionReader for MemReader {
    async fn read(
        &mut self,
        max: usize,
        out: &mut Vec<Message>,
    ) -> Result<ReadStatus, SourceError> {
        if self.at >= self.lines.len() {
            if !self.follow {
                return Ok(ReadStatus::End);
            }
            // As a followed source does: wait a little for more.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            return Ok(ReadStatus::Idle);
        }
        let end = (self.at + max).min(self.lines.len());
        let from = if self.stutter {
            self.at.saturating_sub(1)
        } else {
            self.at
        };
        for i in from..end {
            out.push(mem_message(i, &self.lines[i]));
        }
        if self.stutter {
            for i in self.at..end {
                out.push(mem_message(i, &self.lines[i]));
            }
        }
        self.at = end;
        Ok(ReadStatus::Data)
    }
}

#[derive(Default)]
struct MemSink {
    /// (first_offset, next_offset, records) per successful commit.
    commits: Mutex<Vec<(u64, u64, usize)>>,
    attempts: AtomicUsize,
    transient_failures: AtomicUsize,
    permanent: bool,
    /// Ids whose records make a commit fail as refused data.
    refuse: Vec<i64>,
    /// Each commit waits for a permit here, when set.
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[derive(Debug, thiserror::Error)]
#[error("simulated")]
struct Simulated;

#[async_trait]
impl Sink for MemSink {
    fn info(&self) -> idem_core::SinkInfo {
        idem_core::SinkInfo {
            guarantee: Guarantee::ExactlyOnce,
            why: "memory".into(),
            key_columns: vec![],
            deletes: false,
            rows: idem_core::RowShape::append(),
            adds_columns: None,
            ids_table: None,
        }
    }
    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn open(&self, _p: &PartitionRef) -> Result<Opened, SinkError> {
        Ok(Opened {
            epoch: 1,
            next_offset: None,
        })
    }
    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if self.permanent {
            return Err(SinkError::Permanent(Box::new(Simulated)));
        }
        if batch.records.iter().any(
            |r| matches!(r.values.to_values()[0], idem_core::Value::BigInt(id) if self.refuse.contains(&id)),
        ) {
            return Err(SinkError::Refused(Box::new(Simulated)));
        }
        if self
            .transient_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::Transient(Box::new(Simulated)));
        }
        self.commits.lock().unwrap().push((
            batch.first_offset,
            batch.next_offset,
            batch.records.len(),
        ));
        Ok(CommitStats {
            written: batch.records.len() as u64,
            deduplicated: 0,
            rejected: 0,
            durable_through: None,
        })
    }
    async fn positions(&self, _c: &str) -> Result<Vec<StoredPosition>, SinkError> {
        Ok(vec![])
    }
    async fn describe(&self) -> Result<String, SinkError> {
        Ok("memory".into())
    }
}

fn connector(sink: Arc<MemSink>, lines: Vec<Vec<u8>>, batch: &str) -> Arc<Connector> {
    let dir = tempfile::tempdir().unwrap().keep();
    let text = format!(
        r#"
[connectors.t]
dead_letter = "{}"
[connectors.t.source]
type = "file"
path = "unused"
[connectors.t.sink]
type = "stdout"
[connectors.t.batch]
{batch}
[connectors.t.retry]
initial_backoff = "1ms"
max_backoff = "2ms"
max_attempts = 4
[[connectors.t.columns]]
name = "id"
type = "bigint"
required = true
"#,
        dir.join("dl.jsonl").display()
    );
    let cfg: crate::registry::Config =
        idem_config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let (name, mut c) = cfg.connectors.into_iter().next().unwrap();
    c.guarantee = Guarantee::AtLeastOnce;
    let mut conn = Connector::build(&name, c).unwrap();
    conn.source = Arc::new(MemSource {
        lines,
        stutter: false,
        follow: false,
    });
    conn.sink = sink;
    Arc::new(conn)
}

fn lines(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{{\"id\":{i}}}").into_bytes())
        .collect()
}

async fn run_partition(conn: &Arc<Connector>) -> Result<PartitionEnd, RunError> {
    conn.clone()
        .run_partition("p", CancellationToken::new())
        .await
}

#[tokio::test]
async fn positions_a_source_hands_out_twice_are_written_once() {
    let sink = Arc::new(MemSink::default());
    let mut conn = connector(sink.clone(), lines(25), "max_records = 10\nlinger = \"1h\"");
    Arc::get_mut(&mut conn).unwrap().source = Arc::new(MemSource {
        lines: lines(25),
        stutter: true,
        follow: false,
    });
    run_partition(&conn).await.unwrap();
    assert_eq!(
        *sink.commits.lock().unwrap(),
        [(0, 10, 10), (10, 20, 10), (20, 25, 5)]
    );
    assert_eq!(conn.stats.snapshot().read, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_stays_within_max_bytes_whatever_max_records() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sink = Arc::new(MemSink {
        gate: Some(gate.clone()),
        ..Default::default()
    });
    // 2,000 lines of about 10 KB; a batch closes at 100 KiB (11 lines).
    let pad = "x".repeat(10_000);
    let big = (0..2000)
        .map(|i| format!("{{\"id\":{i},\"pad\":\"{pad}\"}}").into_bytes())
        .collect();
    let conn = connector(
        sink.clone(),
        big,
        "max_records = 100000\nmax_bytes = 102400\nlinger = \"1h\"",
    );
    let run = tokio::spawn({
        let conn = conn.clone();
        async move { run_partition(&conn).await }
    });
    // The first commit waits at the gate while the reader reads ahead.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let read = conn.stats.snapshot().read;
    // The batch being committed, about as much again read ahead, and the
    // chunk waiting for room: not a hundred chunks of max_records' share.
    assert!(
        (11..=40).contains(&read),
        "{read} lines read by a blocked commit"
    );
    gate.add_permits(100_000);
    run.await.unwrap().unwrap();
    let commits = sink.commits.lock().unwrap();
    assert_eq!(commits.iter().map(|c| c.2).sum::<usize>(), 2000);
    assert_eq!(commits.last().map(|c| c.1), Some(2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_larger_than_the_read_ahead_allowance_pass_one_at_a_time() {
    let sink = Arc::new(MemSink::default());
    let pad = "x".repeat(10_000);
    let big = (0..50)
        .map(|i| format!("{{\"id\":{i},\"pad\":\"{pad}\"}}").into_bytes())
        .collect();
    let conn = connector(sink.clone(), big, "max_bytes = 4096\nlinger = \"1h\"");
    tokio::time::timeout(std::time::Duration::from_secs(10), run_partition(&conn))
        .await
        .expect("the partition ran to its end")
        .unwrap();
    let commits = sink.commits.lock().unwrap();
    assert_eq!(commits.len(), 50, "one message a batch");
    assert_eq!(commits.last().map(|c| c.1), Some(50));
}

#[tokio::test]
async fn batches_close_at_max_records_and_cover_every_offset() {
    let sink = Arc::new(MemSink::default());
    let conn = connector(sink.clone(), lines(25), "max_records = 10\nlinger = \"1h\"");
    run_partition(&conn).await.unwrap();
    assert_eq!(
        *sink.commits.lock().unwrap(),
        [(0, 10, 10), (10, 20, 10), (20, 25, 5)]
    );
    let s = conn.stats.snapshot();
    assert_eq!((s.read, s.written, s.batches), (25, 25, 3));
    assert_eq!(s.positions.get("p"), Some(&25));
}

#[tokio::test]
async fn refused_records_are_isolated_dead_lettered_and_the_rest_commits() {
    let sink = Arc::new(MemSink {
        refuse: vec![3, 4, 17],
        ..Default::default()
    });
    let conn = connector(sink.clone(), lines(25), "max_records = 20\nlinger = \"1h\"");
    run_partition(&conn).await.unwrap();
    let commits = sink.commits.lock().unwrap().clone();
    // Every offset is covered once, in order, by the committed pieces.
    let mut at = 0;
    let mut rows = 0;
    for &(first, next, n) in &commits {
        assert_eq!(first, at, "{commits:?}");
        assert!(next > first || n == 0, "{commits:?}");
        at = next;
        rows += n;
    }
    assert_eq!((at, rows), (25, 22), "{commits:?}");
    let s = conn.stats.snapshot();
    assert_eq!((s.written, s.dead_lettered), (22, 3));
    let DeadLetters::File(f) = &*conn.dead_letters else {
        panic!("file dead letters")
    };
    let text = std::fs::read_to_string(f.path()).unwrap();
    let letters: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let offsets: Vec<u64> = letters
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3, 4, 17]);
    assert_eq!(letters[0]["error_class"], "refused");
    assert!(letters[0]["reason"].as_str().unwrap().contains("simulated"));
    assert_eq!(letters[0]["raw"], "{\"id\":3}");
}

#[tokio::test]
async fn batches_close_at_max_bytes() {
    let sink = Arc::new(MemSink::default());
    // Each line is 8 bytes: {"id":N}
    let conn = connector(sink.clone(), lines(10), "max_bytes = 24\nlinger = \"1h\"");
    run_partition(&conn).await.unwrap();
    let sizes: Vec<usize> = sink.commits.lock().unwrap().iter().map(|c| c.2).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);
}

#[tokio::test]
async fn transient_errors_resend_the_whole_batch() {
    let sink = Arc::new(MemSink::default());
    sink.transient_failures.store(2, Ordering::SeqCst);
    let conn = connector(sink.clone(), lines(5), "max_records = 100");
    run_partition(&conn).await.unwrap();
    assert_eq!(*sink.commits.lock().unwrap(), [(0, 5, 5)]);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(conn.stats.snapshot().retries, 2);
}

#[tokio::test]
async fn transient_errors_give_up_after_max_attempts() {
    let sink = Arc::new(MemSink::default());
    sink.transient_failures.store(100, Ordering::SeqCst);
    let conn = connector(sink.clone(), lines(5), "max_records = 100");
    assert!(run_partition(&conn).await.is_err());
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 4);
    assert!(sink.commits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let sink = Arc::new(MemSink {
        permanent: true,
        ..MemSink::default()
    });
    let conn = connector(sink.clone(), lines(5), "max_records = 100");
    let err = run_partition(&conn).await.unwrap_err();
    assert!(err.to_string().contains("simulated"), "{err}");
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dead_letters_advance_the_position_without_a_row() {
    let sink = Arc::new(MemSink::default());
    let mut input = lines(4);
    input[1] = b"nope".to_vec();
    input[3] = b"{\"id\":\"x\"}".to_vec();
    let conn = connector(sink.clone(), input, "max_records = 100");
    run_partition(&conn).await.unwrap();
    assert_eq!(*sink.commits.lock().unwrap(), [(0, 4, 2)]);
    let s = conn.stats.snapshot();
    assert_eq!((s.read, s.written, s.dead_lettered), (4, 2, 2));
    let dl = std::fs::read_to_string(conn.dead_letters.describe()).unwrap();
    assert_eq!(dl.lines().count(), 2);
}

/// A table template or learnt columns where they cannot work are refused
/// at start, saying what they need.
#[test]
fn templates_and_learnt_columns_need_what_they_read() {
    let build = |connector: &str, sink: &str| {
        let text = format!(
            r#"
[connectors.t]
{connector}
[connectors.t.source]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["^db[.]inventory[.].*"]
group_id = "g"
[connectors.t.sink]
{sink}
[[connectors.t.columns]]
name = "id"
type = "bigint"
"#
        );
        let cfg: crate::registry::Config =
            match idem_config::parse(std::path::Path::new("t.toml"), &text) {
                Ok(cfg) => cfg,
                Err(e) => return Some(e.to_string()),
            };
        let (name, c) = cfg.connectors.into_iter().next().unwrap();
        match Connector::build(&name, c) {
            Ok(c) => {
                assert_eq!(
                    c.sink.info().why.contains("each source table"),
                    c.routed.is_some()
                );
                None
            }
            Err(e) => Some(e.to_string()),
        }
    };
    let pg = "type = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\nmode = \"upsert\"\nkey = [\"id\"]\ndelete_on_tombstone = true\n";
    let template = format!("{pg}table = \"{{source.table}}\"\n");
    let e = build("envelope = \"debezium\"", &template).unwrap();
    assert!(e.contains("evolve = \"add_columns\""), "{e}");
    let learning =
        "envelope = \"debezium\"\nevolve = \"add_columns\"\nguarantee = \"at-least-once\"";
    assert_eq!(build(learning, &template), None);
    // Without `key`, a template keys each table on its source table's
    // primary key (learnt from the message key); one table needs its key.
    let unkeyed = pg.replace("key = [\"id\"]\n", "");
    assert_eq!(
        build(
            learning,
            &format!("{unkeyed}table = \"{{source.table}}\"\n")
        ),
        None
    );
    let e = build(learning, &format!("{unkeyed}table = \"t\"\n")).unwrap();
    assert!(e.contains("t.toml") && e.contains("needs key"), "{e}");
    // Columns from a table the user made: it must not be created (nor
    // be a template, nor be no table at all).
    let from_table =
        "envelope = \"debezium\"\ncolumns_from = \"table\"\nguarantee = \"at-least-once\"";
    let one = format!("{pg}table = \"t\"\n");
    let e = build(from_table, &one).unwrap();
    assert!(e.contains("create = false"), "{e}");
    assert_eq!(build(from_table, &format!("{one}create = false\n")), None);
    let e = build(
        &format!("{from_table}\nevolve = \"add_columns\""),
        &format!("{template}create = false\n"),
    )
    .unwrap();
    assert!(e.contains("one table"), "{e}");
    let e = build(from_table, "type = \"stdout\"").unwrap();
    assert!(e.contains("postgres or duckdb"), "{e}");
    let e = build(learning, "type = \"stdout\"").unwrap();
    assert!(
        e.contains("available on the postgres, duckdb and s3 sinks"),
        "{e}"
    );
}

/// `[dedup] store = "sink"`: built into the postgres and duckdb sinks,
/// with no store of its own; refused, naming the alternatives, where the
/// sink cannot keep ids (and with `mode = "dedup"`, which keys its own).
#[test]
fn batch_sizes_left_unset_follow_the_sink() {
    let build = |sink: &str, batch: &str| {
        let text = format!(
            "[connectors.t]\n[connectors.t.source]\ntype = \"file\"\npath = \"in.jsonl\"\n\
             [connectors.t.sink]\n{sink}\n[connectors.t.batch]\n{batch}\n\
             [[connectors.t.columns]]\nname = \"id\"\ntype = \"text\"\n"
        );
        let cfg: crate::registry::Config =
            idem_config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let (name, c) = cfg.connectors.into_iter().next().unwrap();
        Connector::build(&name, c).unwrap().cfg.batch.records()
    };
    let duck = "type = \"duckdb\"\npath = \"t.duckdb\"\ntable = \"ev\"";
    let pg = "type = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\ntable = \"ev\"";
    let http = "type = \"http\"\nurl = \"http://127.0.0.1:9/ev\"";
    assert_eq!(build(duck, ""), 100_000);
    assert_eq!(build(pg, ""), 100_000);
    // Request bodies stay small.
    assert_eq!(build(http, ""), 10_000);
    // What the connector says wins.
    assert_eq!(build(duck, "max_records = 500"), 500);
    assert_eq!(build(http, "max_records = 50000"), 50_000);
}

#[test]
fn ids_kept_by_the_sink_need_a_sink_that_keeps_them() {
    let build = |sink: &str, dedup: &str| {
        let text = format!(
            r#"
[connectors.t]
[connectors.t.source]
type = "file"
path = "in.jsonl"
[connectors.t.sink]
{sink}
[connectors.t.dedup]
id = "/id"
store = "sink"
{dedup}
[[connectors.t.columns]]
name = "id"
type = "text"
"#
        );
        let cfg: crate::registry::Config =
            match idem_config::parse(std::path::Path::new("t.toml"), &text) {
                Ok(cfg) => cfg,
                Err(e) => return Err(e.to_string()),
            };
        let (name, c) = cfg.connectors.into_iter().next().unwrap();
        Connector::build(&name, c).map_err(|e| e.to_string())
    };
    let pg = "type = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\ntable = \"ev\"\nmode = \"upsert\"\nkey = [\"id\"]";
    let c = build(pg, "").unwrap();
    assert!(c.dedup.is_none(), "no store of its own");
    assert!(c.ids.is_some(), "records carry their ids");
    assert_eq!(
        c.sink.info().ids_table.as_deref(),
        Some("\"public\".\"idem_seen_ev\"")
    );
    let duck = "type = \"duckdb\"\npath = \"t.duckdb\"\ntable = \"ev\"";
    assert!(build(duck, "").unwrap().sink.info().ids_table.is_some());
    for refused in [
        "type = \"sqlite\"\npath = \"t.db\"\ntable = \"ev\"",
        "type = \"http\"\nurl = \"http://127.0.0.1:9/ev\"",
        "type = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\ntable = \"ev\"\nmode = \"dedup\"\nkey = [\"id\"]",
    ] {
        let e = build(refused, "").err().unwrap();
        assert!(
            e.contains("store = \"sink\"") && e.contains("store = \"embedded\""),
            "{e}"
        );
    }
    let e = build(pg, "namespace = \"x\"").err().unwrap();
    assert!(
        e.contains("dedup.namespace") && e.contains("store = \"sink\""),
        "{e}"
    );
}

#[test]
fn an_avro_schema_file_that_is_missing_or_wrong_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let build_with = |file: &std::path::Path, extra: &str| {
        let text = format!(
            r#"
[connectors.t]
guarantee = "at-least-once"
format = "avro"
schema_file = "{}"
[connectors.t.source]
type = "file"
path = "in.jsonl"
[connectors.t.sink]
type = "stdout"
[[connectors.t.columns]]
name = "id"
type = "bigint"
{extra}"#,
            file.display()
        );
        let cfg: crate::registry::Config =
            idem_config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let (name, c) = cfg.connectors.into_iter().next().unwrap();
        Connector::build(&name, c).err().map(|e| e.to_string())
    };
    let build = |file: &std::path::Path| build_with(file, "");
    let missing = dir.path().join("nope.avsc");
    let e = build(&missing).unwrap();
    assert!(e.contains("schema_file") && e.contains("nope.avsc"), "{e}");
    let wrong = dir.path().join("wrong.avsc");
    std::fs::write(&wrong, r#"{"type": "record"}"#).unwrap();
    let e = build(&wrong).unwrap();
    assert!(e.contains("not an Avro schema"), "{e}");
    let right = dir.path().join("right.avsc");
    std::fs::write(
        &right,
        r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#,
    )
    .unwrap();
    assert_eq!(build(&right), None);
    // Message ids from the value would read it as JSON: refused.
    let e = build_with(&right, "[connectors.t.dedup]\nid = \"/id\"\n").unwrap();
    assert!(e.contains("format = \"avro\"") && e.contains("@key"), "{e}");
    assert_eq!(
        build_with(&right, "[connectors.t.dedup]\nid = \"@key\"\n"),
        None
    );
}

/// Values in the registry's wire format through the whole pipeline: each
/// decoded with its id's schema, fetched once; a value not in the wire
/// format is a dead letter; an id the registry does not know stops the
/// partition at that message, after committing those before it.
#[tokio::test]
async fn registry_values_map_with_their_ids_schemas_and_an_unknown_id_stops() {
    use crate::schemas::tests::{schema_answer, stand_in};
    let v1 = r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#;
    let v2 = r#"{"type": "record", "name": "R", "fields": [{"name": "note", "type": "string"}, {"name": "id", "type": "long"}]}"#;
    let (stand, url) = stand_in(&[(404, "{\"error_code\": 40403}")]).await;
    for (id, schema) in [(1, v1), (2, v2)] {
        stand
            .by_path
            .lock()
            .unwrap()
            .insert(format!("/schemas/ids/{id}"), (200, schema_answer(schema)));
    }
    let framed = |id: u32, schema: &str, doc: serde_json::Value| {
        let mut out = vec![0];
        out.extend(id.to_be_bytes());
        out.extend(
            idem_core::mapping::avro::AvroSchema::parse(schema)
                .unwrap()
                .encode(&doc)
                .unwrap(),
        );
        out
    };
    let mut values: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                framed(1, v1, serde_json::json!({"id": i}))
            } else {
                framed(2, v2, serde_json::json!({"id": i, "note": "n"}))
            }
        })
        .collect();
    values.push(b"{\"id\": 10}".to_vec()); // offset 10: JSON, a dead letter
    values.push(framed(1, v1, serde_json::json!({"id": 11})));
    values.push(framed(99, v1, serde_json::json!({"id": 12}))); // offset 12
    values.push(framed(1, v1, serde_json::json!({"id": 13})));

    let sink = Arc::new(MemSink::default());
    let mut conn = Arc::try_unwrap(connector(
        sink.clone(),
        vec![],
        "max_records = 100\nlinger = \"1h\"",
    ))
    .ok()
    .unwrap();
    let mut cfg = conn.cfg.clone();
    cfg.format = Format::Avro;
    cfg.registry =
        Some(toml::from_str::<idem_config::RegistryConfig>(&format!("url = \"{url}\"")).unwrap());
    let mut built = Connector::build(&conn.name, cfg).unwrap();
    built.source = Arc::new(MemSource {
        lines: values,
        stutter: false,
        follow: false,
    });
    built.sink = sink.clone();
    conn = built;
    let conn = Arc::new(conn);
    let e = run_partition(&conn).await.unwrap_err().to_string();
    assert!(
        e.contains("schema id 99 is not in the schema registry"),
        "{e}"
    );
    // Offsets 0..12 committed: 11 rows and the dead letter.
    assert_eq!(*sink.commits.lock().unwrap(), [(0, 12, 11)]);
    let s = conn.stats.snapshot();
    assert_eq!(s.positions.get("p"), Some(&12));
    // Ids 1 and 2 fetched once each, 99 once (not retried).
    let mut asked: Vec<String> = stand
        .asked
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.0.clone())
        .collect();
    asked.sort();
    assert_eq!(
        asked,
        ["/schemas/ids/1", "/schemas/ids/2", "/schemas/ids/99"]
    );
}

/// Protobuf through the registry: the schema's `.proto` text compiled
/// once per id, each value's message named by its indexes.
#[tokio::test]
async fn registry_protobuf_values_map_with_their_message() {
    use crate::schemas::tests::stand_in;
    let proto = "syntax = \"proto3\";\npackage p;\nmessage Other { string s = 1; }\nmessage Row { int64 id = 1; }\n";
    let answer = serde_json::json!({"schema": proto, "schemaType": "PROTOBUF"}).to_string();
    let (stand, url) = stand_in(&[(200, &answer)]).await;
    // [0, id 9, indexes [1] (count 1, index 1, zigzag), Row { id = i }].
    let values: Vec<Vec<u8>> = (0..20u8)
        .map(|i| vec![0, 0, 0, 0, 9, 2, 2, 0x08, i])
        .collect();
    let sink = Arc::new(MemSink::default());
    let base = connector(sink.clone(), vec![], "max_records = 100\nlinger = \"1h\"");
    let mut cfg = base.cfg.clone();
    cfg.format = Format::Protobuf;
    cfg.registry =
        Some(toml::from_str::<idem_config::RegistryConfig>(&format!("url = \"{url}\"")).unwrap());
    let mut built = Connector::build(&base.name, cfg).unwrap();
    built.source = Arc::new(MemSource {
        lines: values,
        stutter: false,
        follow: false,
    });
    built.sink = sink.clone();
    let conn = Arc::new(built);
    run_partition(&conn).await.unwrap();
    assert_eq!(*sink.commits.lock().unwrap(), [(0, 20, 20)]);
    assert_eq!(stand.asked.lock().unwrap().len(), 1);
    assert_eq!(conn.stats.snapshot().dead_lettered, 0);
}

/// A sink that stages batches, as one keeping objects open across them
/// does: durable every `roll` records, or when flushed; opening the
/// partition again (a restart) drops what was staged.
#[derive(Default)]
struct StagingSink {
    state: Mutex<Staging>,
    roll: usize,
    stage_for: Option<std::time::Duration>,
    /// The commit (counted from 1) that fails for good, as a crash would
    /// end the run; 0: none.
    fail_commit: AtomicUsize,
    commits: AtomicUsize,
    /// How long each commit takes.
    commit_time: std::time::Duration,
}

#[derive(Default)]
struct Staging {
    epoch: i64,
    /// Ids durable in the sink, in the order they became so.
    durable: Vec<i64>,
    position: Option<u64>,
    staged: Vec<i64>,
    staged_through: u64,
    flushes: usize,
}

impl Staging {
    fn make_durable(&mut self) -> u64 {
        let staged = std::mem::take(&mut self.staged);
        self.durable.extend(staged);
        self.position = Some(self.staged_through);
        self.staged_through
    }
}

#[async_trait]
impl Sink for StagingSink {
    fn info(&self) -> idem_core::SinkInfo {
        MemSink::default().info()
    }
    async fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn open(&self, _p: &PartitionRef) -> Result<Opened, SinkError> {
        let mut st = self.state.lock().unwrap();
        st.epoch += 1;
        st.staged.clear();
        st.staged_through = st.position.unwrap_or(0);
        Ok(Opened {
            epoch: st.epoch,
            next_offset: st.position,
        })
    }
    async fn commit(&self, batch: Arc<Batch>) -> Result<CommitStats, SinkError> {
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.commit_time).await;
        if n == self.fail_commit.load(Ordering::SeqCst) {
            return Err(SinkError::Permanent(Box::new(Simulated)));
        }
        let mut st = self.state.lock().unwrap();
        if batch.epoch != st.epoch {
            return Err(SinkError::Fenced {
                partition: batch.partition.to_string(),
                epoch: batch.epoch,
            });
        }
        if batch.next_offset > st.staged_through {
            st.staged.extend(
                batch
                    .records
                    .iter()
                    .filter_map(|r| match r.values.to_values()[0] {
                        idem_core::Value::BigInt(id) => Some(id),
                        _ => None,
                    }),
            );
            st.staged_through = batch.next_offset;
            if st.staged.len() >= self.roll {
                st.make_durable();
            }
        }
        Ok(CommitStats {
            written: batch.records.len() as u64,
            durable_through: Some(st.position.unwrap_or(0)),
            ..Default::default()
        })
    }
    fn stage_for(&self) -> Option<std::time::Duration> {
        self.stage_for
    }
    async fn flush_staged(&self, _p: &PartitionRef) -> Result<Option<u64>, SinkError> {
        let mut st = self.state.lock().unwrap();
        st.flushes += 1;
        Ok(Some(st.make_durable()))
    }
    async fn positions(&self, _c: &str) -> Result<Vec<StoredPosition>, SinkError> {
        Ok(vec![])
    }
    async fn describe(&self) -> Result<String, SinkError> {
        Ok("staging".into())
    }
}

/// `connector` over a [`StagingSink`], its source following (idle at the
/// end) when `follow`.
fn staging_connector(
    sink: Arc<StagingSink>,
    lines: Vec<Vec<u8>>,
    batch: &str,
    follow: bool,
) -> Arc<Connector> {
    let mut conn = connector(Arc::new(MemSink::default()), lines.clone(), batch);
    let c = Arc::get_mut(&mut conn).unwrap();
    c.sink = sink;
    c.source = Arc::new(MemSource {
        lines,
        stutter: false,
        follow,
    });
    conn
}

#[tokio::test]
async fn staged_batches_become_durable_when_the_input_ends() {
    let sink = Arc::new(StagingSink {
        roll: 1000,
        ..Default::default()
    });
    let conn = staging_connector(
        sink.clone(),
        lines(25),
        "max_records = 10\nlinger = \"1h\"",
        false,
    );
    run_partition(&conn).await.unwrap();
    let st = sink.state.lock().unwrap();
    assert_eq!(st.durable, (0..25).collect::<Vec<i64>>());
    assert_eq!((st.position, st.flushes), (Some(25), 1));
    assert_eq!(conn.stats.snapshot().positions["p"], 25);
    assert!(
        conn.stats.snapshot().staged.is_empty(),
        "nothing left staged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_batches_become_durable_after_stage_for_while_the_source_idles() {
    let sink = Arc::new(StagingSink {
        roll: 1000,
        stage_for: Some(std::time::Duration::from_millis(100)),
        ..Default::default()
    });
    let conn = staging_connector(
        sink.clone(),
        lines(25),
        "max_records = 10\nlinger = \"10ms\"",
        true,
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(conn.clone().run_partition("p", stop.clone()));
    let started = std::time::Instant::now();
    while sink.state.lock().unwrap().position != Some(25) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "never flushed"
        );
        // Nothing is reported durable before the sink holds it.
        let reported = conn.stats.snapshot().positions.get("p").copied();
        assert!(reported.unwrap_or(0) <= sink.state.lock().unwrap().position.unwrap_or(0));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Flushed while the source was still open, by time alone.
    assert!(!running.is_finished());
    assert_eq!(sink.state.lock().unwrap().flushes, 1);
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(conn.stats.snapshot().positions["p"], 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_batches_become_durable_after_stage_for_while_the_source_keeps_sending() {
    // 300 commits of 2 ms while the reader always has the next batch
    // ready: staged effects still roll every 20 ms, not only at the end.
    let sink = Arc::new(StagingSink {
        roll: usize::MAX,
        stage_for: Some(std::time::Duration::from_millis(20)),
        commit_time: std::time::Duration::from_millis(2),
        ..Default::default()
    });
    let conn = staging_connector(
        sink.clone(),
        lines(3000),
        "max_records = 10\nlinger = \"1h\"",
        false,
    );
    run_partition(&conn).await.unwrap();
    let st = sink.state.lock().unwrap();
    assert_eq!(st.durable, (0..3000).collect::<Vec<i64>>());
    assert!(st.flushes >= 5, "flushed {} times", st.flushes);
}

/// A connector that drops copies by `/id` with the in-memory dedup store
/// `store`, over `sink`.
fn deduplicating(
    sink: Arc<StagingSink>,
    lines: Vec<Vec<u8>>,
    store: Arc<dyn idem_dedup_store::DedupStore>,
) -> Arc<Connector> {
    let mut conn = staging_connector(sink, lines, "max_records = 5\nlinger = \"1h\"", false);
    let c = Arc::get_mut(&mut conn).unwrap();
    c.dedup = Some(crate::dedup::Stage {
        store: Arc::new(crate::dedup::LazyStore::holding("t", store)),
        on_loss: idem_config::OnLoss::Fail,
        connector: "t".into(),
    });
    c.ids = Some(crate::dedup::Ids::new(
        "t",
        idem_config::IdSource::Pointer("/id".into()),
    ));
    conn
}

#[tokio::test]
async fn ids_of_staged_batches_are_confirmed_only_once_durable_so_a_crash_loses_none() {
    // Ids 0..20, then copies of 15..20 (staged when they come), then 20..30.
    let ids: Vec<i64> = (0..20).chain(15..20).chain(20..30).collect();
    let input: Vec<Vec<u8>> = ids
        .iter()
        .map(|i| format!("{{\"id\":{i}}}").into_bytes())
        .collect();
    let store: Arc<dyn idem_dedup_store::DedupStore> = Arc::new(
        idem_dedup_store::MemoryDedupStore::new(std::time::Duration::from_secs(600)),
    );
    // Durable every 15 records; the 6th commit fails for good, with
    // [15, 25) staged: the run ends there as a crash would.
    let sink = Arc::new(StagingSink {
        roll: 15,
        fail_commit: AtomicUsize::new(6),
        ..Default::default()
    });
    let first = deduplicating(sink.clone(), input.clone(), store.clone());
    assert!(run_partition(&first).await.is_err());
    assert_eq!(sink.state.lock().unwrap().position, Some(15));
    // Nothing past the durable position was reported or acknowledged;
    // what was written past it is shown as such.
    assert_eq!(first.stats.snapshot().positions["p"], 15);
    assert_eq!(first.stats.snapshot().staged.get("p"), Some(&25));
    // The restart reads again from 15: every id once.
    let second = deduplicating(sink.clone(), input, store);
    run_partition(&second).await.unwrap();
    let mut durable = sink.state.lock().unwrap().durable.clone();
    durable.sort_unstable();
    assert_eq!(durable, (0..30).collect::<Vec<i64>>());
}

/// Partitions named in `parts`, each with its own lines; those marked
/// follow wait for more at their end instead of finishing.
struct PartsSource {
    parts: Vec<(&'static str, usize, bool)>,
}

#[async_trait]
impl Source for PartsSource {
    fn name(&self) -> &str {
        "parts"
    }
    async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError> {
        let names = self.parts.iter().map(|(p, ..)| p.to_string()).collect();
        Ok(Some(Assignment::Assigned(names)))
    }
    async fn open(
        &self,
        partition: &str,
        start: Option<u64>,
    ) -> Result<Box<dyn PartitionReader>, SourceError> {
        let (n, follow) = self
            .parts
            .iter()
            .find(|(p, ..)| *p == partition)
            .map_or((0, false), |(_, n, f)| (*n, *f));
        Ok(Box::new(MemReader {
            lines: lines(n),
            at: start.unwrap_or(0) as usize,
            stutter: false,
            follow,
        }))
    }
}

fn with_parts(sink: Arc<MemSink>, parts: Vec<(&'static str, usize, bool)>) -> Arc<Connector> {
    let mut conn = connector(sink, vec![], "max_records = 10\nlinger = \"1h\"");
    Arc::get_mut(&mut conn).unwrap().source = Arc::new(PartsSource { parts });
    conn
}

fn start(
    conn: &Arc<Connector>,
    partition: &'static str,
) -> tokio::task::JoinHandle<Result<PartitionEnd, RunError>> {
    tokio::spawn(
        conn.clone()
            .run_partition(partition, CancellationToken::new()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connectors_partitions_together_hold_no_more_than_its_budget() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sink = Arc::new(MemSink {
        gate: Some(gate.clone()),
        ..Default::default()
    });
    let parts = ["a", "b", "c"];
    let conn = with_parts(sink.clone(), parts.map(|p| (p, 100, false)).to_vec());
    let runs = parts.map(|p| start(&conn, p));
    // Every commit waits at the gate while the readers read what they may.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let read = conn.stats.snapshot().read;
    // Three batches of 10 and a quarter, and a chunk of 2 per partition
    // waiting for its share: not two batches or more per partition.
    assert!(
        (10..=39).contains(&read),
        "{read} lines read by three partitions whose commits are blocked"
    );
    gate.add_permits(100_000);
    for run in runs {
        run.await.unwrap().unwrap();
    }
    let commits = sink.commits.lock().unwrap();
    assert_eq!(commits.iter().map(|c| c.2).sum::<usize>(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_for_the_allowance_makes_lingering_batches_commit() {
    let sink = Arc::new(MemSink::default());
    // `b`, `c` and `d` never fill a batch and wait for more: with a
    // linger of an hour they would hold 27 of the 33 messages the
    // connector may hold, and `a` could never fill one.
    let conn = with_parts(
        sink.clone(),
        vec![
            ("a", 100, false),
            ("b", 9, true),
            ("c", 9, true),
            ("d", 9, true),
        ],
    );
    let (b, c, d) = (start(&conn, "b"), start(&conn, "c"), start(&conn, "d"));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        sink.commits.lock().unwrap().is_empty(),
        "no batch is full yet"
    );
    let a = tokio::time::timeout(std::time::Duration::from_secs(10), start(&conn, "a"));
    a.await
        .expect("a's reader was let through")
        .unwrap()
        .unwrap();
    let commits = sink.commits.lock().unwrap();
    assert_eq!(commits.iter().map(|c| c.2).sum::<usize>(), 127);
    drop(commits);
    b.abort();
    c.abort();
    d.abort();
}
