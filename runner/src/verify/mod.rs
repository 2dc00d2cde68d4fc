//! `idem verify CONFIG`: audit each connector's sink against its source.
//!
//! Every row a table sink writes carries the source position it came from
//! (`_idem_partition`, `_idem_offset`). The audit reads each partition from
//! its first retained message up to the position the sink has committed,
//! maps every message as the runner does, and checks that:
//! - every message that should have an effect has exactly one row (append:
//!   one per message; upsert: one per key, from the key's last message (a
//!   later copy of a message id dropped first, with `[dedup]`); dedup mode
//!   or a `[dedup]` stage on an append: one per message id);
//! - no row is left that no message explains (a position that holds no
//!   message, a dead-lettered one, or one past the committed position).
//!
//! Any finding exits 1. It holds about 60 bytes per message (a position,
//! an identity, a digest; each partition, key and id string once) and 24
//! per row, read from the sink as a stream.

mod against;

use crate::connector::{map_message, Connector, Item};
use crate::registry::Config;
use anyhow::Context;
use idem_config::WriteMode;
use idem_core::{Op, ReadStatus};
use std::collections::{BTreeMap, HashMap};

/// How a connector's rows relate to its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// One row per message.
    EachMessage,
    /// One row per key (the columns), holding the key's last message; a
    /// tombstone last means no row. `false`: a version column decides which
    /// message is the latest, and only the row count is checked.
    LatestPerKey(Vec<usize>, bool),
    /// One row per key (the columns), from its first message.
    FirstPerKey(Vec<usize>),
    /// One row per message id (a `[dedup]` stage), from its first message.
    FirstPerId,
}

fn expectation(c: &Connector) -> Expect {
    let cols = |key: &[String]| {
        key.iter()
            .filter_map(|k| c.cfg.columns.iter().position(|col| &col.name == k))
            .collect::<Vec<_>>()
    };
    // The sink says which rows its messages leave.
    let rows = c.sink.info().rows;
    match rows.mode {
        WriteMode::Upsert => Expect::LatestPerKey(cols(&rows.key), !rows.versioned),
        WriteMode::Dedup => Expect::FirstPerKey(cols(&rows.key)),
        WriteMode::Append if c.cfg.dedup.is_some() => Expect::FirstPerId,
        WriteMode::Append => Expect::EachMessage,
    }
}

/// What identifies a message's row: its own position `(partition,
/// offset)` when every message is a row, `(NAMED, name)` the interned key
/// it shares with its key's other messages, or `(HASHED, digest)` the
/// message id it shares with its copies (one per message: kept as a
/// digest, not a string).
type Identity = (u32, u64);
const NAMED: u32 = u32::MAX;
const HASHED: u32 = u32::MAX - 1;

/// One message that should leave a row (or, deleted, none): 40 bytes,
/// so a million of them fit in 40 MB.
struct Wanted {
    /// The interned partition and the offset.
    part: u32,
    offset: u64,
    identity: Identity,
    delete: bool,
    /// A digest of the row it makes: identical copies share it.
    digest: u64,
}

/// Strings held once and named by number: partitions, keys, ids.
#[derive(Default)]
struct Names(HashMap<Box<str>, u32>);

impl Names {
    fn of(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.0.get(name) {
            return i;
        }
        let i = u32::try_from(self.0.len()).unwrap_or(HASHED - 1);
        self.0.insert(name.into(), i);
        i
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.0.get(name).copied()
    }

    /// Every name, at its number.
    fn list(&self) -> Vec<&str> {
        let mut list = vec![""; self.0.len()];
        for (name, &i) in &self.0 {
            list[i as usize] = name;
        }
        list
    }
}

/// What the audit found for one connector.
#[derive(Default)]
struct Findings {
    messages: u64,
    dead: u64,
    rows: u64,
    missing: Vec<String>,
    duplicated: Vec<String>,
    unexplained: Vec<String>,
    stale: Vec<String>,
    /// Rows before the first retained message: nothing to check them against.
    before_retention: u64,
}

impl Findings {
    fn count(&self) -> usize {
        self.missing.len() + self.duplicated.len() + self.unexplained.len() + self.stale.len()
    }
}

