//! Per-connector counters and the process's Prometheus metrics. Progress
//! lines, the final summary, the admin API and `/metrics` read the same
//! numbers: each event is counted once, here.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    connector: String,
    partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabels {
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    connector: String,
    state: String,
}

type Hist = Family<ConnectorLabels, Histogram, fn() -> Histogram>;

/// Every metric `/metrics` serves, in one registry.
pub struct Metrics {
    registry: Registry,
    read: Family<PartitionLabels, Counter>,
    written: Family<PartitionLabels, Counter>,
    deduplicated: Family<PartitionLabels, Counter>,
    dead_lettered: Family<PartitionLabels, Counter>,
    batches: Family<PartitionLabels, Counter>,
    position: Family<PartitionLabels, Gauge>,
    staged: Family<PartitionLabels, Gauge>,
    source_end: Family<PartitionLabels, Gauge>,
    lag: Family<PartitionLabels, Gauge>,
    fenced: Family<PartitionLabels, Counter>,
    lost: Family<PartitionLabels, Counter>,
    retries: Family<ConnectorLabels, Counter>,
    commit_seconds: Hist,
    batch_messages: Hist,
    last_error: Family<ConnectorLabels, Gauge>,
    state: Family<StateLabels, Gauge>,
    ready: Family<ConnectorLabels, Gauge>,
}

/// The states a connector can be in, as `/metrics` and the API name them.
pub const STATES: [&str; 7] = [
    "starting",
    "running",
    "paused",
    "restarting",
    "failed",
    "finished",
    "stopped",
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name: &str, help: &str| {
            let f = Family::<PartitionLabels, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let read = counter("idem_messages_read", "Messages read from the source");
        let written = counter(
            "idem_messages_written",
            "Messages whose effect a committed batch applied to the sink",
        );
        let deduplicated = counter(
            "idem_messages_deduplicated",
            "Messages dropped as copies of a message already applied",
        );
        let dead_lettered = counter(
            "idem_messages_dead_lettered",
            "Messages sent to the dead letters (unparseable, unmappable, or refused by the sink)",
        );
        let batches = counter(
            "idem_batches_committed",
            "Batches committed with their position",
        );
        let fenced = counter(
            "idem_fenced",
            "Times a partition was fenced by a newer owner (another runner took it over)",
        );
        let lost = counter(
            "idem_source_offsets_lost",
            "Source offsets the sink will never receive: the source deleted them (retention) before they were committed, and out_of_range said to go on",
        );
        let mut gauge = |name: &str, help: &str| {
            let f = Family::<PartitionLabels, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let position = gauge(
            "idem_committed_position",
            "The next source offset after the last committed batch",
        );
        let staged = gauge(
            "idem_written_position",
            "The next source offset after the last batch written: ahead of idem_committed_position while a staging sink (S3 objects open across batches) holds batches it has not yet committed",
        );
        let source_end = gauge(
            "idem_source_end_offset",
            "The source's end offset when scraped, where the source knows it",
        );
        let lag = gauge(
            "idem_lag_messages",
            "Messages in the source not yet committed: source end minus committed position",
        );
        let retries = Family::<ConnectorLabels, Counter>::default();
        registry.register(
            "idem_retries",
            "Operations retried after a transient error (sink, dedup store)",
            retries.clone(),
        );
        let commit_seconds: Hist =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        registry.register_with_unit(
            "idem_commit_duration",
            "Time to commit one batch to the sink, retries included",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let batch_messages: Hist =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 4.0, 10)));
        registry.register(
            "idem_batch_messages",
            "Messages per committed batch",
            batch_messages.clone(),
        );
        let last_error = Family::<ConnectorLabels, Gauge>::default();
        registry.register(
            "idem_last_error_timestamp_seconds",
            "Unix time of the connector's last error (a retried one included); 0 if none",
            last_error.clone(),
        );
        let state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "idem_connector_state",
            "1 for the connector's current state, 0 for the others",
            state.clone(),
        );
        let ready = Family::<ConnectorLabels, Gauge>::default();
        registry.register(
            "idem_connector_ready",
            "1 when the connector is ready (see /readyz), else 0",
            ready.clone(),
        );
        Metrics {
            registry,
            read,
            written,
            deduplicated,
            dead_lettered,
            batches,
            position,
            staged,
            source_end,
            lag,
            fenced,
            lost,
            retries,
            commit_seconds,
            batch_messages,
            last_error,
            state,
            ready,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Record the source's end for a partition, and the lag it implies.
    pub fn set_source_end(&self, connector: &str, partition: &str, end: u64, committed: u64) {
        let l = part(connector, partition);
        self.source_end.get_or_create(&l).set(end as i64);
        self.lag
            .get_or_create(&l)
            .set(end.saturating_sub(committed) as i64);
    }

    pub fn set_state(&self, connector: &str, state: &str, ready: bool) {
        for s in STATES {
            self.state
                .get_or_create(&StateLabels {
                    connector: connector.into(),
                    state: s.into(),
                })
                .set(i64::from(s == state));
        }
        self.ready
            .get_or_create(&ConnectorLabels {
                connector: connector.into(),
            })
            .set(i64::from(ready));
    }
}

