//! Loading Arrow batches into a table: an `INSERT … SELECT * FROM
//! ow_feed(n)`, where `ow_feed` is a table function of ours that hands
//! DuckDB chunks converted from Arrow.
//!
//! Why DuckDB's C++ converts: duckdb-rs's `Appender::append_record_batch`
//! converts every value in Rust and hands each string over in its own FFI
//! call, which checks its UTF-8 and copies it; `duckdb_data_chunk_from_arrow`
//! converts a whole batch and points at the Arrow buffers instead (measured
//! on the benchmark's 150k people rows: 1.5 s of the loading thread's CPU
//! became 0.4 s, the table's contents identical).
//!
//! Why not DuckDB's appender: it copies every chunk into a buffer of its
//! own and appends that buffer to the table later, a second copy of every
//! value on the loading thread, which is the pull's busiest. An `INSERT`
//! appends the chunks as the table function returns them. The conversion
//! runs on whichever thread holds the [`ChunkConverter`]: the pull's
//! reading thread, which has CPU to spare.
//! Measured on the benchmark: see `source::pull`.
//!
//! The same chunks can feed several statements on several threads at once
//! (the pull's insert, and the export's files written beside it): each
//! statement's vectors reference the chunk's buffers, nothing is copied.
//!
//! A feed is registered under a number for the length of one statement; the
//! table function's bind takes it out of the registry, so a number is
//! good for one statement only and an unknown number is an error, never a
//! pointer taken from SQL text.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use duckdb::arrow::array::{Array, RecordBatch, StructArray};
use duckdb::arrow::datatypes::Schema;
use duckdb::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use duckdb::ffi;

use crate::raw::{c_string, take_error, Database, DuckError, RawConnection};

/// The table function's name in every workbench instance.
const FEED_FUNCTION: &str = "ow_feed";

/// Up to [`chunk_rows`] of a table's rows, in DuckDB's layout.
pub struct Chunk(ffi::duckdb_data_chunk);

/// Rows in a full [`Chunk`]: DuckDB's vector size (2048).
pub fn chunk_rows() -> usize {
    // SAFETY: a constant of the library.
    unsafe { ffi::duckdb_vector_size() as usize }
}

/// A table function's columns: their names, and a chunk without rows in
/// their types, which are then the converted types exactly.
pub struct Template {
    names: Vec<CString>,
    types: Chunk,
}

// SAFETY: a data chunk is plain memory owned by this handle (its vectors'
// buffers are reference-counted); nothing ties it to the thread that made it.
unsafe impl Send for Chunk {}
// SAFETY: once converted a chunk is only read: `feed_scan` makes its output
// vectors reference this chunk's buffers, which reads the chunk's vectors
// and bumps atomic reference counts, so statements on several threads may
// each reference one shared chunk (how the pull hands the same rows to the
// raw table and to the files written beside it).
unsafe impl Sync for Chunk {}

impl Chunk {
    fn rows(&self) -> usize {
        // SAFETY: the chunk is alive.
        unsafe { ffi::duckdb_data_chunk_get_size(self.0) as usize }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: created by `duckdb_data_chunk_from_arrow`, destroyed once.
        unsafe { ffi::duckdb_destroy_data_chunk(&mut self.0) };
    }
}

/// Converts Arrow batches of one schema into [`Chunk`]s on the calling
/// thread, through a connection of its own.
pub struct ChunkConverter {
    con: RawConnection,
    converted: ffi::duckdb_arrow_converted_schema,
    schema: Arc<Schema>,
}

impl ChunkConverter {
    pub fn new(db: &Arc<Database>, schema: Arc<Schema>) -> Result<ChunkConverter, DuckError> {
        let con = RawConnection::connect(db)?;
        let mut ffi_schema = FFI_ArrowSchema::try_from(schema.as_ref())
            .map_err(|e| DuckError(format!("exporting the Arrow schema: {e}")))?;
        let mut converted: ffi::duckdb_arrow_converted_schema = ptr::null_mut();
        // SAFETY: `FFI_ArrowSchema` has the Arrow C layout that
        // `ffi::ArrowSchema` declares; DuckDB reads it and does not keep it.
        // The error data it returns is ours alone.
        unsafe {
            take_error(ffi::duckdb_schema_from_arrow(
                con.handle(),
                (&mut ffi_schema as *mut FFI_ArrowSchema).cast(),
                &mut converted,
            ))
        }?;
        Ok(ChunkConverter {
            con,
            converted,
            schema,
        })
    }

