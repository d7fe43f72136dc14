//! An all-states run's one read of the source: every row of both tables,
//! in one query, in one REPEATABLE READ transaction (the country at one
//! moment, one scan of each table), ordered so that each state's rows come
//! together, its companies and then its people, each in key order: what a
//! run of that state alone queries. The rows are handed on state by state
//! as they arrive ([`Segment`]), never held: memory is a few batches.
//!
//! The query is a `UNION ALL` of the companies and the people (each person
//! once per state its company is in, with that state), sorted by the
//! server: PostgreSQL spills a sort to disk within `work_mem`, where a sort
//! of its own in the workbench would need the whole state.
//!
//! ```sql
//! WITH c AS MATERIALIZED (SELECT <companies' columns>, state::text AS s FROM companies c),
//!      k AS (SELECT DISTINCT s, key FROM c)
//! SELECT 0, s, <companies' columns>, <NULL for each person column>, key, NULL FROM c
//! UNION ALL
//! SELECT 1, k.s, <NULL …>, <people's columns>, NULL, p.key FROM people p JOIN k ON p.link = k.key
//! ORDER BY s COLLATE "C", 1, <company key>, <person key>
//! ```

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duckdb::arrow::datatypes::Schema;
use duckdb::arrow::record_batch::RecordBatch;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{Client, IsolationLevel};
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, Config};
use crate::error::PipelineError;
use crate::names::Entity;
use crate::source::connect::Backend;
use crate::source::pgtypes::{ColType, ColumnBuilder};
use crate::source::pull::{
    select_list, Columns, PullStats, Raw, SelectList, StoredRows, TableFeed, TableSender,
};
use crate::state::StateCode;
use crate::workbench::Database;

/// Batches that wait between the reader and a state's run.
const QUEUED_BATCHES: usize = 2;

/// One state value's rows, as the reader hands them on: the companies'
/// batches, then the people's, then the end.
enum Piece {
    Batch(Entity, RecordBatch),
    End,
}

/// What each table's rows look like, the same for every segment.
#[derive(Clone)]
struct Shape {
    companies: (Arc<Schema>, Columns),
    people: (Arc<Schema>, Columns),
    text_fallbacks: Vec<String>,
}

impl Shape {
    fn of(&self, entity: Entity) -> &(Arc<Schema>, Columns) {
        match entity {
            Entity::Companies => &self.companies,
            Entity::People => &self.people,
        }
    }
}

/// One state value's rows: a state's run reads them through
/// [`StoredRows`] as it would from PostgreSQL. Rows the run did not read
/// (it stopped early) are drained by [`Segment::drain`], so that the
/// reader can go on.
pub struct Segment {
    /// The state column's value, as text; `None` for NULL.
    pub value: Option<String>,
    pieces: Mutex<Option<Receiver<Piece>>>,
    shape: Shape,
    read: Mutex<(u64, u64)>,
}

impl Segment {
    /// The state this value names exactly: a lower-case, padded or unknown
    /// value names none.
    pub fn state(&self) -> Option<StateCode> {
        let v = self.value.as_deref()?;
        StateCode::parse(v).ok().filter(|s| s.as_str() == v)
    }

