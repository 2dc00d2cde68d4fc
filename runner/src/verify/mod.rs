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
//! Any finding exits 1. It holds 32 bytes per message (a position, a
//! digest of its key or id, a digest of its row, and how many rows hold
//! it) and, until they are counted, 16 per row; keys are named only for
//! the findings it prints, by reading their messages again.

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
/// offset)` when every message is a row, `(KEYED, digest)` of the key it
/// shares with its key's other messages, or `(HASHED, digest)` of the
/// message id it shares with its copies.
type Identity = (u32, u64);
const KEYED: u32 = u32::MAX;
const HASHED: u32 = u32::MAX - 1;

/// One message that should leave a row (or, deleted, none), and how many
/// rows the sink holds from its position: 32 bytes, so a million fit in
/// 32 MB.
struct Wanted {
    offset: u64,
    /// The digest of its key or id (unused when every message is a row).
    id: u64,
    /// A digest of the row it makes: identical copies share it.
    digest: u64,
    /// The interned partition.
    part: u32,
    /// Rows from this position (saturating).
    rows: u8,
    delete: bool,
}

impl Wanted {
    /// `tag`: [`KEYED`] or [`HASHED`]; none when every message is a row.
    fn identity(&self, tag: Option<u32>) -> Identity {
        match tag {
            None => (self.part, self.offset),
            Some(tag) => (tag, self.id),
        }
    }
}

/// Strings held once and named by number: partitions.
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

/// How many findings of each kind are printed; the rest are counted.
const SHOWN: usize = 20;

/// One kind of finding: how many, and the first [`SHOWN`] lines.
#[derive(Default)]
struct Kind {
    count: usize,
    lines: Vec<Line>,
}

/// A finding's line. `about`: the position of the message that names the
/// key it is about, filled in once the audit is done (keys are held as
/// digests meanwhile).
struct Line {
    about: Option<(u32, u64)>,
    text: String,
}

impl Kind {
    fn push(&mut self, about: Option<(u32, u64)>, text: impl FnOnce() -> String) {
        self.count += 1;
        if self.lines.len() < SHOWN {
            self.lines.push(Line {
                about,
                text: text(),
            });
        }
    }

    fn shown(&self) -> Vec<String> {
        self.lines.iter().map(|l| l.text.clone()).collect()
    }
}

/// What the audit found for one connector.
#[derive(Default)]
struct Findings {
    messages: u64,
    dead: u64,
    rows: u64,
    missing: Kind,
    duplicated: Kind,
    unexplained: Kind,
    stale: Kind,
    /// Rows before the first retained message: nothing to check them against.
    before_retention: u64,
}

impl Findings {
    fn count(&self) -> usize {
        self.kinds().iter().map(|k| k.count).sum()
    }

    fn kinds(&self) -> [&Kind; 4] {
        [
            &self.missing,
            &self.duplicated,
            &self.unexplained,
            &self.stale,
        ]
    }

