//! The state's manifest, `<prefix>/<state>/_manifest.json`: which run's
//! four files the bucket holds, written after them.
//!
//! The files are uploaded one by one, so a reader who lists the bucket
//! mid-run, or after a run that failed half-way, can find files of two runs
//! side by side. The manifest is written last and names, for each file, its
//! key, SHA-256, size, rows and schema: a reader that fetches the manifest
//! first and checks the files' `sha256` metadata against it never mixes
//! runs. A failed run leaves the previous manifest, so the mismatch shows.
//! A run that changed nothing leaves it as it is.
//!
//! The schema recorded here is also what the next run compares its own
//! with: a column added, removed or retyped is reported, and gated with
//! `[gates] schema_change = true`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::PipelineError;
use crate::files::ExportedFile;

/// The manifest format this version writes. 1 (no `format` key) had no
/// change sets; it is read as having none.
pub const FORMAT: u32 = 2;

/// The manifest's object, as uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default = "format_1")]
    pub format: u32,
    pub run_id: String,
    pub state: String,
    pub finished_at: DateTime<Utc>,
    pub files: Vec<ManifestFile>,
    /// The run of the snapshot this one's change sets are relative to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_run_id: Option<String>,
    /// Why this snapshot has no change sets and starts a new baseline (the
    /// first publish, a schema change, a previous snapshot not had whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// This publish's change sets, one per entity that changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ManifestChange>,
    /// Earlier publishes' change sets still kept (`[changes] keep_days`),
    /// oldest first: with `changes`, every change file the state's folder
    /// may hold. Anything else there (a set whose run died before its
    /// manifest) is deleted by the next publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained_changes: Vec<ManifestChange>,
}

fn format_1() -> u32 {
    1
}

/// One change file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestChange {
    /// The run that published it, and the run of the snapshot it is
    /// relative to.
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub base_run_id: String,
    pub entity: String,
    pub key: String,
    pub sha256: String,
    pub bytes: u64,
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// `companies_good`, ...
    pub table_name: String,
    pub key: String,
    pub sha256: String,
    pub bytes: u64,
    pub rows: u64,
    /// SHA-256 of the columns' names and types, one `name\ttype\n` each.
    pub schema_fingerprint: String,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The Parquet file's type as DuckDB reads it back (`VARCHAR`,
    /// `DECIMAL(12,2)`, `TIMESTAMP WITH TIME ZONE`, ...).
    #[serde(rename = "type")]
    pub ty: String,
}

/// The rows the manifest's files hold, both entities, good and bad: what
/// the source sent for its run, for `max_row_delta`.
pub fn published_rows(m: &Manifest) -> crate::quality::gates::Previous {
    crate::quality::gates::Previous {
        run_id: m.run_id.clone(),
        rows: m.files.iter().map(|f| f.rows).sum(),
    }
}

/// What changed in one file's columns since the manifest in the bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaChange {
    pub table_name: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `column: OLD -> NEW`.
    pub retyped: Vec<String>,
}

impl SchemaChange {
    /// `people_good: added x; removed y; retyped z: INTEGER -> BIGINT`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (what, list) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("retyped", &self.retyped),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {}", list.join(", ")));
            }
        }
        format!("{}: {}", self.table_name, parts.join("; "))
    }
}

/// `<prefix>/<state>/_manifest.json`.
pub fn key(storage: &crate::config::StorageConfig, state: &crate::state::StateCode) -> String {
    storage.key(&format!("{}/_manifest.json", state.lower()))
}

/// `<prefix>/<state>/_report.html`: the run's report page, beside the
/// manifest (written after it).
pub fn page_key(storage: &crate::config::StorageConfig, state: &crate::state::StateCode) -> String {
    storage.key(&format!("{}/_report.html", state.lower()))
}

/// The manifest entries of `files` (with their object keys), their schemas
/// read back from the Parquet files themselves.
pub fn entries(
    duck: &duckdb::Connection,
    files: &[(ExportedFile, String)],
) -> Result<Vec<ManifestFile>, PipelineError> {
    files
        .iter()
        .map(|(f, key)| {
            let columns = columns(duck, f)?;
            Ok(ManifestFile {
                table_name: f.table_name.clone(),
                key: key.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes,
                rows: f.rows,
                schema_fingerprint: fingerprint(&columns),
                columns,
            })
        })
        .collect()
}

