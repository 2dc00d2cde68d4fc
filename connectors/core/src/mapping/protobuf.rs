//! Protobuf values (`format = "protobuf"`), read as the JSON document the
//! mapping takes, as Avro values are: each value is one serialized message
//! of the type `message` names, from a `.proto` file compiled at start
//! (its imports found beside it), and becomes its canonical proto3 JSON
//! with the `.proto`'s own field names: 64-bit integers as numbers, enums
//! by name, bytes in base64, `google.protobuf.Timestamp` as RFC 3339, the
//! wrappers as their value; a field left unset reads as its default.

use idem_config::ColumnType;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use serde_json::Value as Json;
use std::path::Path;

/// The message type of a topic's values.
pub struct ProtoSchema {
    message: MessageDescriptor,
}

impl ProtoSchema {
    /// Compile `file` (imports resolved from its directory, and the
    /// well-known types) and take its message type `name` (`pkg.Message`).
    /// `Err` says what is wrong, with the compiler's line and column.
    pub fn compile(file: &Path, name: &str) -> Result<ProtoSchema, String> {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut compiler = protox::Compiler::new([dir]).map_err(|e| e.to_string())?;
        compiler.include_imports(true);
        let file_name = file.file_name().unwrap_or(file.as_os_str());
        compiler
            .open_file(file_name)
            .map_err(|e| format!("does not compile: {e:?}"))?;
        ProtoSchema::of(compiler.descriptor_pool(), name)
    }

    fn of(pool: DescriptorPool, name: &str) -> Result<ProtoSchema, String> {
        let message = pool.get_message_by_name(name).ok_or_else(|| {
            let known: Vec<String> = pool
                .all_messages()
                .filter(|m| !m.full_name().starts_with("google.protobuf."))
                .map(|m| m.full_name().to_string())
                .collect();
            format!("has no message `{name}` (it has: {})", known.join(", "))
        })?;
        Ok(ProtoSchema { message })
    }

    /// One serialized message as JSON. `Err` says why it is not one.
    pub fn decode(&self, bytes: &[u8]) -> Result<Json, String> {
        let message = DynamicMessage::decode(self.message.clone(), bytes)
            .map_err(|e| format!("not a {} message: {e}", self.message.full_name()))?;
        let options = SerializeOptions::new()
            .stringify_64_bit_integers(false)
            .use_proto_field_name(true)
            .skip_default_fields(false);
        message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| format!("{} message: {e}", self.message.full_name()))
    }

    /// The message's fields as columns, in the order the `.proto`
    /// declares them, each of the column type its JSON reads as: `decimal`
    /// is the sink's type for a `uint64` (which may not fit a bigint).
    pub fn columns(&self, decimal: ColumnType) -> Vec<(String, ColumnType)> {
        self.message
            .fields()
            .map(|f| {
                let ty = if f.is_list() || f.is_map() {
                    ColumnType::Json
                } else {
                    column_type(&f.kind(), decimal)
                };
                (f.name().to_string(), ty)
            })
            .collect()
    }
}

fn column_type(kind: &Kind, decimal: ColumnType) -> ColumnType {
    match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => ColumnType::Integer,
        Kind::Uint32 | Kind::Fixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            ColumnType::Bigint
        }
        Kind::Uint64 | Kind::Fixed64 => decimal,
        Kind::Float | Kind::Double => ColumnType::Double,
        Kind::Bool => ColumnType::Boolean,
        Kind::String | Kind::Enum(_) => ColumnType::Text,
        Kind::Bytes => ColumnType::Bytea,
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => ColumnType::Timestamp,
            // The wrappers read as their value.
            "google.protobuf.Int32Value" => ColumnType::Integer,
            "google.protobuf.UInt32Value" | "google.protobuf.Int64Value" => ColumnType::Bigint,
            "google.protobuf.UInt64Value" => decimal,
            "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => ColumnType::Double,
            "google.protobuf.BoolValue" => ColumnType::Boolean,
            "google.protobuf.StringValue" | "google.protobuf.Duration" => ColumnType::Text,
            "google.protobuf.BytesValue" => ColumnType::Bytea,
            _ => ColumnType::Json,
        },
    }
}

