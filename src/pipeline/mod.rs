//! One run: pull → validate → export → publish → audit, for one state.
//!
//! [`run`] is a plain function of a config, a state and a cancel token that
//! returns a [`RunReport`]. It knows nothing of cron, signals or terminals:
//! the CLI prints the report, the daemon logs it. It never panics on a
//! failed stage; the failure is in the report (and in the audit).
//!
//! The stages, in the order a run goes through them:
//! - [`source`]: PostgreSQL → `<state>.companies_raw` / `people_raw`
//! - [`validate`]: raw → `_good` / `_bad` with the rules
//! - [`export`]: good/bad → Parquet files, atomically
//! - [`publish`]: Parquet → bucket, skipping unchanged content
//! - [`audit`]: the run's record in PostgreSQL

pub mod audit;
pub mod export;
pub mod gates;
pub mod pgtypes;
pub mod publish;
pub mod report;
pub mod retry;
pub mod rules;
pub mod source;
pub mod validate;

use std::path::PathBuf;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::StateCode;
use crate::workbench::{Workbench, WorkbenchError};
pub use report::{EntityCounts, RunReport, RunStatus};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {target}: {}", pg_message(.source))]
    Connect {
        target: String,
        #[source]
        source: postgres::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("PostgreSQL error while {what}: {}", pg_message(.source))]
    Source {
        what: String,
        #[source]
        source: postgres::Error,
    },
    #[error("cannot decode {table}.{column}: {message}")]
    Decode {
        table: String,
        column: String,
        message: String,
    },
    #[error(transparent)]
    WorkbenchOpen(#[from] WorkbenchError),
    #[error("workbench: {0}")]
    Workbench(String),
    #[error("validation failed: {0}")]
    Validate(String),
    #[error("export to {path} failed: {message}")]
    Export { path: PathBuf, message: String },
    #[error("bucket {target} is not usable: {message}")]
    Bucket {
        target: String,
        message: String,
        transient: bool,
    },
    #[error("upload of {key} failed: {message}")]
    Publish {
        key: String,
        message: String,
        transient: bool,
    },
    #[error("audit table {0}")]
    Audit(String),
    #[error("audit table {table} exists with another layout ({problems}); set [audit] table (or OUTREACH_AUDIT__TABLE) to another schema.table and it will be created with the right layout")]
    AuditLayout { table: String, problems: String },
    #[error(transparent)]
    Rule(#[from] rules::RuleError),
    #[error("{0}; nothing published, the local exports are kept")]
    Gated(String),
    #[error("run cancelled")]
    Cancelled,
    #[error("another process is running state {0} against this database (PostgreSQL advisory lock held); skipped")]
    StateBusy(String),
}

/// First key of the per-state advisory lock ("OWWB"); the second is the
/// state's hash. Any process using the same pair excludes the others.
const ADVISORY_LOCK_CLASS: i32 = 0x4f57_5742;

impl PipelineError {
    /// A failure that may pass by itself: worth retrying with backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Connect { source, .. } => retry::is_transient_pg(source),
            PipelineError::Bucket { transient, .. } | PipelineError::Publish { transient, .. } => {
                *transient
            }
            _ => false,
        }
    }
}

/// The server's own words for a database error (`FATAL: password
/// authentication failed for user "x"`), which `postgres::Error`'s Display
/// reduces to "db error"; the error chain for everything else.
pub fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            m.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        return m;
    }
    let mut m = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !m.contains(&text) {
            m.push_str(": ");
            m.push_str(&text);
        }
        cause = c.source();
    }
    m
}

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
}

impl RunOptions {
    /// What the runs fired by `schedule` use.
    pub fn for_schedule(config: &Config, schedule: &crate::config::ScheduleConfig) -> RunOptions {
        RunOptions {
            dry_run: false,
            link_rule: schedule.link_rule,
            gates: schedule.gates.over(config.gates),
            force: false,
        }
    }

