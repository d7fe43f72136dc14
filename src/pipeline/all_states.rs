//! An all-states run: one read of each source table for the whole
//! country ([`Snapshot`]), then a run of each state from it.
//!
//! Each state's run is [`super::run`] as for a state alone (its checks,
//! fire claim, lease, gates, files, manifest and audit row), with its rows
//! from the snapshot instead of a query of its own: its files are
//! byte-for-byte a lone run's. The runs share a batch id. A gate or a
//! failure stops its own state only.
//!
//! The states are the valid codes in the source now, and every state this
//! workbench has published before: a state whose rows are all gone gets
//! its empty snapshot, which its gates judge like any run. Rows whose
//! state value names no state (NULL, empty, lower case, padded, unknown)
//! are counted per value in the report and published nowhere.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{Batch, RunOptions, RunReport, RunStatus};
use crate::config::Config;
use crate::error::PipelineError;
use crate::quality::rules;
use crate::source::connect::Session;
use crate::source::snapshot::{Snapshot, StateValue};
use crate::state::StateCode;
use crate::workbench::Workbench;

/// What an all-states run did.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub batch_id: String,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Why no state ran: the source could not be read.
    pub error: Option<String>,
    /// Rows read from each table, and how long that took.
    pub read: Option<(u64, u64, f64)>,
    /// State values that name no state, with their rows: not published.
    pub invalid: Vec<StateValue>,
    /// Each state's run, in state order.
    pub runs: Vec<RunReport>,
    /// States not run: the batch was cancelled before their turn.
    pub not_run: Vec<StateCode>,
}

impl BatchReport {
    /// Every state ran and published (or had nothing new to).
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.not_run.is_empty() && self.runs.iter().all(|r| r.succeeded())
    }

    /// Some state failed, or no state could run.
    pub fn failed(&self) -> bool {
        self.error.is_some()
            || !self.not_run.is_empty()
            || self
                .runs
                .iter()
                .any(|r| !r.succeeded() && r.status != RunStatus::Gated)
    }

    /// States by how their runs ended, as `success=49 gated=1 failed=1`.
    pub fn tally(&self) -> String {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for r in &self.runs {
            *counts.entry(r.status.as_str()).or_default() += 1;
        }
        if !self.not_run.is_empty() {
            counts.insert("not run", self.not_run.len());
        }
        counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// What `run --all-states` prints: the batch, the values that name no
    /// state, then one line per state.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "all-states run {}: {} states: {}{}",
            self.batch_id,
            self.runs.len() + self.not_run.len(),
            self.tally(),
            if self.dry_run { " (dry run)" } else { "" }
        );
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  error: {e}");
        }
        if let Some((companies, people, secs)) = self.read {
            let _ = writeln!(
                s,
                "  read {companies} companies and {people} people in {secs:.1} s"
            );
        }
        if !self.invalid.is_empty() {
            let _ = writeln!(s, "  not published, the state value names no state:");
            for v in &self.invalid {
                let value = v
                    .value
                    .as_deref()
                    .map_or("NULL".into(), |v| format!("{v:?}"));
                let _ = writeln!(
                    s,
                    "    {value:<8} {:>9} companies {:>9} people",
                    v.companies, v.people
                );
            }
        }
        for r in &self.runs {
            let counts = |c: &Option<super::EntityCounts>| {
                c.as_ref()
                    .map_or("-".to_string(), |c| format!("{}/{}", c.good, c.raw))
            };
            let _ = writeln!(
                s,
                "  {} {:<9} companies good/pulled {:>19}  people {:>19}{}",
                r.state,
                r.status.as_str(),
                counts(&r.companies),
                counts(&r.people),
                r.error
                    .as_deref()
                    .map_or(String::new(), |e| format!("  {e}"))
            );
        }
        for state in &self.not_run {
            let _ = writeln!(s, "  {state} not run (cancelled)");
        }
        s
    }
}

