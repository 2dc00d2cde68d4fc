//! The dedup stage: each message's id, the store of processed ids, and the
//! step before every commit that drops messages whose id already took
//! effect (docs/dedup.md has the states and the reasoning).

use async_trait::async_trait;
use idem_config::{DedupConfig, DedupStoreKind, IdSource, OnLoss};
use idem_core::{Message, Record};
use idem_dedup_store::{
    Claim, DedupError, DedupStore, EmbeddedDedupStore, PostgresDedupStore, RedisDedupStore, Seen,
    StoredPosition,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

/// How a connector names its messages.
pub struct Ids {
    source: IdSource,
    connector: String,
}

impl Ids {
    /// Where the ids come from.
    pub fn source(&self) -> &IdSource {
        &self.source
    }

    pub fn new(connector: &str, source: IdSource) -> Self {
        Ids {
            source,
            connector: connector.to_string(),
        }
    }

    /// The id of `msg` in `partition`, or why it has none.
    pub fn of(&self, partition: &str, msg: &Message) -> Result<String, String> {
        let text = |what: &str, bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_string)
                .map_err(|_| format!("message id: {what} is not UTF-8"))
        };
        let id = match &self.source {
            IdSource::Position => {
                return Ok(format!("{}/{partition}@{}", self.connector, msg.offset))
            }
            IdSource::Key => match &msg.key {
                Some(k) => text("the key", k)?,
                None => {
                    return Err("message id: the message has no key (dedup.id = \"@key\")".into())
                }
            },
            IdSource::Header(name) => {
                match msg.meta.headers.iter().rev().find(|(n, _)| n == name) {
                    Some((_, v)) => text(&format!("header `{name}`"), v)?,
                    None => {
                        return Err(format!(
                            "message id: no header `{name}` (dedup.id = \"@header/{name}\")"
                        ))
                    }
                }
            }
            IdSource::Pointer(p) => {
                let Some(raw) = msg.value.as_deref() else {
                    return Err(format!("message id: a tombstone has no field `{p}`"));
                };
                let doc: serde_json::Value = serde_json::from_slice(raw)
                    .map_err(|e| format!("message id: not valid JSON: {e}"))?;
                match doc.pointer(p) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => n.to_string(),
                    Some(serde_json::Value::Null) | None => {
                        return Err(format!("message id: field `{p}` is missing or null"))
                    }
                    Some(other) => {
                        return Err(format!(
                            "message id: field `{p}` holds {}, expected a string or a number",
                            kind(other)
                        ))
                    }
                }
            }
        };
        if id.is_empty() {
            return Err("message id: empty".into());
        }
        Ok(id)
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

/// The configured store, opened on first use (config building does no
/// I/O). Shared by the dedup stage and by a sink that keeps its positions
/// there (HTTP).
pub struct LazyStore {
    cfg: DedupConfig,
    namespace: String,
    /// The embedded store's file.
    path: String,
    shown: String,
    cell: OnceCell<Arc<dyn DedupStore>>,
}

impl LazyStore {
    /// One already open on `store` (tests).
    #[cfg(test)]
    pub fn holding(connector: &str, store: Arc<dyn DedupStore>) -> Self {
        let lazy = LazyStore::new(connector, DedupConfig::default());
        let _ = lazy.cell.set(store);
        lazy
    }

    pub fn new(connector: &str, cfg: DedupConfig) -> Self {
        let namespace = cfg
            .namespace
            .clone()
            .unwrap_or_else(|| connector.to_string());
        let path = cfg
            .path
            .clone()
            .unwrap_or_else(|| format!("{connector}.dedup.redb"));
        let shown = match cfg.store {
            DedupStoreKind::Embedded => format!("embedded {path}"),
            DedupStoreKind::Redis => "redis".into(),
            DedupStoreKind::Postgres => "postgres".into(),
            DedupStoreKind::Sink => "the sink".into(),
        };
        LazyStore {
            cfg,
            namespace,
            path,
            shown,
            cell: OnceCell::new(),
        }
    }

