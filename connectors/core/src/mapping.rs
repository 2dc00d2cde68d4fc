//! JSON message -> typed row, by the connector's `[[columns]]`. A message
//! that does not fit is a [`MapError`] naming the column and the value; the
//! runner sends it to the dead letters with its position.

use crate::Message;
use idem_config::{ColumnConfig, ColumnType};
use serde_json::Value as Json;

/// A typed cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    BigInt(i64),
    Integer(i32),
    Double(f64),
    Boolean(bool),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since the Unix epoch.
    Date(i32),
    /// Serialized JSON.
    Json(String),
    /// A plain decimal: optional `-`, integer digits without leading
    /// zeros, then `.` and the fraction digits as written (no exponent).
    Numeric(String),
    Uuid([u8; 16]),
    Bytes(Vec<u8>),
}

impl Value {
    /// The value as JSON, for sinks that write JSON: timestamps as RFC 3339
    /// text in UTC with microseconds (`2026-11-24T10:00:00.000000Z`), dates
    /// as `YYYY-MM-DD`, numerics as their exact text, UUIDs as text, bytes
    /// as base64: what JSON readers (DuckDB, Spark, jq) take without a
    /// schema.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Text(s) => s.clone().into(),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| s.clone().into()),
            Value::BigInt(n) => (*n).into(),
            Value::Integer(n) => (*n).into(),
            Value::Double(x) => (*x).into(),
            Value::Boolean(b) => (*b).into(),
            Value::Timestamp(_) | Value::Date(_) => self.time_text().into(),
            // As the message carried them: exact text, UUID text, base64.
            Value::Numeric(s) => s.clone().into(),
            Value::Uuid(u) => uuid::Uuid::from_bytes(*u).to_string().into(),
            Value::Bytes(b) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(b).into()
            }
        }
    }
}

impl Value {
    /// A timestamp or date as text; empty for other values. Out-of-range
    /// times (beyond year 262143) keep their number.
    pub fn time_text(&self) -> String {
        let mut out = Vec::with_capacity(27);
        self.write_time(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`Value::time_text`] appended to `out`: digits written by hand,
    /// since JSON sinks write one per record and a format string costs
    /// more than the rest of the record.
    fn write_time(&self, out: &mut Vec<u8>) {
        use chrono::{Datelike as _, Timelike as _};
        fn digits(out: &mut Vec<u8>, n: u32, width: usize) {
            let mut buf = [b'0'; 6];
            let mut n = n;
            for i in (0..width).rev() {
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
            out.extend_from_slice(&buf[..width]);
        }
        let (t, with_time) = match self {
            Value::Timestamp(us) => (chrono::DateTime::from_timestamp_micros(*us), true),
            Value::Date(d) => (
                chrono::DateTime::from_timestamp(i64::from(*d) * 86_400, 0),
                false,
            ),
            _ => return,
        };
        let Some(t) = t else {
            // Beyond chrono's range (about 262,000 years): the number.
            match self {
                Value::Timestamp(n) => out.extend_from_slice(n.to_string().as_bytes()),
                Value::Date(n) => out.extend_from_slice(n.to_string().as_bytes()),
                _ => {}
            }
            return;
        };
        if !(0..=9999).contains(&t.year()) {
            let f = if with_time {
                "%Y-%m-%dT%H:%M:%S%.6fZ"
            } else {
                "%Y-%m-%d"
            };
            out.extend_from_slice(t.format(f).to_string().as_bytes());
            return;
        }
        digits(out, t.year() as u32, 4);
        out.push(b'-');
        digits(out, t.month(), 2);
        out.push(b'-');
        digits(out, t.day(), 2);
        if with_time {
            out.push(b'T');
            digits(out, t.hour(), 2);
            out.push(b':');
            digits(out, t.minute(), 2);
            out.push(b':');
            digits(out, t.second(), 2);
            out.push(b'.');
            digits(out, t.timestamp_subsec_micros(), 6);
            out.push(b'Z');
        }
    }

    /// Append [`Value::to_json`]'s text to `out`, without building a
    /// `serde_json::Value` for the common scalar cases.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Text(s) | Value::Numeric(s) => serde_json::to_writer(&mut *out, s.as_str())?,
            Value::BigInt(n) => serde_json::to_writer(&mut *out, n)?,
            Value::Integer(n) => serde_json::to_writer(&mut *out, n)?,
            Value::Timestamp(_) | Value::Date(_) => {
                out.push(b'"');
                self.write_time(out);
                out.push(b'"');
            }
            // Through serde_json's own Value: non-finite doubles become null.
            Value::Double(x) => serde_json::to_writer(&mut *out, &serde_json::Value::from(*x))?,
            Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Json(_) | Value::Uuid(_) | Value::Bytes(_) => {
                serde_json::to_writer(&mut *out, &self.to_json())?
            }
        }
        Ok(())
    }
}

