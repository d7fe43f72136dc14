//! Step 1 and 2: pull a state's companies and people from PostgreSQL and
//! load them into the workbench's `<state>.companies_raw` / `people_raw`.
//!
//! Rows are streamed: the server filters (the state is a bind parameter),
//! each row is decoded from the binary protocol into Arrow builders, and
//! every `batch_rows` rows the batch is converted into DuckDB chunks and
//! inserted into the table, then dropped. Memory is a few batches,
//! whatever the state's size.
//!
//! Both queries run in one REPEATABLE READ transaction so the people always
//! belong to exactly the companies that were pulled, even while the source
//! is being written to.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use duckdb::arrow::datatypes::Schema;
use duckdb::arrow::record_batch::RecordBatch;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, Type};
use postgres::{Client, IsolationLevel, Transaction};
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, Config, QualifiedName, SourceConfig};
use crate::error::PipelineError;
use crate::names::Entity;
use crate::source::pgtypes::{column_defs, ColType, ColumnBuilder, DecodeError};
use crate::source::rechunk::Rechunker;
use crate::state::StateCode;
use crate::workbench::{
    chunk_rows, Chunk, ChunkConverter, Database, DuckError, NextChunk, RawConnection, Template,
};

/// A raw column value, borrowed from the row buffer; decoding happens in
/// [`ColumnBuilder::append`], which knows the column's type.
pub(crate) struct Raw<'a>(pub(crate) &'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A source table's columns with the DuckDB types the pull gives them.
pub type Columns = Vec<(String, ColType)>;

/// A table's columns as they will land in the workbench, without reading a
/// row: what the rules are checked against.
pub fn describe(
    client: &mut impl postgres::GenericClient,
    table: &crate::config::QualifiedName,
) -> Result<Columns, PipelineError> {
    Ok(crate::source::connect::describe(client, table)?
        .into_iter()
        .map(|c| {
            let t = ColType::from_pg(&c.ty, c.typmod).unwrap_or(ColType::Text);
            (c.name, t)
        })
        .collect())
}

/// The `ORDER BY` term for the key column `key` of type `t`: the order
/// DuckDB itself sorts in. Text compares byte by byte there, which is
/// PostgreSQL's "C" collation, whatever the database's locale; JSON, enums
/// and text fallbacks are compared as the text the workbench stores.
pub(crate) fn order_by(alias: &str, key: &str, t: &ColType) -> String {
    match t {
        ColType::Text | ColType::Jsonb => format!("{} COLLATE \"C\"", key_expr(alias, key, t)),
        _ => key_expr(alias, key, t),
    }
}

/// The value [`order_by`] sorts by.
pub(crate) fn key_expr(alias: &str, key: &str, t: &ColType) -> String {
    let col = format!("{alias}.{}", quote_ident(key));
    match t {
        ColType::Text | ColType::Jsonb => format!("{col}::text"),
        _ => col,
    }
}

/// One message for each `[source]` setting that names a column `entity`'s
/// table (described as `columns`) does not have: the state column and key
/// of the companies, the key and company link of the people.
pub fn missing_columns(
    s: &SourceConfig,
    entity: Entity,
    table: &str,
    columns: &Columns,
) -> Vec<String> {
    let settings = match entity {
        Entity::Companies => [
            ("source.state_column", &s.state_column),
            ("source.company_key", &s.company_key),
        ],
        Entity::People => [
            ("source.person_key", &s.person_key),
            ("source.people_company_column", &s.people_company_column),
        ],
    };
    settings
        .into_iter()
        .filter(|(_, column)| !columns.iter().any(|(name, _)| name == *column))
        .map(|(setting, column)| format!("{setting} = {column:?}: {table} has no such column"))
        .collect()
}

/// What the pull did, for the run report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PullStats {
    pub companies: u64,
    pub people: u64,
    /// Columns carried as text because their type has no exact mapping.
    pub text_fallbacks: Vec<String>,
}

/// Where the pull inserts the rows as well, besides its taps: the
/// workbench's raw tables of `schema`, in `duck`'s open transaction.
pub struct LoadInto<'a> {
    pub duck: &'a RawConnection,
    pub schema: &'a str,
}