    /// Reads what is left of the rows, counting them; returns the rows
    /// read in all, companies and people.
    pub fn drain(&self) -> (u64, u64) {
        if let Some(rx) = self.take_pieces() {
            let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
            for piece in rx {
                match piece {
                    Piece::Batch(Entity::Companies, b) => read.0 += b.num_rows() as u64,
                    Piece::Batch(Entity::People, b) => read.1 += b.num_rows() as u64,
                    Piece::End => break,
                }
            }
        }
        *self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_pieces(&self) -> Option<Receiver<Piece>> {
        self.pieces.lock().unwrap_or_else(|p| p.into_inner()).take()
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
        let rx = self
            .take_pieces()
            .ok_or_else(|| PipelineError::Workbench(format!("{state}'s rows were read already")))?;
        let batch_rows = config.source.batch_rows;
        let announce = |entity: Entity| {
            let (schema, columns) = self.shape.of(entity);
            TableSender::announce(db, schema.clone(), entity, columns, &outs, batch_rows)
        };
        let mut entity = Entity::Companies;
        let mut sender = announce(entity)?;
        let mut n = (0u64, 0u64);
        loop {
            match rx.recv() {
                Ok(Piece::Batch(e, batch)) => {
                    if e != entity {
                        sender.finish()?;
                        entity = e;
                        sender = announce(entity)?;
                    }
                    match e {
                        Entity::Companies => n.0 += batch.num_rows() as u64,
                        Entity::People => n.1 += batch.num_rows() as u64,
                    }
                    sender.send(batch)?;
                    if cancel.is_cancelled() {
                        return Err(PipelineError::Cancelled);
                    }
                }
                Ok(Piece::End) => break,
                // The reader stopped: the batch reports its error.
                Err(_) if cancel.is_cancelled() => return Err(PipelineError::Cancelled),
                Err(_) => {
                    return Err(PipelineError::Workbench(format!(
                        "the all-states read of the source stopped within {state}'s rows"
                    )))
                }
            }
        }
        sender.finish()?;
        if entity == Entity::Companies {
            announce(Entity::People)?.finish()?;
        }
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = n;
        Ok(PullStats {
            companies: n.0,
            people: n.1,
            text_fallbacks: self.shape.text_fallbacks.clone(),
        })
    }
}

/// The reader: starts the query on a thread of its own and hands its
/// segments on, in order, to whoever calls [`next`](Country::next).
pub struct Country {
    segments: Receiver<Segment>,
    reader: Option<std::thread::JoinHandle<Result<(u64, u64), PipelineError>>>,
    shape: Shape,
}

impl Country {
    /// Starts reading both tables through `client` (moved to the reading
    /// thread, with the transaction). Returns once both tables are
    /// described, or with why they could not be.
    pub fn read(
        mut client: Client,
        config: &Config,
        cancel: &CancellationToken,
    ) -> Result<Country, PipelineError> {
        let (to_batch, segments) = std::sync::mpsc::sync_channel(0);
        let (shaped, shape) = std::sync::mpsc::sync_channel(1);
        let (config, cancel) = (config.clone(), cancel.clone());
        let span = tracing::Span::current();
        let reader = std::thread::spawn(move || {
            let _entered = span.enter();
            read_country(&mut client, &config, &cancel, shaped, to_batch)
        });
        match shape.recv() {
            Ok(shape) => Ok(Country {
                segments,
                reader: Some(reader),
                shape,
            }),
            Err(_) => Err(crate::error::joined("the all-states reader", reader.join())
                .err()
                .unwrap_or_else(|| {
                    PipelineError::Workbench("the all-states reader stopped at once".into())
                })),
        }
    }

    /// The rows of a state that has none now (published before, all gone).
    pub fn empty(&self, state: &StateCode) -> Segment {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let _ = tx.send(Piece::End);
        Segment {
            value: Some(state.to_string()),
            pieces: Mutex::new(Some(rx)),
            shape: self.shape.clone(),
            read: Mutex::new((0, 0)),
        }
    }

    /// The next state value's rows, in order; `None` once every row is
    /// read (or the read failed: [`finish`](Self::finish) says).
    pub fn next(&self) -> Option<Segment> {
        self.segments.recv().ok()
    }

    /// Waits for the reader: the rows read from each table, or why it
    /// stopped.
    pub fn finish(mut self) -> Result<(u64, u64), PipelineError> {
        // Unblocks a reader waiting to hand on a segment nobody takes.
        let Country {
            segments, reader, ..
        } = &mut self;
        drop(std::mem::replace(
            segments,
            std::sync::mpsc::sync_channel(0).1,
        ));
        crate::error::joined(
            "the all-states reader",
            reader.take().expect("joined once").join(),
        )
    }
}

fn src_err(what: &str) -> impl Fn(postgres::Error) -> PipelineError + '_ {
    move |e| PipelineError::Source {
        what: what.to_string(),
        source: e,
    }
}

