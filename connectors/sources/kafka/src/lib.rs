//! Idem source: Kafka topics through a consumer group. Kafka's group
//! protocol spreads partitions over runners; each partition starts where
//! the sink says, and the sink's epochs fence a runner that lost it.

mod config;
mod source;

pub use config::{KafkaSourceConfig, OutOfRange, StartAt};
pub use source::{partition_name, KafkaSource};

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
        })
    }
}
