//! Idem source: Kafka topics through a consumer group. Kafka's group
//! protocol spreads partitions over runners; each partition starts where
//! the sink says, and the sink's epochs fence a runner that lost it.

mod config;
mod source;

pub use config::{KafkaSourceConfig, OutOfRange, StartAt};
pub use source::{partition_name, KafkaSource};
