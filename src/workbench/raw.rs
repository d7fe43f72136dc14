//! DuckDB's C API for the one job duckdb-rs has no door for: appending
//! Arrow batches through DuckDB's own Arrow conversion.
//!
//! duckdb-rs's `Appender::append_record_batch` converts every value in Rust
//! and hands each string over in its own FFI call, which checks its UTF-8
//! and copies it. `duckdb_data_chunk_from_arrow` converts a whole batch in
//! C++ and points at the Arrow buffers instead. Measured on the benchmark's
//! 150k people rows: 1.5 s of the loading thread's CPU became 0.4 s, and the
//! table's contents are identical.
//!
//! An appender appends inside its connection's transaction, and the run's
//! pull-and-validate transaction has to include the appends. duckdb-rs does
//! not expose a `Connection`'s C handle, so that whole transaction runs on
//! a [`RawConnection`]: a second connection to the same database, driven
//! with SQL text.
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

use duckdb::arrow::array::{Array, StructArray};
use duckdb::arrow::datatypes::Schema;
use duckdb::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::ffi;

/// What DuckDB said when a call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DuckError(String);

/// Copies a C string DuckDB owns, or `fallback` when there is none.
fn message(p: *const std::os::raw::c_char, fallback: &str) -> String {
    if p.is_null() {
        fallback.to_string()
    } else {
        // SAFETY: DuckDB returns NUL-terminated strings valid until the
        // object they belong to is destroyed, which the callers do after.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn c_string(s: &str) -> Result<CString, DuckError> {
    CString::new(s).map_err(|_| DuckError(format!("NUL byte in {s:?}")))
}

/// The attached workbench file's name inside the instance.
const CATALOG: &str = "workbench";

/// Rows per row group of the workbench's tables (a multiple of DuckDB's
/// 2048-row vector): tables from this size up are written as they load.
pub const ROW_GROUP_SIZE: usize = 16_384;

/// An open database file. DuckDB's database object is thread-safe; it is
/// closed when the last `Arc` goes, and the instance itself lives on until
/// its last connection is gone.
pub struct Database {
    db: ffi::duckdb_database,
}

// SAFETY: a DuckDB database handle may be used from any thread.
unsafe impl Send for Database {}
unsafe impl Sync for Database {}

impl Database {
    /// Opens (creating if needed) the database file at `path`, failing the
    /// way `duckdb::Connection::open` does, lock conflicts included.
    pub fn open(path: &Path) -> duckdb::Result<Database> {
        let db = Database::open_in_memory()?;
        // SAFETY: `db` is open and outlives this connection.
        let con = unsafe { duckdb::Connection::open_from_raw(db.db) }?;
        con.execute_batch(&format!(
            "ATTACH '{}' AS {CATALOG} (ROW_GROUP_SIZE {ROW_GROUP_SIZE})",
            path.to_string_lossy().replace('\'', "''")
        ))?;
        Ok(db)
    }

    fn open_in_memory() -> duckdb::Result<Database> {
        let mut db: ffi::duckdb_database = ptr::null_mut();
        let mut err: *mut std::os::raw::c_char = ptr::null_mut();
        // SAFETY: valid out-pointers; a null path is an in-memory database
        // and a null config DuckDB's defaults.
        let r = unsafe { ffi::duckdb_open_ext(ptr::null(), &mut db, ptr::null_mut(), &mut err) };
        if r != ffi::DuckDBSuccess {
            let msg = message(err, "cannot open the database");
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

    /// A duckdb-rs connection to the workbench file. It does not own the
    /// database: keep this `Database` alive as long as the connection.
    pub fn connection(&self) -> duckdb::Result<duckdb::Connection> {
        // SAFETY: `db` is open; the connection keeps the instance alive.
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
/// results and Arrow appenders. Used from one thread.
pub struct RawConnection {
    con: ffi::duckdb_connection,
    _db: Arc<Database>,
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
            _db: db.clone(),
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

    /// An appender on `schema.table` taking batches with `arrow_schema`.
    pub fn appender(
        &self,
        schema: &str,
        table: &str,
        arrow_schema: &Schema,
    ) -> Result<ArrowAppender<'_>, DuckError> {
        let (c_schema, c_table) = (c_string(schema)?, c_string(table)?);
        let mut ffi_schema = FFI_ArrowSchema::try_from(arrow_schema)
            .map_err(|e| DuckError(format!("exporting the Arrow schema: {e}")))?;
        let mut converted: ffi::duckdb_arrow_converted_schema = ptr::null_mut();
        // SAFETY: `FFI_ArrowSchema` has the Arrow C layout that
        // `ffi::ArrowSchema` declares; DuckDB reads it and does not keep it.
        let e = unsafe {
            ffi::duckdb_schema_from_arrow(
                self.con,
                (&mut ffi_schema as *mut FFI_ArrowSchema).cast(),
                &mut converted,
            )
        };
        take_error(e)?;
        let mut app: ffi::duckdb_appender = ptr::null_mut();
        // SAFETY: valid connection, strings and out-pointer.
        let r = unsafe {
            ffi::duckdb_appender_create(self.con, c_schema.as_ptr(), c_table.as_ptr(), &mut app)
        };
        let appender = ArrowAppender {
            con: self,
            app,
            converted,
        };
        if r != ffi::DuckDBSuccess {
            return Err(appender.error("opening an appender"));
        }
        Ok(appender)
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        // SAFETY: connected in `connect`, disconnected once here.
        unsafe { ffi::duckdb_disconnect(&mut self.con) };
    }
}

/// Turns a `duckdb_error_data` into a result, destroying it.
fn take_error(mut e: ffi::duckdb_error_data) -> Result<(), DuckError> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error data is ours to read and destroy.
    let msg = unsafe {
        let m = message(ffi::duckdb_error_data_message(e), "DuckDB error");
        ffi::duckdb_destroy_error_data(&mut e);
        m
    };
    Err(DuckError(msg))
}

/// Appends Arrow record batches to one table, within its connection's
/// transaction. Dropping it flushes what is left.
pub struct ArrowAppender<'c> {
    con: &'c RawConnection,
    app: ffi::duckdb_appender,
    converted: ffi::duckdb_arrow_converted_schema,
}

impl ArrowAppender<'_> {
    fn error(&self, what: &str) -> DuckError {
        // SAFETY: the appender's error string lives as long as it does.
        let m = unsafe { message(ffi::duckdb_appender_error(self.app), "unknown error") };
        DuckError(format!("{what}: {m}"))
    }

    /// Appends `batch`. Columns whose Arrow type differs from the table's
    /// (UUIDs arrive as text) are cast by DuckDB, as in an `INSERT`.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<(), DuckError> {
        // A DuckDB data chunk holds at most one vector (2048 rows).
        // SAFETY: a constant of the library.
        let vector = unsafe { ffi::duckdb_vector_size() } as usize;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = vector.min(batch.num_rows() - offset);
            let part: StructArray = batch.slice(offset, len).into();
            offset += len;
            let mut array = FFI_ArrowArray::new(&part.to_data());
            let mut chunk: ffi::duckdb_data_chunk = ptr::null_mut();
            // SAFETY: `FFI_ArrowArray` has the layout `ffi::ArrowArray`
            // declares. DuckDB takes ownership of the array (it clears its
            // `release`, so Rust's drop of `array` does nothing) and the chunk
            // releases it when destroyed, right after the appender has
            // copied the rows.
            unsafe {
                take_error(ffi::duckdb_data_chunk_from_arrow(
                    self.con.con,
                    (&mut array as *mut FFI_ArrowArray).cast(),
                    self.converted,
                    &mut chunk,
                ))?;
                let r = ffi::duckdb_append_data_chunk(self.app, chunk);
                ffi::duckdb_destroy_data_chunk(&mut chunk);
                if r != ffi::DuckDBSuccess {
                    return Err(self.error("appending"));
                }
            }
        }
        Ok(())
    }

    /// Writes the buffered rows to the table.
    pub fn flush(&mut self) -> Result<(), DuckError> {
        // SAFETY: the appender is open.
        if unsafe { ffi::duckdb_appender_flush(self.app) } != ffi::DuckDBSuccess {
            return Err(self.error("flushing"));
        }
        Ok(())
    }
}

