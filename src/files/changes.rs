//! A change set: the rows of an entity's good file that were added,
//! changed or removed since the state's previous published snapshot, as a
//! Parquet file of their own. Downstream tools that work in changes (an
//! enrichment service billed per record, an outreach tool that must drop a
//! removed lead) read these instead of diffing whole snapshots.
//!
//! The file has the good file's columns plus `change` (`added`, `changed`,
//! `removed`) and `changed_columns` (for `changed`: the columns whose
//! values differ). A removed row carries its last published values. Rows
//! are in key order, so the same changes give the same bytes. The run and
//! the run of the snapshot it is relative to are in the file's Parquet
//! metadata (`run_id`, `base_run_id`).
//!
//! A diff is only made when it means something: the same columns and
//! types on both sides, and a key that is unique (and never NULL) on both.
//! Otherwise the snapshot starts a new baseline, with the reason.

use std::path::{Path, PathBuf};

use duckdb::Connection;

use crate::config::{quote_ident, ExportConfig};
use crate::error::PipelineError;
use crate::names::Entity;

/// One entity's change file, written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChangeFile {
    pub entity: Entity,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    /// A few keys of each kind, in key order, for the report page.
    #[serde(default)]
    pub examples: std::collections::BTreeMap<String, Vec<String>>,
}

/// Keys of each kind the report page shows.
const EXAMPLES: i64 = 5;

impl ChangeFile {
    pub fn rows(&self) -> u64 {
        self.added + self.changed + self.removed
    }
}

/// What comparing an entity's good files gave.
#[derive(Debug)]
pub enum Diff {
    /// Not one row differs: no file.
    Same,
    Written(ChangeFile),
    /// No diff can be trusted; the new snapshot starts a new baseline.
    Baseline(String),
}

/// The two good files to compare and where the change file goes.
pub struct Sides<'a> {
    pub entity: Entity,
    /// The primary key column.
    pub key: &'a str,
    /// The previous published snapshot's good file.
    pub old: &'a Path,
    /// This run's good file.
    pub new: &'a Path,
    pub out: &'a Path,
    pub run_id: &'a str,
    pub base_run_id: &'a str,
}

fn quote_path(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "''"))
}

fn sql_err(path: &Path, what: &str) -> impl Fn(duckdb::Error) -> PipelineError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |e| PipelineError::Export {
        path: path.clone(),
        message: format!("{what}: {e}"),
    }
}

/// The file's columns, as (name, type).
fn columns(conn: &Connection, file: &Path) -> Result<Vec<(String, String)>, PipelineError> {
    let err = sql_err(file, "reading its columns");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet({}))",
            quote_path(file)
        ))
        .map_err(&err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(&err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&err)
}

/// Rows whose key is NULL or shared with another row.
fn not_unique(conn: &Connection, file: &Path, key: &str) -> Result<u64, PipelineError> {
    let k = quote_ident(key);
    let n: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) - count(DISTINCT {k}) FROM read_parquet({})",
                quote_path(file)
            ),
            [],
            |r| r.get(0),
        )
        .map_err(sql_err(file, "counting its keys"))?;
    Ok(n.max(0) as u64)
}

