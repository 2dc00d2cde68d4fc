//! Dead letters: messages that could not be decoded, mapped or delivered,
//! with their position, the reason, its class and the raw bytes. Written
//! (and durable) before the batch that skips them commits, so a committed
//! position never hides a lost message. A crash between the two can repeat a
//! dead letter; its position tells the copies apart (the table destination
//! keeps one row per position).
//!
//! Destinations: a JSON lines file (default), a table in the sink's
//! PostgreSQL database, or a topic on the source's Kafka brokers.

use base64::Engine;
use idem_core::{Message, PartitionRef};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why a message is a dead letter, for grouping and alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Larger than the source's limit, or unreadable.
    Poison,
    /// Not JSON, or a field missing or of the wrong type for its column.
    Mapping,
    /// No message id where `[dedup] id` says.
    MessageId,
    /// The destination refused it for good (an HTTP 4xx).
    Refused,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Poison => "poison",
            ErrorClass::Mapping => "mapping",
            ErrorClass::MessageId => "message_id",
            ErrorClass::Refused => "refused",
        }
    }
}

/// A reason as stored with a dead letter: secrets (a URL's password in an
/// error) hidden, like every output.
fn redact(reason: String) -> String {
    match idem_config::redact::text(&reason) {
        std::borrow::Cow::Borrowed(_) => reason,
        std::borrow::Cow::Owned(shown) => shown,
    }
}

/// A message that goes to the dead letters.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub offset: u64,
    pub class: ErrorClass,
    pub reason: String,
    pub raw: Option<Vec<u8>>,
}

impl DeadLetter {
    pub fn new(msg: &Message, class: ErrorClass, reason: String) -> Self {
        DeadLetter {
            offset: msg.offset,
            class,
            reason: redact(reason),
            raw: msg.value.clone(),
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    connector: &'a str,
    source: &'a str,
    partition: &'a str,
    offset: u64,
    reason: &'a str,
    error_class: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_base64: Option<String>,
    at: String,
}

/// Appends dead letters to one file.
pub struct DeadLetterFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl DeadLetterFile {
    /// The file is created on the first dead letter, not before.
    pub fn new(path: PathBuf) -> Self {
        DeadLetterFile {
            path,
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append and fsync `letters` of `partition`.
    pub fn write(&self, partition: &PartitionRef, letters: &[DeadLetter]) -> std::io::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut buf = Vec::new();
        for dl in letters {
            let text = dl.raw.as_deref().map(std::str::from_utf8);
            let line = Line {
                connector: &partition.connector,
                source: &partition.source,
                partition: &partition.partition,
                offset: dl.offset,
                reason: &dl.reason,
                error_class: dl.class.as_str(),
                raw: text.and_then(Result::ok),
                raw_base64: match (&dl.raw, text) {
                    (Some(bytes), Some(Err(_))) => {
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                    _ => None,
                },
                at: at.clone(),
            };
            serde_json::to_writer(&mut buf, &line)?;
            buf.push(b'\n');
        }
        let mut guard = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("dead-letter lock poisoned"))?;
        if guard.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            use std::os::unix::fs::OpenOptionsExt;
            // Dead letters hold raw payloads: readable by their owner only.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .mode(0o600)
                .open(&self.path)?;
            let cut = cut_partial_record(&file)?;
            if cut > 0 {
                tracing::warn!(path = %self.path.display(), bytes = cut, "the dead-letter file ended in a partial record (an earlier crash or a full disk); removed it");
            }
            *guard = Some(file);
        }
        let file = guard
            .as_mut()
            .ok_or_else(|| std::io::Error::other("dead-letter file not open"))?;
        let before = file.metadata()?.len();
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            // A full disk (or any failure) part-way: cut back to the last
            // whole record, so the retry appends whole lines after it.
            let _ = file.set_len(before);
            return Err(e);
        }
        Ok(())
    }
}

/// Truncate `file` after its last newline; returns the bytes removed. A
/// crash or ENOSPC in the middle of an append leaves such a tail.
fn cut_partial_record(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
            }
            return Ok(len - keep);
        }
        end = start;
    }
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(len)
}

/// A dead-letter write that failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[error("cannot write dead letters to {to}: {message}")]
pub struct DeadLetterError {
    pub to: String,
    pub message: String,
    pub retriable: bool,
}

impl crate::retry::Retriable for DeadLetterError {
    fn is_retriable(&self) -> bool {
        self.retriable
    }
}

/// Rows in `schema.table` of the sink's PostgreSQL database, one per
/// position: a repeated dead letter changes nothing.
pub struct DeadLetterTable {
    url: idem_config::Secret,
    table: String,
    shown: String,
    pool: tokio::sync::OnceCell<deadpool_postgres::Pool>,
}