    /// What a one-off `run` of `state` uses: the settings of the first
    /// `[[schedule]]` listing it, else `[gates]` alone.
    pub fn for_state(config: &Config, state: &StateCode) -> RunOptions {
        match config.schedule_for(state) {
            Some(s) => Self::for_schedule(config, s),
            None => RunOptions {
                gates: config.gates,
                ..Default::default()
            },
        }
    }
}

/// Runs the whole pipeline for `state` and reports what happened.
pub fn run(
    config: &Config,
    state: &StateCode,
    cancel: &CancellationToken,
    opts: &RunOptions,
) -> RunReport {
    let mut report = RunReport::new(state, opts.dry_run);
    report.forced = opts.force;
    let span = tracing::info_span!("run", state = %state, run_id = %report.run_id);
    let _guard = span.enter();
    tracing::info!(dry_run = opts.dry_run, "run started");

    let mut workbench = None;
    let outcome = stages(config, state, cancel, opts, &mut report, &mut workbench);
    report.finish(outcome.as_ref().err());

    // The audit is written for failed and cancelled runs too. It gets its
    // own connection: the source's may be what failed.
    let audit_possible = !matches!(
        outcome,
        Err(PipelineError::AuditLayout { .. } | PipelineError::StateBusy(_))
    );
    if !opts.dry_run && audit_possible {
        let t = Instant::now();
        let written = audit::write(config, &report.to_json());
        match written {
            Ok(id) => report.audit_id = Some(id),
            Err(e) => {
                tracing::error!(error = %e, "could not write the audit record");
                report.audit_error = Some(e.to_string());
            }
        }
        report.stages.audit = Some(t.elapsed().as_secs_f64());
    }
    if let Some(wb) = &workbench {
        if let Err(e) = wb.run_finished(&report) {
            tracing::warn!(error = %e, "could not record the run in the workbench history");
        }
    }
    match &report.error {
        None => tracing::info!(status = report.status.as_str(), "run finished"),
        Some(e) => tracing::error!(status = report.status.as_str(), error = %e, "run finished"),
    }
    report
}

/// The state's last successful run, for `max_row_delta`, from the audit
/// table; none before the table exists (a dry run on a new database).
fn previous_success(
    client: &mut postgres::Client,
    config: &Config,
    state: &StateCode,
) -> Result<Option<gates::Previous>, PipelineError> {
    let table = config.audit_table();
    match audit::inspect(client, &table)? {
        Some(problems) if problems.is_empty() => {
            audit::previous_success(client, &table, state.as_str())
        }
        _ => Ok(None),
    }
}

