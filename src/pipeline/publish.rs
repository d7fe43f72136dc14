//! Step 5: upload the exported files to the bucket, skipping unchanged ones.
//!
//! "Unchanged" is decided by content: the file's SHA-256 against the
//! `sha256` metadata of the object already at that key (a HEAD request).
//! The bucket is the source of truth, so dedup still works after the
//! workbench file is deleted, and an object deleted or overwritten by someone
//! else is uploaded again. The local manifest only records what we sent.
//!
//! Uploads are single PUTs with Content-MD5, or multipart above 8 MiB (each
//! part with its own Content-MD5); either way the object appears whole or
//! not at all. Cancellation is checked before each file: once cancelled,
//! nothing more is published.

use std::collections::BTreeMap;
use std::time::Duration;

use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, Region};
use tokio_util::sync::CancellationToken;

use crate::config::{RetryConfig, StorageConfig};
use crate::pipeline::export::ExportedFile;
use crate::pipeline::retry::retry;
use crate::pipeline::PipelineError;
use crate::state::StateCode;

pub const PIPELINE_NAME: &str = "outreach-workbench";

/// What happened to one file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishedObject {
    pub table_name: String,
    pub key: String,
    pub url: String,
    pub sha256: String,
    pub bytes: u64,
    /// `uploaded` or `skipped`.
    pub action: String,
}

pub fn object_key(cfg: &StorageConfig, state: &StateCode, file: &ExportedFile) -> String {
    let rel = ExportedFile::relative_path(state, &file.entity, &file.kind);
    if cfg.prefix.is_empty() {
        rel
    } else {
        format!("{}/{rel}", cfg.prefix)
    }
}

pub fn bucket(cfg: &StorageConfig) -> Result<Box<Bucket>, PipelineError> {
    let (Some(key), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) else {
        return Err(PipelineError::Config(
            "storage credentials missing: set B2_KEY_ID and B2_APPLICATION_KEY (or OUTREACH_STORAGE__ACCESS_KEY_ID / OUTREACH_STORAGE__SECRET_ACCESS_KEY)".into(),
        ));
    };
    let creds = Credentials::new(Some(key.expose()), Some(secret.expose()), None, None, None)
        .map_err(|e| PipelineError::Config(format!("storage credentials: {e}")))?;
    let region = Region::Custom {
        region: cfg.region.clone(),
        endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
    };
    let mut bucket = Bucket::new(&cfg.bucket, region, creds)
        .map_err(|e| PipelineError::Config(format!("storage bucket `{}`: {e}", cfg.bucket)))?;
    if cfg.path_style {
        bucket = bucket.with_path_style();
    }
    bucket.set_request_timeout(Some(Duration::from_secs(cfg.request_timeout_secs)));
    Ok(bucket)
}

/// Lists at most one key under the prefix: proves the endpoint answers,
/// the credentials work and the bucket exists, before a run does any work.
pub fn check_bucket(cfg: &StorageConfig) -> Result<(), PipelineError> {
    let bucket = bucket(cfg)?;
    let where_ = format!("s3://{}/{}", cfg.bucket, cfg.prefix);
    runtime(&where_)?
        .block_on(bucket.list_page(format!("{}/", cfg.prefix), None, None, None, Some(1)))
        .map(|_| ())
        .map_err(|e| PipelineError::Bucket {
            target: format!("{where_} at {}", cfg.endpoint),
            transient: is_transient(&e),
            message: s3_message("listing", e),
        })
}

/// Writes and deletes a small object under the prefix: proves the key may
/// write, which listing alone does not.
pub fn probe_write(cfg: &StorageConfig) -> Result<(), PipelineError> {
    let bucket = bucket(cfg)?;
    let key = format!("{}/.outreach-workbench-check", cfg.prefix);
    runtime(&key)?.block_on(async {
        bucket
            .put_object(&key, b"outreach-workbench write check\n")
            .await
            .map_err(|e| s3_error(&key, "writing a check object", e))?;
        bucket
            .delete_object(&key)
            .await
            .map_err(|e| s3_error(&key, "deleting the check object", e))?;
        Ok(())
    })
}

fn runtime(key: &str) -> Result<tokio::runtime::Runtime, PipelineError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Publish {
            key: key.to_string(),
            transient: false,
            message: format!("starting the upload runtime: {e}"),
        })
}

