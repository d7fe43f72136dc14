//! An all-states run's one read of the source: both tables read whole, once
//! each, in one REPEATABLE READ transaction (the country at one moment),
//! into a DuckDB file of their own beside the workbench; then each state's
//! rows handed on from there, as a run of that state alone would pull them.
//!
//! Why a file and not one pass: a state's files need its companies and then
//! its people, and the source hands all companies first. Sorting by state
//! on the server costs a sort of every row there; holding every state's
//! writers open at once costs a row group of memory per state and file.
//! The snapshot is on disk, read back state by state: memory stays that of
//! one state's batches, whatever the number of states.
//!
//! The file is removed when the snapshot is dropped, and a file a killed
//! process left is removed by the next snapshot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use duckdb::arrow::datatypes::SchemaRef;
use postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, Config};
use crate::error::PipelineError;
use crate::names::Entity;
use crate::source::pgtypes::ColType;
use crate::source::pull::{pull, PullStats, Read, StoredRows, TableFeed, TableSender, Tap};
use crate::state::StateCode;
use crate::workbench::{Database, RawConnection, Workbench};

/// The rows of both source tables at one moment, in a DuckDB file.
pub struct Snapshot {
    /// Keeps this process's instance of the workbench file open while the
    /// snapshot is attached to it: the runs that read the snapshot open the
    /// workbench again, and must find this instance, not open a second one
    /// on the same file (which corrupted it, seen in a test).
    _workbench: Mutex<Workbench>,
    db: Arc<Database>,
    /// The name the file is attached under.
    catalog: String,
    path: PathBuf,
    columns: Vec<(Entity, Vec<(String, ColType)>)>,
    /// Rows read from each table, and columns carried as text.
    pub read: PullStats,
    values: Vec<StateValue>,
}

/// One value of the state column, as the snapshot found it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateValue {
    /// `None` for NULL.
    pub value: Option<String>,
    pub companies: u64,
    /// People whose company has this value.
    pub people: u64,
}

impl StateValue {
    /// The state code this value names exactly, if any: a lower-case,
    /// padded or unknown value names none.
    pub fn state(&self) -> Option<StateCode> {
        let v = self.value.as_deref()?;
        StateCode::parse(v).ok().filter(|s| s.as_str() == v)
    }
}

/// Snapshot files of this process now: another batch's is not a leftover.
static LIVE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<PathBuf>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

impl Snapshot {
    /// Reads both tables whole through `client` into a new snapshot file
    /// in the workbench's directory, named for `batch_id`.
    pub fn take(
        client: &mut Client,
        config: &Config,
        batch_id: &str,
        cancel: &CancellationToken,
    ) -> Result<Snapshot, PipelineError> {
        let wb = Workbench::open(&config.workbench)?;
        let file = Workbench::db_path(&config.workbench.dir);
        let dir = file.parent().expect("the workbench file has a directory");
        let tag: String = batch_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let path = dir.join(format!("snapshot-{tag}.duckdb"));
        remove_leftovers(dir);
        live().get_or_insert_with(HashSet::new).insert(path.clone());
        let mut snapshot = Snapshot {
            db: wb.database(),
            _workbench: Mutex::new(wb),
            catalog: format!("ow_snapshot_{tag}"),
            path,
            columns: Vec::new(),
            read: PullStats::default(),
            values: Vec::new(),
        };
        let con = snapshot.connect()?;
        let attach = format!(
            "ATTACH '{}' AS {}",
            snapshot.path.to_string_lossy().replace('\'', "''"),
            quote_ident(&snapshot.catalog)
        );
        con.execute(&attach).map_err(snapshot.err("creating"))?;

        let columns = Mutex::new(Vec::new());
        let write = |feed: TableFeed| -> Result<(), PipelineError> {
            let target = snapshot.table(feed.entity);
            columns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((feed.entity, feed.columns.clone()));
            let con = snapshot.connect()?;
            let (template, next) = feed.into_feed();
            con.run_with_feed(
                |rows| format!("CREATE TABLE {target} AS SELECT * FROM {rows}"),
                template,
                next,
            )
            .map_err(snapshot.err("writing"))?;
            Ok(())
        };
        let taps: Vec<Tap<'_>> = vec![Box::new(write)];
        let db = snapshot.db.clone();
        let read = pull(Read::Country(client), config, &db, None, cancel, taps)?;
        snapshot.columns = columns.into_inner().unwrap_or_else(|p| p.into_inner());
        snapshot.read = read;
        snapshot.values = snapshot.count_states(config)?;
        Ok(snapshot)
    }

    /// Every value of the state column, with its companies and people,
    /// NULL and invalid values included, NULL last.
    pub fn state_values(&self) -> &[StateValue] {
        &self.values
    }

