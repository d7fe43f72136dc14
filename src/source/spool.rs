//! One state value's rows from an all-states read ([`Segment`]), kept in
//! spool files until the state's run reads them: its companies and its
//! people, each a file of the tuples PostgreSQL sent (see
//! [`super::tuples`]), in the order they came. The state's run sorts them
//! by key ([`super::sort`]) and decodes them as a pull from PostgreSQL
//! would ([`StoredRows`]), so that this work is spread over the runs
//! rather than done by the one reader.
//!
//! The files are the segment's: they go when it is dropped, once its run
//! ends. A whole read is a few hundred bytes a row on disk, about what
//! PostgreSQL sends for both tables.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex};

use duckdb::arrow::datatypes::Schema;
use tokio_util::sync::CancellationToken;

use super::pull::{BatchBuilder, Columns, PullStats, StoredRows, TableFeed, TableSender};
use super::sort::{sorted, SortBy, TupleSource, BUDGET};
use super::tuples::{Tuple, Tuples};
use crate::config::Config;
use crate::error::PipelineError;
use crate::names::Entity;
use crate::state::StateCode;
use crate::workbench::Database;

/// What every segment of a read shares: each table's columns, and the
/// slots for decoding.
pub struct Shape {
    pub companies: Table,
    pub people: Table,
    pub text_fallbacks: Vec<String>,
    pub decoding: Slots,
}

/// How many segments are decoded at once. One: a decoding run is three
/// busy threads (its sorter and decoder, and two file writers), two cores'
/// worth, while other runs validate and upload. Measured at 2,000,000
/// companies on 2 cores, dry runs: one at a time 32.5-35.4 s and 336-345
/// MiB at peak, one per core 34.6-36.1 s and 398-408 MiB (each decoding
/// run holds its sort's buffer and its writers' row groups; eight at once
/// went past the workbench's 128MB `memory_limit`). Runs past their rows
/// (validating, uploading) hold no slot.
pub struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Waits for a free slot, or the cancel.
    fn take(&self, cancel: &CancellationToken) -> Result<SlotTaken<'_>, PipelineError> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
            free = self
                .freed
                .wait_timeout(free, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Ok(SlotTaken(self))
    }
}

struct SlotTaken<'a>(&'a Slots);

impl Drop for SlotTaken<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// One table's columns, how many fields come before them in each spooled
/// tuple (what the read routes and sorts by), and the sort left to the
/// state's run (`None`: the server sorted).
pub struct Table {
    pub schema: Arc<Schema>,
    pub columns: Columns,
    pub skip: usize,
    pub sort: Option<SortBy>,
}

impl Shape {
    pub fn of(&self, entity: Entity) -> &Table {
        match entity {
            Entity::Companies => &self.companies,
            Entity::People => &self.people,
        }
    }
}

pub(crate) fn spool_err(path: &Path, e: std::io::Error) -> PipelineError {
    PipelineError::Workbench(format!("spool file {}: {e}", path.display()))
}

/// A spool file being written.
pub struct SpoolWriter {
    path: PathBuf,
    file: BufWriter<File>,
    rows: u64,
}

impl SpoolWriter {
    pub fn create(path: PathBuf) -> Result<SpoolWriter, PipelineError> {
        let file = File::create(&path).map_err(|e| spool_err(&path, e))?;
        Ok(SpoolWriter {
            // Small: every state's people file is open at once.
            file: BufWriter::with_capacity(64 * 1024, file),
            path,
            rows: 0,
        })
    }

    pub fn write(&mut self, t: &Tuple) -> Result<(), PipelineError> {
        self.rows += 1;
        self.file
            .write_all(&t.bytes)
            .map_err(|e| spool_err(&self.path, e))
    }

    /// Flushed (not synced: a spool does not outlive its process's use).
    pub fn finish(mut self) -> Result<Spool, PipelineError> {
        self.file.flush().map_err(|e| spool_err(&self.path, e))?;
        Ok(Spool {
            path: self.path,
            rows: self.rows,
        })
    }
}

/// A written spool file.
pub struct Spool {
    path: PathBuf,
    rows: u64,
}

/// One state value's rows: a state's run reads them through
/// [`StoredRows`] as it would from PostgreSQL.
pub struct Segment {
    /// The state column's value, as text; `None` for NULL.
    pub value: Option<String>,
    companies: Option<Spool>,
    people: Option<Spool>,
    /// Rows of a value that names no state are counted, not kept.
    counted: (u64, u64),
    shape: Arc<Shape>,
    read: AtomicBool,
}