    pub fn config(&self) -> &DedupConfig {
        &self.cfg
    }

    /// The store, opened now if it was not.
    pub async fn get(&self) -> Result<&Arc<dyn DedupStore>, DedupError> {
        self.cell.get_or_try_init(|| self.open()).await
    }

    async fn open(&self) -> Result<Arc<dyn DedupStore>, DedupError> {
        let c = &self.cfg;
        let url = || {
            c.url
                .as_ref()
                .map(|u| u.expose().to_string())
                .unwrap_or_default()
        };
        Ok(match c.store {
            DedupStoreKind::Embedded => {
                let store =
                    EmbeddedDedupStore::open(Path::new(&self.path), &self.namespace, c.retention)?;
                Arc::new(Arc::new(store))
            }
            DedupStoreKind::Redis => {
                let store = RedisDedupStore::connect(
                    &url(),
                    c.ca_file.as_deref().map(Path::new),
                    &self.namespace,
                    c.retention,
                )
                .await?;
                if !store.ensure_marker().await? {
                    debug!(store = %store.describe(), "new dedup namespace");
                }
                Arc::new(store)
            }
            DedupStoreKind::Sink => {
                // The connector builds no store for these ids.
                return Err(DedupError::Unavailable {
                    store: "sink".into(),
                    message: "store = \"sink\" keeps ids in the sink's transactions, not in a store of their own".into(),
                    retriable: false,
                });
            }
            DedupStoreKind::Postgres => {
                let (pool, shown) = idem_postgres::pool_for(&url(), 4).map_err(|message| {
                    DedupError::Unavailable {
                        store: "postgres".into(),
                        message,
                        retriable: false,
                    }
                })?;
                Arc::new(
                    PostgresDedupStore::open(
                        pool,
                        &shown,
                        &c.schema,
                        &c.table,
                        &self.namespace,
                        c.retention,
                    )
                    .await?,
                )
            }
        })
    }
}

#[async_trait]
impl DedupStore for LazyStore {
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError> {
        self.get().await?.reserve_distinct(owner, claims).await
    }
    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError> {
        self.get().await?.confirm(ids).await
    }
    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError> {
        self.get().await?.take_over(owner, claims).await
    }
    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError> {
        self.get().await?.release(owner, ids).await
    }
    fn retention(&self) -> Duration {
        self.cfg.retention
    }
    fn describe(&self) -> String {
        match self.cell.get() {
            Some(s) => s.describe(),
            None => self.shown.clone(),
        }
    }
    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError> {
        self.get().await?.open_position(partition).await
    }
    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError> {
        self.get()
            .await?
            .save_position(partition, epoch, next_offset)
            .await
    }
    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError> {
        self.get().await?.positions().await
    }
    async fn accept_loss(&self) -> Result<(), DedupError> {
        self.get().await?.accept_loss().await
    }
}

/// What the stage decided for one batch.
pub struct Filtered {
    /// Per record: commit it (its id is reserved for `owner`) or drop it.
    pub keep: Vec<bool>,
    /// Records dropped: their id took effect (or is being made) elsewhere.
    pub skipped: u64,
    /// Ids to confirm once the batch is committed: the kept ones, and
    /// reservations this batch found committed earlier in its partition.
    pub confirm: Vec<String>,
    pub owner: String,
}

impl Filtered {
    /// The records to commit, of the batch `records` it was decided for.
    pub fn kept(&self, records: Vec<Record>) -> Vec<Record> {
        let mut keep = self.keep.iter();
        records
            .into_iter()
            .filter(|_| keep.next().copied().unwrap_or(true))
            .collect()
    }
}

/// The dedup stage of one connector.
pub struct Stage {
    pub store: Arc<LazyStore>,
    pub on_loss: OnLoss,
    pub connector: String,
}

impl Stage {
    /// The owner of one attempt at one batch: a retry of the same batch is
    /// the same owner (its reservations are its own); any other batch,
    /// earlier epoch or other partition is not.
    pub fn owner(partition: &str, epoch: i64, first_offset: u64) -> String {
        format!("{}@{epoch}#{first_offset}", partition.replace('\t', " "))
    }

