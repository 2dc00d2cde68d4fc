//! Rows in PostgreSQL's binary `COPY` format, written straight from Idem's
//! typed values (no text round trip, no per-cell allocation).

use bytes::{BufMut, BytesMut};
use idem_config::ColumnType;
use idem_core::ValueRef;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Microseconds and days between 1970-01-01 and PostgreSQL's 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// The PostgreSQL type of a column type.
pub fn pg_type(t: ColumnType) -> Type {
    match t {
        ColumnType::Text => Type::TEXT,
        ColumnType::Bigint => Type::INT8,
        ColumnType::Integer => Type::INT4,
        ColumnType::Double => Type::FLOAT8,
        ColumnType::Boolean => Type::BOOL,
        ColumnType::Timestamp => Type::TIMESTAMPTZ,
        ColumnType::Date => Type::DATE,
        ColumnType::Json => Type::JSONB,
        ColumnType::Numeric => Type::NUMERIC,
        ColumnType::Uuid => Type::UUID,
        ColumnType::Bytea => Type::BYTEA,
    }
}

/// The type's name in DDL.
pub fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Text => "text",
        ColumnType::Bigint => "bigint",
        ColumnType::Integer => "integer",
        ColumnType::Double => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Timestamp => "timestamptz",
        ColumnType::Date => "date",
        ColumnType::Json => "jsonb",
        ColumnType::Numeric => "numeric",
        ColumnType::Uuid => "uuid",
        ColumnType::Bytea => "bytea",
    }
}

/// The type's name as `information_schema.columns.data_type` reports it.
pub fn reported_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Timestamp => "timestamp with time zone",
        other => sql_type(other),
    }
}

/// The earliest `date` PostgreSQL stores (4714-11-24 BC), in days since
/// 1970-01-01; later limits lie beyond what the mapping parses.
const MIN_DATE_DAYS: i32 = -2_440_588;
/// The earliest `timestamptz` (4714-11-24 00:00 UTC BC), in microseconds
/// since 1970-01-01.
const MIN_TIMESTAMP_MICROS: i64 = -210_866_803_200_000_000;

/// Why PostgreSQL would refuse `v` in column `name`, before it fails a
/// whole `COPY`: a NUL character (text and jsonb cannot hold one), a date or
/// timestamp before 4714 BC.
pub fn refusal(name: &str, v: ValueRef<'_>) -> Option<String> {
    let why = match v {
        ValueRef::Text(s) if s.contains('\0') => {
            "holds a NUL character (\\u0000), which PostgreSQL text cannot store"
        }
        ValueRef::Json(s) if json_has_nul(s) => {
            "holds a NUL character (\\u0000), which PostgreSQL jsonb cannot store"
        }
        ValueRef::Date(d) if d < MIN_DATE_DAYS => {
            "is a date before 4714-11-24 BC, the earliest PostgreSQL stores"
        }
        ValueRef::Timestamp(us) if us < MIN_TIMESTAMP_MICROS => {
            "is a timestamp before 4714-11-24 BC, the earliest PostgreSQL stores"
        }
        _ => return None,
    };
    Some(format!("column `{name}` {why}"))
}

/// Whether JSON text holds `\u0000` (an escaped backslash followed by
/// `u0000` does not count).
fn json_has_nul(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    s.contains('\0')
}

