//! Records as object bodies: how they are grouped into folders (by field
//! and record time), when an object is full (count, bytes), and how they
//! are written (JSON lines or Parquet), appended batch after batch.
//!
//! Over 600 lines with its tests: the code is the first 400; the tests
//! that pin every object layout stay beside it.

use crate::config::{Compression, Format, S3SinkConfig, TimePartition};
use crate::error::S3Error;
use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use idem_config::ColumnConfig;
use idem_core::{columnar, Record, ValueRef};
use std::io::Write as _;
use std::sync::Arc;

/// The columns Idem adds to every record: where it came from.
pub const PARTITION_COLUMN: &str = "_idem_partition";
pub const OFFSET_COLUMN: &str = "_idem_offset";

/// Hive's name for a missing partition value.
const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";

/// One object's worth of a batch: the indexes of its records, in offset
/// order, all in one folder.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub records: Vec<usize>,
    /// `country=US/dt=2026-11-24/` (field, then day or `hr=13/`), empty
    /// without folders.
    pub bucket: String,
}

pub struct Encoder {
    format: Format,
    compression: Compression,
    columns: Vec<ColumnConfig>,
    schema: Arc<Schema>,
    max_records: usize,
    max_bytes: usize,
    /// A Parquet row group closes at about this many encoded bytes.
    row_group_bytes: usize,
    /// What a JSON line holds besides its values: quoted keys, colons,
    /// commas, braces, and Idem's partition and offset fields.
    line_overhead: usize,
    time: Option<(usize, TimePartition)>,
    /// `partition_column`: its index and `name=` prefix.
    field: Option<(usize, String)>,
}

impl Encoder {
    pub fn new(cfg: &S3SinkConfig, columns: &[ColumnConfig]) -> Self {
        let fields = columnar::fields(columns, PARTITION_COLUMN, OFFSET_COLUMN);
        let time = cfg.time_column.as_ref().and_then(|name| {
            columns
                .iter()
                .position(|c| &c.name == name)
                .map(|i| (i, cfg.time_partition.unwrap_or_default()))
        });
        let field = cfg.partition_column.as_ref().and_then(|name| {
            columns
                .iter()
                .position(|c| &c.name == name)
                .map(|i| (i, format!("{}=", crate::keys::enc(name))))
        });
        Encoder {
            field,
            format: cfg.format,
            compression: cfg.compression(),
            columns: columns.to_vec(),
            schema: Arc::new(Schema::new(fields)),
            max_records: cfg.max_object_records,
            max_bytes: cfg.max_object_bytes,
            row_group_bytes: cfg.part_bytes.max(1),
            line_overhead: columns.iter().map(|c| c.name.len() + 4).sum::<usize>()
                + PARTITION_COLUMN.len()
                + OFFSET_COLUMN.len()
                + 40,
            time,
        }
    }

