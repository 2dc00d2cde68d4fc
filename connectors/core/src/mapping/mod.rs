//! JSON message -> typed row, by the connector's `[[columns]]`. A message
//! that does not fit is a [`MapError`] naming the column and the value; the
//! runner sends it to the dead letters with its position.
//!
//! - `value.rs`: typed cells, records, and the conversion of a JSON value
//!   to a column's type;
//! - `flat.rs`: the one-pass reader of documents whose columns are all
//!   top-level fields.

mod debezium;
mod flat;
#[cfg(test)]
mod tests;
mod value;

pub use value::{plain_decimal, Op, Record, Value};

use crate::Message;
use flat::{disjoint, Flat};
use idem_config::{ColumnConfig, ColumnType, Envelope};
use serde_json::Value as Json;
use value::convert;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct MapError {
    pub reason: String,
}

impl MapError {
    fn new(reason: impl Into<String>) -> Self {
        MapError {
            reason: reason.into(),
        }
    }
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// A JSON pointer into the value.
    Doc,
    /// `@key`: the message key, as UTF-8 text.
    Key,
    /// `@timestamp`: the source's timestamp of the message.
    Timestamp,
    /// `@header/NAME`: a header's value, as UTF-8 text.
    Header(String),
    /// `@source/POINTER` (Debezium envelope): a field of the event's
    /// `source` block, e.g. `@source/lsn` (`@source`: the whole block).
    Source(Vec<String>),
    /// `@op` (Debezium envelope): the event's op, `c`, `r`, `u` or `d`.
    Op,
}

impl Origin {
    fn of(pointer: &str) -> Origin {
        match pointer {
            "@key" => Origin::Key,
            "@timestamp" => Origin::Timestamp,
            "@op" => Origin::Op,
            p => {
                if let Some(name) = p.strip_prefix("@header/") {
                    Origin::Header(name.to_string())
                } else if let Some(rest) = p
                    .strip_prefix("@source")
                    .filter(|r| r.is_empty() || r.starts_with('/'))
                {
                    Origin::Source(tokens(rest))
                } else {
                    Origin::Doc
                }
            }
        }
    }

    /// A part of the change event rather than of its row: it describes a
    /// delete as much as an upsert, so a delete keeps its value.
    fn of_event(&self) -> bool {
        matches!(self, Origin::Source(_) | Origin::Op)
    }
}

struct Column {
    name: String,
    from: Origin,
    pointer: String,
    /// `pointer` split into unescaped tokens once, not on every message.
    tokens: Vec<String>,
    ty: ColumnType,
    required: bool,
    key: bool,
}

/// Maps messages to rows for one connector.
pub struct Mapper {
    columns: Vec<Column>,
    tombstone_field: Option<String>,
    deletes: bool,
    /// No pointer is `""` or a prefix of another, so each field can be
    /// moved out of the parsed document instead of copied.
    disjoint: bool,
    /// Every pointer (and the tombstone field) is a top-level field: the
    /// document is read once, field by field, without building it.
    flat: Option<Flat>,
    envelope: Envelope,
}

impl Mapper {
    /// `keys` are always required; with `deletes`, null values and messages
    /// whose `tombstone_field` is `true` become [`Op::Delete`].
    pub fn new(
        columns: &[ColumnConfig],
        keys: &[String],
        deletes: bool,
        tombstone_field: Option<String>,
    ) -> Self {
        let pointers: Vec<String> = columns.iter().map(ColumnConfig::pointer).collect();
        // Only pointers into the value can overlap.
        let refs: Vec<&str> = pointers
            .iter()
            .map(String::as_str)
            .filter(|p| Origin::of(p) == Origin::Doc)
            .collect();
        let columns: Vec<Column> = columns
            .iter()
            .map(|c| {
                let key = keys.contains(&c.name);
                let pointer = c.pointer();
                Column {
                    name: c.name.clone(),
                    from: Origin::of(&pointer),
                    tokens: tokens(&pointer),
                    pointer,
                    ty: c.ty,
                    required: c.required || key,
                    key,
                }
            })
            .collect();
        let disjoint = disjoint(&refs);
        Mapper {
            flat: disjoint
                .then(|| Flat::new(&columns, tombstone_field.as_deref()))
                .flatten(),
            disjoint,
            columns,
            tombstone_field,
            deletes,
            envelope: Envelope::None,
        }
    }

    /// Rows wrapped in `envelope` (see [`Envelope`]).
    pub fn with_envelope(mut self, envelope: Envelope) -> Self {
        if envelope != Envelope::None {
            // The row is a part of the document: no flat reading.
            self.flat = None;
        }
        self.envelope = envelope;
        self
    }

