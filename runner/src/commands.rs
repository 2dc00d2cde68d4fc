//! `idem check` and `idem status`: one-shot commands over a config.

use crate::app::ADMIN_LISTEN_ENV;
use crate::connector::Connector;
use crate::registry::Config;
use anyhow::Context;
use std::time::Duration;

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
                if let Some(line) = c.dedup_line().await {
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
                if let Some(registry) = &c.registry {
                    match registry.ping().await {
                        Ok(n) => crate::say!(
                            "  {name}: schema registry {} answers ({n} subjects)",
                            registry.url()
                        ),
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
                        let b = &c.cfg.batch;
                        crate::say!(
                            "    batches: up to {} messages or {} bytes of values, or {} after the first",
                            b.records(),
                            b.max_bytes,
                            humantime::format_duration(b.linger)
                        );
                        let (records, bytes) = c.memory_allowance();
                        crate::say!(
                            "    in memory: up to {records} messages or {bytes} bytes of values at once, all partitions together"
                        );
                        if c.cfg.columns_from() == idem_config::ColumnsFrom::Schema {
                            // Columns nobody wrote down: show what the
                            // schema made of them.
                            let cols: Vec<String> = c
                                .cfg
                                .columns
                                .iter()
                                .map(|col| format!("{} {}", col.name, col.ty.name()))
                                .collect();
                            crate::say!(
                                "    columns (listed, then schema_file's fields): {}",
                                cols.join(", ")
                            );
                        }
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
            // Written and not yet committed: a staging sink's open objects.
            let written = p["written"].as_u64().map_or(String::new(), |w| {
                format!(" (written to {w}, not yet committed)")
            });
            crate::say!(
                "{name:<20} {state:<10} {:>14} {:>14} {:>12}  {}{written}",
                num(&p["committed"]),
                num(&p["source_end"]),
                num(&p["lag"]),
                p["partition"].as_str().unwrap_or("?")
            );
        }
        let lost: Vec<String> = parts
            .iter()
            .filter(|p| p["lost"].as_u64().unwrap_or(0) > 0)
            .map(|p| {
                format!(
                    "{} in {}",
                    num(&p["lost"]),
                    p["partition"].as_str().unwrap_or("?")
                )
            })
            .collect();
        if !lost.is_empty() {
            crate::say!(
                "  {name}: LOST {} offsets the source deleted before they were committed ({})",
                c["lost"].as_u64().unwrap_or(0),
                lost.join(", ")
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
