//! The S3 wire: each request publishing makes, sent once, and what its
//! answer means.
//!
//! rust-s3 signs the requests (SigV4) and owns the HTTP client; the status
//! of every answer is judged here. Its `fail-on-err` feature is off because
//! its error drops the response headers, and B2's `503 SlowDown` says in
//! `Retry-After` how long to wait. No request is retried here (rust-s3's
//! own retry is off too): `retry` decides, from a [`Failure`].

use std::time::Duration;

use s3::command::{Command, Multipart};
use s3::creds::Credentials;
use s3::request::tokio_backend::ReqwestRequest;
use s3::request::Request;
use s3::serde_types::{CompleteMultipartUploadData, Part};
use s3::{Bucket, Region};

use crate::config::StorageConfig;

/// Longest `Retry-After` honoured: a server asking for more is waited on
/// this long, then asked again, so a bad header cannot park a run for hours.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// A request that did not get the answer it wanted.
#[derive(Debug)]
pub struct Failure {
    /// What was being done, the HTTP status with the server's `<Code>` and
    /// `<Message>`, or the transport error's cause chain.
    pub message: String,
    /// Worth another try: 5xx, 429, timeouts, refused or broken connections.
    pub transient: bool,
    /// The server's `Retry-After`, when it gave one.
    pub retry_after: Option<Duration>,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
}

/// The client for the configured bucket. One is kept and shared by every
/// request while they succeed: making one loads the system's CA
/// certificates, ~0.1 s each time (measured: a run of unchanged data spent
/// 0.8 s on seven of them). A failure that may be the connection's (a
/// reset, a timeout, a 5xx) drops it ([`forget_client`]), so the next try
/// gets a new client on new connections, never the one a 500 or a reset
/// came from.
pub fn client(cfg: &StorageConfig) -> Result<Box<Bucket>, String> {
    let id = client_id(cfg);
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((kept_id, bucket)) = kept.as_ref() {
        if *kept_id == id {
            return Ok(bucket.clone());
        }
    }
    let bucket = new_client(cfg)?;
    *kept = Some((id, bucket.clone()));
    Ok(bucket)
}

/// Drops the kept client: the next request makes a new one.
pub fn forget_client() {
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).take();
}

static KEPT: std::sync::Mutex<Option<(String, Box<Bucket>)>> = std::sync::Mutex::new(None);

/// Everything a client is made of, to tell whether the kept one still fits
/// the config (a reload may change it). Held in memory only, never shown.
fn client_id(cfg: &StorageConfig) -> String {
    let secret = |s: &Option<crate::config::Secret>| s.as_ref().map(|s| s.expose().to_string());
    format!(
        "{:?}",
        (
            &cfg.endpoint,
            &cfg.region,
            &cfg.bucket,
            cfg.path_style,
            cfg.request_timeout.as_millis(),
            secret(&cfg.access_key_id),
            secret(&cfg.secret_access_key),
        )
    )
}

fn new_client(cfg: &StorageConfig) -> Result<Box<Bucket>, String> {
    s3::set_retries(0);
    let (Some(key), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) else {
        return Err("storage credentials missing: set B2_KEY_ID and B2_APPLICATION_KEY (or OUTREACH_STORAGE__ACCESS_KEY_ID / OUTREACH_STORAGE__SECRET_ACCESS_KEY)".into());
    };
    let creds = Credentials::new(Some(key.expose()), Some(secret.expose()), None, None, None)
        .map_err(|e| format!("storage credentials: {e}"))?;
    let region = Region::Custom {
        region: cfg.region.clone(),
        endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
    };
    let mut bucket = Bucket::new(&cfg.bucket, region, creds)
        .map_err(|e| format!("storage bucket `{}`: {e}", cfg.bucket))?;
    if cfg.path_style {
        bucket = bucket.with_path_style();
    }
    bucket.set_request_timeout(Some(cfg.request_timeout));
    Ok(bucket)
}

