//! The Kafka source used directly, without a runner: a partition opened
//! again while the consumer's fetch for its earlier reader runs ahead.

use super::support::*;
use idem_core::{Assignment, Message, PartitionReader, ReadStatus, Source};
use idem_source_kafka::{KafkaSource, KafkaSourceConfig};
use std::time::{Duration, Instant};

/// Read until `out` holds `n` messages (or the partition ends).
async fn read_at_least(reader: &mut Box<dyn PartitionReader>, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    let started = Instant::now();
    while out.len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} of {n} messages read in 30 s",
            out.len()
        );
        if reader.read(500, &mut out).await.unwrap() == ReadStatus::End {
            break;
        }
    }
    out
}

/// A source reading `topic` in a group of its own, once the group has
/// assigned it every partition; and the name of partition 0.
async fn assigned_source(topic: &str) -> (KafkaSource, String) {
    let cfg: KafkaSourceConfig = serde_json::from_value(serde_json::json!({
        "brokers": BROKERS,
        "topics": [topic],
        "group_id": format!("{topic}_group"),
    }))
    .unwrap();
    let source = KafkaSource::new(cfg);
    let partition = format!("{topic}/0");
    let assigned = tokio::time::timeout(Duration::from_secs(30), source.next_assignment())
        .await
        .expect("no assignment within 30 s")
        .unwrap();
    assert!(
        matches!(&assigned, Some(Assignment::Assigned(p)) if p.contains(&partition)),
        "{assigned:?}"
    );
    (source, partition)
}

/// The runner drops a partition's reader and opens it again (the group
/// took it away and gave it back) while the consumer still fetches for the
/// old reader, far ahead. Whatever that fetch brings before the new
/// reader's seek must not reach the new reader: its first message is the
/// one it was opened at, or every message in between is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_partition_starts_where_it_was_opened_not_where_the_old_fetch_was() {
    let topic = fresh_topic("idem_reopen", 1).await;
    produce(&topic, 0..60_000).await;
    let (source, partition) = assigned_source(&topic).await;
    let mut start = 0;
    for round in 0..8 {
        let mut reader = source.open(&partition, Some(start)).await.unwrap();
        let read = read_at_least(&mut reader, 5_000).await;
        assert_eq!(read[0].offset, start, "round {round}: first message");
        // Dropped while its fetch runs, then opened again further back.
        drop(reader);
        start = read[read.len() / 2].offset;
        let mut again = source.open(&partition, Some(start)).await.unwrap();
        let first = read_at_least(&mut again, 1).await;
        assert_eq!(
            first[0].offset, start,
            "round {round}: the reopened reader skipped {}..{}",
            start, first[0].offset
        );
        start = first[0].offset + 1;
    }
}

/// A reader whose position holds no message (a transaction's commit
/// marker: where a sink's position stands after a transaction) on an idle
/// partition: the seek's first message is the one after the marker. It
/// must reach the reader, though the consumer's poll that brings it may
/// have begun before the seek returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_opened_at_a_transaction_marker_on_an_idle_partition_gets_the_next_message() {
    let topic = fresh_topic("idem_marker", 3).await;
    let t = topic.clone();
    // Two transactions of 10 events per partition: on each partition,
    // offsets 0-9, a commit marker at 10, 11-20, a marker at 21.
    tokio::task::spawn_blocking(move || produce_transactions(&t, 0..2, 30, |_| false))
        .await
        .unwrap();
    let (source, partition) = assigned_source(&topic).await;
    for round in 0..4 {
        let mut reader = source.open(&partition, Some(10)).await.unwrap();
        let read = read_at_least(&mut reader, 10).await;
        let offsets: Vec<u64> = read.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, (11..21).collect::<Vec<_>>(), "round {round}");
    }
}
