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
/// After one state's run (`only`), the new catalog starts as a copy of the
/// one in place, written by this version, with that state's views, the
/// `all_states` views and the history made again: every state's views
/// cost about 15 ms to make, most of a second for all of them.
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
    let refreshed = only.is_some_and(|state| {
        target.exists()
            && std::fs::copy(&target, &tmp).is_ok()
            && refresh(&tmp, &runs, &exports, state).unwrap_or(false)
    });
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

/// A copy of this version's catalog at `tmp`, with `state`'s views, the
/// `all_states` views and the history made again. `false` when the copy
/// is not this version's catalog.
fn refresh(tmp: &Path, runs: &Path, exports: &Path, state: &str) -> Result<bool, duckdb::Error> {
    let cat = open_catalog(tmp)?;
    let ours: bool = cat.query_row(
        &format!("SELECT count(*) = 1 AND bool_and(written_by = ?) FROM main.{MARK}"),
        [WRITTEN_BY],
        |r| r.get(0),
    )?;
    if !ours {
        return Ok(false);
    }
    let exports = std::path::absolute(exports).unwrap_or_else(|_| exports.to_path_buf());
    cat.execute_batch("BEGIN")?;
    history_and_mark(&cat, runs)?;
    cat.execute_batch(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE;",
        quote_ident(state),
        quote_ident(ALL_STATES_SCHEMA)
    ))?;
    if exports.join(state).is_dir() {
        state_views(&cat, &exports.join(state), state)?;
    }
    all_states_views(&cat, &exports)?;
    cat.execute_batch("COMMIT; CHECKPOINT")?;
    Ok(true)
}

/// The catalog's contents, in a file of its own, checkpointed and closed.
fn fill(tmp: &Path, runs: &Path, exports: &Path) -> Result<(), duckdb::Error> {
    let cat = open_catalog(tmp)?;
    // One commit for it all.
    cat.execute_batch("BEGIN")?;
    history_and_mark(&cat, runs)?;
    let exports = std::path::absolute(exports).unwrap_or_else(|_| exports.to_path_buf());
    let mut states: Vec<String> = std::fs::read_dir(&exports)
        .map(|dirs| {
            dirs.flatten()
                .filter(|d| d.path().is_dir())
                .filter_map(|d| d.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    states.sort();
    for state in &states {
        state_views(&cat, &exports.join(state), state)?;
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
/// validation columns), and the same for people, for the files there are.
fn state_views(cat: &duckdb::Connection, dir: &Path, state: &str) -> Result<(), duckdb::Error> {
    let s = quote_ident(state);
    cat.execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))?;
    for entity in Entity::ALL {
        let mut read = Vec::new();
        for kind in FileKind::ALL {
            let file = file_of(dir, entity, kind);
            if !file.exists() {
                continue;
            }
            let from = format!("read_parquet({})", quote_literal(&file.to_string_lossy()));
            let view = entity.table(kind);
            cat.execute_batch(&format!(
                "CREATE VIEW {s}.{} AS SELECT * FROM {from}",
                quote_ident(&view)
            ))?;
            read.push((view, from));
        }
        if read.len() < 2 {
            continue;
        }
        let mut parts = Vec::new();
        // A DESCRIBE of the file: `duckdb_columns()` of the view just made
        // scans every view of the catalog, slower with each state.
        for (_, from) in &read {
            let validation: Vec<String> = cat
                .prepare(&format!(
                    "SELECT column_name FROM (DESCRIBE SELECT * FROM {from})
                     WHERE column_name IN ('validation_errors', 'validation_warnings')"
                ))?
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            parts.push(match validation.is_empty() {
                true => format!("SELECT * FROM {from}"),
                false => format!("SELECT * EXCLUDE ({}) FROM {from}", validation.join(", ")),
            });
        }
        cat.execute_batch(&format!(
            "CREATE VIEW {s}.{} AS {}",
            quote_ident(entity.raw_table()),
            parts.join(" UNION ALL BY NAME ")
        ))?;
    }
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
