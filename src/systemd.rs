//! Telling systemd how the service is (`Type=notify`): ready once the
//! schedules are armed, a one-line status kept current, reloading and
//! stopping, and the watchdog's pings from the scheduler loop.
//!
//! Every call is a no-op outside systemd (no `NOTIFY_SOCKET`), and a
//! message that cannot be sent is logged at debug level only: the service's
//! work never depends on it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

/// `READY=1`, with the status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time systemd wants beside it; `ready`
/// ends the reload, whether the new config was taken or refused.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: no new runs"),
    ]);
}

/// How often to ping the watchdog: half of `WatchdogSec=`, or `None` when
/// systemd watches nothing. As `sd_watchdog_enabled(3)`: `WATCHDOG_USEC`
/// set, and `WATCHDOG_PID`, when set, this process.
pub fn watchdog_every() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|p| p.parse() == Ok(std::process::id()));
    (for_us && usec > 0).then(|| Duration::from_micros(usec / 2))
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// What `systemctl status` shows on its `Status:` line: each state's next
/// fire time (in its schedule's zone) and its last result.
#[derive(Debug, Default)]
pub struct Board {
    next: BTreeMap<String, (DateTime<Utc>, Tz)>,
    last: BTreeMap<String, String>,
    /// An all-states run's progress while it goes.
    progress: Option<String>,
}

impl Board {
    pub fn next_fire(&mut self, state: &str, at: DateTime<Utc>, tz: Tz) {
        let earlier = self
            .next
            .get(state)
            .is_some_and(|(t, _)| *t <= at && *t > Utc::now());
        if !earlier {
            self.next.insert(state.to_string(), (at, tz));
        }
    }

    pub fn last_result(&mut self, state: &str, result: String) {
        self.last.insert(state.to_string(), result);
    }

    /// `all states: 12 done, 45000 rows/s`, shown first; `None` once over.
    pub fn progress(&mut self, progress: Option<String>) {
        self.progress = progress;
    }

    /// Forgets the fire times (a reload arms the schedules again).
    pub fn clear_next(&mut self) {
        self.next.clear();
    }

    /// `next WV 2026-12-02 06:00 EST; last WV success 05:59 (2 uploaded)`.
    pub fn line(&self) -> String {
        let mut parts: Vec<String> = self.progress.iter().cloned().collect();
        if let Some((state, (at, tz))) = self.next.iter().min_by_key(|(_, (t, _))| *t) {
            parts.push(format!(
                "next {state} {}",
                at.with_timezone(tz).format("%Y-%m-%d %H:%M %Z")
            ));
        }
        for (state, result) in &self.last {
            parts.push(format!("last {state} {result}"));
        }
        if parts.is_empty() {
            "no schedule armed".into()
        } else {
            parts.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_the_next_fire_and_each_last_result() {
        let mut b = Board::default();
        assert_eq!(b.line(), "no schedule armed");
        let ny: Tz = "America/New_York".parse().unwrap();
        let at = DateTime::parse_from_rfc3339("2030-12-02T11:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        b.next_fire("WV", at, ny);
        b.last_result("WV", "success 05:59 (2 uploaded)".into());
        assert_eq!(
            b.line(),
            "next WV 2030-12-02 06:00 EST; last WV success 05:59 (2 uploaded)"
        );
    }
}