/// A table as one consumer of the pull receives it: the loading thread
/// creates the raw table with these columns, a [`Tap`] does what it likes
/// with the rows. The chunks arrive until the reader drops its end, at the
/// table's last row or on failure (the pull's result says which).
pub struct TableFeed {
    pub entity: Entity,
    pub columns: Vec<(String, ColType)>,
    pub template: Template,
    chunks: Receiver<Arc<Chunk>>,
}

impl TableFeed {
    /// Its workbench table, `companies_raw` or `people_raw`.
    pub fn name(&self) -> &'static str {
        self.entity.raw_table()
    }

    /// The rows, as `RawConnection::run_with_feed` reads them.
    pub fn into_feed(self) -> (Template, NextChunk) {
        let chunks = self.chunks;
        (self.template, Box::new(move || Ok(chunks.recv().ok())))
    }
}

/// Something else that reads every table's rows while they load, on a
/// thread of its own, one table after the other: the export's file
/// writers. The reader hands each chunk to every consumer, so the slowest
/// sets the pace and memory stays bounded.
pub type Tap<'a> = Box<dyn FnMut(TableFeed) -> Result<(), PipelineError> + Send + 'a>;

/// Where a pull's rows come from.
pub enum Read<'a> {
    /// One state's rows, queried from PostgreSQL (a run of its own).
    State(&'a mut Client, &'a StateCode),
    /// One state's rows from an all-states run's one query.
    Stored(&'a dyn StoredRows, &'a StateCode),
}

/// Rows read from PostgreSQL by another query than the pull's own (see
/// `source::country`).
pub trait StoredRows: Sync {
    /// Hands `state`'s companies, then its people, to `outs` as a pull from
    /// PostgreSQL would: the same columns, in key order, in full chunks.
    fn read_state(
        &self,
        state: &StateCode,
        config: &Config,
        db: &Arc<Database>,
        cancel: &CancellationToken,
        outs: Vec<SyncSender<TableFeed>>,
    ) -> Result<PullStats, PipelineError>;
}

/// Pulls both entities, handing the same rows to each of `taps` (the
/// export's file writers) and, with `into`, inserting them into
/// `<schema>.companies_raw` and `<schema>.people_raw` as well (the link
/// rule's runs; the others' raw tables are views over their files). The
/// caller owns the DuckDB connection's transaction state.
///
/// A thread besides the taps' reads rows from PostgreSQL, decodes them
/// into Arrow batches and converts those into DuckDB chunks; with `into`,
/// this one inserts the chunks (see `ow_duckdb`'s ingest). The two sides cost about
/// the same CPU (measured: ~0.45 s each for the benchmark's 200k rows;
/// inserting is DuckDB's column statistics and row-group writes), so with
/// the database on another machine they overlap on two cores. At most two
/// batches wait between the reader and each consumer: memory stays bounded.
///
/// Converting on the reading side and inserting instead of appending took
/// the loading side from ~0.9 s of CPU to ~0.45 s (an appender copies every
/// chunk once more before it reaches the table); the run's CPU fell by
/// ~0.1-0.3 s (medians of 9 and 11 interleaved runs).
///
/// Cancellation is checked between batches, and a watcher thread also asks
/// the server to cancel the query (see [`crate::source::connect::Backend`]): the server
/// buffers output, so a slow query can go a long time without a batch
/// boundary.
pub fn pull(
    read: Read<'_>,
    config: &Config,
    db: &Arc<Database>,
    into: Option<LoadInto<'_>>,
    cancel: &CancellationToken,
    taps: Vec<Tap<'_>>,
) -> Result<PullStats, PipelineError> {
    // Named by the reader once its transaction has begun.
    let backend = std::sync::OnceLock::<crate::source::connect::Backend>::new();
    let backend = &backend;
    // Dropped when both sides are done, which wakes the watcher at once: a
    // plain sleep between checks kept the pull waiting up to 50 ms more.
    let (finished, watching) = std::sync::mpsc::channel::<()>();
    let mut outs = Vec::new();
    let loading = into.map(|into| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<TableFeed>(1);
        outs.push(tx);
        (into, rx)
    });
    let (read, loaded, tapped) = std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(RecvTimeoutError::Timeout) =
                watching.recv_timeout(Duration::from_millis(50))
            {
                if let (true, Some(backend)) = (cancel.is_cancelled(), backend.get()) {
                    backend.cancel(&config.source);
                    return;
                }
            }
        });
        // Log lines from the reader and the taps carry the run's state and
        // id too.
        let span = tracing::Span::current();
        let tapping: Vec<_> = taps
            .into_iter()
            .map(|mut tap| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<TableFeed>(1);
                outs.push(tx);
                let span = span.clone();
                scope.spawn(move || {
                    let _entered = span.enter();
                    rx.into_iter().try_for_each(&mut tap)
                })
            })
            .collect();
        let reader = scope.spawn(move || {
            let _entered = span.enter();
            match read {
                Read::State(client, state) => {
                    read_source(client, config, state, cancel, db, outs, backend)
                }
                Read::Stored(rows, state) => rows.read_state(state, config, db, cancel, outs),
            }
        });
        let loaded = match loading {
            Some((into, rx)) => load(into.duck, into.schema, config.workbench.compress_tables, rx),
            None => Ok(()),
        };
        let read = crate::error::joined("the source reader", reader.join());
        drop(finished);
        let tapped: Result<(), PipelineError> = tapping
            .into_iter()
            .try_for_each(|t| crate::error::joined("a pull tap", t.join()));
        (read, loaded, tapped)
    });
    match (read, loaded, tapped) {
        _ if cancel.is_cancelled() => Err(PipelineError::Cancelled),
        // A failed consumer's error is the one that says what went wrong:
        // the reader may have failed too ("stopped taking rows", once no
        // consumer reads), or read the table on for the others.
        (_, Err(e), _) | (_, Ok(()), Err(e)) => Err(e),
        (read, Ok(()), Ok(())) => read,
    }
}