/// Messages on a Kafka topic: key `partition@offset`, the raw bytes as
/// value, the rest in `idem.*` headers.
pub struct DeadLetterTopic {
    brokers: String,
    topic: String,
    producer: std::sync::OnceLock<Result<rdkafka::producer::FutureProducer, String>>,
    /// Security settings of the source, reused by the producer.
    properties: Vec<(String, String)>,
}

/// Where a connector's dead letters go.
pub enum DeadLetters {
    File(DeadLetterFile),
    Table(DeadLetterTable),
    Topic(DeadLetterTopic),
}

impl DeadLetters {
    /// From the connector's config, without I/O.
    pub fn build(
        name: &str,
        cfg: &crate::registry::ConnectorConfig,
    ) -> Result<DeadLetters, String> {
        use idem_config::DeadLetterDestination as D;
        let dl = &cfg.dead_letters;
        Ok(match dl.destination {
            D::File => DeadLetters::File(DeadLetterFile::new(
                dl.path
                    .clone()
                    .or_else(|| cfg.dead_letter.clone())
                    .unwrap_or_else(|| format!("{name}.deadletter.jsonl"))
                    .into(),
            )),
            D::Table => {
                let Some(pg) = cfg.sink.postgres() else {
                    return Err(format!(
                        "dead_letters.destination = \"table\" writes into the sink's PostgreSQL database, but this connector's sink is {}; use \"file\"",
                        cfg.sink.kind()
                    ));
                };
                let table = dl
                    .table
                    .clone()
                    .unwrap_or_else(|| idem_config::default_dead_letter_table(name));
                DeadLetters::Table(DeadLetterTable {
                    url: pg.url,
                    shown: format!("table {}.{table}", pg.schema),
                    table: format!(
                        "{}.{}",
                        idem_core::table::sql::q(&pg.schema),
                        idem_core::table::sql::q(&table)
                    ),
                    pool: tokio::sync::OnceCell::new(),
                })
            }
            D::Topic => {
                let Some(k) = cfg.source.kafka() else {
                    return Err("dead_letters.destination = \"topic\" writes to the source's Kafka brokers, but this connector's source is not Kafka; use \"file\"".into());
                };
                DeadLetters::Topic(DeadLetterTopic {
                    brokers: k.brokers,
                    topic: dl
                        .topic
                        .clone()
                        .unwrap_or_else(|| format!("{name}.dead-letters")),
                    producer: std::sync::OnceLock::new(),
                    properties: k.properties,
                })
            }
        })
    }

    /// Where they go, for logs and the summary.
    pub fn describe(&self) -> String {
        match self {
            DeadLetters::File(f) => f.path.display().to_string(),
            DeadLetters::Table(t) => t.shown.clone(),
            DeadLetters::Topic(t) => format!("topic {} on {}", t.topic, t.brokers),
        }
    }

    /// Make `letters` of `partition` durable.
    pub async fn write(
        &self,
        partition: &PartitionRef,
        letters: &[DeadLetter],
    ) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let fail = |message: String, retriable: bool| DeadLetterError {
            to: self.describe(),
            message,
            retriable,
        };
        match self {
            // One small fsync'd append: not worth a blocking thread.
            DeadLetters::File(f) => f
                .write(partition, letters)
                .map_err(|e| fail(e.to_string(), false)),
            DeadLetters::Table(t) => t.write(partition, letters).await.map_err(|e| fail(e, true)),
            DeadLetters::Topic(t) => t.write(partition, letters).await.map_err(|e| fail(e, true)),
        }
    }
}

#[async_trait::async_trait]
impl idem_core::Rejects for DeadLetters {
    async fn reject(
        &self,
        partition: &PartitionRef,
        offset: u64,
        reason: String,
        raw: Vec<u8>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let letter = DeadLetter {
            offset,
            class: ErrorClass::Refused,
            reason: redact(reason),
            raw: Some(raw),
        };
        Ok(self.write(partition, &[letter]).await?)
    }
}