    /// `batch` as chunks of at most [`chunk_rows`] rows each, in row order.
    pub fn convert(&self, batch: &RecordBatch) -> Result<Vec<Chunk>, DuckError> {
        let vector = chunk_rows();
        let mut chunks = Vec::with_capacity(batch.num_rows().div_ceil(vector));
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = vector.min(batch.num_rows() - offset);
            chunks.push(self.convert_one(&batch.slice(offset, len))?);
            offset += len;
        }
        Ok(chunks)
    }

    /// The columns the table function declares for these batches.
    pub fn template(&self) -> Result<Template, DuckError> {
        Ok(Template {
            names: self
                .schema
                .fields()
                .iter()
                .map(|f| c_string(f.name()))
                .collect::<Result<_, _>>()?,
            types: self.convert_one(&RecordBatch::new_empty(self.schema.clone()))?,
        })
    }

    fn convert_one(&self, part: &RecordBatch) -> Result<Chunk, DuckError> {
        let part: StructArray = part.clone().into();
        let mut array = FFI_ArrowArray::new(&part.to_data());
        let mut chunk: ffi::duckdb_data_chunk = ptr::null_mut();
        // SAFETY: `FFI_ArrowArray` has the layout `ffi::ArrowArray` declares.
        // DuckDB takes ownership of the array (it clears its `release`, so
        // Rust's drop of `array` does nothing); the chunk's vectors share it
        // and release it when the last of them goes. The error data it
        // returns is ours alone.
        unsafe {
            take_error(ffi::duckdb_data_chunk_from_arrow(
                self.con.handle(),
                (&mut array as *mut FFI_ArrowArray).cast(),
                self.converted,
                &mut chunk,
            ))
        }?;
        Ok(Chunk(chunk))
    }
}

impl Drop for ChunkConverter {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        unsafe { ffi::duckdb_destroy_arrow_converted_schema(&mut self.converted) };
    }
}

/// Hands the next chunk of a table; `None` ends it. An `Err` fails the
/// statement with that message.
pub type NextChunk = Box<dyn FnMut() -> Result<Option<Arc<Chunk>>, String> + Send>;

/// What one statement reads: its columns, and where the rows come from.
/// `next` is emptied when the statement returns, whatever DuckDB still
/// holds of the feed.
struct Feed {
    template: Template,
    next: Arc<Mutex<Option<NextChunk>>>,
}

static FEEDS: LazyLock<Mutex<HashMap<u64, Feed>>> = LazyLock::new(Default::default);
static FEED_IDS: AtomicU64 = AtomicU64::new(1);

fn feeds() -> std::sync::MutexGuard<'static, HashMap<u64, Feed>> {
    FEEDS.lock().unwrap_or_else(|p| p.into_inner())
}

impl RawConnection {
    /// Appends the chunks `next` hands to `target` (a quoted, qualified
    /// table name whose columns match `template`'s in order), inside this
    /// connection's transaction. Columns whose type differs from the
    /// table's (UUIDs arrive as text) are cast as in any `INSERT`.
    ///
    /// `next` is dropped before this returns, success or not, so whatever
    /// feeds it learns at once that nobody reads any more.
    pub fn insert_chunks(
        &self,
        target: &str,
        template: Template,
        next: NextChunk,
    ) -> Result<(), DuckError> {
        self.run_with_feed(
            |feed| format!("INSERT INTO {target} SELECT * FROM {feed}"),
            template,
            next,
        )
        .map(|_| ())
    }

