//! Debezium's encodings of column values, read through the schema the JSON
//! converter sends with `schemas.enable = true`: dates as days and
//! timestamps as milli-, micro- or nanoseconds since the epoch, decimals as
//! big-endian two's-complement bytes (base64) with the scale in the schema
//! (or beside the value), JSON documents as strings. A value is decoded
//! only for a column whose type wants the decoded form; a `bigint` column
//! keeps the raw number.

use idem_config::ColumnType;
use serde_json::Value as Json;
use std::collections::HashMap;

/// A logical type among a row's fields.
#[derive(Debug, Clone, PartialEq)]
enum Logical {
    /// Days since 1970-01-01.
    Days,
    /// Since the epoch, in UTC (a column without a time zone reads as UTC).
    Millis,
    Micros,
    Nanos,
    /// Unscaled bytes with a fixed scale.
    Decimal(u32),
    /// `{"scale": s, "value": bytes}`.
    VariableDecimal,
    /// A JSON document as a string.
    Json,
}

impl Logical {
    fn of(name: &str, field: &Json) -> Option<Logical> {
        Some(match name {
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => Logical::Days,
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                Logical::Millis
            }
            "io.debezium.time.MicroTimestamp" => Logical::Micros,
            "io.debezium.time.NanoTimestamp" => Logical::Nanos,
            "org.apache.kafka.connect.data.Decimal" => {
                let scale = field
                    .pointer("/parameters/scale")
                    .and_then(Json::as_str)
                    .and_then(|s| s.parse().ok())?;
                Logical::Decimal(scale)
            }
            "io.debezium.data.VariableScaleDecimal" => Logical::VariableDecimal,
            "io.debezium.data.Json" => Logical::Json,
            _ => return None,
        })
    }
}

/// A change event's schema (the JSON converter's `schemas.enable = true`),
/// parsed once per distinct schema: every event of a table carries the
/// same one, often larger than the event itself.
pub(super) struct EventSchema {
    /// Unique among the schemas parsed by this process: lets a layout
    /// remember which schemas it already holds every field of.
    pub id: u64,
    before: Side,
    after: Side,
}

/// What one side (`before` or `after`) of a schema tells, read once.
struct Side {
    logical: Option<RowSchema>,
    /// Its fields, by name, in the schema's order (`None`: no such side).
    fields: Option<Vec<(String, Json)>>,
}

impl Side {
    fn of(json: &Json, side: &str) -> Side {
        Side {
            logical: RowSchema::of(json, side),
            fields: row_fields(json, side).map(|fields| {
                fields
                    .into_iter()
                    .map(|(name, f)| (name.to_string(), f.clone()))
                    .collect()
            }),
        }
    }
}

impl EventSchema {
    fn new(json: Json) -> EventSchema {
        EventSchema {
            id: super::next_schema_id(),
            before: Side::of(&json, "before"),
            after: Side::of(&json, "after"),
        }
    }

    fn side(&self, side: &str) -> &Side {
        match side {
            "before" => &self.before,
            _ => &self.after,
        }
    }

    /// The logical types of `side`, if it has any.
    pub fn row(&self, side: &str) -> Option<&RowSchema> {
        self.side(side).logical.as_ref()
    }

    /// The fields of `side` (name, field schema), in order.
    pub fn fields(&self, side: &str) -> Option<&[(String, Json)]> {
        self.side(side).fields.as_deref()
    }
}

/// The schemas seen, by their text; a few kept (a connector over many
/// tables sees one per table and version).
#[derive(Default)]
pub(super) struct SchemaCache(std::sync::RwLock<HashMap<Box<str>, std::sync::Arc<EventSchema>>>);

const CACHED_SCHEMAS: usize = 256;

impl SchemaCache {
    /// The schema whose text is `raw`, parsed on first sight.
    pub fn get(&self, raw: &str) -> Result<std::sync::Arc<EventSchema>, serde_json::Error> {
        let known = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(raw)
            .cloned();
        if let Some(schema) = known {
            return Ok(schema);
        }
        let schema = std::sync::Arc::new(EventSchema::new(serde_json::from_str(raw)?));
        let mut map = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CACHED_SCHEMAS {
            map.clear();
        }
        map.insert(raw.into(), schema.clone());
        Ok(schema)
    }

    /// An event's schema already parsed (a wrapper not in the converter's
    /// usual order).
    pub fn of_parsed(json: Json) -> std::sync::Arc<EventSchema> {
        std::sync::Arc::new(EventSchema::new(json))
    }
}

/// The fields of one side (`before` or `after`) of a change event's
/// schema, by name, in the schema's order.
fn row_fields<'a>(schema: &'a Json, side: &str) -> Option<Vec<(&'a str, &'a Json)>> {
    let row = schema
        .get("fields")?
        .as_array()?
        .iter()
        .find(|f| f.get("field").and_then(Json::as_str) == Some(side))?;
    row.get("fields")?
        .as_array()?
        .iter()
        .map(|f| Some((f.get("field")?.as_str()?, f)))
        .collect()
}

