//! This run's change sets (see `files::changes`): each entity's good file
//! against the state's previous published snapshot, the one the bucket's
//! manifest names. That snapshot comes from the copy the workbench kept
//! when it was published, when its bytes are the manifest's, else from the
//! bucket (another host published it, the workbench was lost). When it can
//! be had whole from neither, no change set is written and the snapshot
//! starts a new baseline: never a diff against the wrong snapshot.

use std::path::{Path, PathBuf};

use super::stages::RunCtx;
use super::RunReport;
use crate::bucket::manifest::{Manifest, ManifestFile};
use crate::bucket::publish;
use crate::files::changes::{self, ChangeFile, Diff, Sides};
use crate::files::ExportedFile;
use crate::names::{Entity, FileKind};
use crate::workbench::Workbench;

/// What this publish sends beside the state's files.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Each change file with its object key.
    pub files: Vec<(ChangeFile, String)>,
}

/// The folder of the snapshot last published from this workbench.
fn kept_dir(run: &RunCtx) -> PathBuf {
    run.config
        .workbench
        .dir
        .join("published")
        .join(run.state.lower())
}

fn good_of(files: &[ExportedFile], entity: Entity) -> Option<&ExportedFile> {
    files
        .iter()
        .find(|f| f.entity == entity && f.kind == FileKind::Good)
}

/// Compares this run's good files with the previous snapshot's; records
/// the outcome in the report (`changes`, `changes_base_run_id`,
/// `changes_baseline`).
pub(super) fn prepare(
    run: &RunCtx,
    wb: &Workbench,
    previous: Option<&Manifest>,
    report: &mut RunReport,
) -> Plan {
    let Some(previous) = previous else {
        report.changes_baseline = Some("the state's first publish".into());
        return Plan::default();
    };
    let mut plan = Plan::default();
    for entity in Entity::ALL {
        let table = entity.table(FileKind::Good);
        let Some(new) = good_of(&report.files, entity) else {
            continue;
        };
        let Some(old) = previous.files.iter().find(|f| f.table_name == table) else {
            return baseline(
                report,
                plan,
                format!("the bucket's manifest lists no {table}"),
            );
        };
        if old.sha256 == new.sha256 {
            continue;
        }
        let old_path = match previous_file(run, old) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return baseline(
                    report,
                    plan,
                    format!(
                        "the previous snapshot's {table} could not be had whole (neither this workbench's copy nor the bucket's object has the manifest's sha256)"
                    ),
                )
            }
            Err(e) => {
                return baseline(report, plan, format!("the previous snapshot's {table}: {e}"))
            }
        };
        let stamp = report.started_at.format("%Y%m%dT%H%M%SZ");
        let name = format!("{stamp}_{}.parquet", report.run_id);
        let relative = format!("{}/changes/{entity}/{name}", run.state.lower());
        let out = wb.exports_dir().join(&relative);
        clear_older(out.parent().expect("a folder"));
        let sides = Sides {
            entity,
            key: run.config.source.key(entity),
            old: &old_path,
            new: &new.path,
            out: &out,
            run_id: &report.run_id,
            base_run_id: &previous.run_id,
        };
        match changes::diff(wb.conn(), &sides, &run.config.export) {
            Ok(Diff::Same) => {}
            Ok(Diff::Written(f)) => plan.files.push((f, run.config.storage.key(&relative))),
            Ok(Diff::Baseline(why)) => return baseline(report, plan, why),
            Err(e) => return baseline(report, plan, e.to_string()),
        }
    }
    report.changes = plan.files.iter().map(|(f, _)| f.clone()).collect();
    report.changes_base_run_id = Some(previous.run_id.clone());
    plan
}

/// No change set this time: the reason, said once; files already written
/// are removed.
fn baseline(report: &mut RunReport, plan: Plan, why: String) -> Plan {
    tracing::warn!(reason = %why, "no change set: this snapshot starts a new baseline");
    for (f, _) in plan.files {
        let _ = std::fs::remove_file(&f.path);
    }
    report.changes_baseline = Some(why);
    Plan::default()
}

