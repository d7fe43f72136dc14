//! An all-states run's one read of the source: every row of both tables,
//! in one REPEATABLE READ transaction (the country at one moment), one
//! scan of each table, each state's rows put in spool files of its own
//! ([`Segment`]) for its run.
//!
//! Two `COPY … TO STDOUT (FORMAT binary)`, each sorted by the server as a
//! run of one state sorts its rows, so that routing keeps that order:
//!
//! ```sql
//! COPY (SELECT c.<state>::text, c.<key>::text, <companies' columns> FROM companies c
//!       ORDER BY c.<state>::text COLLATE "C", <company key>) TO STDOUT (FORMAT binary)
//! COPY (SELECT p.<company link>::text, <people's columns> FROM people p
//!       ORDER BY <person key>) TO STDOUT (FORMAT binary)
//! ```
//!
//! The companies arrive state by state; their keys go into a [`KeyMap`] as
//! they pass. The people arrive in key order, every state's interleaved:
//! each goes to the spool of each state its company is in, found in the
//! map. So no state's run can start before the people are read whole,
//! and the rows wait on disk rather than in memory.
//!
//! Why not one query: the same join and order in one statement (a
//! `UNION ALL` of the companies and the people joined to them, sorted by
//! state) reads `company_master` once only as a materialized CTE, which
//! keeps PostgreSQL to one core and sorts the two tables' rows as one:
//! 16 s at 500k companies where these two take 7.
//!
//! The read itself stays light: the reader parses the tuples and copies
//! them; the states' runs decode them (see [`super::spool`]).

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duckdb::arrow::datatypes::Schema;
use postgres::{Client, IsolationLevel, Transaction};
use tokio_util::sync::CancellationToken;

use super::keymap::KeyMap;
use super::pull::{order_by, select_list, SelectList};
use super::spool::{spool_err, Segment, Shape, Spool, SpoolWriter, Table};
use super::tuples::{Tuple, Tuples};
use crate::config::{quote_ident, Config};
use crate::error::PipelineError;
use crate::names::Entity;
use crate::source::connect::Backend;
use crate::state::StateCode;

/// Rows between two progress lines of the read.
const PROGRESS_ROWS: u64 = 1_000_000;

/// Every state value's rows, read and spooled.
pub struct Country {
    segments: VecDeque<Segment>,
    shape: Arc<Shape>,
    dir: PathBuf,
    /// Rows read from each table, and how long that took.
    pub read: (u64, u64, f64),
}

impl Country {
    /// Reads both tables through `client`, spooling each state's rows
    /// under `dir` (made empty first).
    pub fn read(
        client: &mut Client,
        config: &Config,
        cancel: &CancellationToken,
        dir: &Path,
    ) -> Result<Country, PipelineError> {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| spool_err(dir, e))?;
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(src_err("starting the read transaction"))?;
        let backend = Backend::of(&mut tx)?;
        let mut fallbacks = Vec::new();
        let s = &config.source;
        let lists = [Entity::Companies, Entity::People].map(|e| {
            let alias = if e == Entity::Companies { "c" } else { "p" };
            select_list(&mut tx, s.table(e), e, alias, &mut fallbacks)
        });
        let [companies, people] = lists;
        let (companies, people) = (companies?, people?);
        let queries = [
            companies_query(config, &companies)?,
            people_query(config, &people)?,
        ];
        let table = |list: &SelectList, skip: usize| Table {
            schema: Arc::new(Schema::new(
                list.columns
                    .iter()
                    .map(|(n, t)| t.arrow_field(n))
                    .collect::<Vec<_>>(),
            )),
            columns: list.columns.clone(),
            skip,
        };
        let shape = Arc::new(Shape {
            companies: table(&companies, 2),
            people: table(&people, 1),
            text_fallbacks: fallbacks,
            decoding: super::spool::Slots::per_core(),
        });

