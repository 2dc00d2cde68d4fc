//! `idem run` and `idem check`: connectors side by side, progress lines,
//! signals, and the summary.

use crate::pipeline::{Connector, RunError};
use crate::plugins::Config;
use crate::stats::{format_positions, Snapshot};
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Build every connector or none: a config mistake stops the start.
fn build_all(config: Config) -> Result<Vec<Arc<Connector>>, RunError> {
    config
        .connectors
        .into_iter()
        .map(|(name, c)| Connector::build(&name, c).map(Arc::new))
        .collect()
}

/// `idem run`: returns the process exit code.
pub async fn run(config: Config) -> anyhow::Result<i32> {
    let progress_every = config.runner.progress_interval;
    let grace = config.runner.shutdown_grace;
    let connectors = build_all(config)?;
    for c in &connectors {
        let info = c.sink.info();
        info!(connector = %c.name, guarantee = %info.guarantee, why = %info.why, "starting");
        if let Some(line) = dedup_line(c).await {
            match line {
                Ok((l, warnings)) => {
                    info!(connector = %c.name, "{l}");
                    for w in warnings {
                        warn!(connector = %c.name, "{w}");
                    }
                }
                Err(e) => anyhow::bail!("connector `{}`: {e}", c.name),
            }
        }
    }
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in &connectors {
        let c2 = c.clone();
        let token = stop.child_token();
        handles.push((c.clone(), tokio::spawn(async move { c2.run(token).await })));
    }
    let progress = tokio::spawn(progress_loop(connectors.clone(), progress_every));
    let signals = tokio::spawn(shutdown_on_signal(stop.clone()));

    // One grace period for all connectors, from the first stop signal.
    let give_up = CancellationToken::new();
    let grace_timer = {
        let (stop, give_up) = (stop.clone(), give_up.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
            give_up.cancel();
        })
    };
    let mut failed = false;
    let mut abandoned = false;
    for (c, mut handle) in handles {
        let outcome = tokio::select! {
            joined = &mut handle => Some(joined),
            _ = give_up.cancelled() => None,
        };
        match outcome {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                error!(connector = %c.name, "{e}");
                failed = true;
            }
            Some(Err(e)) => {
                error!(connector = %c.name, "task failed: {e}");
                failed = true;
            }
            None => {
                warn!(connector = %c.name, grace_ms = grace.as_millis() as u64, "in-flight batch abandoned after the shutdown grace period; it will be read again on restart");
                abandoned = true;
            }
        }
    }
    progress.abort();
    signals.abort();
    grace_timer.abort();
    // An abandoned batch may still hold the sink: describe it only if not.
    print_summary(&connectors, started.elapsed(), !abandoned).await;
    Ok(if failed || abandoned { 1 } else { 0 })
}

async fn shutdown_on_signal(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot listen for SIGTERM: {e}");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping reads and committing in-flight batches"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping reads and committing in-flight batches"),
    }
    stop.cancel();
}

async fn progress_loop(connectors: Vec<Arc<Connector>>, every: Duration) {
    let mut last: Vec<(Instant, Snapshot)> = connectors
        .iter()
        .map(|c| (Instant::now(), c.stats.snapshot()))
        .collect();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        for (c, (t0, before)) in connectors.iter().zip(last.iter_mut()) {
            let now = c.stats.snapshot();
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
            *t0 = Instant::now();
            *before = now;
        }
    }
}

async fn print_summary(connectors: &[Arc<Connector>], elapsed: Duration, describe: bool) {
    println!("idem: finished in {:.1}s", elapsed.as_secs_f64());
    for c in connectors {
        let s = c.stats.snapshot();
        let rate = s.committed() as f64 / elapsed.as_secs_f64().max(1e-3);
        println!(
            "  {}: {} read -> {} written, {} deduplicated, {} dead-lettered ({rate:.0} msg/s, {} batches, {} retries{})",
            c.name,
            s.read,
            s.written,
            s.deduplicated,
            s.dead_lettered,
            s.batches,
            s.retries,
            if s.fenced > 0 { format!(", {} partitions fenced", s.fenced) } else { String::new() },
        );
        if s.dead_lettered > 0 {
            println!("    dead letters: {}", c.dead_letters.path().display());
        }
        println!("    positions: {}", format_positions(&s.positions));
        if describe {
            match c.sink.describe().await {
                Ok(d) => println!("    sink: {d}"),
                Err(e) => println!("    sink: cannot describe: {e}"),
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
                println!("✗ {name}: {e}");
                ok = false;
            }
            Ok(c) => {
                let info = c.sink.info();
                if let Some(line) = dedup_line(&c).await {
                    match line {
                        Ok((l, warnings)) => {
                            println!("  {name}: {l}");
                            for w in warnings {
                                println!("    warning: {w}");
                            }
                        }
                        Err(e) => {
                            println!("✗ {name}: {e}");
                            ok = false;
                            continue;
                        }
                    }
                }
                let prepared = c.sink.prepare().await;
                match prepared {
                    Ok(()) => {
                        println!("✓ {name}: {} (required: {required})", info.guarantee);
                        println!("    why: {}", info.why);
                        let positions = c
                            .sink
                            .positions(&name)
                            .await
                            .with_context(|| format!("connector {name}: read positions"))?;
                        println!("    committed partitions: {}", positions.len());
                    }
                    Err(e) => {
                        println!("✗ {name}: {} sink: {e}", c.cfg.sink.kind());
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
async fn dedup_line(c: &Connector) -> Option<Result<(String, Vec<String>), String>> {
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

/// `idem status CONFIG`: committed positions as each sink stores them.
pub async fn status(config: Config) -> anyhow::Result<i32> {
    println!(
        "{:<20} {:<8} {:>14} {:>14} {:>12} {:>6}  partition",
        "connector", "source", "next offset", "source end", "lag", "epoch"
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
            println!(
                "{:<20} {:<8} {:>14} {:>14} {:>12} {:>6}  {}",
                name,
                p.source,
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
