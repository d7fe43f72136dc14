//! An all-states run: one read of both source tables for the whole
//! country ([`Country`]), which spools each state's rows, then a run of
//! each state from its rows.
//!
//! Each state's run is [`super::run`] as for a state alone (its checks,
//! fire claim, lease, gates, files, manifest and audit row), with its rows
//! from the one read instead of a query of its own: its files are
//! byte-for-byte a lone run's. The runs share a batch id. A gate or a
//! failure stops its own state only. Up to `[storage]
//! max_concurrent_uploads` states run at once.
//!
//! The states are the valid codes in the source now, and every state this
//! workbench has published before: a state whose rows are all gone gets
//! an empty run, which its gates judge like any run. Rows whose state
//! value names no state (NULL, empty, lower case, padded, unknown) are
//! counted per value in the report and published nowhere.

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
use crate::source::country::Country;
use crate::source::spool::Segment;
use crate::state::StateCode;
use crate::workbench::Workbench;

/// A state value that names no state, with its rows: not published.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateValue {
    /// `None` for NULL.
    pub value: Option<String>,
    pub companies: u64,
    /// People whose company has this value.
    pub people: u64,
}

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
    /// The overview page of every state (`[report]`).
    pub page: Option<String>,
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

    /// The batch's own audit record (`details` of an
    /// `outreach_all_states_run` row): each state's run has its own.
    pub fn to_json(&self) -> serde_json::Value {
        let mut states = std::collections::BTreeMap::<&str, usize>::new();
        for r in &self.runs {
            *states.entry(r.status.as_str()).or_default() += 1;
        }
        serde_json::json!({
            "run_id": self.batch_id,
            "batch_id": self.batch_id,
            "kind": "all_states",
            "status": match (self.succeeded(), self.failed()) {
                (true, _) => "success",
                (_, true) => "failed",
                _ => "gated",
            },
            "dry_run": self.dry_run,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "read": self.read.map(|(companies, people, secs)| serde_json::json!({
                "companies": companies, "people": people, "secs": secs,
            })),
            "states": states,
            "state_runs": self.runs.iter().map(|r| serde_json::json!({
                "state": r.state, "status": r.status.as_str(), "run_id": r.run_id,
            })).collect::<Vec<_>>(),
            "not_run": self.not_run.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "without_state": self.invalid,
            "error": self.error,
        })
    }

    /// Rows whose state value names no state: companies, people.
    pub fn without_state(&self) -> (u64, u64) {
        self.invalid
            .iter()
            .fold((0, 0), |(c, p), v| (c + v.companies, p + v.people))
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
        if let Some(p) = &self.page {
            let _ = writeln!(s, "  overview page {p}");
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
            // What reached the bucket: only a published run has it.
            let files = match r.status {
                RunStatus::Success if !r.dry_run => {
                    format!("  uploaded {}, skipped {}", r.uploaded, r.skipped)
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {} {:<9} companies good/pulled {:>19}  people {:>19}{files}{}",
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

/// How far an all-states run is, as each state's run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// States whose runs have ended, this one included.
    pub done: usize,
    /// States the batch runs: known once the source is read.
    pub total: usize,
    /// Rows of the states done, per second since the batch started.
    pub rows_per_sec: u64,
}

/// Reads the source once and runs every state from it. `opts` are the
/// options of each state's run (the schedule's gates and fire time);
/// `each` sees each state's report as the run ends, with the batch's
/// progress. Like [`super::run`] it prints nothing and never panics on a
/// failed step.
pub fn run_all_states(
    config: &Config,
    cancel: &CancellationToken,
    opts: &RunOptions,
    each: &mut dyn FnMut(&RunReport, Progress),
) -> BatchReport {
    let started = Instant::now();
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
        page: None,
    };
    let published = match published_states(config, opts.dry_run, cancel) {
        Ok(states) => states,
        Err(e) => return failed(report, e),
    };
    let mut country = match open_country(config, opts.dry_run, cancel, &batch_id) {
        Ok(c) => c,
        Err(e) => return failed(report, e),
    };
    report.read = Some(country.read);
    let total = country.states().union(&published).count();
    let mut published = published.into_iter().peekable();
    // A link-rule run loads its state's rows into tables of the workbench's
    // one DuckDB instance and holds them, uncommitted, until its validation
    // commits; the instance's memory_limit is shared. Eight at once went
    // past the default 128MB with 120 companies in all (a table's first
    // segments are allocated whole): two at a time.
    // A dry run uploads nothing. One state decodes at a time (see
    // `Slots`); a few more at once overlap what each state does besides
    // (its files synced, its records and page written), more only hold
    // memory. On 2 cores, 2, 4 and 8 at once: 11.7-12.1 s, 9.7-10.2 s,
    // 9.9-10.8 s at 500k companies (283, 293, 325-348 MiB); at 2M, 2 and
    // 4: 39.5-40.0 s, 35.2-37.8 s (327-340, 329-348 MiB).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match (opts.link_rule, opts.dry_run) {
        (true, _) => config.storage.max_concurrent_uploads.min(2),
        (false, true) => config.storage.max_concurrent_uploads.min(2 * cores),
        (false, false) => config.storage.max_concurrent_uploads,
    };
    let mut runs: Vec<RunReport> = Vec::new();
    let mut rows = 0u64;
    std::thread::scope(|scope| {
        let (done, finished) = std::sync::mpsc::channel::<RunReport>();
        let mut running = 0usize;
        let mut note = |run: RunReport, runs: &mut Vec<RunReport>| {
            rows += run.rows_pulled();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let progress = Progress {
                done: runs.len() + 1,
                total,
                rows_per_sec: (rows as f64 / secs) as u64,
            };
            tracing::info!(
                state = %run.state,
                status = run.status.as_str(),
                done = progress.done,
                total,
                rows_per_sec = progress.rows_per_sec,
                "all-states progress"
            );
            each(&run, progress);
            runs.push(run);
        };
        // Starts `state`'s run on `rows` once fewer than `workers` run; the
        // rows' spool files go with the run's end.
        let mut dispatch = |state: StateCode, rows: Segment, runs: &mut Vec<RunReport>| {
            while running >= workers {
                let finished_run = finished.recv().expect("a worker is running");
                running -= 1;
                note(finished_run, runs);
            }
            running += 1;
            let (done, span) = (done.clone(), tracing::Span::current());
            let opts = RunOptions {
                batch: Some(Batch {
                    id: batch_id.clone(),
                    rows: Arc::new(rows),
                }),
                ..opts.clone()
            };
            scope.spawn(move || {
                let _entered = span.enter();
                let run = super::run(config, &state, cancel, &opts);
                drop(opts);
                let _ = done.send(run);
            });
        };
        while let Some(segment) = country.next() {
            let Some(state) = segment.state() else {
                let (companies, people) = segment.rows();
                report.invalid.push(StateValue {
                    value: segment.value.clone(),
                    companies,
                    people,
                });
                continue;
            };
            if cancel.is_cancelled() {
                report.not_run.push(state);
                continue;
            }
            // States published before that have no rows now, in order.
            while let Some(gone) = published.next_if(|p| *p < state) {
                dispatch(gone.clone(), country.empty(&gone), &mut runs);
            }
            published.next_if_eq(&state);
            dispatch(state, segment, &mut runs);
        }
        for gone in published {
            match cancel.is_cancelled() {
                true => report.not_run.push(gone),
                false => dispatch(gone.clone(), country.empty(&gone), &mut runs),
            }
        }
        drop(done);
        for finished_run in finished {
            note(finished_run, &mut runs);
        }
    });
    drop(country);
    if cancel.is_cancelled() {
        tracing::warn!("the all-states run was cancelled");
    }
    for v in &report.invalid {
        tracing::warn!(
            value = v.value.as_deref().unwrap_or("NULL"),
            companies = v.companies,
            people = v.people,
            "rows whose state value names no state: not published"
        );
    }
    // The analysts' catalog once for the batch, not once per state.
    let catalog = Workbench::open(&config.workbench)
        .and_then(|wb| crate::workbench::write_catalog(&wb, None));
    if let Err(e) = catalog {
        tracing::warn!(error = %e, "could not write the workbench's catalog for analysts");
    }
    // They finish in any order; the report lists them by state.
    runs.sort_by(|a, b| a.state.cmp(&b.state));
    report.runs = runs;
    report.finished_at = Utc::now();
    if config.report.enabled {
        report.page = write_overview(config, &report);
    }
    if !opts.dry_run {
        let mut session = Session::lazy(&config.source, &config.retry);
        let never = CancellationToken::new();
        let written = crate::ledger::audit::record_event(
            &mut session,
            &config.audit_table(),
            crate::ledger::audit::ALL_STATES_EVENT_TYPE,
            &report.to_json(),
            &never,
        );
        if let Err(e) = written {
            tracing::error!(error = %e, "could not write the all-states run's own audit record");
        }
    }
    let tally = report.tally();
    match report.failed() {
        true if cancel.is_cancelled() => {
            tracing::warn!(states = %tally, "all-states run cancelled")
        }
        true => tracing::error!(states = %tally, "all-states run finished"),
        false => tracing::info!(states = %tally, "all-states run finished"),
    }
    report
}

/// The overview page of the batch, linking each state's own page.
fn write_overview(config: &Config, report: &BatchReport) -> Option<String> {
    let overview = super::page::Overview {
        batch_id: &report.batch_id,
        dry_run: report.dry_run,
        started_at: report.started_at,
        error: report.error.as_deref(),
        runs: &report.runs,
        invalid: report
            .invalid
            .iter()
            .map(|v| {
                let value = v
                    .value
                    .as_deref()
                    .map_or("NULL".into(), |v| format!("{v:?}"));
                (value, v.companies, v.people)
            })
            .collect(),
        not_run: report.not_run.iter().map(|s| s.to_string()).collect(),
        link: &super::page::link_from_overview,
    };
    match super::page::write_overview(config, &overview) {
        Ok(path) => {
            tracing::info!(page = %path.display(), "wrote the all-states overview page");
            Some(path.display().to_string())
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not write the all-states overview page");
            None
        }
    }
}

fn failed(mut report: BatchReport, e: PipelineError) -> BatchReport {
    let e = match e {
        // A stop asked for (shutdown, the run timeout) pages nobody.
        PipelineError::Cancelled => {
            tracing::warn!("the all-states run was cancelled before any state ran");
            e.to_string()
        }
        e => {
            let e = crate::error::with_causes(e.to_string(), &e);
            tracing::error!(error = %e, "all-states run failed before any state ran");
            e
        }
    };
    report.error = Some(e);
    report.finished_at = Utc::now();
    report
}

/// The bucket (for a real run) and the rules against the source's columns
/// checked, then both tables read and spooled on a connection of its own
/// (again from the start while what stops it may pass by itself).
fn open_country(
    config: &Config,
    dry_run: bool,
    cancel: &CancellationToken,
    batch_id: &str,
) -> Result<Country, PipelineError> {
    if !dry_run {
        crate::retry::retry(&config.retry, cancel, "checking the bucket", || {
            crate::bucket::publish::check_bucket(&config.storage)
        })?;
    }
    let mut session = Session::open(&config.source, &config.retry, cancel)?;
    session.run("checking the rules against the source", cancel, |c| {
        rules::check_against_source(c, config)
    })?;
    drop(session);
    let spools = config.workbench.dir.join("spool");
    remove_dead_spools(&spools);
    let dir = spools.join(format!("{}-{batch_id}", std::process::id()));
    let country = crate::retry::retry(&config.retry, cancel, "reading every state", || {
        let mut client = crate::source::connect::connect(&config.source)?;
        Country::read(&mut client, config, cancel, &dir)
    });
    if country.is_err() {
        // What a failed read spooled goes with it.
        let _ = std::fs::remove_dir_all(&dir);
    }
    country
}

/// Spool folders (`<pid>-<batch>`) of processes no longer running: left by
/// a run that was killed.
fn remove_dead_spools(spools: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(spools) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_string_lossy().split('-').next().map(str::to_string);
        let alive = pid.is_some_and(|p| std::path::Path::new("/proc").join(p).exists());
        if !alive {
            tracing::info!(dir = %entry.path().display(), "removing the spool of a run that ended without it");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The states this workbench has published before, and (for a real run;
/// a dry run does not look at the bucket) those with objects in the bucket,
/// whoever put them there.
fn published_states(
    config: &Config,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<BTreeSet<StateCode>, PipelineError> {
    let mut states = BTreeSet::new();
    let published = Workbench::open(&config.workbench)
        .map_err(PipelineError::from)
        .and_then(|wb| wb.last_finished().map_err(PipelineError::from));
    match published {
        Ok(rows) => states.extend(
            rows.into_iter()
                .filter(|(_, _, success)| success.is_some())
                .filter_map(|(s, _, _)| StateCode::parse(&s).ok()),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not read which states were published before");
        }
    }
    if !dry_run {
        states.extend(crate::retry::retry(
            &config.retry,
            cancel,
            "listing the states in the bucket",
            || crate::bucket::publish::published_states(&config.storage),
        )?);
    }
    Ok(states)
}