fn check_cancel(cancel: &CancellationToken) -> Result<(), PipelineError> {
    if cancel.is_cancelled() {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}

fn stages(
    config: &Config,
    state: &StateCode,
    cancel: &CancellationToken,
    opts: &RunOptions,
    report: &mut RunReport,
    workbench: &mut Option<Workbench>,
) -> Result<(), PipelineError> {
    // Everything that can be refused is refused before any work is done.
    let r = &config.retry;
    if !opts.dry_run {
        retry::retry(r, cancel, "checking the bucket", || {
            publish::check_bucket(&config.storage)
        })?;
    }
    let mut client = retry::retry(r, cancel, "connecting to PostgreSQL", || {
        source::connect(&config.source)
    })?;
    // A rule naming a column the source does not have fails here, before
    // any row is pulled, naming the rule.
    rules::check_against_source(&mut client, config)?;
    if !opts.dry_run {
        audit::ensure_table(&mut client, &config.audit_table())?;
        // One run per state across every daemon and host sharing this
        // database; held by this session until `client` is dropped at the
        // end of the run.
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&ADVISORY_LOCK_CLASS, &state.as_str()],
            )
            .map_err(|e| PipelineError::Source {
                what: "taking the state's advisory lock".into(),
                source: e,
            })?
            .get(0);
        if !locked {
            return Err(PipelineError::StateBusy(state.to_string()));
        }
    }
    check_cancel(cancel)?;

    let wb = workbench.insert(Workbench::open(&config.workbench, config.lock_timeout())?);
    wb.run_started(
        &report.run_id,
        state.as_str(),
        opts.dry_run,
        report.started_at,
    )?;
    let schema = state.lower();

    // Pull and validate in one DuckDB transaction: a failed or cancelled run
    // leaves the state's previous tables intact for analysts. It runs on a
    // connection of its own, the one the pull's inserts need.
    let txn = wb.raw_connection()?;
    let txn_exec = |sql: &str| {
        txn.execute(sql)
            .map_err(|e| PipelineError::Workbench(format!("{sql}: {e}")))
    };
    txn_exec(&format!(
        "BEGIN; CREATE SCHEMA IF NOT EXISTS {};",
        crate::config::quote_ident(&schema)
    ))?;
    let entities = ["companies", "people"];
    // The files are written while the rows load, unless a rule reads more
    // than its own row: the link rule reads the companies' verdicts from the
    // workbench, which the writers' connections see only after the commit.
    let streamed = (!opts.link_rule).then(|| {
        export::StreamedExport::new(
            wb,
            state,
            &config.export,
            vec![
                ("companies", &config.rules.companies[..]),
                ("people", &config.rules.people[..]),
            ],
        )
    });
    let loaded = (|| {
        let t = Instant::now();
        let syncing = wb.background_sync();
        let taps = streamed.as_ref().map(|s| s.taps()).unwrap_or_default();
        let pulled = source::pull(&mut client, config, state, &txn, &schema, cancel, taps);
        drop(syncing);
        let pulled = pulled?;
        report.stages.pull = Some(t.elapsed().as_secs_f64());
        report.text_fallbacks = pulled.text_fallbacks.clone();
        tracing::info!(
            companies = pulled.companies,
            people = pulled.people,
            "pulled"
        );
        check_cancel(cancel)?;

        let t = Instant::now();
        let src = &config.source;
        let companies = validate::split(
            &txn,
            &schema,
            "companies",
            &src.company_key,
            &config.rules.companies,
        )?;
        let mut people_rules = config.rules.people.clone();
        if opts.link_rule {
            people_rules.push(rules::company_not_valid_rule(
                &schema,
                &src.people_company_column,
                &src.company_key,
            ));
        }
        let people = validate::split(&txn, &schema, "people", &src.person_key, &people_rules)?;
        report.stages.validate = Some(t.elapsed().as_secs_f64());
        report.companies = Some(EntityCounts::new(pulled.companies, companies));
        report.people = Some(EntityCounts::new(pulled.people, people));
        Ok(())
    })();
    match loaded {
        Ok(()) => txn_exec("COMMIT")?,
        Err(e) => {
            let _ = txn_exec("ROLLBACK");
            return Err(e);
        }
    }
    drop(txn);
    check_cancel(cancel)?;

    let t = Instant::now();
    report.files = match streamed {
        Some(files) => files.finish(&entities)?,
        None => export::export_all(
            wb,
            state,
            &config.export,
            &entities,
            config.workbench.export_lanes(),
        )?,
    };
    report.stages.export = Some(t.elapsed().as_secs_f64());
    check_cancel(cancel)?;

    // The gates sit between export and publish: the files are on disk for
    // whoever investigates, the bucket keeps the last good ones.
    if let (Some(c), Some(p)) = (&report.companies, &report.people) {
        let previous = match opts.gates.max_row_delta {
            Some(_) => previous_success(&mut client, config, state)?,
            None => None,
        };
        report.gates = gates::evaluate(&opts.gates, c, p, previous.as_ref());
    }
    if let Some(reason) = gates::reason(&report.gates) {
        if !opts.force {
            return Err(PipelineError::Gated(reason));
        }
        tracing::warn!(%reason, "publishing anyway: --force");
    }

    if opts.dry_run {
        return Ok(());
    }
    let t = Instant::now();
    let published = publish::publish(
        &config.storage,
        &config.retry,
        state,
        &report.files,
        cancel,
        &mut report.objects,
    );
    report.stages.publish = Some(t.elapsed().as_secs_f64());
    for o in report.objects.iter().filter(|o| o.action == "uploaded") {
        wb.record_upload(&o.key, &o.sha256, o.bytes, &report.run_id)?;
    }
    published
}
