//! An all-states run's one read of the source: every row of both tables,
//! in one REPEATABLE READ transaction (the country at one moment), one
//! scan of each table, each state's rows put in spool files of its own
//! ([`Segment`]) for its run.
//!
//! Two `COPY … TO STDOUT (FORMAT binary)`, each a plain scan of the table,
//! as streaming it whole costs the server:
//!
//! ```sql
//! COPY (SELECT c.<state>::text, c.<key>::text, <sort key>, <companies' columns>
//!       FROM companies c) TO STDOUT (FORMAT binary)
//! COPY (SELECT p.<company link>::text, <sort key>, <people's columns>
//!       FROM people p) TO STDOUT (FORMAT binary)
//! ```
//!
//! Each company goes to its state value's spool, and its key into a
//! [`KeyMap`]; each person goes to the spool of each state their company
//! is in, found in the map. No state's run can start before the people are
//! read whole, and the rows wait on disk rather than in memory. Each
//! state's run then sorts its own rows by key (`source::sort`, in bounded
//! memory), into the order a run of that state alone has PostgreSQL sort
//! them in; a key type that module cannot sort is sorted by the server
//! (`ORDER BY <key>` in the query).
//!
//! Why not let the server sort: on a 2-core machine, the two sorted reads
//! took 30.8 s at 2,000,000 companies against 17.1 s for the plain ones,
//! and the sort of one `UNION ALL` of both (the first design) twice that:
//! the server's sort of wide rows within `work_mem` is its costliest part
//! of the read, and on Neon it is the compute the read is billed for.
//! Sorting each state apart on our side costs a few seconds of our CPU.
//!
//! The read itself stays light: the reader parses the tuples and copies
//! them; the states' runs sort and decode them (see [`super::spool`]).

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duckdb::arrow::datatypes::Schema;
use postgres::{Client, IsolationLevel, Transaction};
use tokio_util::sync::CancellationToken;

