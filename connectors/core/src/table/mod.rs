//! The table-sink kit: what every sink writing rows into a SQL database
//! (DuckDB, PostgreSQL; ClickHouse next) shares, so that each keeps only
//! its client and its dialect's differences:
//! - [`offsets`]: the offsets table and its fencing protocol;
//! - [`audit`]: column values as canonical text, to compare a table with
//!   another engine's (`idem verify --against`);
//! - [`check`]: an existing table checked against what the connector maps;
//! - [`recent`]: hashes of the keys committed lately, to pick a fast path;
//! - [`sql`]: identifiers, column definitions, the upsert guard, merges,
//!   deletes, dedup inserts, the verify shape ([`sql::table_sink_info`]).

pub mod audit;
pub mod check;
pub mod offsets;
pub mod recent;
pub mod sql;
