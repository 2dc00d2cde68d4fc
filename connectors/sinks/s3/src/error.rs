use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::SdkError;
use idem_core::SinkError;

/// What failed in the S3 sink, and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// A request to the store failed.
    #[error("s3 {store}: {op} `{key}`: {message}")]
    Request {
        store: String,
        op: &'static str,
        key: String,
        message: String,
        retriable: bool,
    },
    /// Nothing answered at the endpoint.
    #[error("s3 {store}: no answer ({message}); is the store running there? (for Idem's tests: bash scripts/s3.sh)")]
    Unreachable { store: String, message: String },
    /// The SDK found no credentials to sign with: no request was sent.
    #[error("s3 {store}: no AWS credentials were found ({message}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance or task role")]
    NoCredentials { store: String, message: String },
    #[error("s3 {store}: bucket `{bucket}` does not exist; create it first (Idem does not create buckets)")]
    NoBucket { store: String, bucket: String },
    #[error("s3 {store}: access to bucket `{bucket}` was refused ({message}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or role) and the bucket's policy")]
    Denied {
        store: String,
        bucket: String,
        message: String,
    },
    #[error("s3 {store}: the store ignored `If-None-Match: *` on a PUT of an existing object: it lacks the conditional writes Idem's manifests need for fencing; use a store that supports them (AWS S3 since 2024, MinIO, moto)")]
    NoConditionalWrites { store: String },
    #[error("s3 {store}: manifest `{key}` is not one Idem can read: {message}")]
    BadManifest {
        store: String,
        key: String,
        message: String,
    },
    #[error("s3 {store}: manifest `{key}` has format version {found}; this Idem understands up to {supported}: upgrade Idem")]
    FormatVersion {
        store: String,
        key: String,
        found: u32,
        supported: u32,
    },
    /// The store no longer knows an upload this runner had open: a newer
    /// runner's recovery aborted it, or a lifecycle rule did. What this
    /// runner staged is dropped and read again.
    #[error("s3 {store}: the multipart upload of `{key}` is gone (aborted by a newer runner's recovery or a lifecycle rule); the records staged in it will be read again")]
    UploadGone { store: String, key: String },
    /// A partition's staged objects were left half-written by an earlier
    /// failure: nothing more is staged until the partition opens again.
    #[error("s3: partition {partition} stopped staging after an earlier failure ({reason}); it resumes from its last manifest when it opens again")]
    Broken { partition: String, reason: String },
    #[error("s3: cannot encode objects: {0}")]
    Encode(String),
}

impl S3Error {
    pub fn is_retriable(&self) -> bool {
        match self {
            S3Error::Request { retriable, .. } => *retriable,
            S3Error::Unreachable { .. } => true,
            _ => false,
        }
    }
}

impl From<S3Error> for SinkError {
    fn from(e: S3Error) -> Self {
        let retriable = e.is_retriable();
        SinkError::classify(e, false, retriable)
    }
}

/// How a request failed, for the caller to decide.
pub(crate) enum Failure {
    /// 412 (or 409 for a concurrent conditional write): another writer won.
    Precondition,
    NotFound,
    Other(S3Error),
}

pub(crate) fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}
