//! The run rows of `main.runs`: a run's start, its end, the runs a dead
//! process left `running`, and the audit records that wait to be written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use duckdb::Connection;

use super::{outbox, Workbench, WorkbenchError};

/// The error recorded for an abandoned run, in the workbench and the audit.
pub const ABANDONED: &str =
    "the process running it stopped before it finished (crash, kill -9 or power loss)";

/// How a run ended, as its row in `main.runs` keeps it (the run's report
/// is stored whole, as JSON, beside the columns `history` sorts and filters
/// on).
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub run_id: String,
    pub state: String,
    pub status: String,
    pub dry_run: bool,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub audit_id: Option<i64>,
    pub error: Option<String>,
    pub report: serde_json::Value,
    /// Its audit record could not be written and waits here to be sent.
    pub audit_pending: bool,
}

/// An audit record that waits in the workbench to be written.
#[derive(Debug, Clone)]
pub struct PendingAudit {
    pub run_id: String,
    pub details: serde_json::Value,
}

/// A run found still `running` when no process was running it.
#[derive(Debug, Clone)]
pub struct AbandonedRun {
    pub run_id: String,
    pub state: String,
    pub dry_run: bool,
    pub started_at_us: i64,
}

/// Run endings this process could not write into a workbench (its disk
/// was full, say), oldest first: written before anything else the next
/// time that file is written to, so the run's row does not stay `running`
/// and is not taken for an abandoned one.
fn unrecorded() -> &'static Mutex<HashMap<PathBuf, Vec<FinishedRun>>> {
    static RUNS: OnceLock<Mutex<HashMap<PathBuf, Vec<FinishedRun>>>> = OnceLock::new();
    RUNS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Runs found abandoned when the file was opened, not yet handed to
/// [`Workbench::take_abandoned`].
fn found_abandoned() -> &'static Mutex<HashMap<PathBuf, Vec<AbandonedRun>>> {
    static RUNS: OnceLock<Mutex<HashMap<PathBuf, Vec<AbandonedRun>>>> = OnceLock::new();
    RUNS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Writes the run endings kept for `path`, oldest first, each removed
/// once written. One that fails is kept for the next time (a full disk, a
/// conflicting writer), with all after it: a failed commit spoils the
/// opening for any more writes (see `open::Writes`). One a constraint
/// refuses can never be written, and is dropped, said in the log, so that
/// it does not hold up the others; its row stays `running` and is taken
/// for abandoned at the next opening (its audit record, written by its
/// run, is not written twice). Returns the first failure.
fn record_unrecorded(conn: &Connection, path: &Path) -> Result<(), duckdb::Error> {
    let mut all = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
    let Some(runs) = all.remove(path) else {
        return Ok(());
    };
    let mut first_error = None;
    let mut kept = Vec::new();
    for run in runs {
        if first_error.is_some() && !kept.is_empty() {
            kept.push(run);
            continue;
        }
        let Err(e) = insert_finished(conn, &run) else {
            continue;
        };
        let text = e.to_string();
        if text.contains("Constraint Error") {
            tracing::error!(run_id = %run.run_id, error = %text, "the run's end cannot be recorded in the workbench; given up");
        } else {
            kept.push(run);
        }
        first_error.get_or_insert(e);
    }
    if !kept.is_empty() {
        all.insert(path.to_path_buf(), kept);
    }
    first_error.map_or(Ok(()), Err)
}

fn insert_finished(conn: &Connection, run: &FinishedRun) -> Result<(), duckdb::Error> {
    conn.execute(
        "INSERT INTO main.runs (run_id, state, status, dry_run, started_at, finished_at,
             audit_id, error, report, audit_pending)
         VALUES (?, ?, ?, ?, make_timestamp(?), make_timestamp(?), ?, ?, ?, ?)
         ON CONFLICT (run_id) DO UPDATE SET status = excluded.status,
             finished_at = excluded.finished_at, audit_id = excluded.audit_id,
             error = excluded.error, report = excluded.report,
             audit_pending = excluded.audit_pending",
        duckdb::params![
            run.run_id,
            run.state,
            run.status,
            run.dry_run,
            run.started_at.timestamp_micros(),
            run.finished_at.map(|t| t.timestamp_micros()),
            run.audit_id,
            run.error,
            run.report.to_string(),
            run.audit_pending,
        ],
    )
    .map(drop)
}

