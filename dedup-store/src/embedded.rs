//! Ids in a redb file beside the runner: no server. Each call is one write
//! transaction, made durable (fsync) before it returns. Expired ids are
//! swept at open and then every `SWEEP_EVERY`.

use crate::{now_ms, Claim, DedupError, DedupStore, Entry, Seen, StoredPosition};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `namespace \0 id` -> `expires_ms \t entry`.
const IDS: TableDefinition<&str, &str> = TableDefinition::new("idem_dedup_ids");
/// `namespace \0 partition` -> `epoch \t next` (no expiry).
const POSITIONS: TableDefinition<&str, &str> = TableDefinition::new("idem_positions");
const SWEEP_EVERY: Duration = Duration::from_secs(600);

pub struct EmbeddedDedupStore {
    db: Arc<Database>,
    path: PathBuf,
    namespace: String,
    retention: Duration,
    last_sweep: AtomicU64,
}

/// A file at `path` whose first bytes are all zero (or that is empty):
/// redb never wrote its header there.
fn never_written(path: &Path) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = Vec::with_capacity(64);
    f.take(64).read_to_end(&mut head).is_ok() && head.iter().all(|&b| b == 0)
}

/// Make a new store file whole or not at all: built beside `path` and
/// renamed into place, so a process killed while creating it leaves no
/// half-written file that would not open again (redb writes its header
/// after creating the file).
fn create_whole(path: &Path) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // What an earlier, killed creation left.
    let prefix = format!(".{name}.creating-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let db = Database::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.open_table(IDS).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())?;
    drop(db);
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("renaming {} into place: {e}", tmp.display()))?;
    // The rename itself survives a power loss once the folder is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| e.to_string())
}

/// redb's page cache for the ids file.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

impl EmbeddedDedupStore {
    /// Opens (or creates) the file at `path`; ids under `namespace`.
    pub fn open(path: &Path, namespace: &str, retention: Duration) -> Result<Self, DedupError> {
        let fail = |message: String| DedupError::Unavailable {
            store: path.display().to_string(),
            message,
            retriable: false,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        if never_written(path) {
            // Left by a creation killed before this version made it whole:
            // it holds nothing (not even redb's header).
            tracing::warn!(path = %path.display(), "the dedup file was never written (a creation interrupted): making it anew");
            std::fs::remove_file(path).map_err(|e| fail(e.to_string()))?;
        }
        if !path.exists() {
            create_whole(path).map_err(fail)?;
        }
        // redb caches up to 1 GiB of pages by default, which a runner
        // sidecar holding millions of ids would fill: the OS page cache
        // keeps the file's hot pages as well.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    fail("the file is open in another process: one runner per dedup file".into())
                }
                e => fail(e.to_string()),
            })?;
        let store = EmbeddedDedupStore {
            db: Arc::new(db),
            path: path.to_path_buf(),
            namespace: namespace.to_string(),
            retention,
            last_sweep: AtomicU64::new(0),
        };
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    fn key(&self, id: &str) -> String {
        format!("{}\0{id}", self.namespace)
    }

    fn fail(&self, e: impl std::fmt::Display) -> DedupError {
        DedupError::Unavailable {
            store: self.describe(),
            message: e.to_string(),
            retriable: false,
        }
    }

    /// One durable write transaction over the ids table; sweeps expired
    /// ids first when it is time.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &str>) -> Result<T, DedupError>,
    ) -> Result<T, DedupError> {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        let out = {
            let mut table = txn.open_table(IDS).map_err(|e| self.fail(e))?;
            let now = now_ms();
            let last = self.last_sweep.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64 {
                self.last_sweep.store(now, Ordering::Relaxed);
                table
                    .retain(|_, v| expiry(v).is_none_or(|t| t > now))
                    .map_err(|e| self.fail(e))?;
            }
            f(&mut table)?
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(out)
    }

    fn expires(&self) -> u64 {
        now_ms() + self.retention.as_millis() as u64
    }

    /// Runs `f` off the async threads: redb blocks on disk.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, DedupError> + Send + 'static,
    ) -> Result<T, DedupError> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| self.fail(e))?
    }
}

fn expiry(v: &str) -> Option<u64> {
    v.split_once('\t').and_then(|(t, _)| t.parse().ok())
}

/// The entry of a stored value, if it has not expired by `now`.
fn live(v: &str, now: u64) -> Option<&str> {
    let (t, e) = v.split_once('\t')?;
    (t.parse::<u64>().ok()? > now).then_some(e)
}