/// The loading side: creates each table and inserts its chunks, inside
/// `duck`'s open transaction. The reader closing the channel is the end:
/// it has finished or failed, and its own result says which.
fn load(
    duck: &RawConnection,
    schema: &str,
    compress: bool,
    tables: Receiver<TableFeed>,
) -> Result<(), PipelineError> {
    let wb = |what: String| move |e: DuckError| PipelineError::Workbench(format!("{what}: {e}"));
    for table in tables {
        let name = table.name();
        let target = format!("{}.{}", quote_ident(schema), quote_ident(name));
        crate::workbench::drop_other_kind(duck, schema, name, false)
            .map_err(wb(format!("replacing the view {schema}.{name}")))?;
        duck.execute(&format!(
            "CREATE OR REPLACE TABLE {target} ({})",
            column_defs(&table.columns, compress)
        ))
        .map_err(wb(format!("creating {schema}.{name}")))?;
        let (template, next) = table.into_feed();
        duck.insert_chunks(&target, template, next)
            .map_err(wb(format!("loading {schema}.{name}")))?;
    }
    Ok(())
}

/// The reading side: both queries in one REPEATABLE READ transaction.
fn read_source(
    client: &mut Client,
    config: &Config,
    state: &StateCode,
    cancel: &CancellationToken,
    db: &Arc<Database>,
    outs: Vec<SyncSender<TableFeed>>,
    backend: &std::sync::OnceLock<crate::source::connect::Backend>,
) -> Result<PullStats, PipelineError> {
    let s = &config.source;
    let companies_table = s.table(Entity::Companies);
    let people_table = s.table(Entity::People);
    let companies = companies_table.quoted();
    let people = people_table.quoted();
    let state_col = quote_ident(&s.state_column);
    let mut pg = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| PipelineError::Source {
            what: "starting the read transaction".into(),
            source: e,
        })?;
    if let Some(b) = crate::source::connect::Backend::of(&mut pg)? {
        let _ = backend.set(b);
    }

    let mut stats = PullStats::default();
    let companies_from = format!("FROM {companies} c WHERE c.{state_col} = $1");
    let people_from = format!(
        "FROM {people} p WHERE p.{link} IN (SELECT c.{key} {companies_from})",
        link = quote_ident(&s.people_company_column),
        key = quote_ident(&s.company_key),
    );
    for (entity, source_table, from, alias) in [
        (Entity::Companies, companies_table, &companies_from, "c"),
        (Entity::People, people_table, &people_from, "p"),
    ] {
        let query = EntityQuery {
            entity,
            source_table,
            from,
            alias,
            key: s.key(entity),
            state,
            batch_rows: s.batch_rows,
        };
        let rows = stream_query(
            &mut pg,
            &query,
            cancel,
            db,
            &outs,
            &mut stats.text_fallbacks,
        )?;
        match entity {
            Entity::Companies => stats.companies = rows,
            Entity::People => stats.people = rows,
        }
    }
    pg.commit().map_err(|e| PipelineError::Source {
        what: "closing the read transaction".into(),
        source: e,
    })?;
    Ok(stats)
}

