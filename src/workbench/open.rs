//! Opening the state file: one DuckDB instance per file in this process,
//! waiting for another process that holds it, and a file DuckDB reports
//! corrupt set aside for a new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{Database, WorkbenchError};

/// Workbench files open in this process, with how many `Workbench`es use
/// each. DuckDB must not open one file twice in a process (two instances
/// would write the same file), so concurrent runs in the daemon share one
/// database, each through connections of its own. The last one to finish
/// closes it.
pub(super) fn open_files() -> &'static Mutex<HashMap<PathBuf, OpenFile>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, OpenFile>>> = OnceLock::new();
    OPEN.get_or_init(|| Mutex::new(HashMap::new()))
}

pub(super) struct OpenFile {
    pub db: Arc<Database>,
    pub users: usize,
    pub writes: Arc<Writes>,
}

/// The writes through one open instance of the state file.
///
/// When DuckDB 1.4.5 fails a commit (its write-ahead log cannot be
/// written: a full disk), it takes back the rows the commit had appended
/// but not their strings' bytes; in a table with rows in the file's blocks
/// and one appended and updated since the file was opened (`main.runs`
/// after a run's end), the next row appended reads them as part of its own
/// value: a run id that is two run ids run together, found by the fault
/// soak and reproduced by `workbench::a_failed_commit_spoils_no_later_row`.
/// So the first write that fails spoils the opening: nothing more is
/// written through it (writes are refused, run endings kept for the next
/// opening), no new run joins it, and once its last user lets go the next
/// opening reads the file as last committed.
#[derive(Default)]
pub(super) struct Writes {
    /// Held by each write, so that none starts between a failure and the
    /// instance being marked spoiled; the failure's words once spoiled.
    spoiled: Mutex<Option<String>>,
}

/// Whether an error of a statement that writes means the instance that
/// ran it must not be written again (see [`Writes`]).
pub(super) fn spoils(detail: &str) -> bool {
    const WORDS: [&str; 7] = [
        "Failed to commit",
        "Could not write",
        "No space left on device",
        "Could not fsync",
        "Could not truncate",
        "Failed to create checkpoint",
        "database has been invalidated",
    ];
    WORDS.iter().any(|w| detail.contains(w))
}

