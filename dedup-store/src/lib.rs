//! The [`DedupStore`] trait: the message ids whose effects a connector has
//! made, kept for a retention window, for sinks whose effects cannot join a
//! transaction with their positions (an HTTP call, a payment), and for ids
//! repeated at different offsets by producers that retry.
//!
//! An id is **reserved** before its effect and **confirmed** after it. A
//! reservation that is never confirmed (the runner crashed, or its batch
//! was abandoned) stays visible as [`Seen::Pending`] with the position and
//! runner that made it, so the runner that finds it can decide, never
//! silently treat it as done: redo the effect when it is idempotent (an
//! HTTP call with an idempotency key), or resolve it from the sink's
//! committed position. The states and transitions are in `docs/dedup.md`.
//!
//! Implementations: [`MemoryDedupStore`] (one process, for tests),
//! [`EmbeddedDedupStore`] (a redb file, no server), [`RedisDedupStore`] and
//! [`PostgresDedupStore`]. Each call takes a whole batch in one round trip.

mod embedded;
mod postgres;
mod redis_store;

pub use embedded::EmbeddedDedupStore;
pub use postgres::PostgresDedupStore;
pub use redis_store::{check_url as check_redis_url, RedisDedupStore};

use async_trait::async_trait;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The store did not answer, or failed a request.
    #[error("dedup store {store}: {message}")]
    Unavailable {
        store: String,
        message: String,
        retriable: bool,
    },
    /// The store forgot ids it had recorded (a Redis restarted without
    /// persistence, or flushed): repeats of earlier messages are not
    /// recognised until [`DedupStore::accept_loss`].
    #[error("dedup store {store}: the store lost its ids (restarted without persistence, or flushed): ids recorded before are forgotten, so repeats of messages processed before now are not recognised")]
    Lost { store: String },
    /// The store holds something Idem did not write.
    #[error("dedup store {store}: id `{id}` holds `{value}`, which Idem cannot read")]
    Corrupt {
        store: String,
        id: String,
        value: String,
    },
}

impl DedupError {
    pub fn is_retriable(&self) -> bool {
        match self {
            DedupError::Unavailable { retriable, .. } => *retriable,
            DedupError::Corrupt { .. } | DedupError::Lost { .. } => false,
        }
    }
}

/// A message asking for its id: the id and where the message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: String,
    pub partition: String,
    pub offset: u64,
}

impl Claim {
    pub fn new(id: impl Into<String>, partition: impl Into<String>, offset: u64) -> Self {
        Claim {
            id: id.into(),
            partition: partition.into(),
            offset,
        }
    }
}

/// A reservation that was never confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The runner that made it ([`DedupStore::reserve`]'s `owner`).
    pub owner: String,
    /// The message that made it.
    pub partition: String,
    pub offset: u64,
}

/// A partition's fencing epoch and position, as a dedup store keeps them
/// for sinks without their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    pub epoch: i64,
    pub next_offset: Option<u64>,
}

impl StoredPosition {
    /// `epoch\tnext` (next empty when none), as Redis and redb keep it.
    fn encode(&self) -> String {
        match self.next_offset {
            Some(n) => format!("{}\t{n}", self.epoch),
            None => format!("{}\t", self.epoch),
        }
    }

    fn decode(s: &str) -> Option<StoredPosition> {
        let (e, n) = s.split_once('\t')?;
        Some(StoredPosition {
            epoch: e.parse().ok()?,
            next_offset: if n.is_empty() {
                None
            } else {
                Some(n.parse().ok()?)
            },
        })
    }
}

/// What [`DedupStore::reserve`] found for one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not in the window (or reserved by this same owner, whose earlier try
    /// of the batch failed): reserved now for this claim. Make the effect.
    New,
    /// An earlier claim in the same call has this id: one effect for both.
    Repeat,
    /// Its effect was confirmed: a duplicate, skip it.
    Done,
    /// Reserved by another owner and never confirmed: its effect may or may
    /// not have happened.
    Pending(Reservation),
}