/// A 2xx answer.
struct Reply {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

/// Sends one request. `Ok(None)` is a 404 where `absent_ok` says a missing
/// object is an answer, not an error.
async fn send(
    bucket: &Bucket,
    path: &str,
    command: Command<'_>,
    doing: &str,
    absent_ok: bool,
) -> Result<Option<Reply>, Failure> {
    let transport = |e: s3::error::S3Error| Failure {
        transient: match &e {
            s3::error::S3Error::Reqwest(r) => {
                r.is_timeout() || r.is_connect() || r.is_request() || r.is_body()
            }
            s3::error::S3Error::Io(_) => true,
            _ => false,
        },
        // reqwest's Display stops at "error sending request for url"; the
        // cause (refused, reset, TLS, timeout) is further down.
        message: crate::error::with_causes(format!("{doing}: {e}"), &e),
        retry_after: None,
        status: None,
    };
    let request = ReqwestRequest::new(bucket, path, command)
        .await
        .map_err(transport)
        .inspect_err(|_| forget_client())?;
    let response = request
        .response()
        .await
        .map_err(transport)
        .inspect_err(|_| forget_client())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map_err(|e| transport(e.into()))
        .inspect_err(|_| forget_client())?
        .to_vec();
    if (200..300).contains(&status) {
        return Ok(Some(Reply { headers, body }));
    }
    if status == 404 && absent_ok {
        return Ok(None);
    }
    // A server error or SlowDown may come from a bad connection or server:
    // the next try goes on new ones. Any other answer (403, 501 for an
    // operation the server does not have) came over a sound connection,
    // and a new client would only cost its CA certificates again (measured:
    // s3s-fs's 501 to the stale-upload listing cost a run 75 ms).
    let transient = worth_a_new_try(status);
    if transient {
        forget_client();
    }
    Err(Failure {
        message: status_message(doing, status, &String::from_utf8_lossy(&body)),
        transient,
        retry_after: headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after),
        status: Some(status),
    })
}

