//! Avro values (`format = "avro"`), read as the JSON document the mapping
//! takes: pointers, column types and dead letters work as for JSON. Each
//! value is decoded with the writer's schema, walked alongside it so that
//! logical types come out as the column types read them: a decimal as its
//! exact digits (the scale is in the schema), a date as `YYYY-MM-DD`, a
//! timestamp as RFC 3339, bytes in base64, a union as its branch's value.

use apache_avro::schema::{Name, Schema};
use apache_avro::types::Value as Avro;
use base64::Engine as _;
use idem_config::ColumnType;
use serde_json::Value as Json;
use std::collections::HashMap;

/// The writer's schema of a topic's values, parsed once.
pub struct AvroSchema {
    /// Kept for the life of the process, once per distinct schema text
    /// (a connector built again after a restart finds it), so the reader
    /// resolved from it once is kept with it.
    schema: &'static Schema,
    reader: apache_avro::reader::datum::GenericDatumReader<'static>,
    writer: apache_avro::writer::datum::GenericDatumWriter<'static>,
    /// Unique among the schemas of this process, as Debezium's are: a
    /// layout remembers the schemas it holds every field of.
    pub(super) id: u64,
    /// The named types (records, enums, fixed) a reference points to.
    names: HashMap<Name, Schema>,
}

impl AvroSchema {
    /// Parse the schema's JSON text (an `.avsc` file). `Err` says why it is
    /// not a schema.
    pub fn parse(text: &str) -> Result<AvroSchema, String> {
        let schema = kept(text)?;
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .map_err(|e| e.to_string())?;
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .map_err(|e| e.to_string())?;
        let names = apache_avro::schema::ResolvedSchema::try_from(schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(name, s)| (name.clone(), (*s).clone()))
            .collect();
        Ok(AvroSchema {
            schema,
            reader,
            writer,
            id: super::next_schema_id(),
            names,
        })
    }

    /// The top-level fields of the schema's record as columns, in the
    /// schema's order, each of the column type its value is read as (see
    /// [`AvroSchema::decode`]): `decimal` becomes the sink's `decimal`
    /// type, records, maps, arrays and unions of several types `json`.
    /// `Err` when the schema is not a record.
    pub fn columns(&self, decimal: ColumnType) -> Result<Vec<(String, ColumnType)>, String> {
        Ok(self
            .described_columns(decimal)?
            .into_iter()
            .map(|(name, ty, _)| (name, ty))
            .collect())
    }

    /// [`AvroSchema::columns`], each with its field's Avro type as JSON
    /// (for a message that names a type change); `Err` as there.
    pub(super) fn described_columns(
        &self,
        decimal: ColumnType,
    ) -> Result<Vec<(String, ColumnType, String)>, String> {
        let Schema::Record(record) = self.resolve(self.schema)? else {
            return Err(
                "its values are not records, so it has no fields to take columns from: list the [[columns]] (pointer = \"\" reads the whole value) and set columns_from = \"config\""
                    .into(),
            );
        };
        record
            .fields
            .iter()
            .map(|f| {
                let ty = self.column_type(&f.schema, decimal)?;
                let text = serde_json::to_string(&f.schema).unwrap_or_default();
                Ok((f.name.clone(), ty, format!("Avro {text}")))
            })
            .collect()
    }

    fn column_type(&self, schema: &Schema, decimal: ColumnType) -> Result<ColumnType, String> {
        Ok(match self.resolve(schema)? {
            Schema::Boolean => ColumnType::Boolean,
            Schema::Int | Schema::TimeMillis => ColumnType::Integer,
            Schema::Long | Schema::TimeMicros => ColumnType::Bigint,
            Schema::Float | Schema::Double => ColumnType::Double,
            Schema::String | Schema::Enum(_) => ColumnType::Text,
            Schema::Bytes | Schema::Fixed(_) => ColumnType::Bytea,
            Schema::Decimal(_) | Schema::BigDecimal => decimal,
            Schema::Uuid(_) => ColumnType::Uuid,
            Schema::Date => ColumnType::Date,
            Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => ColumnType::Timestamp,
            // An optional field (`["null", T]`) is a nullable column of T.
            Schema::Union(u) => match u.variants() {
                [Schema::Null, t] | [t, Schema::Null] => self.column_type(t, decimal)?,
                _ => ColumnType::Json,
            },
            // A field that is only ever null: nothing tells its type.
            Schema::Null => ColumnType::Text,
            // (A reference is resolved above: a named type is never one.)
            Schema::Array(_)
            | Schema::Map(_)
            | Schema::Record(_)
            | Schema::Duration(_)
            | Schema::Ref { .. } => ColumnType::Json,
        })
    }