    /// How many mapped columns a record has.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// `jsonl`, `jsonl.gz`, `jsonl.zst` or `parquet`.
    pub fn extension(&self) -> &'static str {
        match (self.format, self.compression) {
            (Format::Parquet, _) => "parquet",
            (Format::Jsonl, Compression::None) => "jsonl",
            (Format::Jsonl, Compression::Gzip) => "jsonl.gz",
            (Format::Jsonl, Compression::Zstd) => "jsonl.zst",
        }
    }

    pub fn content_type(&self) -> &'static str {
        match (self.format, self.compression) {
            (Format::Parquet, _) => "application/vnd.apache.parquet",
            (Format::Jsonl, Compression::None) => "application/x-ndjson",
            (Format::Jsonl, Compression::Gzip) => "application/gzip",
            (Format::Jsonl, Compression::Zstd) => "application/zstd",
        }
    }

    /// The record's folder, as key segments: the field's, then the time's.
    fn bucket(&self, r: &Record) -> String {
        let mut out = String::new();
        if let Some((i, prefix)) = &self.field {
            out.push_str(prefix);
            match r.values.get(*i) {
                Some(ValueRef::Null) | None => out.push_str(HIVE_NULL),
                Some(v) => {
                    let mut text = Vec::new();
                    // Strings without their quotes; other values as JSON.
                    let value = match v {
                        ValueRef::Text(t) | ValueRef::Numeric(t) => t.to_owned(),
                        v => match v.write_json(&mut text) {
                            Ok(()) => String::from_utf8_lossy(&text).trim_matches('"').to_string(),
                            Err(_) => HIVE_NULL.to_string(),
                        },
                    };
                    out.push_str(&crate::keys::enc(&value));
                }
            }
            out.push('/');
        }
        let Some((i, unit)) = self.time else {
            return out;
        };
        let micros = match r.values.get(i) {
            Some(ValueRef::Timestamp(us)) => Some(us),
            Some(ValueRef::Date(days)) => Some(i64::from(days) * 86_400_000_000),
            _ => None,
        };
        match micros.and_then(chrono::DateTime::from_timestamp_micros) {
            None => {
                out.push_str("dt=");
                out.push_str(HIVE_NULL);
                out.push('/');
            }
            Some(t) => out.push_str(&match unit {
                TimePartition::Day => t.format("dt=%Y-%m-%d/").to_string(),
                TimePartition::Hour => t.format("dt=%Y-%m-%d/hr=%H/").to_string(),
            }),
        }
        out
    }

    /// The batch's records grouped by folder, in the order the folders
    /// first appear, each group in offset order.
    pub fn groups(&self, records: &[Record]) -> Vec<(String, Vec<usize>)> {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        if self.field.is_none() && self.time.is_none() {
            groups.push((String::new(), (0..records.len()).collect()));
            return groups;
        }
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        for (i, r) in records.iter().enumerate() {
            let b = self.bucket(r);
            let g = match index.get(&b) {
                Some(g) => *g,
                None => {
                    index.insert(b.clone(), groups.len());
                    groups.push((b, Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.push(i);
        }
        groups
    }

    /// About what `r` adds to an object before compression: its values,
    /// and for JSON lines their keys and Idem's two fields as well.
    pub fn weight(&self, r: &Record) -> usize {
        let values = r.values.iter().map(approx_bytes).sum::<usize>();
        match self.format {
            Format::Jsonl => values + self.line_overhead,
            Format::Parquet => values,
        }
    }

    /// Whether an object filled this far takes no more records: it holds
    /// `max_object_records`, or about `max_object_bytes`.
    pub fn full(&self, fill: Fill) -> bool {
        fill.records > 0 && (fill.records >= self.max_records || fill.bytes >= self.max_bytes)
    }

    /// The batch's objects, each started empty: records grouped by folder,
    /// each group cut where an object is full.
    #[cfg(test)]
    pub fn cut(&self, records: &[Record]) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for (bucket, members) in self.groups(records) {
            let mut fill = Fill::default();
            let mut current = Vec::new();
            for i in members {
                if self.full(fill) {
                    cuts.push(Cut {
                        records: std::mem::take(&mut current),
                        bucket: bucket.clone(),
                    });
                    fill = Fill::default();
                }
                current.push(i);
                fill.add(self.weight(&records[i]));
            }
            if !current.is_empty() {
                cuts.push(Cut {
                    records: current,
                    bucket,
                });
            }
        }
        cuts
    }

    /// One object's body for `records`, read from `partition`, at once.
    #[cfg(test)]
    pub fn encode(&self, partition: &str, records: &[&Record]) -> Result<Vec<u8>, S3Error> {
        let mut s = self.stream()?;
        s.append(self, partition, records)?;
        s.finish()
    }

    /// An empty object body, to append records to.
    pub fn stream(&self) -> Result<Stream, S3Error> {
        let enc = |e: &dyn std::fmt::Display| S3Error::Encode(e.to_string());
        Ok(match (self.format, self.compression) {
            (Format::Parquet, c) => {
                use parquet::arrow::ArrowWriter;
                use parquet::basic::{Compression as Pc, GzipLevel, ZstdLevel};
                use parquet::file::properties::WriterProperties;
                let props = WriterProperties::builder()
                    .set_compression(match c {
                        Compression::None => Pc::UNCOMPRESSED,
                        Compression::Gzip => Pc::GZIP(GzipLevel::default()),
                        Compression::Zstd => Pc::ZSTD(ZstdLevel::default()),
                    })
                    // A row group is encoded in memory until it closes:
                    // this bounds what an open object holds.
                    .set_max_row_group_bytes(Some(self.row_group_bytes))
                    .set_created_by(format!("idem {}", env!("CARGO_PKG_VERSION")))
                    .build();
                let w = ArrowWriter::try_new(Vec::new(), self.schema.clone(), Some(props))
                    .map_err(|e| enc(&e))?;
                Stream::Parquet(Box::new(w))
            }
            (Format::Jsonl, Compression::None) => Stream::Plain(Vec::new()),
            (Format::Jsonl, Compression::Gzip) => Stream::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::default(),
            )),
            (Format::Jsonl, Compression::Zstd) => {
                Stream::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(|e| enc(&e))?)
            }
        })
    }

    /// One JSON object per line, keys in column order, then the position,
    /// each line handed to `put` as it is written (no copy of the batch).
    fn lines(
        &self,
        partition: &str,
        records: &[&Record],
        mut put: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), S3Error> {
        let enc = |e: serde_json::Error| S3Error::Encode(e.to_string());
        // Keys are written once, already quoted.
        let keys: Vec<String> = self
            .columns
            .iter()
            .map(|c| serde_json::to_string(&c.name))
            .collect::<Result<_, _>>()
            .map_err(enc)?;
        let tail = format!(
            "\"{PARTITION_COLUMN}\":{},\"{OFFSET_COLUMN}\":",
            serde_json::to_string(partition).map_err(enc)?
        );
        let mut line = Vec::new();
        for r in records {
            line.clear();
            line.push(b'{');
            for (k, v) in keys.iter().zip(r.values.iter()) {
                line.extend_from_slice(k.as_bytes());
                line.push(b':');
                v.write_json(&mut line).map_err(enc)?;
                line.push(b',');
            }
            line.extend_from_slice(tail.as_bytes());
            line.extend_from_slice(r.offset.to_string().as_bytes());
            line.extend_from_slice(b"}\n");
            put(&line).map_err(|e| S3Error::Encode(e.to_string()))?;
        }
        Ok(())
    }
}

