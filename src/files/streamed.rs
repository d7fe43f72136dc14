//! The export written while the pull loads the rows (see [`StreamedExport`]).

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{copy_sql, export_err, hash_file, prepare_tmp, rename_synced, sync_tmp, ExportedFile};
use crate::config::{quote_ident, ExportConfig};
use crate::error::PipelineError;
use crate::names::{Entity, FileKind};
use crate::quality::rules::Rule;
use crate::quality::validate;
use crate::source::pull::{TableFeed, Tap};
use crate::state::StateCode;
use crate::workbench::{Database, DuckError, RawConnection, Workbench};

/// The four files written while the pull reads the rows, for rules that
/// read nothing but the row they judge (all but the link rule, which reads
/// the companies' verdicts from the workbench).
///
/// Two [`Tap`]s, one writing the good files and one the bad, each a
/// `COPY` of the same query as the link rule's views over the raw tables,
/// so the bytes are the same either way. The rows go nowhere else: the
/// workbench's views of the state read these files afterwards (see
/// `validate::over_files`). The files keep their temporary names until
/// [`finish`](Self::finish), once the pull is whole: a failed run leaves
/// the previous files in place.
pub struct StreamedExport<'a> {
    db: Arc<Database>,
    state: &'a StateCode,
    exports_dir: PathBuf,
    cfg: &'a ExportConfig,
    /// Each entity's key and rules.
    rules: Vec<(Entity, &'a str, &'a [Rule])>,
    written: Mutex<Vec<Written>>,
}

/// A file being written, or written, under its temporary name.
struct Written {
    entity: Entity,
    kind: FileKind,
    tmp: PathBuf,
    path: PathBuf,
    /// Set once the file is whole and synced.
    done: Option<Done>,
}

struct Done {
    rows: u64,
    bytes: u64,
    sha256: String,
}

impl<'a> StreamedExport<'a> {
    pub fn new(
        wb: &Workbench,
        state: &'a StateCode,
        cfg: &'a ExportConfig,
        rules: Vec<(Entity, &'a str, &'a [Rule])>,
    ) -> StreamedExport<'a> {
        StreamedExport {
            db: wb.database(),
            state,
            exports_dir: wb.exports_dir(),
            cfg,
            rules,
            written: Mutex::new(Vec::new()),
        }
    }

    /// The good files' writer and the bad files'.
    pub fn taps(&self) -> Vec<Tap<'_>> {
        FileKind::ALL
            .into_iter()
            .map(|kind| -> Tap<'_> { Box::new(move |feed| self.write(kind, feed)) })
            .collect()
    }

    fn write(&self, kind: FileKind, feed: TableFeed) -> Result<(), PipelineError> {
        let (entity, raw) = (feed.entity, feed.name());
        let (key, rules) = self
            .rules
            .iter()
            .find(|(e, _, _)| *e == entity)
            .map_or(("", &[][..]), |(_, k, r)| (*k, *r));
        let path = self
            .exports_dir
            .join(ExportedFile::relative_path(self.state, entity, kind));
        let tmp = prepare_tmp(&path)?;
        // Known before the first byte is written, so that a failed run
        // removes even a file it did not finish.
        let slot = {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            written.push(Written {
                entity,
                kind,
                tmp: tmp.clone(),
                path: path.clone(),
                done: None,
            });
            written.len() - 1
        };
        let err = |e: DuckError| export_err(&path, format!("writing {}: {e}", entity.table(kind)));
        // Columns in the raw table's types, under its name, so that the
        // rules read exactly what they read in the views (UUIDs arrive as
        // text and the insert casts them).
        let columns = feed
            .columns
            .iter()
            .map(|(n, t)| {
                let q = quote_ident(n);
                format!("CAST({q} AS {}) AS {q}", t.duckdb_sql())
            })
            .collect::<Vec<_>>()
            .join(", ");
        let con = RawConnection::connect(&self.db).map_err(err)?;
        let (template, next) = feed.into_feed();
        let counted = con
            .run_with_feed(
                |rows| {
                    let rows = format!("(SELECT {columns} FROM {rows}) AS {}", quote_ident(raw));
                    let query = match kind {
                        FileKind::Good => validate::good_rows(&rows, rules, key),
                        FileKind::Bad => validate::bad_rows(&rows, rules, key),
                    };
                    copy_sql(&query, &tmp, self.cfg)
                },
                template,
                next,
            )
            .map_err(err)?;
        // Synced and hashed here, while the pull goes on, rather than
        // after the commit, when nothing else would run beside it.
        sync_tmp(&tmp, &path)?;
        let (bytes, sha256) = hash_file(&tmp).map_err(|e| export_err(&path, e.to_string()))?;
        let rows = counted.first().copied().unwrap_or(0) as u64;
        self.written.lock().unwrap_or_else(|p| p.into_inner())[slot].done = Some(Done {
            rows,
            bytes,
            sha256,
        });
        Ok(())
    }

    /// Puts the files in place (after the run's commit), in
    /// the order [`export_all`](super::export_all) returns them: each
    /// entity's good, then bad.
    pub fn finish(self, entities: &[Entity]) -> Result<Vec<ExportedFile>, PipelineError> {
        let mut written =
            std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()));
        written.sort_by_key(|w| {
            let e = entities.iter().position(|e| *e == w.entity);
            (e.unwrap_or(usize::MAX), w.kind)
        });
        let files = if written.len() == 2 * entities.len() {
            written.iter().map(put).collect()
        } else {
            Err(export_err(
                &self.exports_dir,
                format!(
                    "{} of {} files were written",
                    written.len(),
                    2 * entities.len()
                ),
            ))
        };
        if files.is_err() {
            discard(written);
        }
        files
    }
}

/// Renames a finished file into place.
fn put(w: &Written) -> Result<ExportedFile, PipelineError> {
    let done = w
        .done
        .as_ref()
        .ok_or_else(|| export_err(&w.path, "the file was not finished".into()))?;
    // Synced when it was written.
    rename_synced(&w.tmp, &w.path)?;
    Ok(ExportedFile {
        entity: w.entity,
        kind: w.kind,
        table_name: w.entity.table(w.kind),
        path: w.path.clone(),
        rows: done.rows,
        bytes: done.bytes,
        sha256: done.sha256.clone(),
    })
}

/// Removes the temporary files of `written`.
fn discard(written: impl IntoIterator<Item = Written>) {
    for w in written {
        let _ = fs::remove_file(&w.tmp);
    }
}

impl Drop for StreamedExport<'_> {
    /// A run that fails before [`finish`](Self::finish) leaves no
    /// temporary file behind.
    fn drop(&mut self) {
        discard(std::mem::take(
            self.written.get_mut().unwrap_or_else(|p| p.into_inner()),
        ));
    }
}