/// One entity's query: `SELECT <alias's columns> <from> ORDER BY <key>`
/// with the state as `$1`, read in batches of `batch_rows`.
struct EntityQuery<'a> {
    entity: Entity,
    source_table: &'a QualifiedName,
    from: &'a str,
    alias: &'a str,
    key: &'a str,
    state: &'a StateCode,
    batch_rows: usize,
}

/// Describes the table (`SELECT alias.* <from>` reads all of its columns),
/// announces it with its mapped types, and streams the rows ordered by `key`
/// as Arrow batches. Returns the row count.
///
/// The server sorts, not DuckDB: the rows land in the raw table in key
/// order and the export writes them as they lie, which is what makes the
/// Parquet bytes depend on the data alone. PostgreSQL sorts in parallel
/// workers, often on a core this process is not using; sorting in DuckDB at
/// export time cost ~0.4 s of CPU and ~35 MiB of peak memory on the
/// benchmark, against ~0.15 s more for the query.
fn stream_query(
    tx: &mut Transaction<'_>,
    query: &EntityQuery,
    cancel: &CancellationToken,
    db: &Arc<Database>,
    outs: &[SyncSender<TableFeed>],
    fallbacks: &mut Vec<String>,
) -> Result<u64, PipelineError> {
    let &EntityQuery {
        entity,
        source_table,
        from,
        alias,
        key,
        state,
        batch_rows,
    } = query;
    let table = entity.raw_table();
    let src_err =
        |what: String| move |e: postgres::Error| PipelineError::Source { what, source: e };
    let SelectList {
        exprs: select,
        columns: types,
        ..
    } = select_list(tx, source_table, entity, alias, fallbacks)?;
    // `rules::check_against_source` has refused a missing key already.
    let Some((_, key_type)) = types.iter().find(|(n, _)| n == key) else {
        return Err(PipelineError::Workbench(format!(
            "{table}: the key column {key:?} is not in the query"
        )));
    };
    let sql = format!(
        "SELECT {} {from} ORDER BY {}",
        select.join(", "),
        order_by(alias, key, key_type)
    );

    let arrow_schema = Arc::new(Schema::new(
        types
            .iter()
            .map(|(n, t)| t.arrow_field(n))
            .collect::<Vec<_>>(),
    ));
    let mut sender =
        TableSender::announce(db, arrow_schema.clone(), entity, &types, outs, batch_rows)?;
    let mut batch = BatchBuilder::new(entity, arrow_schema, &types, batch_rows);

    // The unnamed statement: nothing is left prepared on the (pooled)
    // server connection, and it costs one round trip less.
    let mut rows = tx
        .query_typed_raw(&sql, [(state.as_str(), Type::TEXT)])
        .map_err(src_err(format!("querying {table}")))?;
    let mut n: u64 = 0;
    // Per row and per value: the error (and its message) is built only on
    // failure, never in the loop itself.
    let read_err = |e| PipelineError::Source {
        what: format!("reading {table}"),
        source: e,
    };
    while let Some(row) = rows.next().map_err(read_err)? {
        for i in 0..types.len() {
            let v: Option<Raw> = row.try_get(i).map_err(read_err)?;
            batch.push(i, v.map(|r| r.0))?;
        }
        n += 1;
        if n.is_multiple_of(batch_rows as u64) {
            batch.send_to(&mut sender)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
            if n.is_multiple_of(batch_rows as u64 * 16) {
                tracing::info!(table, rows = n, "pulling");
            }
        }
    }
    batch.send_to(&mut sender)?;
    sender.finish()?;
    Ok(n)
}