use super::keymap::KeyMap;
use super::pull::{key_expr, order_by, select_list, SelectList};
use super::sort::{KeyOrder, SortBy};
use super::spool::{spool_err, Segment, Shape, SpoolWriter, Table};
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
        let ckey = Key::of(&companies, &s.company_key, "c")?;
        let pkey = Key::of(&people, &s.person_key, "p")?;
        let queries = [
            companies_query(config, &companies, &ckey),
            people_query(config, &people, &pkey),
        ];
        // The fields before the columns: the state value and key text,
        // then the sort key, of a company; the link, then the sort key, of
        // a person.
        let table = |list: &SelectList, skip: usize, key: &Key| Table {
            schema: Arc::new(Schema::new(
                list.columns
                    .iter()
                    .map(|(n, t)| t.arrow_field(n))
                    .collect::<Vec<_>>(),
            )),
            columns: list.columns.clone(),
            skip,
            sort: key.order.map(|order| SortBy {
                field: skip - 1,
                order,
            }),
        };
        let shape = Arc::new(Shape {
            companies: table(&companies, 3, &ckey),
            people: table(&people, 2, &pkey),
            text_fallbacks: fallbacks,
            decoding: super::spool::Slots::new(1),
        });

        // The server may take long before the first row (a key it sorts,
        // a slow scan): a cancel must reach it there.
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
            by_value: HashMap::new(),
            null_value: None,
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
        let Reader {
            mut segments,
            rows,
            keys,
            ..
        } = reader;
        // The map is the read's largest part (~45 bytes a company): given
        // back before the states' runs start.
        drop(keys);
        ow_duckdb::trim_heap();
        // In the order of the values' bytes, NULL last, as the states run.
        segments.sort_by(|a, b| match (&a.value, &b.value) {
            (Some(a), Some(b)) => a.as_bytes().cmp(b.as_bytes()),
            (a, b) => a.is_none().cmp(&b.is_none()),
        });
        let segments = segments
            .into_iter()
            .map(|b| {
                let companies = b.companies.map(SpoolWriter::finish).transpose()?;
                let people = b.people.map(SpoolWriter::finish).transpose()?;
                Ok(Segment::new(
                    b.value,
                    companies,
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
    companies: Option<SpoolWriter>,
    people: Option<SpoolWriter>,
    counted: (u64, u64),
}

struct Reader<'a> {
    dir: &'a Path,
    shape: &'a Shape,
    cancel: &'a CancellationToken,
    segments: Vec<Building>,
    /// Each state value's segment; NULL's apart.
    by_value: HashMap<Vec<u8>, u32>,
    null_value: Option<u32>,
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

    /// The segment of the state value `value`, begun at its first row.
    fn segment_of(&mut self, value: Option<&[u8]>, what: &str) -> Result<u32, PipelineError> {
        let known = match value {
            None => self.null_value,
            Some(v) => self.by_value.get(v).copied(),
        };
        if let Some(i) = known {
            return Ok(i);
        }
        let i = self.begin(value, what)?;
        match value {
            None => self.null_value = Some(i),
            Some(v) => {
                self.by_value.insert(v.to_vec(), i);
            }
        }
        Ok(i)
    }

    fn spool_path(&self, segment: u32, entity: Entity) -> PathBuf {
        self.dir.join(format!("{segment}.{}", entity.as_str()))
    }

    fn companies(&mut self, rows: impl BufRead, what: &str) -> Result<(), PipelineError> {
        let mut tuples = Tuples::copy_stream(rows).map_err(io_err(what))?;
        let mut t = Tuple::default();
        let width = self.shape.companies.skip + self.shape.companies.columns.len();
        while tuples.next_into(&mut t).map_err(io_err(what))? {
            check_width(&t, width, what)?;
            let i = self.segment_of(t.field(0), what)?;
            if let Some(key) = t.field(1) {
                self.keys.insert(key, i);
            }
            if self.segments[i as usize].names_state {
                if self.segments[i as usize].companies.is_none() {
                    let path = self.spool_path(i, Entity::Companies);
                    self.segments[i as usize].companies = Some(SpoolWriter::create(path)?);
                }
                let w = self.segments[i as usize].companies.as_mut();
                w.expect("set above").write(&t)?;
            } else {
                self.segments[i as usize].counted.0 += 1;
            }
            self.rows.0 += 1;
            self.progress()?;
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
                let segment = &self.segments[i as usize];
                if !segment.names_state {
                    self.segments[i as usize].counted.1 += 1;
                    continue;
                }
                if segment.people.is_none() {
                    let path = self.spool_path(i, Entity::People);
                    self.segments[i as usize].people = Some(SpoolWriter::create(path)?);
                }
                let w = self.segments[i as usize].people.as_mut();
                w.expect("set above").write(&t)?;
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

/// A table's key: its sort expression, and who sorts by it.
struct Key {
    /// What a lone run sorts by (`pull::order_by`), without the collation.
    expr: String,
    /// How the state's run sorts by it; `None`: the server sorts.
    order: Option<KeyOrder>,
    /// The server's `ORDER BY`, when it sorts.
    order_by: String,
}

impl Key {
    fn of(list: &SelectList, key: &str, alias: &str) -> Result<Key, PipelineError> {
        let (_, t) = list.columns.iter().find(|(n, _)| n == key).ok_or_else(|| {
            PipelineError::Workbench(format!("the key column {key:?} is not in the query"))
        })?;
        Ok(Key {
            expr: key_expr(alias, key, t),
            order: KeyOrder::of(t),
            order_by: order_by(alias, key, t),
        })
    }

    /// The query's `ORDER BY`, if the server sorts.
    fn server_order(&self) -> String {
        match self.order {
            Some(_) => String::new(),
            None => format!(" ORDER BY {}", self.order_by),
        }
    }
}

/// Every company with its state value and key (as text, to match the
/// people's link as PostgreSQL's join would) and sort key.
fn companies_query(config: &Config, list: &SelectList, key: &Key) -> String {
    let s = &config.source;
    format!(
        "COPY (SELECT c.{state}::text, c.{ckey}::text, {sort}, {cols} FROM {table} c{order})
         TO STDOUT (FORMAT binary)",
        state = quote_ident(&s.state_column),
        ckey = quote_ident(&s.company_key),
        sort = key.expr,
        cols = list.exprs.join(", "),
        table = s.table(Entity::Companies).quoted(),
        order = key.server_order(),
    )
}

/// Every person with their company's key as text, and their sort key.
fn people_query(config: &Config, list: &SelectList, key: &Key) -> String {
    let s = &config.source;
    format!(
        "COPY (SELECT p.{link}::text, {sort}, {cols} FROM {table} p{order})
         TO STDOUT (FORMAT binary)",
        link = quote_ident(&s.people_company_column),
        sort = key.expr,
        cols = list.exprs.join(", "),
        table = s.table(Entity::People).quoted(),
        order = key.server_order(),
    )
}
