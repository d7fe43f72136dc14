//! Retrying transient failures with exponential backoff and a cap.
//!
//! Only operations that can be repeated safely are retried: connecting,
//! checking the bucket, and publishing one file (HEAD then PUT of the same
//! bytes). A failure in the middle of the pull is not: the run fails and is
//! audited, and the next fire time tries again.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::pipeline::PipelineError;

/// Runs `f` until it succeeds, fails for good, or `attempts` are used up.
/// Waits `initial_backoff`, then twice that, ... up to `max_backoff`
/// between tries; a cancellation during a wait ends it at once.
pub fn retry<T>(
    cfg: &RetryConfig,
    cancel: &CancellationToken,
    what: &str,
    mut f: impl FnMut() -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    let mut delay = cfg.initial_backoff_secs;
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < cfg.attempts => {
                tracing::warn!(attempt, retry_in_secs = delay, error = %e, "{what} failed; retrying");
                let until = Instant::now() + Duration::from_secs_f64(delay);
                while Instant::now() < until {
                    if cancel.is_cancelled() {
                        return Err(PipelineError::Cancelled);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                delay = (delay * 2.0).min(cfg.max_backoff_secs);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A connection failure that is about the network, not about us: refused,
/// reset, timed out. Authentication and TLS verification errors are not.
pub fn is_transient_pg(e: &postgres::Error) -> bool {
    if e.as_db_error().is_some() {
        return false;
    }
    if e.to_string().contains("timeout") {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | BrokenPipe
                    | UnexpectedEof
                    | NotConnected
            );
        }
        cause = c.source();
    }
    false
}
