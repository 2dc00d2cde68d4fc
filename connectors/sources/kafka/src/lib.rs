//! Idem source: Kafka topics through a consumer group. Kafka's group
//! protocol spreads partitions over runners; each partition starts where
//! the sink says, and the sink's epochs fence a runner that lost it.

//!
//! - `config.rs`: the `[connectors.NAME.source]` section;
//! - `source.rs`: the source: subscribe or assign, open partitions at the
//!   sink's positions, acks, audits, lag;
//! - `consumer.rs`: librdkafka's side: rebalances, the polling task;
//! - `reader.rs`: one partition's reader.

mod config;
mod consumer;
mod reader;
mod source;

pub use config::{KafkaSourceConfig, OutOfRange, StartAt};
pub use consumer::partition_name;
pub use source::KafkaSource;

/// The `kafka` source's registry entry.
pub struct KafkaKind;

impl idem_core::registry::SourceKind for KafkaKind {
    const NAME: &'static str = "kafka";
    type Config = KafkaSourceConfig;

    fn build(cfg: &KafkaSourceConfig) -> std::sync::Arc<dyn idem_core::Source> {
        std::sync::Arc::new(KafkaSource::new(cfg.clone()))
    }

    /// Even with `stop_at_end` it runs as a service would: the run ends
    /// when the source reports every partition read, not by assignment.
    fn is_bounded(_cfg: &KafkaSourceConfig) -> bool {
        false
    }

    /// The connection settings a producer to the same brokers needs.
    fn kafka(cfg: &KafkaSourceConfig) -> Option<idem_core::registry::KafkaTarget> {
        Some(idem_core::registry::KafkaTarget {
            brokers: cfg.brokers.clone(),
            properties: cfg
                .properties
                .iter()
                .filter(|(key, _)| {
                    key.starts_with("security.")
                        || key.starts_with("sasl.")
                        || key.starts_with("ssl.")
                })
                .map(|(key, v)| (key.clone(), v.expose().to_string()))
                .collect(),
            topics: cfg.topics.clone(),
        })
    }
}