    /// Reserve the batch's ids and keep the records whose effect is this
    /// batch's to make.
    ///
    /// `durable`: the position the sink holds durable for the partition
    /// (this batch's first offset, unless the sink stages batches).
    ///
    /// A reservation found from another owner is resolved without waiting:
    /// - same partition, offset before `durable`: that batch committed
    ///   (positions only move past committed batches): done, confirm it;
    /// - same partition and epoch, offset from `durable` to this batch: a
    ///   batch this runner staged, not durable yet: a copy, skipped but not
    ///   confirmed (if the staged batch is lost, the partition is read
    ///   again from `durable` and its next owner redoes it);
    /// - same partition, offset in or after this batch (or staged by an
    ///   older epoch): an attempt that never committed (a crashed runner,
    ///   an older epoch): redo it;
    /// - another partition: that partition's batch commits it, or, if it
    ///   never does, that partition is read again from before it and its
    ///   next owner redoes it; either way this copy is a duplicate.
    pub async fn filter(
        &self,
        partition: &str,
        epoch: i64,
        first_offset: u64,
        durable: u64,
        records: &[Record],
    ) -> Result<Filtered, DedupError> {
        // Claims name the connector too: connectors that share a namespace
        // share ids, never partitions.
        let place = format!("{}:{partition}", self.connector);
        let owner = Self::owner(&place, epoch, first_offset);
        let claims: Vec<Claim> = records
            .iter()
            .map(|r| Claim::new(r.id.clone().unwrap_or_default(), place.as_str(), r.offset))
            .collect();
        let seen = match self.store.reserve(&owner, &claims).await {
            Err(DedupError::Lost { store }) if self.on_loss == OnLoss::Warn => {
                warn!(connector = %self.connector, store, "the dedup store lost its ids: copies of messages processed before now will not be recognised and take effect again; going on (on_loss = \"warn\")");
                self.store.accept_loss().await?;
                self.store.reserve(&owner, &claims).await?
            }
            other => other?,
        };
        let mut keep = Vec::with_capacity(records.len());
        let mut confirm = Vec::with_capacity(records.len());
        let mut redo: Vec<&Claim> = Vec::new();
        let mut skipped = 0u64;
        for (c, s) in claims.iter().zip(&seen) {
            let kept = match s {
                Seen::New => true,
                Seen::Repeat | Seen::Done => false,
                Seen::Pending(r) if r.partition == place && r.offset < durable => {
                    confirm.push(c.id.clone());
                    false
                }
                Seen::Pending(r)
                    if r.partition == place
                        && r.offset < first_offset
                        && owner_epoch(&r.owner) == Some(epoch) =>
                {
                    false
                }
                Seen::Pending(r) if r.partition == place => {
                    debug!(connector = %self.connector, partition, id = %c.id, by = %r.owner, "redoing a reservation that never committed");
                    redo.push(c);
                    true
                }
                Seen::Pending(r) => {
                    debug!(connector = %self.connector, partition, id = %c.id, held_by = %r.partition, at = r.offset, "a copy of a message another partition is committing: skipped");
                    false
                }
            };
            keep.push(kept);
            if kept {
                confirm.push(c.id.clone());
            } else {
                skipped += 1;
            }
        }
        self.store.take_over(&owner, &redo).await?;
        Ok(Filtered {
            keep,
            skipped,
            confirm,
            owner,
        })
    }
}

/// The epoch in an owner named by [`Stage::owner`].
fn owner_epoch(owner: &str) -> Option<i64> {
    let (place_epoch, _) = owner.rsplit_once('#')?;
    place_epoch.rsplit_once('@')?.1.parse().ok()
}

