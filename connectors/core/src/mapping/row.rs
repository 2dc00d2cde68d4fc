//! Mapped records, with their values packed into two allocations.
//!
//! Batches hold up to a hundred thousand records, and another batch is
//! read ahead while one commits. As a `Vec<Value>` a record of eight
//! columns took 32 bytes a cell plus an allocation per text: about
//! 420 bytes for a 190-byte event, most of Idem's own memory. Packed, a
//! row is about the size of its data, and dropping a batch frees two
//! blocks per record, not one per text.
//!
//! Layout: `cells` holds per value a tag byte, then fixed-size values
//! little-endian, or a LEB128 length (and, for byte strings, the bytes);
//! the texts follow one another in `text`, so reading one back is a slice
//! of a `str`, with no UTF-8 check.

use super::value::{Op, Value, ValueRef};
use std::fmt;

/// A mapped message: one row, in column order, and its offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub offset: u64,
    pub op: Op,
    /// The row, in column order, packed (see [`Row`]).
    pub values: Row,
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
        for (name, v) in names.iter().zip(self.values.iter()) {
            obj.insert(name.clone(), v.to_json());
        }
        obj
    }
}

const NULL: u8 = 0;
const TEXT: u8 = 1;
const BIGINT: u8 = 2;
const INTEGER: u8 = 3;
const DOUBLE: u8 = 4;
const BOOLEAN: u8 = 5;
const TIMESTAMP: u8 = 6;
const DATE: u8 = 7;
const JSON: u8 = 8;
const NUMERIC: u8 = 9;
const UUID: u8 = 10;
const BYTES: u8 = 11;

/// A record's values, in column order, packed (see the module's doc).
#[derive(Clone, Default, PartialEq)]
pub struct Row {
    cells: Box<[u8]>,
    text: Box<str>,
    len: u32,
}

impl Row {
    /// How many values the row holds.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values, in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            cells: &self.cells,
            text: &self.text,
        }
    }

    /// Value `i`, found by walking the values before it (rows are short).
    pub fn get(&self, i: usize) -> Option<ValueRef<'_>> {
        self.iter().nth(i)
    }

    /// The values, owned.
    pub fn to_values(&self) -> Vec<Value> {
        self.iter().map(ValueRef::to_value).collect()
    }

    /// Pad the row with nulls up to `len` values (a row never shrinks).
    pub fn pad_to(&mut self, len: usize) {
        if len <= self.len() {
            return;
        }
        let mut cells = std::mem::take(&mut self.cells).into_vec();
        cells.resize(cells.len() + (len - self.len()), NULL);
        self.cells = cells.into_boxed_slice();
        self.len = u32::try_from(len).unwrap_or(u32::MAX);
    }

    /// Pack `values`.
    pub fn pack<'a>(values: impl IntoIterator<Item = ValueRef<'a>>) -> Row {
        let mut row = RowWriter::with_capacity(64);
        for v in values {
            row.push(v);
        }
        row.finish()
    }
}

/// A [`Row`] being packed, value by value.
#[derive(Debug, Default)]
pub struct RowWriter {
    cells: Vec<u8>,
    text: String,
    len: u32,
}

impl RowWriter {
    /// A writer with room for about `bytes` of values.
    pub fn with_capacity(bytes: usize) -> RowWriter {
        RowWriter {
            cells: Vec::with_capacity(64),
            text: String::with_capacity(bytes),
            len: 0,
        }
    }

    pub fn push(&mut self, v: ValueRef<'_>) {
        let cells = &mut self.cells;
        match v {
            ValueRef::Null => cells.push(NULL),
            ValueRef::Text(s) => self.put_text(TEXT, s),
            ValueRef::BigInt(n) => put_fixed(cells, BIGINT, &n.to_le_bytes()),
            ValueRef::Integer(n) => put_fixed(cells, INTEGER, &n.to_le_bytes()),
            ValueRef::Double(x) => put_fixed(cells, DOUBLE, &x.to_le_bytes()),
            ValueRef::Boolean(b) => put_fixed(cells, BOOLEAN, &[u8::from(b)]),
            ValueRef::Timestamp(t) => put_fixed(cells, TIMESTAMP, &t.to_le_bytes()),
            ValueRef::Date(d) => put_fixed(cells, DATE, &d.to_le_bytes()),
            ValueRef::Json(s) => self.put_text(JSON, s),
            ValueRef::Numeric(s) => self.put_text(NUMERIC, s),
            ValueRef::Uuid(u) => put_fixed(cells, UUID, u),
            ValueRef::Bytes(b) => {
                put_len(cells, BYTES, b.len());
                cells.extend_from_slice(b);
            }
        }
        self.len = self.len.saturating_add(1);
    }

    fn put_text(&mut self, tag: u8, s: &str) {
        put_len(&mut self.cells, tag, s.len());
        self.text.push_str(s);
    }

