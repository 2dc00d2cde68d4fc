//! HTTP sink: each message POSTed (or PUT) to an endpoint, its id in an
//! `Idempotency-Key` header; positions kept in the connector's dedup store.
//!
//! An HTTP call cannot join a transaction with a position, so the commit
//! is: every request of the batch answered (2xx, or a 4xx that sends the
//! message to the dead letters), then the position saved in the dedup
//! store under the partition's epoch. A crash in between re-sends some
//! requests with the same keys: a receiver that honours idempotency keys
//! applies each once. Ids already confirmed in the dedup store are not
//! sent again at all (the runner's dedup stage drops them).
//!
//! - `config.rs`: the `[connectors.NAME.sink]` section;
//! - `client.rs`: one request, tried once (the runner's `[retry]` retries);
//! - `sink.rs`: a batch's requests, what earlier tries settled, positions;
//! - `error.rs`: what failed and whether a retry helps.

mod client;
mod config;
mod error;
mod sink;

pub use config::{HttpSinkConfig, Method, Mode};
pub use error::HttpError;
pub use sink::HttpSink;

use idem_config::ColumnConfig;
use idem_core::Sink;
use std::sync::Arc;

/// The `http` sink's registry entry.
pub struct HttpKind;

impl idem_core::registry::SinkKind for HttpKind {
    const NAME: &'static str = "http";
    type Config = HttpSinkConfig;

    fn build(
        cfg: &HttpSinkConfig,
        columns: &[ColumnConfig],
        ctx: idem_core::registry::SinkContext,
    ) -> Result<Arc<dyn Sink>, String> {
        let store = ctx
            .store
            .ok_or("the http sink keeps its positions in the dedup store, and none was given")?;
        Ok(Arc::new(HttpSink::new(
            cfg.clone(),
            columns,
            store,
            ctx.rejects,
        )))
    }

    /// Its positions live in the dedup store beside the message ids.
    fn needs_store(_cfg: &HttpSinkConfig) -> bool {
        true
    }
}