/// Insert/replace, or delete by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Upsert,
    Delete,
}

/// A mapped message: one row, in column order, and its offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub offset: u64,
    pub op: Op,
    pub values: Vec<Value>,
    /// The message id, when the connector deduplicates (or its sink needs
    /// one, as an HTTP idempotency key).
    pub id: Option<String>,
}

impl Record {
    /// The row as a JSON object keyed by `names` (the columns, in order),
    /// with room for `extra` more fields.
    pub fn to_json_object(
        &self,
        names: &[String],
        extra: usize,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut obj = serde_json::Map::with_capacity(names.len() + extra);
        for (name, v) in names.iter().zip(&self.values) {
            obj.insert(name.clone(), v.to_json());
        }
        obj
    }
}

/// Why a message could not become a row.
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
}

impl Origin {
    fn of(pointer: &str) -> Origin {
        match pointer {
            "@key" => Origin::Key,
            "@timestamp" => Origin::Timestamp,
            p => match p.strip_prefix("@header/") {
                Some(name) => Origin::Header(name.to_string()),
                None => Origin::Doc,
            },
        }
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
}

/// Top-level field names: the columns' (`None` for a column that is not
/// read from the value), then the tombstone field's.
struct Flat {
    names: Vec<Option<String>>,
    tombstone: Option<String>,
}

impl Flat {
    fn new(columns: &[Column], tombstone: Option<&str>) -> Option<Flat> {
        let top = |tokens: &[String]| match tokens {
            [name] => Some(name.clone()),
            _ => None,
        };
        let names = columns
            .iter()
            .map(|c| match c.from {
                Origin::Doc => top(&c.tokens).map(Some),
                _ => Some(None),
            })
            .collect::<Option<Vec<_>>>()?;
        let tombstone = match tombstone {
            Some(p) => Some(top(&tokens(p))?),
            None => None,
        };
        Some(Flat { names, tombstone })
    }

    /// The columns' fields and whether the message is a tombstone; `None`
    /// when the document is not an object (the general path handles it).
    #[allow(clippy::type_complexity)]
    fn parse(&self, raw: &[u8]) -> serde_json::Result<Option<(Vec<Option<Json>>, bool)>> {
        let mut de = serde_json::Deserializer::from_slice(raw);
        let picked = serde::de::DeserializeSeed::deserialize(FlatSeed(self), &mut de)?;
        de.end()?;
        Ok(picked)
    }
}

struct FlatSeed<'a>(&'a Flat);

/// Which of the wanted fields a key is.
enum Slot {
    Column(usize),
    Tombstone,
    Other,
}