/// An answer worth retrying, on new connections: a server error but 501
/// (the server does not have the operation), or 429 / SlowDown.
fn worth_a_new_try(status: u16) -> bool {
    ((500..600).contains(&status) && status != 501) || status == 429
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let wait = match value.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

/// The HTTP status plus the server's own `<Code>` and `<Message>`, which
/// say far more than the XML around them.
fn status_message(doing: &str, status: u16, body: &str) -> String {
    match (tag(body, "Code"), tag(body, "Message")) {
        (Some(c), Some(m)) => format!("{doing}: HTTP {status} {c}: {m}"),
        (Some(c), None) => format!("{doing}: HTTP {status} {c}"),
        _ if body.trim().is_empty() => format!("{doing}: HTTP {status}"),
        _ => format!("{doing}: HTTP {status}: {}", body.trim()),
    }
}

/// The text of the first `<name>` element in `xml`, unescaped.
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    Some(
        xml[start..start + len]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Each `<name>…</name>` block of `xml`, in order.
fn blocks<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// What a HEAD tells of an object.
pub struct Head {
    pub bytes: Option<u64>,
    /// The `sha256` metadata this program writes on every upload.
    pub sha256: Option<String>,
}

/// The object at `key`, `None` when there is none: one request, no retry.
pub async fn head(bucket: &Bucket, key: &str, doing: &str) -> Result<Option<Head>, Failure> {
    let reply = send(bucket, key, Command::HeadObject, doing, true).await?;
    Ok(reply.map(|r| {
        let header = |name: &str| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Head {
            bytes: header("content-length").and_then(|n| n.parse().ok()),
            sha256: header("x-amz-meta-sha256"),
        }
    }))
}

pub async fn get(bucket: &Bucket, key: &str, doing: &str) -> Result<Option<Vec<u8>>, Failure> {
    Ok(send(bucket, key, Command::GetObject, doing, true)
        .await?
        .map(|r| r.body))
}

/// One PUT of the whole body. The bucket's extra headers (the `x-amz-meta-*`
/// of `with_meta`) go with it.
pub async fn put(
    bucket: &Bucket,
    key: &str,
    body: &[u8],
    content_type: &str,
    doing: &str,
) -> Result<(), Failure> {
    let command = Command::PutObject {
        content: body,
        content_type,
        custom_headers: None,
        multipart: None,
    };
    send(bucket, key, command, doing, false).await.map(drop)
}

pub async fn delete(bucket: &Bucket, key: &str, doing: &str) -> Result<(), Failure> {
    send(bucket, key, Command::DeleteObject, doing, false)
        .await
        .map(drop)
}

/// Lists at most one key under `prefix`.
pub async fn list_one(bucket: &Bucket, prefix: &str, doing: &str) -> Result<(), Failure> {
    let command = Command::ListObjectsV2 {
        prefix: prefix.to_string(),
        delimiter: None,
        continuation_token: None,
        start_after: None,
        max_keys: Some(1),
    };
    send(bucket, "/", command, doing, false).await.map(drop)
}

/// The "folders" right under `prefix` (`<prefix>wv/`, ...).
pub async fn list_folders(
    bucket: &Bucket,
    prefix: &str,
    doing: &str,
) -> Result<Vec<String>, Failure> {
    list(
        bucket,
        prefix,
        Some("/"),
        ("CommonPrefixes", "Prefix"),
        doing,
    )
    .await
}

/// Every key under `prefix`.
pub async fn list_keys(bucket: &Bucket, prefix: &str, doing: &str) -> Result<Vec<String>, Failure> {
    list(bucket, prefix, None, ("Contents", "Key"), doing).await
}

/// One `field` of each `block` of every page of a listing of `prefix`.
async fn list(
    bucket: &Bucket,
    prefix: &str,
    delimiter: Option<&str>,
    (block, field): (&str, &str),
    doing: &str,
) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let command = Command::ListObjectsV2 {
            prefix: prefix.to_string(),
            delimiter: delimiter.map(str::to_string),
            continuation_token: token.take(),
            start_after: None,
            max_keys: None,
        };
        let reply = send(bucket, "/", command, doing, false)
            .await?
            .expect("not absent_ok");
        let body = String::from_utf8_lossy(&reply.body);
        out.extend(
            blocks(&body, block)
                .into_iter()
                .filter_map(|b| tag(b, field)),
        );
        token = tag(&body, "NextContinuationToken");
        if tag(&body, "IsTruncated").as_deref() != Some("true") || token.is_none() {
            return Ok(out);
        }
    }
}

/// Starts a multipart upload; returns its id.
pub async fn start_multipart(
    bucket: &Bucket,
    key: &str,
    content_type: &str,
    doing: &str,
) -> Result<String, Failure> {
    let command = Command::InitiateMultipartUpload { content_type };
    let reply = send(bucket, key, command, doing, false)
        .await?
        .expect("not absent_ok");
    tag(&String::from_utf8_lossy(&reply.body), "UploadId").ok_or_else(|| Failure {
        message: format!("{doing}: the answer has no UploadId"),
        transient: true,
        retry_after: None,
        status: Some(200),
    })
}

pub async fn put_part(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    number: u32,
    chunk: &[u8],
    content_type: &str,
    doing: &str,
) -> Result<Part, Failure> {
    let command = Command::PutObject {
        content: chunk,
        content_type,
        custom_headers: None,
        multipart: Some(Multipart::new(number, upload_id)),
    };
    let reply = send(bucket, key, command, doing, false)
        .await?
        .expect("not absent_ok");
    let etag = reply
        .headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Failure {
            message: format!("{doing}: the answer has no ETag"),
            transient: true,
            retry_after: None,
            status: Some(200),
        })?;
    Ok(Part {
        part_number: number,
        etag: etag.to_string(),
    })
}

