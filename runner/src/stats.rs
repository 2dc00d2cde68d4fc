//! Per-connector counters: progress lines, the final summary, and later the
//! metrics endpoint read the same numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Stats {
    pub read: AtomicU64,
    pub written: AtomicU64,
    pub deduplicated: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
    pub fenced: AtomicU64,
    /// Committed next offset per partition.
    positions: Mutex<BTreeMap<String, u64>>,
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub read: u64,
    pub written: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub retries: u64,
    pub fenced: u64,
    pub positions: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Messages whose fate is committed.
    pub fn committed(&self) -> u64 {
        self.written + self.deduplicated + self.dead_lettered
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_position(&self, partition: &str, next_offset: u64) {
        if let Ok(mut p) = self.positions.lock() {
            p.insert(partition.to_string(), next_offset);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            read: get(&self.read),
            written: get(&self.written),
            deduplicated: get(&self.deduplicated),
            dead_lettered: get(&self.dead_lettered),
            batches: get(&self.batches),
            retries: get(&self.retries),
            fenced: get(&self.fenced),
            positions: self.positions.lock().map(|p| p.clone()).unwrap_or_default(),
        }
    }
}

/// `a/b/c/events.jsonl` -> `events.jsonl`: partitions named by long paths
/// read better by their last segment in progress lines.
pub fn short_partition(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

pub fn format_positions(positions: &BTreeMap<String, u64>) -> String {
    if positions.is_empty() {
        return "none yet".into();
    }
    let shown: Vec<String> = positions
        .iter()
        .take(4)
        .map(|(p, o)| format!("{}@{o}", short_partition(p)))
        .collect();
    let more = positions.len().saturating_sub(4);
    if more > 0 {
        format!("{} (+{more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