    fn count_states(&self, config: &Config) -> Result<Vec<StateValue>, PipelineError> {
        let s = &config.source;
        let (state, key, link) = (
            quote_ident(&s.state_column),
            quote_ident(&s.company_key),
            quote_ident(&s.people_company_column),
        );
        let (companies, people) = (self.table(Entity::Companies), self.table(Entity::People));
        let sql = format!(
            "WITH c AS (SELECT {state} AS v, count(*) AS n FROM {companies} GROUP BY ALL),
                  p AS (SELECT s.v, count(*) AS n FROM {people} p
                        JOIN (SELECT DISTINCT {state} AS v, {key} AS k FROM {companies}) s
                          ON p.{link} = s.k
                        GROUP BY ALL)
             SELECT c.v, c.n, coalesce(p.n, 0) FROM c LEFT JOIN p ON c.v IS NOT DISTINCT FROM p.v
             ORDER BY c.v NULLS LAST"
        );
        let err = self.err("counting the states of");
        let conn = self.db.connection().map_err(&err)?;
        let mut stmt = conn.prepare(&sql).map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StateValue {
                    value: r.get(0)?,
                    companies: r.get::<_, i64>(1)? as u64,
                    people: r.get::<_, i64>(2)? as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(&err)?;
        Ok(rows)
    }

    /// Streams one query's rows to the consumers; returns how many.
    fn stream(
        &self,
        entity: Entity,
        sql: &str,
        state: &StateCode,
        config: &Config,
        cancel: &CancellationToken,
        outs: &[std::sync::mpsc::SyncSender<TableFeed>],
    ) -> Result<u64, PipelineError> {
        let duck = self.err::<duckdb::Error>("reading");
        let duck = &duck;
        let columns = self
            .columns
            .iter()
            .find(|(e, _)| *e == entity)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| self.err("reading")(format!("it has no {entity}")))?;
        let conn = self.db.connection().map_err(duck)?;
        // The result's Arrow schema, which the stream needs up front.
        let schema: SchemaRef = conn
            .prepare(&format!("SELECT * FROM ({sql}) LIMIT 0"))
            .and_then(|mut s| s.query_arrow([state.as_str()]).map(|a| a.get_schema()))
            .map_err(duck)?;
        let mut sender = TableSender::announce(
            &self.db,
            schema.clone(),
            entity,
            &columns,
            outs,
            config.source.batch_rows,
        )?;
        let mut stmt = conn.prepare(sql).map_err(duck)?;
        let mut n = 0u64;
        for batch in stmt.stream_arrow([state.as_str()], schema).map_err(duck)? {
            n += batch.num_rows() as u64;
            sender.send(batch)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
        }
        sender.finish()?;
        Ok(n)
    }

    fn table(&self, entity: Entity) -> String {
        format!(
            "{}.main.{}",
            quote_ident(&self.catalog),
            quote_ident(entity.raw_table())
        )
    }

    fn connect(&self) -> Result<RawConnection, PipelineError> {
        RawConnection::connect(&self.db).map_err(self.err("opening"))
    }

    fn err<E: std::fmt::Display>(&self, what: &'static str) -> impl Fn(E) -> PipelineError + '_ {
        move |e| {
            PipelineError::Workbench(format!(
                "{what} the all-states snapshot {}: {e}",
                self.path.display()
            ))
        }
    }
}

/// `state`'s rows of both tables to `outs`, in key order and in the
/// chunks a pull from PostgreSQL gives (see
/// [`Rechunker`](crate::source::rechunk::Rechunker)), so that the
/// files' bytes are those of a run of the state alone. A read that
/// ends short of the rows [`state_values`](Self::state_values) counted
/// is an error, not a smaller file (a DuckDB stream that fails ends
/// like one that is done).
impl StoredRows for Snapshot {
    fn read_state(
        &self,
        state: &StateCode,
        config: &Config,
        cancel: &CancellationToken,
        outs: Vec<std::sync::mpsc::SyncSender<TableFeed>>,
    ) -> Result<PullStats, PipelineError> {
        let s = &config.source;
        let (state_col, key, link, person_key) = (
            quote_ident(&s.state_column),
            quote_ident(&s.company_key),
            quote_ident(&s.people_company_column),
            quote_ident(&s.person_key),
        );
        let (companies, people) = (self.table(Entity::Companies), self.table(Entity::People));
        let expected = self
            .values
            .iter()
            .find(|v| v.state().as_ref() == Some(state))
            .map_or((0, 0), |v| (v.companies, v.people));
        let mut stats = PullStats {
            text_fallbacks: self.read.text_fallbacks.clone(),
            ..Default::default()
        };
        for (entity, sql, want) in [
            (
                Entity::Companies,
                format!("SELECT * FROM {companies} WHERE {state_col} = ? ORDER BY {key}"),
                expected.0,
            ),
            (
                Entity::People,
                format!(
                    "SELECT p.* FROM {people} p
                     WHERE p.{link} IN (SELECT c.{key} FROM {companies} c WHERE c.{state_col} = ?)
                     ORDER BY p.{person_key}"
                ),
                expected.1,
            ),
        ] {
            let n = self.stream(entity, &sql, state, config, cancel, &outs)?;
            if n != want {
                return Err(PipelineError::Workbench(format!(
                    "reading {state}'s {entity} from the snapshot {}: {n} of {want} rows",
                    self.path.display()
                )));
            }
            match entity {
                Entity::Companies => stats.companies = n,
                Entity::People => stats.people = n,
            }
        }
        Ok(stats)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Ok(con) = RawConnection::connect(&self.db) {
            let _ = con.execute(&format!(
                "DETACH DATABASE IF EXISTS {}",
                quote_ident(&self.catalog)
            ));
        }
        remove_file(&self.path);
        if let Some(live) = live().as_mut() {
            live.remove(&self.path);
        }
    }
}

/// Snapshot files in `dir` that no snapshot of this process is using: a
/// killed process's.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let live = live();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with("snapshot-")
            && name.ends_with(".duckdb")
            && !live.as_ref().is_some_and(|l| l.contains(&path))
        {
            tracing::info!(file = %path.display(), "removing an all-states snapshot left by a stopped run");
            remove_file(&path);
        }
    }
}

fn remove_file(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("duckdb.wal"));
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot({})", self.path.display())
    }
}
