//! Named fail points for crash tests. `IDEM_FAILPOINTS="name=N,other=M"`
//! makes the Nth hit of `name` abort the process on the spot, as a power
//! loss would: no destructor runs, no buffer is flushed, nothing commits.
//! `name=N:stop` instead stops the process there (SIGSTOP) until a SIGCONT,
//! as a long GC pause or a frozen VM would: the stale runner of a fencing
//! test. `name@PARTITION=sleep:MS` makes every hit of `name` for that
//! partition wait MS milliseconds: a slow sink for one partition, for flow
//! control tests. Without the variable a fail point costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// After the sink wrote a batch's rows, before its transaction commits.
pub const AFTER_WRITE: &str = "after_write";
/// After the sink committed, before the source is acked.
pub const AFTER_COMMIT: &str = "after_commit";
/// In the middle of the sink's bulk write of a batch.
pub const MID_WRITE: &str = "mid_write";
/// A batch is complete and about to be handed to the sink.
pub const BEFORE_COMMIT: &str = "before_commit";
/// A table format's sink (Iceberg) has checked the table's positions and
/// epochs and is about to send its catalog commit.
pub const BEFORE_CATALOG_COMMIT: &str = "before_catalog_commit";

struct Point {
    left: AtomicU64,
    stop: bool,
}

fn points() -> &'static HashMap<String, Point> {
    static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("IDEM_FAILPOINTS")
            .map(|spec| parse(&spec))
            .unwrap_or_default()
    })
}

/// `name@partition` -> how long each hit waits.
fn delays() -> &'static HashMap<String, std::time::Duration> {
    static DELAYS: OnceLock<HashMap<String, std::time::Duration>> = OnceLock::new();
    DELAYS.get_or_init(|| {
        std::env::var("IDEM_FAILPOINTS")
            .map(|spec| parse_delays(&spec))
            .unwrap_or_default()
    })
}

fn parse_delays(spec: &str) -> HashMap<String, std::time::Duration> {
    spec.split(',')
        .filter_map(|item| {
            let (point, action) = item.trim().split_once('=')?;
            let ms = action.trim().strip_prefix("sleep:")?.parse::<u64>().ok()?;
            point
                .contains('@')
                .then(|| (point.to_string(), std::time::Duration::from_millis(ms)))
        })
        .collect()
}

/// How long a hit of `name` for `partition` must wait, if configured.
pub fn delay(name: &str, partition: &str) -> Option<std::time::Duration> {
    let delays = delays();
    if delays.is_empty() {
        return None;
    }
    delays.get(&format!("{name}@{partition}")).copied()
}

fn parse(spec: &str) -> HashMap<String, Point> {
    spec.split(',')
        .filter_map(|item| {
            let (name, n) = item.trim().split_once('=').unwrap_or((item.trim(), "1"));
            let (n, stop) = match n.trim().split_once(':') {
                Some((n, "stop")) => (n, true),
                Some(_) => return None,
                None => (n.trim(), false),
            };
            let n = n.trim().parse::<u64>().ok()?;
            let point = Point {
                left: AtomicU64::new(n.max(1)),
                stop,
            };
            (!name.is_empty()).then(|| (name.to_string(), point))
        })
        .collect()
}

/// Count a hit of `name`; abort the process if this is the configured one.
pub fn hit(name: &str) {
    let points = points();
    if points.is_empty() {
        return;
    }
    if let Some(point) = points.get(name) {
        if point.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            if point.stop {
                eprintln!("idem: fail point `{name}` reached: stopping the process");
                // The shell's `kill`: no unsafe code for a test-only path.
                let _ = std::process::Command::new("sh")
                    .args(["-c", &format!("kill -STOP {}", std::process::id())])
                    .status();
                return;
            }
            eprintln!("idem: fail point `{name}` reached: aborting the process");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_defaults() {
        let p = parse("after_write=3, after_commit ,bad=x,before_commit=2:stop,odd=1:zz");
        assert_eq!(p["after_write"].left.load(Ordering::SeqCst), 3);
        assert!(!p["after_write"].stop);
        assert_eq!(p["after_commit"].left.load(Ordering::SeqCst), 1);
        assert_eq!(p["before_commit"].left.load(Ordering::SeqCst), 2);
        assert!(p["before_commit"].stop);
        assert!(!p.contains_key("bad"));
        assert!(!p.contains_key("odd"));
    }

    #[test]
    fn parses_delays_per_partition() {
        let d = parse_delays("before_commit@t/0=sleep:250, after_write=2, x@y=zz");
        assert_eq!(
            d.get("before_commit@t/0"),
            Some(&std::time::Duration::from_millis(250))
        );
        assert_eq!(d.len(), 1);
        // A delay is not a crash point.
        assert!(parse("before_commit@t/0=sleep:250").is_empty());
    }
}