/// Run when the file is opened afresh, by this process alone (the file's
/// lock keeps others out, and no run of this process has it open): a run
/// row still `running` belongs to a process that died. Endings this
/// process could not write go in first; while they cannot, nothing is
/// taken for abandoned.
pub(super) fn after_opening(
    conn: &Connection,
    path: &Path,
    dir: &Path,
    writes: &super::open::Writes,
) {
    if writes.run(path, || record_unrecorded(conn, path)).is_err() {
        return;
    }
    let abandoned = writes.run(path, || mark_abandoned(conn));
    // Their records, and those a version before the outbox left pending in
    // the rows, go to the outbox; those it has already stay as they are.
    let kept = pending_in_rows(conn)
        .map_err(|e| e.to_string())
        .and_then(|records| outbox::keep(dir, records).map_err(|e| e.to_string()));
    if let Err(e) = kept {
        tracing::warn!(error = %e, "could not keep the pending audit records in the outbox");
    }
    match abandoned {
        Ok(runs) => {
            for run in &runs {
                let started =
                    chrono::DateTime::from_timestamp_micros(run.started_at_us).unwrap_or_default();
                tracing::warn!(state = %run.state, run_id = %run.run_id, started_at = %started,
                    "run abandoned by a previous process (crash, kill -9); its audit record is pending");
            }
            let mut found = found_abandoned().lock().unwrap_or_else(|p| p.into_inner());
            found.entry(path.to_path_buf()).or_default().extend(runs);
        }
        Err(e) => tracing::warn!(error = %e, "could not look for abandoned runs"),
    }
}

