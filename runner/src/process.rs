//! The running process: its connectors under their supervisors, what they
//! share (metrics, the config file), and reload. Read by the admin API.

use crate::connector::Connector;
use crate::registry::Config;
use crate::stats::{Metrics, Stats};
use crate::supervisor::{Command, Shutdown, State, Supervised};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// The running process: its connectors, what they share, and how to
/// reload them.
pub struct Process {
    pub config_path: PathBuf,
    pub metrics: Arc<Metrics>,
    connectors: RwLock<Vec<Arc<Supervised>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    changed: Arc<Notify>,
    shutdown: Shutdown,
    /// The `[runner]` table as written, to tell a reload it changed.
    runner_raw: Mutex<Option<toml::Value>>,
    /// The whole file as read at start, for each connector's table.
    raw_at_start: toml::Table,
    reloading: tokio::sync::Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Serialize, Default)]
pub struct ReloadReport {
    pub restarted: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    pub warnings: Vec<String>,
}

/// Read and validate a config file, with each connector's table as written.
fn read_config(path: &Path) -> Result<(Config, toml::Table), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config: Config = idem_config::parse(path, &text)
        .and_then(|c| crate::registry::with_schema_columns(path, c))
        .map_err(|e| e.to_string())?;
    let raw: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    Ok((config, raw))
}

fn raw_section(raw: &toml::Table, path: &[&str]) -> toml::Value {
    let mut v = toml::Value::Table(raw.clone());
    for key in path {
        v = match v.get(key) {
            Some(x) => x.clone(),
            None => return toml::Value::Table(Default::default()),
        };
    }
    v
}