/// Reads the source once and runs every state from it. `opts` are the
/// options of each state's run (the schedule's gates and fire time);
/// `each` sees each state's report as the run ends. Like [`super::run`] it
/// prints nothing and never panics on a failed step.
pub fn run_all_states(
    config: &Config,
    cancel: &CancellationToken,
    opts: &RunOptions,
    each: &mut dyn FnMut(&RunReport),
) -> BatchReport {
    let batch_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("all_states", batch_id = %batch_id);
    let _guard = span.enter();
    tracing::info!(dry_run = opts.dry_run, "all-states run started");
    let mut report = BatchReport {
        batch_id: batch_id.clone(),
        dry_run: opts.dry_run,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        error: None,
        read: None,
        invalid: Vec::new(),
        runs: Vec::new(),
        not_run: Vec::new(),
    };
    let t = Instant::now();
    let snapshot = match take_snapshot(config, &batch_id, cancel) {
        Ok(s) => Arc::new(s),
        Err(e) => return failed(report, e),
    };
    let secs = t.elapsed().as_secs_f64();
    report.read = Some((snapshot.read.companies, snapshot.read.people, secs));
    tracing::info!(
        companies = snapshot.read.companies,
        people = snapshot.read.people,
        secs = format!("{secs:.1}"),
        "read the source"
    );
    report.invalid = snapshot
        .state_values()
        .iter()
        .filter(|v| v.state().is_none())
        .cloned()
        .collect();
    for v in &report.invalid {
        tracing::warn!(
            value = v.value.as_deref().unwrap_or("NULL"),
            companies = v.companies,
            people = v.people,
            "rows whose state value names no state: not published"
        );
    }
    let states = states_to_run(config, &snapshot);

    let total = states.len();
    let t = Instant::now();
    let mut rows = 0u64;
    let batch = Batch {
        id: batch_id,
        snapshot,
    };
    for (i, state) in states.iter().enumerate() {
        if cancel.is_cancelled() {
            report.not_run = states[i..].to_vec();
            break;
        }
        let opts = RunOptions {
            batch: Some(batch.clone()),
            ..opts.clone()
        };
        let run = super::run(config, state, cancel, &opts);
        rows += [&run.companies, &run.people]
            .iter()
            .filter_map(|c| c.as_ref().map(|c| c.raw))
            .sum::<u64>();
        tracing::info!(
            state = %state,
            status = run.status.as_str(),
            done = i + 1,
            total,
            rows_per_sec = (rows as f64 / t.elapsed().as_secs_f64().max(1e-3)) as u64,
            "all-states progress"
        );
        each(&run);
        report.runs.push(run);
    }
    drop(batch);
    report.finished_at = Utc::now();
    let tally = report.tally();
    match report.failed() {
        true => tracing::error!(states = %tally, "all-states run finished"),
        false => tracing::info!(states = %tally, "all-states run finished"),
    }
    report
}

fn failed(mut report: BatchReport, e: PipelineError) -> BatchReport {
    let e = crate::error::with_causes(e.to_string(), &e);
    tracing::error!(error = %e, "all-states run failed before any state ran");
    report.error = Some(e);
    report.finished_at = Utc::now();
    report
}

/// The rules checked against the source's columns, then both tables read.
fn take_snapshot(
    config: &Config,
    batch_id: &str,
    cancel: &CancellationToken,
) -> Result<Snapshot, PipelineError> {
    let mut session = Session::open(&config.source, &config.retry, cancel)?;
    session.run("checking the rules against the source", cancel, |c| {
        rules::check_against_source(c, config)
    })?;
    let client = session.client(cancel)?;
    Snapshot::take(client, config, batch_id, cancel)
}

/// The valid states in the snapshot, and those the workbench has
/// published before, in order.
fn states_to_run(config: &Config, snapshot: &Snapshot) -> Vec<StateCode> {
    let mut states: BTreeSet<StateCode> = snapshot
        .state_values()
        .iter()
        .filter_map(StateValue::state)
        .collect();
    let published = Workbench::open(&config.workbench)
        .map_err(PipelineError::from)
        .and_then(|wb| wb.last_finished().map_err(PipelineError::from));
    match published {
        Ok(rows) => states.extend(
            rows.into_iter()
                .filter(|(_, _, success)| success.is_some())
                .filter_map(|(s, _, _)| StateCode::parse(&s).ok()),
        ),
        Err(e) => tracing::warn!(error = %e, "could not read which states were published before"),
    }
    states.into_iter().collect()
}