        // The server sorts before the first row: a cancel must reach it.
        let (finished, watching) = std::sync::mpsc::channel::<()>();
        let watcher = backend.map(|b| {
            let (source, cancel) = (config.source.clone(), cancel.clone());
            std::thread::spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    watching.recv_timeout(Duration::from_millis(50))
                {
                    if cancel.is_cancelled() {
                        b.cancel(&source);
                        return;
                    }
                }
            })
        });
        let mut reader = Reader {
            dir,
            shape: &shape,
            cancel,
            segments: Vec::new(),
            keys: KeyMap::default(),
            rows: (0, 0),
        };
        let read = reader.read(&mut tx, &queries);
        drop(finished);
        if let Some(w) = watcher {
            let _ = w.join();
        }
        match read {
            Err(_) if cancel.is_cancelled() => return Err(PipelineError::Cancelled),
            other => other?,
        }
        tx.commit()
            .map_err(src_err("closing the read transaction"))?;
        let Reader { segments, rows, .. } = reader;
        let segments = segments
            .into_iter()
            .map(|b| {
                let people = b.people.map(SpoolWriter::finish).transpose()?;
                Ok(Segment::new(
                    b.value,
                    b.companies,
                    people,
                    b.counted,
                    shape.clone(),
                ))
            })
            .collect::<Result<_, PipelineError>>()?;
        Ok(Country {
            segments,
            shape,
            dir: dir.to_path_buf(),
            read: (rows.0, rows.1, started.elapsed().as_secs_f64()),
        })
    }

    /// The states that have rows.
    pub fn states(&self) -> std::collections::BTreeSet<StateCode> {
        self.segments.iter().filter_map(Segment::state).collect()
    }

    /// The rows of a state that has none now (published before, all gone).
    pub fn empty(&self, state: &StateCode) -> Segment {
        Segment::new(
            Some(state.to_string()),
            None,
            None,
            (0, 0),
            self.shape.clone(),
        )
    }
}

/// Each state value's rows, in the order of the values' bytes, NULL last.
impl Iterator for Country {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        self.segments.pop_front()
    }
}

impl Drop for Country {
    /// The spool files of states not run (a cancelled batch); each run's
    /// segment removes its own as it ends.
    fn drop(&mut self) {
        self.segments.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn src_err(what: &str) -> impl Fn(postgres::Error) -> PipelineError + '_ {
    move |e| PipelineError::Source {
        what: what.to_string(),
        source: e,
    }
}

/// A segment while the read goes on.
struct Building {
    value: Option<String>,
    /// Rows are spooled only for a value that names a state.
    names_state: bool,
    companies: Option<Spool>,
    people: Option<SpoolWriter>,
    counted: (u64, u64),
}

struct Reader<'a> {
    dir: &'a Path,
    shape: &'a Shape,
    cancel: &'a CancellationToken,
    segments: Vec<Building>,
    keys: KeyMap,
    rows: (u64, u64),
}

impl Reader<'_> {
    fn read(
        &mut self,
        tx: &mut Transaction<'_>,
        queries: &[String; 2],
    ) -> Result<(), PipelineError> {
        tracing::debug!(companies = %queries[0], people = %queries[1], "the all-states queries");
        let what = "reading every state's companies";
        let rows = tx.copy_out(queries[0].as_str()).map_err(src_err(what))?;
        self.companies(rows, what)?;
        let what = "reading every state's people";
        let rows = tx.copy_out(queries[1].as_str()).map_err(src_err(what))?;
        self.people(rows, what)?;
        tracing::info!(
            companies = self.rows.0,
            people = self.rows.1,
            company_keys = self.keys.len(),
            "read every state's rows"
        );
        Ok(())
    }

    /// A new segment for `value`, its index.
    fn begin(&mut self, value: Option<&[u8]>, what: &str) -> Result<u32, PipelineError> {
        let value = value
            .map(|v| {
                String::from_utf8(v.to_vec())
                    .map_err(|_| read_err(what, "a state value that is not UTF-8".into()))
            })
            .transpose()?;
        let names_state = value
            .as_deref()
            .is_some_and(|v| StateCode::parse(v).is_ok_and(|s| s.as_str() == v));
        self.segments.push(Building {
            value,
            names_state,
            companies: None,
            people: None,
            counted: (0, 0),
        });
        Ok((self.segments.len() - 1) as u32)
    }

    fn spool_path(&self, segment: u32, entity: Entity) -> PathBuf {
        self.dir.join(format!("{segment}.{}", entity.as_str()))
    }

    fn companies(&mut self, rows: impl BufRead, what: &str) -> Result<(), PipelineError> {
        let mut tuples = Tuples::copy_stream(rows).map_err(io_err(what))?;
        let mut t = Tuple::default();
        let mut current: Option<(u32, Option<SpoolWriter>)> = None;
        while tuples.next_into(&mut t).map_err(io_err(what))? {
            check_width(
                &t,
                self.shape.companies.skip + self.shape.companies.columns.len(),
                what,
            )?;
            let same = current.as_ref().is_some_and(|(i, _)| {
                self.segments[*i as usize]
                    .value
                    .as_deref()
                    .map(str::as_bytes)
                    == t.field(0)
            });
            if !same {
                if let Some((i, Some(w))) = current.take() {
                    self.segments[i as usize].companies = Some(w.finish()?);
                }
                let i = self.begin(t.field(0), what)?;
                let writer = match self.segments[i as usize].names_state {
                    true => Some(SpoolWriter::create(self.spool_path(i, Entity::Companies))?),
                    false => None,
                };
                current = Some((i, writer));
            }
            let (i, writer) = current.as_mut().expect("set above");
            if let Some(key) = t.field(1) {
                self.keys.insert(key, *i);
            }
            match writer {
                Some(w) => w.write(&t)?,
                None => self.segments[*i as usize].counted.0 += 1,
            }
            self.rows.0 += 1;
            self.progress()?;
        }
        if let Some((i, Some(w))) = current.take() {
            self.segments[i as usize].companies = Some(w.finish()?);
        }
        Ok(())
    }

    fn people(&mut self, rows: impl BufRead, what: &str) -> Result<(), PipelineError> {
        let mut tuples = Tuples::copy_stream(rows).map_err(io_err(what))?;
        let mut t = Tuple::default();
        while tuples.next_into(&mut t).map_err(io_err(what))? {
            check_width(
                &t,
                self.shape.people.skip + self.shape.people.columns.len(),
                what,
            )?;
            // A person of no company is in no state, as in a lone run.
            let Some(link) = t.field(0) else { continue };
            for &i in self.keys.get(link) {
                let segment = &mut self.segments[i as usize];
                if !segment.names_state {
                    segment.counted.1 += 1;
                    continue;
                }
                if segment.people.is_none() {
                    let path = self.dir.join(format!("{i}.{}", Entity::People.as_str()));
                    segment.people = Some(SpoolWriter::create(path)?);
                }
                segment.people.as_mut().expect("set above").write(&t)?;
            }
            self.rows.1 += 1;
            self.progress()?;
        }
        Ok(())
    }

    fn progress(&self) -> Result<(), PipelineError> {
        let n = self.rows.0 + self.rows.1;
        if n.is_multiple_of(PROGRESS_ROWS) {
            tracing::info!(
                companies = self.rows.0,
                people = self.rows.1,
                "reading every state"
            );
        }
        if n.is_multiple_of(4096) && self.cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        Ok(())
    }
}

