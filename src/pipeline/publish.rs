//! Step 5: upload the exported files to the bucket, skipping unchanged ones.
//!
//! "Unchanged" is decided by content: the file's SHA-256 against the
//! `sha256` metadata of the object already at that key (a HEAD request).
//! The bucket is the source of truth, so dedup still works after the
//! workbench file is deleted, and an object deleted or overwritten by someone
//! else is uploaded again. The local manifest only records what we sent.
//!
//! Uploads are single PUTs with Content-MD5, or multipart from
//! `part_size_mib` on (each part with its own Content-MD5); either way the
//! object appears whole or not at all, and a multipart upload that fails is
//! aborted. Each upload is read back (a HEAD: size and `sha256`) before
//! it counts. After the files, the state's manifest is written (see
//! `manifest`). Cancellation is checked before each file: once cancelled,
//! nothing more is published.
//!
//! Retries are ours alone (`[retry]`, with jitter): rust-s3's own retry of
//! "safe" requests is turned off, so that no retry loop runs inside another.

use std::time::Duration;

use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, Region};
use tokio_util::sync::CancellationToken;

use crate::config::{RetryConfig, StorageConfig};
use crate::pipeline::export::ExportedFile;
use crate::pipeline::manifest::Manifest;
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
    cfg.key(&ExportedFile::relative_path(
        state,
        &file.entity,
        &file.kind,
    ))
}