/// One table's rows decoded value by value (PostgreSQL's binary format)
/// into Arrow builders, and handed on a batch at a time: what both a pull
/// from PostgreSQL and an all-states spool do with their rows.
pub(crate) struct BatchBuilder<'a> {
    entity: Entity,
    schema: Arc<Schema>,
    columns: &'a Columns,
    builders: Vec<ColumnBuilder>,
}

impl<'a> BatchBuilder<'a> {
    pub(crate) fn new(
        entity: Entity,
        schema: Arc<Schema>,
        columns: &'a Columns,
        batch_rows: usize,
    ) -> BatchBuilder<'a> {
        let builders = columns
            .iter()
            .map(|(_, t)| ColumnBuilder::new(t, batch_rows))
            .collect();
        BatchBuilder {
            entity,
            schema,
            columns,
            builders,
        }
    }

    /// Column `i`'s value of the row being built; `None` for NULL.
    pub(crate) fn push(&mut self, i: usize, raw: Option<&[u8]>) -> Result<(), PipelineError> {
        let b = &mut self.builders[i];
        match raw {
            None => {
                b.append_null();
                Ok(())
            }
            Some(raw) => b.append(raw).map_err(|e| self.decode_err(i, e)),
        }
    }

    /// Hands the rows built so far to `sender` as one batch, if there are
    /// any, and starts again.
    pub(crate) fn send_to(&mut self, sender: &mut TableSender) -> Result<(), PipelineError> {
        if self.builders.first().is_none_or(|b| b.is_empty()) {
            return Ok(());
        }
        let mut arrays = Vec::with_capacity(self.builders.len());
        for i in 0..self.builders.len() {
            let array = self.builders[i].finish();
            arrays.push(array.map_err(|e| self.decode_err(i, e))?);
        }
        let table = self.entity.raw_table();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)
            .map_err(|e| PipelineError::Workbench(format!("building a batch for {table}: {e}")))?;
        sender.send(batch)
    }

    fn decode_err(&self, column: usize, e: DecodeError) -> PipelineError {
        PipelineError::Decode {
            table: self.entity.raw_table().to_string(),
            column: self.columns[column].0.clone(),
            message: e.to_string(),
        }
    }
}

/// One table on its way to the pull's consumers: announced to each with
/// its columns, then its rows as DuckDB chunks, full but the last (see
/// [`Rechunker`]). Dropping it ends the table for them.
pub(crate) struct TableSender {
    table: &'static str,
    converter: ChunkConverter,
    rechunker: Rechunker,
    consumers: Vec<SyncSender<Arc<Chunk>>>,
}

impl TableSender {
    /// Announces `entity`'s table, whose batches will have `schema` (the
    /// chunks' types follow it) and whose columns are `columns` in the
    /// workbench's types, to each of `outs`.
    pub(crate) fn announce(
        db: &Arc<Database>,
        schema: Arc<Schema>,
        entity: Entity,
        columns: &[(String, ColType)],
        outs: &[SyncSender<TableFeed>],
        batch_rows: usize,
    ) -> Result<TableSender, PipelineError> {
        let table = entity.raw_table();
        let converter = ChunkConverter::new(db, schema).map_err(convert_err(table))?;
        // Two batches' worth of chunks wait at most for each consumer:
        // memory stays bounded.
        let mut consumers = Vec::with_capacity(outs.len());
        for out in outs {
            let (to_consumer, chunks) =
                std::sync::mpsc::sync_channel(2 * batch_rows.div_ceil(chunk_rows()));
            out.send(TableFeed {
                entity,
                columns: columns.to_vec(),
                template: converter.template().map_err(convert_err(table))?,
                chunks,
            })
            .map_err(|_| loader_gone())?;
            consumers.push(to_consumer);
        }
        Ok(TableSender {
            table,
            converter,
            rechunker: Rechunker::new(chunk_rows()),
            consumers,
        })
    }

