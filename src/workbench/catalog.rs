//! The analysts' catalog, `<dir>/duck/outreach_workbench.duckdb`: per
//! state, views over its exported files (`wv.companies_good`, `_bad`,
//! `_raw`, and the same for people), `all_states.*` over every state's, and
//! `main.runs`, a copy of the run history.
//!
//! The service never opens it in place. After a run it writes a whole new
//! catalog beside it, checkpoints and closes it (no write-ahead log left),
//! syncs it and renames it over the old one. An analyst's session keeps
//! the file it opened and never holds up a run; a new session sees the new
//! one. Nothing in it is the service's: deleted, it is written again by the
//! next run.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Workbench, WorkbenchError};
use crate::ident::{quote_ident, quote_literal};
use crate::names::{Entity, FileKind};

/// The table that tells a catalog from a state file of an earlier version
/// (which lived at the catalog's path).
pub(super) const MARK: &str = "about_this_catalog";

/// The schema of the views over every state's files.
pub const ALL_STATES_SCHEMA: &str = "all_states";

/// One writer at a time in this process: concurrent runs' ends would
/// otherwise race to rename their catalogs, an older over a newer.
static WRITING: Mutex<()> = Mutex::new(());

/// Writes the catalog anew from the state file's history and the files
/// under `exports/`, and puts it in place. Returns its path.
///
/// The new catalog starts as a copy of the one in place, when this version
/// wrote it, with the history made again, and the views of only those
/// states whose files came, went or changed columns (and then the
/// `all_states` views): every state's views cost about 10 ms to make, half
/// a second for all of them, and a view over a file that was replaced with
/// the same columns reads the new one. After one state's run (`only`) only
/// that state's files are looked at.
pub fn write(wb: &Workbench, only: Option<&str>) -> Result<PathBuf, WorkbenchError> {
    let _one = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let started = std::time::Instant::now();
    let target = Workbench::catalog_path(&wb.dir);
    let err = |detail: String| WorkbenchError::Sql {
        path: target.clone(),
        detail,
    };
    let pid = std::process::id();
    let tmp = target.with_file_name(format!(".outreach_workbench.duckdb.{pid}.tmp"));
    let runs = wb
        .dir
        .join("state")
        .join(format!("catalog-runs.{pid}.parquet"));
    // A file a process that died left, or a copy that failed.
    let remove_tmp = || {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(tmp.with_extension("tmp.wal"));
    };
    remove_tmp();

    // The history leaves the state file through a Parquet file: the two
    // files are in two DuckDB instances, and one cannot read the other's.
    wb.conn()
        .execute_batch(&format!(
            "COPY (SELECT run_id, state, status, dry_run, started_at, finished_at, audit_id,
                          error, report, coalesce(audit_pending, false) AS audit_pending
                   FROM main.runs ORDER BY started_at, run_id)
             TO {} (FORMAT parquet)",
            quote_literal(&runs.to_string_lossy())
        ))
        .map_err(|e| err(format!("copying the run history: {e}")))?;
    let exports = wb.exports_dir();
    // A copy that fails, or is not this version's, is made whole instead.
    let refreshed = target.exists()
        && std::fs::copy(&target, &tmp).is_ok()
        && refresh(&tmp, &runs, &exports, only).unwrap_or(false);
    let made = match refreshed {
        true => Ok(()),
        false => {
            remove_tmp();
            fill(&tmp, &runs, &exports)
        }
    };
    let _ = std::fs::remove_file(&runs);
    made.map_err(|e| err(format!("writing {}: {e}", tmp.display())))?;
    put_in_place(&tmp, &target).map_err(|e| err(format!("putting it in place: {e}")))?;
    tracing::debug!(path = %target.display(), secs = started.elapsed().as_secs_f64(), "the analysts' catalog is written");
    Ok(target)
}

/// Who writes the catalog, as its mark says.
const WRITTEN_BY: &str = concat!("outreach-workbench ", env!("CARGO_PKG_VERSION"));

/// The catalog's history and its mark, made again.
fn history_and_mark(cat: &duckdb::Connection, runs: &Path) -> Result<(), duckdb::Error> {
    cat.execute_batch(&format!(
        "DROP TABLE IF EXISTS main.runs; DROP TABLE IF EXISTS main.{MARK};
         CREATE TABLE main.runs AS SELECT * FROM read_parquet({runs});
         CREATE TABLE main.{MARK} AS SELECT now()::TIMESTAMP AS written_at, {version} AS written_by,
             'Written by outreach-workbench after each run and replaced whole; open it read-only. \
              Its views read the files under exports/ by path.' AS note;",
        runs = quote_literal(&runs.to_string_lossy()),
        version = quote_literal(WRITTEN_BY),
    ))
}

