//! What a connector crate gives the runner's registry: its `type` name, its
//! config section, and how to build it. The runner lists one line per kind
//! (runner/src/registry.rs) and dispatches through these traits, so the
//! runner never matches on a particular sink's or source's config.

use crate::{Rejects, Sink, Source};
use idem_config::{ColumnConfig, Invalid, Secret, Validate};
use idem_dedup_store::DedupStore;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;

/// What a sink may need from the runner beside its config.
#[derive(Clone)]
pub struct SinkContext {
    /// The connector's dedup store: present when the kind says
    /// [`SinkKind::needs_store`] (or the connector has a `[dedup]` stage).
    pub store: Option<Arc<dyn DedupStore>>,
    /// The connector's dead letters, for records the destination refuses
    /// inside a commit (an HTTP 4xx).
    pub rejects: Arc<dyn Rejects>,
    /// `[dedup] store = "sink"`: keep the records' message ids in the
    /// sink's own database for this long, and drop, inside each batch's
    /// transaction, the records whose id is already there. A sink that
    /// can says so in [`crate::SinkInfo::ids_table`]; the runner refuses
    /// the setting for the others.
    pub keep_ids: Option<std::time::Duration>,
}

/// A PostgreSQL database a sink writes into, which dead letters may share
/// (`dead_letters.destination = "table"`).
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub url: Secret,
    pub schema: String,
}

/// The Kafka brokers a source reads, which dead letters may share
/// (`dead_letters.destination = "topic"`), with the connection settings
/// (security, SASL, TLS) a producer there needs.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    pub brokers: String,
    pub properties: Vec<(String, String)>,
    /// The topics it reads (names, or patterns starting with `^`).
    pub topics: Vec<String>,
}

/// A sink's entry in the registry.
pub trait SinkKind: 'static {
    /// The `type` of its `[connectors.NAME.sink]` section.
    const NAME: &'static str;
    /// That section.
    type Config: DeserializeOwned + Validate + Clone + Debug + Send + Sync + 'static;

    /// Build the sink (no I/O: that waits for [`Sink::prepare`]). An error
    /// is a config mistake the section's own validation cannot see.
    fn build(
        cfg: &Self::Config,
        columns: &[ColumnConfig],
        ctx: SinkContext,
    ) -> Result<Arc<dyn Sink>, String>;

    /// Whether it keeps its positions in the connector's dedup store (which
    /// is then always on, embedded unless configured).
    fn needs_store(_cfg: &Self::Config) -> bool {
        false
    }

    /// Messages per batch when the connector does not set
    /// `batch.max_records` (`max_bytes` still applies). A table sink merges
    /// once per batch, so larger batches cost it less; a receiver of
    /// request bodies wants them small.
    fn batch_records(_cfg: &Self::Config) -> usize {
        idem_config::DEFAULT_MAX_RECORDS
    }

    /// The PostgreSQL database it writes into, if any.
    fn postgres(_cfg: &Self::Config) -> Option<PostgresTarget> {
        None
    }

    /// The one table it writes, for a sink that can write each source
    /// table of a connector to a table of its own: `table`, possibly a
    /// template (`idem_config::is_table_template`). `None`: it cannot.
    fn table(_cfg: &Self::Config) -> Option<String> {
        None
    }

    /// Whether it creates its table when the table is missing (`create`).
    fn creates_table(_cfg: &Self::Config) -> bool {
        false
    }

    /// The column type a decimal of a message's schema becomes: `numeric`
    /// where the target holds any decimal exactly, else `text` (its digits
    /// kept as they are).
    fn decimal_column(_cfg: &Self::Config) -> idem_config::ColumnType {
        idem_config::ColumnType::Numeric
    }

    /// The same section writing into `table` instead, keyed on `key` when
    /// given (a key learnt from the messages, for a section without one).
    fn with_table(cfg: &Self::Config, _table: &str, _key: Option<&[String]>) -> Self::Config {
        cfg.clone()
    }
}

/// A source's entry in the registry.
pub trait SourceKind: 'static {
    /// The `type` of its `[connectors.NAME.source]` section.
    const NAME: &'static str;
    /// That section.
    type Config: DeserializeOwned + Validate + Clone + Debug + Send + Sync + 'static;

    /// Build the source (no I/O until it is first asked for assignments).
    fn build(cfg: &Self::Config) -> Arc<dyn Source>;

    /// Whether it ends by itself (a backfill, a set of files).
    fn is_bounded(cfg: &Self::Config) -> bool;

    /// Checks against this machine before anything starts (files exist, a
    /// path is not a directory), no network: `Err` is a config mistake,
    /// its key relative to the source section.
    fn preflight(_cfg: &Self::Config) -> Result<(), Invalid> {
        Ok(())
    }

    /// The Kafka brokers it reads, if any.
    fn kafka(_cfg: &Self::Config) -> Option<KafkaTarget> {
        None
    }
}
