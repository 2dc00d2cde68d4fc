//! The [`DedupStore`] trait: processed message ids with a retention window,
//! for sinks whose effects cannot join a transaction with their positions.
//!
//! Alone a dedup store gives **at-least-once with duplicates suppressed
//! inside the window**: an id is recorded before or after the effect, never
//! atomically with it, so a crash between the two repeats or skips the
//! record. Idem labels connectors that rely on it accordingly, and never
//! calls them exactly-once unless the sink's effect is itself idempotent.
//! Redis and PostgreSQL implementations plug in behind the same trait.

use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    #[error("dedup store {store}: {message}")]
    Unavailable {
        store: String,
        message: String,
        retriable: bool,
    },
}

impl DedupError {
    pub fn is_retriable(&self) -> bool {
        match self {
            DedupError::Unavailable { retriable, .. } => *retriable,
        }
    }
}

/// Remembers which message ids were processed, for `retention`.
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// For each id, `true` if it was already recorded (a duplicate); records
    /// the new ones. Ids repeated inside `ids` count as duplicates after
    /// their first occurrence.
    async fn check_and_record(&self, ids: &[String]) -> Result<Vec<bool>, DedupError>;

    /// How long an id is remembered.
    fn retention(&self) -> Duration;
}

/// In-process store: for one runner and for tests. Forgets on restart.
pub struct MemoryDedupStore {
    retention: Duration,
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    seen: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl MemoryDedupStore {
    pub fn new(retention: Duration) -> Self {
        MemoryDedupStore {
            retention,
            state: Mutex::new(MemoryState::default()),
        }
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn check_and_record(&self, ids: &[String]) -> Result<Vec<bool>, DedupError> {
        let now = Instant::now();
        let mut st = self.state.lock().await;
        // Expire in insertion order; an id re-recorded later keeps its newer time.
        while let Some((t, _)) = st.order.front() {
            if now.duration_since(*t) < self.retention {
                break;
            }
            if let Some((t, id)) = st.order.pop_front() {
                if st.seen.get(&id) == Some(&t) {
                    st.seen.remove(&id);
                }
            }
        }
        Ok(ids
            .iter()
            .map(|id| {
                if st.seen.contains_key(id) {
                    true
                } else {
                    st.seen.insert(id.clone(), now);
                    st.order.push_back((now, id.clone()));
                    false
                }
            })
            .collect())
    }

    fn retention(&self) -> Duration {
        self.retention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn duplicates_inside_the_window_only() {
        let store = MemoryDedupStore::new(Duration::from_secs(60));
        assert_eq!(
            store
                .check_and_record(&ids(&["a", "b", "a"]))
                .await
                .unwrap(),
            [false, false, true]
        );
        assert_eq!(
            store.check_and_record(&ids(&["b", "c"])).await.unwrap(),
            [true, false]
        );
    }

    #[test]
    fn ids_expire_after_retention() {
        let store = MemoryDedupStore::new(Duration::from_millis(30));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(store.check_and_record(&ids(&["a"])).await.unwrap(), [false]);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(store.check_and_record(&ids(&["a"])).await.unwrap(), [false]);
            assert_eq!(store.check_and_record(&ids(&["a"])).await.unwrap(), [true]);
        });
    }
}