/// What the dedup `stage` in front of `source` rests on, once its store is
/// open, and what weakens it: a line and its warnings.
pub async fn describe(
    stage: &Stage,
    source: &dyn idem_core::Source,
    bounded: bool,
) -> Result<(String, Vec<String>), String> {
    let d = stage.store.config();
    if let Err(e) = stage.store.get().await {
        return Err(format!("dedup store: {e}"));
    }
    let (line, mut warnings) = lines(d, &stage.store.describe(), source).await;
    if d.store == idem_config::DedupStoreKind::Embedded && !bounded {
        warnings.insert(0, "the embedded dedup store is this runner's own file: with more than one runner reading the same source, use store = \"redis\" or \"postgres\"".to_string());
    }
    Ok((line, warnings))
}

/// The line of dedup config `d` whose ids are `held` where it says, and
/// what weakens it whatever the store: a source that keeps messages
/// longer than the ids, ids that are positions.
pub async fn lines(
    d: &DedupConfig,
    held: &str,
    source: &dyn idem_core::Source,
) -> (String, Vec<String>) {
    let kept = humantime::format_duration(d.retention);
    let line = format!("dedup: ids from {} in {held}, remembered for {kept}", d.id);
    let mut warnings = Vec::new();
    for (topic, source_keeps) in source.retention().await {
        let longer = match source_keeps {
            Some(None) => Some("forever".to_string()),
            Some(Some(t)) if t > d.retention => {
                Some(format!("for {}", humantime::format_duration(t)))
            }
            _ => None,
        };
        if let Some(t) = longer {
            warnings.push(format!(
                "topic `{topic}` keeps messages {t}, longer than dedup.retention ({kept}): a replay of messages older than {kept} (an offset reset, a new group, a backfill) would repeat their effects; set dedup.retention to at least the topic's retention"
            ));
        }
    }
    if d.id == "@position" {
        warnings.push("dedup.id is the position: copies of a message at other offsets are not recognised; set it to the messages' own id".to_string());
    }
    (line, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{Meta, Op};
    use idem_dedup_store::MemoryDedupStore;

    fn msg(offset: u64, value: &str) -> Message {
        Message {
            offset,
            next_offset: offset + 1,
            key: Some(b"k1".to_vec()),
            value: Some(value.as_bytes().to_vec()),
            poison: None,
            meta: Meta {
                timestamp_ms: None,
                headers: vec![("event-id".into(), b"h1".to_vec())],
            },
        }
    }

    #[test]
    fn ids_come_from_where_the_config_says() {
        let m = msg(7, r#"{"id": "a1", "n": 42, "o": {}}"#);
        let of = |s: IdSource| Ids::new("c", s).of("t/0", &m);
        assert_eq!(of(IdSource::Position).unwrap(), "c/t/0@7");
        assert_eq!(of(IdSource::Key).unwrap(), "k1");
        assert_eq!(of(IdSource::Header("event-id".into())).unwrap(), "h1");
        assert_eq!(of(IdSource::Pointer("/id".into())).unwrap(), "a1");
        assert_eq!(of(IdSource::Pointer("/n".into())).unwrap(), "42");
        let missing = of(IdSource::Pointer("/nope".into())).unwrap_err();
        assert!(missing.contains("`/nope` is missing"), "{missing}");
        let object = of(IdSource::Pointer("/o".into())).unwrap_err();
        assert!(object.contains("an object"), "{object}");
        let header = of(IdSource::Header("other".into())).unwrap_err();
        assert!(header.contains("no header `other`"), "{header}");
        let bad = Ids::new("c", IdSource::Pointer("/id".into())).of("p", &msg(1, "nope"));
        assert!(bad.unwrap_err().contains("not valid JSON"));
    }

    fn rec(offset: u64, id: &str) -> Record {
        Record {
            offset,
            op: Op::Upsert,
            values: vec![].into(),
            id: Some(id.into()),
        }
    }

    fn stage(store: Arc<dyn DedupStore>) -> (Stage, Arc<dyn DedupStore>) {
        (
            Stage {
                store: Arc::new(LazyStore::holding("c", store.clone())),
                on_loss: OnLoss::Fail,
                connector: "c".into(),
            },
            store,
        )
    }

    /// Offsets of the records the stage keeps.
    async fn kept(
        st: &Stage,
        partition: &str,
        epoch: i64,
        first: u64,
        records: Vec<Record>,
    ) -> (Vec<u64>, Filtered) {
        kept_durable(st, partition, epoch, first, first, records).await
    }

    /// [`kept`] with the sink durable through `durable` only.
    async fn kept_durable(
        st: &Stage,
        partition: &str,
        epoch: i64,
        first: u64,
        durable: u64,
        records: Vec<Record>,
    ) -> (Vec<u64>, Filtered) {
        let f = st
            .filter(partition, epoch, first, durable, &records)
            .await
            .unwrap();
        let offsets = records
            .iter()
            .zip(&f.keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| r.offset)
            .collect();
        (offsets, f)
    }

    #[tokio::test]
    async fn copies_anywhere_take_effect_once_and_dead_attempts_are_redone() {
        let (st, store) = stage(Arc::new(MemoryDedupStore::new(Duration::from_secs(60))));
        let abc = || vec![rec(0, "a"), rec(1, "b"), rec(2, "a")];
        // Two copies of `a` in one batch: one kept.
        let (kept_now, f) = kept(&st, "p", 1, 0, abc()).await;
        assert_eq!((kept_now, f.skipped), (vec![0, 1], 1));
        // Retried (same batch, same owner): kept again.
        assert_eq!(kept(&st, "p", 1, 0, abc()).await.0, [0, 1]);
        // The runner crashed before committing: the next epoch redoes them.
        let ab = vec![rec(0, "a"), rec(1, "b")];
        assert_eq!(kept(&st, "p", 2, 0, ab).await.0, [0, 1]);
        // That batch committed but was never confirmed; a later copy of `a`
        // in the same partition finds a reservation behind it: done.
        let (kept_now, f) = kept(&st, "p", 2, 2, vec![rec(5, "a"), rec(6, "c")]).await;
        assert_eq!((kept_now, f.skipped), (vec![6], 1));
        assert!(f.confirm.contains(&"a".to_string()));
        store.confirm(&["c"]).await.unwrap();
        // A copy in another partition, while `p` holds `d` unconfirmed:
        // skipped (p commits it, or p's next owner redoes it).
        kept(&st, "p", 2, 7, vec![rec(7, "d")]).await;
        let dce = vec![rec(0, "d"), rec(1, "c"), rec(2, "e")];
        let (kept_now, f) = kept(&st, "q", 1, 0, dce).await;
        assert_eq!((kept_now, f.skipped), (vec![2], 2));
        // p replayed from before `d` under a new epoch: redone there.
        assert_eq!(kept(&st, "p", 3, 7, vec![rec(7, "d")]).await.0, [7]);
    }

    #[tokio::test]
    async fn copies_of_staged_messages_are_skipped_and_confirmed_only_once_durable() {
        let (st, _) = stage(Arc::new(MemoryDedupStore::new(Duration::from_secs(60))));
        // Offsets 0..2 staged under epoch 1; the sink is durable through 0.
        let (kept_now, _) = kept_durable(&st, "p", 1, 0, 0, vec![rec(0, "a"), rec(1, "b")]).await;
        assert_eq!(kept_now, [0, 1]);
        // A copy of `a` in the next batch: skipped, but not confirmed, for
        // the staged batch may still be lost.
        let (kept_now, f) = kept_durable(&st, "p", 1, 2, 0, vec![rec(2, "a"), rec(3, "c")]).await;
        assert_eq!((kept_now, f.skipped), (vec![3], 1));
        assert_eq!(f.confirm, ["c"]);
        // It was: the runner died with nothing durable, and the next epoch
        // reads from 0 again and redoes `a`.
        let (kept_now, _) = kept_durable(&st, "p", 2, 0, 0, vec![rec(0, "a")]).await;
        assert_eq!(kept_now, [0]);
        // Durable past it now: a later copy finds it done, and confirms it.
        let (kept_now, f) = kept_durable(&st, "p", 2, 5, 1, vec![rec(5, "a")]).await;
        assert!(kept_now.is_empty());
        assert_eq!(f.confirm, ["a"]);
    }
}