fn check_width(t: &Tuple, fields: usize, what: &str) -> Result<(), PipelineError> {
    match t.len() == fields {
        true => Ok(()),
        false => Err(read_err(
            what,
            format!("a row of {} fields, not {fields}", t.len()),
        )),
    }
}

fn read_err(what: &str, message: String) -> PipelineError {
    PipelineError::Workbench(format!("{what}: {message}"))
}

/// A failed read of the COPY: the server's error as such (whether it may
/// pass by itself is judged on it), else what was wrong with the bytes.
fn io_err(what: &str) -> impl Fn(std::io::Error) -> PipelineError + '_ {
    move |e| {
        let message = e.to_string();
        match e
            .into_inner()
            .map(|inner| inner.downcast::<postgres::Error>())
        {
            Some(Ok(pg)) => PipelineError::Source {
                what: what.to_string(),
                source: *pg,
            },
            _ => read_err(what, message),
        }
    }
}

/// Every company with its state value and key (as text, to match the
/// people's link as PostgreSQL's join would), by state value's bytes and
/// then key, as a lone run orders them.
fn companies_query(config: &Config, list: &SelectList) -> Result<String, PipelineError> {
    let s = &config.source;
    let key = quote_ident(&s.company_key);
    Ok(format!(
        "COPY (SELECT c.{state}::text, c.{key}::text, {cols} FROM {table} c
               ORDER BY c.{state}::text COLLATE \"C\", {order}) TO STDOUT (FORMAT binary)",
        state = quote_ident(&s.state_column),
        cols = list.exprs.join(", "),
        table = s.table(Entity::Companies).quoted(),
        order = key_order(list, &s.company_key, "c")?,
    ))
}

/// Every person with their company's key as text, in key order as a lone
/// run orders them.
fn people_query(config: &Config, list: &SelectList) -> Result<String, PipelineError> {
    let s = &config.source;
    Ok(format!(
        "COPY (SELECT p.{link}::text, {cols} FROM {table} p
               ORDER BY {order}) TO STDOUT (FORMAT binary)",
        link = quote_ident(&s.people_company_column),
        cols = list.exprs.join(", "),
        table = s.table(Entity::People).quoted(),
        order = key_order(list, &s.person_key, "p")?,
    ))
}

fn key_order(list: &SelectList, key: &str, alias: &str) -> Result<String, PipelineError> {
    let (_, t) = list.columns.iter().find(|(n, _)| n == key).ok_or_else(|| {
        PipelineError::Workbench(format!("the key column {key:?} is not in the query"))
    })?;
    Ok(order_by(alias, key, t))
}
