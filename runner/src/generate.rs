//! `idem generate`: sample events for the quickstart, tests and benchmarks,
//! with no network. Each event is about 200 bytes of JSON with 8 fields.
//! Optionally some events repeat an earlier event id (as a producer retry
//! would) and some lines are malformed (for the dead letters).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;

pub struct GenerateOptions {
    pub count: u64,
    /// Fraction of events that repeat an earlier event's id and body.
    pub duplicates: f64,
    /// Malformed lines mixed in (not counted in `count`).
    pub malformed: u64,
    pub seed: u64,
    /// Event ids of 20 random hex digits, as production ids (UUIDs,
    /// hashes) are, instead of `evt-0000000001`, `evt-0000000002`...:
    /// sequential ids make index inserts cheaper than real data does.
    pub random_ids: bool,
    /// Event times at random over this many days from 2026-01-01, as a
    /// day-partitioned lake receives late and backfilled events; 0: one
    /// second apart, in order.
    pub spread_days: u32,
}

const KINDS: [&str; 5] = ["order", "payment", "refund", "click", "signup"];
const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
/// The malformed lines mixed in, in turn.
pub const MALFORMED: [&str; 4] = [
    "{\"event_id\": \"broken",
    "this is not json",
    "{\"user_id\": 1, \"kind\": \"order\"}",
    "{\"event_id\": \"bad-amount\", \"user_id\": 1, \"kind\": \"order\", \"amount\": \"twelve\", \"at\": \"2026-01-01T00:00:00Z\"}",
];

fn event(i: u64, rng: &mut SmallRng, opts: &GenerateOptions) -> String {
    let start = 1_767_225_600; // 2026-01-01
    let secs = match opts.spread_days {
        0 => start + i as i64,
        days => start + rng.random_range(0..i64::from(days) * 86_400),
    };
    let at = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    let id = if opts.random_ids {
        format!("{:020x}", rng.random::<u128>() >> 48)
    } else {
        format!("evt-{i:010}")
    };
    format!(
        "{{\"event_id\":\"{id}\",\"user_id\":{},\"kind\":\"{}\",\"amount\":{:.2},\"currency\":\"{}\",\"ok\":{},\"at\":\"{}\",\"note\":\"{}\"}}",
        rng.random_range(1..100_000u32),
        KINDS[rng.random_range(0..KINDS.len())],
        rng.random_range(0.0..1000.0f64),
        CURRENCIES[rng.random_range(0..CURRENCIES.len())],
        rng.random_bool(0.9),
        at.format("%Y-%m-%dT%H:%M:%SZ"),
        "x".repeat(rng.random_range(30..50usize)),
    )
}

/// Write the events; returns (lines written, distinct event ids).
pub fn generate(out: &mut dyn Write, opts: &GenerateOptions) -> std::io::Result<(u64, u64)> {
    let mut rng = SmallRng::seed_from_u64(opts.seed);
    let mut bodies: Vec<String> = Vec::new();
    let mut lines = 0u64;
    let malformed_every = opts
        .count
        .checked_div(opts.malformed)
        .map_or(u64::MAX, |n| n.max(1));
    let mut malformed_left = opts.malformed;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    for i in 0..opts.count {
        let repeat = !bodies.is_empty() && rng.random_bool(opts.duplicates.clamp(0.0, 1.0));
        let line = if repeat {
            let j = rng.random_range(bodies.len().saturating_sub(1000)..bodies.len());
            bodies[j].clone()
        } else {
            let e = event(bodies.len() as u64, &mut rng, opts);
            if opts.duplicates > 0.0 {
                bodies.push(e.clone());
            } else {
                bodies.push(String::new());
            }
            e
        };
        w.write_all(line.as_bytes())?;
        w.write_all(b"\n")?;
        lines += 1;
        if malformed_left > 0 && (i + 1) % malformed_every == 0 {
            w.write_all(MALFORMED[(malformed_left % 4) as usize].as_bytes())?;
            w.write_all(b"\n")?;
            malformed_left -= 1;
            lines += 1;
        }
    }
    w.flush()?;
    Ok((lines, bodies.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_and_malformed_lines() {
        let mut buf = Vec::new();
        let opts = GenerateOptions {
            count: 1000,
            duplicates: 0.1,
            malformed: 10,
            seed: 7,
            random_ids: false,
            spread_days: 0,
        };
        let (lines, distinct) = generate(&mut buf, &opts).unwrap();
        assert_eq!(lines, 1010);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 1010);
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let ids: std::collections::BTreeSet<_> = parsed
            .iter()
            .filter(|v| {
                v["event_id"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("evt-"))
            })
            .map(|v| v["event_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len() as u64, distinct);
        assert!(distinct < 1000 && distinct > 800, "{distinct}");
        let avg = text.len() / 1010;
        assert!((150..260).contains(&avg), "average line {avg} bytes");
    }

    #[test]
    fn random_ids_are_twenty_hex_digits_and_copies_keep_theirs() {
        let mut buf = Vec::new();
        let opts = GenerateOptions {
            count: 2000,
            duplicates: 0.05,
            malformed: 0,
            seed: 3,
            random_ids: true,
            spread_days: 0,
        };
        let (_, distinct) = generate(&mut buf, &opts).unwrap();
        let ids: Vec<String> = String::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["event_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 20 && id.chars().all(|c| c.is_ascii_hexdigit())));
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len() as u64, distinct);
        assert!(distinct < 2000 && distinct > 1800, "{distinct}");
        // Not in order: a random id is as likely below its predecessor.
        let descents = ids.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(descents > 700, "{descents}");
    }

    #[test]
    fn spread_days_scatter_event_times_over_that_many_days() {
        let mut buf = Vec::new();
        let opts = GenerateOptions {
            count: 3000,
            duplicates: 0.0,
            malformed: 0,
            seed: 5,
            random_ids: false,
            spread_days: 28,
        };
        generate(&mut buf, &opts).unwrap();
        let days: Vec<String> = String::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["at"].as_str().unwrap()[..10].to_string()
            })
            .collect();
        let distinct: std::collections::BTreeSet<&String> = days.iter().collect();
        assert_eq!(distinct.len(), 28, "{distinct:?}");
        assert_eq!(distinct.first().map(|d| d.as_str()), Some("2026-01-01"));
        assert_eq!(distinct.last().map(|d| d.as_str()), Some("2026-01-28"));
        // Interleaved, not one day after another.
        let changes = days.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes > 2500, "{changes}");
    }

    #[test]
    fn same_seed_same_output() {
        let opts = GenerateOptions {
            count: 50,
            duplicates: 0.2,
            malformed: 2,
            seed: 1,
            random_ids: false,
            spread_days: 0,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        generate(&mut a, &opts).unwrap();
        generate(&mut b, &opts).unwrap();
        assert_eq!(a, b);
    }
}
