//! `history`: the recent runs recorded in the workbench's `main.runs`.
//!
//! Each run row keeps the whole run report as JSON, so everything the
//! summary showed at the time (counts, uploads, gate verdicts) can be shown
//! again. Runs that never finished (abandoned) have no report; their row's
//! own columns are all there is.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::pipeline::gates::GateResult;
use crate::pipeline::EntityCounts;
use crate::state::StateCode;
use crate::workbench::{self, WorkbenchError};

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub run_id: String,
    pub state: String,
    pub status: String,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<f64>,
    pub companies: Option<EntityCounts>,
    pub people: Option<EntityCounts>,
    pub uploaded: Option<u64>,
    pub skipped: Option<u64>,
    pub gates: Vec<GateResult>,
    pub forced: bool,
    pub audit_id: Option<i64>,
    /// The audit record could not be written yet (PostgreSQL unreachable);
    /// it is sent by the next run that reaches PostgreSQL.
    pub audit_pending: bool,
    pub error: Option<String>,
}

/// The newest `limit` runs, of `state` or of every state, newest first.
/// Empty when the workbench does not exist yet.
pub fn read(
    config: &Config,
    state: Option<&StateCode>,
    limit: usize,
) -> Result<Vec<Entry>, WorkbenchError> {
    let path = workbench::Workbench::db_path(&config.workbench.dir);
    let Some(conn) = workbench::open_read_only(&config.workbench, config.lock_timeout())? else {
        return Ok(Vec::new());
    };
    let err = |e: duckdb::Error| WorkbenchError::Sql {
        path: path.clone(),
        detail: e.to_string(),
    };
    let mut stmt = conn
        .prepare(
            "SELECT run_id, state, status, dry_run, epoch_us(started_at), epoch_us(finished_at),
                    audit_id, error, report, coalesce(audit_pending, false)
             FROM main.runs WHERE ?::VARCHAR IS NULL OR state = ?
             ORDER BY started_at DESC, run_id LIMIT ?",
        )
        .map_err(err)?;
    let state = state.map(|s| s.as_str().to_string());
    let rows = stmt
        .query_map(duckdb::params![state, state, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, bool>(9)?,
            ))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (run_id, state, status, dry_run, started, finished, audit_id, error, report, pending) =
            row.map_err(err)?;
        let json: serde_json::Value = report
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        let started_at = DateTime::from_timestamp_micros(started).unwrap_or_default();
        let finished_at = finished.and_then(DateTime::from_timestamp_micros);
        out.push(Entry {
            run_id,
            state,
            status,
            dry_run,
            started_at,
            finished_at,
            duration_secs: finished_at.map(|f| (f - started_at).num_milliseconds() as f64 / 1000.0),
            companies: field(&json, "companies"),
            people: field(&json, "people"),
            uploaded: json["uploaded"].as_u64(),
            skipped: json["skipped"].as_u64(),
            gates: field(&json, "gates").unwrap_or_default(),
            forced: json["forced"].as_bool().unwrap_or(false),
            audit_id,
            audit_pending: pending,
            error,
        });
    }
    Ok(out)
}

/// A report field, if the report has it in the expected shape (reports of
/// older versions lack some).
fn field<T: serde::de::DeserializeOwned>(json: &serde_json::Value, key: &str) -> Option<T> {
    serde_json::from_value(json[key].clone()).ok()
}

/// One line per run, plus a line for a run's error.
pub fn table(entries: &[Entry]) -> String {
    let mut s = format!(
        "{:<19}  {:<5} {:<9} {:>8}  {:>17}  {:>17}  {:>7}  {}\n",
        "STARTED (UTC)",
        "STATE",
        "STATUS",
        "TIME",
        "COMPANIES GOOD/BAD",
        "PEOPLE GOOD/BAD",
        "UP/SKIP",
        "GATES"
    );
    let counts = |c: &Option<EntityCounts>| {
        c.as_ref()
            .map(|c| format!("{}/{}", c.good, c.bad))
            .unwrap_or_else(|| "-".into())
    };
    for e in entries {
        let tripped: Vec<String> = e
            .gates
            .iter()
            .filter(|g| g.tripped)
            .map(|g| g.describe())
            .collect();
        let gates = match (e.gates.is_empty(), tripped.is_empty()) {
            (true, _) => "-".to_string(),
            (false, true) => "ok".to_string(),
            (false, false) if e.forced => format!("forced past {}", tripped.join("; ")),
            (false, false) => tripped.join("; "),
        };
        let status = if e.dry_run {
            format!("{}*", e.status)
        } else {
            e.status.clone()
        };
        let up_skip = match (e.uploaded, e.skipped) {
            (Some(u), Some(k)) if !e.dry_run && e.status != "gated" => format!("{u}/{k}"),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "{:<19}  {:<5} {:<9} {:>8}  {:>17}  {:>17}  {:>7}  {}\n",
            e.started_at.format("%Y-%m-%d %H:%M:%S"),
            e.state,
            status,
            e.duration_secs
                .map(|d| format!("{d:.1}s"))
                .unwrap_or_else(|| "-".into()),
            counts(&e.companies),
            counts(&e.people),
            up_skip,
            gates
        ));
        // A gated run's reason is its GATES column already.
        let shown = e.status == "success" || e.status == "gated";
        if let Some(err) = e.error.as_deref().filter(|_| !shown) {
            s.push_str(&format!("    {}: {err}\n", e.run_id));
        }
        if e.audit_pending {
            s.push_str(&format!(
                "    {}: audit record not written yet; sent when PostgreSQL answers again\n",
                e.run_id
            ));
        }
    }
    if entries.iter().any(|e| e.dry_run) {
        s.push_str("* dry run: nothing published or audited\n");
    }
    s
}
