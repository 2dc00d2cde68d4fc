//! Requests to the store: reads, conditional manifest writes, listings,
//! deletes, uploads (multipart when large), and what their failures mean.

use crate::error::{status, Failure, S3Error};
use crate::keys::{Manifest, Segment, MANIFEST_FORMAT};
use crate::sink::S3Sink;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use idem_core::failpoint::{self, MID_WRITE};
use std::time::Duration;

impl S3Sink {
    pub(crate) fn store(&self) -> String {
        match &self.cfg.endpoint {
            Some(e) => format!("{e}/{}", self.cfg.bucket),
            None => format!("s3://{}", self.cfg.bucket),
        }
    }

    pub(crate) async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .timeout_config(timeouts);
                if let Some(r) = &self.cfg.region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(e) = &self.cfg.endpoint {
                    loader = loader.endpoint_url(e);
                }
                let shared = loader.load().await;
                let mut b = aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(self.cfg.path_style);
                if shared.region().is_none() {
                    // S3-compatible stores rarely care; signing needs one.
                    b = b.region(aws_config::Region::new("us-east-1"));
                }
                Client::from_conf(b.build())
            })
            .await
    }

    /// An SDK error as ours, keeping the store's message.
    pub(crate) fn fail<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, HttpResponse>,
    ) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = status(&e);
        match code {
            Some(412) => return Failure::Precondition,
            Some(409) if e.code() == Some("ConditionalRequestConflict") => {
                return Failure::Precondition
            }
            Some(404) if e.code() != Some("NoSuchBucket") => return Failure::NotFound,
            _ => {}
        }
        // The store's own code and message when it sent them (a HEAD has
        // no body: then the status), else the whole chain (no answer).
        let message = match (e.code(), e.message(), code) {
            (Some(c), Some(m), _) => format!("{c}: {m}"),
            (Some(c), None, _) => c.to_string(),
            (None, _, Some(status)) => format!("HTTP {status}"),
            _ => DisplayErrorContext(&e).to_string(),
        };
        Failure::Other(match (code, e.code()) {
            // The credentials chain fails inside the dispatch, before any
            // request leaves: not the store's fault, and no retry helps.
            (None, _)
                if matches!(e, SdkError::DispatchFailure(_)) && message.contains("credential") =>
            {
                S3Error::NoCredentials {
                    store: self.store(),
                    message: first_line(&message),
                }
            }
            (None, _) if matches!(e, SdkError::DispatchFailure(_)) => S3Error::Unreachable {
                store: self.store(),
                message,
            },
            (_, Some("NoSuchBucket")) => S3Error::NoBucket {
                store: self.store(),
                bucket: self.cfg.bucket.clone(),
            },
            (Some(401 | 403), _) => S3Error::Denied {
                store: self.store(),
                bucket: self.cfg.bucket.clone(),
                message,
            },
            (code, _) => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message,
                // No answer, a timeout, throttling or a server error.
                retriable: code.is_none_or(|c| c >= 500 || c == 429 || c == 408),
            },
        })
    }

    /// An SDK error as ours, whatever it was.
    pub(crate) fn req<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let f = self.fail(op, key, e);
        self.other(op, key, f)
    }

    pub(crate) fn other(&self, op: &'static str, key: &str, f: Failure) -> S3Error {
        match f {
            Failure::Other(e) => e,
            Failure::Precondition => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message: "precondition failed".into(),
                retriable: true,
            },
            Failure::NotFound => S3Error::Request {
                store: self.store(),
                op,
                key: key.to_string(),
                message: "not found".into(),
                retriable: false,
            },
        }
    }

    /// An object's bytes and ETag, if it exists.
    pub(crate) async fn get(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<Option<(String, Vec<u8>)>, S3Error> {
        let client = self.client().await;
        let out = match client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                return match self.fail(op, key, e) {
                    Failure::NotFound => Ok(None),
                    f => Err(self.other(op, key, f)),
                }
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out.body.collect().await.map_err(|e| S3Error::Request {
            store: self.store(),
            op,
            key: key.to_string(),
            message: e.to_string(),
            retriable: true,
        })?;
        Ok(Some((etag, body.into_bytes().to_vec())))
    }

    /// A partition's manifest and its ETag, if it has one.
    pub(crate) async fn read_manifest(
        &self,
        key: &str,
    ) -> Result<Option<(String, Manifest)>, S3Error> {
        let Some((etag, body)) = self.get("get manifest", key).await? else {
            return Ok(None);
        };
        let bad = |message: String| S3Error::BadManifest {
            store: self.store(),
            key: key.to_string(),
            message,
        };
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let found = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
        if found > MANIFEST_FORMAT {
            return Err(S3Error::FormatVersion {
                store: self.store(),
                key: key.to_string(),
                found,
                supported: MANIFEST_FORMAT,
            });
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        Ok(Some((etag, m)))
    }

    /// Replace the manifest if it is still `etag` (or create it when
    /// `etag` is `None`); the new ETag, or `Precondition` if another
    /// writer got there first.
    pub(crate) async fn write_manifest(
        &self,
        key: &str,
        etag: Option<&str>,
        m: &Manifest,
    ) -> Result<String, Failure> {
        let body = serde_json::to_vec_pretty(m)
            .map_err(|e| Failure::Other(S3Error::Encode(e.to_string())))?;
        let req = self
            .client()
            .await
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let req = match etag {
            Some(t) => req.if_match(t),
            None => req.if_none_match("*"),
        };
        match req.send().await {
            Ok(out) => Ok(out.e_tag().unwrap_or_default().to_string()),
            Err(e) => Err(self.fail("put manifest", key, e)),
        }
    }

    /// Every key under `prefix`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let client = self.client().await;
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = client
                .list_objects_v2()
                .bucket(&self.cfg.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.req("list", prefix, e))?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), S3Error> {
        match self
            .client()
            .await
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.fail("delete", key, e) {
                Failure::NotFound => Ok(()),
                f => Err(self.other("delete", key, f)),
            },
        }
    }

    /// A segment the manifest names.
    pub(crate) async fn read_segment(&self, key: &str) -> Result<Segment, S3Error> {
        let bad = |message: String| S3Error::BadManifest {
            store: self.store(),
            key: key.to_string(),
            message,
        };
        let Some((_, body)) = self.get("get segment", key).await? else {
            return Err(bad(
                "the manifest names this segment but it is missing".into()
            ));
        };
        serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
    }

    /// A whole object in one PUT.
    pub(crate) async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), S3Error> {
        self.client()
            .await
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type(self.encoder.content_type())
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.req("put", key, e))?;
        failpoint::hit(MID_WRITE);
        Ok(())
    }

    /// Start a multipart upload of `key`; its id.
    pub(crate) async fn start_upload(&self, key: &str) -> Result<String, S3Error> {
        let created = self
            .client()
            .await
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type(self.encoder.content_type())
            .send()
            .await
            .map_err(|e| self.req("create multipart upload", key, e))?;
        Ok(created.upload_id().unwrap_or_default().to_string())
    }

    /// Part `n` of upload `id`. Sending a part again replaces it.
    pub(crate) async fn put_part(
        &self,
        key: &str,
        id: &str,
        n: i32,
        body: Vec<u8>,
    ) -> Result<CompletedPart, S3Error> {
        let out = self
            .client()
            .await
            .upload_part()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.upload_failed("upload part", key, e))?;
        failpoint::hit(MID_WRITE);
        Ok(CompletedPart::builder()
            .part_number(n)
            .set_e_tag(out.e_tag().map(String::from))
            .build())
    }

    /// Make upload `id` the object `key`, from `parts`.
    pub(crate) async fn complete_upload(
        &self,
        key: &str,
        id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<(), S3Error> {
        self.client()
            .await
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.upload_failed("complete multipart upload", key, e))?;
        Ok(())
    }

    /// A part or a completion refused: a store that no longer knows the
    /// upload (a newer runner's recovery aborted it) cannot take it again.
    fn upload_failed<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match self.fail(op, key, e) {
            Failure::NotFound => S3Error::UploadGone {
                store: self.store(),
                key: key.to_string(),
            },
            f => self.other(op, key, f),
        }
    }

    /// `prepare`'s check that the store refuses a second `If-None-Match: *`
    /// write: without it, manifests cannot fence a stale runner.
    pub(crate) async fn check_conditional_writes(&self) -> Result<(), S3Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(
            "{}_idem_probe/{}-{nanos}",
            self.cfg.prefix,
            std::process::id()
        );
        let client = self.client().await;
        let put = || {
            client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        put().await.map_err(|e| self.req("put probe", &key, e))?;
        let second = put().await;
        self.delete(&key).await?;
        match second {
            Ok(_) => Err(S3Error::NoConditionalWrites {
                store: self.store(),
            }),
            Err(e) => match self.fail("put probe", &key, e) {
                Failure::Precondition => Ok(()),
                f => Err(self.other("put probe", &key, f)),
            },
        }
    }
}

/// The first line of the SDK's account of a failure, cut short: the rest
/// (each provider tried, raw responses) says nothing more to an operator.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    let line = line
        .strip_prefix("dispatch failure: other: ")
        .unwrap_or(line);
    // The Debug dump of the same error the SDK appends.
    let line = line.split(" (DispatchFailure").next().unwrap_or(line);
    line.trim_end_matches(". Attempted:")
        .chars()
        .take(200)
        .collect()
}