impl Segment {
    pub fn new(
        value: Option<String>,
        companies: Option<Spool>,
        people: Option<Spool>,
        counted: (u64, u64),
        shape: Arc<Shape>,
    ) -> Segment {
        Segment {
            value,
            companies,
            people,
            counted,
            shape,
            read: AtomicBool::new(false),
        }
    }

    /// The state this value names exactly: a lower-case, padded or unknown
    /// value names none.
    pub fn state(&self) -> Option<StateCode> {
        let v = self.value.as_deref()?;
        StateCode::parse(v).ok().filter(|s| s.as_str() == v)
    }

    /// Its rows, companies and people.
    pub fn rows(&self) -> (u64, u64) {
        let n = |s: &Option<Spool>| s.as_ref().map_or(0, |s| s.rows);
        (
            self.counted.0 + n(&self.companies),
            self.counted.1 + n(&self.people),
        )
    }

    fn spool(&self, entity: Entity) -> Option<&Spool> {
        match entity {
            Entity::Companies => self.companies.as_ref(),
            Entity::People => self.people.as_ref(),
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for spool in [&self.companies, &self.people].into_iter().flatten() {
            let _ = std::fs::remove_file(&spool.path);
        }
    }
}

impl StoredRows for Segment {
    fn read_state(
        &self,
        state: &StateCode,
        config: &Config,
        db: &Arc<Database>,
        cancel: &CancellationToken,
        outs: Vec<SyncSender<TableFeed>>,
    ) -> Result<PullStats, PipelineError> {
        if self.state().as_ref() != Some(state) {
            return Err(PipelineError::Workbench(format!(
                "the all-states read handed {:?} to the run of {state}",
                self.value
            )));
        }
        if self.read.swap(true, Ordering::SeqCst) {
            return Err(PipelineError::Workbench(format!(
                "{state}'s rows were read already"
            )));
        }
        let _slot = self.shape.decoding.take(cancel)?;
        let batch_rows = config.source.batch_rows;
        let mut n = [0u64; 2];
        for (i, entity) in [Entity::Companies, Entity::People].into_iter().enumerate() {
            let table = self.shape.of(entity);
            let mut sender = TableSender::announce(
                db,
                table.schema.clone(),
                entity,
                &table.columns,
                &outs,
                batch_rows,
            )?;
            if let Some(spool) = self.spool(entity) {
                n[i] = decode(spool, entity, table, batch_rows, cancel, &mut sender)?;
            }
            sender.finish()?;
        }
        Ok(PullStats {
            companies: n[0],
            people: n[1],
            text_fallbacks: self.shape.text_fallbacks.clone(),
        })
    }
}

/// Decodes a spool file's tuples into batches of `batch_rows` and hands
/// them on. Returns the rows.
fn decode(
    spool: &Spool,
    entity: Entity,
    table: &Table,
    batch_rows: usize,
    cancel: &CancellationToken,
    sender: &mut TableSender,
) -> Result<u64, PipelineError> {
    let mut tuples: Box<dyn TupleSource> = match table.sort {
        Some(by) => sorted(&spool.path, by, BUDGET),
        None => File::open(&spool.path)
            .map(|f| Box::new(Tuples::bare(BufReader::with_capacity(256 * 1024, f))) as _),
    }
    .map_err(|e| spool_err(&spool.path, e))?;
    let mut batch = BatchBuilder::new(entity, table.schema.clone(), &table.columns, batch_rows);
    let mut t = Tuple::default();
    let mut n = 0u64;
    while tuples
        .next_into(&mut t)
        .map_err(|e| spool_err(&spool.path, e))?
    {
        let width = table.skip + table.columns.len();
        if t.len() != width {
            return Err(spool_err(
                &spool.path,
                std::io::Error::other(format!("a row of {} fields, not {width}", t.len())),
            ));
        }
        for i in 0..table.columns.len() {
            batch.push(i, t.field(table.skip + i))?;
        }
        n += 1;
        if n.is_multiple_of(batch_rows as u64) {
            batch.send_to(sender)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
        }
    }
    batch.send_to(sender)?;
    if n != spool.rows {
        return Err(spool_err(
            &spool.path,
            std::io::Error::other(format!("{n} rows read back of {} written", spool.rows)),
        ));
    }
    Ok(n)
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segment({:?})", self.value)
    }
}