    /// A message that carries no change and only moves the position: the
    /// tombstone Debezium sends after a delete (for log compaction).
    pub fn skips(&self, msg: &Message) -> bool {
        self.envelope == Envelope::Debezium && msg.value.is_none()
    }

    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    pub fn map(&self, msg: &Message) -> Result<Record, MapError> {
        if self.envelope == Envelope::Debezium {
            let (fields, op) = self.pick_change(msg)?;
            return self.record(msg, fields, op);
        }
        let Some(raw) = msg.value.as_deref() else {
            return Err(MapError::new(
                "tombstone (null value) with no key columns to delete by; set delete_on_tombstone = true on an upsert sink",
            ));
        };
        let (fields, tombstone) = match self.flat.as_ref().map(|f| f.parse(raw)) {
            Some(Ok(Some(picked))) => picked,
            // Not an object (or no flat plan): the general path decides.
            Some(Ok(None)) | None => self.pick(raw)?,
            Some(Err(e)) => return Err(MapError::new(format!("not valid JSON: {e}"))),
        };
        let op = if self.deletes && tombstone {
            Op::Delete
        } else {
            Op::Upsert
        };
        self.record(msg, fields, op)
    }

    /// The row of `msg` from its picked fields (`None` for columns taken
    /// from the message's key, timestamp or headers).
    fn record(
        &self,
        msg: &Message,
        mut fields: Vec<Option<Json>>,
        op: Op,
    ) -> Result<Record, MapError> {
        for (col, field) in self.columns.iter().zip(fields.iter_mut()) {
            if col.from != Origin::Doc && !col.from.of_event() {
                *field = metadata(col, msg)?;
            }
        }
        let mut values = Vec::with_capacity(self.columns.len());
        for (col, field) in self.columns.iter().zip(fields) {
            if op == Op::Delete && !col.key && !col.from.of_event() {
                values.push(Value::Null);
                continue;
            }
            let value = match field.filter(|v| !v.is_null()) {
                None if col.required => {
                    let what = if col.key {
                        "key column"
                    } else {
                        "required column"
                    };
                    return Err(MapError::new(format!(
                        "{what} `{}`: field `{}` is missing or null",
                        col.name, col.pointer
                    )));
                }
                None => Value::Null,
                Some(v) => match convert(v, col.ty) {
                    Ok(value) => value,
                    Err((v, expected)) => {
                        return Err(MapError::new(format!(
                            "column `{}` ({:?}): field `{}` holds {}, expected {expected}",
                            col.name,
                            col.ty,
                            col.pointer,
                            preview(&v)
                        )))
                    }
                },
            };
            values.push(value);
        }
        Ok(Record {
            offset: msg.offset,
            op,
            values,
            id: None,
        })
    }

    /// The general path: parse the whole document, then follow each pointer.
    fn pick(&self, raw: &[u8]) -> Result<(Vec<Option<Json>>, bool), MapError> {
        let mut doc = parse(raw)?;
        let tombstone = self.is_tombstone(&doc);
        Ok((self.fields(&mut doc), tombstone))
    }

    /// Each column's value in `doc` (moved out when pointers are disjoint).
    fn fields(&self, doc: &mut Json) -> Vec<Option<Json>> {
        self.columns
            .iter()
            .map(|col| {
                if col.from != Origin::Doc {
                    return None;
                }
                let found = lookup_mut(doc, &col.tokens);
                if self.disjoint {
                    found.map(Json::take)
                } else {
                    found.map(|v| v.clone())
                }
            })
            .collect()
    }

