//! The summary `idem run` prints when it ends.

use crate::stats::format_positions;
use crate::supervisor::Supervised;
use std::sync::Arc;
use std::time::Duration;

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

pub async fn print_summary(connectors: &[Arc<Supervised>], elapsed: Duration, describe: bool) {
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
        if !s.lost.is_empty() {
            crate::say!(
                "    LOST: {} offsets the source deleted before they were committed ({})",
                s.lost.values().sum::<u64>(),
                s.lost
                    .iter()
                    .map(|(p, n)| format!("{n} in {p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if describe {
            match c.sink.describe().await {
                Ok(d) => crate::say!("    sink: {d}"),
                Err(e) => crate::say!("    sink: cannot describe: {e}"),
            }
        }
    }
}
