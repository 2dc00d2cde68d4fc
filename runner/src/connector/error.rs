//! Why a connector stopped: each error says which connector, and where it
//! applies, which partition and offsets.

use crate::deadletter::DeadLetterError;
use crate::retry::Retriable;
use idem_config::Guarantee;
use idem_core::{SinkError, SourceError};

/// Why a connector stopped before finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("connector `{connector}` requires {required}, but its {sink} sink gives {given}: {why}. Use a sink mode that gives {required}, or set guarantee = \"{given}\" to accept it")]
    Guarantee {
        connector: String,
        sink: &'static str,
        required: Guarantee,
        given: Guarantee,
        why: String,
    },
    #[error("connector `{connector}`: sink: {source}")]
    Sink {
        connector: String,
        #[source]
        source: SinkError,
    },
    #[error("connector `{connector}`: {partition}: the batch of offsets {first_offset}..{next_offset} did not commit (its position is not stored: it is read again on restart): {source}")]
    Commit {
        connector: String,
        partition: String,
        first_offset: u64,
        next_offset: u64,
        #[source]
        source: SinkError,
    },
    #[error("connector `{connector}`: source: {source}")]
    Source {
        connector: String,
        #[source]
        source: SourceError,
    },
    #[error("connector `{connector}`: {partition} offset {offset}: {reason} (the connector stops here: everything before it is committed, nothing after it is skipped)")]
    BadMessage {
        connector: String,
        partition: String,
        offset: u64,
        reason: String,
    },
    #[error("connector `{connector}`: {source}")]
    DeadLetter {
        connector: String,
        #[source]
        source: DeadLetterError,
    },
    #[error("connector `{connector}`: {message}")]
    DeadLetterConfig { connector: String, message: String },
    #[error("connector `{connector}`: {sink} sink: {message}")]
    Build {
        connector: String,
        sink: &'static str,
        message: String,
    },
    #[error("connector `{connector}`: {partition} offset {offset}: more than dead_letters.max = {max} messages dead-lettered in this run; the input or the mapping looks wrong. Nothing from this batch on is committed: fix the cause (see the dead letters) or raise dead_letters.max, then restart")]
    TooManyDeadLetters {
        connector: String,
        partition: String,
        offset: u64,
        max: u64,
    },
    #[error("connector `{connector}`: {source}{advice}")]
    Dedup {
        connector: String,
        #[source]
        source: idem_dedup_store::DedupError,
        advice: &'static str,
    },
    #[error("connector `{connector}`: dedup: {message}")]
    DedupConfig { connector: String, message: String },
    #[error("connector `{connector}`: task failed: {message}")]
    Task { connector: String, message: String },
}

impl RunError {
    /// Whether more tries could have cleared it (a transient error of the
    /// sink, source, dead letters or dedup store).
    pub fn retriable(&self) -> bool {
        match self {
            RunError::Sink { source, .. } | RunError::Commit { source, .. } => {
                source.is_retriable()
            }
            RunError::Source { source, .. } => source.is_retriable(),
            RunError::DeadLetter { source, .. } => Retriable::is_retriable(source),
            RunError::Dedup { source, .. } => source.is_retriable(),
            _ => false,
        }
    }
}
