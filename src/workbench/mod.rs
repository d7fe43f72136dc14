//! The workbench folder and its two DuckDB files, each with one owner.
//!
//! - The service's state, `<dir>/state/outreach_state.duckdb`, which only
//!   the service opens: `main.runs` (one row per run), `main.upload_manifest`
//!   (what was last uploaded to each object key), `main.unfinished_uploads`,
//!   `main.run_samples`, and each state's schema (`wv.companies_raw`,
//!   `wv.companies_good`, ...) that its runs validate in.
//! - The analysts' catalog, `<dir>/duck/outreach_workbench.duckdb`
//!   ([`catalog`]): views over the exported files and a copy of the run
//!   history, written anew after each run and renamed into place, so an
//!   analyst's open session never holds up a run.
//!
//! The rooms, in the order a run meets them: `open` (one instance per file
//! in the process, a busy or corrupt file), `schema` (settings, tables,
//! migrations), `runs` (run rows, abandoned runs), `outbox` (the audit
//! records that wait for PostgreSQL, in a file of their own), `uploads`,
//! `catalog`.

mod catalog;
mod open;
mod outbox;
pub mod presence;
mod runs;
mod schema;
mod uploads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use duckdb::Connection;

use crate::config::WorkbenchConfig;
pub use catalog::write as write_catalog;
pub use open::{corrupt_found, corrupt_in_run, verdict, SetAside, Verdict};
pub use ow_duckdb::{
    chunk_rows, Chunk, ChunkConverter, Database, DuckError, NextChunk, RawConnection, Template,
};
pub use runs::{AbandonedRun, FinishedRun, PendingAudit, ABANDONED};

#[derive(Debug, thiserror::Error)]
pub enum WorkbenchError {
    #[error("workbench {path} is busy: another process has held it for {waited:?} ({detail}); try again when it finishes, or stop the process holding it")]
    Busy {
        path: PathBuf,
        waited: Duration,
        detail: String,
    },
    #[error(
        "workbench {path} is corrupt ({detail}); the next run sets it aside and starts a new one"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("the audit outbox {path}: {detail}")]
    Outbox { path: PathBuf, detail: String },
    #[error("cannot open workbench {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("workbench {path}: {detail}")]
    Sql { path: PathBuf, detail: String },
    #[error("workbench {path}: not written, since an earlier write through this opening of it failed ({detail}); the next opening reads it as last committed")]
    Spoiled { path: PathBuf, detail: String },
}

