//! `check`: what a run needs, verified without running one. Each problem is
//! one line; an empty list means a run can start.

use crate::bucket::publish;
use crate::config::Config;
use crate::error::{pg_message, PipelineError};
use crate::ledger::{audit, claim};
use crate::names::Entity;
use crate::quality::rules;
use crate::source::pull as source;

/// Config-only checks (the config already loaded and validated, the rules'
/// SQL parsed): secrets that a run will need. No network, for the
/// service's pre-start step.
pub fn offline(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if config.storage.access_key_id.is_none() || config.storage.secret_access_key.is_none() {
        problems.push(
            "storage credentials are not set: B2_KEY_ID and B2_APPLICATION_KEY (or OUTREACH_STORAGE__ACCESS_KEY_ID / OUTREACH_STORAGE__SECRET_ACCESS_KEY)".into(),
        );
    }
    problems
}

/// Everything: the offline checks, PostgreSQL, the source tables, the
/// audit table, and the bucket (readable and writable).
pub fn online(config: &Config) -> Vec<String> {
    let mut problems = offline(config);
    if config.source.password.is_none() {
        problems.push(
            "source.password is not set (NEON_PASSWORD); fine only if the server trusts this host"
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
