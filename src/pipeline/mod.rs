//! One run: pull → validate → export → publish → audit, for one state.
//!
//! [`run`] is a plain function of a config, a state and a cancel token that
//! returns a [`RunReport`]. It knows nothing of cron, signals or terminals:
//! the CLI prints the report, the daemon logs it. It never panics on a
//! failed stage; the failure is in the report (and in the audit).
//!
//! `stages.rs` is the run's path, one function per stage in the order a
//! run goes through them, each entering its room once:
//! - connect: the bucket, PostgreSQL ([`crate::source::connect`]) and the
//!   rules ([`crate::quality::rules`]) against the source's columns
//! - claim ([`crate::ledger::claim`]): the schedule's fire time and the
//!   state's lease, in PostgreSQL
//! - pull: [`crate::source::pull`] streams PostgreSQL's rows to
//!   [`crate::files`]' writers, which split them with the rules into
//!   good/bad Parquet files, put in place atomically;
//!   [`crate::quality::validate`] then makes the workbench's views over
//!   them (`<state>.companies_raw`, `_good`, `_bad`) and counts. With the
//!   link rule: the rows are loaded into raw tables first, validated there
//!   in one DuckDB transaction, and exported from its views
//! - compare with the bucket: its manifest ([`crate::bucket::manifest`]),
//!   for schema changes
//! - gate ([`crate::quality::gates`]): stop before publishing data that
//!   looks wrong
//! - publish ([`crate::bucket::publish`]): Parquet → bucket, skipping
//!   unchanged content
//!
//! Then [`run`] here writes the audit record ([`crate::ledger::audit`]),
//! whatever came of them; then the run's report page ([`page`]), its row
//! in the workbench history, and, for a run that wrote a new manifest, the
//! page beside it in the bucket.

pub mod all_states;
mod changes;
pub mod history;
pub mod page;
pub mod report;
mod stages;
pub mod status;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::panic_text;
pub use crate::error::PipelineError;
use crate::ledger::{audit, claim};
use crate::quality::gates;
use crate::source::connect::Session;
use crate::source::spool::Segment;
use crate::state::StateCode;
use crate::workbench::{FinishedRun, Workbench};
pub use report::{EntityCounts, RunReport, RunStatus};

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Validate and export, but neither upload nor write the audit.
    pub dry_run: bool,
    /// Turn on the `company_not_valid` rule for people.
    pub link_rule: bool,
    /// The quality gates that apply (already merged with `[gates]`).
    pub gates: gates::GatesConfig,
    /// Publish even when a gate trips (the audit says so).
    pub force: bool,
    /// The schedule's fire time this run is for: claimed in PostgreSQL so
    /// that one fire runs once across every host.
    pub fire_time: Option<DateTime<Utc>>,
    /// The all-states run this run is part of: its rows come from the
    /// batch's one read of the source, not from a query of its own.
    pub batch: Option<Batch>,
}

/// An all-states run, as each of its states' runs knows it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Shared by the audit records of all its runs.
    pub id: String,
    /// The state's rows, from the batch's one read of the source.
    pub rows: Arc<Segment>,
}

impl RunOptions {
    /// What the runs fired by `schedule` use.
    pub fn for_schedule(schedule: &crate::config::Schedule) -> RunOptions {
        RunOptions {
            dry_run: false,
            link_rule: schedule.link_rule,
            gates: schedule.gates,
            force: false,
            fire_time: None,
            batch: None,
        }
    }

    /// What a one-off `run --all-states` uses: the settings of the first
    /// `[[schedule]]` with `states = "all"`, else `[gates]` alone.
    pub fn for_all_states(config: &Config) -> RunOptions {
        match config.schedules.iter().find(|s| s.all_states) {
            Some(s) => Self::for_schedule(s),
            None => RunOptions {
                gates: config.gates,
                ..Default::default()
            },
        }
    }

