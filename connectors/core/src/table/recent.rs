//! The keys a sink committed lately, as hashes: enough to route a batch's
//! rows between a fast path that assumes their keys are new (binary `COPY`
//! straight into a keyed table) and a safe one that checks each key
//! (`INSERT .. ON CONFLICT`). A collision or a forgotten key costs speed,
//! never correctness: the fast path fails on an existing key and the batch
//! takes the safe path instead.

use crate::table::sql::KeyPart;
use crate::Record;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

/// Two generations of at most `cap` hashes each: when the current one is
/// full it becomes the previous one, so memory stays within `2 * cap`
/// hashes and the last `cap` keys or more are always remembered.
pub struct RecentKeys {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    cap: usize,
}

impl RecentKeys {
    pub fn new(cap: usize) -> Self {
        RecentKeys {
            current: HashSet::new(),
            previous: HashSet::new(),
            cap: cap.max(1),
        }
    }

    /// Whether `hash` was added lately: its key may be in the table.
    pub fn may_hold(&self, hash: u64) -> bool {
        self.current.contains(&hash) || self.previous.contains(&hash)
    }

    pub fn add(&mut self, hashes: impl IntoIterator<Item = u64>) {
        for h in hashes {
            if self.current.len() >= self.cap {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(h);
        }
    }
}

/// The hash of a record's key (the values at `key_idx`), the same in every
/// call of one process.
pub fn key_hash(record: &Record, key_idx: &[usize]) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(KeyPart::key(record, key_idx))
}

/// The hash of a message id, as [`key_hash`]'s.
pub fn id_hash(id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Value};

    #[test]
    fn remembers_at_least_the_last_cap_keys_and_at_most_twice_that() {
        let mut recent = RecentKeys::new(3);
        recent.add(0..7);
        // 0..3 went out with the first full generation; 3..6 then 6.
        assert!((3..7).all(|h| recent.may_hold(h)), "the last 4");
        assert!((0..3).all(|h| !recent.may_hold(h)), "older ones forgotten");
        assert!(recent.current.len() + recent.previous.len() <= 6);
    }

    #[test]
    fn equal_keys_hash_alike_and_other_columns_do_not_matter() {
        let rec = |k: &str, v: i64| Record {
            offset: 0,
            op: Op::Upsert,
            values: vec![Value::Text(k.into()), Value::BigInt(v)].into(),
            id: None,
        };
        assert_eq!(key_hash(&rec("a", 1), &[0]), key_hash(&rec("a", 2), &[0]));
        assert_ne!(key_hash(&rec("a", 1), &[0]), key_hash(&rec("b", 1), &[0]));
        assert_ne!(
            key_hash(&rec("a", 1), &[0, 1]),
            key_hash(&rec("a", 2), &[0, 1])
        );
    }
}
