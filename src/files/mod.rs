//! The files: the four good/bad tables of a state written to Parquet.
//!
//! May call: the config, the workbench, [`crate::quality`] (the rules
//! split the rows as they are written), [`crate::source::pull`]'s feeds,
//! [`crate::error`]. Nothing of the run.
//!
//! Two ways, one result: [`StreamedExport`] writes the files while the pull
//! loads the rows, from the same chunks, which is what a run does unless a
//! rule reads beyond its own row; [`export_all`] writes them after the
//! commit from the workbench's views, which is what the link rule needs.
//! Both write the views' queries, so the bytes are the same (measured on
//! the benchmark: identical SHA-256 for all four files).
//!
//! Rows are ordered by primary key so the same data always gives the same
//! bytes; that is what lets publish skip unchanged files by hash. The pull
//! receives them in that order (see `source::pull::stream_query`) and DuckDB keeps
//! it through a filtered scan into `COPY` (its default
//! `preserve_insertion_order`, and one thread), so nothing is sorted here.
//! Each file is written under a temporary name, synced, then renamed over
//! the old one: a reader (or an upload) never sees half a file.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{quote_ident, Compression, ExportConfig};
use crate::error::PipelineError;
use crate::names::{Entity, FileKind};
use crate::state::StateCode;
use crate::workbench::Workbench;

pub mod changes;
mod streamed;
pub use streamed::StreamedExport;

/// One exported Parquet file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportedFile {
    pub entity: Entity,
    pub kind: FileKind,
    /// `companies_good`, ...: the workbench table and the file's stem.
    pub table_name: String,
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl ExportedFile {
    /// `<state>/<entity>/<kind>/<entity>_<kind>.parquet`, shared by the local
    /// layout and the object key.
    pub fn relative_path(state: &StateCode, entity: Entity, kind: FileKind) -> String {
        format!(
            "{}/{entity}/{kind}/{}.parquet",
            state.lower(),
            entity.table(kind)
        )
    }
}

/// Exports each entity's good and bad rows from the committed views,
/// returned in that order.
///
/// `lanes` threads, each with its own connection, take files from one
/// queue. DuckDB runs on one thread (see `Workbench::open`), so a file is
/// written on one core and a second file written alongside is what uses a
/// second one. The queue starts with the biggest file (the last entity's
/// good rows), then the bad files, then the other good files: one lane
/// writes the big file while the other goes through the rest, and two big
/// files are not buffered from the same moment (measured: starting two good
/// files at once raised the benchmark's peak RSS from 280 to 316 MiB).
/// Measured on the benchmark: the good lane of an earlier good/bad split
/// took 1.1 s while the bad one idled after 0.45 s.
pub fn export_all(
    wb: &Workbench,
    state: &StateCode,
    cfg: &ExportConfig,
    entities: &[Entity],
    lanes: usize,
) -> Result<Vec<ExportedFile>, PipelineError> {
    let schema = state.lower();
    let exports_dir = &wb.exports_dir();
    // (position in the result, entity, kind)
    let mut jobs = Vec::new();
    let last = entities.len().saturating_sub(1);
    for (i, entity) in entities.iter().enumerate().rev() {
        if i == last {
            jobs.push((2 * i, *entity, FileKind::Good));
        }
        jobs.push((2 * i + 1, *entity, FileKind::Bad));
    }
    for (i, entity) in entities.iter().enumerate().rev().skip(1) {
        jobs.push((2 * i, *entity, FileKind::Good));
    }
    let jobs_len = jobs.len();
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let span = tracing::Span::current();
    let lane = |conn: duckdb::Connection| {
        let (schema, span, queue) = (&schema, span.clone(), &queue);
        move || -> Result<Vec<(usize, ExportedFile)>, PipelineError> {
            let _entered = span.enter();
            let mut done = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((pos, entity, kind)) = next else {
                    return Ok(done);
                };
                let file = export_one(&conn, state, schema, exports_dir, cfg, entity, kind)?;
                done.push((pos, file));
            }
        }
    };
    let lanes = lanes.clamp(1, jobs_len);
    let conns = (0..lanes)
        .map(|_| wb.connection().map_err(PipelineError::from))
        .collect::<Result<Vec<_>, _>>()?;
    let results = std::thread::scope(|scope| {
        let mut conns = conns.into_iter();
        let here = conns.next().expect("at least one lane");
        let others: Vec<_> = conns.map(|c| scope.spawn(lane(c))).collect();
        let mut results = vec![lane(here)()];
        results.extend(
            others
                .into_iter()
                .map(|h| crate::error::joined("an export lane", h.join())),
        );
        results
    });
    let mut files = Vec::new();
    for r in results {
        files.extend(r?);
    }
    files.sort_by_key(|(pos, _)| *pos);
    Ok(files.into_iter().map(|(_, f)| f).collect())
}