struct KeySeed<'a>(&'a Flat);

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Slot;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeySeed<'_> {
    type Value = Slot;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Slot, E> {
        Ok(
            match self.0.names.iter().position(|n| n.as_deref() == Some(key)) {
                Some(i) => Slot::Column(i),
                None if self.0.tombstone.as_deref() == Some(key) => Slot::Tombstone,
                None => Slot::Other,
            },
        )
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for FlatSeed<'_> {
    type Value = Option<(Vec<Option<Json>>, bool)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FlatSeed<'_> {
    type Value = Option<(Vec<Option<Json>>, bool)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Vec<Option<Json>> = vec![None; self.0.names.len()];
        let mut tombstone = false;
        while let Some(slot) = map.next_key_seed(KeySeed(self.0))? {
            // A repeated key: the last one wins, as in a parsed document.
            match slot {
                Slot::Column(i) => fields[i] = Some(map.next_value()?),
                Slot::Tombstone => tombstone = map.next_value::<Json>()? == Json::Bool(true),
                Slot::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some((fields, tombstone)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        // `null`: a tombstone with no fields.
        Ok(Some((vec![None; self.0.names.len()], true)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// Whether no pointer contains another (or the whole document).
fn disjoint(pointers: &[&str]) -> bool {
    pointers.iter().enumerate().all(|(i, a)| {
        !a.is_empty()
            && pointers
                .iter()
                .enumerate()
                .all(|(j, b)| i == j || (a != b && !b.starts_with(&format!("{a}/"))))
    })
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
        }
    }

    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    pub fn map(&self, msg: &Message) -> Result<Record, MapError> {
        let Some(raw) = msg.value.as_deref() else {
            return Err(MapError::new(
                "tombstone (null value) with no key columns to delete by; set delete_on_tombstone = true on an upsert sink",
            ));
        };
        let (mut fields, tombstone) = match self.flat.as_ref().map(|f| f.parse(raw)) {
            Some(Ok(Some(picked))) => picked,
            // Not an object (or no flat plan): the general path decides.
            Some(Ok(None)) | None => self.pick(raw)?,
            Some(Err(e)) => return Err(MapError::new(format!("not valid JSON: {e}"))),
        };
        for (col, field) in self.columns.iter().zip(fields.iter_mut()) {
            if col.from != Origin::Doc {
                *field = metadata(col, msg)?;
            }
        }
        let op = if self.deletes && tombstone {
            Op::Delete
        } else {
            Op::Upsert
        };
        let mut values = Vec::with_capacity(self.columns.len());
        for (col, field) in self.columns.iter().zip(fields) {
            if op == Op::Delete && !col.key {
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
        let mut doc: Json = serde_json::from_slice(raw)
            .map_err(|e| MapError::new(format!("not valid JSON: {e}")))?;
        let tombstone = self.is_tombstone(&doc);
        let fields = self
            .columns
            .iter()
            .map(|col| {
                if col.from != Origin::Doc {
                    return None;
                }
                let found = lookup_mut(&mut doc, &col.tokens);
                if self.disjoint {
                    found.map(Json::take)
                } else {
                    found.map(|v| v.clone())
                }
            })
            .collect();
        Ok((fields, tombstone))
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

/// A column's value from the message's key, timestamp or a header.
fn metadata(col: &Column, msg: &Message) -> Result<Option<Json>, MapError> {
    let text = |what: &str, bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map(Json::String)
            .map_err(|_| MapError::new(format!("column `{}`: {what} is not UTF-8", col.name)))
    };
    Ok(match &col.from {
        Origin::Doc => None,
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

/// Convert an owned JSON value; on failure hand it back with what was expected.
fn convert(v: Json, ty: ColumnType) -> Result<Value, (Json, &'static str)> {
    let fail = |v: Json, expected: &'static str| Err((v, expected));
    match ty {
        ColumnType::Text => match v {
            Json::String(s) => Ok(Value::Text(s)),
            Json::Number(n) => Ok(Value::Text(n.to_string())),
            Json::Bool(b) => Ok(Value::Text(b.to_string())),
            v => fail(v, "a string"),
        },
        ColumnType::Bigint => match v.as_i64() {
            Some(n) => Ok(Value::BigInt(n)),
            None => fail(v, "an integer in 64-bit range"),
        },
        ColumnType::Integer => match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
            Some(n) => Ok(Value::Integer(n)),
            None => fail(v, "an integer in 32-bit range"),
        },
        // Numbers are kept as written (arbitrary precision), so `1e400`
        // reaches here and parses to infinity: refused, as before.
        ColumnType::Double => match v.as_f64().filter(|x| x.is_finite()) {
            Some(x) => Ok(Value::Double(x)),
            None => fail(v, "a finite number in double range"),
        },
        ColumnType::Boolean => match v.as_bool() {
            Some(b) => Ok(Value::Boolean(b)),
            None => fail(v, "true or false"),
        },
        ColumnType::Timestamp => {
            let parsed = v
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
            match parsed {
                Some(t) => Ok(Value::Timestamp(t.timestamp_micros())),
                None => fail(
                    v,
                    "an RFC 3339 timestamp string such as 2026-01-31T12:00:00Z",
                ),
            }
        }
        ColumnType::Date => {
            let days = v
                .as_str()
                .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                .and_then(|d| {
                    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
                    i32::try_from(d.signed_duration_since(epoch).num_days()).ok()
                });
            match days {
                Some(d) => Ok(Value::Date(d)),
                None => fail(v, "a date string YYYY-MM-DD"),
            }
        }
        ColumnType::Json => Ok(Value::Json(v.to_string())),
        ColumnType::Numeric => {
            let text = match &v {
                Json::Number(n) => Some(plain_decimal(&n.to_string())),
                Json::String(s) => Some(plain_decimal(s)),
                _ => None,
            };
            match text {
                Some(Some(d)) => Ok(Value::Numeric(d)),
                _ => fail(
                    v,
                    "a decimal number or string such as \"-12.50\" (at most 1000 digits each side of the point)",
                ),
            }
        }
        ColumnType::Uuid => match v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
            Some(u) => Ok(Value::Uuid(u.into_bytes())),
            None => fail(v, "a UUID string"),
        },
        ColumnType::Bytea => {
            use base64::Engine as _;
            match v
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            {
                Some(bytes) => Ok(Value::Bytes(bytes)),
                None => fail(v, "a base64 string (standard alphabet, padded)"),
            }
        }
    }
}

/// Digits allowed on each side of the point of a `numeric` value; far more
/// than money or measurements need, and what PostgreSQL's `numeric(p)`
/// allows, while an exponent cannot blow a message up into megabytes.
const MAX_DECIMAL_DIGITS: usize = 1000;

/// `-1.5e3` -> `-1500`, `0012.50` -> `12.50`, `1e-2` -> `0.01`; `None` when
/// `s` is not a decimal (sign, digits, optional fraction and exponent) or
/// has too many digits.
pub fn plain_decimal(s: &str) -> Option<String> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // Where the point falls among the digits once the exponent is applied.
    let digits = format!("{int}{frac}");
    let point = i64::try_from(int.len()).ok()?.checked_add(exp)?;
    let limit = i64::try_from(MAX_DECIMAL_DIGITS).ok()?;
    let len = i64::try_from(digits.len()).ok()?;
    if point > len + limit || point < -limit {
        return None;
    }
    let (int, frac) = if point <= 0 {
        let zeros = "0".repeat(usize::try_from(-point).ok()?);
        ("0".to_string(), format!("{zeros}{digits}"))
    } else if point >= len {
        let zeros = "0".repeat(usize::try_from(point - len).ok()?);
        (format!("{digits}{zeros}"), String::new())
    } else {
        let (a, b) = digits.split_at(usize::try_from(point).ok()?);
        (a.to_string(), b.to_string())
    };
    let int = match int.trim_start_matches('0') {
        "" => "0",
        trimmed => trimmed,
    };
    if int.len() > MAX_DECIMAL_DIGITS || frac.len() > MAX_DECIMAL_DIGITS {
        return None;
    }
    let zero = int == "0" && frac.bytes().all(|b| b == b'0');
    let sign = if negative && !zero { "-" } else { "" };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_json_writes_what_to_json_means() {
        let values = [
            Value::Null,
            Value::Text("a \"quoted\" \u{e9}\n".into()),
            Value::BigInt(-9_000_000_000),
            Value::Integer(7),
            Value::Double(0.1),
            Value::Double(f64::NAN),
            Value::Boolean(false),
            Value::Timestamp(1_700_000_000_123_456),
            Value::Date(-3),
            Value::Json("{\"a\": [1, 2]}".into()),
            Value::Numeric("-12.50".into()),
            Value::Uuid([7; 16]),
            Value::Bytes(vec![0, 1, 255]),
        ];
        for v in values {
            let mut out = Vec::new();
            v.write_json(&mut out).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&v.to_json()).unwrap(),
                "{v:?}"
            );
        }
        assert_eq!(
            Value::Timestamp(1_700_000_000_123_456).to_json(),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(Value::Date(-3).to_json(), "1969-12-29");
    }

    #[test]
    fn times_written_by_hand_match_chrono() {
        let mut us: i64 = -62_135_596_800_000_000; // 0001-01-01
        let step = 7_919_003_333_331; // about 3 months and odd microseconds
        while us < 253_402_300_799_999_999 {
            let want = chrono::DateTime::from_timestamp_micros(us)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(Value::Timestamp(us).time_text(), want);
            us += step;
        }
        for d in [-719_162, -1, 0, 59, 60, 11_016, 19_000, 2_932_896] {
            let want = chrono::DateTime::from_timestamp(i64::from(d) * 86_400, 0)
                .unwrap()
                .format("%Y-%m-%d")
                .to_string();
            assert_eq!(Value::Date(d).time_text(), want, "{d}");
        }
        // Before year 0 and past 9999: chrono's own format.
        assert!(Value::Timestamp(-70_000_000_000_000_000)
            .time_text()
            .starts_with('-'));
        assert!(Value::Date(3_000_000).time_text().starts_with('+'));
    }

    use super::*;

    fn col(name: &str, ty: ColumnType, required: bool) -> ColumnConfig {
        ColumnConfig {
            name: name.into(),
            pointer: None,
            ty,
            required,
        }
    }

    fn msg(v: &str) -> Message {
        Message {
            offset: 7,
            next_offset: 8,
            key: None,
            value: Some(v.as_bytes().to_vec()),
            poison: None,
            meta: Default::default(),
        }
    }

    fn mapper() -> Mapper {
        let mut nested = col("city", ColumnType::Text, false);
        nested.pointer = Some("/addr/city".into());
        let mut whole = col("doc", ColumnType::Json, false);
        whole.pointer = Some(String::new());
        Mapper::new(
            &[
                col("id", ColumnType::Text, false),
                col("n", ColumnType::Bigint, true),
                col("small", ColumnType::Integer, false),
                col("x", ColumnType::Double, false),
                col("ok", ColumnType::Boolean, false),
                col("at", ColumnType::Timestamp, false),
                col("day", ColumnType::Date, false),
                nested,
                whole,
            ],
            &["id".into()],
            true,
            Some("/deleted".into()),
        )
    }

    #[test]
    fn maps_every_type() {
        let r = mapper()
            .map(&msg(
                r#"{"id":"a","n":5,"small":-3,"x":1.5,"ok":true,"at":"1970-01-01T00:00:01Z","day":"1970-01-11","addr":{"city":"Oslo"}}"#,
            ))
            .unwrap();
        assert_eq!(r.op, Op::Upsert);
        assert_eq!(r.offset, 7);
        assert_eq!(
            r.values[..8],
            [
                Value::Text("a".into()),
                Value::BigInt(5),
                Value::Integer(-3),
                Value::Double(1.5),
                Value::Boolean(true),
                Value::Timestamp(1_000_000),
                Value::Date(10),
                Value::Text("Oslo".into()),
            ]
        );
        assert!(matches!(&r.values[8], Value::Json(s) if s.contains("\"city\":\"Oslo\"")));
    }

    #[test]
    fn decimals_are_kept_exactly_as_written() {
        for (input, plain) in [
            ("0", "0"),
            ("-0.00", "0.00"),
            ("0012.50", "12.50"),
            ("+7", "7"),
            ("-1.5e3", "-1500"),
            ("1e-2", "0.01"),
            ("12.5E+1", "125"),
            (".5", "0.5"),
            ("5.", "5"),
            (
                "123456789012345678901234567890.000000001",
                "123456789012345678901234567890.000000001",
            ),
        ] {
            assert_eq!(plain_decimal(input).as_deref(), Some(plain), "{input}");
        }
        for bad in [
            "",
            "-",
            ".",
            "1.2.3",
            "1e",
            "0x10",
            "NaN",
            "1,5",
            " 1",
            "1e99999999999999999999",
            "1e1001",
            "1e-1001",
        ] {
            assert_eq!(plain_decimal(bad), None, "{bad}");
        }
    }

    #[test]
    fn numeric_uuid_and_bytes_convert_or_say_what_was_expected() {
        let m = Mapper::new(
            &[
                col("n", ColumnType::Numeric, false),
                col("u", ColumnType::Uuid, false),
                col("b", ColumnType::Bytea, false),
            ],
            &[],
            false,
            None,
        );
        let r = m
            .map(&msg(
                r#"{"n":"-12.50","u":"67E55044-10B1-426F-9247-BB680E5FE0C8","b":"AAEC/w=="}"#,
            ))
            .unwrap();
        assert_eq!(r.values[0], Value::Numeric("-12.50".into()));
        assert_eq!(
            r.values[1],
            Value::Uuid(*uuid::uuid!("67e55044-10b1-426f-9247-bb680e5fe0c8").as_bytes())
        );
        assert_eq!(r.values[2], Value::Bytes(vec![0, 1, 2, 255]));
        let r = m.map(&msg(r#"{"n":2.5}"#)).unwrap();
        assert_eq!(r.values[0], Value::Numeric("2.5".into()));
        for (doc, expected) in [
            (r#"{"n":"12,5"}"#, "decimal"),
            (r#"{"n":true}"#, "decimal"),
            (r#"{"u":"not-a-uuid"}"#, "UUID"),
            (r#"{"b":"!!"}"#, "base64"),
        ] {
            let e = m.map(&msg(doc)).unwrap_err();
            assert!(e.reason.contains(expected), "{doc}: {e}");
        }
    }

    #[test]
    fn the_flat_reader_agrees_with_the_general_path() {
        let cols = [
            col("id", ColumnType::Text, false),
            col("n", ColumnType::Bigint, false),
            col("doc", ColumnType::Json, false),
        ];
        let flat = Mapper::new(&cols, &["id".into()], true, Some("/gone".into()));
        assert!(flat.flat.is_some());
        let mut general = Mapper::new(&cols, &["id".into()], true, Some("/gone".into()));
        general.flat = None;
        for doc in [
            r#"{"id":"a","n":1,"doc":{"x":[1,{"y":2}]},"other":[1,2,{"z":null}]}"#,
            r#"{"id":"a","id":"b","n":2}"#,
            r#"{"i\u0064":"esc","n":3}"#,
            r#"{"id":"a","gone":true}"#,
            r#"{"id":"a","gone":"true","n":4}"#,
            r#"{"id":"a","n":null}"#,
            r#"{"n":5}"#,
            r#"{"id":"a","n":"x"}"#,
            "null",
            "[1,2]",
            "\"text\"",
            "7",
            "{}",
            r#"{"id":"a"} trailing"#,
            r#"{"id":"a""#,
            "",
        ] {
            let m = msg(doc);
            assert_eq!(flat.map(&m), general.map(&m), "{doc}");
        }
        // Nested pointers, a whole-document column or a nested tombstone
        // field take the general path.
        let mut nested = col("city", ColumnType::Text, false);
        nested.pointer = Some("/addr/city".into());
        assert!(Mapper::new(&[nested], &[], false, None).flat.is_none());
        assert!(mapper().flat.is_none());
        let m = Mapper::new(&cols, &[], true, Some("/a/gone".into()));
        assert!(m.flat.is_none());
    }

    #[test]
    fn key_timestamp_and_headers_map_to_columns() {
        let mut key = col("k", ColumnType::Text, false);
        key.pointer = Some("@key".into());
        let mut at = col("at", ColumnType::Timestamp, false);
        at.pointer = Some("@timestamp".into());
        let mut ms = col("ms", ColumnType::Bigint, false);
        ms.pointer = Some("@timestamp".into());
        let mut trace = col("trace", ColumnType::Text, true);
        trace.pointer = Some("@header/trace".into());
        let cols = [col("id", ColumnType::Text, false), key, at, ms, trace];
        let flat = Mapper::new(&cols, &[], false, None);
        assert!(flat.flat.is_some());
        let mut general = Mapper::new(&cols, &[], false, None);
        general.flat = None;
        let mut m = msg(r#"{"id":"a","k":"not this","trace":"nor this"}"#);
        m.key = Some(b"user-7".to_vec());
        m.meta.timestamp_ms = Some(1_500);
        m.meta.headers = vec![
            ("trace".into(), b"old".to_vec()),
            ("trace".into(), b"t-1".to_vec()),
        ];
        for mapper in [&flat, &general] {
            let r = mapper.map(&m).unwrap();
            assert_eq!(
                r.values,
                [
                    Value::Text("a".into()),
                    Value::Text("user-7".into()),
                    Value::Timestamp(1_500_000),
                    Value::BigInt(1_500),
                    Value::Text("t-1".into()),
                ]
            );
        }
        // A required header that is missing, a key that is not text.
        let mut bare = msg(r#"{"id":"a"}"#);
        let e = flat.map(&bare).unwrap_err();
        assert!(
            e.reason.contains("`trace`") && e.reason.contains("@header/trace"),
            "{e}"
        );
        bare.meta.headers = vec![("trace".into(), b"t".to_vec())];
        bare.key = Some(vec![0xff]);
        let e = flat.map(&bare).unwrap_err();
        assert!(e.reason.contains("key is not UTF-8"), "{e}");
    }

    #[test]
    fn optional_missing_fields_are_null() {
        let r = mapper().map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
        assert_eq!(r.values[2], Value::Null);
        assert_eq!(r.values[7], Value::Null);
    }

    #[test]
    fn errors_name_the_column_and_value() {
        let m = mapper();
        let e = m.map(&msg("{not json")).unwrap_err();
        assert!(e.reason.starts_with("not valid JSON"), "{e}");
        let e = m.map(&msg(r#"{"id":"a"}"#)).unwrap_err();
        assert!(e.reason.contains("required column `n`"), "{e}");
        let e = m.map(&msg(r#"{"n":1}"#)).unwrap_err();
        assert!(e.reason.contains("key column `id`"), "{e}");
        let e = m.map(&msg(r#"{"id":"a","n":"12x"}"#)).unwrap_err();
        assert!(
            e.reason.contains("column `n`") && e.reason.contains("\"12x\""),
            "{e}"
        );
        let e = m
            .map(&msg(r#"{"id":"a","n":1,"small":3000000000}"#))
            .unwrap_err();
        assert!(e.reason.contains("32-bit"), "{e}");
        let e = m
            .map(&msg(r#"{"id":"a","n":1,"at":"yesterday"}"#))
            .unwrap_err();
        assert!(e.reason.contains("RFC 3339"), "{e}");
        // Kept as written, 1e400 would be infinity as a double.
        let e = m.map(&msg(r#"{"id":"a","n":1,"x":1e400}"#)).unwrap_err();
        assert!(e.reason.contains("finite"), "{e}");
        // A big integer stays exact in a json column.
        let r = m
            .map(&msg(
                r#"{"id":"a","n":1,"x":2.5,"big":98765432109876543210}"#,
            ))
            .unwrap();
        assert!(r.values.contains(&Value::Double(2.5)), "{:?}", r.values);
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let mut doc: Json = serde_json::from_str(r#"{"a/b":{"~x":[10,20]},"":1}"#).unwrap();
        assert_eq!(
            lookup_mut(&mut doc, &tokens("/a~1b/~0x/1")),
            Some(&mut Json::from(20))
        );
        assert_eq!(lookup_mut(&mut doc, &tokens("/")), Some(&mut Json::from(1)));
        assert!(lookup_mut(&mut doc, &tokens("/a~1b/~0x/9")).is_none());
        assert!(lookup_mut(&mut doc, &tokens("")).is_some_and(|v| v.is_object()));
    }

    #[test]
    fn overlapping_pointers_are_copied_not_moved() {
        assert!(disjoint(&["/a", "/b", "/ab"]));
        assert!(!disjoint(&["/a", "/a/b"]));
        assert!(!disjoint(&["/a", ""]));
        assert!(!disjoint(&["/a", "/a"]));
        // `mapper()` has the whole document as a column: both see the field.
        let r = mapper().map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
        assert_eq!(r.values[0], Value::Text("a".into()));
        assert!(matches!(&r.values[8], Value::Json(s) if s.contains("\"id\":\"a\"")));
        let m = Mapper::new(
            &[
                col("id", ColumnType::Text, true),
                col("n", ColumnType::Bigint, true),
            ],
            &[],
            false,
            None,
        );
        assert!(m.disjoint);
        let r = m.map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
        assert_eq!(r.values, [Value::Text("a".into()), Value::BigInt(1)]);
    }

    #[test]
    fn tombstones_need_only_the_key() {
        let r = mapper().map(&msg(r#"{"id":"a","deleted":true}"#)).unwrap();
        assert_eq!(r.op, Op::Delete);
        assert_eq!(r.values[0], Value::Text("a".into()));
        assert!(r.values[1..].iter().all(|v| *v == Value::Null));
        let r = mapper()
            .map(&msg(r#"{"id":"a","n":1,"deleted":false}"#))
            .unwrap();
        assert_eq!(r.op, Op::Upsert);
    }
}