/// The reading thread: the query, its rows decoded into each table's
/// batches and handed on per state value.
fn read_country(
    client: &mut Client,
    config: &Config,
    cancel: &CancellationToken,
    shaped: SyncSender<Shape>,
    segments: SyncSender<Segment>,
) -> Result<(u64, u64), PipelineError> {
    let s = &config.source;
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(src_err("starting the read transaction"))?;
    let backend = Backend::of(&mut tx)?;
    let mut fallbacks = Vec::new();
    let companies = select_list(
        &mut tx,
        s.table(Entity::Companies),
        Entity::Companies,
        "c",
        &mut fallbacks,
    )?;
    let people = select_list(
        &mut tx,
        s.table(Entity::People),
        Entity::People,
        "p",
        &mut fallbacks,
    )?;
    let sql = country_query(config, &companies, &people)?;
    tracing::debug!(%sql, "the all-states query");
    let schema = |list: &SelectList| {
        Arc::new(Schema::new(
            list.columns
                .iter()
                .map(|(n, t)| t.arrow_field(n))
                .collect::<Vec<_>>(),
        ))
    };
    let shape = Shape {
        companies: (schema(&companies), companies.columns.clone()),
        people: (schema(&people), people.columns.clone()),
        text_fallbacks: fallbacks,
    };
    let _ = shaped.send(shape.clone());

    // The server sorts before the first row: a cancel must reach it there.
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
    let read = stream_rows(&mut tx, &sql, &shape, s.batch_rows, cancel, &segments);
    drop(finished);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    let read = match read {
        Err(_) if cancel.is_cancelled() => Err(PipelineError::Cancelled),
        other => other,
    }?;
    tx.commit()
        .map_err(src_err("closing the read transaction"))?;
    Ok(read)
}

