//! The Kafka source against a real Apache Kafka broker on 127.0.0.1:9092
//! (scripts/kafka.sh) and the PostgreSQL sink (scripts/postgres.sh; the
//! `iceberg` module writes an Iceberg table instead): the real binary in a
//! consumer group, each test on its own topic and schema.
//! One test binary, a module per subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dead_letters;
mod exactly_once;
mod flow;
mod formats;
mod group;
mod iceberg;
mod reopen;
mod security;
mod settings;
mod support;
