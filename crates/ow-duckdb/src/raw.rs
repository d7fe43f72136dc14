//! The database and the raw connection: a connection whose transaction
//! takes rows converted from Arrow by DuckDB's own C++ (see `ingest`), and
//! a database that attaches the workbench file.
//!
//! The run's pull-and-validate transaction has to include the loads.
//! duckdb-rs does not expose a `Connection`'s C handle, so that whole
//! transaction runs on a [`RawConnection`]: a second connection to the
//! same database, driven with SQL text.
//!
//! The file is attached to an in-memory instance instead of being opened as
//! its main database, because only `ATTACH` takes a row group size. At
//! DuckDB's default of 122,880 rows, a table loaded with fewer rows than
//! that (the benchmark's 50k companies) is not written out as it is
//! appended: the commit copies it into the write-ahead log and the next
//! checkpoint writes it again. With [`ROW_GROUP_SIZE`] such tables go
//! straight to the file like the big ones. Measured on the benchmark: the
//! commit and the checkpoint after it took 0.38 s, now 0.17 s. Every
//! connection starts with `USE` of the attached file, so SQL names its
//! tables as if it were the main database.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::Arc;

use duckdb::ffi;

/// What DuckDB said when a call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DuckError(pub(crate) String);

/// Copies a C string DuckDB owns, or `fallback` when there is none.
///
/// # Safety
/// `p` is null or a NUL-terminated string that stays valid for this call
/// (DuckDB's strings live until the object they belong to is destroyed,
/// which callers do after).
unsafe fn message(p: *const std::os::raw::c_char, fallback: &str) -> String {
    if p.is_null() {
        fallback.to_string()
    } else {
        // SAFETY: as the caller promised.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

pub(crate) fn c_string(s: &str) -> Result<CString, DuckError> {
    CString::new(s).map_err(|_| DuckError(format!("NUL byte in {s:?}")))
}

/// The attached workbench file's name inside the instance.
const CATALOG: &str = "workbench";

/// Rows per row group of the workbench's tables (a multiple of DuckDB's
/// 2048-row vector): tables from this size up are written as they load.
pub const ROW_GROUP_SIZE: usize = 16_384;

/// An open database file. DuckDB's database object is thread-safe. Its
/// handle is closed when the last `Arc` goes; the instance behind it lives
/// on until its last connection is gone too (each connection, duckdb-rs's
/// or ours, holds the instance), so a connection never outlives its data.
pub struct Database {
    db: ffi::duckdb_database,
}

// SAFETY: a DuckDB database handle may be used from any thread.
unsafe impl Send for Database {}
unsafe impl Sync for Database {}

impl Database {
    /// An in-memory instance with the database file at `path` attached
    /// (created if needed), failing the way `duckdb::Connection::open`
    /// does, lock conflicts included. `Database::open` (in `ingest`) adds
    /// the feed function.
    pub(crate) fn attach(path: &Path) -> duckdb::Result<Arc<Database>> {
        let db = Database::open_in_memory()?;
        // SAFETY: `db` is open and outlives this connection.
        let con = unsafe { duckdb::Connection::open_from_raw(db.db) }?;
        con.execute_batch(&format!(
            "ATTACH '{}' AS {CATALOG} (ROW_GROUP_SIZE {ROW_GROUP_SIZE})",
            path.to_string_lossy().replace('\'', "''")
        ))?;
        Ok(Arc::new(db))
    }

    fn open_in_memory() -> duckdb::Result<Database> {
        let mut db: ffi::duckdb_database = ptr::null_mut();
        let mut err: *mut std::os::raw::c_char = ptr::null_mut();
        // SAFETY: valid out-pointers; a null path is an in-memory database
        // and a null config DuckDB's defaults.
        let r = unsafe { ffi::duckdb_open_ext(ptr::null(), &mut db, ptr::null_mut(), &mut err) };
        if r != ffi::DuckDBSuccess {
            // SAFETY: `err` is null or the error string DuckDB just made.
            let msg = unsafe { message(err, "cannot open the database") };
            // SAFETY: the error string is ours to free; the failed handle
            // is ours to close.
            unsafe {
                if !err.is_null() {
                    ffi::duckdb_free(err.cast());
                }
                ffi::duckdb_close(&mut db);
            }
            return Err(duckdb::Error::DuckDBFailure(ffi::Error::new(r), Some(msg)));
        }
        Ok(Database { db })
    }

    /// A duckdb-rs connection to the workbench file. It holds the instance
    /// itself, so it may outlive this `Database`.
    pub fn connection(&self) -> duckdb::Result<duckdb::Connection> {
        // SAFETY: `db` is open for the length of this call, which is all
        // `open_from_raw` needs: it connects at once (duckdb-rs does not
        // close a database it did not open), and from then on the
        // connection keeps the instance alive.
        let con = unsafe { duckdb::Connection::open_from_raw(self.db) }?;
        con.execute_batch(&format!("USE {CATALOG}"))?;
        Ok(con)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once here.
        unsafe { ffi::duckdb_close(&mut self.db) };
    }
}

/// A connection driven through the C API: SQL text, one-row integer
/// results and loads of converted chunks. Used from one thread.
pub struct RawConnection {
    con: ffi::duckdb_connection,
    db: Arc<Database>,
}

impl RawConnection {
    pub fn connect(db: &Arc<Database>) -> Result<RawConnection, DuckError> {
        let mut con: ffi::duckdb_connection = ptr::null_mut();
        // SAFETY: the database is open; `con` is a valid out-pointer.
        if unsafe { ffi::duckdb_connect(db.db, &mut con) } != ffi::DuckDBSuccess {
            return Err(DuckError("cannot connect to the workbench".into()));
        }
        let raw = RawConnection {
            con,
            db: db.clone(),
        };
        raw.execute(&format!("USE {CATALOG}"))?;
        Ok(raw)
    }

    /// Runs `sql` (one or more statements) and returns the first row's
    /// values as integers, e.g. counts (none for statements without rows).
    pub fn query_row_i64(&self, sql: &str) -> Result<Vec<i64>, DuckError> {
        let c_sql = c_string(sql)?;
        // SAFETY: `duckdb_result` is a plain C struct DuckDB fills in; it is
        // destroyed on every path below.
        unsafe {
            let mut res: ffi::duckdb_result = std::mem::zeroed();
            let r = ffi::duckdb_query(self.con, c_sql.as_ptr(), &mut res);
            let out = if r == ffi::DuckDBSuccess {
                let has_row = ffi::duckdb_row_count(&mut res) > 0;
                let cols = if has_row {
                    ffi::duckdb_column_count(&mut res)
                } else {
                    0
                };
                Ok((0..cols)
                    .map(|c| ffi::duckdb_value_int64(&mut res, c, 0))
                    .collect())
            } else {
                Err(DuckError(message(
                    ffi::duckdb_result_error(&mut res),
                    "query failed",
                )))
            };
            ffi::duckdb_destroy_result(&mut res);
            out
        }
    }

    pub fn execute(&self, sql: &str) -> Result<(), DuckError> {
        self.query_row_i64(sql).map(|_| ())
    }

    pub(crate) fn handle(&self) -> ffi::duckdb_connection {
        self.con
    }

    /// The database this connection is to, for more connections.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        // SAFETY: connected in `connect`, disconnected once here.
        unsafe { ffi::duckdb_disconnect(&mut self.con) };
    }
}

/// Turns a `duckdb_error_data` into a result, destroying it.
///
/// # Safety
/// `e` is null or an error data a DuckDB call just returned, which nothing
/// else reads or destroys.
pub(crate) unsafe fn take_error(mut e: ffi::duckdb_error_data) -> Result<(), DuckError> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: as the caller promised: ours to read, then to destroy.
    let msg = unsafe {
        let m = message(ffi::duckdb_error_data_message(e), "DuckDB error");
        ffi::duckdb_destroy_error_data(&mut e);
        m
    };
    Err(DuckError(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_duckdb_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("t.duckdb")).unwrap();
        let c = RawConnection::connect(&db).unwrap();
        let e = c.execute("SELECT * FROM missing_table").unwrap_err();
        assert!(e.to_string().contains("missing_table"), "{e}");
    }
}