/// The runs whose row says their audit record waits, oldest first: the
/// run's own report, or for an abandoned run (which has none) what its row
/// says.
fn pending_in_rows(conn: &Connection) -> Result<Vec<PendingAudit>, duckdb::Error> {
    let mut stmt = conn.prepare(
        "SELECT run_id, state, status, epoch_us(started_at), epoch_us(finished_at), error,
                    report
             FROM main.runs WHERE audit_pending ORDER BY started_at, run_id",
    )?;
    let rows = stmt.query_map([], |r| {
        let time = |us: Option<i64>| us.and_then(chrono::DateTime::from_timestamp_micros);
        let report: Option<String> = r.get(6)?;
        let details = match report.and_then(|j| serde_json::from_str(&j).ok()) {
            Some(json) => json,
            None => serde_json::json!({
                "state": r.get::<_, String>(1)?,
                "run_id": r.get::<_, String>(0)?,
                "status": r.get::<_, String>(2)?,
                "started_at": time(r.get(3)?),
                "finished_at": time(r.get(4)?),
                "error": r.get::<_, Option<String>>(5)?,
            }),
        };
        Ok(PendingAudit {
            run_id: r.get(0)?,
            details,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
}

/// Marks every run row still `running` as `abandoned`, its audit record
/// pending (dry runs have none), and returns them.
fn mark_abandoned(conn: &Connection) -> Result<Vec<AbandonedRun>, duckdb::Error> {
    let mut stmt = conn.prepare(
        "UPDATE main.runs SET status = 'abandoned', finished_at = make_timestamp(?),
             error = ?, audit_pending = NOT dry_run
         WHERE status = 'running'
         RETURNING run_id, state, dry_run, epoch_us(started_at)",
    )?;
    let rows = stmt.query_map(
        duckdb::params![chrono::Utc::now().timestamp_micros(), ABANDONED],
        |r| {
            Ok(AbandonedRun {
                run_id: r.get(0)?,
                state: r.get(1)?,
                dry_run: r.get(2)?,
                started_at_us: r.get(3)?,
            })
        },
    )?;
    rows.collect()
}

impl Workbench {
    /// Records that a run started, so a crash leaves a trace.
    pub fn run_started(
        &self,
        run_id: &str,
        state: &str,
        dry_run: bool,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), WorkbenchError> {
        self.write(|conn| {
            conn.execute(
                "INSERT INTO main.runs (run_id, state, status, dry_run, started_at)
                 VALUES (?, ?, 'running', ?, make_timestamp(?))",
                duckdb::params![run_id, state, dry_run, started_at.timestamp_micros()],
            )
        })
        .map(drop)
    }

    /// Records how the run ended; `audit_pending` when its audit record
    /// could not be written and waits here to be sent. A run that failed
    /// before the workbench was opened has no row yet and gets one now.
    /// Endings that could not be written before go first; one that cannot
    /// be written now is kept, and written with the next.
    pub fn run_finished(&self, run: FinishedRun) -> Result<(), WorkbenchError> {
        let kept = match run.audit_pending {
            true => outbox::keep(
                &self.dir,
                vec![PendingAudit {
                    run_id: run.run_id.clone(),
                    details: run.report.clone(),
                }],
            )
            .map_err(|e| self.outbox_err(e)),
            false => Ok(()),
        };
        {
            let mut all = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
            all.entry(self.path.clone()).or_default().push(run);
        }
        let recorded = self.write(|conn| record_unrecorded(conn, &self.path));
        kept.and(recorded)
    }

    /// Keeps the run's failing-row samples (JSON) for its report page.
    pub fn record_samples(&self, run_id: &str, samples: &str) -> Result<(), WorkbenchError> {
        self.write(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO main.run_samples (run_id, samples) VALUES (?, ?)",
                duckdb::params![run_id, samples],
            )
        })
        .map(drop)
    }

    /// The corrupt state file this process set aside when it opened this
    /// one, handed out once.
    pub fn take_set_aside(&self) -> Option<super::SetAside> {
        super::open::take_set_aside(&self.path)
    }

    /// Whether this state file was made new by this process and its
    /// history is still to be seeded from the audit; asked once.
    pub fn take_new(&self) -> bool {
        super::open::take_new(&self.path)
    }

    /// Seeds a new state file's history with runs the audit recorded
    /// (`(audit id, details)`), those it lacks: so the report pages'
    /// charts, the metrics' last success and the catch-up of missed fires
    /// go on where they were. Returns how many went in.
    pub fn seed_history(
        &self,
        audited: &[(i64, serde_json::Value)],
    ) -> Result<usize, WorkbenchError> {
        let time = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_micros())
        };
        // One commit for them all: one each took ~20 ms of fsync, most of
        // ten seconds for 400 runs (seen in the fault soak).
        self.write(|conn| {
            conn.execute_batch("BEGIN")?;
            let mut added = 0;
            for (id, d) in audited {
                let (Some(run_id), Some(state), Some(status), Some(started)) = (
                    d["run_id"].as_str(),
                    d["state"].as_str(),
                    d["status"].as_str(),
                    time(&d["started_at"]),
                ) else {
                    continue;
                };
                let inserted = conn.execute(
                    "INSERT INTO main.runs (run_id, state, status, dry_run, started_at, finished_at,
                         audit_id, error, report, audit_pending)
                     VALUES (?, ?, ?, false, make_timestamp(?), make_timestamp(?), ?, ?, ?, false)
                     ON CONFLICT DO NOTHING",
                    duckdb::params![
                        run_id,
                        state,
                        status,
                        started,
                        time(&d["finished_at"]),
                        id,
                        d["error"].as_str(),
                        d.to_string(),
                    ],
                );
                match inserted {
                    Ok(n) => added += n,
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK");
                        return Err(e);
                    }
                }
            }
            conn.execute_batch("COMMIT")?;
            Ok(added)
        })
    }

    /// Runs left `running` by a process that died (kill -9, power loss),
    /// found when this process opened the file and marked `abandoned`
    /// there, with their audit records pending (dry runs have none); each
    /// is handed out once.
    pub fn take_abandoned(&self) -> Vec<AbandonedRun> {
        let mut found = found_abandoned().lock().unwrap_or_else(|p| p.into_inner());
        found.remove(&self.path).unwrap_or_default()
    }

    /// The audit records still to be written, oldest first, from the
    /// outbox beside the state file.
    pub fn pending_audits(&self) -> Result<Vec<PendingAudit>, WorkbenchError> {
        outbox::pending(&self.dir).map_err(|e| self.outbox_err(e))
    }

    /// The run's audit record is written, as `audit_id`: said in the
    /// outbox first, which is what is sent from.
    pub fn audited(&self, run_id: &str, audit_id: i64) -> Result<(), WorkbenchError> {
        outbox::sent(&self.dir, run_id, audit_id).map_err(|e| self.outbox_err(e))?;
        self.write(|conn| {
            conn.execute(
                "UPDATE main.runs SET audit_id = ?, audit_pending = false WHERE run_id = ?",
                duckdb::params![audit_id, run_id],
            )
        })
        .map(drop)
    }

    fn outbox_err(&self, e: std::io::Error) -> WorkbenchError {
        WorkbenchError::Outbox {
            path: outbox::path(&self.dir),
            detail: e.to_string(),
        }
    }

    /// Per state, when its last real run and its last success (audited)
    /// finished, in Unix seconds: what the metrics start from.
    #[allow(clippy::type_complexity)]
    pub fn last_finished(&self) -> Result<Vec<(String, Option<f64>, Option<f64>)>, WorkbenchError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT state, epoch_ms(max(finished_at)) / 1000.0,
                        epoch_ms(max(finished_at) FILTER (WHERE status = 'success'
                            AND NOT coalesce(audit_pending, false))) / 1000.0
                 FROM main.runs
                 WHERE NOT dry_run AND status NOT IN ('running', 'skipped')
                 GROUP BY state ORDER BY state",
            )
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.sql_err(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql_err(e))
    }

    /// When the last real (not dry) run of `state` started, in epoch µs.
    pub fn last_started(&self, state: &str) -> Result<Option<i64>, WorkbenchError> {
        self.conn()
            .query_row(
                "SELECT epoch_us(max(started_at)) FROM main.runs WHERE state = ? AND NOT dry_run",
                [state],
                |r| r.get(0),
            )
            .map_err(|e| self.sql_err(e))
    }

    /// When the last real run that was part of an all-states run started,
    /// in epoch µs.
    pub fn last_all_states_started(&self) -> Result<Option<i64>, WorkbenchError> {
        self.conn()
            .query_row(
                "SELECT epoch_us(max(started_at)) FROM main.runs
                 WHERE NOT dry_run AND report LIKE '%\"batch_id\":%'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkbenchConfig;

    fn ended(run_id: &str, status: &str) -> FinishedRun {
        FinishedRun {
            run_id: run_id.into(),
            state: "WV".into(),
            status: status.into(),
            dry_run: false,
            started_at: chrono::Utc::now(),
            finished_at: Some(chrono::Utc::now()),
            audit_id: Some(1),
            error: None,
            report: serde_json::json!({}),
            audit_pending: false,
        }
    }

    fn status(wb: &Workbench, run_id: &str) -> String {
        wb.conn()
            .query_row(
                "SELECT status FROM main.runs WHERE run_id = ?",
                [run_id],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// A run's ending that cannot be written (here another writer holds its
    /// row; in the fault soak, a full disk) is kept and written before the
    /// next: its row neither stays `running` nor is taken for abandoned.
    #[test]
    fn an_ending_that_cannot_be_written_is_written_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WorkbenchConfig {
            dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let wb = Workbench::open(&cfg).unwrap();
        let now = chrono::Utc::now();
        wb.run_started("r1", "WV", false, now).unwrap();
        let other = wb.connection().unwrap();
        other
            .execute_batch("BEGIN; UPDATE main.runs SET error = 'x' WHERE run_id = 'r1'")
            .unwrap();
        assert!(wb.run_finished(ended("r1", "success")).is_err());
        other.execute_batch("ROLLBACK").unwrap();
        drop(other);
        assert_eq!(status(&wb, "r1"), "running");
        wb.run_started("r2", "WV", false, now).unwrap();
        wb.run_finished(ended("r2", "failed")).unwrap();
        assert_eq!(status(&wb, "r1"), "success");
        assert_eq!(status(&wb, "r2"), "failed");
        drop(wb);

        // A row left running by a process that died is abandoned at the
        // next opening of the file, and handed out once.
        let wb = Workbench::open(&cfg).unwrap();
        wb.run_started("r3", "WV", false, now).unwrap();
        drop(wb);
        let wb = Workbench::open(&cfg).unwrap();
        let taken: Vec<String> = wb.take_abandoned().into_iter().map(|r| r.run_id).collect();
        assert_eq!(taken, ["r3"]);
        assert!(wb.take_abandoned().is_empty());
        assert_eq!(status(&wb, "r3"), "abandoned");
        assert_eq!(status(&wb, "r1"), "success");
    }
}
