//! Dedup stores: ids checked and recorded per second (a `reserve` then a
//! `confirm` per batch, as a sink's commit does), for the embedded redb
//! file, Redis and PostgreSQL, at batch sizes 1, 100 and 1,000, with 10% of
//! ids repeated; beside `redis-benchmark`'s SET rate on the same machine in
//! the same run (one SET per round trip, and pipelined by 100).
//!
//! `cargo bench -p idem --bench dedup_load`; `IDEM_BENCH_IDS` (default
//! 1,000,000) ids per run at batch sizes 100 and 1,000, and
//! `IDEM_BENCH_IDS_ONE` (default 20,000) at batch size 1, where every id is
//! its own round trip (and, for the embedded store, its own fsync).
//! Needs Redis (scripts/redis.sh) and PostgreSQL (scripts/postgres.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use idem_dedup_store::{
    Claim, DedupStore, EmbeddedDedupStore, PostgresDedupStore, RedisDedupStore, Seen,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RETENTION: Duration = Duration::from_secs(3600);

fn ids(n: usize) -> Vec<Claim> {
    // Every tenth id repeats one seen five positions earlier.
    (0..n as u64)
        .map(|i| {
            let id = if i % 10 == 9 { i - 5 } else { i };
            Claim::new(format!("evt-{id:012}"), "bench/0", i)
        })
        .collect()
}

/// (seconds, ids/s, duplicates found) for `claims` in batches of `size`.
async fn run(store: &dyn DedupStore, claims: &[Claim], size: usize) -> (f64, f64, usize) {
    let started = Instant::now();
    let mut dups = 0;
    for batch in claims.chunks(size) {
        let seen = store.reserve("bench", batch).await.unwrap();
        let new: Vec<&str> = batch
            .iter()
            .zip(&seen)
            .filter(|(_, s)| **s == Seen::New)
            .map(|(c, _)| c.id.as_str())
            .collect();
        dups += batch.len() - new.len();
        store.confirm(&new).await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    (secs, claims.len() as f64 / secs, dups)
}

fn redis_benchmark(pipeline: usize) -> f64 {
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "-t",
            "set",
            "-n",
            "200000",
            "-c",
            "1",
            "-q",
        ])
        .args(["-P", &pipeline.to_string()])
        .output()
        .expect("redis-benchmark (Debian redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET: 41254.12 requests per second, p50=..." (with \r progress lines)
    text.rsplit('\r')
        .flat_map(|l| l.lines())
        .find_map(|l| {
            l.strip_prefix("SET: ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = common::env_usize("IDEM_BENCH_IDS", 1_000_000);
    let n_one = common::env_usize("IDEM_BENCH_IDS_ONE", 20_000);
    let pg_url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://idem:idem@127.0.0.1:5432/idem_test".into());
    let redis_url =
        std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let dir = tempfile::tempdir().unwrap();
    let stamp = std::process::id();

    println!("dedup stores: reserve + confirm per batch, 10% repeated ids, 2 cores");
    println!("| store | batch | ids | elapsed | ids/s | repeats found |");
    println!("|---|---|---|---|---|---|");
    for size in [1usize, 100, 1000] {
        let count = if size == 1 { n_one } else { n };
        let claims = ids(count);
        for kind in ["embedded", "redis", "postgres"] {
            let ns = format!("bench_{stamp}_{kind}_{size}");
            let store: Arc<dyn DedupStore> = match kind {
                "embedded" => Arc::new(Arc::new(
                    EmbeddedDedupStore::open(
                        &dir.path().join(format!("{ns}.redb")),
                        &ns,
                        RETENTION,
                    )
                    .unwrap(),
                )),
                "redis" => {
                    let s = RedisDedupStore::connect(&redis_url, None, &ns, RETENTION)
                        .await
                        .unwrap();
                    s.ensure_marker().await.unwrap();
                    Arc::new(s)
                }
                _ => {
                    let cfg: tokio_postgres::Config = pg_url.parse().unwrap();
                    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
                    let pool = deadpool_postgres::Pool::builder(mgr)
                        .max_size(2)
                        .build()
                        .unwrap();
                    Arc::new(
                        PostgresDedupStore::open(
                            pool,
                            "bench",
                            &format!("bench_dedup_{stamp}"),
                            &ns,
                            &ns,
                            RETENTION,
                        )
                        .await
                        .unwrap(),
                    )
                }
            };
            let (secs, rate, dups) = run(store.as_ref(), &claims, size).await;
            println!("| {kind} | {size} | {count} | {secs:.2} s | {rate:.0} | {dups} |");
        }
    }
    let one = redis_benchmark(1);
    let piped = redis_benchmark(100);
    println!("redis-benchmark SET, 1 client, 200,000 requests: {one:.0}/s one per round trip, {piped:.0}/s pipelined by 100");
    // The bench's own keys expire with the retention; drop the PG schema.
    let cfg: tokio_postgres::Config = pg_url.parse().unwrap();
    if let Ok((client, conn)) = cfg.connect(tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS bench_dedup_{stamp} CASCADE"
            ))
            .await;
    }
}
