//! `idem run`, `idem check` and `idem status`: connectors side by side
//! under their supervisors, the admin server, progress lines, signals,
//! reload, and the summary.

use crate::pipeline::Connector;
use crate::plugins::Config;
use crate::stats::{format_positions, Metrics, Snapshot, Stats};
use crate::supervisor::{Command, Shutdown, State, Supervised};
use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Overrides `[runner.admin] listen` (e.g. to run several `idem` side by
/// side with port 0).
pub const ADMIN_LISTEN_ENV: &str = "IDEM_ADMIN_LISTEN";

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
    let config: Config = idem_config::parse(path, &text).map_err(|e| e.to_string())?;
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
        cfg: crate::plugins::ConnectorConfig,
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
        let positions = c.stats.snapshot().positions;
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
    pub source_end: Option<u64>,
    pub lag: Option<u64>,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Bind the admin server before anything starts, so a taken port or a
/// missing token stops the start with a clear error.
async fn bind_admin(
    config: &Config,
) -> anyhow::Result<Option<(tokio::net::TcpListener, Option<String>)>> {
    let admin = &config.runner.admin;
    let from_env = std::env::var(ADMIN_LISTEN_ENV)
        .ok()
        .filter(|v| !v.is_empty());
    if !admin.enabled && from_env.is_none() {
        return Ok(None);
    }
    let (listen, origin) = match from_env {
        Some(v) => (v, ADMIN_LISTEN_ENV.to_string()),
        None => (admin.listen.clone(), "runner.admin.listen".to_string()),
    };
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("{origin} = {listen:?} is not an IP address and port"))?;
    let token = match &admin.token_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.is_empty() => {
                idem_config::redact::register(&t);
                Some(t)
            }
            _ => anyhow::bail!(
                "runner.admin.token_env names the environment variable {var}, which is not set: set it to the admin API's bearer token, or remove token_env"
            ),
        },
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for the admin API ({origin}); is another idem running? Set [runner.admin] listen to a free port, or enabled = false"
        )
    })?;
    if token.is_none() && !addr.ip().is_loopback() {
        warn!(%addr, "the admin API listens beyond this host without a token: anyone who reaches it can pause, restart and reload connectors; set runner.admin.token_env");
    }
    Ok(Some((listener, token)))
}