/// The one query (see the module doc).
fn country_query(
    config: &Config,
    companies: &SelectList,
    people: &SelectList,
) -> Result<String, PipelineError> {
    let s = &config.source;
    let key_of = |list: &SelectList, key: &str, alias: &str| {
        let i = list
            .columns
            .iter()
            .position(|(n, _)| n == key)
            .ok_or_else(|| {
                PipelineError::Workbench(format!("the key column {key:?} is not in the query"))
            })?;
        // Text keys sort byte by byte, as DuckDB and a lone run do.
        Ok::<_, PipelineError>(match list.columns[i].1 {
            ColType::Text | ColType::Jsonb => (
                format!("{alias}.{}::text", quote_ident(key)),
                "text".to_string(),
                " COLLATE \"C\"",
            ),
            _ => (
                format!("{alias}.{}", quote_ident(key)),
                list.sql_types[i].clone(),
                "",
            ),
        })
    };
    let (ckey, ckey_type, ccollate) = key_of(companies, &s.company_key, "c")?;
    let (pkey, pkey_type, pcollate) = key_of(people, &s.person_key, "p")?;
    let nulls = |list: &SelectList| {
        list.sql_types
            .iter()
            .map(|t| format!("NULL::{t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (ctable, ptable) = (
        s.table(Entity::Companies).quoted(),
        s.table(Entity::People).quoted(),
    );
    let (state, key, link) = (
        quote_ident(&s.state_column),
        quote_ident(&s.company_key),
        quote_ident(&s.people_company_column),
    );
    // The companies' expressions name `c.`: so do the CTE's columns.
    let cexprs = companies.exprs.join(", ");
    let ccols = companies
        .columns
        .iter()
        .map(|(n, _)| format!("c.{}", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let pexprs = people.exprs.join(", ");
    Ok(format!(
        "WITH c AS MATERIALIZED (
             SELECT {cexprs}, c.{state}::text AS __ow_state, {ckey} AS __ow_ck FROM {ctable} c),
         k AS (SELECT DISTINCT __ow_state, c.{key} AS __ow_key FROM c)
         SELECT * FROM (
             SELECT 0::int2 AS __ow_kind, c.__ow_state, {ccols}, {pnulls},
                    c.__ow_ck, NULL::{pkey_type} AS __ow_pk
             FROM c
             UNION ALL
             SELECT 1::int2, k.__ow_state, {cnulls}, {pexprs}, NULL::{ckey_type}, {pkey}
             FROM {ptable} p JOIN k ON p.{link} = k.__ow_key
         ) u
         ORDER BY u.__ow_state COLLATE \"C\", u.__ow_kind,
                  u.__ow_ck{ccollate}, u.__ow_pk{pcollate}",
        pnulls = nulls(people),
        cnulls = nulls(companies),
    ))
}

/// Decodes the rows and hands them on: a new [`Segment`] whenever the
/// state value changes.
fn stream_rows(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    shape: &Shape,
    batch_rows: usize,
    cancel: &CancellationToken,
    segments: &SyncSender<Segment>,
) -> Result<(u64, u64), PipelineError> {
    let nc = shape.companies.1.len();
    let np = shape.people.1.len();
    let builders = |columns: &Columns| -> Vec<ColumnBuilder> {
        columns
            .iter()
            .map(|(_, t)| ColumnBuilder::new(t, batch_rows))
            .collect()
    };
    // Indexed by `slot(entity)`.
    let mut built = [builders(&shape.companies.1), builders(&shape.people.1)];
    let slot = |e: Entity| match e {
        Entity::Companies => 0,
        Entity::People => 1,
    };
    let gone = || PipelineError::Workbench("the all-states run stopped taking rows".into());
    // Hands the built rows of `entity` on as one batch.
    let flush = |entity: Entity,
                 b: &mut Vec<ColumnBuilder>,
                 to: &SyncSender<Piece>|
     -> Result<(), PipelineError> {
        if b.first().is_none_or(|b| b.is_empty()) {
            return Ok(());
        }
        let (schema, columns) = shape.of(entity);
        let arrays = b
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                b.finish().map_err(|e| PipelineError::Decode {
                    table: entity.raw_table().to_string(),
                    column: columns[i].0.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let batch = RecordBatch::try_new(schema.clone(), arrays)
            .map_err(|e| PipelineError::Workbench(format!("building a batch for {entity}: {e}")))?;
        to.send(Piece::Batch(entity, batch)).map_err(|_| gone())
    };

    let mut rows = tx
        .query_typed_raw(sql, std::iter::empty::<(&str, Type)>())
        .map_err(src_err("querying every state's rows"))?;
    let read_err = src_err("reading every state's rows");
    let mut current: Option<(Option<String>, SyncSender<Piece>)> = None;
    let mut entity = Entity::Companies;
    let mut total = (0u64, 0u64);
    while let Some(row) = rows.next().map_err(&read_err)? {
        let kind: i16 = row.try_get(0).map_err(&read_err)?;
        let value: Option<&str> = row.try_get(1).map_err(&read_err)?;
        let row_entity = if kind == 0 {
            Entity::Companies
        } else {
            Entity::People
        };
        if current.as_ref().is_none_or(|(v, _)| v.as_deref() != value) {
            if let Some((_, to)) = current.take() {
                flush(entity, &mut built[slot(entity)], &to)?;
                to.send(Piece::End).map_err(|_| gone())?;
            }
            let (to, pieces) = std::sync::mpsc::sync_channel(QUEUED_BATCHES);
            segments
                .send(Segment {
                    value: value.map(str::to_string),
                    pieces: Mutex::new(Some(pieces)),
                    shape: shape.clone(),
                    read: Mutex::new((0, 0)),
                })
                .map_err(|_| gone())?;
            current = Some((value.map(str::to_string), to));
            entity = Entity::Companies;
        }
        let to = &current.as_ref().expect("set above").1;
        if row_entity != entity {
            flush(entity, &mut built[slot(entity)], to)?;
            entity = row_entity;
        }
        let (b, offset, count) = match row_entity {
            Entity::Companies => (&mut built[0], 2, nc),
            Entity::People => (&mut built[1], 2 + nc, np),
        };
        for (i, builder) in b.iter_mut().enumerate() {
            let v: Option<Raw> = row.try_get(offset + i).map_err(&read_err)?;
            match v {
                None => builder.append_null(),
                Some(raw) => builder.append(raw.0).map_err(|e| PipelineError::Decode {
                    table: row_entity.raw_table().to_string(),
                    column: shape.of(row_entity).1[i].0.clone(),
                    message: e.to_string(),
                })?,
            }
        }
        debug_assert_eq!(b.len(), count);
        match row_entity {
            Entity::Companies => total.0 += 1,
            Entity::People => total.1 += 1,
        }
        if b.first().is_some_and(|b| b.len() >= batch_rows) {
            flush(row_entity, b, to)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
        }
        if (total.0 + total.1).is_multiple_of(batch_rows as u64 * 64) {
            tracing::info!(companies = total.0, people = total.1, "reading every state");
        }
    }
    if let Some((_, to)) = current.take() {
        flush(entity, &mut built[slot(entity)], &to)?;
        to.send(Piece::End).map_err(|_| gone())?;
    }
    Ok(total)
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segment({:?})", self.value)
    }
}