fn export_one(
    duck: &duckdb::Connection,
    state: &StateCode,
    schema: &str,
    exports_dir: &Path,
    cfg: &ExportConfig,
    entity: Entity,
    kind: FileKind,
) -> Result<ExportedFile, PipelineError> {
    let table_name = entity.table(kind);
    let path = exports_dir.join(ExportedFile::relative_path(state, entity, kind));
    let rows = write_parquet(duck, schema, &table_name, &path, cfg)?;
    let (bytes, sha256) = hash_file(&path).map_err(|e| PipelineError::Export {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(ExportedFile {
        entity,
        kind,
        table_name,
        path,
        rows,
        bytes,
        sha256,
    })
}

/// Rows per Parquet row group. DuckDB buffers a whole row group before
/// writing it; at its default of 122,880 rows the 132k good people of the
/// benchmark took ~55 MB at once, DuckDB spilled the buffers of both lanes
/// to disk to stay within `memory_limit`, and writing them back cost more
/// than the smaller groups do. Measured on the benchmark: the export took
/// 0.52 s instead of 0.65 s, and the run peaked 35 MiB lower. A group of
/// ~2 MB is still a good read for anyone scanning the files.
const ROW_GROUP_ROWS: usize = 32_768;

fn write_parquet(
    duck: &duckdb::Connection,
    schema: &str,
    table: &str,
    path: &Path,
    cfg: &ExportConfig,
) -> Result<u64, PipelineError> {
    let query = format!(
        "SELECT * FROM {}.{}",
        quote_ident(schema),
        quote_ident(table)
    );
    let tmp = prepare_tmp(path)?;
    let rows = duck
        .execute(&copy_sql(&query, &tmp, cfg), [])
        .map_err(|e| export_err(path, format!("writing {schema}.{table}: {e}")))?;
    put_in_place(&tmp, path)?;
    Ok(rows as u64)
}

fn export_err(path: &Path, message: String) -> PipelineError {
    PipelineError::Export {
        path: path.to_path_buf(),
        message,
    }
}

/// The temporary name `path` is written under, in the same directory (so
/// the rename is atomic), created if needed and left by no earlier run.
fn prepare_tmp(path: &Path) -> Result<PathBuf, PipelineError> {
    let dir = path.parent().expect("export path has a parent");
    fs::create_dir_all(dir)
        .map_err(|e| export_err(path, format!("creating {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    Ok(tmp)
}

/// The `COPY` writing `query`'s rows to `tmp` as Parquet.
pub fn copy_sql(query: &str, tmp: &Path, cfg: &ExportConfig) -> String {
    copy_sql_with(query, tmp, cfg, "")
}

/// [`copy_sql`] with more `COPY` options (`, KV_METADATA {…}`).
pub fn copy_sql_with(query: &str, tmp: &Path, cfg: &ExportConfig, more: &str) -> String {
    let compression = match cfg.compression {
        Compression::Snappy => "COMPRESSION snappy".to_string(),
        Compression::Uncompressed => "COMPRESSION uncompressed".to_string(),
        Compression::Zstd => match cfg.zstd_level {
            Some(l) => format!("COMPRESSION zstd, COMPRESSION_LEVEL {l}"),
            None => "COMPRESSION zstd".to_string(),
        },
    };
    format!(
        "COPY ({query}) TO '{}' (FORMAT parquet, {compression}, ROW_GROUP_SIZE {ROW_GROUP_ROWS}{more})",
        tmp.to_string_lossy().replace('\'', "''"),
    )
}

/// Syncs `tmp` and renames it over `path`: whoever reads `path` sees the
/// old file or the new one, whole.
fn put_in_place(tmp: &Path, path: &Path) -> Result<(), PipelineError> {
    sync_tmp(tmp, path)?;
    rename_synced(tmp, path)
}

/// Syncs `tmp`, the file that will become `path`.
fn sync_tmp(tmp: &Path, path: &Path) -> Result<(), PipelineError> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| export_err(path, format!("syncing {}: {e}", tmp.display())))
}

/// The second half of [`put_in_place`], for a `tmp` already synced.
fn rename_synced(tmp: &Path, path: &Path) -> Result<(), PipelineError> {
    fs::rename(tmp, path)
        .map_err(|e| export_err(path, format!("renaming {}: {e}", tmp.display())))?;
    // The rename itself is durable only once the directory is synced.
    if let Ok(d) = File::open(path.parent().expect("export path has a parent")) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Size and lower-case hex SHA-256 of a file, read in 1 MiB chunks.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((total, hex::encode(hasher.finalize())))
}