/// The ids a connector's effects were made for, kept for `retention`.
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// For each claim, what the window holds for its id; ids it does not
    /// hold (and `owner`'s own reservations) are reserved for `owner` and
    /// the claim's position. A repeated id in `claims` is [`Seen::Repeat`]
    /// after its first claim.
    async fn reserve(&self, owner: &str, claims: &[Claim]) -> Result<Vec<Seen>, DedupError> {
        let (distinct, seen) = first_claims(claims);
        let found = self.reserve_distinct(owner, &distinct).await?;
        Ok(merge(seen, found))
    }

    /// [`DedupStore::reserve`] for claims with distinct ids.
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError>;

    /// The effects for these ids are durable: they are [`Seen::Done`] for
    /// the retention, whoever reserved them.
    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError>;

    /// Reserve these ids for `owner` whatever the window holds: after
    /// deciding to redo the effect of a [`Seen::Pending`] claim.
    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError>;

    /// Drop `owner`'s reservations of these ids (a batch given up before
    /// its effects), so that they count as unseen again. Ids reserved by
    /// another owner or done are left alone.
    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError>;

    /// How long an id is remembered after its last reservation or
    /// confirmation.
    fn retention(&self) -> Duration;

    /// Fence `partition` for a new runner: bump its epoch and return it
    /// with the stored position. For sinks that keep no position of their
    /// own (HTTP). Positions never expire.
    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError>;

    /// Store `next_offset` for `partition` if `epoch` is still its epoch;
    /// `false` (nothing stored) when a newer runner opened it.
    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError>;

    /// Every stored position in the namespace, by partition.
    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError>;

    /// After a reported loss of ids ([`DedupError::Lost`]): accept it and
    /// go on recording from now.
    async fn accept_loss(&self) -> Result<(), DedupError> {
        Ok(())
    }

    /// Where the ids live, for messages: `redis://127.0.0.1:6379 (idem:orders)`.
    fn describe(&self) -> String;
}

/// The first claim of each id, and for every claim `None` (look it up) or
/// `Some(Repeat)`.
fn first_claims(claims: &[Claim]) -> (Vec<&Claim>, Vec<Option<Seen>>) {
    let mut firsts: HashMap<&str, ()> = HashMap::with_capacity(claims.len());
    let mut distinct = Vec::with_capacity(claims.len());
    let seen = claims
        .iter()
        .map(|c| {
            if firsts.insert(c.id.as_str(), ()).is_some() {
                Some(Seen::Repeat)
            } else {
                distinct.push(c);
                None
            }
        })
        .collect();
    (distinct, seen)
}

fn merge(seen: Vec<Option<Seen>>, found: Vec<Seen>) -> Vec<Seen> {
    let mut found = found.into_iter();
    seen.into_iter()
        .map(|s| s.unwrap_or_else(|| found.next().unwrap_or(Seen::New)))
        .collect()
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One id's state as Redis and redb keep it, in one string:
/// `D` (done) or `R\t{owner}\t{offset}\t{partition}` (reserved; owners
/// hold no tab).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Done,
    Reserved(Reservation),
}

impl Entry {
    fn reserved(owner: &str, c: &Claim) -> String {
        format!("R\t{owner}\t{}\t{}", c.offset, c.partition)
    }

    fn parse(s: &str) -> Option<Entry> {
        if s == "D" {
            return Some(Entry::Done);
        }
        let rest = s.strip_prefix("R\t")?;
        let (owner, rest) = rest.split_once('\t')?;
        let (offset, partition) = rest.split_once('\t')?;
        Some(Entry::Reserved(Reservation {
            owner: owner.to_string(),
            partition: partition.to_string(),
            offset: offset.parse().ok()?,
        }))
    }

    /// What `reserve` reports for an id held as `self`, for `owner`;
    /// `None` when `owner` may (re)take it.
    fn seen_by(self, owner: &str) -> Option<Seen> {
        match self {
            Entry::Done => Some(Seen::Done),
            Entry::Reserved(r) if r.owner == owner => None,
            Entry::Reserved(r) => Some(Seen::Pending(r)),
        }
    }
}

/// In-process store: for one runner and for tests. Forgets on restart.
pub struct MemoryDedupStore {
    retention: Duration,
    state: Mutex<HashMap<String, (u64, Entry)>>,
    positions: Mutex<HashMap<String, StoredPosition>>,
}

