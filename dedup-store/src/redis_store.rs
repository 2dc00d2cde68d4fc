//! Ids in Redis: one key per id, `idem:{namespace}:{id}`, holding `D` or
//! the reservation, with the retention as its TTL. A batch is one round
//! trip: a pipeline of `SET .. NX PX .. GET` reserves what is free and
//! returns what holds the rest (a Lua script does it on Redis before 7.0).
//!
//! Redis keeps ids in memory (and on disk only if it is configured to): a
//! restarted Redis without persistence has forgotten every id. Idem checks
//! a marker key on every call and reports the loss (`DedupError` with
//! `retriable = false`) rather than treating every id as new in silence.

use crate::{Claim, DedupError, DedupStore, Entry, Seen, StoredPosition};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Reserves free (or expired, or `owner`'s own) ids and returns, per key,
/// `""` when reserved now or the value that holds it. Fails with
/// `IDEM_LOST` when the namespace's marker is gone.
/// KEYS: marker, ids...; ARGV: ttl ms, owner prefix, value per id.
const RESERVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('IDEM_LOST')
end
local out = {}
local ttl = ARGV[1]
local mine = ARGV[2]
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if (not v) or v:sub(1, #mine) == mine then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ttl)
    out[i - 1] = ''
  else
    out[i - 1] = v
  end
end
return out
"#;

/// Deletes ids still reserved by the owner. KEYS: ids; ARGV: owner prefix.
const RELEASE: &str = r#"
local mine = ARGV[1]
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and v:sub(1, #mine) == mine then
    redis.call('DEL', KEYS[i])
  end
end
return 0
"#;

/// Bumps a partition's epoch. KEYS: marker, positions hash; ARGV:
/// partition. A missing marker is a lost store (`IDEM_LOST`), not a
/// partition never seen.
const OPEN_POSITION: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('IDEM_LOST')
end
local v = redis.call('HGET', KEYS[2], ARGV[1])
local epoch, nxt = 0, ''
if v then
  local t = string.find(v, '\t', 1, true)
  epoch = tonumber(v:sub(1, t - 1))
  nxt = v:sub(t + 1)
end
epoch = epoch + 1
redis.call('HSET', KEYS[2], ARGV[1], epoch .. '\t' .. nxt)
return epoch .. '\t' .. nxt
"#;

/// Stores a position if the epoch is current. KEYS: marker, positions
/// hash; ARGV: partition, epoch, next offset. Returns 1, or 0 when fenced;
/// `IDEM_LOST` when the store lost its data (a position gone with it is
/// not a newer owner's doing).
const SAVE_POSITION: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('IDEM_LOST')
end
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
local t = string.find(v, '\t', 1, true)
if v:sub(1, t - 1) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '\t' .. ARGV[3])
return 1
"#;

pub struct RedisDedupStore {
    conn: ConnectionManager,
    url: String,
    namespace: String,
    retention: Duration,
    reserve: redis::Script,
    release: redis::Script,
    open_position: redis::Script,
    save_position: redis::Script,
    /// The server lacks `SET .. NX GET` (before 7.0): reserve by script.
    script_only: AtomicBool,
}

impl RedisDedupStore {
    /// Connects to `url` (`redis://[:password@]host:port[/db]`;
    /// `rediss://` for TLS, verified against the system's roots or against
    /// `ca_file`, a PEM file, when given) and keeps ids under
    /// `idem:{namespace}:`.
    pub async fn connect(
        url: &str,
        ca_file: Option<&std::path::Path>,
        namespace: &str,
        retention: Duration,
    ) -> Result<Self, DedupError> {
        let shown = redact(url);
        // The binary links two rustls providers (ring, and aws-lc through
        // the AWS SDK); redis's TLS takes the process default: pick one.
        // An error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match ca_file {
            None => redis::Client::open(url).map_err(|e| unavailable(&shown, &e))?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| DedupError::Unavailable {
                    store: shown.clone(),
                    message: format!("cannot read the CA file {}: {e}", path.display()),
                    retriable: false,
                })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(url, certs).map_err(|e| unavailable(&shown, &e))?
            }
        };
        let fail = |e: redis::RedisError| {
            let mut err = unavailable(&shown, &e);
            if let DedupError::Unavailable { message, .. } = &mut err {
                if e.is_connection_refusal() || e.is_io_error() && !message.contains("certificate")
                {
                    message.push_str(
                        "; is Redis running there? (for Idem's tests: bash scripts/redis.sh)",
                    );
                }
            }
            err
        };
        // Fail fast at start (a wrong certificate or password does not get
        // better); the runner's own retries cover outages later.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            ConnectionManager::new_with_config(client, config),
        )
            .await
            .map_err(|_| DedupError::Unavailable {
                store: shown.clone(),
                message: "no answer within 10 s; is Redis running there? (for Idem's tests: bash scripts/redis.sh)".into(),
                retriable: true,
            })?
            .map_err(fail)?;
        Ok(RedisDedupStore {
            conn,
            url: shown,
            namespace: namespace.to_string(),
            retention,
            reserve: redis::Script::new(RESERVE),
            script_only: AtomicBool::new(false),
            release: redis::Script::new(RELEASE),
            open_position: redis::Script::new(OPEN_POSITION),
            save_position: redis::Script::new(SAVE_POSITION),
        })
    }

    /// Reserve through the Lua script, as with a Redis before 7.0 (for
    /// tests of that path).
    pub fn reserving_by_script(self) -> Self {
        self.script_only.store(true, Ordering::Relaxed);
        self
    }

    fn key(&self, id: &str) -> String {
        // The braces keep a namespace's keys in one Redis Cluster slot.
        format!("idem:{{{}}}:{id}", self.namespace)
    }

    /// The hash of the namespace's positions (no TTL).
    fn positions_key(&self) -> String {
        format!("idem:{{{}}}:_positions", self.namespace)
    }

    /// The key whose absence means the store lost its ids.
    fn marker(&self) -> String {
        format!("idem:{{{}}}:_marker", self.namespace)
    }

    /// Write the marker if it is missing; `true` if it was there. A
    /// missing marker with ids recorded before means the store lost them.
    pub async fn ensure_marker(&self) -> Result<bool, DedupError> {
        let mut conn = self.conn.clone();
        let created: bool = redis::cmd("SET")
            .arg(self.marker())
            .arg("1")
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(|e| self.err(&e))?
            .is_some();
        Ok(!created)
    }

    /// One pipeline: the marker's check, then `SET id reservation NX PX
    /// ttl GET` per claim, which reserves a free id and returns what holds
    /// a taken one (`None`: reserved now).
    async fn reserve_pipelined(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Option<String>>, redis::RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(self.marker());
        for c in claims {
            pipe.cmd("SET")
                .arg(self.key(&c.id))
                .arg(Entry::reserved(owner, c))
                .arg("NX")
                .arg("PX")
                .arg(self.retention.as_millis() as u64)
                .arg("GET");
        }
        let mut conn = self.conn.clone();
        let (marker, held): (i64, Vec<Option<String>>) = {
            let mut out: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            let first = out.remove(0);
            let marker = redis::from_redis_value(first)?;
            let held = out
                .into_iter()
                .map(redis::from_redis_value)
                .collect::<Result<_, _>>()?;
            (marker, held)
        };
        if marker == 0 {
            // As the script would have said it.
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "IDEM_LOST",
            )));
        }
        Ok(held)
    }

    /// What each claim found (`None`: reserved now). The owner's own
    /// older reservations are moved to the claims' positions.
    async fn seen(
        &self,
        owner: &str,
        claims: &[&Claim],
        held: Vec<Option<String>>,
    ) -> Result<Vec<Seen>, DedupError> {
        let mut out = Vec::with_capacity(claims.len());
        let mut mine = Vec::new();
        for (c, v) in claims.iter().zip(held) {
            let Some(v) = v else {
                out.push(Seen::New);
                continue;
            };
            match Entry::parse(&v) {
                Some(e) => match e.seen_by(owner) {
                    Some(seen) => out.push(seen),
                    None => {
                        mine.push(*c);
                        out.push(Seen::New);
                    }
                },
                None => {
                    return Err(DedupError::Corrupt {
                        store: self.describe(),
                        id: c.id.clone(),
                        value: v,
                    })
                }
            }
        }
        if !mine.is_empty() {
            self.take_over(owner, &mine).await?;
        }
        Ok(out)
    }

    /// SET each key to its value with the retention as TTL, pipelined.
    async fn set_all(
        &self,
        pairs: impl Iterator<Item = (String, String)>,
    ) -> Result<(), DedupError> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (key, value) in pairs {
            any = true;
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(self.retention.as_millis() as u64)
                .ignore();
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(&e))
    }

    fn err(&self, e: &redis::RedisError) -> DedupError {
        if e.to_string().contains("IDEM_LOST") {
            return DedupError::Lost {
                store: self.describe(),
            };
        }
        unavailable(&self.describe(), e)
    }
}

