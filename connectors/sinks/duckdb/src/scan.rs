//! A batch read by SQL straight from its Arrow record batch.
//!
//! An upsert merges a batch into the table with a `MERGE INTO`, and kept
//! ids are looked up then recorded. Appending the batch (or its ids) into a
//! staging table first would cost a copy of every value, with DuckDB's
//! column statistics, before any statement reads it. Instead a table
//! function, `idem_batch(slot)`, yields the record batch a sink has put in
//! its slot; a temporary view over it stands where a staging table would.
//!
//! Not `duckdb::vtab::arrow_recordbatch_to_query_params`: that keeps every
//! record batch it is given for the life of the process.

use arrow::record_batch::RecordBatch;
use duckdb::core::{DataChunkHandle, LogicalTypeHandle, LogicalTypeId};
use duckdb::vtab::{
    record_batch_to_duckdb_data_chunk, to_duckdb_logical_type_for_field, BindInfo, InitInfo,
    TableFunctionInfo, VTab,
};
use duckdb::Connection;
use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};

/// The table function's name, registered once on each connection.
pub(crate) const FUNCTION: &str = "idem_batch";

/// The record batch each slot holds, by slot number.
static SLOTS: LazyLock<Mutex<HashMap<u64, RecordBatch>>> = LazyLock::new(Default::default);
static NEXT: AtomicU64 = AtomicU64::new(1);

fn slots() -> std::sync::MutexGuard<'static, HashMap<u64, RecordBatch>> {
    SLOTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One sink's place for the batch its statements read: `idem_batch(n)`.
pub(crate) struct Slot {
    id: u64,
}

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The SQL that reads this slot.
    pub(crate) fn select(&self) -> String {
        format!("SELECT * FROM {FUNCTION}({}::UBIGINT)", self.id)
    }

    /// Hold `rows` until the guard drops: the statements run meanwhile read
    /// them. An empty batch of the right columns lets a view be created.
    pub(crate) fn hold(&self, rows: RecordBatch) -> Held<'_> {
        slots().insert(self.id, rows);
        Held { slot: self }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        slots().remove(&self.id);
    }
}

/// Empties the slot when dropped, so a batch is freed with its commit.
pub(crate) struct Held<'a> {
    slot: &'a Slot,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        slots().remove(&self.slot.id);
    }
}

/// Register `idem_batch` on `conn` (once per connection).
pub(crate) fn register(conn: &Connection) -> duckdb::Result<()> {
    conn.register_table_function::<BatchScan>(FUNCTION)
}

struct BatchScan;

/// How many of the batch's rows have been handed to DuckDB.
struct Scanned {
    next: AtomicUsize,
}

impl VTab for BatchScan {
    type BindData = RecordBatch;
    type InitData = Scanned;

    fn bind(bind: &BindInfo) -> Result<RecordBatch, Box<dyn Error>> {
        let id = bind.get_parameter(0).to_uint64();
        // A clone shares the columns' buffers: no copy of the data.
        let rows = slots()
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("{FUNCTION}({id}): no batch is held in this slot"))?;
        for field in rows.schema().fields() {
            bind.add_result_column(field.name(), to_duckdb_logical_type_for_field(field)?);
        }
        // The planner sizes its joins by it: without it, a batch looks
        // like a table of unknown size.
        bind.set_cardinality(rows.num_rows() as u64, true);
        Ok(rows)
    }

    fn init(_: &InitInfo) -> Result<Scanned, Box<dyn Error>> {
        Ok(Scanned {
            next: AtomicUsize::new(0),
        })
    }

    fn func(
        func: &TableFunctionInfo<Self>,
        output: &mut DataChunkHandle,
    ) -> Result<(), Box<dyn Error>> {
        let rows = func.get_bind_data();
        // One vector's worth of rows per call; a slice shares the buffers.
        let capacity = output.flat_vector(0).capacity();
        let from = func
            .get_init_data()
            .next
            .fetch_add(capacity, Ordering::Relaxed);
        if from >= rows.num_rows() {
            output.set_len(0);
            return Ok(());
        }
        let len = capacity.min(rows.num_rows() - from);
        record_batch_to_duckdb_data_chunk(&rows.slice(from, len), output)
    }

    fn parameters() -> Option<Vec<LogicalTypeHandle>> {
        Some(vec![LogicalTypeHandle::from(LogicalTypeId::UBigint)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn rows(ids: &[i64]) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]);
        let names = ids.iter().map(|i| Some(format!("name-{i}")));
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(names.collect::<StringArray>()),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_view_reads_the_held_batch_and_nothing_once_released() {
        let conn = Connection::open_in_memory().unwrap();
        register(&conn).unwrap();
        let slot = Slot::new();
        {
            let _empty = slot.hold(rows(&[]));
            conn.execute_batch(&format!("CREATE TEMP VIEW b AS {}", slot.select()))
                .unwrap();
        }
        // More rows than one DuckDB vector (2,048), so the scan takes turns.
        let ids: Vec<i64> = (0..5000).collect();
        let sum = |conn: &Connection| -> duckdb::Result<(i64, i64, String)> {
            conn.query_row("SELECT count(*), sum(id), max(name) FROM b", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
        };
        {
            let _held = slot.hold(rows(&ids));
            assert_eq!(
                sum(&conn).unwrap(),
                (5000, ids.iter().sum(), "name-999".to_string())
            );
            // Read again, as the update and then the insert do.
            assert_eq!(sum(&conn).unwrap().0, 5000);
        }
        // Released: the batch is freed, and a read says why it fails.
        assert!(!slots().contains_key(&slot.id));
        let err = sum(&conn).unwrap_err().to_string();
        assert!(err.contains("no batch is held"), "{err}");
    }

    #[test]
    fn slots_are_apart() {
        let conn = Connection::open_in_memory().unwrap();
        register(&conn).unwrap();
        let (a, b) = (Slot::new(), Slot::new());
        let (_a, _b) = (a.hold(rows(&[1, 2])), b.hold(rows(&[7])));
        let count = |slot: &Slot| -> i64 {
            conn.query_row(
                &format!("SELECT sum(id) FROM ({})", slot.select()),
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!((count(&a), count(&b)), (3, 7));
    }
}