/// Uploads what changed, appending each file's outcome to `out` as it
/// happens so that a failure half-way still reports what was published.
/// Runs its own small tokio runtime: the pipeline is
/// synchronous (DuckDB and the postgres client block) and must not assume it
/// is called from inside one.
///
/// Each file (its HEAD and its upload) is retried on transient errors.
pub fn publish(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    state: &StateCode,
    files: &[ExportedFile],
    cancel: &CancellationToken,
    fence: &dyn Fn(&str) -> Result<(), PipelineError>,
    out: &mut Vec<PublishedObject>,
) -> Result<(), PipelineError> {
    let bucket = bucket(cfg)?;
    let rt = runtime("")?;
    for file in files {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let key = object_key(cfg, state, file);
        let action = retry(retry_cfg, cancel, &format!("publishing {key}"), || {
            let remote = rt.block_on(remote_sha256(&bucket, &key))?;
            if remote.as_deref() == Some(file.sha256.as_str()) {
                tracing::info!(key, "unchanged, not uploading");
                return Ok("skipped");
            }
            // Outside the async runtime: the fence talks to PostgreSQL
            // through the blocking client, which has a runtime of its own.
            fence(&key)?;
            rt.block_on(upload(&bucket, &key, state, file))?;
            tracing::info!(key, bytes = file.bytes, "uploaded");
            Ok("uploaded")
        })?;
        out.push(PublishedObject {
            table_name: file.table_name.clone(),
            url: format!("s3://{}/{key}", cfg.bucket),
            key,
            sha256: file.sha256.clone(),
            bytes: file.bytes,
            action: action.into(),
        });
    }
    Ok(())
}

/// The `sha256` metadata of the object at `key`, `None` when there is no
/// object (or it has no such metadata).
async fn remote_sha256(bucket: &Bucket, key: &str) -> Result<Option<String>, PipelineError> {
    match bucket.head_object(key).await {
        Ok((head, _)) => Ok(head.metadata.and_then(|m| m.get("sha256").cloned())),
        Err(S3Error::HttpFailWithBody(404, _)) => Ok(None),
        Err(e) => Err(s3_error(key, "checking", e)),
    }
}

async fn upload(
    bucket: &Bucket,
    key: &str,
    state: &StateCode,
    file: &ExportedFile,
) -> Result<(), PipelineError> {
    let mut meta = BTreeMap::new();
    meta.insert("table_name", file.table_name.clone());
    meta.insert("state", state.to_string());
    meta.insert("pipeline", PIPELINE_NAME.to_string());
    meta.insert(
        "upload_timestamp",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    meta.insert("sha256", file.sha256.clone());
    let mut req = bucket
        .put_object_stream_builder(key)
        .with_content_type("application/vnd.apache.parquet");
    for (k, v) in &meta {
        req = req
            .with_metadata(k, v)
            .map_err(|e| s3_error(key, "uploading", e))?;
    }
    let mut reader =
        tokio::fs::File::open(&file.path)
            .await
            .map_err(|e| PipelineError::Publish {
                key: key.to_string(),
                transient: false,
                message: format!("opening {}: {e}", file.path.display()),
            })?;
    req.execute_stream(&mut reader)
        .await
        .map_err(|e| s3_error(key, "uploading", e))?;
    Ok(())
}

fn s3_error(key: &str, doing: &str, e: S3Error) -> PipelineError {
    PipelineError::Publish {
        key: key.to_string(),
        transient: is_transient(&e),
        message: s3_message(doing, e),
    }
}

/// Worth another try: the server's 5xx and 429, timeouts, refused or
/// broken connections. Not: 4xx (credentials, bucket, signature).
fn is_transient(e: &S3Error) -> bool {
    match e {
        S3Error::HttpFailWithBody(status, _) => *status >= 500 || *status == 429,
        S3Error::Reqwest(r) => r.is_timeout() || r.is_connect() || r.is_request() || r.is_body(),
        S3Error::Io(_) => true,
        _ => false,
    }
}

/// Turns an S3 error into one line: HTTP status plus the server's own
/// `<Code>` and `<Message>`, which say far more than the XML blob.
fn s3_message(doing: &str, e: S3Error) -> String {
    match &e {
        S3Error::HttpFailWithBody(status, body) => {
            let tag = |t: &str| {
                let open = format!("<{t}>");
                let close = format!("</{t}>");
                body.find(&open).and_then(|i| {
                    let rest = &body[i + open.len()..];
                    rest.find(&close).map(|j| rest[..j].to_string())
                })
            };
            match (tag("Code"), tag("Message")) {
                (Some(c), Some(m)) => format!("{doing}: HTTP {status} {c}: {m}"),
                (Some(c), None) => format!("{doing}: HTTP {status} {c}"),
                _ if body.trim().is_empty() => format!("{doing}: HTTP {status}"),
                _ => format!("{doing}: HTTP {status}: {}", body.trim()),
            }
        }
        other => format!("{doing}: {other}"),
    }
}