    /// What a one-off `run` of `state` uses: the settings of the first
    /// `[[schedule]]` listing it, else `[gates]` alone.
    pub fn for_state(config: &Config, state: &StateCode) -> RunOptions {
        match config.schedule_for(state) {
            Some(s) => Self::for_schedule(s),
            None => RunOptions {
                gates: config.gates,
                ..Default::default()
            },
        }
    }
}

/// Said of an audit record that could not be written now.
const PENDING: &str = "; the record is kept in the workbench and written when it can be";

/// What a run holds while it goes, let go of at its end.
#[derive(Default)]
pub(crate) struct Held {
    session: Option<Session>,
    lease: Option<claim::Lease>,
    workbench: Option<Workbench>,
    /// The audit, lease and fire-claim tables have been checked.
    tables_ready: bool,
    /// A few failing rows per rule, for the run's page.
    samples: Vec<crate::quality::samples::RuleSample>,
}

/// The run's rules in words, for its page: the configured ones, and the
/// link rule when it is on (its condition as the config implies it).
fn rule_notes(config: &Config, opts: &RunOptions) -> Vec<report::RuleNote> {
    let mut notes = Vec::new();
    for entity in crate::names::Entity::ALL {
        for r in config.rules.of(entity) {
            notes.push(report::RuleNote::of(entity, r));
        }
    }
    if opts.link_rule {
        let s = &config.source;
        let link = crate::quality::rules::company_not_valid_rule(
            "<state>",
            &s.people_company_column,
            &s.company_key,
        );
        notes.push(report::RuleNote::of(crate::names::Entity::People, &link));
    }
    notes
}

/// Runs the whole pipeline for `state` and reports what happened.
pub fn run(
    config: &Config,
    state: &StateCode,
    cancel: &CancellationToken,
    opts: &RunOptions,
) -> RunReport {
    let mut report = RunReport::new(state, opts.dry_run);
    report.rules = rule_notes(config, opts);
    report.forced = opts.force;
    report.fire_time = opts.fire_time;
    report.batch_id = opts.batch.as_ref().map(|b| b.id.clone());
    let span = tracing::info_span!("run", state = %state, run_id = %report.run_id);
    let _guard = span.enter();
    tracing::info!(dry_run = opts.dry_run, "run started");

    let mut held = Held::default();
    // A panic anywhere in the stages (a worker thread's is passed on to
    // here) is a failed run like any other: reported, recorded, audited.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let run = stages::RunCtx {
            config,
            state,
            opts,
            cancel,
        };
        stages::all(&run, &mut report, &mut held)
    }))
    .unwrap_or_else(|panic| Err(PipelineError::Panicked(panic_text(&panic))));
    let (skipped, auditable) = audit_and_release(config, opts, outcome, &mut report, &mut held);
    if !skipped {
        if let Some(wb) = workbench_for_the_end(config, &mut held) {
            let page = write_page(config, state, &wb, &mut report, &held.samples);
            record_in_workbench(config, &report, auditable, &wb, &mut held);
            report.abandoned_found = wb.take_abandoned();
            report.state_file_set_aside = wb.take_set_aside();
            // An all-states run writes the catalog once, at its end.
            if opts.batch.is_none() {
                if let Err(e) = crate::workbench::write_catalog(&wb, Some(&state.lower())) {
                    tracing::warn!(error = %e, "could not write the workbench's catalog for analysts");
                }
            }
            // Let go of the file before the bucket, which may retry.
            drop(wb);
            if let Some(page) = page {
                publish_page(config, state, &report, &page);
            }
        }
    }
    if let Some(error) = &report.error {
        if let Some(said) = crate::workbench::corrupt_in_run(&config.workbench.dir, error) {
            report.error = Some(said);
        }
    }
    let status = report.status.as_str();
    let page = report.page.as_deref().unwrap_or("none");
    match &report.error {
        None if report.audit_error.is_none() => tracing::info!(status, page, "run finished"),
        None => tracing::error!(
            status,
            page,
            "run finished, but its audit record is not written yet"
        ),
        // A stop asked for (shutdown, the run timeout) or a state another
        // run holds is no fault: whoever alerts on `journalctl -p err` is
        // not paged for a deploy.
        Some(e) if matches!(report.status, RunStatus::Cancelled | RunStatus::Skipped) => {
            tracing::warn!(status, page, error = %e, "run finished")
        }
        Some(e) => tracing::error!(status, page, error = %e, "run finished"),
    }
    report
}