/// A `.proto` as a schema registry keeps it (its text, under an id),
/// compiled: the message of each value is named by the indexes in the
/// registry's wire format.
pub struct ProtoFile {
    file: prost_reflect::FileDescriptor,
}

/// The registry's `.proto` text, and Google's well-known types beside it.
struct Text(String);

const REGISTRY_FILE: &str = "registry.proto";

impl protox::file::FileResolver for Text {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == REGISTRY_FILE {
            protox::file::File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

impl ProtoFile {
    /// Compile a `.proto` given as text; imports other than Google's
    /// well-known types are not found (a registry gives them as
    /// references, which Idem does not read yet).
    pub fn compile(text: &str) -> Result<ProtoFile, String> {
        let mut chain = protox::file::ChainFileResolver::new();
        chain.add(Text(text.to_string()));
        chain.add(protox::file::GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(chain);
        compiler
            .open_file(REGISTRY_FILE)
            .map_err(|e| format!("the .proto does not compile: {e:?}"))?;
        let file = compiler
            .descriptor_pool()
            .get_file_by_name(REGISTRY_FILE)
            .ok_or("the .proto compiled to nothing")?;
        Ok(ProtoFile { file })
    }

    /// A value after the registry's 5-byte prefix: the message indexes
    /// (a count, then each index, as zigzag varints; a lone 0 is the first
    /// message), then the message, read as its canonical JSON.
    pub fn decode(&self, bytes: &[u8]) -> Result<Json, String> {
        let mut rest = bytes;
        let count = zigzag(&mut rest)?;
        let path: Vec<i64> = if count == 0 {
            vec![0]
        } else {
            (0..count)
                .map(|_| zigzag(&mut rest))
                .collect::<Result<_, _>>()?
        };
        let mut message: Option<MessageDescriptor> = None;
        for &i in &path {
            let i = usize::try_from(i).map_err(|_| format!("message index {i} is negative"))?;
            let next = match &message {
                None => self.file.messages().nth(i),
                Some(m) => m.child_messages().nth(i),
            };
            message = Some(next.ok_or_else(|| {
                format!("message indexes {path:?} name no message of the schema")
            })?);
        }
        let message = message.ok_or("no message index")?;
        ProtoSchema { message }.decode(rest)
    }
}

/// One zigzag varint off the front of `bytes`.
fn zigzag(bytes: &mut &[u8]) -> Result<i64, String> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or("the message indexes end before the message")?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            #[allow(clippy::cast_possible_wrap)]
            return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    Err("a message index longer than a varint".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost::Message as _;

    const PROTO: &str = r#"
syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
enum Status { NEW = 0; PAID = 1; }
message Buyer { string city = 1; }
message Order {
  int64 id = 1;
  string name = 2;
  double price = 3;
  bool paid = 4;
  google.protobuf.Timestamp at = 5;
  Status status = 6;
  repeated string tags = 7;
  Buyer buyer = 8;
  map<string, int32> counts = 9;
  bytes raw = 10;
  optional string note = 11;
  uint64 big = 12;
  google.protobuf.Int64Value wrapped = 13;
  sint32 small = 14;
}
"#;

    fn schema() -> (tempfile::TempDir, ProtoSchema) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.proto");
        std::fs::write(&path, PROTO).unwrap();
        let s = ProtoSchema::compile(&path, "shop.Order").unwrap();
        (dir, s)
    }