fn open_catalog(tmp: &Path) -> Result<duckdb::Connection, duckdb::Error> {
    let cat = duckdb::Connection::open(tmp)?;
    cat.execute_batch(
        "SET autoinstall_known_extensions = false; SET autoload_known_extensions = false;
         SET threads = 1;",
    )?;
    Ok(cat)
}

/// The table of the catalog that says, for each state, which files its
/// views read and their columns, as when the views were made.
const SOURCES: &str = "view_sources";

/// A state's exported files, and what its views depend on.
struct StateFiles {
    /// Each file, with the validation columns it has.
    files: Vec<(Entity, FileKind, String, Vec<String>)>,
    /// Each file's path and columns with their types.
    signature: String,
}

/// The state folders under `exports`.
fn exported_states(exports: &Path) -> Vec<String> {
    let mut states: Vec<String> = std::fs::read_dir(exports)
        .map(|dirs| {
            dirs.flatten()
                .filter(|d| d.path().is_dir())
                .filter_map(|d| d.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    states.sort();
    states
}

/// The files of `states` under `exports` (a state without any is left
/// out), their columns read from the files' footers in one query: a
/// DESCRIBE per file took most of the catalog's time with 51 states.
fn exported(
    cat: &duckdb::Connection,
    exports: &Path,
    states: &[String],
) -> Result<BTreeMap<String, StateFiles>, duckdb::Error> {
    let mut found = Vec::new();
    for state in states {
        for entity in Entity::ALL {
            for kind in FileKind::ALL {
                let file = file_of(&exports.join(state), entity, kind);
                if file.exists() {
                    found.push((state, entity, kind, file.to_string_lossy().into_owned()));
                }
            }
        }
    }
    if found.is_empty() {
        return Ok(BTreeMap::new());
    }
    let list = found
        .iter()
        .map(|f| quote_literal(&f.3))
        .collect::<Vec<_>>()
        .join(", ");
    // One thread: each file's columns come in the file's order.
    let columns: HashMap<String, (Option<String>, String)> = cat
        .prepare(&format!(
            "SELECT file_name,
                    string_agg(name, ', ')
                        FILTER (WHERE name IN ('validation_errors', 'validation_warnings')),
                    string_agg(name || ' ' || coalesce(type, ''), ', ')
             FROM parquet_schema([{list}]) GROUP BY file_name"
        ))?
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
        .collect::<Result<_, _>>()?;
    let mut out: BTreeMap<String, StateFiles> = BTreeMap::new();
    for (state, entity, kind, path) in found {
        let (names, types) = columns.get(&path).cloned().unwrap_or_default();
        let validation = names
            .map(|n| n.split(", ").map(str::to_string).collect())
            .unwrap_or_default();
        let of = out.entry(state.clone()).or_insert(StateFiles {
            files: Vec::new(),
            signature: String::new(),
        });
        of.signature.push_str(&format!("{path}: {types}\n"));
        of.files.push((entity, kind, path, validation));
    }
    Ok(out)
}

/// A copy of this version's catalog at `tmp`, with the history made
/// again and the views of the states (`only`, or all) whose files are
/// not those the views were made over. `false` when the copy is not this
/// version's catalog.
fn refresh(
    tmp: &Path,
    runs: &Path,
    exports: &Path,
    only: Option<&str>,
) -> Result<bool, duckdb::Error> {
    let cat = open_catalog(tmp)?;
    let ours: bool = cat.query_row(
        &format!(
            "SELECT (SELECT count(*) = 1 AND bool_and(written_by = ?) FROM main.{MARK})
                AND (SELECT count(*) = 1 FROM duckdb_tables()
                     WHERE schema_name = 'main' AND table_name = '{SOURCES}')"
        ),
        [WRITTEN_BY],
        |r| r.get(0),
    )?;
    if !ours {
        return Ok(false);
    }
    let exports = std::path::absolute(exports).unwrap_or_else(|_| exports.to_path_buf());
    let made: BTreeMap<String, String> = cat
        .prepare(&format!("SELECT state, signature FROM main.{SOURCES}"))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut looked_at: Vec<String> = match only {
        Some(state) => vec![state.to_string()],
        None => exported_states(&exports),
    };
    if only.is_none() {
        looked_at.extend(made.keys().cloned());
        looked_at.sort();
        looked_at.dedup();
    }
    let now = exported(&cat, &exports, &looked_at)?;
    let changed: Vec<&String> = looked_at
        .iter()
        .filter(|s| now.get(*s).map(|f| &f.signature) != made.get(*s))
        .collect();
    cat.execute_batch("BEGIN")?;
    history_and_mark(&cat, runs)?;
    if !changed.is_empty() {
        for state in &changed {
            cat.execute_batch(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(state)
            ))?;
            cat.execute(
                &format!("DELETE FROM main.{SOURCES} WHERE state = ?"),
                [state],
            )?;
            if let Some(files) = now.get(*state) {
                state_views(&cat, state, files)?;
            }
        }
        cat.execute_batch(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(ALL_STATES_SCHEMA)
        ))?;
        all_states_views(&cat, &exports)?;
    }
    cat.execute_batch("COMMIT; CHECKPOINT")?;
    Ok(true)
}

/// The catalog's contents, in a file of its own, checkpointed and closed.
fn fill(tmp: &Path, runs: &Path, exports: &Path) -> Result<(), duckdb::Error> {
    let cat = open_catalog(tmp)?;
    // One commit for it all.
    cat.execute_batch("BEGIN")?;
    history_and_mark(&cat, runs)?;
    cat.execute_batch(&format!(
        "CREATE TABLE main.{SOURCES} (state VARCHAR PRIMARY KEY, signature VARCHAR NOT NULL)"
    ))?;
    let exports = std::path::absolute(exports).unwrap_or_else(|_| exports.to_path_buf());
    let states = exported_states(&exports);
    for (state, files) in exported(&cat, &exports, &states)? {
        state_views(&cat, &state, &files)?;
    }
    all_states_views(&cat, &exports)?;
    cat.execute_batch("COMMIT; CHECKPOINT")?;
    drop(cat);
    Ok(())
}

/// The path of a state's file of one kind, under its folder of `exports`.
fn file_of(state_dir: &Path, entity: Entity, kind: FileKind) -> PathBuf {
    state_dir
        .join(entity.to_string())
        .join(kind.to_string())
        .join(format!("{}.parquet", entity.table(kind)))
}

/// `<state>.companies_good`, `_bad` and `_raw` (good ∪ bad without the
/// validation columns), and the same for people, for the files there are;
/// and the state's row of the sources.
fn state_views(
    cat: &duckdb::Connection,
    state: &str,
    files: &StateFiles,
) -> Result<(), duckdb::Error> {
    let s = quote_ident(state);
    cat.execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))?;
    for entity in Entity::ALL {
        let mut parts = Vec::new();
        for (_, kind, path, validation) in files.files.iter().filter(|f| f.0 == entity) {
            let from = format!("read_parquet({})", quote_literal(path));
            cat.execute_batch(&format!(
                "CREATE VIEW {s}.{} AS SELECT * FROM {from}",
                quote_ident(&entity.table(*kind))
            ))?;
            parts.push(match validation.is_empty() {
                true => format!("SELECT * FROM {from}"),
                false => format!("SELECT * EXCLUDE ({}) FROM {from}", validation.join(", ")),
            });
        }
        if parts.len() < 2 {
            continue;
        }
        cat.execute_batch(&format!(
            "CREATE VIEW {s}.{} AS {}",
            quote_ident(entity.raw_table()),
            parts.join(" UNION ALL BY NAME ")
        ))?;
    }
    cat.execute(
        &format!("INSERT INTO main.{SOURCES} VALUES (?, ?)"),
        [state, &files.signature],
    )?;
    Ok(())
}