/// Completes a multipart upload. S3 may answer 200 with an `<Error>` body
/// (the work failed after the headers were sent): that is a failure too.
pub async fn complete(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    parts: Vec<Part>,
    doing: &str,
) -> Result<(), Failure> {
    let command = Command::CompleteMultipartUpload {
        upload_id,
        data: CompleteMultipartUploadData { parts },
    };
    let reply = send(bucket, key, command, doing, false)
        .await?
        .expect("not absent_ok");
    let body = String::from_utf8_lossy(&reply.body);
    if body.contains("<Error>") {
        return Err(Failure {
            message: status_message(doing, 200, &body),
            transient: true,
            retry_after: None,
            status: Some(200),
        });
    }
    Ok(())
}

/// Aborts a multipart upload; `Ok(false)` when the server no longer knows it.
pub async fn abort(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    doing: &str,
) -> Result<bool, Failure> {
    let command = Command::AbortMultipartUpload { upload_id };
    Ok(send(bucket, key, command, doing, true).await?.is_some())
}

/// A multipart upload begun and not finished.
pub struct Upload {
    pub key: String,
    pub upload_id: String,
    pub initiated: String,
}

/// The unfinished multipart uploads under `prefix`, every page of them;
/// `None` when the server cannot list them (501: s3s-fs).
pub async fn unfinished(
    bucket: &Bucket,
    prefix: &str,
    doing: &str,
) -> Result<Option<Vec<Upload>>, Failure> {
    let mut out = Vec::new();
    let (mut key_marker, mut upload_id_marker) = (None, None);
    loop {
        let command = Command::ListMultipartUploads {
            prefix: Some(prefix),
            delimiter: None,
            key_marker: key_marker.take(),
            upload_id_marker: upload_id_marker.take(),
            max_uploads: None,
        };
        let reply = match send(bucket, "/", command, doing, false).await {
            Ok(reply) => reply.expect("not absent_ok"),
            Err(f) if f.status == Some(501) => return Ok(None),
            Err(f) => return Err(f),
        };
        let body = String::from_utf8_lossy(&reply.body);
        for upload in blocks(&body, "Upload") {
            if let (Some(key), Some(upload_id)) = (tag(upload, "Key"), tag(upload, "UploadId")) {
                out.push(Upload {
                    key,
                    upload_id,
                    initiated: tag(upload, "Initiated").unwrap_or_default(),
                });
            }
        }
        if tag(&body, "IsTruncated").as_deref() != Some("true") {
            return Ok(Some(out));
        }
        key_marker = tag(&body, "NextKeyMarker");
        upload_id_marker = tag(&body, "NextUploadIdMarker");
        if key_marker.is_none() {
            return Ok(Some(out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_errors_and_slow_down_are_tried_again_on_new_connections() {
        for status in [500, 502, 503, 504, 429] {
            assert!(worth_a_new_try(status), "{status}");
        }
        for status in [400, 403, 404, 409, 501] {
            assert!(!worth_a_new_try(status), "{status}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        assert_eq!(retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("86400"), Some(RETRY_AFTER_CAP));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let wait = retry_after(&soon).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Mon, 01 Jan 2001 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn messages_carry_the_servers_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate &amp; retry</Message></Error>";
        assert_eq!(
            status_message("uploading", 503, xml),
            "uploading: HTTP 503 SlowDown: Please reduce your request rate & retry"
        );
        assert_eq!(status_message("checking", 403, ""), "checking: HTTP 403");
    }

    #[test]
    fn listing_blocks_are_read_in_order() {
        let xml = "<R><Upload><Key>a</Key><UploadId>1</UploadId></Upload><Upload><Key>b&amp;c</Key><UploadId>2</UploadId></Upload><IsTruncated>false</IsTruncated></R>";
        let keys: Vec<_> = blocks(xml, "Upload")
            .into_iter()
            .map(|b| tag(b, "Key").unwrap())
            .collect();
        assert_eq!(keys, ["a", "b&c"]);
    }
}
