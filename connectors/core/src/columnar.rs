//! Records as Arrow columns, one array per column: what the S3 sink
//! writes as Parquet and the DuckDB sink hands to its appender whole,
//! instead of one value at a time.

use crate::mapping::row::Iter;
use crate::{Record, ValueRef};
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float64Builder, Int32Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, TimeUnit};
use idem_config::{ColumnConfig, ColumnType};
use std::sync::Arc;

/// The fields of [`arrays`]: the mapped columns, then the position's
/// partition and offset under the names given.
pub fn fields(columns: &[ColumnConfig], partition: &str, offset: &str) -> Vec<Field> {
    let mut fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(&c.name, arrow_type(c.ty), true))
        .collect();
    fields.push(Field::new(partition, DataType::Utf8, false));
    fields.push(Field::new(offset, DataType::Int64, false));
    fields
}

/// `records` of `partition` as arrays of `columns`' types, then their
/// partition and offset; `Err` names a value of the wrong type.
pub fn arrays(
    columns: &[ColumnConfig],
    partition: &str,
    records: &[&Record],
) -> Result<Vec<ArrayRef>, String> {
    // One cursor per record, each advanced a value per column: a packed
    // row is read front to back once.
    let mut cursors: Vec<Iter<'_>> = records.iter().map(|r| r.values.iter()).collect();
    let mut arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|c| column(c, &mut cursors))
        .collect::<Result<_, _>>()?;
    let mut parts = StringBuilder::with_capacity(records.len(), records.len() * partition.len());
    let mut offsets = Int64Builder::with_capacity(records.len());
    for r in records {
        parts.append_value(partition);
        offsets.append_value(i64::try_from(r.offset).unwrap_or(i64::MAX));
    }
    arrays.push(Arc::new(parts.finish()));
    arrays.push(Arc::new(offsets.finish()));
    Ok(arrays)
}

/// Parquet/Arrow type of a mapped column. Numerics and JSON stay text so
/// no digit is rounded and any JSON survives; UUIDs are their usual text.
pub fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Text | ColumnType::Json | ColumnType::Numeric | ColumnType::Uuid => {
            DataType::Utf8
        }
        ColumnType::Bigint => DataType::Int64,
        ColumnType::Integer => DataType::Int32,
        ColumnType::Double => DataType::Float64,
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Date => DataType::Date32,
        ColumnType::Bytea => DataType::Binary,
    }
}

/// The next column of the records under `cursors` as an Arrow array of
/// `c`'s type.
fn column(c: &ColumnConfig, cursors: &mut [Iter<'_>]) -> Result<ArrayRef, String> {
    let n = cursors.len();
    let values = cursors
        .iter_mut()
        .map(|r| r.next().unwrap_or(ValueRef::Null));
    let mismatch = |v: ValueRef<'_>| {
        format!(
            "column `{}` ({:?}) got a value of another type: {v:?}",
            c.name, c.ty
        )
    };
    macro_rules! build {
        ($builder:expr, $($pat:pat => $val:expr),+) => {{
            let mut b = $builder;
            for v in values {
                match v {
                    ValueRef::Null => b.append_null(),
                    $($pat => b.append_value($val),)+
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    Ok(match c.ty {
        ColumnType::Text | ColumnType::Json | ColumnType::Numeric | ColumnType::Uuid => {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            for v in values {
                match v {
                    ValueRef::Null => b.append_null(),
                    ValueRef::Text(s) | ValueRef::Json(s) | ValueRef::Numeric(s) => {
                        b.append_value(s)
                    }
                    ValueRef::Uuid(u) => b.append_value(uuid_text(u)),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish())
        }
        ColumnType::Bigint => build!(Int64Builder::with_capacity(n), ValueRef::BigInt(x) => x),
        ColumnType::Integer => build!(Int32Builder::with_capacity(n), ValueRef::Integer(x) => x),
        ColumnType::Double => build!(Float64Builder::with_capacity(n), ValueRef::Double(x) => x),
        ColumnType::Boolean => build!(BooleanBuilder::with_capacity(n), ValueRef::Boolean(x) => x),
        ColumnType::Date => build!(Date32Builder::with_capacity(n), ValueRef::Date(x) => x),
        ColumnType::Bytea => {
            build!(BinaryBuilder::with_capacity(n, n * 16), ValueRef::Bytes(x) => x)
        }
        ColumnType::Timestamp => {
            let b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
            build!(b, ValueRef::Timestamp(x) => x)
        }
    })
}

pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
