//! The persistent DuckDB workbench: `<dir>/duck/outreach_workbench.duckdb`.
//!
//! Each state's tables live in a schema named after it (`wv.companies_raw`,
//! `wv.companies_good`, ...) so runs of different states never overwrite each
//! other. The project's own bookkeeping lives in `main`: `runs` (one row per
//! run, what `history` reads) and `upload_manifest` (what was last uploaded
//! to each object key).
//!
//! DuckDB lets one process at a time open a file for writing. A second
//! process (an analyst's CLI, a manual `run` while the daemon works) waits
//! up to `lock_timeout`, then gets an error that says who holds it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use duckdb::Connection;

use crate::config::WorkbenchConfig;
pub use ow_duckdb::{
    chunk_rows, Chunk, ChunkConverter, Database, DuckError, NextChunk, RawConnection, Template,
};

#[derive(Debug, thiserror::Error)]
pub enum WorkbenchError {
    #[error("workbench {path} is busy: another process has held it for {waited:?} ({detail}); try again when it finishes, or stop the process holding it")]
    Busy {
        path: PathBuf,
        waited: Duration,
        detail: String,
    },
    #[error("cannot open workbench {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("workbench {path}: {detail}")]
    Sql { path: PathBuf, detail: String },
}

pub struct Workbench {
    /// Taken only by `drop`, under the lock of the open files.
    conn: Option<Connection>,
    /// The open database `conn` belongs to, for [`Workbench::raw_connection`].
    db: Option<Arc<Database>>,
    pub dir: PathBuf,
    pub path: PathBuf,
}

/// Stops [`Workbench::background_sync`] when dropped.
///
/// The thread is not waited for: a sync under way finishes on its own while
/// the run goes on to its commit, whose own fsync waits for the same
/// writes; the thread's own handle on the file keeps that harmless.
pub struct BackgroundSync {
    _stop: std::sync::mpsc::Sender<()>,
}

/// Workbench files open in this process, with how many `Workbench`es use
/// each. DuckDB must not open one file twice in a process (two instances
/// would write the same file), so concurrent runs in the daemon share one
/// database, each through connections of its own. The last one to finish closes it,
/// which releases the file lock for analysts between runs.
fn open_files() -> &'static Mutex<HashMap<PathBuf, OpenFile>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, OpenFile>>> = OnceLock::new();
    OPEN.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Drop for Workbench {
    /// The last user closes the database while it holds the lock of the
    /// open files: a run opening the file at that moment waits for the
    /// close (its checkpoint) to finish, then opens it afresh. Closed after
    /// the lock, a concurrent open attached the file in a second instance
    /// mid-checkpoint and read a short block ("Could not read enough bytes",
    /// seen with four runs at once).
    fn drop(&mut self) {
        let mut open = open_files().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = open.get_mut(&self.path) {
            file.users -= 1;
            if file.users == 0 {
                open.remove(&self.path);
            }
        }
        self.conn.take();
        self.db.take();
    }
}

struct OpenFile {
    db: Arc<Database>,
    users: usize,
}