    #[test]
    fn a_message_reads_as_its_canonical_json_with_the_protos_names() {
        let (_d, s) = schema();
        let json = serde_json::json!({
            "id": 9007199254740993_i64, "name": "ann", "price": 1.5, "paid": true,
            "at": "2026-01-02T03:04:05.123456Z", "status": "PAID", "tags": ["a", "b"],
            "buyer": {"city": "Lyon"}, "counts": {"x": 1}, "raw": "AP8=", "note": "hi",
            "big": 18446744073709551615_u64, "wrapped": 5, "small": -3
        });
        let message = DynamicMessage::deserialize(s.message.clone(), json.clone()).unwrap();
        let doc = s.decode(&message.encode_to_vec()).unwrap();
        assert_eq!(doc, json);
        // Unset fields: proto3 defaults; an unset optional or message field
        // is absent (null to a column).
        let empty = s.decode(&[]).unwrap();
        assert_eq!(
            (empty["id"].clone(), empty["name"].clone()),
            (0.into(), "".into())
        );
        assert!(
            empty.get("note").is_none() && empty.get("buyer").is_none(),
            "{empty}"
        );
        let e = s.decode(&[0x0a, 0x05, b'a']).unwrap_err();
        assert!(e.contains("not a shop.Order message"), "{e}");
    }

    #[test]
    fn the_fields_are_columns_of_the_types_they_read_as() {
        let (_d, s) = schema();
        use ColumnType::*;
        let types: Vec<ColumnType> = s.columns(Numeric).into_iter().map(|c| c.1).collect();
        assert_eq!(
            types,
            [
                Bigint, Text, Double, Boolean, Timestamp, Text, Json, Json, Json, Bytea, Text,
                Numeric, Bigint, Integer
            ]
        );
    }

    #[test]
    fn a_registry_value_names_its_message_by_indexes() {
        let text = "syntax = \"proto3\";\npackage p;\nimport \"google/protobuf/timestamp.proto\";\nmessage A { int64 id = 1; message Inner { string s = 1; } }\nmessage B { string name = 1; google.protobuf.Timestamp at = 2; }\n";
        let f = ProtoFile::compile(text).unwrap();
        let a = f.file.messages().next().unwrap();
        let b = f.file.messages().nth(1).unwrap();
        let inner = a.child_messages().next().unwrap();
        let encode = |m: &MessageDescriptor, json: serde_json::Value| {
            DynamicMessage::deserialize(m.clone(), json)
                .unwrap()
                .encode_to_vec()
        };
        // [0] written as the lone 0; [1] as count 1 (zigzag 2), index 1
        // (zigzag 2); [0, 0] as count 2, 0, 0.
        let mut v = vec![0];
        v.extend(encode(&a, serde_json::json!({"id": 7})));
        assert_eq!(f.decode(&v).unwrap(), serde_json::json!({"id": 7}));
        let mut v = vec![2, 2];
        v.extend(encode(
            &b,
            serde_json::json!({"name": "n", "at": "2026-01-01T00:00:00Z"}),
        ));
        assert_eq!(f.decode(&v).unwrap()["at"], "2026-01-01T00:00:00Z");
        let mut v = vec![4, 0, 0];
        v.extend(encode(&inner, serde_json::json!({"s": "x"})));
        assert_eq!(f.decode(&v).unwrap(), serde_json::json!({"s": "x"}));
        let e = f.decode(&[2, 8]).unwrap_err();
        assert!(e.contains("name no message"), "{e}");
        assert!(ProtoFile::compile("syntax = \"proto3\";\nimport \"other.proto\";\n").is_err());
    }

    #[test]
    fn a_wrong_file_or_message_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.proto");
        std::fs::write(&path, "syntax = \"proto3\";\nmessage A { int64 id = 1 }\n").unwrap();
        let e = ProtoSchema::compile(&path, "A").err().unwrap();
        assert!(e.contains("does not compile"), "{e}");
        std::fs::write(
            &path,
            "syntax = \"proto3\";\npackage p;\nmessage A { int64 id = 1; }\n",
        )
        .unwrap();
        let e = ProtoSchema::compile(&path, "A").err().unwrap();
        assert!(e.contains("no message `A`") && e.contains("p.A"), "{e}");
    }
}