/// Only the newest change file of an entity stays on the host: the
/// bucket keeps them all.
fn clear_older(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The previous snapshot's file: this workbench's copy when its bytes are
/// the manifest's, else the bucket's object when its bytes are.
fn previous_file(run: &RunCtx, entry: &ManifestFile) -> Result<Option<PathBuf>, String> {
    let dir = kept_dir(run);
    let kept = dir.join(format!("{}.parquet", entry.table_name));
    if let Ok((_, sha)) = crate::files::hash_file(&kept) {
        if sha == entry.sha256 {
            return Ok(Some(kept));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let fetched = dir.join(format!("{}.parquet.fetched", entry.table_name));
    let got = publish::download_verified(
        &run.config.storage,
        &run.config.retry,
        &entry.key,
        &entry.sha256,
        &fetched,
        run.cancel,
    )
    .map_err(|e| e.to_string())?;
    Ok(got.then_some(fetched))
}

/// The change sets the new manifest keeps listing: the previous
/// manifest's, both its own and those it kept, still within
/// `[changes] keep_days` (by the time in their names), oldest first.
pub(super) fn retained(
    run: &RunCtx,
    previous: Option<&Manifest>,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<crate::bucket::manifest::ManifestChange> {
    let Some(p) = previous else {
        return Vec::new();
    };
    let keep = run.config.changes.keep_days;
    let limit = now - chrono::Duration::days(i64::from(keep));
    p.retained_changes
        .iter()
        .chain(&p.changes)
        .filter(|c| keep > 0 && stamp_of(&c.key).is_some_and(|t| t >= limit))
        .cloned()
        .collect()
}

/// After a publish that wrote a manifest: deletes every change file of
/// the state it does not list (expired, or left by a run that died
/// between its upload and its manifest). Problems are warnings: the data
/// is published.
pub(super) fn prune(run: &RunCtx, listed: &[String]) {
    let prefix = run
        .config
        .storage
        .key(&format!("{}/changes/", run.state.lower()));
    let keys = match publish::list_keys(&run.config.storage, &prefix) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the change files to delete old ones");
            return;
        }
    };
    let old: Vec<String> = keys.into_iter().filter(|k| !listed.contains(k)).collect();
    if old.is_empty() {
        return;
    }
    let failed = publish::delete_all(&run.config.storage, &old);
    tracing::info!(
        deleted = old.len() - failed.len(),
        keep_days = run.config.changes.keep_days,
        "change files the manifest does not list deleted"
    );
    for key in failed {
        tracing::warn!(
            key,
            "could not delete a change file the manifest does not list"
        );
    }
}

/// The UTC time a change file's name starts with.
fn stamp_of(key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let name = key.rsplit('/').next()?;
    let stamp = name.split('_').next()?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// A dry run reads no manifest: it counts its changes against the
/// snapshot this host last published, and keeps no file.
pub(super) fn count_dry(run: &RunCtx, wb: &Workbench, report: &mut RunReport) {
    let dir = kept_dir(run);
    let Ok(base) = std::fs::read_to_string(dir.join(BASE_RUN)) else {
        return;
    };
    for entity in Entity::ALL {
        let Some(new) = good_of(&report.files, entity) else {
            continue;
        };
        let old = dir.join(format!("{}.parquet", new.table_name));
        if !old.exists() {
            continue;
        }
        let out = wb
            .exports_dir()
            .join(run.state.lower())
            .join("changes")
            .join(entity.as_str())
            .join(format!("dry_{}.parquet", report.run_id));
        let sides = Sides {
            entity,
            key: run.config.source.key(entity),
            old: &old,
            new: &new.path,
            out: &out,
            run_id: &report.run_id,
            base_run_id: base.trim(),
        };
        match changes::diff(wb.conn(), &sides, &run.config.export) {
            Ok(Diff::Same) => {}
            Ok(Diff::Written(f)) => {
                let _ = std::fs::remove_file(&f.path);
                report.changes.push(f);
            }
            Ok(Diff::Baseline(why)) => {
                report.changes.clear();
                report.changes_baseline = Some(why);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "a dry run could not count its changes");
                report.changes.clear();
                return;
            }
        }
    }
    report.changes_base_run_id = Some(base.trim().to_string());
}

/// The run whose snapshot `published/<state>/` holds.
const BASE_RUN: &str = "run_id";

/// After a publish whose manifest names this run's files: keeps each good
/// file as the snapshot the next run compares with. A hard link costs no
/// copy (the export renames a new file in, so the link keeps these bytes).
pub(super) fn keep_published(run: &RunCtx, files: &[ExportedFile], manifest_run: &str) {
    let dir = kept_dir(run);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(error = %e, "could not keep the published snapshot; the next change set reads it from the bucket");
        return;
    }
    let _ = std::fs::write(dir.join(BASE_RUN), manifest_run);
    for f in files.iter().filter(|f| f.kind == FileKind::Good) {
        let kept = dir.join(format!("{}.parquet", f.table_name));
        let tmp = kept.with_extension("parquet.tmp");
        let _ = std::fs::remove_file(&tmp);
        let linked = std::fs::hard_link(&f.path, &tmp)
            .or_else(|_| std::fs::copy(&f.path, &tmp).map(|_| ()))
            .and_then(|_| std::fs::rename(&tmp, &kept));
        if let Err(e) = linked {
            tracing::warn!(error = %e, file = %kept.display(), "could not keep the published snapshot; the next change set reads it from the bucket");
        }
        let _ = std::fs::remove_file(dir.join(format!("{}.parquet.fetched", f.table_name)));
    }
}
