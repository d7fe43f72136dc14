//! `history`: the recent runs recorded in the workbench's `main.runs`, as
//! the analysts' catalog copies them after each run.
//!
//! Each run row keeps the whole run report as JSON, so everything the
//! summary showed at the time (counts, uploads, gate verdicts) can be shown
//! again. Runs that never finished (abandoned) have no report; their row's
//! own columns are all there is.

use chrono::DateTime;
use serde::Serialize;

use crate::config::Config;
use crate::pipeline::report::{RunReport, RunStatus};
use crate::quality::samples::RuleSample;
use crate::state::StateCode;
use crate::workbench::{self, WorkbenchError};

/// One run as the workbench recorded it: its report, and where its audit
/// record stands.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub report: RunReport,
    /// The audit row's id (the report was written before the id existed).
    pub audit_id: Option<i64>,
    /// The audit record could not be written yet (PostgreSQL unreachable);
    /// it is sent by the next run that reaches PostgreSQL.
    pub audit_pending: bool,
}

/// The newest `limit` runs, of `state` or of every state, newest first.
/// Empty when the workbench does not exist yet.
pub fn read(
    config: &Config,
    state: Option<&StateCode>,
    limit: usize,
) -> Result<Vec<Entry>, WorkbenchError> {
    let Some(conn) = workbench::open_history(&config.workbench)? else {
        return Ok(Vec::new());
    };
    read_from(&conn, &config.workbench.dir, state, limit)
}

/// Every host's audited runs that pass `filter`, newest first: what the
/// audit table holds (dry runs are not audited).
pub fn read_audited(
    config: &Config,
    filter: &crate::ledger::audit::RunFilter,
) -> Result<Vec<Entry>, crate::error::PipelineError> {
    let mut session =
        crate::source::connect::Session::lazy(&config.source, &config.retry.single_try());
    let never = tokio_util::sync::CancellationToken::new();
    let rows = crate::ledger::audit::runs(&mut session, &config.audit_table(), filter, &never)?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, details)| {
            let report: RunReport = serde_json::from_value(details).ok()?;
            Some(Entry {
                report,
                audit_id: Some(id),
                audit_pending: false,
            })
        })
        .collect())
}

/// [`read`], on a connection already open (a run's own, for its page).
pub fn read_from(
    conn: &duckdb::Connection,
    dir: &std::path::Path,
    state: Option<&StateCode>,
    limit: usize,
) -> Result<Vec<Entry>, WorkbenchError> {
    let err = sql_err(dir);
    let mut stmt = conn
        .prepare(
            "SELECT run_id, state, status, dry_run, epoch_us(started_at), epoch_us(finished_at),
                    audit_id, error, report, coalesce(audit_pending, false)
             FROM main.runs WHERE ?::VARCHAR IS NULL OR state = ?
             ORDER BY started_at DESC, run_id LIMIT ?",
        )
        .map_err(&err)?;
    let state = state.map(|s| s.as_str().to_string());
    let rows = stmt
        .query_map(duckdb::params![state, state, limit as i64], |r| {
            // The report as the run wrote it; a run that never finished
            // (abandoned) has none, and its row's columns are all there is.
            let mut report: RunReport = r
                .get::<_, Option<String>>(8)?
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_default();
            // The row is the newer word on how the run ended.
            report.run_id = r.get(0)?;
            report.state = r.get(1)?;
            let status: String = r.get(2)?;
            report.status = RunStatus::from_name(&status).unwrap_or(report.status);
            report.dry_run = r.get(3)?;
            report.started_at = DateTime::from_timestamp_micros(r.get(4)?).unwrap_or_default();
            report.finished_at = r
                .get::<_, Option<i64>>(5)?
                .and_then(DateTime::from_timestamp_micros);
            report.duration_secs = report
                .finished_at
                .map(|f| (f - report.started_at).num_milliseconds() as f64 / 1000.0);
            report.error = r.get(7)?;
            Ok(Entry {
                report,
                audit_id: r.get(6)?,
                audit_pending: r.get(9)?,
            })
        })
        .map_err(&err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

/// The failing rows a run kept for its page (none for a run made with
/// `sample_rows = 0`, or by a version before them).
pub fn samples(
    conn: &duckdb::Connection,
    dir: &std::path::Path,
    run_id: &str,
) -> Result<Vec<RuleSample>, WorkbenchError> {
    // A workbench made before samples has no table of them.
    let err = sql_err(dir);
    let made: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM duckdb_tables()
             WHERE schema_name = 'main' AND table_name = 'run_samples'",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    if !made {
        return Ok(Vec::new());
    }
    let json: Option<String> = conn
        .query_row(
            "SELECT max(samples) FROM main.run_samples WHERE run_id = ?",
            [run_id],
            |r| r.get(0),
        )
        .map_err(&err)?;
    Ok(json
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default())
}

fn sql_err(dir: &std::path::Path) -> impl Fn(duckdb::Error) -> WorkbenchError {
    let path = workbench::Workbench::db_path(dir);
    move |e| WorkbenchError::Sql {
        path: path.clone(),
        detail: e.to_string(),
    }
}
