//! Values written through a schema registry: its wire format (a zero
//! byte, the writer schema's id, the value) and the writer schemas kept
//! by id.

use super::avro::AvroSchema;
use super::protobuf::ProtoFile;
use std::collections::HashMap;

/// A writer's schema as the registry gives it, ready to decode with.
pub enum Writer {
    Avro(Box<AvroSchema>),
    Protobuf(ProtoFile),
}

/// The schemas of a registry, by id, as fetched so far. The runner fetches
/// (with its retries) the ids a chunk of messages names before it maps
/// them, so mapping itself never waits on the network.
#[derive(Default)]
pub struct RegistrySchemas {
    by_id: std::sync::RwLock<HashMap<u32, std::sync::Arc<Writer>>>,
}

impl RegistrySchemas {
    pub fn get(&self, id: u32) -> Option<std::sync::Arc<Writer>> {
        self.by_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    pub fn insert(&self, id: u32, schema: Writer) {
        self.by_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, std::sync::Arc::new(schema));
    }
}

/// The Confluent wire format: a zero byte, the schema's id in 4 bytes
/// (big-endian), then the value. `Err` says why `raw` is not in it.
pub fn wire_format(raw: &[u8]) -> Result<(u32, &[u8]), String> {
    match raw {
        [0, a, b, c, d, value @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), value)),
        [0, ..] => Err(format!(
            "not in the schema registry's wire format: {} bytes, shorter than its 5-byte prefix",
            raw.len()
        )),
        [first, ..] => Err(format!(
            "not in the schema registry's wire format: it starts with byte {first:#04x}, not 0x00 (a value written without the registry's serializer?)"
        )),
        [] => Err("not in the schema registry's wire format: the value is empty".into()),
    }
}
