//! What can go wrong sending to the receiver, and whether a retry helps.

use idem_core::SinkError;
use idem_dedup_store::DedupError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// No answer, a connection refused, or an answer that says a later try
    /// may pass (408, 409, 425, 429, 5xx): the batch is tried again under
    /// the connector's `[retry]`.
    #[error("{method} {url}: {last} (retriable)")]
    Failed {
        method: &'static str,
        url: String,
        last: String,
        /// The receiver's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("{method} {url}: {message}")]
    Request {
        method: &'static str,
        url: String,
        message: String,
    },
    #[error("bearer_token_env = \"{0}\": the variable is not set")]
    MissingToken(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("positions: {0}")]
    Store(#[from] DedupError),
}

impl HttpError {
    pub fn is_retriable(&self) -> bool {
        match self {
            HttpError::Failed { .. } => true,
            HttpError::Store(e) => e.is_retriable(),
            _ => false,
        }
    }
}

impl From<HttpError> for SinkError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Store(DedupError::Lost { store }) => SinkError::PositionsLost { store },
            HttpError::Failed {
                retry_after: Some(retry_after),
                ..
            } => SinkError::Busy {
                retry_after,
                source: Box::new(e),
            },
            e if e.is_retriable() => SinkError::Transient(Box::new(e)),
            e => SinkError::Permanent(Box::new(e)),
        }
    }
}
