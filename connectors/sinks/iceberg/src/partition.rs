//! `partition_by`: the table's partition spec, written as readers write it
//! (`day(placed_at)`, `bucket(16, order_id)`, `region`), and the check of
//! an existing table's spec against it.

use iceberg::spec::{PartitionSpec, Schema, Transform, UnboundPartitionSpec};

/// One field of `partition_by`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionBy {
    pub source: String,
    pub transform: Transform,
}

impl PartitionBy {
    /// The partition field's name, as PyIceberg and Spark name it:
    /// `region`, `placed_at_day`, `order_id_bucket_16`.
    pub fn name(&self) -> String {
        let s = &self.source;
        match self.transform {
            Transform::Identity => s.clone(),
            Transform::Bucket(n) => format!("{s}_bucket_{n}"),
            Transform::Truncate(w) => format!("{s}_trunc_{w}"),
            t => format!("{s}_{t}"),
        }
    }
}

impl std::fmt::Display for PartitionBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.source;
        match self.transform {
            Transform::Identity => write!(f, "identity({s})"),
            Transform::Bucket(n) => write!(f, "bucket({n}, {s})"),
            Transform::Truncate(w) => write!(f, "truncate({w}, {s})"),
            t => write!(f, "{t}({s})"),
        }
    }
}

/// `region`, `identity(region)`, `year|month|day|hour(ts)`,
/// `bucket(N, col)`, `truncate(W, col)`.
pub fn parse(expr: &str) -> Result<PartitionBy, String> {
    let expr = expr.trim();
    let usage = || {
        format!(
            "`{expr}`: write `column`, `identity(column)`, `year(column)`, `month(column)`, `day(column)`, `hour(column)`, `bucket(N, column)` or `truncate(W, column)`"
        )
    };
    let Some((name, rest)) = expr.split_once('(') else {
        if expr.is_empty() || expr.contains([')', ',', ' ']) {
            return Err(usage());
        }
        return Ok(PartitionBy {
            source: expr.to_string(),
            transform: Transform::Identity,
        });
    };
    let args: Vec<&str> = rest
        .strip_suffix(')')
        .ok_or_else(usage)?
        .split(',')
        .map(str::trim)
        .collect();
    let count = |n: &str| -> Result<u32, String> {
        match n.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("`{expr}`: `{n}` must be a whole number above 0")),
        }
    };
    let (transform, source) = match (name.trim(), args.as_slice()) {
        ("identity", [c]) => (Transform::Identity, c),
        ("year", [c]) => (Transform::Year, c),
        ("month", [c]) => (Transform::Month, c),
        ("day", [c]) => (Transform::Day, c),
        ("hour", [c]) => (Transform::Hour, c),
        ("bucket", [n, c]) => (Transform::Bucket(count(n)?), c),
        ("truncate", [w, c]) => (Transform::Truncate(count(w)?), c),
        _ => return Err(usage()),
    };
    if source.is_empty() {
        return Err(usage());
    }
    Ok(PartitionBy {
        source: source.to_string(),
        transform,
    })
}

/// The spec of a new table of `schema`; an error names a field whose
/// column is missing or whose transform does not apply to its type.
pub fn spec(schema: &Schema, fields: &[PartitionBy]) -> Result<UnboundPartitionSpec, String> {
    let mut builder = PartitionSpec::builder(schema.clone());
    for f in fields {
        builder = builder
            .add_partition_field(&f.source, f.name(), f.transform)
            .map_err(|e| format!("`{f}`: {}", e.message()))?;
    }
    builder
        .build()
        .map(PartitionSpec::into_unbound)
        .map_err(|e| e.message().to_string())
}

/// The fields of an existing table's spec, in `partition_by`'s words.
pub fn of_table(spec: &PartitionSpec, schema: &Schema) -> Vec<PartitionBy> {
    spec.fields()
        .iter()
        .filter(|f| f.transform != Transform::Void)
        .map(|f| PartitionBy {
            source: schema
                .name_by_field_id(f.source_id)
                .map_or_else(|| format!("#{}", f.source_id), str::to_string),
            transform: f.transform,
        })
        .collect()
}

/// Why an existing table's spec is not the configured one, if it is not.
/// An empty `partition_by` takes the table's spec, whatever it is.
pub fn mismatch(table: &[PartitionBy], configured: &[PartitionBy]) -> Option<String> {
    if configured.is_empty() || table == configured {
        return None;
    }
    let words = |fields: &[PartitionBy]| {
        if fields.is_empty() {
            "nothing (unpartitioned)".to_string()
        } else {
            fields
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    Some(format!(
        "the table is partitioned by {}, partition_by says {}; change partition_by (or leave it out to write the table's spec)",
        words(table),
        words(configured)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_config::{ColumnConfig, ColumnType};

    fn col(name: &str, ty: ColumnType) -> ColumnConfig {
        toml::from_str(&format!("name = \"{name}\"\ntype = \"{}\"", ty.name())).unwrap()
    }

    #[test]
    fn fields_parse_as_readers_write_them() {
        let p = |s: &str| parse(s).unwrap();
        assert_eq!(p("region").transform, Transform::Identity);
        assert_eq!(p("identity(region)"), p("region"));
        assert_eq!(p("day(placed_at)").transform, Transform::Day);
        assert_eq!(p("bucket(16, order_id)").transform, Transform::Bucket(16));
        assert_eq!(p(" truncate( 4 ,sku ) ").source, "sku");
        assert_eq!(p("bucket(16, order_id)").name(), "order_id_bucket_16");
        assert_eq!(p("day(placed_at)").name(), "placed_at_day");
        assert_eq!(p("day(placed_at)").to_string(), "day(placed_at)");
        for bad in [
            "",
            "day()",
            "bucket(x, id)",
            "bucket(0, id)",
            "week(ts)",
            "day(ts",
            "a b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_is_checked_against_the_columns() {
        let schema = crate::schema::table_schema(&[
            col("ts", ColumnType::Timestamp),
            col("id", ColumnType::Bigint),
            col("ok", ColumnType::Boolean),
        ])
        .unwrap();
        let fields = [parse("day(ts)").unwrap(), parse("bucket(8, id)").unwrap()];
        let s = spec(&schema, &fields).unwrap();
        assert_eq!(s.fields().len(), 2);
        let bound = s.bind(schema.clone()).unwrap();
        assert_eq!(of_table(&bound, &schema), fields);
        let e = spec(&schema, &[parse("day(nope)").unwrap()]).unwrap_err();
        assert!(e.contains("day(nope)") && e.contains("nope"), "{e}");
        let e = spec(&schema, &[parse("day(ok)").unwrap()]).unwrap_err();
        assert!(e.contains("day(ok)"), "{e}");
        assert!(mismatch(&of_table(&bound, &schema), &[]).is_none());
        let e = mismatch(&of_table(&bound, &schema), &fields[..1]).unwrap();
        assert!(
            e.contains("partitioned by day(ts), bucket(8, id), partition_by says day(ts)"),
            "{e}"
        );
    }
}