    /// Runs the statement `sql` makes of a table-function call (`ow_feed(n)`)
    /// that reads the chunks `next` hands, with `template`'s columns, and
    /// returns its first row as integers (the count of a `COPY`). As for
    /// [`insert_chunks`](Self::insert_chunks), `next` is dropped before this
    /// returns.
    pub fn run_with_feed(
        &self,
        sql: impl FnOnce(&str) -> String,
        template: Template,
        next: NextChunk,
    ) -> Result<Vec<i64>, DuckError> {
        let next = Arc::new(Mutex::new(Some(next)));
        let id = FEED_IDS.fetch_add(1, Ordering::Relaxed);
        feeds().insert(
            id,
            Feed {
                template,
                next: next.clone(),
            },
        );
        // DuckDB 1.4 casts no INTEGER literal to the UBIGINT parameter by itself.
        let done = self.query_row_i64(&sql(&format!("{FEED_FUNCTION}({id}::UBIGINT)")));
        // Still there if the statement failed before binding the function.
        feeds().remove(&id);
        next.lock().unwrap_or_else(|p| p.into_inner()).take();
        done
    }
}

impl Database {
    /// Opens (creating if needed) the database file at `path`, with
    /// `ow_feed` registered, failing the way `duckdb::Connection::open`
    /// does, lock conflicts included.
    pub fn open(path: &std::path::Path) -> duckdb::Result<Arc<Database>> {
        let db = Database::attach(path)?;
        RawConnection::connect(&db)
            .and_then(|c| register(&c))
            .map_err(|e| {
                duckdb::Error::DuckDBFailure(ffi::Error::new(ffi::DuckDBError), Some(e.0))
            })?;
        Ok(db)
    }
}

/// Registers `ow_feed` in the instance `con` belongs to.
pub(crate) fn register(con: &RawConnection) -> Result<(), DuckError> {
    let con = con.handle();
    let name = c_string(FEED_FUNCTION)?;
    // SAFETY: a table function object built, registered and destroyed here;
    // the callbacks below match the C API's signatures.
    unsafe {
        let mut f = ffi::duckdb_create_table_function();
        ffi::duckdb_table_function_set_name(f, name.as_ptr());
        let mut id_type = ffi::duckdb_create_logical_type(ffi::DUCKDB_TYPE_DUCKDB_TYPE_UBIGINT);
        ffi::duckdb_table_function_add_parameter(f, id_type);
        ffi::duckdb_destroy_logical_type(&mut id_type);
        ffi::duckdb_table_function_set_bind(f, Some(feed_bind));
        ffi::duckdb_table_function_set_init(f, Some(feed_init));
        ffi::duckdb_table_function_set_function(f, Some(feed_scan));
        let r = ffi::duckdb_register_table_function(con, f);
        ffi::duckdb_destroy_table_function(&mut f);
        if r != ffi::DuckDBSuccess {
            return Err(DuckError(format!("cannot register {FEED_FUNCTION}")));
        }
    }
    Ok(())
}

/// Runs a callback's body; a panic in it becomes `on_panic(message)`
/// instead of unwinding into DuckDB's C++ (which would abort the process).
fn guarded(body: impl FnOnce(), on_panic: impl FnOnce(&str)) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let what = p
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| p.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        on_panic(&format!("{FEED_FUNCTION} panicked: {what}"));
    }
}

/// A C string of `m`, NUL bytes replaced.
fn c_message(m: &str) -> CString {
    CString::new(m.replace('\0', " ")).unwrap_or_default()
}

unsafe extern "C" fn feed_bind(info: ffi::duckdb_bind_info) {
    guarded(
        // SAFETY: as `bind` requires, from DuckDB.
        || unsafe { bind(info) },
        // SAFETY: `info` is live for the length of this callback.
        |m| unsafe { ffi::duckdb_bind_set_error(info, c_message(m).as_ptr()) },
    )
}

/// # Safety
/// `info` is a live bind info whose one parameter is the UBIGINT declared
/// in `register`.
unsafe fn bind(info: ffi::duckdb_bind_info) {
    // SAFETY (whole function): as the caller promised.
    unsafe {
        let mut v = ffi::duckdb_bind_get_parameter(info, 0);
        let id = ffi::duckdb_get_uint64(v);
        ffi::duckdb_destroy_value(&mut v);
        let Some(feed) = feeds().remove(&id) else {
            let m = c_message(&format!("{FEED_FUNCTION}: no feed {id}"));
            ffi::duckdb_bind_set_error(info, m.as_ptr());
            return;
        };
        for (i, name) in feed.template.names.iter().enumerate() {
            let vector = ffi::duckdb_data_chunk_get_vector(feed.template.types.0, i as u64);
            let mut t = ffi::duckdb_vector_get_column_type(vector);
            ffi::duckdb_bind_add_result_column(info, name.as_ptr(), t);
            ffi::duckdb_destroy_logical_type(&mut t);
        }
        let data = Box::into_raw(Box::new(feed));
        ffi::duckdb_bind_set_bind_data(info, data.cast(), Some(drop_feed));
    }
}

