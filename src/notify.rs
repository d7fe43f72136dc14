//! Notifications: `[[notify]]` webhooks told about runs that need a
//! person (failed, gated, abandoned, cancelled) and about a state that
//! recovered, after the run's audit.
//!
//! The URL is a secret (a Slack or n8n webhook carries its token in it): it
//! is read from the environment variable the entry names and never appears
//! in a log line. Sending is retried with backoff and bounded by a timeout,
//! on a task of its own: a failing webhook is logged and never fails or
//! delays the run's result.

use std::time::Duration;

use crate::names::Entity;
use crate::pipeline::RunReport;

pub use crate::config::NotifyConfig;

/// The event a run is, for notifications: its status, or `recovered` for
/// a success whose previous run (in this daemon) was not one.
pub fn event(report: &RunReport, previous_succeeded: Option<bool>) -> Option<&'static str> {
    use crate::pipeline::RunStatus::*;
    match report.status {
        Success if report.audit_error.is_none() => {
            (previous_succeeded == Some(false)).then_some("recovered")
        }
        // Published, but not audited: a person should know.
        Success | Failed => Some("failed"),
        Gated => Some("gated"),
        Cancelled => Some("cancelled"),
        Abandoned => Some("abandoned"),
        Running | Skipped => None,
    }
}

/// The body for `format`: the report itself, or Slack's one line.
pub fn body(format: &str, event: &str, details: &serde_json::Value) -> serde_json::Value {
    if format != "slack" {
        let mut d = details.clone();
        d["event"] = event.into();
        return d;
    }
    let s = |k: &str| details[k].as_str().unwrap_or("").to_string();
    let counts = |entity: &str| {
        let c = &details[entity];
        match (c["good"].as_u64(), c["bad"].as_u64()) {
            (Some(g), Some(b)) => format!("{entity} {g} good / {b} bad"),
            _ => format!("{entity} -"),
        }
    };
    let mut text = format!(
        "outreach-workbench: {} {} ({}) — {}, {}",
        s("state"),
        event,
        s("status"),
        counts(Entity::Companies.as_str()),
        counts(Entity::People.as_str()),
    );
    if let Some(e) = details["error"].as_str() {
        text.push_str(&format!("; reason: {e}"));
    }
    match details["audit_id"].as_i64() {
        Some(id) => text.push_str(&format!("; audit id {id}")),
        None => text.push_str(&format!("; run {}", s("run_id"))),
    }
    // A gated run's page is only on this host: say where.
    if let Some(page) = details["page"].as_str() {
        text.push_str(&format!("; report page {page}"));
    }
    serde_json::json!({ "text": text })
}

/// Sends `event` to every entry that wants it, each on a task of its own.
pub fn send(entries: &[NotifyConfig], event: &str, details: serde_json::Value) {
    for (i, n) in entries.iter().enumerate() {
        if !n.on.iter().any(|e| e == event) {
            continue;
        }
        let Some(url) = n.url.as_ref().map(|u| u.expose().to_string()) else {
            tracing::warn!(notify = i, url_env = %n.url_env, "notification not sent: its URL is set nowhere (a credential, {}_FILE or the variable)", n.url_env);
            continue;
        };
        let body = body(&n.format, event, &details);
        let event = event.to_string();
        tokio::spawn(async move {
            post_with_retries(i, &url, &body, &event).await;
        });
    }
}

/// Three tries, 1 s and 3 s apart, 10 s each at most. Errors are logged
/// without the URL.
async fn post_with_retries(index: usize, url: &str, body: &serde_json::Value, event: &str) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(notify = index, error = %e.without_url(), "notification not sent");
            return;
        }
    };
    let bytes = serde_json::to_vec(body).expect("plain data");
    let mut last = String::new();
    for (attempt, wait) in [(1, 1), (2, 3), (3, 0)] {
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(notify = index, event, "notification sent");
                return;
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.without_url().to_string(),
        }
        if attempt < 3 {
            tracing::warn!(notify = index, attempt, error = %last, "notification failed; retrying");
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }
    tracing::error!(notify = index, event, error = %last, "notification not delivered");
}