/// The column type a field of a Kafka Connect schema becomes: its logical
/// type if Idem knows it, else its base type; nested values are JSON.
pub(super) fn column_type(field: &Json, decimal: ColumnType) -> ColumnType {
    let logical = field.get("name").and_then(Json::as_str).unwrap_or("");
    match logical {
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => ColumnType::Date,
        "io.debezium.time.Timestamp"
        | "org.apache.kafka.connect.data.Timestamp"
        | "io.debezium.time.MicroTimestamp"
        | "io.debezium.time.NanoTimestamp"
        | "io.debezium.time.ZonedTimestamp" => ColumnType::Timestamp,
        "org.apache.kafka.connect.data.Decimal" | "io.debezium.data.VariableScaleDecimal" => {
            decimal
        }
        "io.debezium.data.Json" => ColumnType::Json,
        "io.debezium.data.Uuid" => ColumnType::Uuid,
        _ => match field.get("type").and_then(Json::as_str).unwrap_or("") {
            "int8" | "int16" | "int32" => ColumnType::Integer,
            "int64" => ColumnType::Bigint,
            "float" | "float32" | "double" | "float64" => ColumnType::Double,
            "boolean" => ColumnType::Boolean,
            "bytes" => ColumnType::Bytea,
            "string" => ColumnType::Text,
            _ => ColumnType::Json,
        },
    }
}

/// A field's schema type in a message: `int64`, or `int32
/// (io.debezium.time.Date)` with its logical name.
pub(super) fn describe(field: &Json) -> String {
    let ty = field.get("type").and_then(Json::as_str).unwrap_or("?");
    match field.get("name").and_then(Json::as_str) {
        Some(name) => format!("{ty} ({name})"),
        None => ty.to_string(),
    }
}

/// The logical types of one side (`before` or `after`) of a change event,
/// by field name.
pub(super) struct RowSchema(HashMap<String, Logical>);

impl RowSchema {
    /// From the event's schema (`None` without one, or with no logical
    /// type on that side).
    pub fn of(schema: &Json, side: &str) -> Option<RowSchema> {
        let map: HashMap<String, Logical> = row_fields(schema, side)?
            .into_iter()
            .filter_map(|(field, f)| {
                let logical = Logical::of(f.get("name")?.as_str()?, f)?;
                Some((field.to_string(), logical))
            })
            .collect();
        (!map.is_empty()).then_some(RowSchema(map))
    }

    /// `value` of `field` in the form a column of type `ty` reads, or why
    /// it cannot be decoded.
    pub fn decode(&self, field: &str, ty: ColumnType, value: Json) -> Result<Json, String> {
        let Some(logical) = self.0.get(field) else {
            return Ok(value);
        };
        if value.is_null() {
            return Ok(value);
        }
        let wanted = matches!(
            (logical, ty),
            (Logical::Days, ColumnType::Date)
                | (
                    Logical::Millis | Logical::Micros | Logical::Nanos,
                    ColumnType::Timestamp
                )
                | (
                    Logical::Decimal(_) | Logical::VariableDecimal,
                    ColumnType::Numeric | ColumnType::Text | ColumnType::Double
                )
                | (Logical::Json, ColumnType::Json)
        );
        if !wanted {
            return Ok(value);
        }
        let fail = |what: &str| format!("field `{field}`: {what}, got {value}");
        Ok(match logical {
            Logical::Days => {
                let days = value
                    .as_i64()
                    .ok_or_else(|| fail("days since 1970 expected"))?;
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|e| e.checked_add_signed(chrono::TimeDelta::try_days(days)?))
                    .ok_or_else(|| fail("a date out of range"))?;
                Json::String(date.format("%Y-%m-%d").to_string())
            }
            Logical::Millis | Logical::Micros | Logical::Nanos => {
                let n = value
                    .as_i64()
                    .ok_or_else(|| fail("an integer time expected"))?;
                let t = match logical {
                    Logical::Millis => chrono::DateTime::from_timestamp_millis(n),
                    Logical::Micros => chrono::DateTime::from_timestamp_micros(n),
                    _ => Some(chrono::DateTime::from_timestamp_nanos(n)),
                }
                .ok_or_else(|| fail("a timestamp out of range"))?;
                Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            }
            Logical::Decimal(_) | Logical::VariableDecimal => {
                let (bytes, scale) = match logical {
                    Logical::Decimal(scale) => (value.as_str(), Some(*scale)),
                    _ => (
                        value.get("value").and_then(Json::as_str),
                        value
                            .get("scale")
                            .and_then(Json::as_u64)
                            .and_then(|s| u32::try_from(s).ok()),
                    ),
                };
                let (Some(bytes), Some(scale)) = (bytes, scale) else {
                    return Err(fail("base64 bytes (with their scale) expected"));
                };
                let text = decimal(bytes, scale).map_err(|e| fail(&e))?;
                // A double column reads a number; numeric and text, digits.
                match ty {
                    ColumnType::Double => text
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(Json::Number)
                        .ok_or_else(|| fail("a decimal out of double range"))?,
                    _ => Json::String(text),
                }
            }
            Logical::Json => match &value {
                Json::String(s) => serde_json::from_str(s)
                    .map_err(|e| fail(&format!("not a JSON document ({e})")))?,
                _ => value,
            },
        })
    }
}

