//! Opening the state file: one DuckDB instance per file in this process,
//! waiting for another process that holds it, and a file DuckDB reports
//! corrupt set aside for a new one.

use std::collections::{HashMap, HashSet};
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
}

/// State files a run found corrupt while it used them: set aside at their
/// next opening, once no run of this process has them open.
fn found_corrupt() -> &'static Mutex<HashSet<PathBuf>> {
    static FOUND: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    FOUND.get_or_init(|| Mutex::new(HashSet::new()))
}

/// State files this process made new (none was there, or a corrupt one was
/// set aside) whose history is not seeded from the audit yet.
fn made_new() -> &'static Mutex<HashSet<PathBuf>> {
    static NEW: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    NEW.get_or_init(|| Mutex::new(HashSet::new()))
}

pub(super) fn mark_new(path: &Path) {
    made_new()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.to_path_buf());
}

/// Whether `path` was made new and not seeded yet; forgets it.
pub(super) fn take_new(path: &Path) -> bool {
    made_new()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(path)
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
    let mut found = found_corrupt().lock().unwrap_or_else(|p| p.into_inner());
    found.insert(path.to_path_buf());
}

/// Whether a run found `path` corrupt; forgets it.
pub(super) fn take_corrupt_found(path: &Path) -> bool {
    let mut found = found_corrupt().lock().unwrap_or_else(|p| p.into_inner());
    found.remove(path)
}

/// A corrupt state file this process set aside, not yet handed to
/// [`super::Workbench::take_set_aside`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SetAside {
    pub path: PathBuf,
    pub set_aside_as: PathBuf,
    pub error: String,
}

pub(super) fn set_aside_files() -> &'static Mutex<HashMap<PathBuf, SetAside>> {
    static ASIDE: OnceLock<Mutex<HashMap<PathBuf, SetAside>>> = OnceLock::new();
    ASIDE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Moves a corrupt file (and its write-ahead log) aside as
/// `<file>.corrupt-<UTC time>`, kept for inspection, and says so once.
/// Returns where it went.
pub(super) fn set_aside(path: &Path, detail: &str) -> Result<PathBuf, WorkbenchError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let err = |e: std::io::Error| WorkbenchError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("{detail}; setting it aside failed: {e}"),
    };
    std::fs::rename(path, &aside).map_err(err)?;
    let wal = PathBuf::from(format!("{}.wal", path.display()));
    if wal.exists() {
        std::fs::rename(&wal, format!("{}.wal", aside.display())).map_err(err)?;
    }
    tracing::warn!(path = %path.display(), set_aside_as = %aside.display(), error = %detail,
        "the workbench's state file is corrupt: it is set aside and a new one started; \
         its history is seeded again by the runs to come, pending audit records are kept beside it");
    let mut found = set_aside_files().lock().unwrap_or_else(|p| p.into_inner());
    found.insert(
        path.to_path_buf(),
        SetAside {
            path: path.to_path_buf(),
            set_aside_as: aside.clone(),
            error: detail.to_string(),
        },
    );
    Ok(aside)
}

/// A file cut short (a copy that stopped, a disk that lost its tail) opens
/// without a word from DuckDB, which reads a block only when a query needs
/// it; the run would fail on the first one past the end. The header says
/// how many blocks there are: the file must hold them all.
pub(super) fn check_length(conn: &duckdb::Connection, path: &Path) -> Result<(), String> {
    // The three 4 KiB headers before the first block.
    const HEADERS: u64 = 3 * 4096;
    let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
        return Ok(());
    };
    let blocks: Result<(i64, i64), _> = conn.query_row(
        "SELECT total_blocks, block_size FROM pragma_database_size()
         WHERE database_name = current_database()",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    let Ok((blocks, size)) = blocks else {
        return Ok(());
    };
    let needed = HEADERS + blocks.max(0) as u64 * size.max(0) as u64;
    match len < needed {
        true => Err(format!(
            "the file is cut short: {len} bytes, where its header counts {blocks} blocks of {size} bytes ({needed} bytes)"
        )),
        false => Ok(()),
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
    let is_catalog = wait_for_lock(old, lock_timeout, || {
        let flags = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?;
        let c = duckdb::Connection::open_with_flags(old, flags)?;
        c.query_row(
            &format!(
                "SELECT count(*) > 0 FROM duckdb_tables() WHERE table_name = '{}'",
                super::catalog::MARK
            ),
            [],
            |r| r.get::<_, bool>(0),
        )
    });
    match is_catalog {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        // Not worth keeping as state; the catalog is written anew.
        Err(WorkbenchError::Corrupt { .. }) => return Ok(()),
        Err(e) => return Err(e),
    }
    let err = |e: std::io::Error| WorkbenchError::Open {
        path: state.to_path_buf(),
        detail: format!(
            "moving the workbench of an earlier version from {}: {e}",
            old.display()
        ),
    };
    std::fs::rename(old, state).map_err(err)?;
    let wal = PathBuf::from(format!("{}.wal", old.display()));
    if wal.exists() {
        std::fs::rename(&wal, format!("{}.wal", state.display())).map_err(err)?;
    }
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
