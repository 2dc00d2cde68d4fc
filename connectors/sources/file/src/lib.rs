//! File source: newline-delimited JSON files, one partition per file.
//!
//! A message's offset is the byte offset of its line, so a position stays
//! valid across restarts as long as the file is only appended to. Batch mode
//! reads every matched file to its end; `follow = true` tails them (and
//! picks up new files matching the glob), like a sidecar shipping an
//! application's event log. Positions live in the sink, never here.

mod config;
mod source;

pub use config::FileSourceConfig;
pub use source::FileSource;
