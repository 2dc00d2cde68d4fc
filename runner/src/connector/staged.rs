//! What the committer keeps between batches of a partition: the dedup
//! stage's reservations, and how far the sink holds the partition durable.

use std::collections::VecDeque;
use tokio::time::Instant;

/// The dedup stage's hold on a batch's ids: who reserved them, and which
/// to confirm once it commits.
pub(super) struct Reserved {
    pub(super) owner: String,
    pub(super) confirm: Vec<String>,
}

/// Where a partition's commits stand against what the sink holds durable.
/// A sink that stages batches (see `Sink::stage_for`) commits them ahead of
/// its durable position: their ids are confirmed, and the position reported
/// and acknowledged, only once it catches up.
pub(super) struct Staged {
    /// The position the sink holds durable.
    pub(super) durable: u64,
    /// The position after the last batch committed, staged or durable.
    pub(super) through: u64,
    /// Staged batches' ids, each with the position after its batch.
    pub(super) waiting: VecDeque<(u64, Reserved)>,
    /// Since when effects are staged and not durable.
    pub(super) since: Option<Instant>,
}

impl Staged {
    /// A partition opened at `position`.
    pub(super) fn new(position: u64) -> Self {
        Staged {
            durable: position,
            through: position,
            waiting: VecDeque::new(),
            since: None,
        }
    }

    /// Whether staged effects have waited `stage_for` (the sink's).
    pub(super) fn roll_due(&self, stage_for: Option<std::time::Duration>) -> bool {
        self.since
            .zip(stage_for)
            .is_some_and(|(since, wait)| Instant::now() >= since + wait)
    }
}
