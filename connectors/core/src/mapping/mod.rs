//! JSON message -> typed row, by the connector's `[[columns]]`. A message
//! that does not fit is a [`MapError`] naming the column and the value; the
//! runner sends it to the dead letters with its position.
//!
//! - `value.rs`: typed cells, records, and the conversion of a JSON value
//!   to a column's type;
//! - `flat.rs`: the one-pass reader of documents whose columns are all
//!   top-level fields.

pub mod avro;
mod debezium;
mod flat;
pub mod protobuf;
pub mod registry;
pub mod row;
#[cfg(test)]
mod tests;
mod value;

pub use row::{Record, Row, RowWriter};
pub use value::{plain_decimal, Op, Value, ValueRef};

use crate::Message;
use flat::{disjoint, Flat};
use idem_config::{ColumnConfig, ColumnType, Envelope, Pointer};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use value::convert;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct MapError {
    pub reason: String,
    /// Not the message's fault but the target's: every later message would
    /// fail alike (a column changed type in the source's schema), so the
    /// connector stops rather than dead-letter the rest of the stream.
    pub stop: bool,
}

impl MapError {
    fn new(reason: impl Into<String>) -> Self {
        MapError {
            reason: reason.into(),
            stop: false,
        }
    }

    fn stop(reason: impl Into<String>) -> Self {
        MapError {
            reason: reason.into(),
            stop: true,
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
        match Pointer::of(pointer) {
            Pointer::Key => Origin::Key,
            Pointer::Timestamp => Origin::Timestamp,
            Pointer::Op => Origin::Op,
            Pointer::Header(name) => Origin::Header(name.to_string()),
            Pointer::Source(rest) => Origin::Source(tokens(rest)),
            // Refused by the config's validation.
            Pointer::Field(_) | Pointer::Invalid => Origin::Doc,
        }
    }

    /// A part of the change event rather than of its row: it describes a
    /// delete as much as an upsert, so a delete keeps its value.
    fn of_event(&self) -> bool {
        matches!(self, Origin::Source(_) | Origin::Op)
    }
}

#[derive(Clone)]
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
    /// `evolve = "add_columns"`: the columns learnt from the events' schemas.
    learning: Option<Learning>,
    /// Debezium events' schemas, parsed once each.
    schemas: debezium::SchemaCache,
    /// `format = "avro"` or `"protobuf"`: values decoded with their
    /// writer's schema into the JSON document they stand for.
    decoder: Option<Decoder>,
    /// JSON after a schema registry's 5-byte prefix (`json_schema`).
    framed: bool,
}

/// How a value that is not JSON is read, as the document it stands for.
enum Decoder {
    /// Avro, every value written with one schema (`schema_file`).
    Avro(Box<avro::AvroSchema>),
    /// Avro in a registry's wire format: the schema its prefix names.
    Registry(std::sync::Arc<registry::RegistrySchemas>),
    /// Protobuf, one message type.
    Proto(Box<protobuf::ProtoSchema>),
}

/// The columns of a connector that learns them from the events' schemas.
struct Learning {
    /// Per route (the source table, for a connector that writes each to a
    /// table of its own; `""` otherwise): the listed columns, then those
    /// learnt, in the order first seen. A layout only grows, so a record's
    /// values stay a prefix of any later layout of its route.
    layouts: RwLock<HashMap<String, Arc<Layout>>>,
    /// The listed columns alone: where every route starts. Their types are
    /// not checked against the schema: they override it.
    base: Arc<Layout>,
    /// The type a decimal field becomes (the sink's choice).
    decimal: ColumnType,
    /// Each route's key is learnt too: the fields of the message key (the
    /// source table's primary key), for tables created per source table.
    key: bool,
    /// Columns are learnt from the events' schemas (`evolve`).
    from_schema: bool,
    /// The layouts start from the target table's columns
    /// (`columns_from = "table"`): an event without a schema maps by them.
    from_table: bool,
}

