//! Change data capture end to end: PostgreSQL -> Debezium's PostgreSQL
//! connector on Kafka Connect (`scripts/connect.sh`) -> Apache Kafka
//! (`scripts/kafka.sh`) -> `idem run` with `envelope = "debezium"` ->
//! PostgreSQL and DuckDB. The targets must equal the source tables row for
//! row. One test binary, a module per subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crash;
mod evolve;
mod replicate;
mod support;
mod tables;
mod types;