    fn kinds_mut(&mut self) -> [&mut Kind; 4] {
        [
            &mut self.missing,
            &mut self.duplicated,
            &mut self.unexplained,
            &mut self.stale,
        ]
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
        let left = c
            .sink
            .leftovers()
            .await
            .with_context(|| format!("connector {name}: list files no commit names"))?;
        if !left.is_empty() {
            crate::say!(
                "    note: {} files the sink wrote are in no commit: batches written and never committed (a crash or a fenced runner), or staged now by a running runner. Readers do not see them, and the audit does not count them; the sink's page in docs/sinks/ says how to remove them",
                left.len()
            );
            for line in left.iter().take(SHOWN) {
                crate::say!("    uncommitted: {line}");
            }
            if left.len() > SHOWN {
                crate::say!("    ... and {} more (uncommitted)", left.len() - SHOWN);
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
            ("missing", f.missing.len(), f.missing.clone()),
            ("not in the source", f.extra.len(), f.extra.clone()),
            ("differs", f.differing.len(), f.differing.clone()),
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
            ("missing", f.missing.count, f.missing.shown()),
            ("duplicated", f.duplicated.count, f.duplicated.shown()),
            (
                "unexplained row",
                f.unexplained.count,
                f.unexplained.shown(),
            ),
            ("stale row", f.stale.count, f.stale.shown()),
        ],
    )
}

/// `✓ NAME: summary: ok`, or `✗ NAME: summary: N findings` and the first
/// [`SHOWN`] of each kind; whether there were none. `kinds`: what, how
/// many, and the lines to show (the first ones).
fn print_findings(
    name: &str,
    summary: &str,
    ok: &str,
    kinds: &[(&str, usize, Vec<String>)],
) -> bool {
    let count: usize = kinds.iter().map(|(_, n, _)| n).sum();
    if count == 0 {
        crate::say!("✓ {name}: {summary}: {ok}");
        return true;
    }
    crate::say!("✗ {name}: {summary}: {count} findings");
    for (what, n, lines) in kinds {
        for line in lines.iter().take(SHOWN) {
            crate::say!("    {what}: {line}");
        }
        if *n > SHOWN {
            crate::say!("    ... and {} more ({what})", n - SHOWN);
        }
    }
    false
}

async fn audit(c: &Connector) -> anyhow::Result<Option<Findings>> {
    c.sink
        .prepare()
        .await
        .with_context(|| format!("connector {}: open the sink", c.name))?;
    // Each row's position: 16 bytes a row.
    let Some(rows) = c
        .sink
        .row_positions()
        .await
        .with_context(|| format!("connector {}: list the sink's rows", c.name))?
    else {
        return Ok(None);
    };
    let committed = c
        .sink
        .positions(&c.name)
        .await
        .with_context(|| format!("connector {}: read positions", c.name))?;
    let expect = expectation(c);
    // How identities are tagged: none when a message's position is its
    // identity.
    let tag = match &expect {
        Expect::EachMessage => None,
        Expect::FirstPerId => Some(HASHED),
        Expect::LatestPerKey(..) | Expect::FirstPerKey(_) => Some(KEYED),
    };
    let mut f = Findings::default();
    let mut parts = Names::default();
    // Every message up to each committed position. Partitions are read
    // one after another, each in offset order: sorted by (part, offset).
    let mut wanted: Vec<Wanted> = Vec::new();
    // Where each partition's retained messages begin, and its end.
    let mut first: HashMap<u32, u64> = HashMap::new();
    let mut ends: HashMap<u32, u64> = HashMap::new();
    // Upserts behind a `[dedup]` on message ids: a later copy of an id in
    // the same partition was dropped, and cannot be a key's last message.
    // (A copy in another partition may have won instead of its original;
    // the two are equal rows, which the check accepts.)
    let drop_copies = c.cfg.dedup.is_some() && matches!(expect, Expect::LatestPerKey(..));
    for p in committed {
        let Some(end) = p.next_offset else { continue };
        let part = parts.of(&p.partition);
        ends.insert(part, end);
        // One partition's ids as 64-bit digests: a million in 16 MB. Two
        // ids of one digest (odds near 1 in 10^8 for a million) are
        // audited as one, and so are two keys.
        let mut ids_here: std::collections::HashSet<u64> = Default::default();
        read_mapped(c, &p.partition, end, |offset, item| {
            first.entry(part).or_insert(offset);
            f.messages += 1;
            let record = match item {
                Item::Row { record, .. } => record,
                Item::Dead { .. } | Item::Fatal { .. } => {
                    f.dead += 1;
                    return;
                }
                Item::Skip { .. } => return,
            };
            let id = record.id.as_deref().map(hash);
            if drop_copies && id.is_some_and(|id| !ids_here.insert(id)) {
                return;
            }
            let id = match &expect {
                Expect::EachMessage => 0,
                Expect::FirstPerId => id.unwrap_or_else(|| hash("")),
                Expect::LatestPerKey(cols, _) | Expect::FirstPerKey(cols) => {
                    hash(&key_text(cols, &record))
                }
            };
            wanted.push(Wanted {
                offset,
                id,
                digest: digest(&record.values),
                part,
                rows: 0,
                delete: record.op == Op::Delete,
            });
        })
        .await?;
        // Nothing retained below the committed position: every row of the
        // partition is older than what the source keeps.
        first.entry(part).or_insert(end);
    }
    let part_names: Vec<String> = parts.list().into_iter().map(String::from).collect();
    let at = |part: u32, offset: u64| format!("{}@{offset}", part_names[part as usize]);
    // Count each row on the message at its position; the rows' list goes
    // before the messages are grouped.
    {
        f.rows = rows.rows.len() as u64;
        for &(row_part, offset) in &rows.rows {
            let partition = &rows.partitions[row_part as usize];
            let Some((part, end)) = parts.get(partition).and_then(|p| Some((p, *ends.get(&p)?)))
            else {
                f.unexplained.push(None, || {
                    format!(
                        "a row from {partition}@{offset}: no committed position for that partition"
                    )
                });
                continue;
            };
            if first.get(&part).is_some_and(|start| offset < *start) {
                f.before_retention += 1;
                continue;
            }
            let found = wanted.binary_search_by(|w| (w.part, w.offset).cmp(&(part, offset)));
            match found.ok().map(|i| &mut wanted[i]) {
                Some(w) if !w.delete => w.rows = w.rows.saturating_add(1),
                Some(_) => f.unexplained.push(None, || {
                    format!("a row from {partition}@{offset}, which is a tombstone")
                }),
                None if offset >= end => f.unexplained.push(None, || {
                    format!("a row from {partition}@{offset}, past the committed position {end}")
                }),
                None => f.unexplained.push(None, || {
                    format!("a row from {partition}@{offset}: no mapped message there (dead-lettered, or not a message boundary)")
                }),
            }
        }
        drop(rows);
    }
    // The messages of each identity together, each partition's in order
    // (by position they are already).
    if tag.is_some() {
        wanted.sort_unstable_by_key(|w| (w.identity(tag), w.part, w.offset));
    }
    let latest = matches!(expect, Expect::LatestPerKey(..));
    let checked = !matches!(expect, Expect::LatestPerKey(_, false));
    for copies in wanted.chunk_by(|a, b| a.identity(tag) == b.identity(tag)) {
        // Keys are named once the audit is done, from their first
        // message; ids by their first copy's position.
        let first_copy = &copies[0];
        let about = (tag == Some(KEYED)).then_some((first_copy.part, first_copy.offset));
        let name = || match tag {
            None => at(first_copy.part, first_copy.offset),
            Some(HASHED) => format!("the id of {}", at(first_copy.part, first_copy.offset)),
            Some(_) => String::new(),
        };
        let rows_here: Vec<&Wanted> = copies.iter().filter(|w| w.rows > 0).collect();
        let row_count: usize = rows_here.iter().map(|w| usize::from(w.rows)).sum();
        // The messages whose row is right: per partition, the first copy (or
        // the last, for upserts); partitions commit in any order.
        let candidates: Vec<&Wanted> = copies
            .chunk_by(|a, b| a.part == b.part)
            .filter_map(|run| if latest { run.last() } else { run.first() })
            .collect();
        // An upsert key deleted by its last message (in its only partition)
        // should have no row.
        let deleted = candidates.len() == 1 && candidates[0].delete;
        let at_w = |w: &Wanted| at(w.part, w.offset);
        match (deleted, rows_here.as_slice()) {
            (true, []) => {}
            (true, _) => f.duplicated.push(about, || {
                format!(
                    "{}: {row_count} row(s) after its last message {} deleted it",
                    name(),
                    at_w(candidates[0])
                )
            }),
            (false, []) => f.missing.push(about, || {
                format!("{} (from {}): no row", name(), at_w(first_copy))
            }),
            (false, [held]) if held.rows == 1 => {
                // A copy equal to the expected message is as good: a sink
                // leaves a row alone when a message would not change it.
                let fits = candidates.iter().any(|w| {
                    (w.part, w.offset) == (held.part, held.offset) || w.digest == held.digest
                });
                if checked && !fits {
                    let which = if latest {
                        "its last message"
                    } else {
                        "its first copy"
                    };
                    f.stale.push(about, || {
                        format!(
                            "{}: the row holds {}, not {which} ({})",
                            name(),
                            at_w(held),
                            candidates
                                .iter()
                                .map(|w| at_w(w))
                                .collect::<Vec<_>>()
                                .join(" or ")
                        )
                    });
                }
            }
            (false, held) => f.duplicated.push(about, || {
                format!(
                    "{}: {row_count} rows (from {})",
                    name(),
                    held.iter()
                        .flat_map(|w| std::iter::repeat_n(at_w(w), usize::from(w.rows)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        }
    }
    drop(wanted);
    name_keys(c, &expect, &part_names, &mut f).await?;
    Ok(Some(f))
}

/// Read `partition` from its first retained message up to `end`, mapping
/// each message as the run does; `each` gets its offset and what it maps to.
async fn read_mapped(
    c: &Connector,
    partition: &str,
    end: u64,
    mut each: impl FnMut(u64, Item),
) -> anyhow::Result<()> {
    let context = || format!("connector {}: read {partition} from the source", c.name);
    let mut reader = c.source.open_audit(partition).await.with_context(context)?;
    let mut msgs = Vec::new();
    let mut progress = std::time::Instant::now();
    loop {
        msgs.clear();
        let status = reader.read(1024, &mut msgs).await.with_context(context)?;
        if let Some(registry) = &c.registry {
            // As the run does: the writer schemas first.
            let stop = tokio_util::sync::CancellationToken::new();
            registry
                .fetch_for(&msgs, &c.cfg.retry, &c.stats, &stop)
                .await
                .map_err(|(offset, reason)| {
                    anyhow::anyhow!(
                        "connector {}: {partition} offset {offset}: {reason}",
                        c.name
                    )
                })?;
        }
        for m in msgs.drain(..) {
            if m.offset >= end {
                return Ok(());
            }
            let offset = m.offset;
            each(offset, map_message(c, partition, m));
        }
        match status {
            ReadStatus::End => return Ok(()),
            ReadStatus::Data | ReadStatus::Skipped { .. } => progress = std::time::Instant::now(),
            ReadStatus::Idle => {
                anyhow::ensure!(
                    progress.elapsed() < std::time::Duration::from_secs(30),
                    "connector {}: {partition} gave nothing for 30 s before the committed position {end}",
                    c.name
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Name the keys the shown findings are about (`key "k-3"`), from the
/// message at each one's position: the audit held keys as digests.
async fn name_keys(
    c: &Connector,
    expect: &Expect,
    part_names: &[String],
    f: &mut Findings,
) -> anyhow::Result<()> {
    let (Expect::LatestPerKey(cols, _) | Expect::FirstPerKey(cols)) = expect else {
        return Ok(());
    };
    let mut wanted: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    for kind in f.kinds() {
        for (part, offset) in kind.lines.iter().filter_map(|l| l.about) {
            wanted
                .entry(part)
                .or_default()
                .insert(offset, String::new());
        }
    }
    for (part, names) in &mut wanted {
        let Some(last) = names.keys().next_back().copied() else {
            continue;
        };
        read_mapped(c, &part_names[*part as usize], last + 1, |offset, item| {
            if let (Some(name), Item::Row { record, .. }) = (names.get_mut(&offset), item) {
                *name = key_text(cols, &record);
            }
        })
        .await?;
    }
    for kind in f.kinds_mut() {
        for line in &mut kind.lines {
            if let Some((part, offset)) = line.about.take() {
                let name = wanted
                    .get(&part)
                    .and_then(|n| n.get(&offset))
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .unwrap_or_else(|| {
                        format!("the key of {}@{offset}", part_names[part as usize])
                    });
                line.text = format!("{name}{}", line.text);
            }
        }
    }
    Ok(())
}

/// A record's key as the audit names it: `key "k-3"`.
fn key_text(cols: &[usize], record: &idem_core::Record) -> String {
    let key: Vec<String> = cols
        .iter()
        .filter_map(|i| record.values.get(*i))
        .map(|v| v.to_json().to_string())
        .collect();
    format!("key {}", key.join(","))
}

/// A digest of `id`, the same in every run.
fn hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A digest of a row's values: equal rows, equal digests.
fn digest(values: &idem_core::Row) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        v.to_json().to_string().hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_counts_every_finding_and_formats_only_those_it_shows() {
        let mut kind = Kind::default();
        let mut formatted = 0;
        for i in 0..50 {
            kind.push(None, || {
                formatted += 1;
                format!("finding {i}")
            });
        }
        assert_eq!(kind.count, 50);
        assert_eq!(formatted, SHOWN);
        let first: Vec<String> = (0..SHOWN).map(|i| format!("finding {i}")).collect();
        assert_eq!(kind.shown(), first);
    }
}
