//! The state file's settings and bookkeeping tables, made once per opening
//! of the file, and the migrations of files made by earlier versions.

use std::path::Path;

use duckdb::Connection;

use crate::config::WorkbenchConfig;

/// The instance's settings and the tables `main.runs`,
/// `main.unfinished_uploads`, `main.run_samples` and
/// `main.upload_manifest`, created where missing.
///
/// Nothing is ever downloaded: the extensions we use are compiled in.
///
/// One DuckDB thread: the parallelism is ours (the pull's reading and
/// loading threads, one export lane per file being written). DuckDB's
/// Parquet writer forms row groups one way on one thread and another way,
/// partly by timing, on several; with one thread the bytes depend on the
/// rows alone. While rows stream in, extra worker threads only polled for
/// work on the cores the reader and PostgreSQL need. Measured on the
/// benchmark: 0.3 s less CPU and 0.25 s less wall time than with a thread
/// per core.
///
/// Every setting here is the instance's (DuckDB keeps them in the
/// database's config, which every connection's planner reads), so it is
/// made now, before the file is shared: a `SET` while other connections
/// plan queries can crash the process (it did, when each file writer set
/// `disabled_optimizers` for itself).
pub(super) fn prepare(
    conn: &Connection,
    cfg: &WorkbenchConfig,
    tmp: &Path,
) -> Result<(), duckdb::Error> {
    conn.execute_batch(&format!(
        "SET autoinstall_known_extensions = false; SET autoload_known_extensions = false;
         SET threads = 1; SET memory_limit = '{}'; SET temp_directory = '{}';
         CREATE TABLE IF NOT EXISTS main.runs (
             run_id VARCHAR PRIMARY KEY,
             state VARCHAR NOT NULL,
             status VARCHAR NOT NULL,
             dry_run BOOLEAN NOT NULL,
             started_at TIMESTAMP NOT NULL,   -- UTC
             finished_at TIMESTAMP,           -- UTC
             audit_id BIGINT,
             error VARCHAR,
             report VARCHAR,                   -- the run report as JSON text
             audit_pending BOOLEAN DEFAULT false  -- its audit record is not written yet
         );
         -- Multipart uploads a run could not abort; the next run does.
         CREATE TABLE IF NOT EXISTS main.unfinished_uploads (
             upload_id VARCHAR PRIMARY KEY,
             object_key VARCHAR NOT NULL,
             left_at TIMESTAMP NOT NULL       -- UTC
         );
         -- A few failing rows per rule, for the run's report page (JSON).
         CREATE TABLE IF NOT EXISTS main.run_samples (
             run_id VARCHAR PRIMARY KEY,
             samples VARCHAR NOT NULL
         );
         CREATE TABLE IF NOT EXISTS main.upload_manifest (
             object_key VARCHAR PRIMARY KEY,
             sha256 VARCHAR NOT NULL,
             bytes BIGINT NOT NULL,
             uploaded_at TIMESTAMP NOT NULL,  -- UTC
             run_id VARCHAR NOT NULL
         );",
        cfg.memory_limit.replace('\'', "''"),
        tmp.to_string_lossy().replace('\'', "''"),
    ))?;
    // Workbenches made before `audit_pending` existed.
    let has_pending: bool = conn.query_row(
        "SELECT count(*) > 0 FROM duckdb_columns()
         WHERE schema_name = 'main' AND table_name = 'runs' AND column_name = 'audit_pending'",
        [],
        |r| r.get(0),
    )?;
    if !has_pending {
        conn.execute_batch("ALTER TABLE main.runs ADD COLUMN audit_pending BOOLEAN DEFAULT false")?;
    }
    Ok(())
}
