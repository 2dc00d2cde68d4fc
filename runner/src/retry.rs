//! The retry policy, in one layer: a transient failure of any step (open,
//! commit, dead letters, the dedup store) waits `initial_backoff * 2^n`,
//! capped at `max_backoff` and jittered, up to `max_attempts` tries; a stop
//! ends a wait at once.

use crate::stats::Stats;
use idem_config::RetryConfig;
use idem_core::SinkError;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// An error that says whether trying again can help.
pub trait Retriable {
    fn is_retriable(&self) -> bool;

    /// The least the next try should wait, when the other side said so.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Retriable for SinkError {
    fn is_retriable(&self) -> bool {
        SinkError::is_retriable(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        SinkError::retry_after(self)
    }
}

impl Retriable for idem_core::SourceError {
    fn is_retriable(&self) -> bool {
        idem_core::SourceError::is_retriable(self)
    }
}

impl Retriable for idem_dedup_store::DedupError {
    fn is_retriable(&self) -> bool {
        idem_dedup_store::DedupError::is_retriable(self)
    }
}

/// The delay before retry `n` (0 for the first): `initial_backoff * 2^n`
/// capped at `max_backoff`, then jittered down to between half and all of
/// it, so that runners do not retry in step and the cap always holds.
pub fn backoff_delay(cfg: &RetryConfig, n: u32) -> Duration {
    use rand::{Rng, SeedableRng};
    let grown = cfg
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(n.min(31)));
    grown
        .min(cfg.max_backoff)
        .mul_f64(rand::rngs::SmallRng::from_os_rng().random_range(0.5..=1.0))
}

/// Capped exponential backoff with jitter on transient errors; permanent
/// errors (and `Fenced`) return at once. `stop` ends a backoff at once:
/// the last error is returned, and the caller, seeing `stop` cancelled,
/// abandons the operation instead of failing (see `RunError::retriable`).
pub async fn retry_transient<T, E, F, Fut>(
    cfg: &RetryConfig,
    stats: &Stats,
    what: &str,
    stop: &CancellationToken,
    mut f: F,
) -> Result<T, E>
where
    E: Retriable + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries: usize = 0;
    let result = loop {
        tries += 1;
        match f().await {
            Ok(v) => break Ok(v),
            Err(e) => {
                let more = cfg.max_attempts == 0 || tries < cfg.max_attempts;
                if !e.is_retriable() || !more || stop.is_cancelled() {
                    break Err(e);
                }
                // A destination that said when to call again is not
                // called sooner.
                let delay =
                    backoff_delay(cfg, (tries - 1) as u32).max(e.retry_after().unwrap_or_default());
                stats.retrying(&format!("failed to {what}: {e}"));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "failed to {what}; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {
                        info!(error = %e, "stopping: no more tries to {what}");
                        break Err(e);
                    }
                }
            }
        }
    };
    match &result {
        Ok(_) => stats.succeeded(),
        Err(e) => {
            stats.error(&format!("failed to {what}: {e}"));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;

    #[derive(Debug)]
    struct Simulated;

    impl std::fmt::Display for Simulated {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("simulated")
        }
    }

    impl std::error::Error for Simulated {}

    #[test]
    fn backoff_grows_and_never_passes_its_cap_jitter_included() {
        let cfg = RetryConfig {
            max_attempts: 0,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
        };
        for n in 0..200 {
            let d = backoff_delay(&cfg, n);
            assert!(d <= cfg.max_backoff, "retry {n}: {d:?}");
            let uncapped = Duration::from_millis(100).saturating_mul(1 << n.min(20));
            assert!(d >= uncapped.min(cfg.max_backoff) / 2, "retry {n}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_backoff_at_once() {
        let cfg = RetryConfig {
            max_attempts: 0,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
        };
        let stats = Stats::default();
        let stop = CancellationToken::new();
        let tries = AtomicUsize::new(0);
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.cancel();
        });
        let started = Instant::now();
        let r: Result<(), SinkError> = retry_transient(&cfg, &stats, "commit", &stop, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(SinkError::Transient(Box::new(Simulated))) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        // Paused time: the stop came after 1 s, not after the 15-30 s backoff.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