    pub fn finish(self) -> Row {
        Row {
            cells: self.cells.into_boxed_slice(),
            text: self.text.into_boxed_str(),
            len: self.len,
        }
    }
}

impl From<Vec<Value>> for Row {
    fn from(values: Vec<Value>) -> Row {
        Row::pack(values.iter().map(Value::as_ref))
    }
}

impl Row {
    /// Whether the row holds exactly `values`.
    fn holds(&self, values: &[Value]) -> bool {
        self.len() == values.len() && self.iter().eq(values.iter().map(Value::as_ref))
    }
}

/// Tests and checks compare a row with the values they expect.
impl PartialEq<Vec<Value>> for Row {
    fn eq(&self, other: &Vec<Value>) -> bool {
        self.holds(other)
    }
}

impl<const N: usize> PartialEq<[Value; N]> for Row {
    fn eq(&self, other: &[Value; N]) -> bool {
        self.holds(other)
    }
}

impl<'a> IntoIterator for &'a Row {
    type Item = ValueRef<'a>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

fn put_fixed(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(bytes);
}

fn put_len(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    let mut n = len;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The values of a [`Row`], in order.
#[derive(Clone)]
pub struct Iter<'a> {
    cells: &'a [u8],
    text: &'a str,
}

impl<'a> Iter<'a> {
    fn fixed<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let (head, rest) = self.cells.split_first_chunk::<N>()?;
        self.cells = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        let mut n = 0usize;
        let mut shift = 0u32;
        loop {
            let (&b, rest) = self.cells.split_first()?;
            self.cells = rest;
            n |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
            shift += 7;
        }
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        let (bytes, rest) = self.cells.split_at_checked(n)?;
        self.cells = rest;
        Some(bytes)
    }

    fn text(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        // Texts were written whole, so `n` falls on a char boundary.
        let (text, rest) = self.text.split_at_checked(n)?;
        self.text = rest;
        Some(text)
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<ValueRef<'a>> {
        let (&tag, rest) = self.cells.split_first()?;
        self.cells = rest;
        Some(match tag {
            NULL => ValueRef::Null,
            TEXT => ValueRef::Text(self.text()?),
            BIGINT => ValueRef::BigInt(i64::from_le_bytes(*self.fixed()?)),
            INTEGER => ValueRef::Integer(i32::from_le_bytes(*self.fixed()?)),
            DOUBLE => ValueRef::Double(f64::from_le_bytes(*self.fixed()?)),
            BOOLEAN => ValueRef::Boolean(self.fixed::<1>()? != &[0]),
            TIMESTAMP => ValueRef::Timestamp(i64::from_le_bytes(*self.fixed()?)),
            DATE => ValueRef::Date(i32::from_le_bytes(*self.fixed()?)),
            JSON => ValueRef::Json(self.text()?),
            NUMERIC => ValueRef::Numeric(self.text()?),
            UUID => ValueRef::Uuid(self.fixed()?),
            BYTES => ValueRef::Bytes(self.bytes()?),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_value_comes_back_as_packed() {
        let long = "é".repeat(200); // a length over 127 takes two bytes
        let values = vec![
            Value::Null,
            Value::Text("evt-1".into()),
            Value::Text(String::new()),
            Value::Text(long.clone()),
            Value::BigInt(i64::MIN),
            Value::Integer(-7),
            Value::Double(-0.25),
            Value::Boolean(true),
            Value::Boolean(false),
            Value::Timestamp(1_767_225_600_000_001),
            Value::Date(-3),
            Value::Json(r#"{"a":[1]}"#.into()),
            Value::Numeric("-12.50".into()),
            Value::Uuid([7; 16]),
            Value::Bytes(vec![0, 255, 128]),
            Value::Bytes(vec![1; 70_000]),
        ];
        let row = Row::from(values.clone());
        assert_eq!(row.len(), values.len());
        assert_eq!(row.to_values(), values);
        assert_eq!(row.get(3), Some(ValueRef::Text(&long)));
        assert_eq!(row.get(values.len()), None);
    }

    #[test]
    fn padding_adds_nulls_and_never_shrinks() {
        let mut row = Row::from(vec![Value::BigInt(1)]);
        row.pad_to(3);
        assert_eq!(
            row.to_values(),
            vec![Value::BigInt(1), Value::Null, Value::Null]
        );
        row.pad_to(1);
        assert_eq!(row.len(), 3);
    }

    #[test]
    fn a_packed_row_is_about_the_size_of_its_data() {
        let row = Row::from(vec![
            Value::Text("519e4174576f3791d076".into()),
            Value::BigInt(98389),
            Value::Text("click".into()),
            Value::Double(793.5),
        ]);
        // tags 4, lengths 2, numbers 16; texts 25
        assert_eq!((row.cells.len(), row.text.len()), (22, 25));
    }
}
