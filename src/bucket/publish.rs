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

use s3::Bucket;
use tokio_util::sync::CancellationToken;

use crate::bucket::manifest::Manifest;
use crate::bucket::s3_api::{self as wire, Failure};
use crate::config::{RetryConfig, StorageConfig};
use crate::error::PipelineError;
use crate::files::ExportedFile;
use crate::names::PublishAction;
use crate::retry::retry;
use crate::state::StateCode;

pub const PIPELINE_NAME: &str = "outreach-workbench";

/// What happened to one file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PublishedObject {
    pub table_name: String,
    pub key: String,
    pub url: String,
    pub sha256: String,
    pub bytes: u64,
    pub action: PublishAction,
}

pub fn object_key(cfg: &StorageConfig, state: &StateCode, file: &ExportedFile) -> String {
    cfg.key(&ExportedFile::relative_path(state, file.entity, file.kind))
}

pub fn bucket(cfg: &StorageConfig) -> Result<Box<Bucket>, PipelineError> {
    wire::client(cfg).map_err(PipelineError::Config)
}

/// Lists at most one key under the prefix: proves the endpoint answers,
/// the credentials work and the bucket exists, before a run does any work.
pub fn check_bucket(cfg: &StorageConfig) -> Result<(), PipelineError> {
    let bucket = bucket(cfg)?;
    let where_ = format!("s3://{}/{}", cfg.bucket, cfg.prefix);
    runtime(&where_)?
        .block_on(wire::list_one(
            &bucket,
            &format!("{}/", cfg.prefix),
            "listing",
        ))
        .map_err(|f| PipelineError::Bucket {
            target: format!("{where_} at {}", cfg.endpoint),
            transient: f.transient,
            retry_after: f.retry_after,
            message: f.message,
        })
}

/// The states that have objects under the prefix (`<prefix>/wv/…`): what
/// an all-states run counts as published before, whoever published them.
pub fn published_states(cfg: &StorageConfig) -> Result<Vec<StateCode>, PipelineError> {
    let bucket = bucket(cfg)?;
    let under = cfg.key("");
    let folders = runtime(&under)?
        .block_on(wire::list_folders(&bucket, &under, "listing the states"))
        .map_err(|f| failed(&under, f))?;
    Ok(folders
        .iter()
        .filter_map(|f| f.strip_prefix(&under)?.strip_suffix('/'))
        .filter(|s| s.len() == 2 && s.chars().all(|c| c.is_ascii_lowercase()))
        .filter_map(|s| StateCode::parse(&s.to_ascii_uppercase()).ok())
        .collect())
}

/// Writes and deletes a small object under the prefix: proves the key may
/// write, which listing alone does not.
pub fn probe_write(cfg: &StorageConfig) -> Result<(), PipelineError> {
    let bucket = bucket(cfg)?;
    let key = format!("{}/.outreach-workbench-check", cfg.prefix);
    runtime(&key)?.block_on(async {
        let body = b"outreach-workbench write check\n";
        wire::put(&bucket, &key, body, "text/plain", "writing a check object")
            .await
            .map_err(|f| failed(&key, f))?;
        wire::delete(&bucket, &key, "deleting the check object")
            .await
            .map_err(|f| failed(&key, f))
    })
}

/// The runtime every S3 request runs on, one for the process. The kept
/// client's pooled connections are tasks of the runtime that opened them:
/// a runtime of each call's own would leave them undriven between calls,
/// and a second run at once (another state) reusing one would hang until
/// it timed out. One worker drives them all the time.
fn runtime(key: &str) -> Result<&'static tokio::runtime::Runtime, PipelineError> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("s3")
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Publish {
            key: key.to_string(),
            transient: false,
            retry_after: None,
            message: format!("starting the upload runtime: {e}"),
        })?;
    Ok(RT.get_or_init(|| rt))
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
    fence: &mut dyn FnMut(&str) -> Result<(), PipelineError>,
    out: &mut Progress,
) -> Result<(), PipelineError> {
    let keyed: Vec<(ExportedFile, String)> = files
        .iter()
        .map(|f| (f.clone(), object_key(cfg, state, f)))
        .collect();
    publish_keyed(cfg, retry_cfg, state, &keyed, cancel, fence, out)
}

