//! The admin API of the real `idem run` binary, against a real PostgreSQL
//! sink: metrics equal what was sent, pause and resume lose nothing,
//! readiness follows the sink's reachability, reload restarts only what
//! changed and refuses a bad file, SIGTERM mid-load exits 0 and a restart
//! loses and duplicates nothing; `idem verify` and dead-letter tables. One
//! test binary, a module per subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod audit;
mod lifecycle;
mod support;