#[async_trait]
/// Behind an `Arc`, so that calls can run on the blocking pool.
impl DedupStore for Arc<EmbeddedDedupStore> {
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError> {
        let owner = owner.to_string();
        let claims: Vec<Claim> = claims.iter().map(|c| (*c).clone()).collect();
        self.blocking(move |s| {
            let now = now_ms();
            let expires = s.expires();
            s.write(|t| {
                let mut out = Vec::with_capacity(claims.len());
                for c in &claims {
                    let key = s.key(&c.id);
                    let held = match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                        Some(v) => match live(v.value(), now) {
                            Some(e) => {
                                Some(Entry::parse(e).ok_or_else(|| DedupError::Corrupt {
                                    store: s.describe(),
                                    id: c.id.clone(),
                                    value: e.to_string(),
                                })?)
                            }
                            None => None,
                        },
                        None => None,
                    };
                    match held.and_then(|e| e.seen_by(&owner)) {
                        Some(seen) => out.push(seen),
                        None => {
                            let v = format!("{expires}\t{}", Entry::reserved(&owner, c));
                            t.insert(key.as_str(), v.as_str()).map_err(|e| s.fail(e))?;
                            out.push(Seen::New);
                        }
                    }
                }
                Ok(out)
            })
        })
        .await
    }

    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.blocking(move |s| {
            let v = format!("{}\tD", s.expires());
            s.write(|t| {
                for id in &ids {
                    t.insert(s.key(id).as_str(), v.as_str())
                        .map_err(|e| s.fail(e))?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError> {
        if claims.is_empty() {
            return Ok(());
        }
        let owner = owner.to_string();
        let claims: Vec<Claim> = claims.iter().map(|c| (*c).clone()).collect();
        self.blocking(move |s| {
            let expires = s.expires();
            s.write(|t| {
                for c in &claims {
                    let v = format!("{expires}\t{}", Entry::reserved(&owner, c));
                    t.insert(s.key(&c.id).as_str(), v.as_str())
                        .map_err(|e| s.fail(e))?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError> {
        if ids.is_empty() {
            return Ok(());
        }
        let owner = owner.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.blocking(move |s| {
            s.write(|t| {
                for id in &ids {
                    let key = s.key(id);
                    let mine = match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                        Some(v) => v
                            .value()
                            .split_once('\t')
                            .and_then(|(_, e)| Entry::parse(e))
                            .is_some_and(|e| matches!(e, Entry::Reserved(r) if r.owner == owner)),
                        None => false,
                    };
                    if mine {
                        t.remove(key.as_str()).map_err(|e| s.fail(e))?;
                    }
                }
                Ok(())
            })
        })
        .await
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    fn describe(&self) -> String {
        EmbeddedDedupStore::describe(self)
    }

    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError> {
        let key = self.key(partition);
        self.blocking(move |s| {
            s.positions_write(|t| {
                let old = match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                    Some(v) => Some(s.decode_position(&key, v.value())?),
                    None => None,
                };
                let p = StoredPosition {
                    epoch: old.map_or(0, |p| p.epoch) + 1,
                    next_offset: old.and_then(|p| p.next_offset),
                };
                t.insert(key.as_str(), p.encode().as_str())
                    .map_err(|e| s.fail(e))?;
                Ok(p)
            })
        })
        .await
    }

    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError> {
        let key = self.key(partition);
        self.blocking(move |s| {
            s.positions_write(|t| {
                let current = match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                    Some(v) => Some(s.decode_position(&key, v.value())?),
                    None => None,
                };
                if current.map(|p| p.epoch) != Some(epoch) {
                    return Ok(false);
                }
                let p = StoredPosition {
                    epoch,
                    next_offset: Some(next_offset),
                };
                t.insert(key.as_str(), p.encode().as_str())
                    .map_err(|e| s.fail(e))?;
                Ok(true)
            })
        })
        .await
    }

    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError> {
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = match txn.open_table(POSITIONS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(s.fail(e)),
            };
            let prefix = s.key("");
            let mut out = Vec::new();
            for row in t.range(prefix.as_str()..).map_err(|e| s.fail(e))? {
                let (k, v) = row.map_err(|e| s.fail(e))?;
                let Some(partition) = k.value().strip_prefix(prefix.as_str()) else {
                    break;
                };
                out.push((
                    partition.to_string(),
                    s.decode_position(k.value(), v.value())?,
                ));
            }
            Ok(out)
        })
        .await
    }
}

impl EmbeddedDedupStore {
    /// One durable write transaction over the positions table.
    fn positions_write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &str>) -> Result<T, DedupError>,
    ) -> Result<T, DedupError> {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        let out = {
            let mut table = txn.open_table(POSITIONS).map_err(|e| self.fail(e))?;
            f(&mut table)?
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(out)
    }

    fn decode_position(&self, key: &str, v: &str) -> Result<StoredPosition, DedupError> {
        StoredPosition::decode(v).ok_or_else(|| DedupError::Corrupt {
            store: self.describe(),
            id: format!("position of {}", key.replace('\0', ":")),
            value: v.to_string(),
        })
    }
}

impl EmbeddedDedupStore {
    pub fn describe(&self) -> String {
        format!("{} ({})", self.path.display(), self.namespace)
    }
}