    /// Hands `batch`'s rows on, but those that do not fill a chunk yet.
    pub(crate) fn send(&mut self, batch: RecordBatch) -> Result<(), PipelineError> {
        let wholes = self.rechunker.push(batch).map_err(|e| self.batch_err(e))?;
        wholes.iter().try_for_each(|b| self.send_whole(b))
    }

    /// Hands on the last rows: the table is whole.
    pub(crate) fn finish(mut self) -> Result<(), PipelineError> {
        match self.rechunker.finish().map_err(|e| self.batch_err(e))? {
            Some(last) => self.send_whole(&last),
            None => Ok(()),
        }
    }

    /// A consumer that stops reading before the table ends is let go: its
    /// statement may need no more rows (the bad rows' `COPY` of an empty
    /// rule list is `WHERE false`), and if it failed, its own error is the
    /// pull's. The read stops only when nobody reads any more.
    fn send_whole(&mut self, batch: &RecordBatch) -> Result<(), PipelineError> {
        let chunks = self
            .converter
            .convert(batch)
            .map_err(convert_err(self.table))?;
        for chunk in chunks {
            let chunk = Arc::new(chunk);
            self.consumers.retain(|c| c.send(chunk.clone()).is_ok());
            if self.consumers.is_empty() {
                return Err(loader_gone());
            }
        }
        Ok(())
    }

    fn batch_err(&self, e: duckdb::arrow::error::ArrowError) -> PipelineError {
        PipelineError::Workbench(format!("building a batch for {}: {e}", self.table))
    }
}

fn convert_err(table: &'static str) -> impl Fn(DuckError) -> PipelineError {
    move |e| PipelineError::Workbench(format!("converting rows for {table}: {e}"))
}

fn loader_gone() -> PipelineError {
    PipelineError::Workbench("the workbench stopped taking rows".into())
}

/// A table's select list as the pull reads it: each column's expression
/// (`alias.col`, cast where its type needs it to arrive as one the driver
/// knows), that expression's SQL type, and the column as the workbench
/// types it.
pub(crate) struct SelectList {
    pub exprs: Vec<String>,
    pub sql_types: Vec<String>,
    pub columns: Columns,
}

/// Describes `source_table` (`SELECT alias.*` reads all of its columns)
/// and maps each column; a column without an exact mapping is carried as
/// text, said once in the log and in `fallbacks`.
pub(crate) fn select_list(
    tx: &mut Transaction<'_>,
    source_table: &QualifiedName,
    entity: Entity,
    alias: &str,
    fallbacks: &mut Vec<String>,
) -> Result<SelectList, PipelineError> {
    let table = entity.raw_table();
    let mut list = SelectList {
        exprs: Vec::new(),
        sql_types: Vec::new(),
        columns: Vec::new(),
    };
    for col in crate::source::connect::describe(tx, source_table)? {
        let q = quote_ident(&col.name);
        let mapped = match &col.fallback_from {
            Some(from_type) => {
                warn_fallback(table, &col.name, from_type, fallbacks);
                None
            }
            None => ColType::from_pg(&col.ty, col.typmod).or_else(|| {
                warn_fallback(table, &col.name, col.ty.name(), fallbacks);
                None
            }),
        };
        let (expr, sql_type, t) = match mapped {
            Some(t) => match &col.cast {
                Some(cast) => (format!("{alias}.{q}::{cast} AS {q}"), cast.clone(), t),
                None => (format!("{alias}.{q}"), col.sql_type.clone(), t),
            },
            None => (
                format!("{alias}.{q}::text AS {q}"),
                "text".into(),
                ColType::Text,
            ),
        };
        list.exprs.push(expr);
        list.sql_types.push(sql_type);
        list.columns.push((col.name, t));
    }
    Ok(list)
}

/// A column carried as text for want of an exact type: said once in the
/// log and kept for the run report.
fn warn_fallback(table: &str, column: &str, pg_type: &str, fallbacks: &mut Vec<String>) {
    tracing::warn!(
        table,
        column,
        pg_type,
        "no exact DuckDB type for this column; carrying it as text"
    );
    fallbacks.push(format!("{table}.{column} ({pg_type})"));
}