struct Layout {
    columns: Vec<Column>,
    /// The same columns as the sinks take them.
    configs: Arc<Vec<ColumnConfig>>,
    /// The key columns, when learnt from the message key: set by the first
    /// event, and every later event's key must name the same fields
    /// (`key_fields`; a listed column may read a key field under another
    /// name).
    key: Option<Arc<Vec<String>>>,
    key_fields: Option<Vec<String>>,
    /// How many columns come first whose types override the schema's (the
    /// listed ones, and those of the target table): the rest were learnt,
    /// and a schema that changes their type stops the connector.
    fixed: usize,
    /// Schemas (id, side) found to hold nothing new for these columns: an
    /// event of one is mapped without going through its fields again.
    /// Columns only grow and never change type, so this stays true.
    settled: RwLock<std::collections::HashSet<(u64, bool)>>,
}

/// A new id for a schema parsed by this process (Debezium's or Avro's).
fn next_schema_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How many schema sides a layout remembers as settled (then forgets
/// them all: a wrapper in an unusual order brings a new schema id with
/// every event).
const SETTLED: usize = 1024;

impl Layout {
    fn new(columns: Vec<Column>, configs: Vec<ColumnConfig>) -> Layout {
        Layout {
            fixed: columns.len(),
            columns,
            configs: Arc::new(configs),
            key: None,
            key_fields: None,
            settled: Default::default(),
        }
    }
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
            learning: None,
            schemas: Default::default(),
            decoder: None,
            framed: false,
        }
    }

    /// Values in Avro's binary encoding, written with `schema`.
    pub fn with_avro(mut self, schema: avro::AvroSchema) -> Self {
        // The flat reader parses JSON text.
        self.flat = None;
        self.decoder = Some(Decoder::Avro(Box::new(schema)));
        self
    }

    /// Values in a schema registry's wire format, each decoded with the
    /// schema of its id, which `schemas` must hold by the time the value
    /// is mapped (see [`registry::RegistrySchemas`]).
    pub fn with_registry(mut self, schemas: std::sync::Arc<registry::RegistrySchemas>) -> Self {
        self.flat = None;
        self.decoder = Some(Decoder::Registry(schemas));
        self
    }

    /// JSON values after a schema registry's prefix (`format =
    /// "json_schema"`): the prefix is checked and passed over.
    pub fn with_registry_prefix(mut self) -> Self {
        self.framed = true;
        self
    }

    /// Values that are each one serialized Protobuf message of `schema`.
    pub fn with_protobuf(mut self, schema: protobuf::ProtoSchema) -> Self {
        self.flat = None;
        self.decoder = Some(Decoder::Proto(Box::new(schema)));
        self
    }

    /// Learn columns from each event's schema (`evolve = "add_columns"`):
    /// a field no column reads becomes a nullable column of the schema's
    /// type; decimals become `decimal` (see [`crate::AddsColumns`]).
    pub fn learning_columns(mut self, listed: &[ColumnConfig], decimal: ColumnType) -> Self {
        let learning = self.learning(listed);
        learning.decimal = decimal;
        learning.from_schema = true;
        self
    }

    /// Take the columns beyond the listed ones from the target table
    /// (`columns_from = "table"`), once [`Mapper::seed`] gives them: each
    /// read from the row's field of its name.
    pub fn columns_from_table(mut self, listed: &[ColumnConfig]) -> Self {
        self.learning(listed).from_table = true;
        self
    }

    /// The target table's columns for `route` (see
    /// [`Mapper::columns_from_table`]): those no listed column reads are
    /// appended to the listed ones, in the table's order. `Err`: a name no
    /// column can have.
    pub fn seed(&self, route: &str, table: &[(String, ColumnType)]) -> Result<(), String> {
        let Some(learning) = self.learning.as_ref().filter(|l| l.from_table) else {
            return Ok(());
        };
        let mut columns = learning.base.columns.clone();
        let mut configs = (*learning.base.configs).clone();
        for (name, ty) in table {
            if columns.iter().any(|c| reads(c, name)) {
                continue;
            }
            learnable(name)?;
            let (column, config) = field_column(name, *ty);
            columns.push(column);
            configs.push(config);
        }
        learning
            .layouts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(route.to_string(), Arc::new(Layout::new(columns, configs)));
        Ok(())
    }

    /// The columns' layouts, started from the `listed` ones on first use
    /// (by columns learnt from schemas, taken from the table, or both).
    fn learning(&mut self, listed: &[ColumnConfig]) -> &mut Learning {
        let columns = &self.columns;
        self.learning.get_or_insert_with(|| Learning {
            layouts: RwLock::new(HashMap::new()),
            base: Arc::new(Layout::new(columns.clone(), listed.to_vec())),
            decimal: ColumnType::Text,
            key: false,
            from_schema: false,
            from_table: false,
        })
    }

    /// Learn each route's key from the message key as well (with
    /// [`Mapper::learning_columns`]): its fields, in order, become the key
    /// columns, which every later event of the route must keep.
    pub fn learning_key(mut self) -> Self {
        if let Some(learning) = &mut self.learning {
            learning.key = true;
        }
        self
    }

    /// The key columns of `route`, when learnt (see [`crate::Batch::key`]).
    pub fn learnt_key(&self, route: &str) -> Option<Arc<Vec<String>>> {
        let learning = self.learning.as_ref().filter(|l| l.key)?;
        learning.layout(route).key.clone()
    }

    /// The columns of `route` so far, when they are learnt from the events
    /// (see [`crate::Batch::columns`]); `None`: the configured ones.
    pub fn learnt_columns(&self, route: &str) -> Option<Arc<Vec<ColumnConfig>>> {
        let learning = self.learning.as_ref()?;
        Some(learning.layout(route).configs.clone())
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
        self.map_in(msg, "")
    }

    /// [`Mapper::map`] for a message of `route`: with learnt columns, each
    /// route (source table) learns its own.
    pub fn map_in(&self, msg: &Message, route: &str) -> Result<Record, MapError> {
        if self.envelope == Envelope::Debezium {
            let (fields, op, layout) = self.pick_change(msg, route)?;
            let columns = layout.as_ref().map_or(&self.columns, |l| &l.columns);
            return self.record(columns, msg, fields, op);
        }
        let Some(raw) = msg.value.as_deref() else {
            return Err(MapError::new(
                "tombstone (null value) with no key columns to delete by; set delete_on_tombstone = true on an upsert sink",
            ));
        };
        if let Some(decoder) = &self.decoder {
            let (mut doc, layout) = match decoder {
                Decoder::Proto(schema) => (schema.decode(raw).map_err(MapError::new)?, None),
                Decoder::Avro(schema) => (
                    schema.decode(raw).map_err(MapError::new)?,
                    self.learn_avro(schema, route)?,
                ),
                Decoder::Registry(schemas) => {
                    let (id, value) = registry::wire_format(raw).map_err(MapError::new)?;
                    let Some(schema) = schemas.get(id) else {
                        // The runner fetches every id before mapping.
                        return Err(MapError::stop(format!(
                            "schema id {id} was not fetched from the registry before its message"
                        )));
                    };
                    let with_id = |e: MapError| MapError {
                        reason: format!("schema id {id}: {}", e.reason),
                        ..e
                    };
                    match schema.as_ref() {
                        registry::Writer::Avro(schema) => (
                            schema
                                .decode(value)
                                .map_err(MapError::new)
                                .map_err(with_id)?,
                            self.learn_avro(schema, route).map_err(with_id)?,
                        ),
                        registry::Writer::Protobuf(file) => (
                            file.decode(value).map_err(MapError::new).map_err(with_id)?,
                            None,
                        ),
                    }
                }
            };
            let columns = layout.as_ref().map_or(&self.columns, |l| &l.columns);
            let tombstone = self.is_tombstone(&doc);
            let fields = self.fields(columns, &mut doc);
            let op = if self.deletes && tombstone {
                Op::Delete
            } else {
                Op::Upsert
            };
            return self.record(columns, msg, fields, op);
        }
        let raw = if self.framed {
            registry::wire_format(raw).map_err(MapError::new)?.1
        } else {
            raw
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
        self.record(&self.columns, msg, fields, op)
    }

    /// The row of `msg` from its picked fields (`None` for columns taken
    /// from the message's key, timestamp or headers).
    fn record(
        &self,
        columns: &[Column],
        msg: &Message,
        mut fields: Vec<Option<Json>>,
        op: Op,
    ) -> Result<Record, MapError> {
        for (col, field) in columns.iter().zip(fields.iter_mut()) {
            if col.from != Origin::Doc && !col.from.of_event() {
                *field = metadata(col, msg)?;
            }
        }
        // Packed as they are converted: a record holds two allocations,
        // not one per text.
        let mut values = RowWriter::with_capacity(msg.size());
        for (col, field) in columns.iter().zip(fields) {
            if op == Op::Delete && !col.key && !col.from.of_event() {
                values.push(ValueRef::Null);
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
            values.push(value.as_ref());
        }
        Ok(Record {
            offset: msg.offset,
            op,
            values: values.finish(),
            id: None,
        })
    }

    /// The general path: parse the whole document, then follow each pointer.
    fn pick(&self, raw: &[u8]) -> Result<(Vec<Option<Json>>, bool), MapError> {
        let mut doc = parse(raw)?;
        let tombstone = self.is_tombstone(&doc);
        Ok((self.fields(&self.columns, &mut doc), tombstone))
    }

    /// Each column's value in `doc` (moved out when pointers are disjoint).
    fn fields(&self, columns: &[Column], doc: &mut Json) -> Vec<Option<Json>> {
        columns
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
    #[allow(clippy::type_complexity)]
    fn pick_change(
        &self,
        msg: &Message,
        route: &str,
    ) -> Result<(Vec<Option<Json>>, Op, Option<Arc<Layout>>), MapError> {
        let raw = msg
            .value
            .as_deref()
            .ok_or_else(|| MapError::new("a tombstone reached the mapping (skipped before it)"))?;
        let (mut event, schema) = self.split_event(raw)?;
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
        let layout = match &self.learning {
            // Not learning from this event: no schema to learn from, and
            // the target table's columns to map by.
            Some(learning)
                if !learning.from_schema || (schema.is_none() && learning.from_table) =>
            {
                Some(learning.layout(route))
            }
            Some(learning) => {
                let key = if learning.key {
                    Some(key_names(msg)?)
                } else {
                    None
                };
                Some(self.learn(learning, route, schema.as_deref(), side, key)?)
            }
            None => None,
        };
        let columns = layout.as_ref().map_or(&self.columns, |l| &l.columns);
        // With the converter's schema, logical types are decoded (dates
        // as days, decimals as bytes...); not for a row from the key.
        let mut logical = schema.as_ref().and_then(|s| s.row(side));
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
        let mut fields = self.fields(columns, &mut row);
        for (col, field) in columns.iter().zip(fields.iter_mut()) {
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
        Ok((fields, op, layout))
    }

    /// The layout for an event whose schema is `schema`: the current one,
    /// grown by the fields of `side` that no column reads yet, and keyed on
    /// `key` (the message key's fields) when the key is learnt.
    fn learn(
        &self,
        learning: &Learning,
        route: &str,
        schema: Option<&debezium::EventSchema>,
        side: &str,
        key: Option<Vec<String>>,
    ) -> Result<Arc<Layout>, MapError> {
        let schema = schema.ok_or_else(|| {
            MapError::new("evolve = \"add_columns\" reads the columns from the event's schema, and this event has none: set the JSON converter's value.converter.schemas.enable = true on the Debezium connector")
        })?;
        let fields = || {
            let fields = schema.fields(side).ok_or_else(|| {
                MapError::new(format!("the event's schema has no `{side}` struct"))
            })?;
            Ok(fields
                .iter()
                .map(|(name, field)| {
                    (
                        name.clone(),
                        debezium::column_type(field, learning.decimal),
                        debezium::describe(field),
                    )
                })
                .collect())
        };
        self.learn_fields(
            learning,
            route,
            (schema.id, side == "after"),
            fields,
            key,
            side,
        )
    }

    /// With `evolve`, the layout for values of an Avro writer's schema:
    /// its fields that no column reads yet become columns.
    fn learn_avro(
        &self,
        schema: &avro::AvroSchema,
        route: &str,
    ) -> Result<Option<Arc<Layout>>, MapError> {
        let Some(learning) = self.learning.as_ref().filter(|l| l.from_schema) else {
            return Ok(None);
        };
        let fields = || {
            schema
                .described_columns(learning.decimal)
                .map_err(MapError::stop)
        };
        self.learn_fields(
            learning,
            route,
            (schema.id, true),
            fields,
            None,
            "the value",
        )
        .map(Some)
    }

    /// The layout for rows of a schema known by `settled` (its id, and
    /// which side), whose `fields` (name, column type, the type as the
    /// schema says it) are read only when the layout may lack some.
    fn learn_fields(
        &self,
        learning: &Learning,
        route: &str,
        settled: (u64, bool),
        fields: impl FnOnce() -> Result<Vec<(String, ColumnType, String)>, MapError>,
        key: Option<Vec<String>>,
        side: &str,
    ) -> Result<Arc<Layout>, MapError> {
        let current = learning.layout(route);
        let same_key = |layout: &Layout| match (&key, &layout.key_fields) {
            (None, _) => true,
            (Some(k), Some(known)) => k == known,
            (Some(_), None) => false,
        };
        if same_key(&current) && read_set(&current.settled).contains(&settled) {
            return Ok(current);
        }
        let fields = fields()?;
        // Once per schema and layout: checked and grown under the lock, so
        // no other partition's learning slips in between.
        let mut layouts = learning
            .layouts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let layout = layouts
            .entry(route.to_string())
            .or_insert_with(|| learning.base.clone());
        let listed = layout.fixed;
        let mut columns = layout.columns.clone();
        let mut configs = (*layout.configs).clone();
        for (name, ty, described) in &fields {
            let (name, ty) = (name.as_str(), *ty);
            match columns.iter().position(|c| reads(c, name)) {
                Some(i) if i >= listed && columns[i].ty != ty => {
                    return Err(MapError::stop(format!(
                        "column `{name}` changed type in the source's schema: it was {}, it is now {} ({described}); Idem does not change a column's type. Alter the target column yourself and list it in [[columns]] with its new type, then restart",
                        columns[i].ty.name(),
                        ty.name(),
                    )));
                }
                Some(_) => {}
                None => {
                    learnable(name).map_err(MapError::stop)?;
                    let (column, config) = field_column(name, ty);
                    columns.push(column);
                    configs.push(config);
                }
            }
        }
        let (mut learnt_key, mut key_fields) = (layout.key.clone(), layout.key_fields.clone());
        let new_key = !same_key(layout);
        if let Some(key) = key.filter(|_| new_key) {
            if let Some(known) = &layout.key_fields {
                return Err(MapError::stop(format!(
                    "the source table's key changed: its events were keyed on ({}), this one on ({}); Idem does not change a table's primary key. Alter the target table's primary key yourself, then restart",
                    known.join(", "),
                    key.join(", ")
                )));
            }
            let mut names = Vec::with_capacity(key.len());
            for field in &key {
                let col = columns.iter_mut().find(|c| reads(c, field)).ok_or_else(|| {
                    MapError::stop(format!(
                        "the message key's field `{field}` is not a field of the row in `{side}`, so it cannot key the table; list the table's key in the sink's `key`"
                    ))
                })?;
                col.key = true;
                col.required = true;
                names.push(col.name.clone());
            }
            learnt_key = Some(Arc::new(names));
            key_fields = Some(key);
        }
        if columns.len() > layout.columns.len() || key_fields != layout.key_fields {
            let mut grown = Layout::new(columns, configs);
            grown.key = learnt_key;
            grown.key_fields = key_fields;
            grown.fixed = layout.fixed;
            *layout = Arc::new(grown);
        }
        settle(&layout.settled, settled);
        Ok(layout.clone())
    }

    /// A change event and its schema: the JSON converter writes the schema
    /// first, so its text is looked up among those seen (parsed once)
    /// while only the payload is parsed.
    fn split_event(
        &self,
        raw: &[u8],
    ) -> Result<(Json, Option<Arc<debezium::EventSchema>>), MapError> {
        #[derive(serde::Deserialize)]
        struct Wrapped<'a> {
            #[serde(borrow)]
            schema: &'a serde_json::value::RawValue,
            payload: Json,
        }
        if raw.starts_with(b"{\"schema\":") {
            if let Ok(w) = serde_json::from_slice::<Wrapped<'_>>(raw) {
                let schema = self.schemas.get(w.schema.get()).map_err(|e| {
                    MapError::new(format!("the event's schema is not valid JSON: {e}"))
                })?;
                return Ok((w.payload, Some(schema)));
            }
        }
        let (event, schema) = split_payload(parse(raw)?);
        Ok((event, schema.map(debezium::SchemaCache::of_parsed)))
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

impl Learning {
    fn layout(&self, route: &str) -> Arc<Layout> {
        self.layouts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(route)
            .unwrap_or(&self.base)
            .clone()
    }
}

fn read_set(
    set: &RwLock<std::collections::HashSet<(u64, bool)>>,
) -> std::sync::RwLockReadGuard<'_, std::collections::HashSet<(u64, bool)>> {
    set.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Remember that a schema side holds nothing new for a layout.
fn settle(set: &RwLock<std::collections::HashSet<(u64, bool)>>, settled: (u64, bool)) {
    let mut set = set
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if set.len() >= SETTLED {
        set.clear();
    }
    set.insert(settled);
}

/// A nullable column read from the row's top-level field `name`, as the
/// mapper and the sinks take it.
fn field_column(name: &str, ty: ColumnType) -> (Column, ColumnConfig) {
    let pointer = format!("/{}", name.replace('~', "~0").replace('/', "~1"));
    (
        Column {
            name: name.to_string(),
            from: Origin::Doc,
            tokens: vec![name.to_string()],
            pointer: pointer.clone(),
            ty,
            required: false,
            key: false,
        },
        ColumnConfig {
            name: name.to_string(),
            pointer: Some(pointer),
            ty,
            required: false,
        },
    )
}

/// Whether `col` holds the row's field `name`: named so, or reading it.
fn reads(col: &Column, name: &str) -> bool {
    col.name == name || (col.from == Origin::Doc && col.tokens.len() == 1 && col.tokens[0] == name)
}

/// A field name taken from a schema is untrusted: it becomes a column only
/// if every target can hold it (it is always quoted in SQL).
fn learnable(name: &str) -> Result<(), String> {
    let fix = "list a column in [[columns]] with another name and pointer = \"/FIELD\" to take this field";
    if name.is_empty() || name.starts_with("_idem_") {
        return Err(format!(
            "the source's schema has a field named {name:?}, which cannot be a column (empty, or `_idem_` is reserved): {fix}"
        ));
    }
    idem_config::check_column_name(name).map_err(|e| format!("the source's schema: {e}: {fix}"))?;
    if name.len() > idem_config::POSTGRES_MAX_NAME {
        return Err(format!(
            "the source's schema has a field `{name}` of {} bytes; a column name holds at most {}: {fix}",
            name.len(),
            idem_config::POSTGRES_MAX_NAME
        ));
    }
    Ok(())
}

fn parse(raw: &[u8]) -> Result<Json, MapError> {
    serde_json::from_slice(raw).map_err(|e| MapError::new(format!("not valid JSON: {e}")))
}

/// The field names of a message key (a Debezium key is an object of the
/// source table's primary key columns), in the order they are written,
/// which is the key's column order. A message without a key is refused:
/// its table has no primary key to upsert by.
fn key_names(msg: &Message) -> Result<Vec<String>, MapError> {
    struct Names(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Names {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Names;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object of key fields")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Names, A::Error> {
                    let mut names = Vec::new();
                    while let Some(name) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        names.push(name);
                    }
                    Ok(Names(names))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    #[derive(serde::Deserialize)]
    struct Wrapped {
        #[allow(dead_code)]
        schema: serde::de::IgnoredAny,
        payload: Names,
    }
    let raw = msg.key.as_deref().ok_or_else(|| {
        MapError::stop("an event without a message key: its source table has no primary key, so there is nothing to upsert its rows by; list the columns to key on in the sink's `key`, or leave the table out of the topic pattern")
    })?;
    let names = if raw.starts_with(b"{\"schema\":") {
        serde_json::from_slice::<Wrapped>(raw).map(|w| w.payload.0)
    } else {
        serde_json::from_slice::<Names>(raw).map(|n| n.0)
    }
    .map_err(|e| {
        MapError::new(format!(
            "the message key is not a Debezium key (an object of the primary key's fields): {e}"
        ))
    })?;
    if names.is_empty() {
        return Err(MapError::new(
            "the message key is an empty object: no primary key field to key the row by",
        ));
    }
    Ok(names)
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

fn tokens(pointer: &str) -> Vec<String> {
    idem_config::pointer_tokens(pointer)
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