/// `idem run`: returns the process exit code.
pub async fn run(config: Config, config_path: &Path) -> anyhow::Result<i32> {
    let progress_every = config.runner.progress_interval;
    let grace = config.runner.shutdown_grace;
    // Every connector must build (no I/O) before any starts: a config
    // mistake stops the start.
    for (name, cfg) in &config.connectors {
        Connector::build(name, cfg.clone())?;
    }
    let raw: toml::Table = std::fs::read_to_string(config_path)
        .ok()
        .and_then(|t| toml::from_str(&t).ok())
        .unwrap_or_default();
    let admin = bind_admin(&config).await?;
    let shutdown = Shutdown {
        stop: CancellationToken::new(),
        give_up: CancellationToken::new(),
        grace,
    };
    let process = Arc::new(Process {
        config_path: config_path.to_path_buf(),
        metrics: Arc::new(Metrics::default()),
        connectors: RwLock::new(Vec::new()),
        tasks: Mutex::new(Vec::new()),
        changed: Arc::new(Notify::new()),
        shutdown: shutdown.clone(),
        runner_raw: Mutex::new(Some(raw_section(&raw, &["runner"]))),
        reloading: tokio::sync::Mutex::new(()),
    });
    let started = Instant::now();
    for (name, cfg) in config.connectors {
        let table = raw_section(&raw, &["connectors", &name]);
        process.spawn(&name, cfg, table);
    }
    let server_done = CancellationToken::new();
    let server = admin.map(|(listener, token)| {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        info!(%addr, "admin API listening: /healthz /readyz /metrics /connectors");
        let app = crate::admin::router(process.clone(), token);
        let done = server_done.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { done.cancelled().await })
                .await;
            if let Err(e) = served {
                error!("admin API stopped: {e}");
            }
        })
    });
    let progress = tokio::spawn(progress_loop(process.clone(), progress_every));
    let signals = tokio::spawn(on_signals(process.clone()));
    let grace_timer = {
        let s = shutdown.clone();
        tokio::spawn(async move {
            s.stop.cancelled().await;
            tokio::time::sleep(s.grace).await;
            s.give_up.cancel();
        })
    };
    // Until stopped, or until no connector can do anything more by itself
    // (every one finished or failed: batch mode's end).
    loop {
        if shutdown.stop.is_cancelled() {
            break;
        }
        let list = process.connectors();
        if !list.is_empty() && list.iter().all(|c| c.state().is_at_rest()) {
            break;
        }
        tokio::select! {
            _ = shutdown.stop.cancelled() => {}
            _ = process.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    shutdown.stop.cancel();
    let tasks: Vec<_> = process
        .tasks
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    signals.abort();
    grace_timer.abort();
    server_done.cancel();
    if let Some(s) = server {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    let list = process.connectors();
    let failed = list.iter().any(|c| c.state() == State::Failed);
    let abandoned = list.iter().any(|c| c.abandoned());
    // An abandoned batch may still hold the sink: describe it only if not.
    print_summary(&list, started.elapsed(), !abandoned).await;
    Ok(if failed || abandoned { 1 } else { 0 })
}

/// SIGTERM/SIGINT stop; SIGHUP reloads the config.
async fn on_signals(process: Arc<Process>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot listen for SIGTERM/SIGHUP: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM: stopping reads and committing in-flight batches");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                info!("SIGINT: stopping reads and committing in-flight batches");
                break;
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", process.config_path.display());
                if let Err(e) = process.reload().await {
                    error!("{e}");
                }
            }
        }
    }
    process.shutdown.stop.cancel();
}

async fn progress_loop(process: Arc<Process>, every: Duration) {
    // Per connector name: when last logged, and the counters then.
    let mut last: std::collections::HashMap<String, (Instant, Snapshot)> = Default::default();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        for c in process.connectors() {
            let now = c.stats.snapshot();
            let (t0, before) = last.remove(&c.name).unwrap_or_else(|| {
                let now = Instant::now();
                (now.checked_sub(every).unwrap_or(now), Snapshot::default())
            });
            let state = c.state();
            if matches!(state, State::Running | State::Starting) {
                let secs = t0.elapsed().as_secs_f64().max(1e-3);
                let rate = (now.committed() - before.committed()) as f64 / secs;
                info!(
                    connector = %c.name,
                    read = now.read,
                    written = now.written,
                    deduplicated = now.deduplicated,
                    dead_lettered = now.dead_lettered,
                    rate = format!("{rate:.0} msg/s"),
                    positions = %format_positions(&now.positions),
                    "progress"
                );
            }
            last.insert(c.name.clone(), (Instant::now(), now));
        }
    }
}

/// The process's peak resident memory so far (Linux: `VmHWM`).
fn peak_memory_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

async fn print_summary(connectors: &[Arc<Supervised>], elapsed: Duration, describe: bool) {
    match peak_memory_mib() {
        Some(mib) => crate::say!(
            "idem: finished in {:.1}s, peak memory {mib} MiB",
            elapsed.as_secs_f64()
        ),
        None => crate::say!("idem: finished in {:.1}s", elapsed.as_secs_f64()),
    }
    for sup in connectors {
        let s = sup.stats.snapshot();
        let rate = s.committed() as f64 / elapsed.as_secs_f64().max(1e-3);
        crate::say!(
            "  {}: {} read -> {} written, {} deduplicated, {} dead-lettered ({rate:.0} msg/s, {} batches, {} retries{})",
            sup.name,
            s.read,
            s.written,
            s.deduplicated,
            s.dead_lettered,
            s.batches,
            s.retries,
            if s.fenced > 0 { format!(", {} partitions fenced", s.fenced) } else { String::new() },
        );
        if let Some(f) = sup.failure() {
            crate::say!("    failed: {}", f.message);
        }
        let Some(c) = sup.current() else { continue };
        if s.dead_lettered > 0 {
            crate::say!("    dead letters: {}", c.dead_letters.describe());
        }
        crate::say!("    positions: {}", format_positions(&s.positions));
        if describe {
            match c.sink.describe().await {
                Ok(d) => crate::say!("    sink: {d}"),
                Err(e) => crate::say!("    sink: cannot describe: {e}"),
            }
        }
    }
}