    fn resolve<'a>(&'a self, schema: &'a Schema) -> Result<&'a Schema, String> {
        match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .ok_or_else(|| format!("the schema names an unknown type `{name}`")),
            other => Ok(other),
        }
    }

    /// One value in Avro's binary encoding (no container, no header), as
    /// JSON. `Err` says why it does not decode with this schema.
    pub fn decode(&self, bytes: &[u8]) -> Result<Json, String> {
        let mut rest = bytes;
        let value = self
            .reader
            .read_value(&mut rest)
            .map_err(|e| format!("not an Avro value of the schema: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "not an Avro value of the schema: {} bytes are left after the value",
                rest.len()
            ));
        }
        self.json(self.schema, value)
    }

    /// A JSON document as one value of the schema in Avro's binary
    /// encoding: the inverse of [`AvroSchema::decode`], logical types
    /// taken from the text forms it gives (a decimal's digits, a date as
    /// `YYYY-MM-DD`, a timestamp in RFC 3339, bytes in base64). A field
    /// the document lacks takes the schema's default, or null where the
    /// field may be null. `Err` names the field that does not fit.
    pub fn encode(&self, doc: &Json) -> Result<Vec<u8>, String> {
        let value = self.avro(self.schema, doc, "")?;
        self.writer
            .write_value_to_vec(value)
            .map_err(|e| format!("not a value of the schema: {e}"))
    }

    fn avro(&self, schema: &Schema, doc: &Json, at: &str) -> Result<Avro, String> {
        let wrong = |what: &str| {
            let shown: String = doc.to_string().chars().take(60).collect();
            format!(
                "{}: {shown} is not {what}",
                if at.is_empty() { "the value" } else { at }
            )
        };
        let int = |doc: &Json| doc.as_i64();
        Ok(match (self.resolve(schema)?, doc) {
            (Schema::Null, Json::Null) => Avro::Null,
            (Schema::Boolean, Json::Bool(b)) => Avro::Boolean(*b),
            (Schema::Int, d) => match int(d).and_then(|i| i32::try_from(i).ok()) {
                Some(i) => Avro::Int(i),
                None => return Err(wrong("an int")),
            },
            (Schema::Long, d) => match int(d) {
                Some(i) => Avro::Long(i),
                None => return Err(wrong("a long")),
            },
            #[allow(clippy::cast_possible_truncation)]
            (Schema::Float, Json::Number(n)) => Avro::Float(n.as_f64().unwrap_or(f64::NAN) as f32),
            (Schema::Double, Json::Number(n)) => Avro::Double(n.as_f64().unwrap_or(f64::NAN)),
            (Schema::String, Json::String(t)) => Avro::String(t.clone()),
            (Schema::Bytes, Json::String(t)) => {
                Avro::Bytes(base64_of(t).map_err(|_| wrong("base64"))?)
            }
            (Schema::Fixed(f), Json::String(t)) => {
                let b = base64_of(t).map_err(|_| wrong("base64"))?;
                if b.len() != f.size {
                    return Err(wrong(&format!("{} bytes (base64)", f.size)));
                }
                Avro::Fixed(f.size, b)
            }
            (Schema::Enum(e), Json::String(t)) => match e.symbols.iter().position(|s| s == t) {
                Some(i) => Avro::Enum(u32::try_from(i).unwrap_or(u32::MAX), t.clone()),
                None => return Err(wrong(&format!("one of {}", e.symbols.join(", ")))),
            },
            (Schema::Uuid(_), Json::String(t)) => match uuid::Uuid::parse_str(t) {
                Ok(u) => Avro::Uuid(u),
                Err(_) => return Err(wrong("a UUID")),
            },
            (Schema::Decimal(d), Json::String(_) | Json::Number(_)) => {
                let text = match doc {
                    Json::String(t) => t.clone(),
                    other => other.to_string(),
                };
                match unscaled(&text, d.scale) {
                    Some(n) => Avro::Decimal(apache_avro::Decimal::from(twos_complement(n))),
                    None => {
                        return Err(wrong(&format!("a decimal with at most {} places", d.scale)))
                    }
                }
            }
            (Schema::Date, Json::String(t)) => {
                match chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
                    Ok(day) => Avro::Date(
                        i32::try_from((day - chrono::DateTime::UNIX_EPOCH.date_naive()).num_days())
                            .map_err(|_| wrong("a date"))?,
                    ),
                    Err(_) => return Err(wrong("a date (YYYY-MM-DD)")),
                }
            }
            (Schema::Date, d) if int(d).is_some() => {
                Avro::Date(i32::try_from(int(d).unwrap_or(0)).map_err(|_| wrong("a date"))?)
            }
            (Schema::TimeMillis, d) => match int(d).and_then(|i| i32::try_from(i).ok()) {
                Some(i) => Avro::TimeMillis(i),
                None => return Err(wrong("a time in milliseconds")),
            },
            (Schema::TimeMicros, d) => match int(d) {
                Some(i) => Avro::TimeMicros(i),
                None => return Err(wrong("a time in microseconds")),
            },
            (
                ts @ (Schema::TimestampMillis
                | Schema::TimestampMicros
                | Schema::TimestampNanos
                | Schema::LocalTimestampMillis
                | Schema::LocalTimestampMicros
                | Schema::LocalTimestampNanos),
                d,
            ) => {
                // RFC 3339 text, or the number of the schema's unit.
                let nanos = match d {
                    Json::String(t) => chrono::DateTime::parse_from_rfc3339(t)
                        .ok()
                        .and_then(|t| t.timestamp_nanos_opt()),
                    _ => None,
                };
                let of = |per_second: i64| -> Option<i64> {
                    match (nanos, int(d)) {
                        (Some(n), _) => Some(n.div_euclid(1_000_000_000 / per_second)),
                        (None, i) => i,
                    }
                };
                match ts {
                    Schema::TimestampMillis => of(1_000).map(Avro::TimestampMillis),
                    Schema::TimestampMicros => of(1_000_000).map(Avro::TimestampMicros),
                    Schema::TimestampNanos => of(1_000_000_000).map(Avro::TimestampNanos),
                    Schema::LocalTimestampMillis => of(1_000).map(Avro::LocalTimestampMillis),
                    Schema::LocalTimestampMicros => of(1_000_000).map(Avro::LocalTimestampMicros),
                    _ => of(1_000_000_000).map(Avro::LocalTimestampNanos),
                }
                .ok_or_else(|| wrong("a timestamp (RFC 3339)"))?
            }
            (Schema::Union(u), d) => {
                // The first branch the value fits: null for null.
                let mut last = None;
                for (i, branch) in u.variants().iter().enumerate() {
                    match self.avro(branch, d, at) {
                        Ok(v) => {
                            return Ok(Avro::Union(u32::try_from(i).unwrap_or(0), Box::new(v)))
                        }
                        Err(e) => last = Some(e),
                    }
                }
                return Err(last.unwrap_or_else(|| "an empty union".into()));
            }
            (Schema::Array(a), Json::Array(items)) => Avro::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.avro(&a.items, v, &format!("{at}/{i}")))
                    .collect::<Result<_, _>>()?,
            ),
            (Schema::Map(m), Json::Object(entries)) => Avro::Map(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.avro(&m.types, v, &format!("{at}/{k}"))?)))
                    .collect::<Result<_, String>>()?,
            ),
            (Schema::Record(r), Json::Object(fields)) => Avro::Record(
                r.fields
                    .iter()
                    .map(|f| {
                        let here = format!("{at}/{}", f.name);
                        let v = match (fields.get(&f.name), &f.default) {
                            (Some(v), _) => v,
                            (None, Some(default)) => default,
                            (None, None) => &Json::Null,
                        };
                        Ok((f.name.clone(), self.avro(&f.schema, v, &here)?))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            (Schema::Duration(_), Json::Object(o)) => {
                let part = |k: &str| {
                    o.get(k)
                        .and_then(Json::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0)
                };
                Avro::Duration(apache_avro::Duration::new(
                    apache_avro::Months::new(part("months")),
                    apache_avro::Days::new(part("days")),
                    apache_avro::Millis::new(part("millis")),
                ))
            }
            (Schema::Null, _) => return Err(wrong("null")),
            (Schema::Boolean, _) => return Err(wrong("a boolean")),
            (Schema::Float | Schema::Double, _) => return Err(wrong("a number")),
            (Schema::BigDecimal, _) => return Err(wrong("a value Idem writes (big-decimal)")),
            _ => return Err(wrong("of the schema's type here")),
        })
    }

    fn json(&self, schema: &Schema, value: Avro) -> Result<Json, String> {
        let schema = self.resolve(schema)?;
        let b64 = |b: &[u8]| Json::String(base64::engine::general_purpose::STANDARD.encode(b));
        Ok(match value {
            Avro::Null => Json::Null,
            Avro::Boolean(b) => Json::Bool(b),
            Avro::Int(i) => Json::from(i),
            Avro::Long(i) => Json::from(i),
            Avro::Float(f) => float(f64::from(f)),
            Avro::Double(f) => float(f),
            Avro::Bytes(b) | Avro::Fixed(_, b) => b64(&b),
            Avro::String(s) | Avro::Enum(_, s) => Json::String(s),
            Avro::Uuid(u) => Json::String(u.to_string()),
            Avro::Union(i, v) => {
                let Schema::Union(union) = schema else {
                    return Err("a union value where the schema has none".into());
                };
                let branch = union
                    .variants()
                    .get(i as usize)
                    .ok_or_else(|| format!("union branch {i} is not in the schema"))?;
                self.json(branch, *v)?
            }
            Avro::Array(items) => {
                let Schema::Array(a) = schema else {
                    return Err("an array where the schema has none".into());
                };
                Json::Array(
                    items
                        .into_iter()
                        .map(|v| self.json(&a.items, v))
                        .collect::<Result<_, _>>()?,
                )
            }
            Avro::Map(entries) => {
                let Schema::Map(m) = schema else {
                    return Err("a map where the schema has none".into());
                };
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    out.insert(k, self.json(&m.types, v)?);
                }
                Json::Object(out)
            }
            Avro::Record(fields) => {
                let Schema::Record(r) = schema else {
                    return Err("a record where the schema has none".into());
                };
                let mut out = serde_json::Map::new();
                for ((name, v), field) in fields.into_iter().zip(&r.fields) {
                    out.insert(name, self.json(&field.schema, v)?);
                }
                Json::Object(out)
            }
            Avro::Decimal(d) => {
                let Schema::Decimal(ds) = schema else {
                    return Err("a decimal where the schema has none".into());
                };
                let bytes = Vec::<u8>::try_from(&d).map_err(|e| e.to_string())?;
                let scale = u32::try_from(ds.scale).map_err(|_| "a decimal scale too large")?;
                Json::String(super::debezium::decimal_of_bytes(&bytes, scale)?)
            }
            Avro::BigDecimal(d) => {
                let text = d.to_string();
                Json::String(super::plain_decimal(&text).unwrap_or(text))
            }
            Avro::Date(days) => {
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|e| e.checked_add_signed(chrono::Duration::days(i64::from(days))))
                    .ok_or_else(|| format!("date {days} days from 1970-01-01 is out of range"))?;
                Json::String(date.format("%Y-%m-%d").to_string())
            }
            Avro::TimeMillis(ms) => Json::from(ms),
            Avro::TimeMicros(us) => Json::from(us),
            Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms) => {
                timestamp(ms.checked_mul(1_000), ms)?
            }
            Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us) => timestamp(Some(us), us)?,
            Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns) => {
                timestamp(Some(ns.div_euclid(1_000)), ns)?
            }
            Avro::Duration(d) => serde_json::json!({
                "months": u32::from(d.months()),
                "days": u32::from(d.days()),
                "millis": u32::from(d.millis()),
            }),
        })
    }
}