/// One cell of a `COPY` row.
#[derive(Debug)]
pub enum Cell<'a> {
    Mapped(ValueRef<'a>),
    Text(&'a str),
    BigInt(i64),
    Boolean(bool),
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Text(s) => out.put_slice(s.as_bytes()),
            Cell::BigInt(n) => out.put_i64(*n),
            Cell::Boolean(b) => out.put_u8(u8::from(*b)),
            Cell::Mapped(v) => match *v {
                ValueRef::Null => return Ok(IsNull::Yes),
                ValueRef::Text(s) => out.put_slice(s.as_bytes()),
                ValueRef::Json(s) => {
                    if *ty == Type::JSONB {
                        out.put_u8(1); // jsonb binary format version
                    }
                    out.put_slice(s.as_bytes());
                }
                ValueRef::BigInt(n) => out.put_i64(n),
                ValueRef::Integer(n) => out.put_i32(n),
                ValueRef::Double(x) => out.put_f64(x),
                ValueRef::Boolean(b) => out.put_u8(u8::from(b)),
                ValueRef::Timestamp(us) => out.put_i64(us.saturating_sub(PG_EPOCH_MICROS)),
                ValueRef::Date(d) => out.put_i32(d.saturating_sub(PG_EPOCH_DAYS)),
                ValueRef::Numeric(d) => put_numeric(d, out),
                ValueRef::Uuid(u) => out.put_slice(u),
                ValueRef::Bytes(b) => out.put_slice(b),
            },
        }
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        // The staging and target columns are created (or checked) from the
        // same mapping that typed the values.
        true
    }

    to_sql_checked!();
}

/// A plain decimal (`idem_core::plain_decimal`'s output) in `numeric`'s
/// binary form: digit count, weight, sign and display scale, then the
/// digits in base 10000 with the point on a group boundary.
fn put_numeric(plain: &str, out: &mut BytesMut) {
    let (negative, unsigned) = match plain.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, plain),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    // Left-pad the integer part and right-pad the fraction to whole groups.
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let digits: Vec<u8> = std::iter::repeat_n(0, int_pad)
        .chain(int.bytes().map(|b| b - b'0'))
        .chain(frac.bytes().map(|b| b - b'0'))
        .chain(std::iter::repeat_n(0, frac_pad))
        .collect();
    let mut groups: Vec<i16> = digits
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(*d)))
        .collect();
    let mut weight = ((int.len() + int_pad) / 4) as i16 - 1;
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    weight -= leading as i16;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    out.put_i16(groups.len() as i16);
    out.put_i16(weight);
    out.put_u16(if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(frac.len() as u16);
    for g in groups {
        out.put_i16(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::Value;

    fn encoded(plain: &str) -> Vec<i16> {
        let mut out = BytesMut::new();
        put_numeric(plain, &mut out);
        out.chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn values_postgresql_cannot_store_are_named() {
        assert!(refusal("c", Value::Text("a\0b".into()).as_ref())
            .unwrap()
            .contains("`c` holds a NUL"));
        assert!(refusal("c", Value::Text("a\\u0000".into()).as_ref()).is_none());
        assert!(refusal("j", Value::Json(r#"{"a":"x\u0000"}"#.into()).as_ref()).is_some());
        assert!(refusal("j", Value::Json(r#"{"a":"x\\u0000"}"#.into()).as_ref()).is_none());
        assert!(refusal("d", Value::Date(MIN_DATE_DAYS).as_ref()).is_none());
        assert!(refusal("d", Value::Date(MIN_DATE_DAYS - 1).as_ref()).is_some());
        assert!(refusal("t", Value::Timestamp(MIN_TIMESTAMP_MICROS).as_ref()).is_none());
        assert!(refusal("t", Value::Timestamp(MIN_TIMESTAMP_MICROS - 1).as_ref()).is_some());
        assert!(refusal("n", Value::BigInt(i64::MIN).as_ref()).is_none());
    }

    #[test]
    fn numeric_groups_align_on_the_point() {
        // ndigits, weight, sign, dscale, digits...
        assert_eq!(encoded("0"), [0, 0, 0, 0]);
        assert_eq!(encoded("0.00"), [0, 0, 0, 2]);
        assert_eq!(encoded("12.50"), [2, 0, 0, 2, 12, 5000]);
        assert_eq!(encoded("-10000"), [1, 1, 0x4000, 0, 1]);
        assert_eq!(encoded("0.0001"), [1, -1, 0, 4, 1]);
        assert_eq!(encoded("0.00001"), [1, -2, 0, 5, 1000]);
        assert_eq!(encoded("123456789.1"), [4, 2, 0, 1, 1, 2345, 6789, 1000]);
    }
}