/// `redis://:secret@host` without the secret.
/// Whether `url` can name a Redis server, without connecting; the
/// message never repeats the URL (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    if !(url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis+unix://")
        || url.starts_with("unix://"))
    {
        return Err("not a Redis URL: it must start with redis:// (or rediss:// for TLS), e.g. redis://:PASSWORD@127.0.0.1:6379/0".into());
    }
    url.into_connection_info().map(|_| ()).map_err(|e| {
        format!(
            "not a Redis URL: {}",
            e.detail().unwrap_or("it does not parse")
        )
    })
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn unavailable(store: &str, e: &redis::RedisError) -> DedupError {
    DedupError::Unavailable {
        store: store.to_string(),
        message: e.to_string(),
        // Refused connections, timeouts, a Redis loading its data: wait.
        retriable: e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
            ),
    }
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn reserve_distinct(
        &self,
        owner: &str,
        claims: &[&Claim],
    ) -> Result<Vec<Seen>, DedupError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        if !self.script_only.load(Ordering::Relaxed) {
            match self.reserve_pipelined(owner, claims).await {
                Err(e)
                    if e.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                        && e.to_string().to_lowercase().contains("syntax") =>
                {
                    // Redis before 7.0: no `SET .. NX GET`.
                    self.script_only.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(self.err(&e)),
                Ok(held) => return self.seen(owner, claims, held).await,
            }
        }
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.marker());
        for c in claims {
            inv.key(self.key(&c.id));
        }
        inv.arg(self.retention.as_millis() as u64);
        inv.arg(owner_prefix(owner));
        for c in claims {
            inv.arg(Entry::reserved(owner, c));
        }
        let mut conn = self.conn.clone();
        let held: Vec<String> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        let held = held
            .into_iter()
            .map(|v| if v.is_empty() { None } else { Some(v) })
            .collect();
        self.seen(owner, claims, held).await
    }

    async fn confirm(&self, ids: &[&str]) -> Result<(), DedupError> {
        self.set_all(ids.iter().map(|id| (self.key(id), "D".to_string())))
            .await
    }

    async fn take_over(&self, owner: &str, claims: &[&Claim]) -> Result<(), DedupError> {
        self.set_all(
            claims
                .iter()
                .map(|c| (self.key(&c.id), Entry::reserved(owner, c))),
        )
        .await
    }

    async fn release(&self, owner: &str, ids: &[&str]) -> Result<(), DedupError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut inv = self.release.prepare_invoke();
        for id in ids {
            inv.key(self.key(id));
        }
        inv.arg(owner_prefix(owner));
        let mut conn = self.conn.clone();
        inv.invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.err(&e))
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    fn describe(&self) -> String {
        format!("{} (idem:{{{}}})", self.url, self.namespace)
    }

    async fn open_position(&self, partition: &str) -> Result<StoredPosition, DedupError> {
        let mut conn = self.conn.clone();
        let v: String = self
            .open_position
            .key(self.marker())
            .key(self.positions_key())
            .arg(partition)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        self.decode_position(partition, &v)
    }

    async fn save_position(
        &self,
        partition: &str,
        epoch: i64,
        next_offset: u64,
    ) -> Result<bool, DedupError> {
        let mut conn = self.conn.clone();
        let saved: i64 = self
            .save_position
            .key(self.marker())
            .key(self.positions_key())
            .arg(partition)
            .arg(epoch)
            .arg(next_offset)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(saved == 1)
    }

    async fn positions(&self) -> Result<Vec<(String, StoredPosition)>, DedupError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.positions_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        let mut out = all
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), self.decode_position(&k, &v)?)))
            .collect::<Result<Vec<_>, DedupError>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn accept_loss(&self) -> Result<(), DedupError> {
        self.ensure_marker().await.map(|_| ())
    }
}

impl RedisDedupStore {
    fn decode_position(&self, partition: &str, v: &str) -> Result<StoredPosition, DedupError> {
        StoredPosition::decode(v).ok_or_else(|| DedupError::Corrupt {
            store: self.describe(),
            id: format!("position of {partition}"),
            value: v.to_string(),
        })
    }
}

/// How every value `owner` reserves starts, for the scripts.
fn owner_prefix(owner: &str) -> String {
    format!("R\t{owner}\t")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("rediss://user:p@ss@h:6380"), "rediss://***@h:6380");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