/// The run's ending in PostgreSQL: the fence, the audit record, the lease
/// released. A run to be recorded as a success or a gate does the three in
/// one statement (`audit::record_releasing`); any other ending, or that
/// statement failing, goes step by step. Returns whether the run was
/// skipped (it did nothing, and is neither audited nor in the history) and
/// whether it is one to audit.
fn audit_and_release(
    config: &Config,
    opts: &RunOptions,
    mut outcome: Result<(), PipelineError>,
    report: &mut RunReport,
    held: &mut Held,
) -> (bool, bool) {
    let t = Instant::now();
    // The fence before the audit: a run that lost its lease on the way
    // does not record itself as a success or a gate.
    let would_record_success = matches!(outcome, Ok(()) | Err(PipelineError::Gated(_)));
    if would_record_success {
        if let (Some(lease), Some(session)) = (held.lease.as_mut(), held.session.as_mut()) {
            report.finish(outcome.as_ref().err());
            lease.stop_heartbeat();
            let table = config.audit_table();
            if let Some(id) = audit::record_releasing(session, &table, lease, &report.to_json()) {
                report.audit_id = Some(id);
                // Its row went with the audit statement.
                held.lease = None;
                report.stages.audit = Some(t.elapsed().as_secs_f64());
                return (false, true);
            }
        }
    }
    if let (Some(lease), Some(session)) = (
        held.lease.as_ref().filter(|_| would_record_success),
        held.session.as_mut(),
    ) {
        if let Err(e) = lease.fence(session, "writing the audit") {
            outcome = Err(e);
        }
    }
    report.finish(outcome.as_ref().err());

    // Skipped runs did nothing: no audit, no history. A layout problem is
    // the audit table's own.
    let skipped = matches!(
        outcome,
        Err(PipelineError::StateBusy(_) | PipelineError::FireClaimed(_))
    );
    let auditable =
        !opts.dry_run && !skipped && !matches!(outcome, Err(PipelineError::AuditLayout { .. }));
    if auditable {
        // The connect itself failed, after its retries: PostgreSQL is not
        // there now, and the record waits in the workbench.
        let unreachable =
            held.session.is_none() && matches!(outcome, Err(PipelineError::Connect { .. }));
        if unreachable {
            report.audit_error = Some(format!("PostgreSQL could not be reached{PENDING}"));
        } else {
            let session = held
                .session
                .get_or_insert_with(|| Session::lazy(&config.source, &config.retry));
            let never = CancellationToken::new();
            // A run that failed before its own check of the audit table
            // (the bucket, the rules) checks it now.
            let ready = match held.tables_ready {
                true => Ok(()),
                false => audit::ensure_tables(session, config, &never),
            };
            let written = ready.and_then(|()| {
                audit::record(session, &config.audit_table(), &report.to_json(), &never)
            });
            match written {
                Ok(id) => report.audit_id = Some(id),
                Err(e) => report.audit_error = Some(format!("{e}{PENDING}")),
            }
        }
        if let Some(e) = &report.audit_error {
            tracing::error!(error = %e, "could not write the audit record");
        }
        report.stages.audit = Some(t.elapsed().as_secs_f64());
    }
    if let Some(lease) = held.lease.take() {
        lease.release(held.session.as_mut());
    }
    (skipped, auditable)
}

/// The run's workbench, to record its end in: the one it opened, or, for
/// a run that failed before it did (PostgreSQL down), opened now so that
/// the run is in `history`.
fn workbench_for_the_end(config: &Config, held: &mut Held) -> Option<Workbench> {
    match held.workbench.take() {
        Some(wb) => Some(wb),
        None => match Workbench::open(&config.workbench) {
            Ok(wb) => Some(wb),
            Err(e) => {
                tracing::error!(error = %e, "could not record the run in the workbench history");
                None
            }
        },
    }
}

