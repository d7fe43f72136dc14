//! `check`: what a run needs, verified without running one. Each problem is
//! one line; an empty list means a run can start.

use crate::bucket::publish;
use crate::config::secrets::{self, Origin};
use crate::config::Config;
use crate::error::{pg_message, PipelineError};
use crate::ledger::{audit, claim};
use crate::names::Entity;
use crate::quality::rules;
use crate::source::pull as source;

/// Config-only checks (the config already loaded and validated, the rules'
/// SQL parsed): secrets that a run will need, and secrets where they must
/// not be. No network.
pub fn offline(config: &Config) -> Vec<String> {
    let mut problems = missing_secrets(config);
    for name in secrets_in_file(config) {
        problems.push(format!(
            "{name} is written in the config file, which every admin and backup reads: move it to /etc/outreach-workbench/{}/{name} (root's, mode 0600; docs/service.md), or {name}_FILE",
            secrets::FOLDER
        ));
    }
    if config.storage.bucket == crate::config::PLACEHOLDER_BUCKET {
        problems.push(placeholder_bucket());
    }
    if let Some(textfile) = &config.metrics.textfile {
        problems.extend(textfile_writable(textfile));
    }
    problems
}

/// The metrics textfile is written next to itself and renamed over: its
/// folder must take a new file from this process (under the unit, which
/// paths are writable is the unit's `ReadWritePaths=`).
fn textfile_writable(textfile: &std::path::Path) -> Option<String> {
    let dir = textfile.parent().filter(|d| !d.as_os_str().is_empty())?;
    let probe = dir.join(format!(".outreach-workbench-check.{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(format!(
            "[metrics] textfile = {:?}: cannot write in {}: {e} (give the service's group write access to that folder, or serve the metrics with [metrics] listen; docs/metrics.md)",
            textfile.display().to_string(),
            dir.display()
        )),
    }
}

/// The shipped config's bucket name is not one.
pub fn placeholder_bucket() -> String {
    format!(
        "storage.bucket is still the shipped placeholder {:?}: set your bucket's name in the config (or B2_BUCKET)",
        crate::config::PLACEHOLDER_BUCKET
    )
}

/// Secrets every run needs that no place has: the daemon refuses to start
/// without them (a restart cannot fill them in).
pub fn missing_secrets(config: &Config) -> Vec<String> {
    let st = &config.storage;
    match st.access_key_id.is_none() || st.secret_access_key.is_none() {
        true => vec![format!(
            "storage credentials are not set: B2_KEY_ID and B2_APPLICATION_KEY, each a file in /etc/outreach-workbench/{}/ (the service loads them as systemd credentials), a file named by B2_KEY_ID_FILE / B2_APPLICATION_KEY_FILE, or the variable",
            secrets::FOLDER
        )],
        false => Vec::new(),
    }
}

/// The secrets the config file itself holds, by variable name.
pub fn secrets_in_file(config: &Config) -> Vec<&str> {
    config
        .secret_origins
        .iter()
        .filter(|(_, origin)| *origin == Origin::ConfigFile)
        .map(|(name, _)| name.as_str())
        .collect()
}

/// Where each secret came from, a line each; never a value.
pub fn secret_sources(config: &Config) -> Vec<String> {
    config
        .secret_origins
        .iter()
        .map(|(name, origin)| format!("{name} from {origin}"))
        .collect()
}

/// Everything: the offline checks, PostgreSQL, the source tables, the
/// audit table, and the bucket (readable and writable).
pub fn online(config: &Config) -> Vec<String> {
    let mut problems = offline(config);
    if config.source.password.is_none() {
        problems.push(
            "source.password is not set (NEON_PASSWORD: a credential, NEON_PASSWORD_FILE or the variable); fine only if the server trusts this host"
                .into(),
        );
    }
    match crate::source::connect::connect(&config.source) {
        Err(e) => problems.push(e.to_string()),
        Ok(mut client) => {
            let s = &config.source;
            for entity in Entity::ALL {
                let (table, rules) = (s.table(entity), config.rules.of(entity));
                // One description of the table serves both checks.
                let columns = match source::describe(&mut client, table) {
                    Ok(columns) => columns,
                    Err(PipelineError::Source { source, .. }) => {
                        problems.push(format!("source table {table}: {}", pg_message(&source)));
                        continue;
                    }
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                };
                let name = table.to_string();
                problems.extend(source::missing_columns(s, entity, &name, &columns));
                let checked =
                    rules::Checker::with(|c| c.columns(entity.as_str(), &name, &columns, rules));
                if let Err(e) = checked {
                    problems.push(e.to_string());
                }
            }
            let table = config.audit_table();
            match audit::inspect(&mut client, &table) {
                Err(e) => problems.push(e.to_string()),
                Ok(Some(p)) if !p.is_empty() => problems.push(format!(
                    "audit table {table} has another layout ({}); set [audit] table to another schema.table",
                    p.join(", ")
                )),
                Ok(_) => {}
            }
        }
    }
    if let Err(e) =
        publish::check_bucket(&config.storage).and_then(|_| publish::probe_write(&config.storage))
    {
        problems.push(e.to_string());
    }
    problems
}

/// Multipart uploads under the prefix unfinished for more than a day are
/// aborted; a line for each, or for why they could not be looked at.
pub fn stale_uploads(config: &Config) -> Vec<String> {
    publish::sweep_stale(&config.storage, &config.storage.key(""))
        .unwrap_or_else(|e| vec![e.to_string()])
}

/// The leases held now (who runs which state), for `check` to show: a
/// line each; empty before any run made the table, or when it cannot be read.
pub fn leases(config: &Config) -> Vec<String> {
    let mut session =
        crate::source::connect::Session::lazy(&config.source, &config.retry.single_try());
    let never = tokio_util::sync::CancellationToken::new();
    match claim::live_leases(&mut session, config, &never) {
        Ok(lines) => lines,
        Err(e) if e.to_string().contains("does not exist") => Vec::new(),
        Err(e) => vec![format!("cannot read the leases: {e}")],
    }
}