impl DeadLetterTable {
    async fn write(&self, p: &PartitionRef, letters: &[DeadLetter]) -> Result<(), String> {
        let pool = self
            .pool
            .get_or_try_init(|| async {
                let (pool, _) = idem_postgres::pool_for(self.url.expose(), 2)?;
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {} (
                            connector text NOT NULL,
                            source text NOT NULL,
                            partition text NOT NULL,
                            \"offset\" bigint NOT NULL,
                            error_class text NOT NULL,
                            reason text NOT NULL,
                            raw bytea,
                            at timestamptz NOT NULL DEFAULT now(),
                            PRIMARY KEY (connector, partition, \"offset\"))",
                        self.table
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(pool)
            })
            .await?;
        let client = pool.get().await.map_err(|e| e.to_string())?;
        // One statement, so no transaction is ever left open between two
        // round trips: a runner frozen there would hold the rows' key
        // locks, and the partition's next owner, writing the same dead
        // letters, would wait for it.
        let mut offsets = Vec::with_capacity(letters.len());
        let (mut classes, mut reasons, mut raws) = (Vec::new(), Vec::new(), Vec::new());
        for dl in letters {
            offsets.push(i64::try_from(dl.offset).unwrap_or(i64::MAX));
            classes.push(dl.class.as_str());
            reasons.push(dl.reason.as_str());
            raws.push(dl.raw.as_deref());
        }
        client
            .execute(
                &format!(
                    "INSERT INTO {} (connector, source, partition, \"offset\", error_class, reason, raw)
                     SELECT $1, $2, $3, o, c, r, w
                     FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bytea[]) AS u(o, c, r, w)
                     ON CONFLICT DO NOTHING",
                    self.table
                ),
                &[
                    &&*p.connector,
                    &&*p.source,
                    &&*p.partition,
                    &offsets,
                    &classes,
                    &reasons,
                    &raws,
                ],
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl DeadLetterTopic {
    async fn write(&self, p: &PartitionRef, letters: &[DeadLetter]) -> Result<(), String> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let producer = self
            .producer
            .get_or_init(|| {
                let mut c = rdkafka::ClientConfig::new();
                c.set("bootstrap.servers", &self.brokers)
                    .set("enable.idempotence", "true")
                    .set("message.timeout.ms", "30000");
                for (k, v) in &self.properties {
                    c.set(k, v);
                }
                c.create().map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let mut sends = Vec::with_capacity(letters.len());
        for dl in letters {
            let key = format!("{}@{}", p.partition, dl.offset);
            let offset = dl.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "idem.connector",
                    value: Some(&*p.connector),
                })
                .insert(Header {
                    key: "idem.partition",
                    value: Some(&*p.partition),
                })
                .insert(Header {
                    key: "idem.offset",
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: "idem.error_class",
                    value: Some(dl.class.as_str()),
                })
                .insert(Header {
                    key: "idem.reason",
                    value: Some(dl.reason.as_str()),
                });
            let mut record = FutureRecord::<String, Vec<u8>>::to(&self.topic)
                .key(&key)
                .headers(headers);
            if let Some(raw) = &dl.raw {
                record = record.payload(raw);
            }
            // Queued (copied) now; the delivery reports come back below.
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| e.to_string())?;
            sends.push(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer was dropped".to_string()),
                }
            });
        }
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_position_reason_and_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = DeadLetterFile::new(dir.path().join("sub/dl.jsonl"));
        let p = PartitionRef::new("c", "file", "/x.jsonl");
        f.write(
            &p,
            &[
                DeadLetter {
                    offset: 10,
                    class: ErrorClass::Mapping,
                    reason: "bad".into(),
                    raw: Some(b"{oops".to_vec()),
                },
                DeadLetter {
                    offset: 20,
                    class: ErrorClass::Poison,
                    reason: "utf8".into(),
                    raw: Some(vec![0xff, 0x00]),
                },
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(f.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["offset"], 10);
        assert_eq!(lines[0]["partition"], "/x.jsonl");
        assert_eq!(lines[0]["reason"], "bad");
        assert_eq!(lines[0]["error_class"], "mapping");
        assert_eq!(lines[0]["raw"], "{oops");
        assert_eq!(lines[1]["raw_base64"], "/wA=");
        assert!(lines[1].get("raw").is_none());
    }

    #[test]
    fn a_partial_record_left_by_a_crash_is_cut_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl.jsonl");
        // One whole record, then half of one (a crash mid-append).
        std::fs::write(&path, "{\"offset\":1}\n{\"connector\":\"c\",\"par").unwrap();
        let f = DeadLetterFile::new(path.clone());
        let p = PartitionRef::new("c", "file", "/x.jsonl");
        let letter = DeadLetter {
            offset: 7,
            class: ErrorClass::Mapping,
            reason: "bad".into(),
            raw: Some(b"{oops".to_vec()),
        };
        f.write(&p, &[letter]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let offsets: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(offsets, [1, 7], "{text}");
        // Only a partial record: the file is emptied before appending.
        let lone = dir.path().join("lone.jsonl");
        std::fs::write(&lone, "{\"con").unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&lone)
            .unwrap();
        assert_eq!(cut_partial_record(&file).unwrap(), 5);
        assert_eq!(std::fs::metadata(&lone).unwrap().len(), 0);
        // A new file holds raw payloads: owner only.
        let fresh = dir.path().join("new.jsonl");
        DeadLetterFile::new(fresh.clone())
            .write(
                &p,
                &[DeadLetter {
                    offset: 1,
                    class: ErrorClass::Poison,
                    reason: "x".into(),
                    raw: None,
                }],
            )
            .unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