/// The run's report page (`[report]`), from its report, its samples and
/// the state's history; its path goes into the report, and the path of
/// the page for the bucket is returned. A page that cannot be written is a
/// warning, not a failed run.
fn write_page(
    config: &Config,
    state: &StateCode,
    wb: &Workbench,
    report: &mut RunReport,
    samples: &[crate::quality::samples::RuleSample],
) -> Option<std::path::PathBuf> {
    if !config.report.enabled {
        return None;
    }
    let t = Instant::now();
    let written = page::write_run_page(config, state, wb.conn(), report, samples);
    report.stages.report = Some(report.stages.report.unwrap_or(0.0) + t.elapsed().as_secs_f64());
    match written {
        Ok((host, public)) => {
            report.page = Some(host.display().to_string());
            Some(public)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not write the run's report page");
            None
        }
    }
}

/// The run's failing-row samples and its row in the workbench history,
/// with its audit still pending when it could not be written; then,
/// PostgreSQL having answered, the pending records of earlier runs.
fn record_in_workbench(
    config: &Config,
    report: &RunReport,
    auditable: bool,
    wb: &Workbench,
    held: &mut Held,
) {
    if !held.samples.is_empty() {
        let json = serde_json::to_string(&held.samples).expect("plain data");
        if let Err(e) = wb.record_samples(&report.run_id, &json) {
            tracing::warn!(error = %e, "could not keep the failing rows for the report page");
        }
    }
    let row = FinishedRun {
        run_id: report.run_id.clone(),
        state: report.state.clone(),
        status: report.status.as_str().to_string(),
        dry_run: report.dry_run,
        started_at: report.started_at,
        finished_at: report.finished_at,
        audit_id: report.audit_id,
        error: report.error.clone(),
        report: report.to_json(),
        audit_pending: auditable && report.audit_id.is_none(),
    };
    if let Err(e) = wb.run_finished(row) {
        tracing::error!(error = %e, "could not record the run in the workbench history; it is kept, and written with the next run");
    }
    if let (Some(_), Some(session)) = (report.audit_id, held.session.as_mut()) {
        let never = CancellationToken::new();
        if let Err(e) = audit::send_pending(session, config, wb, &never) {
            tracing::warn!(error = %e, "could not write the pending audit records of earlier runs; they stay pending");
        }
        if wb.take_new() {
            seed_history(config, wb, session);
        }
    }
}

/// A state file this process made new (the first, or one in place of a
/// corrupt one) gets the audit's recent runs as its history, once.
fn seed_history(config: &Config, wb: &Workbench, session: &mut Session) {
    /// About a month of nightly runs of every state.
    const RUNS: i64 = 2000;
    let never = CancellationToken::new();
    let seeded = audit::recent_runs(session, &config.audit_table(), RUNS, &never)
        .map_err(|e| e.to_string())
        .and_then(|runs| wb.seed_history(&runs).map_err(|e| e.to_string()));
    match seeded {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "a new state file: its history is seeded from the audit"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not seed the new state file's history from the audit")
        }
    }
}

/// The page beside the manifest, last. Only a run that wrote a new
/// manifest replaces it: the bucket's page stays the page of the run whose
/// data is there, and a run that found nothing changed sends nothing.
fn publish_page(config: &Config, state: &StateCode, report: &RunReport, page: &std::path::Path) {
    let wrote_manifest = report
        .manifest
        .as_deref()
        .is_some_and(|m| m.starts_with("written"));
    if !(report.succeeded() && !report.dry_run && wrote_manifest) {
        return;
    }
    let key = crate::bucket::manifest::page_key(&config.storage, state);
    if let Err(e) = crate::bucket::publish::write_page(&config.storage, &config.retry, &key, page) {
        tracing::warn!(error = %e, "could not publish the run's report page; the data and manifest are published");
    }
}