impl MemoryDedupStore {
    pub fn new(retention: Duration) -> Self {
        MemoryDedupStore {
            retention,
            state: Mutex::new(HashMap::new()),
            positions: Mutex::new(HashMap::new()),
        }
    }

    fn expires(&self) -> u64 {
        now_ms() + self.retention.as_millis() as u64
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError> {
        let now = now_ms();
        let expires = self.expires();
        let mut st = self.state.lock().await;
        st.retain(|_, (until, _)| *until > now);
        Ok(claims
            .iter()
            .map(|c| {
                let held = st.get(&c.id).and_then(|(_, e)| e.clone().seen_by(owner));
                held.unwrap_or_else(|| {
                    let r = Reservation {
                        owner: owner.to_string(),
                        partition: c.partition.clone(),
                        offset: c.offset,
                    };
                    st.insert(c.id.clone(), (expires, Entry::Reserved(r)));
                    Seen::New
                })
            })
            .collect())
    }

    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError> {
        let expires = self.expires();
        let mut st = self.state.lock().await;
        for id in ids {
            st.insert((*id).to_string(), (expires, Entry::Done));
        }
        Ok(())
    }

    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError> {
        let expires = self.expires();
        let mut st = self.state.lock().await;
        for c in claims {
            let r = Reservation {
                owner: owner.to_string(),
                partition: c.partition.clone(),
                offset: c.offset,
            };
            st.insert(c.id.clone(), (expires, Entry::Reserved(r)));
        }
        Ok(())
    }

    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError> {
        let mut st = self.state.lock().await;
        for id in ids {
            if matches!(st.get(*id), Some((_, Entry::Reserved(r))) if r.owner == owner) {
                st.remove(*id);
            }
        }
        Ok(())
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError> {
        let mut st = self.positions.lock().await;
        let p = st.entry(partition.to_string()).or_insert(StoredPosition {
            epoch: 0,
            next_offset: None,
        });
        p.epoch += 1;
        Ok(*p)
    }

    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError> {
        let mut st = self.positions.lock().await;
        match st.get_mut(partition) {
            Some(p) if p.epoch == epoch => {
                p.next_offset = Some(next_offset);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError> {
        let st = self.positions.lock().await;
        let mut out: Vec<_> = st.iter().map(|(k, v)| (k.clone(), *v)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_what_they_wrote() {
        let c = Claim::new("x", "orders/3", 42);
        let s = Entry::reserved("runner-1", &c);
        assert_eq!(
            Entry::parse(&s),
            Some(Entry::Reserved(Reservation {
                owner: "runner-1".into(),
                partition: "orders/3".into(),
                offset: 42
            }))
        );
        // A partition name may hold tabs; the owner may not.
        let c = Claim::new("x", "a\tb", 1);
        let Some(Entry::Reserved(r)) = Entry::parse(&Entry::reserved("o", &c)) else {
            panic!("unreadable")
        };
        assert_eq!(r.partition, "a\tb");
        assert_eq!(Entry::parse("D"), Some(Entry::Done));
        assert_eq!(Entry::parse("junk"), None);
    }

    #[tokio::test]
    async fn repeats_in_one_call_are_marked_and_not_looked_up() {
        let store = MemoryDedupStore::new(Duration::from_secs(60));
        let claims = [
            Claim::new("a", "p", 0),
            Claim::new("b", "p", 1),
            Claim::new("a", "p", 2),
        ];
        assert_eq!(
            store.reserve("o", &claims).await.unwrap(),
            [Seen::New, Seen::New, Seen::Repeat]
        );
    }

    #[test]
    fn ids_expire_after_retention() {
        let store = MemoryDedupStore::new(Duration::from_millis(30));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let a = [Claim::new("a", "p", 0)];
            assert_eq!(store.reserve("o", &a).await.unwrap(), [Seen::New]);
            store.confirm(&["a"]).await.unwrap();
            assert_eq!(store.reserve("o", &a).await.unwrap(), [Seen::Done]);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(store.reserve("o", &a).await.unwrap(), [Seen::New]);
        });
    }
}