fn columns(duck: &duckdb::Connection, f: &ExportedFile) -> Result<Vec<Column>, PipelineError> {
    let err = |e: duckdb::Error| PipelineError::Export {
        path: f.path.clone(),
        message: format!("reading its schema back: {e}"),
    };
    let path = f.path.to_string_lossy().replace('\'', "''");
    let mut stmt = duck
        .prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{path}'))"
        ))
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Column {
                name: r.get(0)?,
                ty: r.get(1)?,
            })
        })
        .map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

fn fingerprint(columns: &[Column]) -> String {
    let mut h = Sha256::new();
    for c in columns {
        h.update(format!("{}\t{}\n", c.name, c.ty).as_bytes());
    }
    hex::encode(h.finalize())
}

/// The schema changes of `files` against `previous` (a table new to the
/// manifest is not a change: there is nothing to compare it with).
pub fn drift(previous: &Manifest, files: &[ManifestFile]) -> Vec<SchemaChange> {
    let mut out = Vec::new();
    for f in files {
        let Some(old) = previous.files.iter().find(|o| o.table_name == f.table_name) else {
            continue;
        };
        if old.schema_fingerprint == f.schema_fingerprint {
            continue;
        }
        let find = |cols: &[Column], name: &str| cols.iter().find(|c| c.name == name).cloned();
        let change = SchemaChange {
            table_name: f.table_name.clone(),
            added: f
                .columns
                .iter()
                .filter(|c| find(&old.columns, &c.name).is_none())
                .map(|c| format!("{} {}", c.name, c.ty))
                .collect(),
            removed: old
                .columns
                .iter()
                .filter(|c| find(&f.columns, &c.name).is_none())
                .map(|c| c.name.clone())
                .collect(),
            retyped: f
                .columns
                .iter()
                .filter_map(|c| {
                    let o = find(&old.columns, &c.name)?;
                    (o.ty != c.ty).then(|| format!("{}: {} -> {}", c.name, o.ty, c.ty))
                })
                .collect(),
        };
        // Same columns in another order still changes the fingerprint.
        if change.added.is_empty() && change.removed.is_empty() && change.retyped.is_empty() {
            out.push(SchemaChange {
                retyped: vec!["(column order)".into()],
                ..change
            });
        } else {
            out.push(change);
        }
    }
    out
}

/// Whether `previous` already describes exactly these files: then the
/// manifest is left as it is.
pub fn unchanged(previous: Option<&Manifest>, files: &[ManifestFile]) -> bool {
    previous.is_some_and(|m| m.files == files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(cols: &[(&str, &str)]) -> ManifestFile {
        let columns: Vec<Column> = cols
            .iter()
            .map(|(n, t)| Column {
                name: n.to_string(),
                ty: t.to_string(),
            })
            .collect();
        ManifestFile {
            table_name: "people_good".into(),
            key: "k".into(),
            sha256: "s".into(),
            bytes: 1,
            rows: 1,
            schema_fingerprint: fingerprint(&columns),
            columns,
        }
    }

    #[test]
    fn drift_names_added_removed_and_retyped_columns() {
        let old = Manifest {
            format: FORMAT,
            base_run_id: None,
            baseline: None,
            changes: Vec::new(),
            retained_changes: Vec::new(),
            run_id: "r".into(),
            state: "WV".into(),
            finished_at: Utc::now(),
            files: vec![file(&[
                ("id", "VARCHAR"),
                ("n", "INTEGER"),
                ("gone", "DATE"),
            ])],
        };
        let new = [file(&[
            ("id", "VARCHAR"),
            ("n", "BIGINT"),
            ("extra", "BOOLEAN"),
        ])];
        let d = drift(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].describe(),
            "people_good: added extra BOOLEAN; removed gone; retyped n: INTEGER -> BIGINT"
        );
        assert!(drift(&old, &old.files).is_empty());
        assert!(unchanged(Some(&old), &old.files));
        assert!(!unchanged(Some(&old), &new));
        assert!(!unchanged(None, &new));
    }
}