/// Run endings this process could not write into a workbench (its disk
/// was full, say), oldest first: written before anything else the next
/// time that file is written to, so the run's row does not stay `running`
/// and is not taken for an abandoned one. Its lock is also held by every
/// write of a run row, so that they go one at a time.
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
/// conflicting writer), unless a constraint refuses it: that one can never
/// be written (seen after a full disk broke main.runs' key index), and is
/// dropped, said in the log, so that it does not hold up the others; its
/// row stays `running` and is taken for abandoned at the next opening (its
/// audit record, written by its run, is not written twice). Returns the
/// first failure.
fn record_unrecorded(conn: &Connection, path: &Path) -> Result<(), duckdb::Error> {
    let mut all = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
    let Some(runs) = all.remove(path) else {
        return Ok(());
    };
    let mut first_error = None;
    let mut kept = Vec::new();
    for run in runs {
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

/// Opens `path` with `open`, retrying while another process holds the
/// file's lock, up to `lock_timeout`.
fn wait_for_lock<T>(
    path: &Path,
    lock_timeout: Duration,
    open: impl Fn() -> duckdb::Result<T>,
) -> Result<T, WorkbenchError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        match open() {
            Ok(c) => return Ok(c),
            Err(e) => {
                let detail = e.to_string();
                let path = path.to_path_buf();
                if !detail.contains("lock") {
                    return Err(WorkbenchError::Open { path, detail });
                }
                if start.elapsed() >= lock_timeout {
                    return Err(WorkbenchError::Busy {
                        path,
                        waited: start.elapsed(),
                        detail,
                    });
                }
                if !logged {
                    tracing::info!(path = %path.display(), "workbench is busy; waiting");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Opens the workbench read-only for `history`, without creating anything:
/// `None` when no run has created it yet. Readers in several processes may
/// share the file; a run in progress elsewhere makes this wait.
pub fn open_read_only(cfg: &WorkbenchConfig) -> Result<Option<Connection>, WorkbenchError> {
    let path = Workbench::db_path(&cfg.dir);
    if !path.exists() {
        return Ok(None);
    }
    wait_for_lock(&path, cfg.lock_timeout, || {
        let flags = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?;
        Connection::open_with_flags(&path, flags)
    })
    .map(Some)
}

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

/// A transaction on a connection of its own: rolled back when dropped
/// unless committed, so a stage that fails, is cancelled or panics half-way
/// leaves the state's previous tables as they were.
pub struct Transaction {
    conn: RawConnection,
    open: bool,
}

impl Transaction {
    pub fn begin(conn: RawConnection) -> Result<Transaction, DuckError> {
        conn.execute("BEGIN")?;
        Ok(Transaction { conn, open: true })
    }

    /// A commit that fails is rolled back by DuckDB itself.
    pub fn commit(mut self) -> Result<(), DuckError> {
        self.open = false;
        self.conn.execute("COMMIT")
    }
}

impl std::ops::Deref for Transaction {
    type Target = RawConnection;
    fn deref(&self) -> &RawConnection {
        &self.conn
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.open {
            // The error of the statement that failed is the one to report.
            let _ = self.conn.execute("ROLLBACK");
        }
    }
}

/// Makes room for a view (`view`) or a table named `schema.name` by
/// dropping a relation of the other kind: the link rule's runs keep their
/// raw rows in a table, the others' are a view over their files, and a
/// workbench of an earlier version has tables.
pub fn drop_other_kind(
    conn: &RawConnection,
    schema: &str,
    name: &str,
    view: bool,
) -> Result<(), DuckError> {
    let (catalog, column, other) = match view {
        true => ("duckdb_tables()", "table_name", "TABLE"),
        false => ("duckdb_views()", "view_name", "VIEW"),
    };
    let found = conn.query_row_i64(&format!(
        "SELECT count(*) FROM {catalog} WHERE schema_name = {} AND {column} = {}",
        crate::ident::quote_literal(schema),
        crate::ident::quote_literal(name)
    ))?;
    if found.first().copied().unwrap_or(0) > 0 {
        conn.execute(&format!(
            "DROP {other} {}.{}",
            crate::ident::quote_ident(schema),
            crate::ident::quote_ident(name)
        ))?;
    }
    Ok(())
}

impl Workbench {
    /// The workbench's own connection.
    pub fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("taken only when dropped")
    }

    fn db(&self) -> &Arc<Database> {
        self.db.as_ref().expect("taken only when dropped")
    }

    pub fn db_path(dir: &Path) -> PathBuf {
        dir.join("duck").join("outreach_workbench.duckdb")
    }

    pub fn exports_dir(&self) -> PathBuf {
        self.dir.join("exports")
    }

    /// Opens (creating if needed) the workbench, waiting for a busy file.
    pub fn open(cfg: &WorkbenchConfig) -> Result<Workbench, WorkbenchError> {
        let dir = cfg.dir.clone();
        let path = Self::db_path(&dir);
        for sub in ["duck", "exports", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| WorkbenchError::Open {
                path: path.clone(),
                detail: format!("creating {}: {e}", d.display()),
            })?;
        }
        let (db, conn) = Self::connect(cfg, &path, cfg.lock_timeout)?;
        Ok(Workbench {
            conn: Some(conn),
            db: Some(db),
            dir,
            path,
        })
    }

    /// A connection to the file: to this process's open database if there
    /// is one, else to a newly opened one, waiting up to `lock_timeout` for
    /// another process to let go of the file.
    fn connect(
        cfg: &WorkbenchConfig,
        path: &Path,
        lock_timeout: Duration,
    ) -> Result<(Arc<Database>, Connection), WorkbenchError> {
        let mut open = open_files().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = open.get_mut(path) {
            let conn = file.db.connection().map_err(|e| WorkbenchError::Open {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
            file.users += 1;
            return Ok((file.db.clone(), conn));
        }
        let path = path.to_path_buf();
        let db = wait_for_lock(&path, lock_timeout, || Database::open(&path))?;
        let conn = db.connection().map_err(|e| WorkbenchError::Open {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        // Settings and bookkeeping tables, once per opening of the file.
        let tmp = cfg.dir.join("duck").join("tmp");
        // Nothing is ever downloaded: the extensions we use are compiled in.
        //
        // One DuckDB thread: the parallelism is ours (the pull's reading and
        // loading threads, one export lane per file being written). DuckDB's
        // Parquet writer forms row groups one way on one thread and another
        // way, partly by timing, on several; with one thread the bytes
        // depend on the rows alone. While rows stream in, extra worker
        // threads only polled for work on the cores the reader and
        // PostgreSQL need. Measured on the benchmark: 0.3 s less CPU and
        // 0.25 s less wall time than with a thread per core.
        //
        // Every setting here is the instance's (DuckDB keeps them in the
        // database's config, which every connection's planner reads), so it
        // is made now, before the file is shared: a `SET` while other
        // connections plan queries can crash the process (it did, when
        // each file writer set `disabled_optimizers` for itself).
        conn.execute_batch(&format!(
            "SET autoinstall_known_extensions = false; SET autoload_known_extensions = false;
             SET threads = 1; SET memory_limit = '{}'; SET temp_directory = '{}';
             CREATE TABLE IF NOT EXISTS main.runs (
                 run_id VARCHAR PRIMARY KEY,
                 state VARCHAR NOT NULL,
                 status VARCHAR NOT NULL,
                 dry_run BOOLEAN NOT NULL,
                 started_at TIMESTAMP NOT NULL,   -- UTC
                 finished_at TIMESTAMP,           -- UTC
                 audit_id BIGINT,
                 error VARCHAR,
                 report VARCHAR,                   -- the run report as JSON text
                 audit_pending BOOLEAN DEFAULT false  -- its audit record is not written yet
             );
             -- Multipart uploads a run could not abort; the next run does.
             CREATE TABLE IF NOT EXISTS main.unfinished_uploads (
                 upload_id VARCHAR PRIMARY KEY,
                 object_key VARCHAR NOT NULL,
                 left_at TIMESTAMP NOT NULL       -- UTC
             );
             -- A few failing rows per rule, for the run's report page (JSON).
             CREATE TABLE IF NOT EXISTS main.run_samples (
                 run_id VARCHAR PRIMARY KEY,
                 samples VARCHAR NOT NULL
             );
             CREATE TABLE IF NOT EXISTS main.upload_manifest (
                 object_key VARCHAR PRIMARY KEY,
                 sha256 VARCHAR NOT NULL,
                 bytes BIGINT NOT NULL,
                 uploaded_at TIMESTAMP NOT NULL,  -- UTC
                 run_id VARCHAR NOT NULL
             );",
            cfg.memory_limit.replace('\'', "''"),
            tmp.to_string_lossy().replace('\'', "''"),
        ))
        .map_err(|e| WorkbenchError::Sql {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        // Workbenches made before `audit_pending` existed.
        let has_pending: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM duckdb_columns()
                 WHERE schema_name = 'main' AND table_name = 'runs' AND column_name = 'audit_pending'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| WorkbenchError::Sql {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if !has_pending {
            conn.execute_batch(
                "ALTER TABLE main.runs ADD COLUMN audit_pending BOOLEAN DEFAULT false",
            )
            .map_err(|e| WorkbenchError::Sql {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        }
        // Opened afresh, by this process alone (the file's lock keeps
        // others out, and no run of this process has it open): a run row
        // still `running` belongs to a process that died. Endings this
        // process could not write go in first; while they cannot, nothing
        // is taken for abandoned.
        if record_unrecorded(&conn, &path).is_ok() {
            match mark_abandoned(&conn) {
                Ok(runs) => {
                    for run in &runs {
                        let started = chrono::DateTime::from_timestamp_micros(run.started_at_us)
                            .unwrap_or_default();
                        tracing::warn!(state = %run.state, run_id = %run.run_id, started_at = %started,
                            "run abandoned by a previous process (crash, kill -9); its audit record is pending");
                    }
                    let mut found = found_abandoned().lock().unwrap_or_else(|p| p.into_inner());
                    found.entry(path.clone()).or_default().extend(runs);
                }
                Err(e) => tracing::warn!(error = %e, "could not look for abandoned runs"),
            }
        }
        open.insert(
            path,
            OpenFile {
                db: db.clone(),
                users: 1,
            },
        );
        Ok((db, conn))
    }

    /// The open database, for connections on other threads.
    pub fn database(&self) -> Arc<Database> {
        self.db().clone()
    }

    /// Another connection to the workbench, for work on its own thread.
    pub fn connection(&self) -> Result<Connection, WorkbenchError> {
        self.db().connection().map_err(|e| self.sql_err(e))
    }

    /// Starts flushing the file's new pages to disk in the background, until
    /// the returned guard is dropped.
    ///
    /// A pull writes the state's tables into the file as it goes (see
    /// [`ow_duckdb::ROW_GROUP_SIZE`]), but only into the page cache; the commit's
    /// fsync then had to write all of it at once, ~85 MB for the benchmark,
    /// with every core idle. Syncing every 100 ms from a thread of its own
    /// spreads those writes over the pull. It is safe at any moment: DuckDB
    /// syncs its data blocks before the header that points to them, and an
    /// early write of either changes nothing. Measured on the benchmark:
    /// the commit went from ~0.17 s to ~0.08 s and the pull got faster too,
    /// 0.27 s less in all (medians of 9 interleaved runs).
    pub fn background_sync(&self) -> BackgroundSync {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = self.path.clone();
        std::thread::spawn(move || {
            let Ok(file) = std::fs::File::open(&path) else {
                return;
            };
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(100))
            {
                // A failed sync is DuckDB's to see at its own fsync.
                let _ = file.sync_data();
            }
        });
        BackgroundSync { _stop: stop }
    }

    /// A connection through DuckDB's C API, for the pull's transaction
    /// (see [`raw`]).
    pub fn raw_connection(&self) -> Result<RawConnection, WorkbenchError> {
        RawConnection::connect(self.db()).map_err(|e| WorkbenchError::Open {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Records that a run started, so a crash leaves a trace.
    pub fn run_started(
        &self,
        run_id: &str,
        state: &str,
        dry_run: bool,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), WorkbenchError> {
        // The run rows are written one at a time in this process (see
        // `unrecorded`): concurrent appends to main.runs while the disk was
        // full left a row whose key was three keys run together (DuckDB
        // 1.4.5, seen in the fault soak).
        let _one_at_a_time = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
        self.conn()
            .execute(
                "INSERT INTO main.runs (run_id, state, status, dry_run, started_at)
                 VALUES (?, ?, 'running', ?, make_timestamp(?))",
                duckdb::params![run_id, state, dry_run, started_at.timestamp_micros()],
            )
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
    }

    /// Records how the run ended; `audit_pending` when its audit record
    /// could not be written and waits here to be sent. A run that failed
    /// before the workbench was opened has no row yet and gets one now.
    /// Endings that could not be written before go first; one that cannot
    /// be written now is kept, and written with the next.
    pub fn run_finished(&self, run: FinishedRun) -> Result<(), WorkbenchError> {
        {
            let mut all = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
            all.entry(self.path.clone()).or_default().push(run);
        }
        record_unrecorded(self.conn(), &self.path).map_err(|e| self.sql_err(e))
    }

    /// Keeps the run's failing-row samples (JSON) for its report page.
    pub fn record_samples(&self, run_id: &str, samples: &str) -> Result<(), WorkbenchError> {
        let _one_at_a_time = unrecorded().lock().unwrap_or_else(|p| p.into_inner());
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO main.run_samples (run_id, samples) VALUES (?, ?)",
                duckdb::params![run_id, samples],
            )
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
    }

    /// Runs left `running` by a process that died (kill -9, power loss),
    /// found when this process opened the file and marked `abandoned`
    /// there, with their audit records pending (dry runs have none); each
    /// is handed out once.
    pub fn take_abandoned(&self) -> Vec<AbandonedRun> {
        let mut found = found_abandoned().lock().unwrap_or_else(|p| p.into_inner());
        found.remove(&self.path).unwrap_or_default()
    }

    /// The audit records still to be written, oldest first: the run's own
    /// report, or for an abandoned run (which has none) what its row says.
    pub fn pending_audits(&self) -> Result<Vec<PendingAudit>, WorkbenchError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT run_id, state, status, epoch_us(started_at), epoch_us(finished_at), error,
                        report
                 FROM main.runs WHERE audit_pending ORDER BY started_at, run_id",
            )
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([], |r| {
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
            })
            .map_err(|e| self.sql_err(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql_err(e))
    }

    /// The run's audit record is written, as `audit_id`.
    pub fn audited(&self, run_id: &str, audit_id: i64) -> Result<(), WorkbenchError> {
        self.conn()
            .execute(
                "UPDATE main.runs SET audit_id = ?, audit_pending = false WHERE run_id = ?",
                duckdb::params![audit_id, run_id],
            )
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
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

    pub fn record_upload(
        &self,
        key: &str,
        sha256: &str,
        bytes: u64,
        run_id: &str,
    ) -> Result<(), WorkbenchError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO main.upload_manifest
                 VALUES (?, ?, ?, make_timestamp(?), ?)",
                duckdb::params![
                    key,
                    sha256,
                    bytes as i64,
                    chrono::Utc::now().timestamp_micros(),
                    run_id
                ],
            )
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
    }

    /// Multipart uploads left unfinished by earlier runs, oldest first.
    pub fn unfinished_uploads(&self) -> Result<Vec<(String, String)>, WorkbenchError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT object_key, upload_id FROM main.unfinished_uploads ORDER BY left_at")
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.sql_err(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql_err(e))
    }

    /// Remembers (`left`) or forgets an unfinished multipart upload.
    pub fn set_unfinished_upload(
        &self,
        key: &str,
        upload_id: &str,
        left: bool,
    ) -> Result<(), WorkbenchError> {
        let done = if left {
            self.conn().execute(
                "INSERT OR REPLACE INTO main.unfinished_uploads VALUES (?, ?, make_timestamp(?))",
                duckdb::params![upload_id, key, chrono::Utc::now().timestamp_micros()],
            )
        } else {
            self.conn().execute(
                "DELETE FROM main.unfinished_uploads WHERE upload_id = ? AND object_key = ?",
                duckdb::params![upload_id, key],
            )
        };
        done.map(|_| ()).map_err(|e| self.sql_err(e))
    }

    fn sql_err(&self, e: duckdb::Error) -> WorkbenchError {
        WorkbenchError::Sql {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