fn base64_of(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(text)
}

/// A decimal's digits (`-12.3`) as the integer of `scale` places
/// (`-1230` at scale 2); `None` when it has more places or is too large.
fn unscaled(text: &str, scale: usize) -> Option<i128> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale
        || (whole.is_empty() && frac.is_empty())
        || !whole
            .chars()
            .chain(frac.chars())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let padded = format!("{whole}{frac}{}", "0".repeat(scale - frac.len()));
    let n: i128 = if padded.is_empty() {
        0
    } else {
        padded.parse().ok()?
    };
    Some(if negative { -n } else { n })
}

/// The shortest big-endian two's complement bytes of `n`, as Avro's
/// decimal holds its unscaled value.
fn twos_complement(n: i128) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let sign = if n < 0 { 0xff } else { 0x00 };
    // Drop leading sign bytes while the next byte keeps the sign bit.
    let mut start = 0;
    while start < bytes.len() - 1
        && bytes[start] == sign
        && (bytes[start + 1] & 0x80) == (sign & 0x80)
    {
        start += 1;
    }
    bytes[start..].to_vec()
}

/// The schema of `text`, parsed once per process and kept.
fn kept(text: &str) -> Result<&'static Schema, String> {
    static KEPT: std::sync::LazyLock<std::sync::Mutex<HashMap<String, &'static Schema>>> =
        std::sync::LazyLock::new(Default::default);
    let mut kept = KEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(schema) = kept.get(text) {
        return Ok(schema);
    }
    let schema: &'static Schema = Box::leak(Box::new(
        Schema::parse_str(text).map_err(|e| e.to_string())?,
    ));
    kept.insert(text.to_string(), schema);
    Ok(schema)
}

