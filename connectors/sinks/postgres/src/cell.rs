//! Rows in PostgreSQL's binary `COPY` format, written straight from Idem's
//! typed values (no text round trip, no per-cell allocation).

use bytes::{BufMut, BytesMut};
use idem_config::ColumnType;
use idem_core::Value;
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
    }
}

/// The type's name as `information_schema.columns.data_type` reports it.
pub fn reported_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Timestamp => "timestamp with time zone",
        other => sql_type(other),
    }
}

/// One cell of a `COPY` row.
#[derive(Debug)]
pub enum Cell<'a> {
    Mapped(&'a Value),
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
            Cell::Mapped(v) => match v {
                Value::Null => return Ok(IsNull::Yes),
                Value::Text(s) => out.put_slice(s.as_bytes()),
                Value::Json(s) => {
                    if *ty == Type::JSONB {
                        out.put_u8(1); // jsonb binary format version
                    }
                    out.put_slice(s.as_bytes());
                }
                Value::BigInt(n) => out.put_i64(*n),
                Value::Integer(n) => out.put_i32(*n),
                Value::Double(x) => out.put_f64(*x),
                Value::Boolean(b) => out.put_u8(u8::from(*b)),
                Value::Timestamp(us) => out.put_i64(us.saturating_sub(PG_EPOCH_MICROS)),
                Value::Date(d) => out.put_i32(d.saturating_sub(PG_EPOCH_DAYS)),
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
