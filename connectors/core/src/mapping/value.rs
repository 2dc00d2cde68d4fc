//! Typed cells and records, and the conversion of JSON values to a
//! column's type.

use idem_config::ColumnType;
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

/// A typed cell borrowed from a [`Row`](super::Row) (or a [`Value`]):
/// what sinks read, without an allocation per text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Text(&'a str),
    BigInt(i64),
    Integer(i32),
    Double(f64),
    Boolean(bool),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since the Unix epoch.
    Date(i32),
    /// Serialized JSON.
    Json(&'a str),
    /// A plain decimal, as [`Value::Numeric`].
    Numeric(&'a str),
    Uuid(&'a [u8; 16]),
    Bytes(&'a [u8]),
}

impl Value {
    /// The value borrowed.
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Text(s) => ValueRef::Text(s),
            Value::BigInt(n) => ValueRef::BigInt(*n),
            Value::Integer(n) => ValueRef::Integer(*n),
            Value::Double(x) => ValueRef::Double(*x),
            Value::Boolean(b) => ValueRef::Boolean(*b),
            Value::Timestamp(t) => ValueRef::Timestamp(*t),
            Value::Date(d) => ValueRef::Date(*d),
            Value::Json(s) => ValueRef::Json(s),
            Value::Numeric(s) => ValueRef::Numeric(s),
            Value::Uuid(u) => ValueRef::Uuid(u),
            Value::Bytes(b) => ValueRef::Bytes(b),
        }
    }
}

impl ValueRef<'_> {
    /// The value owned.
    pub fn to_value(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Text(s) => Value::Text(s.to_owned()),
            ValueRef::BigInt(n) => Value::BigInt(n),
            ValueRef::Integer(n) => Value::Integer(n),
            ValueRef::Double(x) => Value::Double(x),
            ValueRef::Boolean(b) => Value::Boolean(b),
            ValueRef::Timestamp(t) => Value::Timestamp(t),
            ValueRef::Date(d) => Value::Date(d),
            ValueRef::Json(s) => Value::Json(s.to_owned()),
            ValueRef::Numeric(s) => Value::Numeric(s.to_owned()),
            ValueRef::Uuid(u) => Value::Uuid(*u),
            ValueRef::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }

    /// The value as JSON, for sinks that write JSON: timestamps as RFC 3339
    /// text in UTC with microseconds (`2026-11-24T10:00:00.000000Z`), dates
    /// as `YYYY-MM-DD`, numerics as their exact text, UUIDs as text, bytes
    /// as base64: what JSON readers (DuckDB, Spark, jq) take without a
    /// schema.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            ValueRef::Null => serde_json::Value::Null,
            ValueRef::Text(s) => s.into(),
            ValueRef::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| s.into()),
            ValueRef::BigInt(n) => n.into(),
            ValueRef::Integer(n) => n.into(),
            ValueRef::Double(x) => x.into(),
            ValueRef::Boolean(b) => b.into(),
            ValueRef::Timestamp(_) | ValueRef::Date(_) => self.time_text().into(),
            // As the message carried them: exact text, UUID text, base64.
            ValueRef::Numeric(s) => s.into(),
            ValueRef::Uuid(u) => uuid::Uuid::from_bytes(*u).to_string().into(),
            ValueRef::Bytes(b) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(b).into()
            }
        }
    }

    /// A timestamp or date as text; empty for other values. Out-of-range
    /// times (beyond year 262143) keep their number.
    pub fn time_text(self) -> String {
        let mut out = Vec::with_capacity(27);
        self.write_time(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`ValueRef::time_text`] appended to `out`: digits written by hand,
    /// since JSON sinks write one per record and a format string costs
    /// more than the rest of the record.
    fn write_time(self, out: &mut Vec<u8>) {
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
            ValueRef::Timestamp(us) => (chrono::DateTime::from_timestamp_micros(us), true),
            ValueRef::Date(d) => (
                chrono::DateTime::from_timestamp(i64::from(d) * 86_400, 0),
                false,
            ),
            _ => return,
        };
        let Some(t) = t else {
            // Beyond chrono's range (about 262,000 years): the number.
            match self {
                ValueRef::Timestamp(n) => out.extend_from_slice(n.to_string().as_bytes()),
                ValueRef::Date(n) => out.extend_from_slice(n.to_string().as_bytes()),
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

    /// Append [`ValueRef::to_json`]'s text to `out`, without building a
    /// `serde_json::Value` for the common scalar cases.
    pub fn write_json(self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            ValueRef::Null => out.extend_from_slice(b"null"),
            ValueRef::Text(s) | ValueRef::Numeric(s) => serde_json::to_writer(&mut *out, s)?,
            ValueRef::BigInt(n) => serde_json::to_writer(&mut *out, &n)?,
            ValueRef::Integer(n) => serde_json::to_writer(&mut *out, &n)?,
            ValueRef::Timestamp(_) | ValueRef::Date(_) => {
                out.push(b'"');
                self.write_time(out);
                out.push(b'"');
            }
            // Through serde_json's own Value: non-finite doubles become null.
            ValueRef::Double(x) => serde_json::to_writer(&mut *out, &serde_json::Value::from(x))?,
            ValueRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
            ValueRef::Json(_) | ValueRef::Uuid(_) | ValueRef::Bytes(_) => {
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

/// Convert an owned JSON value; on failure hand it back with what was expected.
pub(super) fn convert(v: Json, ty: ColumnType) -> Result<Value, (Json, &'static str)> {
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
