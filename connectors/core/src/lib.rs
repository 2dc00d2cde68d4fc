//! Idem's core: the message model, the [`Source`] and [`Sink`] traits of the
//! commit protocol, and the mapping of JSON messages to typed rows.
//!
//! The protocol every sink obeys (see docs/ARCHITECTURE.md):
//! 1. [`Sink::open`] fences the partition (bumps its epoch in the sink's own
//!    storage) and returns the last committed position.
//! 2. The runner reads the source from that position.
//! 3. [`Sink::commit`] makes a batch's effects and its next position durable
//!    in one atomic step, refusing with [`SinkError::Fenced`] if the epoch
//!    moved.
//! 4. Only then the runner acks the source ([`Source::ack`]); losing the ack
//!    is harmless because step 1 reads the sink.

pub mod columnar;
pub mod failpoint;
pub mod mapping;
mod message;
pub mod registry;
mod sink;
mod source;
pub mod table;

pub use idem_config::Guarantee;
pub use mapping::{plain_decimal, MapError, Mapper, Op, Record, Row, Value, ValueRef};
pub use message::{Message, Meta, PartitionRef};
pub use sink::{
    AddsColumns, Batch, CommitStats, Opened, Rejects, RowPositions, RowShape, Sink, SinkError,
    SinkInfo, StoredPosition, TableColumn,
};
pub use source::{Assignment, PartitionReader, ReadStatus, Source, SourceError};