pub struct Workbench {
    /// Taken only by `drop`, under the lock of the open files.
    conn: Option<Connection>,
    /// The open database `conn` belongs to, for [`Workbench::raw_connection`].
    db: Option<Arc<Database>>,
    /// Every write goes through it (see [`open::Writes`]).
    writes: Arc<open::Writes>,
    pub dir: PathBuf,
    /// The state file.
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

impl Drop for Workbench {
    /// The last user closes the database while it holds the lock of the
    /// open files: a run opening the file at that moment waits for the
    /// close (its checkpoint) to finish, then opens it afresh. Closed after
    /// the lock, a concurrent open attached the file in a second instance
    /// mid-checkpoint and read a short block ("Could not read enough bytes",
    /// seen with four runs at once).
    fn drop(&mut self) {
        let mut open = open::open_files().lock().unwrap_or_else(|p| p.into_inner());
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

/// Opens the state file read-only, for `report`, without creating
/// anything: `None` when no run has created it yet. A run in progress
/// elsewhere makes this wait.
pub fn open_read_only(cfg: &WorkbenchConfig) -> Result<Option<Connection>, WorkbenchError> {
    let path = Workbench::db_path(&cfg.dir);
    if !path.exists() {
        return Ok(None);
    }
    open::read_only(&path, cfg.lock_timeout).map(Some)
}

/// Opens the run history read-only, for `history`: the state file when no
/// process holds it (it has the runs in progress, and those a dead process
/// left), else the analysts' catalog, as of the last run's end, which no
/// process holds for writing: `history` never waits for a run. `None` when
/// no run has made either.
pub fn open_history(cfg: &WorkbenchConfig) -> Result<Option<Connection>, WorkbenchError> {
    let state = open_read_only(&WorkbenchConfig {
        lock_timeout: Duration::ZERO,
        ..cfg.clone()
    });
    let catalog = Workbench::catalog_path(&cfg.dir);
    match state {
        Ok(None) | Err(WorkbenchError::Busy { .. } | WorkbenchError::Corrupt { .. })
            if catalog.exists() =>
        {
            open::read_only(&catalog, cfg.lock_timeout).map(Some)
        }
        state => state,
    }
}

/// A transaction on a connection of its own: rolled back when dropped
/// unless committed, so a stage that fails, is cancelled or panics half-way
/// leaves the state's previous tables as they were.
pub struct Transaction {
    conn: RawConnection,
    open: bool,
    writes: Arc<open::Writes>,
    path: PathBuf,
}

impl Transaction {
    /// A commit that fails is rolled back by DuckDB itself, and spoils the
    /// opening of the file (see [`open::Writes`]).
    pub fn commit(mut self) -> Result<(), WorkbenchError> {
        self.open = false;
        self.writes.run(&self.path, || self.conn.execute("COMMIT"))
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

    /// The state file, which only the service opens.
    pub fn db_path(dir: &Path) -> PathBuf {
        dir.join("state").join("outreach_state.duckdb")
    }

    /// The analysts' catalog, written anew after each run.
    pub fn catalog_path(dir: &Path) -> PathBuf {
        dir.join("duck").join("outreach_workbench.duckdb")
    }

    pub fn exports_dir(&self) -> PathBuf {
        self.dir.join("exports")
    }

    /// Opens (creating if needed) the state file, waiting for a busy one
    /// and starting a new one in place of a corrupt one.
    pub fn open(cfg: &WorkbenchConfig) -> Result<Workbench, WorkbenchError> {
        let dir = cfg.dir.clone();
        let path = Self::db_path(&dir);
        for sub in ["duck", "state", "exports", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| WorkbenchError::Open {
                path: path.clone(),
                detail: format!("creating {}: {e}", d.display()),
            })?;
        }
        let (db, conn, writes) = Self::connect(cfg, &path)?;
        Ok(Workbench {
            conn: Some(conn),
            db: Some(db),
            writes,
            dir,
            path,
        })
    }

    /// A connection to the file: to this process's open database if there
    /// is one, else to a newly opened one, waiting up to `lock_timeout` for
    /// another process to let go of the file. A file DuckDB finds corrupt
    /// as it opens (or that a run found corrupt before) is set aside and a
    /// new one made; nothing in it is needed that is not kept elsewhere.
    /// An opening a failed write spoiled is not joined: this waits for its
    /// users to let go, then opens the file afresh.
    fn connect(
        cfg: &WorkbenchConfig,
        path: &Path,
    ) -> Result<(Arc<Database>, Connection, Arc<open::Writes>), WorkbenchError> {
        let mut open = open::wait_for_unspoiled(path, cfg.lock_timeout)?;
        if let Some(file) = open.get_mut(path) {
            let conn = file.db.connection().map_err(|e| WorkbenchError::Open {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
            file.users += 1;
            return Ok((file.db.clone(), conn, file.writes.clone()));
        }
        let path = path.to_path_buf();
        open::migrate_old_workbench(&Self::catalog_path(&cfg.dir), &path, cfg.lock_timeout)?;
        if open::take_corrupt_found(&path) && path.exists() {
            open::set_aside(&path, "a run found it corrupt")?;
        }
        if !path.exists() {
            open::mark_new(&path);
        }
        let (db, conn) = match Self::open_afresh(cfg, &path) {
            Err(WorkbenchError::Corrupt { detail, .. }) => {
                open::set_aside(&path, &detail)?;
                Self::open_afresh(cfg, &path)?
            }
            opened => opened?,
        };
        let writes = Arc::new(open::Writes::default());
        runs::after_opening(&conn, &path, &cfg.dir, &writes);
        open.insert(
            path,
            open::OpenFile {
                db: db.clone(),
                users: 1,
                writes: writes.clone(),
            },
        );
        Ok((db, conn, writes))
    }

    /// Opens the file in a new instance, with its settings and tables.
    fn open_afresh(
        cfg: &WorkbenchConfig,
        path: &Path,
    ) -> Result<(Arc<Database>, Connection), WorkbenchError> {
        let db = open::wait_for_lock(path, cfg.lock_timeout, || Database::open(path))?;
        let failed = |e: duckdb::Error| {
            let (path, detail) = (path.to_path_buf(), e.to_string());
            match open::verdict(&detail) {
                Verdict::Corrupt => WorkbenchError::Corrupt { path, detail },
                _ => WorkbenchError::Sql { path, detail },
            }
        };
        let conn = db.connection().map_err(failed)?;
        open::check_length(&conn, path).map_err(|detail| WorkbenchError::Corrupt {
            path: path.to_path_buf(),
            detail,
        })?;
        // DuckDB spills here past `memory_limit`.
        let tmp = cfg.dir.join("state").join("tmp");
        schema::prepare(&conn, cfg, &tmp).map_err(failed)?;
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

    /// A transaction on a connection of its own.
    pub fn transaction(&self) -> Result<Transaction, WorkbenchError> {
        let conn = self.raw_connection()?;
        conn.execute("BEGIN").map_err(|e| self.sql_err(e))?;
        Ok(Transaction {
            conn,
            open: true,
            writes: self.writes.clone(),
            path: self.path.clone(),
        })
    }

    /// Runs `write` (statements that commit) through this opening's
    /// writes (see [`open::Writes`]).
    fn write<T>(
        &self,
        write: impl FnOnce(&Connection) -> Result<T, duckdb::Error>,
    ) -> Result<T, WorkbenchError> {
        self.writes.run(&self.path, || write(self.conn()))
    }

    fn sql_err(&self, e: impl std::fmt::Display) -> WorkbenchError {
        WorkbenchError::Sql {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }
}