    /// A Debezium change event: the row its `op` applies, pointers resolved
    /// against it. A delete's row is `before` (with the source table's
    /// default replica identity, its key columns) or else the message key.
    fn pick_change(&self, msg: &Message) -> Result<(Vec<Option<Json>>, Op), MapError> {
        let raw = msg
            .value
            .as_deref()
            .ok_or_else(|| MapError::new("a tombstone reached the mapping (skipped before it)"))?;
        let (mut event, schema) = split_payload(parse(raw)?);
        let op = match event.get("op").and_then(Json::as_str) {
            Some("c" | "r" | "u") => Op::Upsert,
            Some("d") => Op::Delete,
            Some("t") => {
                return Err(MapError::new(
                    "a truncate event (op `t`): Idem does not empty the target table; truncate it yourself, or leave truncates out on the source (Debezium's `skipped.operations = \"t\"`)",
                ))
            }
            Some(other) => {
                return Err(MapError::new(format!(
                    "not a change Idem applies: Debezium op `{other}`"
                )))
            }
            None => {
                return Err(MapError::new(
                    "not a Debezium change event: no `op` field (envelope = \"debezium\")",
                ))
            }
        };
        let side = if op == Op::Upsert { "after" } else { "before" };
        // A sink without deletes keeps a change log: a delete is a row of
        // its own (its `before`), told apart by an `@op` column.
        let op = if self.deletes { op } else { Op::Upsert };
        let mut source = event
            .get_mut("source")
            .map(Json::take)
            .unwrap_or(Json::Null);
        let op_text = event.get_mut("op").map(Json::take);
        let mut row = event.get_mut(side).map(Json::take).unwrap_or(Json::Null);
        // With the converter's schema, logical types are decoded (dates
        // as days, decimals as bytes...); not for a row from the key.
        let mut logical = schema.and_then(|s| debezium::RowSchema::of(&s, side));
        if !row.is_object() {
            logical = None;
            if side == "after" {
                return Err(MapError::new(format!("a change event without `{side}`")));
            }
            // No `before` (replica identity NOTHING): the key names the row.
            let key = msg.key.as_deref().ok_or_else(|| {
                MapError::new("a delete event with neither `before` nor a message key")
            })?;
            row = unwrap_payload(parse(key).map_err(|e| {
                MapError::new(format!(
                    "a delete event without `before`, and its key is {}",
                    e.reason
                ))
            })?);
        }
        let mut fields = self.fields(&mut row);
        for (col, field) in self.columns.iter().zip(fields.iter_mut()) {
            if let (Some(logical), Origin::Doc, [name]) =
                (&logical, &col.from, col.tokens.as_slice())
            {
                if let Some(v) = field.take() {
                    let decoded = logical
                        .decode(name, col.ty, v)
                        .map_err(|e| MapError::new(format!("column `{}`: {e}", col.name)))?;
                    *field = Some(decoded);
                }
            }
            match &col.from {
                Origin::Source(tokens) => {
                    *field = lookup_mut(&mut source, tokens).map(|v| v.clone())
                }
                Origin::Op => field.clone_from(&op_text),
                _ => {}
            }
        }
        Ok((fields, op))
    }

    fn is_tombstone(&self, doc: &Json) -> bool {
        doc.is_null()
            || self
                .tombstone_field
                .as_deref()
                .and_then(|p| doc.pointer(p))
                .is_some_and(|v| v == &Json::Bool(true))
    }
}

fn parse(raw: &[u8]) -> Result<Json, MapError> {
    serde_json::from_slice(raw).map_err(|e| MapError::new(format!("not valid JSON: {e}")))
}

/// Kafka Connect's JSON converter with `schemas.enable = true` wraps each
/// key and value as `{"schema": .., "payload": ..}`.
fn unwrap_payload(doc: Json) -> Json {
    split_payload(doc).0
}

/// The payload and, when wrapped, its schema.
fn split_payload(doc: Json) -> (Json, Option<Json>) {
    match doc {
        Json::Object(mut map) if map.len() == 2 && map.contains_key("schema") => (
            map.remove("payload").unwrap_or(Json::Null),
            map.remove("schema"),
        ),
        doc => (doc, None),
    }
}

/// A column's value from the message's key, timestamp or a header.
fn metadata(col: &Column, msg: &Message) -> Result<Option<Json>, MapError> {
    let text = |what: &str, bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map(Json::String)
            .map_err(|_| MapError::new(format!("column `{}`: {what} is not UTF-8", col.name)))
    };
    Ok(match &col.from {
        Origin::Doc | Origin::Source(_) | Origin::Op => None,
        Origin::Key => match &msg.key {
            Some(k) => Some(text("the message key", k)?),
            None => None,
        },
        Origin::Timestamp => msg.meta.timestamp_ms.map(|ms| {
            if col.ty == ColumnType::Timestamp {
                chrono::DateTime::from_timestamp_millis(ms).map_or(Json::Null, |t| {
                    Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                })
            } else {
                Json::from(ms)
            }
        }),
        Origin::Header(name) => match msg.meta.headers.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => Some(text(&format!("header `{name}`"), v)?),
            None => None,
        },
    })
}

/// RFC 6901 tokens of a pointer (`""` is the whole document).
fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// `serde_json::Value::pointer_mut` with the pointer already split.
fn lookup_mut<'a>(doc: &'a mut Json, tokens: &[String]) -> Option<&'a mut Json> {
    tokens.iter().try_fold(doc, |target, token| match target {
        Json::Object(map) => map.get_mut(token),
        Json::Array(list) => token.parse::<usize>().ok().and_then(|i| list.get_mut(i)),
        _ => None,
    })
}

fn preview(v: &Json) -> String {
    let mut s = v.to_string();
    if s.len() > 80 {
        let mut cut = 77;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}
