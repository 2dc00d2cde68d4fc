//! Documents whose columns are all top-level fields are read in one pass,
//! field by field, without building the document.

use super::{tokens, Column, Origin};
use serde_json::Value as Json;

/// Top-level field names: the columns' (`None` for a column that is not
/// read from the value), then the tombstone field's.
pub(super) struct Flat {
    names: Vec<Option<String>>,
    tombstone: Option<String>,
}

impl Flat {
    pub(super) fn new(columns: &[Column], tombstone: Option<&str>) -> Option<Flat> {
        let top = |tokens: &[String]| match tokens {
            [name] => Some(name.clone()),
            _ => None,
        };
        let names = columns
            .iter()
            .map(|c| match c.from {
                Origin::Doc => top(&c.tokens).map(Some),
                _ => Some(None),
            })
            .collect::<Option<Vec<_>>>()?;
        let tombstone = match tombstone {
            Some(p) => Some(top(&tokens(p))?),
            None => None,
        };
        Some(Flat { names, tombstone })
    }

    /// The columns' fields and whether the message is a tombstone; `None`
    /// when the document is not an object (the general path handles it).
    #[allow(clippy::type_complexity)]
    pub(super) fn parse(
        &self,
        raw: &[u8],
    ) -> serde_json::Result<Option<(Vec<Option<Json>>, bool)>> {
        let mut de = serde_json::Deserializer::from_slice(raw);
        let picked = serde::de::DeserializeSeed::deserialize(FlatSeed(self), &mut de)?;
        de.end()?;
        Ok(picked)
    }
}

struct FlatSeed<'a>(&'a Flat);

/// Which of the wanted fields a key is.
enum Slot {
    Column(usize),
    Tombstone,
    Other,
}

struct KeySeed<'a>(&'a Flat);

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Slot;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeySeed<'_> {
    type Value = Slot;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Slot, E> {
        Ok(
            match self.0.names.iter().position(|n| n.as_deref() == Some(key)) {
                Some(i) => Slot::Column(i),
                None if self.0.tombstone.as_deref() == Some(key) => Slot::Tombstone,
                None => Slot::Other,
            },
        )
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for FlatSeed<'_> {
    type Value = Option<(Vec<Option<Json>>, bool)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FlatSeed<'_> {
    type Value = Option<(Vec<Option<Json>>, bool)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Vec<Option<Json>> = vec![None; self.0.names.len()];
        let mut tombstone = false;
        while let Some(slot) = map.next_key_seed(KeySeed(self.0))? {
            // A repeated key: the last one wins, as in a parsed document.
            match slot {
                Slot::Column(i) => fields[i] = Some(map.next_value()?),
                Slot::Tombstone => tombstone = map.next_value::<Json>()? == Json::Bool(true),
                Slot::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some((fields, tombstone)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        // `null`: a tombstone with no fields.
        Ok(Some((vec![None; self.0.names.len()], true)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// Whether no pointer contains another (or the whole document).
pub(super) fn disjoint(pointers: &[&str]) -> bool {
    pointers.iter().enumerate().all(|(i, a)| {
        !a.is_empty()
            && pointers
                .iter()
                .enumerate()
                .all(|(j, b)| i == j || (a != b && !b.starts_with(&format!("{a}/"))))
    })
}