fn part(connector: &str, partition: &str) -> PartitionLabels {
    PartitionLabels {
        connector: connector.into(),
        partition: partition.into(),
    }
}

/// An error and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub message: String,
    pub at: SystemTime,
}

/// One connector's counters; they outlive restarts of the connector.
pub struct Stats {
    connector: String,
    metrics: Arc<Metrics>,
    pub read: AtomicU64,
    pub written: AtomicU64,
    pub deduplicated: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
    pub fenced: AtomicU64,
    /// Offsets lost to the source's retention, per partition (see
    /// [`Stats::lost`]).
    lost: Mutex<BTreeMap<String, u64>>,
    /// Committed next offset per partition.
    positions: Mutex<BTreeMap<String, u64>>,
    /// Per partition whose sink holds batches written but not yet
    /// committed (a staging sink): the next offset after them.
    staged: Mutex<BTreeMap<String, u64>>,
    /// Partitions being opened (sink position read, source seeked).
    opening: AtomicUsize,
    /// The sink has been prepared since the connector last started.
    prepared: AtomicBool,
    /// An operation failing and being retried now; cleared by the next
    /// success.
    failing: Mutex<Option<Event>>,
    last_error: Mutex<Option<Event>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new("", Arc::new(Metrics::default()))
    }
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub read: u64,
    pub written: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub retries: u64,
    pub fenced: u64,
    pub positions: BTreeMap<String, u64>,
    /// Partitions with batches written but not yet committed, and the
    /// next offset after them (see [`Stats::set_written`]).
    pub staged: BTreeMap<String, u64>,
    /// Offsets lost to the source's retention per partition, this process.
    pub lost: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Messages whose fate is committed.
    pub fn committed(&self) -> u64 {
        self.written + self.deduplicated + self.dead_lettered
    }
}

/// A partition being opened; see [`Stats::opening`].
pub struct Opening<'a>(&'a AtomicUsize);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one committed batch did.
pub struct Committed<'a> {
    pub partition: &'a str,
    pub written: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub elapsed: Duration,
}

