//! Named fail points for crash tests. `IDEM_FAILPOINTS="name=N,other=M"`
//! makes the Nth hit of `name` abort the process on the spot, as a power
//! loss would: no destructor runs, no buffer is flushed, nothing commits.
//! Without the variable a fail point costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// After the sink wrote a batch's rows, before its transaction commits.
pub const AFTER_WRITE: &str = "after_write";
/// After the sink committed, before the source is acked.
pub const AFTER_COMMIT: &str = "after_commit";
/// In the middle of the sink's bulk write of a batch.
pub const MID_WRITE: &str = "mid_write";

fn points() -> &'static HashMap<String, AtomicU64> {
    static POINTS: OnceLock<HashMap<String, AtomicU64>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("IDEM_FAILPOINTS")
            .map(|spec| parse(&spec))
            .unwrap_or_default()
    })
}

fn parse(spec: &str) -> HashMap<String, AtomicU64> {
    spec.split(',')
        .filter_map(|item| {
            let (name, n) = item.trim().split_once('=').unwrap_or((item.trim(), "1"));
            let n = n.trim().parse::<u64>().ok()?;
            (!name.is_empty()).then(|| (name.to_string(), AtomicU64::new(n.max(1))))
        })
        .collect()
}

/// Count a hit of `name`; abort the process if this is the configured one.
pub fn hit(name: &str) {
    let points = points();
    if points.is_empty() {
        return;
    }
    if let Some(left) = points.get(name) {
        if left.fetch_sub(1, Ordering::SeqCst) == 1 {
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
        let p = parse("after_write=3, after_commit ,bad=x");
        assert_eq!(p["after_write"].load(Ordering::SeqCst), 3);
        assert_eq!(p["after_commit"].load(Ordering::SeqCst), 1);
        assert!(!p.contains_key("bad"));
    }
}