pub fn bucket(cfg: &StorageConfig) -> Result<Box<Bucket>, PipelineError> {
    s3::set_retries(0);
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
    out: &mut Progress,
) -> Result<(), PipelineError> {
    let part_size = (cfg.part_size_mib * 1024 * 1024) as usize;
    let rt = runtime("")?;
    for file in files {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let key = object_key(cfg, state, file);
        let action = retry(retry_cfg, cancel, &format!("publishing {key}"), || {
            // A client of its own for each try: its connections are new,
            // not the pooled ones a 500 or a reset came from.
            let bucket = bucket(cfg)?;
            let remote = rt.block_on(remote_sha256(&bucket, &key))?;
            if remote.as_deref() == Some(file.sha256.as_str()) {
                tracing::info!(key, "unchanged, not uploading");
                return Ok("skipped");
            }
            // Outside the async runtime: the fence talks to PostgreSQL
            // through the blocking client, which has a runtime of its own.
            fence(&key)?;
            rt.block_on(upload(
                &bucket,
                &key,
                state,
                file,
                part_size,
                cancel,
                &mut out.unfinished,
            ))?;
            rt.block_on(verify(&bucket, &key, file))?;
            tracing::info!(key, bytes = file.bytes, "uploaded");
            Ok("uploaded")
        })?;
        out.objects.push(PublishedObject {
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

/// Reads the uploaded object's size and `sha256` back: an upload counts only
/// once the bucket holds what was sent. A mismatch is worth another try.
async fn verify(bucket: &Bucket, key: &str, file: &ExportedFile) -> Result<(), PipelineError> {
    let (head, _) = bucket
        .head_object(key)
        .await
        .map_err(|e| s3_error(key, "reading the upload back", e))?;
    let size = head.content_length.map(|n| n as u64);
    let sha = head.metadata.as_ref().and_then(|m| m.get("sha256"));
    if size == Some(file.bytes) && sha == Some(&file.sha256) {
        return Ok(());
    }
    Err(PipelineError::Publish {
        key: key.to_string(),
        transient: true,
        message: format!(
            "the bucket holds {} bytes with sha256 {} after the upload, not {} bytes with sha256 {}",
            size.map_or("?".into(), |s| s.to_string()),
            sha.map_or("(none)", |s| s.as_str()),
            file.bytes,
            file.sha256
        ),
    })
}

/// The state's manifest in the bucket, `None` when there is none (or it
/// cannot be parsed: it is then rewritten by this run).
pub fn read_manifest(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    key: &str,
    cancel: &CancellationToken,
) -> Result<Option<Manifest>, PipelineError> {
    let rt = runtime(key)?;
    let body = retry(retry_cfg, cancel, &format!("reading {key}"), || {
        // A new client for each try, as in `publish`.
        match rt.block_on(bucket(cfg)?.get_object(key)) {
            Ok(r) => Ok(Some(r.to_vec())),
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(None),
            Err(e) => Err(s3_error(key, "reading the manifest", e)),
        }
    })?;
    Ok(body.and_then(|b| match serde_json::from_slice(&b) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(key, error = %e, "the manifest in the bucket cannot be read; this run writes a new one");
            None
        }
    }))
}

/// Writes the manifest (after the files it names), and reads its size back.
pub fn write_manifest(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    key: &str,
    manifest: &Manifest,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    let rt = runtime(key)?;
    let body = serde_json::to_vec_pretty(manifest).expect("plain data");
    retry(retry_cfg, cancel, &format!("writing {key}"), || {
        let bucket = bucket(cfg)?;
        rt.block_on(async {
            bucket
                .put_object_with_content_type(key, &body, "application/json")
                .await
                .map_err(|e| s3_error(key, "writing the manifest", e))?;
            let (head, _) = bucket
                .head_object(key)
                .await
                .map_err(|e| s3_error(key, "reading the manifest back", e))?;
            match head.content_length {
                Some(n) if n as usize == body.len() => Ok(()),
                other => Err(PipelineError::Publish {
                    key: key.to_string(),
                    transient: true,
                    message: format!(
                        "the bucket holds {other:?} bytes after writing {} bytes",
                        body.len()
                    ),
                }),
            }
        })
    })?;
    tracing::info!(key, files = manifest.files.len(), "manifest written");
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

/// What publishing did, as it goes: kept when it fails half-way.
#[derive(Debug, Default)]
pub struct Progress {
    pub objects: Vec<PublishedObject>,
    pub unfinished: Vec<Unfinished>,
}

/// A multipart upload this run could not abort (the network was gone):
/// kept in the workbench and aborted before the next run uploads.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    pub key: String,
    pub upload_id: String,
}

const CONTENT_TYPE: &str = "application/vnd.apache.parquet";

/// Uploads one file: a single PUT below `part_size`, else a multipart
/// upload of our own, so that its id is known and a failed or cancelled
/// one is aborted (B2 keeps, and bills, unfinished parts). An abort that
/// fails too is left in `unfinished` for the next run.
async fn upload(
    bucket: &Bucket,
    key: &str,
    state: &StateCode,
    file: &ExportedFile,
    part_size: usize,
    cancel: &CancellationToken,
    unfinished: &mut Vec<Unfinished>,
) -> Result<(), PipelineError> {
    use std::io::Read;
    let mut meta = http::HeaderMap::new();
    for (k, v) in [
        ("table_name", file.table_name.clone()),
        ("state", state.to_string()),
        ("pipeline", PIPELINE_NAME.to_string()),
        (
            "upload_timestamp",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        ("sha256", file.sha256.clone()),
    ] {
        let name = format!("x-amz-meta-{k}");
        meta.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("plain ASCII"),
            v.parse().expect("plain ASCII"),
        );
    }
    let with_meta = bucket
        .with_extra_headers(meta)
        .map_err(|e| s3_error(key, "uploading", e))?;
    let open_err = |e: std::io::Error| PipelineError::Publish {
        key: key.to_string(),
        transient: false,
        message: format!("reading {}: {e}", file.path.display()),
    };
    let mut reader = std::fs::File::open(&file.path).map_err(open_err)?;
    if file.bytes < part_size as u64 {
        let mut body = Vec::with_capacity(file.bytes as usize);
        reader.read_to_end(&mut body).map_err(open_err)?;
        with_meta
            .put_object_with_content_type(key, &body, CONTENT_TYPE)
            .await
            .map_err(|e| s3_error(key, "uploading", e))?;
        return Ok(());
    }
    let upload_id = with_meta
        .initiate_multipart_upload(key, CONTENT_TYPE)
        .await
        .map_err(|e| s3_error(key, "starting the multipart upload", e))?
        .upload_id;
    let sent = async {
        let mut parts = Vec::new();
        loop {
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
            let mut chunk = Vec::with_capacity(part_size);
            (&mut reader)
                .take(part_size as u64)
                .read_to_end(&mut chunk)
                .map_err(open_err)?;
            if chunk.is_empty() {
                break;
            }
            let number = parts.len() as u32 + 1;
            let part = bucket
                .put_multipart_chunk(chunk, key, number, &upload_id, CONTENT_TYPE)
                .await
                .map_err(|e| s3_error(key, &format!("uploading part {number}"), e))?;
            parts.push(part);
        }
        bucket
            .complete_multipart_upload(key, &upload_id, parts)
            .await
            .map_err(|e| s3_error(key, "completing the multipart upload", e))
            .map(|_| ())
    }
    .await;
    if sent.is_err() {
        match bucket.abort_upload(key, &upload_id).await {
            Ok(()) => tracing::info!(key, "aborted the unfinished multipart upload"),
            Err(e) => {
                tracing::warn!(key, upload_id, error = %s3_message("aborting", e), "could not abort the unfinished multipart upload; the next run aborts it");
                unfinished.push(Unfinished {
                    key: key.to_string(),
                    upload_id: upload_id.clone(),
                });
            }
        }
    }
    sent
}

/// Aborts multipart uploads earlier runs could not, returning those now
/// gone (aborted, or no longer known to the server).
pub fn abort_leftovers(cfg: &StorageConfig, leftovers: &[Unfinished]) -> Vec<Unfinished> {
    let Ok(bucket) = bucket(cfg) else {
        return Vec::new();
    };
    let Ok(rt) = runtime("") else {
        return Vec::new();
    };
    let mut gone = Vec::new();
    for u in leftovers {
        match rt.block_on(bucket.abort_upload(&u.key, &u.upload_id)) {
            Ok(()) | Err(S3Error::HttpFailWithBody(404, _)) => {
                tracing::info!(key = %u.key, upload_id = %u.upload_id, "aborted a multipart upload an earlier run left unfinished");
                gone.push(u.clone());
            }
            Err(e) => {
                tracing::warn!(key = %u.key, error = %s3_message("aborting", e), "could not abort an earlier unfinished multipart upload; trying again next run")
            }
        }
    }
    gone
}

/// Unfinished multipart uploads under `prefix` started more than a day ago
/// (by anyone: a crashed run, another tool) are aborted; returns a line
/// for each. A server that cannot list them (s3s-fs) is passed over.
pub fn sweep_stale(cfg: &StorageConfig, prefix: &str) -> Result<Vec<String>, PipelineError> {
    let bucket = bucket(cfg)?;
    let rt = runtime(prefix)?;
    let listed = match rt.block_on(bucket.list_multiparts_uploads(Some(prefix), None)) {
        Ok(l) => l,
        Err(S3Error::HttpFailWithBody(501, _)) => {
            tracing::debug!("this S3 server cannot list multipart uploads");
            return Ok(Vec::new());
        }
        Err(e) => return Err(s3_error(prefix, "listing unfinished multipart uploads", e)),
    };
    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    let mut out = Vec::new();
    for u in listed.iter().flat_map(|page| &page.uploads) {
        let started = chrono::DateTime::parse_from_rfc3339(&u.initiated)
            .map(|t| t.with_timezone(&chrono::Utc))
            .ok();
        if started.is_none_or(|t| t > day_ago) {
            continue;
        }
        rt.block_on(bucket.abort_upload(&u.key, &u.id))
            .map_err(|e| s3_error(&u.key, "aborting a stale multipart upload", e))?;
        let line = format!(
            "aborted the multipart upload of {} started {} and never finished",
            u.key, u.initiated
        );
        tracing::warn!("{line}");
        out.push(line);
    }
    Ok(out)
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
        other => {
            // reqwest's Display stops at "error sending request for url";
            // the cause (refused, reset, TLS, timeout) is further down.
            crate::pipeline::with_causes(format!("{doing}: {other}"), other)
        }
    }
}
