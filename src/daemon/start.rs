//! What the daemon does once, before its first fire: check the rules
//! against the source, account for runs a killed process left behind, and
//! find the fire times missed while it was down.

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{release_run_memory, Refused, Shared};
use crate::config::Config;
use crate::pipeline::{self, RunOptions};
use crate::state::StateCode;

/// The start-up's checks, on a blocking thread (DuckDB, the postgres
/// client); the catch-up runs due. Errors only when the daemon must not
/// start ([`Refused`]).
pub(super) async fn before_first_fire(
    config: &Config,
    shared: &Shared,
) -> anyhow::Result<Vec<(Option<StateCode>, RunOptions)>> {
    let cfg = config.clone();
    let metrics = shared.metrics.clone();
    let now = shared.clock.now();
    tokio::task::spawn_blocking(move || {
        check_rules_at_start(&cfg)?;
        // One opening of the workbench for every look at the run history;
        // closed again before the first run so analysts can open it.
        let wb = crate::workbench::Workbench::open(&cfg.workbench);
        let missed = match wb {
            Ok(wb) => {
                audit_abandoned_runs(&cfg, &wb);
                // The last run and success per state survive a restart:
                // an alert on their age must not go blind when the
                // daemon starts again.
                match wb.last_finished() {
                    Ok(states) => {
                        for (state, run, success) in states {
                            metrics.seed(&state, run, success);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read the last runs for the metrics"),
                }
                missed_runs(&cfg, &wb, now)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the run history (abandoned runs, catch_up)");
                Vec::new()
            }
        };
        release_run_memory();
        anyhow::Ok(missed)
    })
    .await?
}

/// Rules naming a column the source does not have would fail every run:
/// refuse to start, naming the rule. A database that cannot be reached now
/// is no reason not to start; each run checks the rules again before it
/// pulls.
fn check_rules_at_start(config: &Config) -> anyhow::Result<()> {
    let checked = crate::source::connect::connect(&config.source)
        .and_then(|mut client| crate::quality::rules::check_against_source(&mut client, config));
    match checked {
        Ok(()) => Ok(()),
        Err(e @ pipeline::PipelineError::Rule(_)) => {
            Err(Refused(format!("{e}; fix [rules] in the config")).into())
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check the rules against the source now; each run checks them before pulling");
            Ok(())
        }
    }
}

/// Runs a previous process left `running` (it died mid-run) are marked
/// abandoned in the workbench, their audit records pending; then every
/// pending record (these, and runs that could not reach PostgreSQL) is
/// written if PostgreSQL answers now. No run goes missing without a record.
/// Problems here are logged, never fatal: the schedules matter more, and
/// each run that reaches PostgreSQL sends what is still pending.
fn audit_abandoned_runs(config: &Config, wb: &crate::workbench::Workbench) {
    // One try: a database that is down now must not hold up the start.
    let mut session =
        crate::source::connect::Session::lazy(&config.source, &config.retry.single_try());
    let never = CancellationToken::new();
    // Found and logged when the workbench was opened.
    let runs = wb.take_abandoned();
    // Told with the same details the audit gets (the pending record the
    // open made of each real run).
    if !runs.is_empty() && !config.notify.is_empty() {
        for p in wb.pending_audits().unwrap_or_default() {
            if runs.iter().any(|r| r.run_id == p.run_id) {
                crate::notify::send(&config.notify, "abandoned", p.details);
            }
        }
    }
    // Their leases are known dead (this process holds the workbench, so
    // no other has them running): free the states now instead of after
    // the TTL.
    let ids: Vec<String> = runs.iter().map(|r| r.run_id.clone()).collect();
    if !ids.is_empty() {
        if let Err(e) = crate::ledger::claim::release_dead(&mut session, config, &ids, &never) {
            tracing::warn!(error = %e, "could not release the abandoned runs' leases; they expire by themselves");
        }
    }
    if let Err(e) = crate::ledger::audit::send_pending(&mut session, config, wb, &never) {
        tracing::warn!(error = %e, "could not write the pending audit records now; the next run that reaches PostgreSQL does");
    }
}

/// States of `catch_up` schedules whose last run started before a fire
/// time that has passed: the daemon was down then. A state with no run
/// history is not caught up (as systemd's `Persistent=` with no stamp).
/// `None` for an all-states schedule, judged by its last all-states run.
fn missed_runs(
    config: &Config,
    wb: &crate::workbench::Workbench,
    now: DateTime<Utc>,
) -> Vec<(Option<StateCode>, RunOptions)> {
    let mut missed: Vec<(Option<StateCode>, RunOptions)> = Vec::new();
    for schedule in &config.schedules {
        if !schedule.catch_up {
            continue;
        }
        if schedule.all_states {
            let last = match wb.last_all_states_started() {
                Ok(Some(us)) => DateTime::from_timestamp_micros(us),
                _ => None,
            };
            let due = last
                .and_then(|t| schedule.timing.next_after(t))
                .filter(|fire| *fire <= now);
            if let Some(fire) = due.filter(|_| !missed.iter().any(|(s, _)| s.is_none())) {
                let mut opts = RunOptions::for_schedule(schedule);
                opts.fire_time = Some(fire);
                missed.push((None, opts));
            }
        }
        for state in &schedule.states {
            let last = match wb.last_started(state.as_str()) {
                Ok(Some(us)) => DateTime::from_timestamp_micros(us),
                _ => None,
            };
            let due = last
                .and_then(|t| schedule.timing.next_after(t))
                .filter(|fire| *fire <= now);
            if let Some(fire) =
                due.filter(|_| !missed.iter().any(|(s, _)| s.as_ref() == Some(state)))
            {
                // The first fire time missed is the one claimed: a host that
                // was up then has run it, and this one skips it.
                let mut opts = RunOptions::for_schedule(schedule);
                opts.fire_time = Some(fire);
                missed.push((Some(state.clone()), opts));
            }
        }
    }
    missed
}