/// How far an object has filled, against `max_object_records` and
/// `max_object_bytes` (its records' weight before compression).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fill {
    pub records: usize,
    pub bytes: usize,
}

impl Fill {
    pub fn add(&mut self, bytes: usize) {
        self.records += 1;
        self.bytes += bytes;
    }
}

/// An object's body as it is written: records appended batch after batch,
/// and the bytes encoded so far taken out as its parts go up, so an open
/// object holds about a part (plus, for Parquet, the row group being
/// encoded), whatever its size.
pub enum Stream {
    Plain(Vec<u8>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Parquet(Box<parquet::arrow::ArrowWriter<Vec<u8>>>),
}

impl Stream {
    /// Encode `records`, read from `partition`, onto the body. On an error
    /// the body may hold part of them: it must be dropped.
    pub fn append(
        &mut self,
        e: &Encoder,
        partition: &str,
        records: &[&Record],
    ) -> Result<(), S3Error> {
        match self {
            Stream::Plain(out) => e.lines(partition, records, |l| {
                out.extend_from_slice(l);
                Ok(())
            })?,
            Stream::Gzip(gz) => e.lines(partition, records, |l| gz.write_all(l))?,
            Stream::Zstd(zs) => e.lines(partition, records, |l| zs.write_all(l))?,
            Stream::Parquet(w) => {
                let arrays =
                    columnar::arrays(&e.columns, partition, records).map_err(S3Error::Encode)?;
                let batch = RecordBatch::try_new(e.schema.clone(), arrays)
                    .map_err(|e| S3Error::Encode(e.to_string()))?;
                w.write(&batch)
                    .map_err(|e| S3Error::Encode(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// What the body holds in memory: its bytes not yet taken, and for
    /// Parquet the row group being encoded.
    pub fn memory(&mut self) -> usize {
        let row_group = match self {
            Stream::Parquet(w) => w.memory_size(),
            _ => 0,
        };
        self.encoded().capacity() + row_group
    }

    /// Close the Parquet row group being encoded, so that its memory turns
    /// into (compressed) bytes to send; nothing for JSON lines.
    pub fn close_row_group(&mut self) -> Result<(), S3Error> {
        if let Stream::Parquet(w) = self {
            w.flush().map_err(|e| S3Error::Encode(e.to_string()))?;
        }
        Ok(())
    }

    /// The bytes encoded and not yet taken: the head of the object, to be
    /// drained as parts go up.
    pub fn encoded(&mut self) -> &mut Vec<u8> {
        match self {
            Stream::Plain(out) => out,
            Stream::Gzip(gz) => gz.get_mut(),
            Stream::Zstd(zs) => zs.get_mut(),
            // Bytes already through the writer's own count of offsets:
            // taking them out does not move the footer's offsets.
            Stream::Parquet(w) => w.inner_mut(),
        }
    }

    /// End the body: the bytes not yet taken, through its end.
    pub fn finish(self) -> Result<Vec<u8>, S3Error> {
        let enc = |e: &dyn std::fmt::Display| S3Error::Encode(e.to_string());
        match self {
            Stream::Plain(out) => Ok(out),
            Stream::Gzip(gz) => gz.finish().map_err(|e| enc(&e)),
            Stream::Zstd(zs) => zs.finish().map_err(|e| enc(&e)),
            Stream::Parquet(w) => w.into_inner().map_err(|e| enc(&e)),
        }
    }
}

/// About what a value weighs in an object, before compression.
fn approx_bytes(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null => 4,
        ValueRef::Text(s) | ValueRef::Json(s) | ValueRef::Numeric(s) => s.len() + 2,
        ValueRef::Bytes(b) => b.len() * 4 / 3 + 2,
        ValueRef::Uuid(_) => 38,
        ValueRef::Boolean(_) => 5,
        ValueRef::Integer(_) | ValueRef::Date(_) => 6,
        ValueRef::BigInt(_) | ValueRef::Double(_) | ValueRef::Timestamp(_) => 12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, TimeUnit};
    use idem_config::ColumnType;
    use idem_core::{Op, Value};

    fn cfg(extra: &str) -> S3SinkConfig {
        let text = format!("bucket = \"b\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    fn col(name: &str, ty: ColumnType) -> ColumnConfig {
        ColumnConfig {
            name: name.into(),
            pointer: None,
            ty,
            required: false,
        }
    }

    fn rec(offset: u64, values: Vec<Value>) -> Record {
        Record {
            offset,
            op: Op::Upsert,
            values: values.into(),
            id: None,
        }
    }

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn objects_end_at_the_count_the_size_and_the_day() {
        let cols = [col("ts", ColumnType::Timestamp), col("s", ColumnType::Text)];
        let day = 24 * HOUR;
        let recs: Vec<Record> = (0..10)
            .map(|i| {
                let ts = if i < 7 { day * 20_000 } else { day * 20_001 };
                rec(
                    100 + i,
                    vec![Value::Timestamp(ts), Value::Text("x".repeat(10))],
                )
            })
            .collect();
        let by_count = Encoder::new(&cfg("max_object_records = 4"), &cols);
        assert_eq!(
            objects(&by_count, &recs),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );

        // Each record weighs 12 + 12 bytes of values, and 6 + 5 of keys
        // and 15 + 12 + 40 of Idem's fields and punctuation in a JSON
        // line: 102 bytes; the third crosses 204.
        let by_bytes = Encoder::new(&cfg("max_object_bytes = 204"), &cols);
        assert_eq!(
            objects(&by_bytes, &recs),
            [vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7], vec![8, 9]]
        );

        let by_day = Encoder::new(
            &cfg("time_column = \"ts\"\ntime_partition = \"day\""),
            &cols,
        );
        let cuts = by_day.cut(&recs);
        assert_eq!(
            cuts,
            vec![
                Cut {
                    records: (0..7).collect(),
                    bucket: "dt=2024-10-04/".into()
                },
                Cut {
                    records: (7..10).collect(),
                    bucket: "dt=2024-10-05/".into()
                },
            ]
        );
        let by_hour = Encoder::new(
            &cfg("time_column = \"ts\"\ntime_partition = \"hour\""),
            &cols,
        );
        let r = [rec(
            0,
            vec![Value::Timestamp(day * 20_000 + 13 * HOUR + 5), Value::Null],
        )];
        assert_eq!(by_hour.cut(&r)[0].bucket, "dt=2024-10-04/hr=13/");
        let r = [rec(0, vec![Value::Null, Value::Null])];
        assert_eq!(by_day.cut(&r)[0].bucket, "dt=__HIVE_DEFAULT_PARTITION__/");
        assert!(by_day.cut(&[]).is_empty());
    }

    fn objects(e: &Encoder, recs: &[Record]) -> Vec<Vec<usize>> {
        e.cut(recs).into_iter().map(|c| c.records).collect()
    }

    #[test]
    fn records_going_back_in_time_join_their_days_object() {
        let cols = [col("d", ColumnType::Date)];
        let recs: Vec<Record> = [1, 2, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, d)| rec(i as u64, vec![Value::Date(*d)]))
            .collect();
        let e = Encoder::new(&cfg("time_column = \"d\"\nmax_object_records = 2"), &cols);
        let cuts = e.cut(&recs);
        let got: Vec<(&str, &[usize])> = cuts
            .iter()
            .map(|c| (c.bucket.as_str(), c.records.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                ("dt=1970-01-02/", &[0, 2][..]),
                ("dt=1970-01-02/", &[3][..]),
                ("dt=1970-01-03/", &[1][..]),
            ]
        );
    }

    #[test]
    fn a_field_makes_folders_before_the_time() {
        let cols = [col("country", ColumnType::Text), col("d", ColumnType::Date)];
        let recs: Vec<Record> = [
            (Value::Text("US".into()), 1),
            (Value::Text("a/b c".into()), 1),
            (Value::Null, 2),
            (Value::Text("US".into()), 2),
            (Value::Text("US".into()), 1),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (c, d))| rec(i as u64, vec![c, Value::Date(d)]))
        .collect();
        let e = Encoder::new(
            &cfg("partition_column = \"country\"\ntime_column = \"d\""),
            &cols,
        );
        let got: Vec<(String, Vec<usize>)> = e
            .cut(&recs)
            .into_iter()
            .map(|c| (c.bucket, c.records))
            .collect();
        assert_eq!(
            got,
            [
                ("country=US/dt=1970-01-02/".to_string(), vec![0, 4]),
                ("country=a%2Fb%20c/dt=1970-01-02/".to_string(), vec![1]),
                (
                    "country=__HIVE_DEFAULT_PARTITION__/dt=1970-01-03/".to_string(),
                    vec![2]
                ),
                ("country=US/dt=1970-01-03/".to_string(), vec![3]),
            ]
        );
        let by_id = Encoder::new(
            &cfg("partition_column = \"n\""),
            &[col("n", ColumnType::Bigint)],
        );
        let r = [rec(0, vec![Value::BigInt(42)])];
        assert_eq!(by_id.cut(&r)[0].bucket, "n=42/");
    }

    #[test]
    fn parquet_holds_every_value_with_its_type() {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{Date32Type, Float64Type, Int32Type, Int64Type};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let cols = [
            col("s", ColumnType::Text),
            col("n", ColumnType::Bigint),
            col("i", ColumnType::Integer),
            col("f", ColumnType::Double),
            col("b", ColumnType::Boolean),
            col("ts", ColumnType::Timestamp),
            col("d", ColumnType::Date),
            col("j", ColumnType::Json),
            col("m", ColumnType::Numeric),
            col("u", ColumnType::Uuid),
            col("x", ColumnType::Bytea),
        ];
        let full = vec![
            Value::Text("héllo".into()),
            Value::BigInt(-5_000_000_000),
            Value::Integer(7),
            Value::Double(0.25),
            Value::Boolean(true),
            Value::Timestamp(1_700_000_000_123_456),
            Value::Date(19_000),
            Value::Json("{\"a\":[1,2]}".into()),
            Value::Numeric("12345678901234567890.000001".into()),
            Value::Uuid([
                0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f,
                0xe0, 0xc8,
            ]),
            Value::Bytes(vec![0, 255, 7]),
        ];
        let empty = vec![Value::Null; cols.len()];
        for compression in ["none", "gzip", "zstd"] {
            let e = Encoder::new(
                &cfg(&format!(
                    "format = \"parquet\"\ncompression = \"{compression}\""
                )),
                &cols,
            );
            assert_eq!(e.extension(), "parquet");
            let body = e
                .encode(
                    "orders/3",
                    &[&rec(41, full.clone()), &rec(42, empty.clone())],
                )
                .unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body))
                .unwrap()
                .build()
                .unwrap();
            let batches: Vec<_> = reader.map(Result::unwrap).collect();
            assert_eq!(batches.len(), 1);
            let b = &batches[0];
            assert_eq!(b.num_rows(), 2);
            let text = |name: &str| {
                b.column_by_name(name)
                    .unwrap()
                    .as_string::<i32>()
                    .value(0)
                    .to_string()
            };
            assert_eq!(text("s"), "héllo");
            assert_eq!(text("j"), "{\"a\":[1,2]}");
            assert_eq!(text("m"), "12345678901234567890.000001");
            assert_eq!(text("u"), "67e55044-10b1-426f-9247-bb680e5fe0c8");
            assert_eq!(text("_idem_partition"), "orders/3");
            let col = |name: &str| b.column_by_name(name).unwrap().clone();
            assert_eq!(
                col("n").as_primitive::<Int64Type>().value(0),
                -5_000_000_000
            );
            assert_eq!(col("i").as_primitive::<Int32Type>().value(0), 7);
            assert_eq!(col("f").as_primitive::<Float64Type>().value(0), 0.25);
            assert!(col("b").as_boolean().value(0));
            assert_eq!(col("d").as_primitive::<Date32Type>().value(0), 19_000);
            assert_eq!(col("x").as_binary::<i32>().value(0), &[0, 255, 7]);
            let ts = col("ts");
            assert_eq!(
                ts.data_type(),
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            );
            assert_eq!(
                ts.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                    .value(0),
                1_700_000_000_123_456
            );
            let offsets = col("_idem_offset");
            let offsets = offsets.as_primitive::<Int64Type>();
            assert_eq!((offsets.value(0), offsets.value(1)), (41, 42));
            for c in &cols {
                assert!(col(&c.name).is_null(1), "{} of the empty record", c.name);
            }
        }
    }