/// Reads the uploaded object's size and `sha256` back: an upload counts only
/// once the bucket holds what was sent. A mismatch is worth another try.
async fn verify(bucket: &Bucket, key: &str, file: &ExportedFile) -> Result<(), PipelineError> {
    let head = wire::head(bucket, key, "reading the upload back")
        .await
        .map_err(|f| failed(key, f))?;
    let size = head.as_ref().and_then(|h| h.bytes);
    let sha = head.as_ref().and_then(|h| h.sha256.as_ref());
    if size == Some(file.bytes) && sha == Some(&file.sha256) {
        return Ok(());
    }
    wire::forget_client();
    Err(PipelineError::Publish {
        key: key.to_string(),
        transient: true,
        retry_after: None,
        message: format!(
            "the bucket holds {} bytes with sha256 {} after the upload, not {} bytes with sha256 {}",
            size.map_or("?".into(), |s| s.to_string()),
            sha.map_or("(none)", |s| s.as_str()),
            file.bytes,
            file.sha256
        ),
    })
}

/// [`publish`] to the keys given (the state's files, its change sets).
pub fn publish_keyed(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    state: &StateCode,
    files: &[(ExportedFile, String)],
    cancel: &CancellationToken,
    fence: &mut dyn FnMut(&str) -> Result<(), PipelineError>,
    out: &mut Progress,
) -> Result<(), PipelineError> {
    let how = Sending {
        part_size: (cfg.part_size_mib * 1024 * 1024) as usize,
        retry: retry_cfg,
    };
    let rt = runtime("")?;
    for (file, key) in files {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let action = retry(retry_cfg, cancel, &format!("publishing {key}"), || {
            // The kept client, or after a failed try a new one: its
            // connections are new, not the ones a 500 or a reset came from.
            let bucket = bucket(cfg)?;
            let remote = rt.block_on(remote_sha256(&bucket, key))?;
            if remote.as_deref() == Some(file.sha256.as_str()) {
                tracing::info!(key, "unchanged, not uploading");
                return Ok(PublishAction::Skipped);
            }
            // Outside the async runtime: the fence talks to PostgreSQL
            // through the blocking client, which has a runtime of its own.
            fence(key)?;
            rt.block_on(upload(
                &bucket,
                key,
                state,
                file,
                &how,
                cancel,
                &mut out.unfinished,
            ))?;
            rt.block_on(verify(&bucket, key, file))?;
            tracing::info!(key, bytes = file.bytes, "uploaded");
            Ok(PublishAction::Uploaded)
        })?;
        out.objects.push(PublishedObject {
            table_name: file.table_name.clone(),
            url: format!("s3://{}/{key}", cfg.bucket),
            key: key.clone(),
            sha256: file.sha256.clone(),
            bytes: file.bytes,
            action,
        });
    }
    Ok(())
}

/// Every key under `prefix`.
pub fn list_keys(cfg: &StorageConfig, prefix: &str) -> Result<Vec<String>, PipelineError> {
    let bucket = bucket(cfg)?;
    runtime(prefix)?
        .block_on(wire::list_keys(&bucket, prefix, "listing"))
        .map_err(|f| failed(prefix, f))
}

/// Deletes `keys`, each tried on its own; the keys it could not delete.
pub fn delete_all(cfg: &StorageConfig, keys: &[String]) -> Vec<String> {
    let Ok(rt) = runtime("") else {
        return keys.to_vec();
    };
    let Ok(bucket) = bucket(cfg) else {
        return keys.to_vec();
    };
    keys.iter()
        .filter(|key| rt.block_on(wire::delete(&bucket, key, "deleting")).is_err())
        .cloned()
        .collect()
}

/// Writes the object at `key` to `dest` when its bytes hash to `sha256`;
/// `Ok(false)` when the bucket holds no such object or other bytes.
pub fn download_verified(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    key: &str,
    sha256: &str,
    dest: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<bool, PipelineError> {
    use sha2::{Digest, Sha256};
    let rt = runtime(key)?;
    let body = retry(retry_cfg, cancel, &format!("reading {key}"), || {
        rt.block_on(wire::get(
            &*bucket(cfg)?,
            key,
            "reading the previous snapshot",
        ))
        .map_err(|f| failed(key, f))
    })?;
    let Some(body) = body else {
        return Ok(false);
    };
    if hex::encode(Sha256::digest(&body)) != sha256 {
        return Ok(false);
    }
    std::fs::write(dest, &body).map_err(|e| PipelineError::Publish {
        key: key.to_string(),
        transient: false,
        retry_after: None,
        message: format!("could not write {}: {e}", dest.display()),
    })?;
    Ok(true)
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
        // A new client after a failed try, as in `publish`.
        rt.block_on(wire::get(&*bucket(cfg)?, key, "reading the manifest"))
            .map_err(|f| failed(key, f))
    })?;
    Ok(body.and_then(|b| match serde_json::from_slice(&b) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(key, error = %e, "the manifest in the bucket cannot be read; this run writes a new one");
            None
        }
    }))
}