/// `all_states.companies_good`, `_bad`, `people_good`, `_bad`: every
/// state's file of that kind under `exports`, with the state's code as
/// `state_code`. The files are found when the view is read, so a state
/// that comes or goes is in or out at once. A kind no state has a file of
/// yet gets no view (DuckDB checks a view's files when it makes it).
fn all_states_views(cat: &duckdb::Connection, exports: &Path) -> Result<(), duckdb::Error> {
    let schema = quote_ident(ALL_STATES_SCHEMA);
    cat.execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))?;
    for entity in Entity::ALL {
        for kind in FileKind::ALL {
            let name = entity.table(kind);
            let file = format!("{entity}/{kind}/{name}.parquet");
            let any = std::fs::read_dir(exports)
                .is_ok_and(|dirs| dirs.flatten().any(|d| d.path().join(&file).exists()));
            if !any {
                continue;
            }
            let glob = exports.join(format!("*/{file}"));
            cat.execute_batch(&format!(
                "CREATE VIEW {schema}.{view} AS
                 SELECT upper(regexp_extract(filename, '/([^/]+)/{entity}/{kind}/[^/]+$', 1)) AS state_code,
                        * EXCLUDE (filename)
                 FROM read_parquet({files}, union_by_name = true, filename = true)",
                view = quote_ident(&name),
                files = quote_literal(&glob.to_string_lossy()),
            ))?;
        }
    }
    Ok(())
}

/// Syncs the new file, renames it over the old one and syncs the folder,
/// so that after a crash the catalog is the old one or the new one whole.
fn put_in_place(tmp: &Path, target: &Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, target)?;
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