/// `idem check`: validate, open each sink, print each guarantee and why.
pub async fn check(config: Config) -> anyhow::Result<i32> {
    let mut ok = true;
    for (name, cfg) in config.connectors {
        let required = cfg.guarantee;
        match Connector::build(&name, cfg) {
            Err(e) => {
                crate::say!("✗ {name}: {e}");
                ok = false;
            }
            Ok(c) => {
                let info = c.sink.info();
                if let Some(line) = dedup_line(&c).await {
                    match line {
                        Ok((l, warnings)) => {
                            crate::say!("  {name}: {l}");
                            for w in warnings {
                                crate::say!("    warning: {w}");
                            }
                        }
                        Err(e) => {
                            crate::say!("✗ {name}: {e}");
                            ok = false;
                            continue;
                        }
                    }
                }
                let prepared = c.sink.prepare().await;
                match prepared {
                    Ok(()) => {
                        crate::say!("✓ {name}: {} (required: {required})", info.guarantee);
                        crate::say!("    why: {}", info.why);
                        crate::say!("    dead letters: {}", c.dead_letters.describe());
                        let positions = c
                            .sink
                            .positions(&name)
                            .await
                            .with_context(|| format!("connector {name}: read positions"))?;
                        crate::say!("    committed partitions: {}", positions.len());
                    }
                    Err(e) => {
                        crate::say!("✗ {name}: {} sink: {e}", c.cfg.sink.kind());
                        ok = false;
                    }
                }
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// What the dedup stage of `c` rests on, once its store is open, and what
/// weakens it; `None` without one.
pub async fn dedup_line(c: &Connector) -> Option<Result<(String, Vec<String>), String>> {
    use idem_dedup_store::DedupStore;
    let stage = c.dedup.as_ref()?;
    let d = stage.store.config();
    if let Err(e) = stage.store.get().await {
        return Some(Err(format!("dedup store: {e}")));
    }
    let kept = humantime::format_duration(d.retention);
    let line = format!(
        "dedup: ids from {} in {}, remembered for {kept}",
        d.id,
        stage.store.describe(),
    );
    let mut warnings = Vec::new();
    if d.store == idem_config::DedupStoreKind::Embedded && !c.cfg.source.is_bounded() {
        warnings.push("the embedded dedup store is this runner's own file: with more than one runner reading the same source, use store = \"redis\" or \"postgres\"".to_string());
    }
    for (topic, source_keeps) in c.source.retention().await {
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
    Some(Ok((line, warnings)))
}

/// Where `idem status` finds a running idem's admin API for `config`.
fn admin_url(config: &Config) -> Option<String> {
    let listen = std::env::var(ADMIN_LISTEN_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            config
                .runner
                .admin
                .enabled
                .then(|| config.runner.admin.listen.clone())
        })?;
    let mut addr: std::net::SocketAddr = listen.parse().ok()?;
    if addr.port() == 0 {
        return None;
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(format!("http://{addr}"))
}

/// `idem status`: a running idem's view through its admin API when one
/// answers, else the positions each sink has stored.
pub async fn status(config: Option<Config>, url: Option<String>) -> anyhow::Result<i32> {
    let explicit = url.is_some();
    let url = url.or_else(|| config.as_ref().and_then(admin_url));
    if let Some(url) = url {
        match fetch_status(&url).await {
            Ok(v) => return Ok(print_api_status(&url, &v)),
            Err(e) if explicit => {
                anyhow::bail!("cannot read the admin API at {url}: {e}")
            }
            Err(_) => {}
        }
    }
    let Some(config) = config else {
        anyhow::bail!("give a config file, or --url of a running idem's admin API");
    };
    crate::say!("no running idem answers for this config: positions as the sinks store them");
    status_from_sinks(config).await
}

async fn fetch_status(url: &str) -> Result<serde_json::Value, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| e.to_string())?;
    let answer = client
        .get(format!("{}/connectors", url.trim_end_matches('/')))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("answered {}", answer.status()));
    }
    let body = answer.bytes().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("not an idem admin API: {e}"))
}

