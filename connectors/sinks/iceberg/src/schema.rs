//! The table's schema from the connector's columns, and a batch's records
//! as an Arrow record batch of it (field ids included, as Iceberg's
//! Parquet files need them).

use arrow::array::{Array, ArrayRef, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Schema as ArrowSchema};
use arrow::record_batch::RecordBatch;
use iceberg::spec::{NestedField, PrimitiveType, Schema, Type};
use idem_config::{ColumnConfig, ColumnType};
use idem_core::{columnar, Record};
use std::sync::Arc;

/// The partition and offset of each row, as the table sinks keep them:
/// what `idem verify` reads back.
pub const PARTITION: &str = "_idem_partition";
pub const OFFSET: &str = "_idem_offset";

/// Iceberg's type for a mapped column. Numerics and JSON stay text (no
/// digit rounded, any JSON kept), as in the S3 sink's Parquet.
pub fn iceberg_type(t: ColumnType) -> PrimitiveType {
    match t {
        ColumnType::Text | ColumnType::Json | ColumnType::Numeric | ColumnType::Uuid => {
            PrimitiveType::String
        }
        ColumnType::Bigint => PrimitiveType::Long,
        ColumnType::Integer => PrimitiveType::Int,
        ColumnType::Double => PrimitiveType::Double,
        ColumnType::Boolean => PrimitiveType::Boolean,
        ColumnType::Timestamp => PrimitiveType::Timestamptz,
        ColumnType::Date => PrimitiveType::Date,
        ColumnType::Bytea => PrimitiveType::Binary,
    }
}

/// The schema of a new table: the columns (optional, as any mapped value
/// may be null), then the required position columns.
pub fn table_schema(columns: &[ColumnConfig]) -> iceberg::Result<Schema> {
    let mut fields: Vec<Arc<NestedField>> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Arc::new(NestedField::optional(
                i as i32 + 1,
                &c.name,
                Type::Primitive(iceberg_type(c.ty)),
            ))
        })
        .collect();
    let n = columns.len() as i32;
    fields.push(Arc::new(NestedField::required(
        n + 1,
        PARTITION,
        Type::Primitive(PrimitiveType::String),
    )));
    fields.push(Arc::new(NestedField::required(
        n + 2,
        OFFSET,
        Type::Primitive(PrimitiveType::Long),
    )));
    Schema::builder().with_fields(fields).build()
}

/// Why an existing table cannot take the connector's rows, if it cannot:
/// every column (and the position columns) must be there with the same
/// type. Extra nullable columns of the table are left null.
pub fn mismatch(table: &Schema, columns: &[ColumnConfig]) -> Option<String> {
    let wanted = columns
        .iter()
        .map(|c| (c.name.as_str(), iceberg_type(c.ty)))
        .chain([
            (PARTITION, PrimitiveType::String),
            (OFFSET, PrimitiveType::Long),
        ]);
    for (name, ty) in wanted {
        match table.field_by_name(name) {
            None => return Some(format!("the table has no column `{name}`")),
            Some(f) if *f.field_type != Type::Primitive(ty.clone()) => {
                return Some(format!(
                    "column `{name}` is {} in the table, the connector writes {ty}",
                    f.field_type
                ))
            }
            Some(_) => {}
        }
    }
    let extra = table.as_struct().fields().iter().find(|f| {
        f.required
            && !columns.iter().any(|c| c.name == f.name)
            && f.name != PARTITION
            && f.name != OFFSET
    });
    extra.map(|f| {
        format!(
            "the table's column `{}` is required and the connector has no value for it",
            f.name
        )
    })
}

/// `records` of `partition` as a record batch of `arrow` (the table's
/// schema in Arrow, with field ids), columns matched by name.
pub fn record_batch(
    arrow: &Arc<ArrowSchema>,
    columns: &[ColumnConfig],
    partition: &str,
    records: &[&Record],
) -> Result<RecordBatch, String> {
    let made = columnar::arrays(columns, partition, records)?;
    let names = columns
        .iter()
        .map(|c| c.name.as_str())
        .chain([PARTITION, OFFSET]);
    let by_name: std::collections::HashMap<&str, ArrayRef> = names.zip(made).collect();
    let arrays = arrow
        .fields()
        .iter()
        .map(|f| {
            let a = match by_name.get(f.name().as_str()) {
                Some(a) => a.clone(),
                None => arrow::array::new_null_array(f.data_type(), records.len()),
            };
            retype(a, f.data_type())
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(arrow.clone(), arrays).map_err(|e| e.to_string())
}

/// The array as `to`: only a timestamp's zone name may differ ("UTC" made,
/// "+00:00" in Iceberg's Arrow schema), same instants.
fn retype(a: ArrayRef, to: &DataType) -> Result<ArrayRef, String> {
    if a.data_type() == to {
        return Ok(a);
    }
    match (a.data_type(), to) {
        (DataType::Timestamp(_, _), DataType::Timestamp(_, Some(tz))) => {
            let ts = a
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .ok_or_else(|| format!("a timestamp array of {:?}", a.data_type()))?;
            Ok(Arc::new(ts.clone().with_timezone(tz.clone())))
        }
        (from, to) => Err(format!("a column of {from:?} where the table has {to:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: ColumnType) -> ColumnConfig {
        toml::from_str(&format!("name = \"{name}\"\ntype = \"{}\"", ty.name())).unwrap()
    }

    #[test]
    fn a_table_made_from_the_columns_takes_them_and_another_is_checked() {
        let cols = vec![col("id", ColumnType::Text), col("n", ColumnType::Bigint)];
        let schema = table_schema(&cols).unwrap();
        assert_eq!(mismatch(&schema, &cols), None);
        let other = vec![col("id", ColumnType::Text), col("n", ColumnType::Double)];
        let why = mismatch(&schema, &other).unwrap();
        assert!(why.contains("column `n` is long"), "{why}");
        let more = vec![col("id", ColumnType::Text), col("z", ColumnType::Text)];
        assert!(mismatch(&schema, &more).unwrap().contains("no column `z`"));
    }
}