impl Writes {
    /// Runs `write`, a statement or a few that commit, unless an earlier
    /// write spoiled the instance; one that fails for want of disk (or
    /// any other failed commit) spoils it.
    pub(super) fn run<T, E: std::fmt::Display>(
        &self,
        path: &Path,
        write: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, WorkbenchError> {
        let mut spoiled = self.spoiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = spoiled.as_ref() {
            return Err(WorkbenchError::Spoiled {
                path: path.to_path_buf(),
                detail: first.clone(),
            });
        }
        write().map_err(|e| {
            let detail = e.to_string();
            if spoils(&detail) {
                tracing::warn!(path = %path.display(), error = %detail,
                    "a write to the workbench's state file failed: nothing more is written through this opening of it; \
                     the runs using it finish, and the next opening reads the file as last committed");
                *spoiled = Some(detail.clone());
            }
            WorkbenchError::Sql {
                path: path.to_path_buf(),
                detail,
            }
        })
    }

    pub(super) fn is_spoiled(&self) -> bool {
        self.spoiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// What this process knows of a state file beyond DuckDB's own view of it.
#[derive(Default)]
struct Notes {
    /// A run found it corrupt while it used it: set aside at its next
    /// opening, once no run of this process has it open.
    corrupt_found: bool,
    /// Made new by this process (none was there, or a corrupt one was set
    /// aside), its history not seeded from the audit yet.
    made_new: bool,
    /// Where a corrupt file was set aside, not yet handed to
    /// [`super::Workbench::take_set_aside`].
    set_aside: Option<SetAside>,
}

static NOTES: Mutex<BTreeMap<PathBuf, Notes>> = Mutex::new(BTreeMap::new());

/// Changes or reads the notes of `path`.
fn note<T>(path: &Path, f: impl FnOnce(&mut Notes) -> T) -> T {
    let mut all = NOTES.lock().unwrap_or_else(|p| p.into_inner());
    f(all.entry(path.to_path_buf()).or_default())
}

pub(super) fn mark_new(path: &Path) {
    note(path, |n| n.made_new = true);
}

/// Whether `path` was made new and not seeded yet; forgets it.
pub(super) fn take_new(path: &Path) -> bool {
    note(path, |n| std::mem::take(&mut n.made_new))
}

/// Where a corrupt `path` was set aside, handed out once.
pub(super) fn take_set_aside(path: &Path) -> Option<SetAside> {
    note(path, |n| n.set_aside.take())
}

/// What an error opening or reading a DuckDB file says about the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Another process holds the file's lock.
    Busy,
    /// The file's bytes are not a database DuckDB can read: a checksum
    /// that does not match, a header that is not DuckDB's, a file cut
    /// short.
    Corrupt,
    /// Anything else (permissions, a full disk, a newer DuckDB's file).
    Other,
}

/// Reads DuckDB's words. Each phrase is one DuckDB 1.4 uses for that case
/// (tested one by one); a word alone is not enough: the checksum error
/// says "in block at location", which is no lock.
pub fn verdict(detail: &str) -> Verdict {
    const BUSY: [&str; 2] = ["Could not set lock on file", "Conflicting lock is held"];
    const CORRUPT: [&str; 6] = [
        "Corrupt database file",
        "not a valid DuckDB database file",
        "Could not read enough bytes",
        "Could not read all bytes",
        "does not match stored checksum",
        "Corrupt WAL file",
    ];
    if BUSY.iter().any(|p| detail.contains(p)) {
        Verdict::Busy
    } else if CORRUPT.iter().any(|p| detail.contains(p)) {
        Verdict::Corrupt
    } else {
        Verdict::Other
    }
}

/// The file at `path` was found corrupt in the middle of a run: the next
/// opening sets it aside (this one may still be using it).
pub fn corrupt_found(path: &Path) {
    note(path, |n| n.corrupt_found = true);
}

/// A run's `error`, when it says the state file of the workbench in `dir`
/// is corrupt (DuckDB reads blocks as it needs them, so this can come in
/// the middle of a run): the file is noted for the next opening to set
/// aside, and the error is returned saying so. DuckDB's words for a damaged
/// Parquet file can be the same; only the state file's own are taken.
pub fn corrupt_in_run(dir: &Path, error: &str) -> Option<String> {
    let path = super::Workbench::db_path(dir);
    let file_name = path.file_name()?.to_str()?;
    let of_the_state_file = [file_name, "Corrupt database file", "Corrupt WAL"]
        .iter()
        .any(|w| error.contains(w));
    if verdict(error) != Verdict::Corrupt || !of_the_state_file {
        return None;
    }
    corrupt_found(&path);
    Some(format!(
        "{error}; the workbench's state file {} is corrupt: the next run sets it aside and starts a new one",
        path.display()
    ))
}

/// Whether a run found `path` corrupt; forgets it.
pub(super) fn take_corrupt_found(path: &Path) -> bool {
    note(path, |n| std::mem::take(&mut n.corrupt_found))
}

/// A corrupt state file this process set aside, not yet handed to
/// [`super::Workbench::take_set_aside`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SetAside {
    pub path: PathBuf,
    pub set_aside_as: PathBuf,
    pub error: String,
}

/// Renames a DuckDB file and its write-ahead log, if it has one.
fn rename_with_wal(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let wal = PathBuf::from(format!("{}.wal", from.display()));
    if wal.exists() {
        std::fs::rename(&wal, format!("{}.wal", to.display()))?;
    }
    Ok(())
}

/// Moves a corrupt file (and its write-ahead log) aside as
/// `<file>.corrupt-<UTC time>`, kept for inspection, and says so once; the
/// file opened next in its place is a new one.
pub(super) fn set_aside(path: &Path, detail: &str) -> Result<(), WorkbenchError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    rename_with_wal(path, &aside).map_err(|e| WorkbenchError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("{detail}; setting it aside failed: {e}"),
    })?;
    tracing::warn!(path = %path.display(), set_aside_as = %aside.display(), error = %detail,
        "the workbench's state file is corrupt: it is set aside and a new one started; \
         its history is seeded again by the runs to come, pending audit records are kept beside it");
    note(path, |n| {
        n.made_new = true;
        n.set_aside = Some(SetAside {
            path: path.to_path_buf(),
            set_aside_as: aside,
            error: detail.to_string(),
        });
    });
    Ok(())
}

/// Opens `path` read-only, waiting up to `lock_timeout` for a process
/// that writes it.
pub(super) fn read_only(
    path: &Path,
    lock_timeout: Duration,
) -> Result<duckdb::Connection, WorkbenchError> {
    wait_for_lock(path, lock_timeout, || {
        let flags = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?;
        duckdb::Connection::open_with_flags(path, flags)
    })
}

/// A file cut short (a copy that stopped, a disk that lost its tail) opens
/// without a word from DuckDB, which reads a block only when a query needs
/// it; the run would fail on the first one past the end. The file must
/// hold at least the blocks in use. Not all the blocks the header counts:
/// DuckDB trims free blocks off the end of the file and still counts them
/// (taken for damage after every few runs in the fault soak).
pub(super) fn check_length(conn: &duckdb::Connection, path: &Path) -> Result<(), String> {
    // The three 4 KiB headers before the first block.
    const HEADERS: u64 = 3 * 4096;
    let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
        return Ok(());
    };
    let blocks: Result<(i64, i64), _> = conn.query_row(
        "SELECT used_blocks, block_size FROM pragma_database_size()
         WHERE database_name = current_database()",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    let Ok((used, size)) = blocks else {
        return Ok(());
    };
    let needed = HEADERS + used.max(0) as u64 * size.max(0) as u64;
    match len < needed {
        true => Err(format!(
            "the file is cut short: {len} bytes, where {used} blocks of {size} bytes are in use (at least {needed} bytes)"
        )),
        false => Ok(()),
    }
}

