//! Poison messages dead-lettered with their positions, to a file and to a
//! topic.

use super::support::*;
use idem_testkit::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_positions() {
    let topic = fresh_topic("idem_poison", 2).await;
    let producer: FutureProducer = client_config().create().unwrap();
    let big = format!(r#"{{"id":9,"v":90,"pad":"{}"}}"#, "x".repeat(2000));
    let sends: [(i32, Option<&[u8]>); 7] = [
        (0, Some(br#"{"id":1,"v":10}"#)),
        (0, Some(b"not json")),
        (0, Some(br#"{"id":2,"v":20}"#)),
        (1, Some(&[0xff, 0xfe, 0x00])),
        (1, Some(big.as_bytes())),
        (1, None),
        (1, Some(br#"{"id":3,"v":30}"#)),
    ];
    for (partition, value) in sends {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).partition(partition);
        if let Some(v) = value {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_poison");
    let w = Workdir::new();
    let dead = w.path("dead.jsonl");
    let cfg = w.write(
        "k.toml",
        &Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .source("max_message_bytes = 1000")
            .connector(&format!("dead_letter = \"{}\"", dead.display()))
            .toml(),
    );
    run_ok(idem().arg("run").arg(&cfg));

    let ids: Vec<i64> = pg()
        .await
        .query(
            &format!("SELECT id FROM \"{schema}\".events ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    let letters: Vec<(String, u64, String)> = std::fs::read_to_string(&dead)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["partition"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let at = |p: i32, o: u64| {
        letters
            .iter()
            .find(|(lp, lo, _)| *lp == format!("{topic}/{p}") && *lo == o)
            .map(|l| l.2.clone())
            .unwrap_or_else(|| panic!("no dead letter for {p}/{o} in {letters:?}"))
    };
    assert!(at(0, 1).contains("not valid JSON"));
    assert!(at(1, 0).contains("not valid JSON"));
    assert!(at(1, 1).contains("larger than max_message_bytes"));
    assert!(at(1, 2).contains("tombstone"));
    assert_eq!(letters.len(), 4, "{letters:?}");
    // The partitions kept moving past their poison.
    assert_eq!(positions(&schema).await, end_offsets(&topic, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_to_a_topic_carry_position_reason_and_class() {
    use rdkafka::message::{Headers, Message};
    let topic = fresh_topic("idem_dlq_src", 1).await;
    let dlq = fresh_topic("idem_dlq", 1).await;
    let producer: FutureProducer = client_config().create().unwrap();
    for value in [
        &br#"{"id":1,"v":10}"#[..],
        b"not json",
        br#"{"id":2,"v":"twenty"}"#,
        br#"{"id":3,"v":30}"#,
    ] {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(&topic).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let schema = fresh_schema("kafka_dlq");
    let w = Workdir::new();
    let cfg = w.write(
        "k.toml",
        &(Conf::new(&topic, &schema)
            .source("stop_at_end = true")
            .toml()
            + &format!(
                "[connectors.k.dead_letters]\ndestination = \"topic\"\ntopic = \"{dlq}\"\n"
            )),
    );
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(count(&schema).await, (2, 2));

    let consumer: BaseConsumer = client_config()
        .set("group.id", format!("{dlq}_reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        got.push((
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            m.payload().unwrap_or_default().to_vec(),
            header("idem.offset"),
            header("idem.error_class"),
            header("idem.reason"),
            header("idem.connector"),
        ));
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, format!("{topic}/0@1"));
    assert_eq!(got[0].1, b"not json");
    assert_eq!((got[0].2.as_str(), got[0].3.as_str()), ("1", "mapping"));
    assert!(got[0].4.contains("not valid JSON"), "{got:?}");
    assert_eq!(got[0].5, "k");
    assert_eq!(got[1].0, format!("{topic}/0@2"));
    assert!(got[1].4.contains("v"), "{got:?}");
}