/// A float as a JSON number; NaN and the infinities, which JSON has no
/// number for, as text (a `double` column refuses them by name).
fn float(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or_else(|| Json::String(f.to_string()), Json::Number)
}

/// Microseconds since the epoch as an RFC 3339 timestamp in UTC.
fn timestamp(micros: Option<i64>, raw: i64) -> Result<Json, String> {
    micros
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map(|t| Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
        .ok_or_else(|| format!("timestamp {raw} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Record;

    const SCHEMA: &str = r#"{
      "type": "record", "name": "Order", "namespace": "shop",
      "fields": [
        {"name": "id", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": null},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "buyer", "type": {"type": "record", "name": "Buyer", "fields": [{"name": "name", "type": "string"}]}},
        {"name": "seller", "type": ["null", "Buyer"]},
        {"name": "raw", "type": "bytes"}
      ]
    }"#;

    fn encoded(f: impl FnOnce(&mut Record)) -> Vec<u8> {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let mut r = Record::new(&schema).unwrap();
        r.put("id", 7_i64);
        r.put("note", Avro::Union(1, Box::new(Avro::String("hi".into()))));
        r.put(
            "price",
            Avro::Decimal(apache_avro::Decimal::from(vec![0xfb, 0x2e])),
        ); // -1234
        r.put("day", Avro::Date(19_724));
        r.put("at", Avro::TimestampMillis(1_700_000_000_123));
        r.put("state", Avro::Enum(1, "PAID".into()));
        r.put("tags", Avro::Array(vec![Avro::String("a".into())]));
        r.put(
            "buyer",
            Avro::Record(vec![("name".into(), Avro::String("ann".into()))]),
        );
        r.put(
            "seller",
            Avro::Union(
                1,
                Box::new(Avro::Record(vec![(
                    "name".into(),
                    Avro::String("bob".into()),
                )])),
            ),
        );
        r.put("raw", Avro::Bytes(vec![0, 255]));
        f(&mut r);
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(r)
            .unwrap()
    }

    #[test]
    fn a_value_reads_as_the_json_its_columns_take() {
        let s = AvroSchema::parse(SCHEMA).unwrap();
        let doc = s.decode(&encoded(|_| {})).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({
                "id": 7, "note": "hi", "price": "-12.34", "day": "2024-01-02",
                "at": "2023-11-14T22:13:20.123Z", "state": "PAID", "tags": ["a"],
                "buyer": {"name": "ann"}, "seller": {"name": "bob"}, "raw": "AP8="
            })
        );
        // A null branch is null.
        let doc = s
            .decode(&encoded(|r| {
                r.put("note", Avro::Union(0, Box::new(Avro::Null)))
            }))
            .unwrap();
        assert_eq!(doc["note"], Json::Null);
    }

    #[test]
    fn the_fields_are_columns_of_the_types_they_read_as() {
        let s = AvroSchema::parse(SCHEMA).unwrap();
        let cols = s.columns(ColumnType::Numeric).unwrap();
        use ColumnType::*;
        let want = [
            ("id", Bigint),
            ("note", Text),
            ("price", Numeric),
            ("day", Date),
            ("at", Timestamp),
            ("state", Text),
            ("tags", Json),
            ("buyer", Json),
            // `["null", "Buyer"]`: a reference to a record, optional.
            ("seller", Json),
            ("raw", Bytea),
        ];
        let want: Vec<(String, ColumnType)> =
            want.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        assert_eq!(cols, want);
        // The sink's decimal type.
        assert_eq!(s.columns(Text).unwrap()[2], ("price".into(), Text));
        // Not a record: nothing to take columns from.
        let e = AvroSchema::parse(r#""long""#)
            .unwrap()
            .columns(Numeric)
            .unwrap_err();
        assert!(e.contains("not records"), "{e}");
        // A union of several types is JSON; of one type and null, that type.
        let s = AvroSchema::parse(
            r#"{"type": "record", "name": "U", "fields": [
                {"name": "a", "type": ["null", "long", "string"]},
                {"name": "b", "type": ["int", "null"]},
                {"name": "c", "type": {"type": "int", "logicalType": "time-millis"}},
                {"name": "d", "type": {"type": "string", "logicalType": "uuid"}}]}"#,
        )
        .unwrap();
        let types: Vec<ColumnType> = s
            .columns(Numeric)
            .unwrap()
            .into_iter()
            .map(|c| c.1)
            .collect();
        assert_eq!(types, [Json, Integer, Integer, Uuid]);
    }

    #[test]
    fn a_document_encodes_as_the_value_it_reads_as() {
        let s = AvroSchema::parse(SCHEMA).unwrap();
        let doc = serde_json::json!({
            "id": 7, "note": "hi", "price": "-12.34", "day": "2024-01-02",
            "at": "2023-11-14T22:13:20.123Z", "state": "PAID", "tags": ["a"],
            "buyer": {"name": "ann"}, "seller": {"name": "bob"}, "raw": "AP8="
        });
        // The very bytes apache-avro writes for the value built by hand.
        assert_eq!(s.encode(&doc).unwrap(), encoded(|_| {}));
        assert_eq!(s.decode(&s.encode(&doc).unwrap()).unwrap(), doc);
        // A missing optional field is its default (null); fewer places
        // than the scale are padded.
        let mut short = doc.clone();
        short.as_object_mut().unwrap().remove("note");
        short["price"] = "5".into();
        let back = s.decode(&s.encode(&short).unwrap()).unwrap();
        assert_eq!(
            (back["note"].clone(), back["price"].clone()),
            (Json::Null, "5.00".into())
        );
        // What does not fit is named.
        let mut bad = doc.clone();
        bad["buyer"]["name"] = 5.into();
        let e = s.encode(&bad).unwrap_err();
        assert!(e.contains("/buyer/name") && e.contains("5"), "{e}");
        bad = doc.clone();
        bad["price"] = "1.234".into();
        assert!(s.encode(&bad).unwrap_err().contains("at most 2 places"));
        bad = doc;
        bad["state"] = "LOST".into();
        assert!(s.encode(&bad).unwrap_err().contains("one of NEW, PAID"));
    }

    #[test]
    fn decimals_are_the_shortest_twos_complement() {
        for (n, bytes) in [
            (0_i128, vec![0]),
            (127, vec![0x7f]),
            (128, vec![0, 0x80]),
            (-1, vec![0xff]),
            (-128, vec![0x80]),
            (-129, vec![0xff, 0x7f]),
            (-1234, vec![0xfb, 0x2e]),
        ] {
            assert_eq!(twos_complement(n), bytes, "{n}");
        }
        assert_eq!(unscaled("-12.3", 2), Some(-1230));
        assert_eq!(unscaled("+0.05", 2), Some(5));
        assert_eq!(unscaled("12", 0), Some(12));
        assert_eq!(unscaled("1.234", 2), None);
        assert_eq!(unscaled("1e3", 2), None);
        assert_eq!(unscaled("-", 2), None);
    }

    #[test]
    fn a_schema_parsed_again_is_the_one_kept() {
        let a = AvroSchema::parse(SCHEMA).unwrap();
        let b = AvroSchema::parse(SCHEMA).unwrap();
        assert!(std::ptr::eq(a.schema, b.schema));
    }

    #[test]
    fn bytes_that_are_not_a_value_of_the_schema_say_so() {
        let s = AvroSchema::parse(SCHEMA).unwrap();
        let good = encoded(|_| {});
        let e = s.decode(&good[..good.len() - 3]).unwrap_err();
        assert!(e.contains("not an Avro value"), "{e}");
        let mut longer = good.clone();
        longer.push(0);
        let e = s.decode(&longer).unwrap_err();
        assert!(e.contains("1 bytes are left"), "{e}");
        let e = AvroSchema::parse(r#"{"type": "record"}"#).err().unwrap();
        assert!(!e.is_empty());
    }
}
