//! `idem run`: connectors side by side under their supervisors, the admin
//! server, progress lines, signals and reload, then the summary.

use crate::connector::Connector;
use crate::process::Process;
use crate::registry::Config;
use crate::report::print_summary;
use crate::stats::{format_positions, Snapshot};
use crate::supervisor::{Shutdown, State};
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Overrides `[runner.admin] listen` (e.g. to run several `idem` side by
/// side with port 0).
pub const ADMIN_LISTEN_ENV: &str = "IDEM_ADMIN_LISTEN";

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
    let admin = bind_admin(&config).await?;
    let shutdown = Shutdown {
        stop: CancellationToken::new(),
        give_up: CancellationToken::new(),
        grace,
    };
    let process = Arc::new(Process::new(config_path, shutdown.clone()));
    let started = Instant::now();
    for (name, cfg) in config.connectors {
        process.spawn_from_file(&name, cfg);
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
            _ = process.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    shutdown.stop.cancel();
    process.join().await;
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
    // An abandoned batch may still hold the sink: describe and close it
    // only if not.
    if !abandoned {
        for c in list.iter().filter_map(|s| s.current()) {
            if let Err(e) = c.sink.close().await {
                warn!(connector = %c.name, error = %e, "closing the sink failed; the next start recovers it");
            }
        }
    }
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
    process.stop();
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
