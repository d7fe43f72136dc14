//! `[[notify]]`: the webhooks `notify` sends to.

use serde::Deserialize;

use super::Secret;

/// One `[[notify]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The secret holding the webhook URL: a systemd credential, a file
    /// named by `<url_env>_FILE`, or this environment variable.
    pub url_env: String,
    /// Its value, looked up when the config loads.
    #[serde(skip)]
    pub url: Option<Secret>,
    /// Which outcomes: `failed`, `gated`, `abandoned`, `cancelled`,
    /// `recovered` (a success after a run that was not).
    #[serde(default = "default_on")]
    pub on: Vec<String>,
    /// `json` (the run report, for n8n or any webhook) or `slack`
    /// (`{"text": …}`).
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_on() -> Vec<String> {
    EVENTS.iter().map(|s| s.to_string()).collect()
}
fn default_format() -> String {
    "json".into()
}

pub const EVENTS: &[&str] = &[
    "failed",
    "gated",
    "abandoned",
    "cancelled",
    "recovered",
    "workbench_corrupt",
];

impl NotifyConfig {
    /// What `Config::validate` refuses, as (key, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(bad) = self.on.iter().find(|e| !EVENTS.contains(&e.as_str())) {
            return Err(("on", format!("`{bad}` is not one of {}", EVENTS.join(", "))));
        }
        if !matches!(self.format.as_str(), "json" | "slack") {
            return Err(("format", format!("`{}` is not json or slack", self.format)));
        }
        if self.url_env.trim().is_empty() {
            return Err(("url_env", "names no environment variable".into()));
        }
        Ok(())
    }
}
