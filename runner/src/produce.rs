//! `idem produce`: the generated events of `idem generate`, written to a
//! Kafka topic with the idempotent producer, keyed by event id (so a
//! repeated id lands in the same partition at a later offset, as a
//! producer retry would put it). For tests, benchmarks and demos. With
//! `--format avro`, each event is one Avro value of the given schema.

use crate::generate::{generate, GenerateOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::io::Write;
use std::time::{Duration, Instant};

pub struct ProduceOptions {
    pub brokers: String,
    pub topic: String,
    /// Create the topic with this many partitions when it does not exist.
    pub partitions: Option<i32>,
    /// Write each event as one Avro value of this schema instead of JSON.
    pub avro: Option<idem_core::mapping::avro::AvroSchema>,
    pub events: GenerateOptions,
}

/// What a malformed event (one of `generate::MALFORMED`) becomes in
/// Avro: one byte that starts no value
/// of a record whose first field is not null (an unfinished varint, or
/// no boolean), so it is a dead letter as a malformed JSON line is.
const MALFORMED_AVRO: &[u8] = &[0xff];

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("Kafka at {brokers}: {what}: {source}")]
    Kafka {
        brokers: String,
        what: &'static str,
        source: KafkaError,
    },
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("event {line}: not a value of the Avro schema: {message}")]
    Avro { line: String, message: String },
    #[error("{undelivered} of {sent} messages were not acknowledged by {brokers} within 60s")]
    Undelivered {
        brokers: String,
        sent: u64,
        undelivered: i32,
    },
}

/// Lines in, records out: each complete line becomes one message.
struct Sink<'a> {
    producer: &'a ThreadedProducer<DefaultProducerContext>,
    opts: &'a ProduceOptions,
    line: Vec<u8>,
    sent: u64,
    failed: Option<ProduceError>,
}

/// The event id of a generated line, its key; malformed lines have none.
fn event_id(line: &[u8]) -> Option<&[u8]> {
    const FIELD: &[u8] = b"\"event_id\":\"";
    let start = line.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let len = line[start..].iter().position(|b| *b == b'"')?;
    Some(&line[start..start + len])
}

impl Sink<'_> {
    fn send(&mut self) -> std::io::Result<()> {
        let line = std::mem::take(&mut self.line);
        let encoded;
        let payload: &[u8] = match &self.opts.avro {
            None => &line,
            Some(_)
                if crate::generate::MALFORMED
                    .iter()
                    .any(|m| m.as_bytes() == line) =>
            {
                MALFORMED_AVRO
            }
            Some(schema) => match serde_json::from_slice::<serde_json::Value>(&line) {
                Err(e) => {
                    self.failed = Some(ProduceError::Avro {
                        line: String::from_utf8_lossy(&line).into_owned(),
                        message: e.to_string(),
                    });
                    return Err(std::io::Error::other("encode failed"));
                }
                Ok(doc) => {
                    // An event the schema cannot hold is the schema's
                    // mistake, not a malformed event: stop.
                    encoded = schema.encode(&doc).map_err(|message| {
                        self.failed = Some(ProduceError::Avro {
                            line: String::from_utf8_lossy(&line).into_owned(),
                            message,
                        });
                        std::io::Error::other("encode failed")
                    })?;
                    &encoded
                }
            },
        };
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.opts.topic).payload(payload);
        if let Some(key) = event_id(&line) {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                // The local queue is full: let deliveries drain, then retry.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    self.failed = Some(ProduceError::Kafka {
                        brokers: self.opts.brokers.clone(),
                        what: "send",
                        source: e,
                    });
                    return Err(std::io::Error::other("send failed"));
                }
            }
        }
        self.sent += 1;
        Ok(())
    }
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.send()?;
            } else {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Returns (messages written, distinct event ids, elapsed).
pub async fn produce(opts: &ProduceOptions) -> Result<(u64, u64, Duration), ProduceError> {
    let kafka = |what: &'static str| {
        let brokers = opts.brokers.clone();
        move |source| ProduceError::Kafka {
            brokers,
            what,
            source,
        }
    };
    if let Some(partitions) = opts.partitions {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &opts.brokers)
            .create()
            .map_err(kafka("connect"))?;
        let created = admin
            .create_topics(
                &[NewTopic::new(
                    &opts.topic,
                    partitions,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka("create the topic"))?;
        for r in created {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(ProduceError::Topic {
                        topic,
                        message: code.to_string(),
                    })
                }
            }
        }
    }
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &opts.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("compression.type", "none")
        .create()
        .map_err(kafka("create the producer"))?;
    let started = Instant::now();
    let mut sink = Sink {
        producer: &producer,
        opts,
        line: Vec::new(),
        sent: 0,
        failed: None,
    };
    let result = tokio::task::block_in_place(|| generate(&mut sink, &opts.events));
    if let Some(e) = sink.failed.take() {
        return Err(e);
    }
    let (_, distinct) = result.map_err(|e| ProduceError::Topic {
        topic: opts.topic.clone(),
        message: e.to_string(),
    })?;
    let sent = sink.sent;
    tokio::task::block_in_place(|| producer.flush(Duration::from_secs(60)))
        .map_err(kafka("flush"))?;
    let undelivered = producer.in_flight_count();
    if undelivered > 0 {
        return Err(ProduceError::Undelivered {
            brokers: opts.brokers.clone(),
            sent,
            undelivered,
        });
    }
    Ok((sent, distinct, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_event_ids() {
        assert_eq!(
            event_id(br#"{"event_id":"evt-0000000007","user_id":1}"#),
            Some(&b"evt-0000000007"[..])
        );
        assert_eq!(event_id(b"this is not json"), None);
    }
}