impl Drop for ArrowAppender<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `RawConnection::appender`, destroyed once here.
        unsafe {
            if !self.app.is_null() {
                ffi::duckdb_appender_destroy(&mut self.app);
            }
            ffi::duckdb_destroy_arrow_converted_schema(&mut self.converted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duckdb::arrow::array::{ArrayRef, Int32Array, StringArray};
    use duckdb::arrow::datatypes::{DataType, Field};

    fn open() -> (tempfile::TempDir, Arc<Database>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("t.duckdb")).unwrap();
        (dir, Arc::new(db))
    }

    fn batch(rows: i32) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let ids: ArrayRef = Arc::new(Int32Array::from_iter(
            (0..rows).map(|i| (i % 7 != 0).then_some(i)),
        ));
        let names: ArrayRef =
            Arc::new(StringArray::from_iter((0..rows).map(|i| {
                (i % 5 != 0).then(|| format!("a name longer than twelve bytes {i}"))
            })));
        RecordBatch::try_new(schema, vec![ids, names]).unwrap()
    }

    #[test]
    fn batches_bigger_than_a_vector_land_whole_and_roll_back() {
        let (_dir, db) = open();
        let c = RawConnection::connect(&db).unwrap();
        c.execute("CREATE TABLE t (id INTEGER, name VARCHAR)")
            .unwrap();
        c.execute("BEGIN").unwrap();
        let b = batch(5000);
        {
            let mut a = c.appender("main", "t", &b.schema()).unwrap();
            a.append(&b).unwrap();
            a.flush().unwrap();
        }
        let counts = c
            .query_row_i64(
                "SELECT count(*), count(id), count(name), sum(id), \
                 count(*) FILTER (WHERE name = 'a name longer than twelve bytes 4999') FROM t",
            )
            .unwrap();
        let expected_sum: i64 = (0..5000).filter(|i| i % 7 != 0).sum();
        assert_eq!(counts, vec![5000, 5000 - 715, 5000 - 1000, expected_sum, 1]);
        // The appends belong to the connection's transaction.
        c.execute("ROLLBACK").unwrap();
        assert_eq!(c.query_row_i64("SELECT count(*) FROM t").unwrap(), vec![0]);
    }

    /// Connections work in the attached file, which analysts then open as
    /// a database of its own; a table loaded with at least
    /// `ROW_GROUP_SIZE` rows goes to the file, not through the WAL.
    #[test]
    fn tables_land_in_the_file_without_passing_through_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.duckdb");
        let db = Arc::new(Database::open(&path).unwrap());
        let c = RawConnection::connect(&db).unwrap();
        c.execute("BEGIN; CREATE SCHEMA wv; CREATE TABLE wv.t (id INTEGER, name VARCHAR)")
            .unwrap();
        let rows = 2 * ROW_GROUP_SIZE as i32 + 100;
        let b = batch(rows);
        {
            let mut a = c.appender("wv", "t", &b.schema()).unwrap();
            a.append(&b).unwrap();
            a.flush().unwrap();
        }
        c.execute("COMMIT").unwrap();
        let wal = std::fs::metadata(dir.path().join("t.duckdb.wal")).map_or(0, |m| m.len());
        assert!(wal < 64 * 1024, "the WAL holds the rows: {wal} bytes");
        let other = db.connection().unwrap();
        let n: i64 = other
            .query_row("SELECT count(*) FROM wv.t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows as i64);
        drop((c, other, db));

        let analyst = duckdb::Connection::open(&path).unwrap();
        let n: i64 = analyst
            .query_row("SELECT count(*) FROM wv.t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows as i64);
    }

    #[test]
    fn errors_name_what_duckdb_refused() {
        let (_dir, db) = open();
        let c = RawConnection::connect(&db).unwrap();
        let e = c.execute("SELECT * FROM missing_table").unwrap_err();
        assert!(e.to_string().contains("missing_table"), "{e}");
        c.execute("CREATE TABLE t (id INTEGER)").unwrap();
        let b = batch(10);
        let mut a = c.appender("main", "t", &b.schema()).unwrap();
        let e = a.append(&b).unwrap_err();
        assert!(e.to_string().contains("column count"), "{e}");
        assert!(c.appender("main", "nope", &b.schema()).is_err());
    }
}