/// `idem verify`: 0 when every audited connector holds each message exactly
/// once (with `against`, when its replica equals the source table), 1 on
/// any finding or a connector that cannot be audited.
pub async fn verify(
    config: Config,
    only: Option<String>,
    against: Option<String>,
) -> anyhow::Result<i32> {
    if let Some(name) = &only {
        anyhow::ensure!(
            config.connectors.contains_key(name),
            "no connector named `{name}` in the config"
        );
    }
    let mut ok = true;
    for (name, cfg) in config.connectors {
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        let c = Connector::build(&name, cfg)?;
        if let Some(url) = &against {
            match against::compare(&c, url).await? {
                None => {
                    crate::say!(
                        "✗ {name}: a {} sink cannot be read back yet (--against reads postgres and duckdb sinks)",
                        c.cfg.sink.kind()
                    );
                    ok = false;
                }
                Some(found) => {
                    for f in &found {
                        ok &= report_against(&name, f);
                    }
                }
            }
            continue;
        }
        if c.routed.is_some() {
            crate::say!(
                "✗ {name}: writes each source table to a table of its own, which the audit against the topic does not read yet; compare every table with its source database: idem verify --against postgres://..."
            );
            ok = false;
            continue;
        }
        match audit(&c).await? {
            None => {
                crate::say!(
                    "✗ {name}: a {} sink cannot be audited yet (verify reads the rows of postgres and duckdb sinks)",
                    c.cfg.sink.kind()
                );
                ok = false;
            }
            Some(f) => {
                ok &= report(&name, &f);
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn report_against(name: &str, f: &against::Compared) -> bool {
    let summary = format!(
        "{} rows in {}, {} in the target",
        f.source_rows, f.source, f.target_rows
    );
    let ok = "the target equals the source row for row";
    print_findings(
        name,
        &summary,
        ok,
        &[
            ("missing", &f.missing),
            ("not in the source", &f.extra),
            ("differs", &f.differing),
        ],
    )
}

fn report(name: &str, f: &Findings) -> bool {
    let mut summary = format!(
        "{} messages ({} dead-lettered), {} rows",
        f.messages, f.dead, f.rows
    );
    let ok = if f.before_retention > 0 {
        format!(
            "every message took effect exactly once; {} rows older than the source keeps were not checked",
            f.before_retention
        )
    } else {
        "every message took effect exactly once".into()
    };
    if f.before_retention > 0 && f.count() > 0 {
        summary += &format!(
            " ({} older than the source keeps, not checked)",
            f.before_retention
        );
    }
    print_findings(
        name,
        &summary,
        &ok,
        &[
            ("missing", &f.missing),
            ("duplicated", &f.duplicated),
            ("unexplained row", &f.unexplained),
            ("stale row", &f.stale),
        ],
    )
}

/// `✓ NAME: summary: ok`, or `✗ NAME: summary: N findings` and the first
/// 20 of each kind; whether there were none.
fn print_findings(name: &str, summary: &str, ok: &str, kinds: &[(&str, &Vec<String>)]) -> bool {
    let count: usize = kinds.iter().map(|(_, list)| list.len()).sum();
    if count == 0 {
        crate::say!("✓ {name}: {summary}: {ok}");
        return true;
    }
    crate::say!("✗ {name}: {summary}: {count} findings");
    for (what, list) in kinds {
        for line in list.iter().take(20) {
            crate::say!("    {what}: {line}");
        }
        if list.len() > 20 {
            crate::say!("    ... and {} more ({what})", list.len() - 20);
        }
    }
    false
}

async fn audit(c: &Connector) -> anyhow::Result<Option<Findings>> {
    c.sink
        .prepare()
        .await
        .with_context(|| format!("connector {}: open the sink", c.name))?;
    let Some(rows) = c
        .sink
        .row_positions()
        .await
        .with_context(|| format!("connector {}: list the sink's rows", c.name))?
    else {
        return Ok(None);
    };
    let expect = expectation(c);
    let mut f = Findings {
        rows: rows.rows.len() as u64,
        ..Findings::default()
    };
    let (mut parts, mut names) = (Names::default(), Names::default());
    // Every message up to each committed position. Partitions are read
    // one after another, each in offset order: sorted by (part, offset).
    let mut wanted: Vec<Wanted> = Vec::new();
    // Where each partition's retained messages begin, and its end.
    let mut first: HashMap<u32, u64> = HashMap::new();
    let mut ends: HashMap<u32, u64> = HashMap::new();
    let committed = c
        .sink
        .positions(&c.name)
        .await
        .with_context(|| format!("connector {}: read positions", c.name))?;
    for p in committed {
        let Some(end) = p.next_offset else { continue };
        let part = parts.of(&p.partition);
        ends.insert(part, end);
        let mut reader = c.source.open_audit(&p.partition).await.with_context(|| {
            format!("connector {}: read {} from the source", c.name, p.partition)
        })?;
        let mut msgs = Vec::new();
        let mut progress = std::time::Instant::now();
        // Upserts behind a `[dedup]` on message ids: a later copy of an id
        // in the same partition was dropped, and cannot be a key's last
        // message. (A copy in another partition may have won instead of
        // its original; the two are equal rows, which the check accepts.)
        let drop_copies = c.cfg.dedup.is_some() && matches!(expect, Expect::LatestPerKey(..));
        // Their ids as 64-bit digests: a million in 16 MB. Two ids of one
        // digest (odds near 1 in 10^8 for a million) are audited as one.
        let mut ids_here: std::collections::HashSet<u64> = Default::default();
        'read: loop {
            msgs.clear();
            let status = reader.read(1024, &mut msgs).await.with_context(|| {
                format!("connector {}: read {} from the source", c.name, p.partition)
            })?;
            if let Some(registry) = &c.registry {
                // As the run does: the writer schemas first.
                let stop = tokio_util::sync::CancellationToken::new();
                registry
                    .fetch_for(&msgs, &c.cfg.retry, &c.stats, &stop)
                    .await
                    .map_err(|(offset, reason)| {
                        anyhow::anyhow!(
                            "connector {}: {} offset {offset}: {reason}",
                            c.name,
                            p.partition
                        )
                    })?;
            }
            for m in msgs.drain(..) {
                if m.offset >= end {
                    break 'read;
                }
                first.entry(part).or_insert(m.offset);
                f.messages += 1;
                let offset = m.offset;
                match map_message(c, &p.partition, m) {
                    Item::Row { record, .. } => {
                        if drop_copies
                            && record
                                .id
                                .as_ref()
                                .is_some_and(|id| !ids_here.insert(hash(id)))
                        {
                            continue;
                        }
                        let identity = match &expect {
                            Expect::EachMessage => (part, offset),
                            Expect::FirstPerId => {
                                (HASHED, hash(record.id.as_deref().unwrap_or_default()))
                            }
                            Expect::LatestPerKey(cols, _) | Expect::FirstPerKey(cols) => {
                                let key: Vec<String> = cols
                                    .iter()
                                    .filter_map(|i| record.values.get(*i))
                                    .map(|v| v.to_json().to_string())
                                    .collect();
                                let key = format!("key {}", key.join(","));
                                (NAMED, u64::from(names.of(&key)))
                            }
                        };
                        wanted.push(Wanted {
                            part,
                            offset,
                            identity,
                            delete: record.op == Op::Delete,
                            digest: digest(&record.values),
                        });
                    }
                    Item::Dead { .. } | Item::Fatal { .. } => f.dead += 1,
                    Item::Skip { .. } => {}
                }
            }
            match status {
                ReadStatus::End => break,
                ReadStatus::Data | ReadStatus::Skipped { .. } => {
                    progress = std::time::Instant::now()
                }
                ReadStatus::Idle => {
                    anyhow::ensure!(
                        progress.elapsed() < std::time::Duration::from_secs(30),
                        "connector {}: {} gave nothing for 30 s before the committed position {end}",
                        c.name,
                        p.partition
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        // Nothing retained below the committed position: every row of the
        // partition is older than what the source keeps.
        first.entry(part).or_insert(end);
    }
    let part_names = parts.list();
    let name_list = names.list();
    let at = |part: u32, offset: u64| format!("{}@{offset}", part_names[part as usize]);
    // Hashed ids are named by their first copy's position.
    let show = |id: Identity, first: &Wanted| match id {
        (NAMED, n) => name_list[n as usize].to_string(),
        (HASHED, _) => format!("the id of {}", at(first.part, first.offset)),
        (part, offset) => at(part, offset),
    };
    let find = |part: u32, offset: u64| {
        wanted
            .binary_search_by(|w| (w.part, w.offset).cmp(&(part, offset)))
            .ok()
            .map(|i| &wanted[i])
    };
    // The identity each row holds, by the message at its position.
    let mut held: Vec<(Identity, u32, u64)> = Vec::new();
    for &(row_part, offset) in &rows.rows {
        let partition = &rows.partitions[row_part as usize];
        let Some((part, end)) = parts.get(partition).and_then(|p| Some((p, *ends.get(&p)?))) else {
            f.unexplained.push(format!(
                "a row from {partition}@{offset}: no committed position for that partition"
            ));
            continue;
        };
        if first.get(&part).is_some_and(|start| offset < *start) {
            f.before_retention += 1;
            continue;
        }
        match find(part, offset) {
            Some(w) if !w.delete => held.push((w.identity, part, offset)),
            Some(_) => f.unexplained.push(format!(
                "a row from {partition}@{offset}, which is a tombstone"
            )),
            None if offset >= end => f.unexplained.push(format!(
                "a row from {partition}@{offset}, past the committed position {end}"
            )),
            None => f.unexplained.push(format!(
                "a row from {partition}@{offset}: no mapped message there (dead-lettered, or not a message boundary)"
            )),
        }
    }
    held.sort_unstable();
    // The messages of each identity together, each partition's in order.
    let mut order: Vec<u32> = (0..u32::try_from(wanted.len()).unwrap_or(u32::MAX)).collect();
    order.sort_unstable_by_key(|&i| {
        let w = &wanted[i as usize];
        (w.identity, w.part, w.offset)
    });
    let mut rows_at = 0;
    for group in order.chunk_by(|a, b| wanted[*a as usize].identity == wanted[*b as usize].identity)
    {
        let copies: Vec<&Wanted> = group.iter().map(|&i| &wanted[i as usize]).collect();
        let identity = copies[0].identity;
        while rows_at < held.len() && held[rows_at].0 < identity {
            rows_at += 1;
        }
        let from = rows_at;
        while rows_at < held.len() && held[rows_at].0 == identity {
            rows_at += 1;
        }
        let rows_here: Vec<(u32, u64)> = held[from..rows_at].iter().map(|h| (h.1, h.2)).collect();
        // The messages whose row is right: per partition, the first copy (or
        // the last, for upserts); partitions commit in any order.
        let latest = matches!(expect, Expect::LatestPerKey(..));
        let mut per_part: BTreeMap<u32, &Wanted> = BTreeMap::new();
        for w in &copies {
            if latest || !per_part.contains_key(&w.part) {
                per_part.insert(w.part, w);
            }
        }
        let candidates: Vec<&Wanted> = per_part.into_values().collect();
        // An upsert key deleted by its last message (in its only partition)
        // should have no row.
        let deleted = candidates.len() == 1 && candidates[0].delete;
        let name = show(identity, copies[0]);
        let at_w = |w: &Wanted| at(w.part, w.offset);
        match (deleted, rows_here.as_slice()) {
            (true, []) => {}
            (true, rows) => f.duplicated.push(format!(
                "{name}: {} row(s) after its last message {} deleted it",
                rows.len(),
                at_w(candidates[0])
            )),
            (false, []) => f
                .missing
                .push(format!("{name} (from {}): no row", at_w(copies[0]))),
            (false, [(p, o)]) => {
                // A copy equal to the expected message is as good: a sink
                // leaves a row alone when a message would not change it.
                let held = find(*p, *o).map(|w| w.digest);
                let fits = candidates
                    .iter()
                    .any(|w| (w.part == *p && w.offset == *o) || held == Some(w.digest));
                let checked = !matches!(expect, Expect::LatestPerKey(_, false));
                if checked && !fits {
                    let which = if latest {
                        "its last message"
                    } else {
                        "its first copy"
                    };
                    f.stale.push(format!(
                        "{name}: the row holds {}, not {which} ({})",
                        at(*p, *o),
                        candidates
                            .iter()
                            .map(|w| at_w(w))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ));
                }
            }
            (false, rows) => f.duplicated.push(format!(
                "{name}: {} rows (from {})",
                rows.len(),
                rows.iter()
                    .map(|(p, o)| at(*p, *o))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    Ok(Some(f))
}

/// A digest of `id`, the same in every run.
fn hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A digest of a row's values: equal rows, equal digests.
fn digest(values: &[idem_core::Value]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        v.to_json().to_string().hash(&mut h);
    }
    h.finish()
}