unsafe extern "C" fn drop_feed(data: *mut c_void) {
    // SAFETY: the pointer `feed_bind` made with `Box::into_raw`, dropped
    // once by DuckDB when the statement is done with it.
    drop(unsafe { Box::from_raw(data.cast::<Feed>()) });
}

unsafe extern "C" fn feed_init(_: ffi::duckdb_init_info) {}

unsafe extern "C" fn feed_scan(info: ffi::duckdb_function_info, output: ffi::duckdb_data_chunk) {
    guarded(
        // SAFETY: as `scan` requires, from DuckDB.
        || unsafe { scan(info, output) },
        // SAFETY: `info` is live for the length of this callback.
        |m| unsafe { ffi::duckdb_function_set_error(info, c_message(m).as_ptr()) },
    )
}

/// # Safety
/// `info`'s bind data is the `Feed` `bind` set, and `output` is the chunk
/// DuckDB hands this scan, in the template's column types.
unsafe fn scan(info: ffi::duckdb_function_info, output: ffi::duckdb_data_chunk) {
    // SAFETY (whole function): as the caller promised. Each vector of a
    // chunk can stand in for the output's (DuckDB's own scans do the same).
    // The vectors share their buffers, so the chunk may go right after.
    unsafe {
        let feed = &*ffi::duckdb_function_get_bind_data(info).cast::<Feed>();
        let next = match feed.next.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(next) => next(),
            None => Ok(None),
        };
        match next {
            Ok(Some(chunk)) => {
                for i in 0..feed.template.names.len() as u64 {
                    ffi::duckdb_vector_reference_vector(
                        ffi::duckdb_data_chunk_get_vector(output, i),
                        ffi::duckdb_data_chunk_get_vector(chunk.0, i),
                    );
                }
                ffi::duckdb_data_chunk_set_size(output, chunk.rows() as u64);
            }
            Ok(None) => ffi::duckdb_data_chunk_set_size(output, 0),
            Err(m) => ffi::duckdb_function_set_error(info, c_message(&m).as_ptr()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use duckdb::arrow::array::{ArrayRef, Int32Array, StringArray};
    use duckdb::arrow::datatypes::{DataType, Field};

    /// `id` (every 7th NULL) and a `name` longer than DuckDB inlines (every
    /// 5th NULL) for each number in `ids`.
    pub(crate) fn batch(ids: std::ops::Range<i32>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let id: ArrayRef = Arc::new(Int32Array::from_iter(
            ids.clone().map(|i| (i % 7 != 0).then_some(i)),
        ));
        let name: ArrayRef =
            Arc::new(StringArray::from_iter(ids.map(|i| {
                (i % 5 != 0).then(|| format!("a name longer than twelve bytes {i}"))
            })));
        RecordBatch::try_new(schema, vec![id, name]).unwrap()
    }

    /// Converts `batches` on a thread of its own, as the pull does, and
    /// inserts them into `target` on `con`.
    pub(crate) fn load(
        con: &RawConnection,
        target: &str,
        batches: Vec<RecordBatch>,
    ) -> Result<(), DuckError> {
        let db = con.database().clone();
        let schema = batch(0..0).schema();
        let (template, chunks) = std::thread::scope(|s| {
            s.spawn(|| {
                let c = ChunkConverter::new(&db, schema.clone()).unwrap();
                let chunks: Vec<Chunk> =
                    batches.iter().flat_map(|b| c.convert(b).unwrap()).collect();
                (c.template().unwrap(), chunks)
            })
            .join()
            .unwrap()
        });
        let mut chunks = chunks.into_iter();
        con.insert_chunks(
            target,
            template,
            Box::new(move || Ok(chunks.next().map(Arc::new))),
        )
    }

    fn open() -> (tempfile::TempDir, RawConnection) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("t.duckdb")).unwrap();
        let c = RawConnection::connect(&db).unwrap();
        c.execute("CREATE TABLE t (id INTEGER, name VARCHAR)")
            .unwrap();
        (dir, c)
    }

    #[test]
    fn batches_land_whole_in_order_within_the_transaction() {
        let (_dir, c) = open();
        c.execute("BEGIN").unwrap();
        // Bigger than a vector, and a batch that is not a multiple of one.
        load(&c, "t", vec![batch(0..5000), batch(5000..5003)]).unwrap();
        let counts = c
            .query_row_i64(
                "SELECT count(*), count(id), count(name), sum(id), \
                 count(*) FILTER (WHERE name = 'a name longer than twelve bytes 4999') FROM t",
            )
            .unwrap();
        let expected_sum: i64 = (0..5003).filter(|i| i % 7 != 0).sum();
        assert_eq!(counts, vec![5003, 5003 - 715, 5003 - 1001, expected_sum, 1]);
        // The rows belong to the connection's transaction.
        c.execute("ROLLBACK").unwrap();
        assert_eq!(c.query_row_i64("SELECT count(*) FROM t").unwrap(), vec![0]);

        load(&c, "t", vec![batch(0..5000), batch(5000..5003)]).unwrap();
        let misplaced = c
            .query_row_i64("SELECT count(*) FROM t WHERE id <> rowid OR name NOT LIKE '%' || rowid")
            .unwrap();
        assert_eq!(misplaced, vec![0], "rows are stored in the order they came");
    }

    #[test]
    fn an_empty_feed_inserts_nothing() {
        let (_dir, c) = open();
        load(&c, "t", vec![]).unwrap();
        assert_eq!(c.query_row_i64("SELECT count(*) FROM t").unwrap(), vec![0]);
    }

    #[test]
    fn errors_name_what_went_wrong() {
        let (_dir, c) = open();
        // The feed's own error fails the statement with its words.
        let db = c.database().clone();
        let conv = ChunkConverter::new(&db, batch(0..0).schema()).unwrap();
        let mut chunks = conv.convert(&batch(0..3000)).unwrap().into_iter();
        // Whatever feeds the function learns when the statement is over.
        let (producer, held_by_feed) = std::sync::mpsc::channel::<()>();
        let e = c
            .insert_chunks(
                "t",
                conv.template().unwrap(),
                Box::new(move || {
                    let _ = &held_by_feed;
                    match chunks.next() {
                        Some(c) => Ok(Some(Arc::new(c))),
                        None => Err("the source went away".into()),
                    }
                }),
            )
            .unwrap_err();
        assert!(e.to_string().contains("the source went away"), "{e}");
        assert!(
            producer.send(()).is_err(),
            "the feed outlived its statement"
        );

        c.execute("CREATE TABLE narrow (id INTEGER)").unwrap();
        let e = load(&c, "narrow", vec![batch(0..10)]).unwrap_err();
        assert!(e.to_string().contains("narrow"), "{e}");

        // A panic in the feed fails the statement; the process goes on.
        let conv = ChunkConverter::new(&db, batch(0..0).schema()).unwrap();
        let e = c
            .insert_chunks(
                "t",
                conv.template().unwrap(),
                Box::new(|| panic!("the feed broke")),
            )
            .unwrap_err();
        assert!(e.to_string().contains("the feed broke"), "{e}");

        // A number that names no feed is refused, not followed.
        let e = c
            .execute("SELECT * FROM ow_feed(123456789::UBIGINT)")
            .unwrap_err();
        assert!(e.to_string().contains("no feed 123456789"), "{e}");
    }

    /// Connections work in the attached file, which analysts then open as
    /// a database of its own; a table loaded with at least
    /// `crate::ROW_GROUP_SIZE` rows goes to the file, not through the WAL.
    #[test]
    fn tables_land_in_the_file_without_passing_through_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.duckdb");
        let db = Database::open(&path).unwrap();
        let c = RawConnection::connect(&db).unwrap();
        c.execute("BEGIN; CREATE SCHEMA wv; CREATE TABLE wv.t (id INTEGER, name VARCHAR)")
            .unwrap();
        let rows = 2 * crate::ROW_GROUP_SIZE as i32 + 100;
        load(&c, "wv.t", vec![batch(0..rows)]).unwrap();
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
}
