use idem_config::{ColumnConfig, Invalid, Validate};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Where to start a partition the sink has never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    #[default]
    Earliest,
    Latest,
}

/// What to do when the sink's position for a partition is no longer in
/// the topic: retention deleted it, or the topic was deleted and made
/// anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutOfRange {
    /// Stop with an error naming the partition, the position and the
    /// topic's range: an operator decides.
    #[default]
    Fail,
    /// Go on from the oldest message still in the partition.
    Earliest,
    /// Go on from the partition's end.
    Latest,
}

/// `[connectors.NAME.source]` with `type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic names; a name starting with `^` is a regular expression.
    pub topics: Vec<String>,
    /// The consumer group shared by every runner of this connector.
    pub group_id: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Start of a partition the sink holds no position for.
    #[serde(default)]
    pub start: StartAt,
    /// When the sink's position is outside the partition's range.
    #[serde(default)]
    pub out_of_range: OutOfRange,
    /// Read each partition up to its end as of when it was opened, then
    /// finish (`idem run` exits 0): a backfill, or a test. Meant for one
    /// runner; a group keeps reading without it.
    #[serde(default)]
    pub stop_at_end: bool,
    /// Larger values go to the dead letters instead of being parsed.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Further librdkafka settings, passed through: `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password = "${PASSWORD}"`,
    /// `ssl.ca.location`, `isolation.level`, ...
    #[serde(default)]
    pub properties: BTreeMap<String, idem_config::Secret>,
}

fn default_client_id() -> String {
    "idem".into()
}

fn default_max_message_bytes() -> usize {
    1024 * 1024
}

/// Settings Idem owns: positions live in the sink, so the consumer never
/// stores or commits offsets by itself.
pub const OWNED: [&str; 4] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

impl Validate for KafkaSourceConfig {
    fn validate(&self, _columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if self.brokers.trim().is_empty() {
            return Err(Invalid::new(
                &["brokers"],
                "must name at least one host:port",
            ));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(Invalid::new(
                &["topics"],
                "must list at least one topic (or ^regex)",
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(Invalid::new(&["group_id"], "must not be empty"));
        }
        if self.max_message_bytes == 0 {
            return Err(Invalid::new(&["max_message_bytes"], "must be at least 1"));
        }
        if let Some(k) = self.properties.keys().find(|k| OWNED.contains(&k.as_str())) {
            return Err(Invalid::new(
                &["properties", k],
                "is set by Idem (positions live in the sink); use brokers / group_id, or remove it",
            ));
        }
        Ok(())
    }
}