/// The decimal whose unscaled value is the big-endian two's-complement
/// integer in `b64`, with `scale` digits after the point.
fn decimal(b64: &str, scale: u32) -> Result<String, String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64 ({e})"))?;
    decimal_of_bytes(&bytes, scale)
}

/// The decimal whose unscaled value is the big-endian two's-complement
/// integer `bytes` (Kafka Connect's and Avro's encoding), with `scale`
/// digits after the point.
pub(super) fn decimal_of_bytes(bytes: &[u8], scale: u32) -> Result<String, String> {
    if bytes.len() > 16 {
        return Err(format!(
            "a decimal of {} bytes: more than 38 digits",
            bytes.len()
        ));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut n: i128 = if negative { -1 } else { 0 };
    for b in bytes {
        n = (n << 8) | i128::from(*b);
    }
    let digits = n.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if negative { "-" } else { "" };
    Ok(if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_from_twos_complement_bytes() {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert_eq!(decimal(&b64(&[0x04, 0xD2]), 2).unwrap(), "12.34");
        assert_eq!(decimal(&b64(&[0xFB, 0x2E]), 2).unwrap(), "-12.34");
        assert_eq!(decimal(&b64(&[0x05]), 3).unwrap(), "0.005");
        assert_eq!(decimal(&b64(&[0xFF]), 0).unwrap(), "-1");
        assert_eq!(decimal(&b64(&[]), 2).unwrap(), "0.00");
        assert!(decimal(&b64(&[1; 17]), 0).is_err());
        assert!(decimal("not base64!", 0).is_err());
    }

    #[test]
    fn a_schema_decodes_what_the_column_type_wants() {
        let schema = json!({"type": "struct", "fields": [
            {"field": "before", "type": "struct", "fields": []},
            {"field": "after", "type": "struct", "fields": [
                {"field": "id", "type": "int64"},
                {"field": "born", "type": "int32", "name": "io.debezium.time.Date"},
                {"field": "seen", "type": "int64", "name": "io.debezium.time.MicroTimestamp"},
                {"field": "price", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
                 "parameters": {"scale": "2", "connect.decimal.precision": "12"}},
                {"field": "amount", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
                {"field": "doc", "type": "string", "name": "io.debezium.data.Json"}
            ]}
        ]});
        assert!(RowSchema::of(&schema, "before").is_none());
        let s = RowSchema::of(&schema, "after").unwrap();
        let d = |f: &str, ty, v: Json| s.decode(f, ty, v);
        assert_eq!(
            d("born", ColumnType::Date, json!(20454)).unwrap(),
            json!("2026-01-01")
        );
        assert_eq!(
            d(
                "seen",
                ColumnType::Timestamp,
                json!(1_767_225_600_123_456_i64)
            )
            .unwrap(),
            json!("2026-01-01T00:00:00.123456Z")
        );
        assert_eq!(
            d("price", ColumnType::Numeric, json!("BNI=")).unwrap(),
            json!("12.34")
        );
        assert_eq!(
            d("price", ColumnType::Double, json!("BNI=")).unwrap(),
            json!(12.34)
        );
        assert_eq!(
            d("price", ColumnType::Text, json!("BNI=")).unwrap(),
            json!("12.34")
        );
        assert_eq!(
            d(
                "amount",
                ColumnType::Numeric,
                json!({"scale": 1, "value": "BNI="})
            )
            .unwrap(),
            json!("123.4")
        );
        assert_eq!(
            d("doc", ColumnType::Json, json!("{\"a\": [1]}")).unwrap(),
            json!({"a": [1]})
        );
        // Other column types keep the raw value; nulls stay null.
        assert_eq!(d("seen", ColumnType::Bigint, json!(5)).unwrap(), json!(5));
        assert_eq!(
            d("doc", ColumnType::Text, json!("{}")).unwrap(),
            json!("{}")
        );
        assert_eq!(d("born", ColumnType::Date, Json::Null).unwrap(), Json::Null);
        assert_eq!(d("id", ColumnType::Bigint, json!(1)).unwrap(), json!(1));
        let e = d("born", ColumnType::Date, json!("x")).unwrap_err();
        assert!(e.contains("field `born`"), "{e}");
    }
}