/// Compares `s.old` with `s.new` and writes the change file to `s.out`
/// when a row differs.
pub fn diff(conn: &Connection, s: &Sides, cfg: &ExportConfig) -> Result<Diff, PipelineError> {
    let (old_cols, new_cols) = (columns(conn, s.old)?, columns(conn, s.new)?);
    if old_cols != new_cols {
        return Ok(Diff::Baseline(format!(
            "{}: the good file's columns or their types changed",
            s.entity
        )));
    }
    if !new_cols.iter().any(|(name, _)| name == s.key) {
        return Ok(Diff::Baseline(format!(
            "{}: the good file has no column {}",
            s.entity, s.key
        )));
    }
    for (side, file) in [("previous", s.old), ("new", s.new)] {
        let dup = not_unique(conn, file, s.key)?;
        if dup > 0 {
            return Ok(Diff::Baseline(format!(
                "{}: {dup} row(s) of the {side} good file have a NULL or duplicated {}",
                s.entity, s.key
            )));
        }
    }
    let k = quote_ident(s.key);
    let differs: Vec<String> = new_cols
        .iter()
        .filter(|(name, _)| name != s.key)
        .map(|(name, _)| {
            let c = quote_ident(name);
            format!("n.{c} IS DISTINCT FROM o.{c}")
        })
        .collect();
    let names: Vec<String> = new_cols
        .iter()
        .filter(|(name, _)| name != s.key)
        .map(|(name, _)| {
            let c = quote_ident(name);
            format!(
                "CASE WHEN n.{c} IS DISTINCT FROM o.{c} THEN '{}' END",
                name.replace('\'', "''")
            )
        })
        .collect();
    // A key alone (no other column) can only be added or removed.
    let (changed_where, changed_list) = match differs.is_empty() {
        true => ("false".to_string(), "[]::VARCHAR[]".to_string()),
        false => (
            differs.join(" OR "),
            format!("list_filter([{}], x -> x IS NOT NULL)", names.join(", ")),
        ),
    };
    // Each output column from the side the row is on: the new one, or the
    // old one for a removed row (keys are never NULL: checked above).
    let values: Vec<String> = new_cols
        .iter()
        .map(|(name, _)| {
            let c = quote_ident(name);
            format!("CASE WHEN n.{k} IS NULL THEN o.{c} ELSE n.{c} END AS {c}")
        })
        .collect();
    let (old, new) = (quote_path(s.old), quote_path(s.new));
    // One full join, not an anti join each way and an inner join: measured
    // at 1.5M rows, 1% changed, one thread, 128MB: 3.9 s against 9.7 s.
    let query = format!(
        "SELECT {values},
                CASE WHEN o.{k} IS NULL THEN 'added' WHEN n.{k} IS NULL THEN 'removed'
                     ELSE 'changed' END AS change,
                CASE WHEN o.{k} IS NOT NULL AND n.{k} IS NOT NULL THEN {changed_list}
                END AS changed_columns
         FROM read_parquet({new}) n FULL JOIN read_parquet({old}) o ON o.{k} = n.{k}
         WHERE o.{k} IS NULL OR n.{k} IS NULL OR {changed_where}
         ORDER BY {k}, change",
        values = values.join(", ")
    );
    let tmp = s.out.with_extension("parquet.tmp");
    // Readers order change files without a manifest by these.
    let metadata = format!(
        ", KV_METADATA {{run_id: '{}', base_run_id: '{}'}}",
        s.run_id.replace('\'', "''"),
        s.base_run_id.replace('\'', "''")
    );
    let copy = crate::files::copy_sql_with(&query, &tmp, cfg, &metadata);
    if let Some(dir) = s.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::Export {
            path: s.out.to_path_buf(),
            message: format!("creating {}: {e}", dir.display()),
        })?;
    }
    conn.execute_batch(&copy)
        .map_err(sql_err(s.out, "writing the change set"))?;
    let mut counts = [0u64; 3];
    {
        let err = sql_err(s.out, "counting the change set");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT change, count(*) FROM read_parquet({}) GROUP BY change",
                quote_path(&tmp)
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&err)?;
        for row in rows {
            let (change, n) = row.map_err(&err)?;
            let at = ["added", "changed", "removed"]
                .iter()
                .position(|c| *c == change)
                .expect("the query names three kinds");
            counts[at] = n as u64;
        }
    }
    if counts.iter().sum::<u64>() == 0 {
        let _ = std::fs::remove_file(&tmp);
        return Ok(Diff::Same);
    }
    std::fs::rename(&tmp, s.out).map_err(|e| PipelineError::Export {
        path: s.out.to_path_buf(),
        message: format!("renaming {}: {e}", tmp.display()),
    })?;
    let mut examples = std::collections::BTreeMap::<String, Vec<String>>::new();
    {
        let err = sql_err(s.out, "reading keys of the change set");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT change, {k}::VARCHAR FROM read_parquet({})
                 QUALIFY row_number() OVER (PARTITION BY change ORDER BY {k}) <= {EXAMPLES}
                 ORDER BY change, {k}",
                quote_path(s.out)
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(&err)?;
        for row in rows {
            let (change, key) = row.map_err(&err)?;
            examples.entry(change).or_default().push(key);
        }
    }
    let (bytes, sha256) = crate::files::hash_file(s.out).map_err(|e| PipelineError::Export {
        path: s.out.to_path_buf(),
        message: format!("hashing: {e}"),
    })?;
    Ok(Diff::Written(ChangeFile {
        entity: s.entity,
        path: s.out.to_path_buf(),
        bytes,
        sha256,
        added: counts[0],
        changed: counts[1],
        removed: counts[2],
        examples,
    }))
}
