//! The `idem` runner: config in, connectors running, the commit protocol
//! applied to every batch. The binary in `main.rs` is a thin CLI over this.

pub mod admin;
pub mod app;
pub mod deadletter;
pub mod dedup;
pub mod generate;
pub mod output;
pub mod pipeline;
pub mod plugins;
pub mod preflight;
pub mod produce;
pub mod stats;
pub mod supervisor;
pub mod verify;