/// Puts a run's report page (a small HTML file) at `key`, after the
/// manifest; with the `sha256` metadata of every object. Not stopped by a
/// shutdown: it is one small request, and the state's data is up already.
pub fn write_page(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    key: &str,
    path: &std::path::Path,
) -> Result<(), PipelineError> {
    use sha2::{Digest, Sha256};
    let body = std::fs::read(path).map_err(|e| PipelineError::Publish {
        key: key.to_string(),
        transient: false,
        retry_after: None,
        message: format!("could not read {}: {e}", path.display()),
    })?;
    let sha256 = hex::encode(Sha256::digest(&body));
    let rt = runtime(key)?;
    let never = CancellationToken::new();
    retry(retry_cfg, &never, &format!("writing {key}"), || {
        let bucket = with_metadata(
            &*bucket(cfg)?,
            &[
                ("pipeline", PIPELINE_NAME.to_string()),
                ("sha256", sha256.clone()),
            ],
        )?;
        rt.block_on(wire::put(
            &bucket,
            key,
            &body,
            "text/html; charset=utf-8",
            "writing the report page",
        ))
        .map_err(|f| failed(key, f))
    })
}

/// Writes the manifest (after the files it names), and reads its size back.
pub fn write_manifest(
    cfg: &StorageConfig,
    retry_cfg: &RetryConfig,
    key: &str,
    manifest: &Manifest,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    use sha2::{Digest, Sha256};
    let rt = runtime(key)?;
    let body = serde_json::to_vec_pretty(manifest).expect("plain data");
    // The same `sha256` metadata as every file, so that a reader checks the
    // manifest the way it checks the files.
    let sha256 = hex::encode(Sha256::digest(&body));
    retry(retry_cfg, cancel, &format!("writing {key}"), || {
        let bucket = with_metadata(
            &*bucket(cfg)?,
            &[
                ("state", manifest.state.clone()),
                ("pipeline", PIPELINE_NAME.to_string()),
                ("sha256", sha256.clone()),
            ],
        )?;
        rt.block_on(async {
            wire::put(
                &bucket,
                key,
                &body,
                "application/json",
                "writing the manifest",
            )
            .await
            .map_err(|f| failed(key, f))?;
            let head = wire::head(&bucket, key, "reading the manifest back")
                .await
                .map_err(|f| failed(key, f))?;
            let (bytes, sha) = head.map_or((None, None), |h| (h.bytes, h.sha256));
            if bytes == Some(body.len() as u64) && sha.as_deref() == Some(sha256.as_str()) {
                return Ok(());
            }
            Err(PipelineError::Publish {
                key: key.to_string(),
                transient: true,
                retry_after: None,
                message: format!(
                    "the bucket holds {bytes:?} bytes with sha256 {sha:?} after writing {} bytes with sha256 {sha256}",
                    body.len()
                ),
            })
        })
    })?;
    tracing::info!(key, files = manifest.files.len(), "manifest written");
    Ok(())
}

/// The `sha256` metadata of the object at `key`, `None` when there is no
/// object (or it has no such metadata).
async fn remote_sha256(bucket: &Bucket, key: &str) -> Result<Option<String>, PipelineError> {
    let head = wire::head(bucket, key, "checking")
        .await
        .map_err(|f| failed(key, f))?;
    Ok(head.and_then(|h| h.sha256))
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

/// How [`upload`] sends a file: parts of `part_size` bytes above that
/// size; the abort of a failed multipart upload tried again per `retry`.
struct Sending<'a> {
    part_size: usize,
    retry: &'a RetryConfig,
}

