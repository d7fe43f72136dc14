//! Retrying transient failures with exponential backoff and a cap.
//!
//! Only operations that can be repeated safely are retried: connecting,
//! checking the bucket, and publishing one file (HEAD then PUT of the same
//! bytes). A failure in the middle of the pull is not: the run fails and is
//! audited, and the next fire time tries again.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::error::PipelineError;

/// Runs `f` until it succeeds, fails for good, or `attempts` are used up.
/// Waits about `initial_backoff`, then twice that, ... up to `max_backoff`
/// between tries, or as long as the server's `Retry-After` asks; a
/// cancellation during a wait ends it at once.
///
/// Each wait is drawn between half and all of its step ("equal jitter"):
/// daemons on several hosts that failed together (a compute waking from
/// scale-to-zero, a pooler restart) do not all come back in the same
/// instant.
pub fn retry<T>(
    cfg: &RetryConfig,
    cancel: &CancellationToken,
    what: &str,
    mut f: impl FnMut() -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    let mut backoff = Backoff::new(cfg);
    loop {
        match f() {
            Err(e) if e.is_transient() => {
                // A server's Retry-After (B2's 503 SlowDown) is a floor:
                // coming back sooner only earns another SlowDown.
                let Some(wait) = backoff.next_wait(e.retry_after()) else {
                    return Err(e);
                };
                let secs = wait.as_secs_f64();
                tracing::warn!(attempt = backoff.failed(), retry_in_secs = format!("{secs:.2}"), error = %e, "{what} failed; retrying");
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if cancel.is_cancelled() {
                        return Err(PipelineError::Cancelled);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            other => return other,
        }
    }
}

/// The waits a [`RetryConfig`] allows between tries, for [`retry`] and for
/// async code that cannot block its thread (the bucket's abort): about
/// `initial_backoff`, then twice that, ... up to `max_backoff`, each drawn
/// between half and all of its step and at least what the server asked.
pub struct Backoff<'a> {
    cfg: &'a RetryConfig,
    step: Duration,
    failed: u32,
}

impl<'a> Backoff<'a> {
    pub fn new(cfg: &'a RetryConfig) -> Backoff<'a> {
        Backoff {
            cfg,
            step: cfg.initial_backoff,
            failed: 0,
        }
    }

    /// The tries that have failed so far.
    pub fn failed(&self) -> u32 {
        self.failed
    }

    /// A try failed: the wait before the next one, or `None` when the
    /// tries are used up.
    pub fn next_wait(&mut self, asked: Option<Duration>) -> Option<Duration> {
        self.failed += 1;
        if self.failed >= self.cfg.attempts {
            return None;
        }
        let wait = self
            .step
            .mul_f64(0.5 + 0.5 * unit_random())
            .max(asked.unwrap_or_default());
        self.step = (self.step * 2).min(self.cfg.max_backoff);
        Some(wait)
    }
}

/// A number in [0, 1), different on every call and in every process.
fn unit_random() -> f64 {
    // The low 62 bits of a v4 UUID are random (version and variant bits
    // sit above them).
    (uuid::Uuid::new_v4().as_u128() & ((1u128 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn jitter_stays_in_its_range_and_varies() {
        let draws: Vec<f64> = (0..200).map(|_| super::unit_random()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.iter().any(|d| *d < 0.25) && draws.iter().any(|d| *d > 0.75));
    }
}