/// The files open in this process, locked, once `path` is not open
/// through a spoiled opening (see [`Writes`]): its users finish their
/// runs, then the file is opened afresh. Waits up to `lock_timeout`.
pub(super) fn wait_for_unspoiled(
    path: &Path,
    lock_timeout: Duration,
) -> Result<std::sync::MutexGuard<'static, HashMap<PathBuf, OpenFile>>, WorkbenchError> {
    let start = Instant::now();
    loop {
        let open = open_files().lock().unwrap_or_else(|p| p.into_inner());
        let spoiled = open.get(path).is_some_and(|f| f.writes.is_spoiled());
        if !spoiled {
            return Ok(open);
        }
        drop(open);
        if start.elapsed() >= lock_timeout {
            return Err(WorkbenchError::Busy {
                path: path.to_path_buf(),
                waited: start.elapsed(),
                detail:
                    "runs of this process still use an opening of it that a failed write spoiled"
                        .to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens `path` with `open`, retrying while another process holds the
/// file's lock, up to `lock_timeout`. A corrupt file is said to be corrupt
/// at once, whatever DuckDB's words.
pub(super) fn wait_for_lock<T>(
    path: &Path,
    lock_timeout: Duration,
    open: impl Fn() -> duckdb::Result<T>,
) -> Result<T, WorkbenchError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        let e = match open() {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let detail = e.to_string();
        let path = path.to_path_buf();
        match verdict(&detail) {
            Verdict::Corrupt => return Err(WorkbenchError::Corrupt { path, detail }),
            Verdict::Other => return Err(WorkbenchError::Open { path, detail }),
            Verdict::Busy if start.elapsed() >= lock_timeout => {
                return Err(WorkbenchError::Busy {
                    path,
                    waited: start.elapsed(),
                    detail,
                })
            }
            Verdict::Busy => {}
        }
        if !logged {
            tracing::info!(path = %path.display(), "workbench is busy; waiting");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file of an earlier version at the catalog's path (where the state
/// lived before it had a file of its own) becomes the state file, with
/// its history, pending audit records and unfinished uploads: renamed, not
/// copied. A catalog is told by the table it alone has.
pub(super) fn migrate_old_workbench(
    old: &Path,
    state: &Path,
    lock_timeout: Duration,
) -> Result<(), WorkbenchError> {
    if state.exists() || !old.exists() {
        return Ok(());
    }
    let is_catalog = read_only(old, lock_timeout).and_then(|c| {
        c.query_row(
            &format!(
                "SELECT count(*) > 0 FROM duckdb_tables() WHERE table_name = '{}'",
                super::catalog::MARK
            ),
            [],
            |r| r.get::<_, bool>(0),
        )
        .map_err(|e| {
            let (path, detail) = (old.to_path_buf(), e.to_string());
            match verdict(&detail) {
                Verdict::Corrupt => WorkbenchError::Corrupt { path, detail },
                _ => WorkbenchError::Open { path, detail },
            }
        })
    });
    match is_catalog {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        // Not worth keeping as state; the catalog is written anew.
        Err(WorkbenchError::Corrupt { .. }) => return Ok(()),
        Err(e) => return Err(e),
    }
    rename_with_wal(old, state).map_err(|e| WorkbenchError::Open {
        path: state.to_path_buf(),
        detail: format!(
            "moving the workbench of an earlier version from {}: {e}",
            old.display()
        ),
    })?;
    tracing::info!(from = %old.display(), to = %state.display(),
        "the workbench of an earlier version is now the service's state file; the analysts' catalog is written after the next run");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of DuckDB's own messages for a damaged file, as DuckDB 1.4 says
    /// them, is read as corrupt; a lock is busy; anything else neither.
    #[test]
    fn duckdb_words_are_read_for_what_they_mean() {
        for corrupt in [
            "IO Error: Corrupt database file: computed checksum 123 does not match stored checksum 456 in block at location 4096",
            "IO Error: The file \"/x/y.duckdb\" exists, but it is not a valid DuckDB database file!",
            "IO Error: Could not read enough bytes from file \"/x/y.duckdb\": attempted to read 262144 bytes from location 8192",
            "IO Error: Could not read all bytes from file \"/x/y.duckdb\": wanted=4096 read=100",
        ] {
            assert_eq!(verdict(corrupt), Verdict::Corrupt, "{corrupt}");
        }
        assert_eq!(
            verdict("IO Error: Could not set lock on file \"/x/y.duckdb\": Conflicting lock is held in /usr/bin/duckdb (PID 42) by user me."),
            Verdict::Busy
        );
        for other in [
            "IO Error: Cannot open file \"/x/y.duckdb\": Permission denied",
            "IO Error: Could not write file \"/x/y.duckdb\": No space left on device",
        ] {
            assert_eq!(verdict(other), Verdict::Other, "{other}");
        }
    }
}