/// Uploads one file: a single PUT below `part_size`, else a multipart
/// upload of our own, so that its id is known and a failed or cancelled
/// one is aborted (B2 keeps, and bills, unfinished parts). An abort that
/// fails too is left in `unfinished` for the next run.
async fn upload(
    bucket: &Bucket,
    key: &str,
    state: &StateCode,
    file: &ExportedFile,
    how: &Sending<'_>,
    cancel: &CancellationToken,
    unfinished: &mut Vec<Unfinished>,
) -> Result<(), PipelineError> {
    use std::io::Read;
    let part_size = how.part_size;
    let with_meta = with_metadata(
        bucket,
        &[
            ("table_name", file.table_name.clone()),
            ("state", state.to_string()),
            ("pipeline", PIPELINE_NAME.to_string()),
            (
                "upload_timestamp",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            ("sha256", file.sha256.clone()),
        ],
    )?;
    let open_err = |e: std::io::Error| PipelineError::Publish {
        key: key.to_string(),
        transient: false,
        retry_after: None,
        message: format!("reading {}: {e}", file.path.display()),
    };
    let mut reader = std::fs::File::open(&file.path).map_err(open_err)?;
    if file.bytes < part_size as u64 {
        let mut body = Vec::with_capacity(file.bytes as usize);
        reader.read_to_end(&mut body).map_err(open_err)?;
        return wire::put(&with_meta, key, &body, CONTENT_TYPE, "uploading")
            .await
            .map_err(|f| failed(key, f));
    }
    let upload_id = wire::start_multipart(
        &with_meta,
        key,
        CONTENT_TYPE,
        "starting the multipart upload",
    )
    .await
    .map_err(|f| failed(key, f))?;
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
            let doing = format!("uploading part {number}");
            let part = wire::put_part(
                bucket,
                key,
                &upload_id,
                number,
                &chunk,
                CONTENT_TYPE,
                &doing,
            )
            .await
            .map_err(|f| failed(key, f))?;
            parts.push(part);
        }
        wire::complete(
            bucket,
            key,
            &upload_id,
            parts,
            "completing the multipart upload",
        )
        .await
        .map_err(|f| failed(key, f))
    }
    .await;
    if sent.is_err() {
        match abort_retrying(bucket, key, &upload_id, how.retry).await {
            Ok(_) => tracing::info!(key, "aborted the unfinished multipart upload"),
            Err(f) => {
                tracing::warn!(key, upload_id, error = %f.message, "could not abort the unfinished multipart upload; the next run aborts it");
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
        match rt.block_on(wire::abort(&bucket, &u.key, &u.upload_id, "aborting")) {
            Ok(_) => {
                tracing::info!(key = %u.key, upload_id = %u.upload_id, "aborted a multipart upload an earlier run left unfinished");
                gone.push(u.clone());
            }
            Err(f) => {
                tracing::warn!(key = %u.key, error = %f.message, "could not abort an earlier unfinished multipart upload; trying again next run")
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
    let listing = wire::unfinished(&bucket, prefix, "listing unfinished multipart uploads");
    let Some(listed) = rt.block_on(listing).map_err(|f| failed(prefix, f))? else {
        tracing::debug!("this S3 server cannot list multipart uploads");
        return Ok(Vec::new());
    };
    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    let mut out = Vec::new();
    for u in &listed {
        let started = chrono::DateTime::parse_from_rfc3339(&u.initiated)
            .map(|t| t.with_timezone(&chrono::Utc))
            .ok();
        if started.is_none_or(|t| t > day_ago) {
            continue;
        }
        rt.block_on(wire::abort(
            &bucket,
            &u.key,
            &u.upload_id,
            "aborting a stale multipart upload",
        ))
        .map_err(|f| failed(&u.key, f))?;
        let line = format!(
            "aborted the multipart upload of {} started {} and never finished",
            u.key, u.initiated
        );
        tracing::warn!("{line}");
        out.push(line);
    }
    Ok(out)
}

/// A failed request as the run's error; the kept client goes with it, so
/// that a retry starts on new connections.
/// Aborts a multipart upload, tried again while the failure is transient
/// (the network cut that failed the upload is often still there), with the
/// same backoff as every request: an upload left open waits, billed, for
/// the next run.
async fn abort_retrying(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    cfg: &RetryConfig,
) -> Result<(), Failure> {
    let mut backoff = crate::retry::Backoff::new(cfg);
    loop {
        match wire::abort(bucket, key, upload_id, "aborting").await {
            Ok(_) => return Ok(()),
            Err(f) if f.transient => {
                let Some(wait) = backoff.next_wait(f.retry_after) else {
                    return Err(f);
                };
                tracing::warn!(key, attempt = backoff.failed(), error = %f.message, "aborting the multipart upload failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(f) => return Err(f),
        }
    }
}

fn failed(key: &str, f: Failure) -> PipelineError {
    wire::forget_client();
    PipelineError::Publish {
        key: key.to_string(),
        message: f.message,
        transient: f.transient,
        retry_after: f.retry_after,
    }
}

/// `bucket` sending `x-amz-meta-<name>` headers with each request: the
/// metadata a PUT stores with the object (B2 keeps it as file info).
fn with_metadata(bucket: &Bucket, pairs: &[(&str, String)]) -> Result<Bucket, PipelineError> {
    let mut meta = http::HeaderMap::new();
    for (k, v) in pairs {
        let name = format!("x-amz-meta-{k}");
        meta.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("plain ASCII"),
            v.parse().expect("plain ASCII"),
        );
    }
    bucket
        .with_extra_headers(meta)
        .map_err(|e| PipelineError::Config(format!("S3 metadata headers: {e}")))
}