impl Process {
    pub fn new(config_path: &Path, shutdown: Shutdown) -> Process {
        let raw: toml::Table = std::fs::read_to_string(config_path)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        Process {
            config_path: config_path.to_path_buf(),
            metrics: Arc::new(Metrics::default()),
            connectors: RwLock::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            changed: Arc::new(Notify::new()),
            shutdown,
            runner_raw: Mutex::new(Some(raw_section(&raw, &["runner"]))),
            raw_at_start: raw,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Start connector `name` as the config file read at start writes it.
    pub fn spawn_from_file(&self, name: &str, cfg: crate::registry::ConnectorConfig) {
        let table = raw_section(&self.raw_at_start, &["connectors", name]);
        self.spawn(name, cfg, table);
    }

    /// Wait for every connector's task to end.
    pub async fn join(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stop every connector: in-flight batches commit, then the run ends.
    pub fn stop(&self) {
        self.shutdown.stop.cancel();
    }

    /// A connector changed state (or one was added or removed).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    pub fn connectors(&self) -> Vec<Arc<Supervised>> {
        self.connectors
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Supervised>> {
        self.connectors().into_iter().find(|c| c.name == name)
    }

    fn spawn(
        &self,
        name: &str,
        cfg: crate::registry::ConnectorConfig,
        raw: toml::Value,
    ) -> Arc<Supervised> {
        let stats = Arc::new(Stats::new(name, self.metrics.clone()));
        let (sup, task) = Supervised::spawn(
            name,
            cfg,
            raw,
            stats,
            self.changed.clone(),
            self.shutdown.clone(),
        );
        if let Ok(mut t) = self.tasks.lock() {
            t.push(task);
        }
        if let Ok(mut c) = self.connectors.write() {
            c.push(sup.clone());
        }
        sup
    }

    /// Re-read the config file; restart only the connectors whose table
    /// changed, start new ones, stop removed ones. An invalid file changes
    /// nothing.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let (config, raw) = read_config(&self.config_path)
            .map_err(|e| format!("reload refused, nothing changed: {e}"))?;
        let mut report = ReloadReport::default();
        let existing = self.connectors();
        let mut plan = Vec::new();
        let wanted: Vec<String> = config.connectors.keys().cloned().collect();
        for (name, cfg) in config.connectors {
            let table = raw_section(&raw, &["connectors", &name]);
            let current = existing.iter().find(|c| c.name == name);
            if current.is_some_and(|c| c.raw() == table) {
                report.unchanged.push(name);
                continue;
            }
            // Everything that can be checked without I/O, before anything
            // changes: one bad connector refuses the whole reload.
            Connector::build(&name, cfg.clone())
                .map_err(|e| format!("reload refused, nothing changed: {e}"))?;
            plan.push((name, cfg, table, current.cloned()));
        }
        for (name, cfg, table, current) in plan {
            match current {
                Some(c) => match c.reload(cfg, table) {
                    Ok(()) => report.restarted.push(name),
                    Err(e) => report.warnings.push(e.to_string()),
                },
                None => {
                    self.spawn(&name, cfg, table);
                    report.added.push(name);
                }
            }
        }
        for c in existing.iter().filter(|c| !wanted.contains(&c.name)) {
            let _ = c.command(Command::Remove);
            report.removed.push(c.name.clone());
        }
        if let Ok(mut list) = self.connectors.write() {
            list.retain(|c| !report.removed.contains(&c.name));
        }
        let runner = raw_section(&raw, &["runner"]);
        if let Ok(mut r) = self.runner_raw.lock() {
            if r.as_ref().is_some_and(|old| *old != runner) {
                report.warnings.push(
                    "[runner] settings changed; they take effect when idem is restarted".into(),
                );
            }
            *r = Some(runner);
        }
        info!(
            restarted = ?report.restarted,
            added = ?report.added,
            removed = ?report.removed,
            unchanged = report.unchanged.len(),
            "config reloaded"
        );
        for w in &report.warnings {
            warn!("{w}");
        }
        Ok(report)
    }

    /// Ask the source of a running connector for each partition's end, and
    /// record the lag in the metrics. Bounded in time: a scrape must answer.
    pub async fn refresh_source_ends(&self, c: &Supervised) -> Vec<PartitionStatus> {
        let snapshot = c.stats.snapshot();
        let (mut positions, lost, staged) = (snapshot.positions, snapshot.lost, snapshot.staged);
        // A partition written to and never committed yet (a staging sink's
        // first roll) is shown too, committed at 0.
        for p in staged.keys() {
            positions.entry(p.clone()).or_insert(0);
        }
        let source = match c.current() {
            Some(conn) if c.state() == State::Running => Some(conn.source.clone()),
            _ => None,
        };
        // Concurrently, each bounded: a scrape answers within 2 s even
        // with a broker down and many partitions.
        let ends = futures_util::future::join_all(positions.keys().map(|partition| {
            let source = source.clone();
            async move {
                match source {
                    Some(s) => {
                        tokio::time::timeout(Duration::from_secs(2), s.end_offset(partition))
                            .await
                            .ok()
                            .flatten()
                    }
                    None => None,
                }
            }
        }))
        .await;
        let mut out = Vec::new();
        for ((partition, committed), end) in positions.into_iter().zip(ends) {
            if let Some(e) = end {
                self.metrics
                    .set_source_end(&c.name, &partition, e, committed);
            }
            out.push(PartitionStatus {
                lost: lost.get(&partition).copied().unwrap_or(0),
                written: staged.get(&partition).copied(),
                lag: end.map(|e| e.saturating_sub(committed)),
                partition,
                committed,
                source_end: end,
            });
        }
        out
    }

    /// One connector as `GET /connectors/{name}` shows it.
    pub async fn describe(&self, c: &Supervised) -> serde_json::Value {
        let s = c.stats.snapshot();
        let r = c.readiness();
        let current = c.current();
        let partitions = self.refresh_source_ends(c).await;
        let event = |e: Option<crate::stats::Event>| {
            e.map(|e| json!({"message": e.message, "at": rfc3339(e.at)}))
        };
        json!({
            "name": c.name,
            "state": c.state(),
            "ready": r.ready,
            "reason": r.reason,
            "guarantee": current.as_ref().map(|c| c.sink.info().guarantee.to_string()),
            "source": current.as_ref().map(|c| c.source.name().to_string()),
            "sink": current.as_ref().map(|c| c.cfg.sink.kind()),
            "read": s.read,
            "written": s.written,
            "deduplicated": s.deduplicated,
            "dead_lettered": s.dead_lettered,
            "dead_letters": current.as_ref().map(|c| c.dead_letters.describe()),
            "batches": s.batches,
            "retries": s.retries,
            "fenced": s.fenced,
            "lost": s.lost.values().sum::<u64>(),
            "partitions": partitions,
            "failing": event(c.stats.failing()),
            "last_error": event(c.stats.last_error()),
        })
    }
}

/// One partition in `GET /connectors/{name}`.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub partition: String,
    /// The next offset after the last committed batch.
    pub committed: u64,
    /// The next offset after the last batch written, when a staging sink
    /// (S3 objects open across batches) holds batches after `committed`
    /// that it has not yet committed.
    pub written: Option<u64>,
    pub source_end: Option<u64>,
    pub lag: Option<u64>,
    /// Offsets the source deleted before they were committed, this process.
    pub lost: u64,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
