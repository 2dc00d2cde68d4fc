//! The `idem` runner: config in, connectors running, the commit protocol
//! applied to every batch. The binary in `main.rs` is a thin CLI over this.

pub mod admin;
pub mod app;
pub mod commands;
pub mod connector;
pub mod deadletter;
pub mod dedup;
pub mod generate;
pub mod output;
pub mod preflight;
pub mod process;
pub mod produce;
pub mod registry;
pub mod report;
pub mod retry;
pub mod schemas;
pub mod stats;
pub mod supervisor;
pub mod verify;
