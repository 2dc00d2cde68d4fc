//! SQL fragments shared by the table sinks (DuckDB, PostgreSQL): column
//! definitions, the version guard of upserts, key matching, and change
//! detection. Both dialects quote identifiers with `"` and know
//! `IS DISTINCT FROM` and `INSERT .. ON CONFLICT`.

use crate::{Op, Record, RowShape, SinkInfo, ValueRef};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use idem_config::{ColumnConfig, ColumnType, Guarantee, WriteMode};

/// Position columns every table sink adds to its rows.
pub const POS_PARTITION: &str = "_idem_partition";
pub const POS_OFFSET: &str = "_idem_offset";
/// Staging column marking a tombstone.
pub const DELETE_FLAG: &str = "_idem_delete";
/// Staging column of a record's message id (`[dedup] store = "sink"`).
pub const ID_COLUMN: &str = "_idem_id";

/// The table of message ids a table sink keeps beside `table` for
/// `[dedup] store = "sink"`: one row per id that took effect (`id`,
/// `seen_at`), written in the transaction of the batch that made it.
pub fn seen_table(table: &str) -> String {
    format!("idem_seen_{table}")
}

/// Per record of a batch kept by id: whether it is the first record of
/// its id in the batch (a later copy in the same batch is dropped before
/// anything is written). A record without an id is kept.
pub fn first_of_each_id(records: &[Record]) -> Vec<bool> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(records.len());
    records
        .iter()
        .map(|r| r.id.as_deref().is_none_or(|id| seen.insert(id)))
        .collect()
}

/// Per record of a batch deduplicated by its key columns (`key_idx`):
/// whether it is the first record of its key in the batch.
pub fn first_of_each_key(records: &[Record], key_idx: &[usize]) -> Vec<bool> {
    let mut seen: HashSet<Vec<KeyPart>> = HashSet::with_capacity(records.len());
    records
        .iter()
        .map(|r| seen.insert(KeyPart::key(r, key_idx)))
        .collect()
}

/// Per record of an upsert batch without a version column: whether it is
/// the newest (highest offset) message of its key among those `keep` marks
/// (all without it), so the batch can be merged as it is once the others
/// are left out. `None` when one of them is a tombstone: the table's SQL
/// picks then, as a delete must also reach the keys' graves.
pub fn newest_of_each_key(
    records: &[Record],
    keep: Option<&[bool]>,
    key_idx: &[usize],
) -> Option<Vec<bool>> {
    let kept = |i: usize| keep.is_none_or(|k| k[i]);
    let mut candidates = records.iter().enumerate().filter(|(i, _)| kept(*i));
    if candidates.any(|(_, r)| r.op != Op::Upsert) {
        return None;
    }
    // A key of one column (the usual case) without a `Vec` per record.
    Some(match key_idx {
        [k] => newest_by(records, kept, |r| {
            KeyPart::of(r.values.get(*k).unwrap_or(ValueRef::Null))
        }),
        _ => newest_by(records, kept, |r| KeyPart::key(r, key_idx)),
    })
}

fn newest_by<'a, K: std::hash::Hash + Eq>(
    records: &'a [Record],
    kept: impl Fn(usize) -> bool,
    key: impl Fn(&'a Record) -> K,
) -> Vec<bool> {
    let mut newest: HashMap<K, usize> = HashMap::with_capacity(records.len());
    for (i, r) in records.iter().enumerate().filter(|(i, _)| kept(*i)) {
        let at = newest.entry(key(r)).or_insert(i);
        if records[*at].offset < r.offset {
            *at = i;
        }
    }
    let mut keep = vec![false; records.len()];
    for i in newest.into_values() {
        keep[i] = true;
    }
    keep
}