impl Stats {
    pub fn new(connector: &str, metrics: Arc<Metrics>) -> Self {
        Stats {
            connector: connector.into(),
            metrics,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            deduplicated: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            lost: Mutex::new(BTreeMap::new()),
            positions: Mutex::new(BTreeMap::new()),
            staged: Mutex::new(BTreeMap::new()),
            opening: AtomicUsize::new(0),
            prepared: AtomicBool::new(false),
            failing: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn labels(&self, partition: &str) -> PartitionLabels {
        part(&self.connector, partition)
    }

    fn connector_labels(&self) -> ConnectorLabels {
        ConnectorLabels {
            connector: self.connector.clone(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `n` messages read from `partition`.
    pub fn read(&self, partition: &str, n: u64) {
        Stats::add(&self.read, n);
        self.metrics
            .read
            .get_or_create(&self.labels(partition))
            .inc_by(n);
    }

    /// A batch committed: its counts, its position, its latency. A success
    /// also ends a run of failures.
    pub fn committed(&self, c: Committed<'_>) {
        let l = self.labels(c.partition);
        let m = &self.metrics;
        Stats::add(&self.written, c.written);
        Stats::add(&self.deduplicated, c.deduplicated);
        Stats::add(&self.dead_lettered, c.dead_lettered);
        Stats::add(&self.batches, 1);
        m.written.get_or_create(&l).inc_by(c.written);
        m.deduplicated.get_or_create(&l).inc_by(c.deduplicated);
        m.dead_lettered.get_or_create(&l).inc_by(c.dead_lettered);
        m.batches.get_or_create(&l).inc();
        let cl = self.connector_labels();
        m.commit_seconds
            .get_or_create(&cl)
            .observe(c.elapsed.as_secs_f64());
        m.batch_messages
            .get_or_create(&cl)
            .observe((c.written + c.deduplicated + c.dead_lettered) as f64);
        self.succeeded();
    }

    /// The position a partition opened at, or committed.
    pub fn set_position(&self, partition: &str, next_offset: u64) {
        if let Ok(mut p) = self.positions.lock() {
            p.insert(partition.to_string(), next_offset);
        }
        self.metrics
            .position
            .get_or_create(&self.labels(partition))
            .set(next_offset as i64);
    }

    /// The partition's batches are written through `written` and
    /// committed through `committed`: a staging sink may hold the ones
    /// between.
    pub fn set_written(&self, partition: &str, written: u64, committed: u64) {
        if let Ok(mut s) = self.staged.lock() {
            match written > committed {
                true => s.insert(partition.to_string(), written),
                false => s.remove(partition),
            };
        }
        self.metrics
            .staged
            .get_or_create(&self.labels(partition))
            .set(written.max(committed) as i64);
    }

    pub fn fenced(&self, partition: &str) {
        Stats::add(&self.fenced, 1);
        self.metrics
            .fenced
            .get_or_create(&self.labels(partition))
            .inc();
    }

    /// `n` offsets of `partition` the sink will never receive: the source
    /// deleted them before they were committed (`PartitionReader::lost`).
    pub fn lost(&self, partition: &str, n: u64) {
        if let Ok(mut l) = self.lost.lock() {
            *l.entry(partition.to_string()).or_default() += n;
        }
        self.metrics
            .lost
            .get_or_create(&self.labels(partition))
            .inc_by(n);
    }

    /// An operation failed and will be tried again.
    pub fn retrying(&self, error: &str) {
        Stats::add(&self.retries, 1);
        self.metrics
            .retries
            .get_or_create(&self.connector_labels())
            .inc();
        let e = self.error(error);
        if let Ok(mut f) = self.failing.lock() {
            *f = Some(e);
        }
    }

    /// An error worth remembering (the connector's last error).
    pub fn error(&self, error: &str) -> Event {
        let e = Event {
            // Shown by the admin API and `idem status`: secrets hidden.
            message: idem_config::redact::text(error).into_owned(),
            at: SystemTime::now(),
        };
        let secs =
            e.at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
        self.metrics
            .last_error
            .get_or_create(&self.connector_labels())
            .set(secs);
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e.clone());
        }
        e
    }

    /// An operation that may have been failing succeeded.
    pub fn succeeded(&self) {
        if let Ok(mut f) = self.failing.lock() {
            *f = None;
        }
    }

    pub fn failing(&self) -> Option<Event> {
        self.failing.lock().ok().and_then(|f| f.clone())
    }

    pub fn last_error(&self) -> Option<Event> {
        self.last_error.lock().ok().and_then(|f| f.clone())
    }

    /// The sink is prepared (or not, when the connector stops).
    pub fn set_prepared(&self, yes: bool) {
        self.prepared.store(yes, Ordering::Relaxed);
    }

    pub fn prepared(&self) -> bool {
        self.prepared.load(Ordering::Relaxed)
    }

    /// A partition starts opening; it is open when the guard drops (also
    /// when its task is aborted, so readiness never waits on a dead task).
    pub fn opening(&self) -> Opening<'_> {
        self.opening.fetch_add(1, Ordering::Relaxed);
        Opening(&self.opening)
    }

    pub fn partitions_opening(&self) -> usize {
        self.opening.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            read: get(&self.read),
            written: get(&self.written),
            deduplicated: get(&self.deduplicated),
            dead_lettered: get(&self.dead_lettered),
            batches: get(&self.batches),
            retries: get(&self.retries),
            fenced: get(&self.fenced),
            positions: self.positions.lock().map(|p| p.clone()).unwrap_or_default(),
            staged: self.staged.lock().map(|p| p.clone()).unwrap_or_default(),
            lost: self.lost.lock().map(|l| l.clone()).unwrap_or_default(),
        }
    }
}

/// `a/b/c/events.jsonl` -> `events.jsonl`: partitions named by long paths
/// read better by their last segment in progress lines.
pub fn short_partition(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

pub fn format_positions(positions: &BTreeMap<String, u64>) -> String {
    if positions.is_empty() {
        return "none yet".into();
    }
    let shown: Vec<String> = positions
        .iter()
        .take(4)
        .map(|(p, o)| format!("{}@{o}", short_partition(p)))
        .collect();
    let more = positions.len().saturating_sub(4);
    if more > 0 {
        format!("{} (+{more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_connector_and_partition() {
        let m = Arc::new(Metrics::default());
        let s = Stats::new("pay", m.clone());
        s.read("t/0", 10);
        s.committed(Committed {
            partition: "t/0",
            written: 7,
            deduplicated: 2,
            dead_lettered: 1,
            elapsed: Duration::from_millis(20),
        });
        s.set_position("t/0", 10);
        m.set_source_end("pay", "t/0", 15, 10);
        let text = m.encode();
        for line in [
            r#"idem_messages_read_total{connector="pay",partition="t/0"} 10"#,
            r#"idem_messages_written_total{connector="pay",partition="t/0"} 7"#,
            r#"idem_messages_deduplicated_total{connector="pay",partition="t/0"} 2"#,
            r#"idem_messages_dead_lettered_total{connector="pay",partition="t/0"} 1"#,
            r#"idem_batches_committed_total{connector="pay",partition="t/0"} 1"#,
            r#"idem_committed_position{connector="pay",partition="t/0"} 10"#,
            r#"idem_lag_messages{connector="pay",partition="t/0"} 5"#,
            r#"idem_batch_messages_count{connector="pay"} 1"#,
            r#"idem_commit_duration_seconds_count{connector="pay"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn a_success_ends_a_failure_but_not_the_last_error() {
        let s = Stats::default();
        s.retrying("connection refused");
        assert_eq!(
            s.failing().map(|e| e.message).as_deref(),
            Some("connection refused")
        );
        s.succeeded();
        assert!(s.failing().is_none());
        assert_eq!(
            s.last_error().map(|e| e.message).as_deref(),
            Some("connection refused")
        );
        assert_eq!(s.snapshot().retries, 1);
    }
}