    #[test]
    fn json_lines_compress_and_read_back() {
        use std::io::Read as _;
        let cols = [col("s", ColumnType::Text)];
        let (a, b) = (
            rec(5, vec![Value::Text("a".into())]),
            rec(6, vec![Value::Null]),
        );
        let recs = [&a, &b];
        let expected = "{\"s\":\"a\",\"_idem_partition\":\"p\",\"_idem_offset\":5}\n{\"s\":null,\"_idem_partition\":\"p\",\"_idem_offset\":6}\n";
        let plain = Encoder::new(&cfg(""), &cols);
        assert_eq!(plain.extension(), "jsonl");
        assert_eq!(
            String::from_utf8(plain.encode("p", &recs).unwrap()).unwrap(),
            expected
        );
        let gz = Encoder::new(&cfg("compression = \"gzip\""), &cols);
        assert_eq!(gz.extension(), "jsonl.gz");
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz.encode("p", &recs).unwrap()[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, expected);
        let zs = Encoder::new(&cfg("compression = \"zstd\""), &cols);
        assert_eq!(zs.extension(), "jsonl.zst");
        let raw = zstd::decode_all(&zs.encode("p", &recs).unwrap()[..]).unwrap();
        assert_eq!(String::from_utf8(raw).unwrap(), expected);
    }
}