/// An offset as stored in a `BIGINT` column. Offsets beyond i64::MAX
/// (9.2e18 bytes or messages) do not occur; they would saturate.
pub fn offset_to_sql(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// An offset read back from a `BIGINT` column.
pub fn offset_from_sql(stored: i64) -> u64 {
    u64::try_from(stored).unwrap_or(0)
}

/// Quote an identifier: wrapped in `"`, an embedded `"` doubled, so any
/// name (column names are free-form) is one identifier and never SQL.
pub fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `a.k1 = b.k1 AND a.k2 = b.k2 ...`
pub fn key_match(a: &str, b: &str, keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("{a}.{k} = {b}.{k}", k = q(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Whether row `new` may replace row `old`: a larger `version`, or (same
/// version, or no version column) a later offset of the same partition.
/// Across partitions positions are not comparable: the later commit wins.
pub fn guard(new: &str, old: &str, version: Option<&str>) -> String {
    let position_newer = format!(
        "({new}.{POS_PARTITION} <> {old}.{POS_PARTITION} OR {new}.{POS_OFFSET} > {old}.{POS_OFFSET})"
    );
    match version {
        Some(v) => format!(
            "({new}.{v} > {old}.{v} OR ({new}.{v} = {old}.{v} AND {position_newer}))",
            v = q(v)
        ),
        None => position_newer,
    }
}

/// Whether `new` differs from `old` in any of `columns` (a message equal to
/// the row changes nothing and counts as deduplicated).
pub fn changed(new: &str, old: &str, columns: &[&str]) -> String {
    if columns.is_empty() {
        return "FALSE".into();
    }
    columns
        .iter()
        .map(|c| format!("{new}.{c} IS DISTINCT FROM {old}.{c}", c = q(c)))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// `c = EXCLUDED.c, ...` for every column that is not a key.
pub fn updates(columns: &[String], keys: &[String]) -> String {
    updates_from(columns, keys, "excluded")
}

/// `c = from.c, ...` for every column that is not a key.
fn updates_from(columns: &[String], keys: &[String], from: &str) -> String {
    columns
        .iter()
        .filter(|c| !keys.contains(c))
        .map(|c| format!("{c} = {from}.{c}", c = q(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mapped columns that are not keys: those a merge compares.
fn non_keys<'a>(columns: &'a [ColumnConfig], keys: &[String]) -> Vec<&'a str> {
    columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| !keys.iter().any(|k| k == c))
        .collect()
}

/// `ORDER BY` that puts the newest message of a key first.
pub fn newest_first(version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{} DESC, {POS_OFFSET} DESC", q(v)),
        None => format!("{POS_OFFSET} DESC"),
    }
}

/// What a table sink declares: exactly-once in both modes, because rows and
/// positions commit in one `engine` transaction on `target`.
pub fn table_sink_info(
    engine: &str,
    target: &str,
    mode: WriteMode,
    key: &[String],
    version: Option<&str>,
    deletes: bool,
) -> SinkInfo {
    let (why, mut required) = match mode {
        WriteMode::Append => (
            format!("append: rows and each partition's next position commit in one {engine} transaction on {target}; a restart resumes after the last commit"),
            Vec::new(),
        ),
        WriteMode::Upsert => (
            format!(
                "upsert on ({}): rows and positions commit in one {engine} transaction on {target}, and a replayed or older message never overwrites a newer row",
                if key.is_empty() {
                    // A table template's: see `validate_write`.
                    "each source table's primary key".to_string()
                } else {
                    key.join(", ")
                }
            ),
            key.to_vec(),
        ),
        WriteMode::Dedup => (
            format!(
                "dedup on ({}): rows and positions commit in one {engine} transaction on {target}; an id takes effect once while its row exists in a table keyed on it (else ids are kept beside the table for the retention window)",
                key.join(", ")
            ),
            key.to_vec(),
        ),
    };
    required.extend(version.map(str::to_string));
    SinkInfo {
        guarantee: Guarantee::ExactlyOnce,
        why,
        key_columns: required,
        deletes,
        rows: RowShape {
            mode,
            key: key.to_vec(),
            versioned: version.is_some(),
        },
        adds_columns: None,
        ids_table: None,
    }
}

/// Column definitions of a target table: the mapped columns (keys NOT
/// NULL), the position columns, and the primary key when `keys` is set.
pub fn table_definition(
    columns: &[ColumnConfig],
    keys: &[String],
    sql_type: impl Fn(ColumnType) -> &'static str,
) -> String {
    definition(columns, keys, sql_type, true)
}

/// [`table_definition`] without the primary key: the keys only NOT NULL
/// (kept unique by [`merge_into`]).
pub fn unkeyed_table_definition(
    columns: &[ColumnConfig],
    keys: &[String],
    sql_type: impl Fn(ColumnType) -> &'static str,
) -> String {
    definition(columns, keys, sql_type, false)
}

fn definition(
    columns: &[ColumnConfig],
    keys: &[String],
    sql_type: impl Fn(ColumnType) -> &'static str,
    primary_key: bool,
) -> String {
    let mut defs: Vec<String> = columns
        .iter()
        .map(|c| {
            let not_null = if keys.contains(&c.name) {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", q(&c.name), sql_type(c.ty))
        })
        .collect();
    defs.push(format!(
        "{} {} NOT NULL",
        q(POS_PARTITION),
        sql_type(ColumnType::Text)
    ));
    defs.push(format!(
        "{} {} NOT NULL",
        q(POS_OFFSET),
        sql_type(ColumnType::Bigint)
    ));
    if primary_key && !keys.is_empty() {
        defs.push(format!("PRIMARY KEY ({})", list(keys)));
    }
    defs.join(", ")
}

/// `"a", "b", ...`
/// The statement adding a column learnt from the source's schema to
/// `table`, of the engine's `ty`; a column that exists already is left for
/// [`check::learnt`](super::check::learnt) to judge.
pub fn add_column(table: &str, name: &str, ty: &str) -> String {
    format!(
        "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {ty}",
        q(name)
    )
}

pub fn list(names: &[String]) -> String {
    names.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ")
}

/// `names`, quoted, each qualified by `relation`, comma separated.
fn qualified(relation: &str, names: &[String]) -> String {
    names
        .iter()
        .map(|c| format!("{relation}.{}", q(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mapped columns then the position columns, in insert order.
pub fn insert_columns(columns: &[ColumnConfig]) -> Vec<String> {
    columns
        .iter()
        .map(|c| c.name.clone())
        .chain([POS_PARTITION.to_string(), POS_OFFSET.to_string()])
        .collect()
}

/// Deleted keys of a versioned upsert, remembered in a side table with the
/// version and position of their delete, in the batch's transaction. A
/// delete takes the row and its version away; without its grave, a change
/// older than the delete, re-delivered later (a source replaying after a
/// crash), would bring the row back. A merged row must be newer than its
/// key's grave, by the same guard as against a row.
pub struct Graves {
    /// Qualified and quoted.
    table: String,
    version: String,
}

impl Graves {
    /// The side table's name beside `table`.
    pub fn name(table: &str) -> String {
        format!("idem_deleted_{table}")
    }

    /// For upserts with a version column that apply deletes, else none.
    pub fn of(
        table: String,
        mode: WriteMode,
        version: Option<&str>,
        deletes: bool,
    ) -> Option<Graves> {
        match (mode, version) {
            (WriteMode::Upsert, Some(v)) if deletes => Some(Graves {
                table,
                version: v.to_string(),
            }),
            _ => None,
        }
    }

    /// `CREATE TABLE IF NOT EXISTS`: the key and version columns of
    /// `columns`, the position, keyed like the target.
    pub fn create(
        &self,
        columns: &[ColumnConfig],
        keys: &[String],
        sql_type: impl Fn(ColumnType) -> &'static str,
    ) -> String {
        let kept: Vec<ColumnConfig> = columns
            .iter()
            .filter(|c| keys.contains(&c.name) || c.name == self.version)
            .cloned()
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.table,
            table_definition(&kept, keys, sql_type)
        )
    }

    /// Record the tombstones of `source` (one message per key), keeping the
    /// newest delete of each key.
    pub fn bury(&self, source: &str, keys: &[String]) -> String {
        let cols: Vec<String> = keys
            .iter()
            .cloned()
            .chain([
                self.version.clone(),
                POS_PARTITION.to_string(),
                POS_OFFSET.to_string(),
            ])
            .collect();
        format!(
            "INSERT INTO {t} AS g ({c}) SELECT {c} FROM {source} WHERE {source}.{DELETE_FLAG}
             ON CONFLICT ({k}) DO UPDATE SET {u} WHERE {guard}",
            t = self.table,
            c = list(&cols),
            k = list(keys),
            u = updates(&cols, keys),
            guard = guard("excluded", "g", Some(&self.version)),
        )
    }

    /// `AND` no grave of the key is as new as the message in `source`.
    fn alive(&self, source: &str, keys: &[String]) -> String {
        format!(
            " AND NOT EXISTS (SELECT 1 FROM {t} AS g WHERE {m} AND NOT {newer})",
            t = self.table,
            m = key_match("g", source, keys),
            newer = guard(source, "g", Some(&self.version)),
        )
    }
}

/// `INSERT .. SELECT .. ON CONFLICT (keys) DO UPDATE .. WHERE newer AND changed`
/// from `source` (a staging relation with the delete flag) into `target`
/// (a qualified, quoted name) aliased as `alias`; with `graves`, only
/// messages newer than their key's last delete.
pub fn merge(
    target: &str,
    alias: &str,
    source: &str,
    columns: &[ColumnConfig],
    keys: &[String],
    version: Option<&str>,
    graves: Option<&Graves>,
) -> String {
    let cols = insert_columns(columns);
    let col_list = list(&cols);
    format!(
        "INSERT INTO {target} AS {alias} ({col_list}) SELECT {col_list} FROM {source} WHERE NOT {DELETE_FLAG}{alive}
         ON CONFLICT ({keys}) DO UPDATE SET {updates} WHERE {guard} AND ({changed})",
        alive = graves.map(|g| g.alive(source, keys)).unwrap_or_default(),
        keys = list(keys),
        updates = updates(&cols, keys),
        guard = guard("excluded", alias, version),
        changed = changed("excluded", alias, &non_keys(columns, keys)),
    )
}

/// Upsert without a unique index (DuckDB, whose index would have to be held
/// in memory whole), in one `MERGE INTO`: update the rows whose key a
/// message of `source` (one message per key, with the delete flag) may
/// replace, insert the keys `target` lacks. One join of the target, where
/// an `UPDATE` then an `INSERT` took two: that counts once the keys are
/// found by scanning a large table. One writer at a time makes it safe:
/// nothing can insert a key meanwhile. With `graves`, only messages newer
/// than their key's last delete.
pub fn merge_into(
    target: &str,
    source: &str,
    columns: &[ColumnConfig],
    keys: &[String],
    version: Option<&str>,
    graves: Option<&Graves>,
) -> String {
    let cols = insert_columns(columns);
    let alive = graves.map(|g| g.alive(source, keys)).unwrap_or_default();
    format!(
        "MERGE INTO {target} AS tgt USING {source} ON {matched}
         WHEN MATCHED AND NOT {source}.{DELETE_FLAG}{alive} AND {newer} AND ({changed})
           THEN UPDATE SET {sets}
         WHEN NOT MATCHED AND NOT {source}.{DELETE_FLAG}{alive}
           THEN INSERT ({col_list}) VALUES ({values})",
        values = qualified(source, &cols),
        matched = key_match("tgt", source, keys),
        newer = guard(source, "tgt", version),
        changed = changed(source, "tgt", &non_keys(columns, keys)),
        sets = updates_from(&cols, keys, source),
        col_list = list(&cols),
    )
}

/// Dedup: insert the first message of each id in `source` whose id is not in
/// `ids` yet, recording the id (`seen_at`) in the same statement.
pub fn dedup_insert(
    target: &str,
    ids: &str,
    source: &str,
    columns: &[ColumnConfig],
    keys: &[String],
) -> String {
    let cols = insert_columns(columns);
    let qualified = qualified("firsts", &cols);
    let keys = list(keys);
    format!(
        "WITH firsts AS (SELECT DISTINCT ON ({keys}) * FROM {source} ORDER BY {keys}, {POS_OFFSET}),
              fresh AS (INSERT INTO {ids} ({keys}, seen_at) SELECT {keys}, now() FROM firsts
                        ON CONFLICT DO NOTHING RETURNING {keys})
         INSERT INTO {target} ({col_list}) SELECT {qualified} FROM firsts JOIN fresh USING ({keys})",
        col_list = list(&cols),
    )
}

/// Dedup into a target keyed on `keys`: insert the rows of `source` (the
/// first message of each key in the batch) whose key the target does not
/// hold yet.
pub fn insert_new_keys(
    target: &str,
    source: &str,
    columns: &[ColumnConfig],
    keys: &[String],
) -> String {
    let col_list = list(&insert_columns(columns));
    format!(
        "INSERT INTO {target} ({col_list}) SELECT {col_list} FROM {source} ON CONFLICT ({}) DO NOTHING",
        list(keys)
    )
}

/// `DELETE` the keys whose newest message in `source` is a tombstone.
pub fn delete(
    target: &str,
    alias: &str,
    source: &str,
    keys: &[String],
    version: Option<&str>,
) -> String {
    format!(
        "DELETE FROM {target} AS {alias} USING {source} WHERE {source}.{DELETE_FLAG} AND {} AND {}",
        key_match(alias, source, keys),
        guard(source, alias, version)
    )
}

/// The indexes of the records `keep` marks, in the order of their keys
/// (text by bytes, numbers by value): a unique index takes rows in its own
/// order with fewer page visits than in a random one.
pub fn in_key_order(records: &[Record], keep: &[bool], key_idx: &[usize]) -> Vec<u32> {
    let mut order: Vec<(Vec<KeyPart<'_>>, u32)> = records
        .iter()
        .zip(keep)
        .enumerate()
        .filter(|(_, (_, k))| **k)
        .map(|(i, (r, _))| {
            (
                KeyPart::key(r, key_idx),
                u32::try_from(i).unwrap_or(u32::MAX),
            )
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, i)| i).collect()
}

/// A key cell, hashable, for spotting repeated keys in a batch, and
/// ordered, for sending a batch's rows in key order.
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum KeyPart<'a> {
    Null,
    Text(&'a str),
    Bytes(&'a [u8]),
    Int(i64),
    Bits(u64),
}

impl<'a> KeyPart<'a> {
    /// The key of `record`: its values at `key_idx`.
    pub(crate) fn key(record: &'a Record, key_idx: &[usize]) -> Vec<KeyPart<'a>> {
        key_idx
            .iter()
            .map(|&k| KeyPart::of(record.values.get(k).unwrap_or(ValueRef::Null)))
            .collect()
    }

    pub(crate) fn of(v: ValueRef<'a>) -> Self {
        match v {
            ValueRef::Null => KeyPart::Null,
            // `1.50` and `1.5` differ here but not in the table: such a
            // batch meets a unique violation and takes the staging path.
            ValueRef::Text(s) | ValueRef::Json(s) | ValueRef::Numeric(s) => KeyPart::Text(s),
            ValueRef::Uuid(u) => KeyPart::Bytes(u),
            ValueRef::Bytes(b) => KeyPart::Bytes(b),
            ValueRef::BigInt(n) | ValueRef::Timestamp(n) => KeyPart::Int(n),
            ValueRef::Integer(n) | ValueRef::Date(n) => KeyPart::Int(i64::from(n)),
            // `-0.0` and `0.0` are one key to a database: one bit pattern.
            ValueRef::Double(x) => KeyPart::Bits(if x == 0.0 { 0 } else { x.to_bits() }),
            ValueRef::Boolean(b) => KeyPart::Int(i64::from(b)),
        }
    }
}

/// The records `keep` marks (see [`first_of_each_id`]).
pub fn kept<'a>(records: &'a [Record], keep: &'a [bool]) -> impl Iterator<Item = &'a Record> {
    records
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(r, _)| r)
}

/// Whether an upsert batch can be merged as it is: no tombstone, and no key
/// twice (otherwise the newest message per key must be picked first).
pub fn unique_upserts<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    key_idx: &[usize],
) -> bool {
    let mut seen: HashSet<Vec<KeyPart>> = HashSet::new();
    records
        .into_iter()
        .all(|r| r.op == Op::Upsert && seen.insert(KeyPart::key(r, key_idx)))
}

/// Positions of `keys` among `columns`.
pub fn key_indexes(columns: &[ColumnConfig], keys: &[String]) -> Vec<usize> {
    keys.iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    #[test]
    fn kept_records_go_in_key_order() {
        let rec = |offset: u64, k: &str, n: i64| Record {
            offset,
            op: crate::Op::Upsert,
            values: vec![Value::Text(k.into()), Value::BigInt(n)].into(),
            id: None,
        };
        let records = [
            rec(0, "b", 1),
            rec(1, "a", 9),
            rec(2, "c", 0),
            rec(3, "a", 2),
        ];
        let all = [true; 4];
        assert_eq!(in_key_order(&records, &all, &[0]), [1, 3, 0, 2]);
        assert_eq!(in_key_order(&records, &all, &[0, 1]), [3, 1, 0, 2]);
        assert_eq!(
            in_key_order(&records, &[true, false, true, false], &[0]),
            [0, 2]
        );
        // Numbers by value, not as text.
        assert_eq!(in_key_order(&records, &all, &[1]), [2, 0, 3, 1]);
    }

    #[test]
    fn the_newest_message_of_each_key_is_kept() {
        let rec = |offset: u64, k: &str, op: crate::Op| Record {
            offset,
            op,
            values: vec![Value::Text(k.into())].into(),
            id: None,
        };
        let up = crate::Op::Upsert;
        let records = [
            rec(4, "a", up),
            rec(5, "b", up),
            rec(7, "a", up),
            rec(8, "c", up),
            rec(9, "a", up),
        ];
        assert_eq!(
            newest_of_each_key(&records, None, &[0]),
            Some(vec![false, true, false, true, true])
        );
        // Among the records kept (here: not the last "a").
        let keep = [true, true, true, true, false];
        assert_eq!(
            newest_of_each_key(&records, Some(&keep), &[0]),
            Some(vec![false, true, true, true, false])
        );
        // By offset, not by place in the batch.
        let swapped = [rec(9, "a", up), rec(4, "a", up)];
        assert_eq!(
            newest_of_each_key(&swapped, None, &[0]),
            Some(vec![true, false])
        );
        // Keys equal to the database are one key here too.
        let zeros = [
            Record {
                offset: 1,
                op: up,
                values: vec![Value::Double(-0.0)].into(),
                id: None,
            },
            Record {
                offset: 2,
                op: up,
                values: vec![Value::Double(0.0)].into(),
                id: None,
            },
        ];
        assert_eq!(
            newest_of_each_key(&zeros, None, &[0]),
            Some(vec![false, true])
        );
        // A tombstone leaves the pick to the table's SQL, unless dropped.
        let with_delete = [rec(1, "a", up), rec(2, "a", crate::Op::Delete)];
        assert_eq!(newest_of_each_key(&with_delete, None, &[0]), None);
        assert_eq!(
            newest_of_each_key(&with_delete, Some(&[true, false]), &[0]),
            Some(vec![true, false])
        );
    }

    #[test]
    fn fragments() {
        let keys = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            key_match("t", "s", &keys),
            r#"t."a" = s."a" AND t."b" = s."b""#
        );
        assert_eq!(
            guard("n", "o", None),
            "(n._idem_partition <> o._idem_partition OR n._idem_offset > o._idem_offset)"
        );
        assert!(guard("n", "o", Some("v")).starts_with(r#"(n."v" > o."v" OR (n."v" = o."v" AND"#));
        assert_eq!(changed("n", "o", &[]), "FALSE");
        assert_eq!(changed("n", "o", &["x"]), r#"n."x" IS DISTINCT FROM o."x""#);
        let cols = vec!["a".to_string(), "x".to_string()];
        assert_eq!(updates(&cols, &keys), r#""x" = excluded."x""#);
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(q("plain"), r#""plain""#);
        assert_eq!(q(r#"a"b"#), r#""a""b""#);
        let hostile = r#"a" text); COMMIT; CREATE TABLE pwned(i int); --"#;
        let quoted = q(hostile);
        // Inside the outer quotes every `"` comes in pairs: one identifier.
        let inner = &quoted[1..quoted.len() - 1];
        assert!(inner.replace("\"\"", "").find('"').is_none(), "{quoted}");
    }

    #[test]
    fn unique_upserts_spots_repeats_and_tombstones() {
        let rec = |k: &str, op| Record {
            offset: 0,
            op,
            values: vec![Value::Text(k.into())].into(),
            id: None,
        };
        assert!(unique_upserts(
            &[rec("a", Op::Upsert), rec("b", Op::Upsert)],
            &[0]
        ));
        assert!(!unique_upserts(
            &[rec("a", Op::Upsert), rec("a", Op::Upsert)],
            &[0]
        ));
        assert!(!unique_upserts(&[rec("a", Op::Delete)], &[0]));
    }

    #[test]
    fn first_of_each_id_keeps_one_record_per_id_and_those_without() {
        let rec = |id: Option<&str>| Record {
            offset: 0,
            op: Op::Upsert,
            values: vec![].into(),
            id: id.map(str::to_string),
        };
        let batch = [
            rec(Some("a")),
            rec(Some("b")),
            rec(Some("a")),
            rec(None),
            rec(None),
            rec(Some("b")),
        ];
        assert_eq!(
            first_of_each_id(&batch),
            [true, true, false, true, true, false]
        );
    }
}