/// Print the table; 0 when every connector is ready, 1 otherwise (so
/// scripts can use it as a check).
fn print_api_status(url: &str, v: &serde_json::Value) -> i32 {
    crate::say!(
        "idem at {url} running {}",
        v["config"].as_str().unwrap_or("?")
    );
    crate::say!(
        "{:<20} {:<10} {:>14} {:>14} {:>12}  partition",
        "connector",
        "state",
        "committed",
        "source end",
        "lag"
    );
    let mut all_ready = true;
    let empty = Vec::new();
    for c in v["connectors"].as_array().unwrap_or(&empty) {
        let name = c["name"].as_str().unwrap_or("?");
        let state = c["state"].as_str().unwrap_or("?");
        let num = |x: &serde_json::Value| x.as_u64().map_or("-".to_string(), |n| n.to_string());
        let parts = c["partitions"].as_array().unwrap_or(&empty);
        if parts.is_empty() {
            crate::say!(
                "{name:<20} {state:<10} {:>14} {:>14} {:>12}  -",
                "-",
                "-",
                "-"
            );
        }
        for p in parts {
            crate::say!(
                "{name:<20} {state:<10} {:>14} {:>14} {:>12}  {}",
                num(&p["committed"]),
                num(&p["source_end"]),
                num(&p["lag"]),
                p["partition"].as_str().unwrap_or("?")
            );
        }
        if c["ready"].as_bool() != Some(true) {
            all_ready = false;
            crate::say!(
                "  {name}: not ready: {}",
                c["reason"].as_str().unwrap_or("unknown")
            );
        }
        if let Some(e) = c["last_error"]["message"].as_str() {
            crate::say!(
                "  {name}: last error at {}: {e}",
                c["last_error"]["at"].as_str().unwrap_or("?")
            );
        }
    }
    if all_ready {
        0
    } else {
        1
    }
}

/// Committed positions as each sink stores them (no idem runs: every
/// connector is `stopped`).
async fn status_from_sinks(config: Config) -> anyhow::Result<i32> {
    crate::say!(
        "{:<20} {:<10} {:>14} {:>14} {:>12} {:>6}  partition",
        "connector",
        "state",
        "committed",
        "source end",
        "lag",
        "epoch"
    );
    for (name, cfg) in config.connectors {
        let c = Connector::build(&name, cfg)?;
        c.sink
            .prepare()
            .await
            .with_context(|| format!("connector {name}: open the sink"))?;
        for p in c.sink.positions(&name).await? {
            let end = c.source.end_offset(&p.partition).await;
            let show = |o: Option<u64>| o.map_or("-".to_string(), |o| o.to_string());
            let lag = end.map(|e| e.saturating_sub(p.next_offset.unwrap_or(0)));
            crate::say!(
                "{:<20} {:<10} {:>14} {:>14} {:>12} {:>6}  {}",
                name,
                "stopped",
                show(p.next_offset),
                show(end),
                show(lag),
                p.epoch,
                p.partition
            );
        }
    }
    Ok(0)
}
