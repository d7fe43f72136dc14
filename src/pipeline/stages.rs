//! A run's stages, in the order they happen, one function each: connect,
//! claim, pull to files (or, with the link rule, load then export),
//! compare with the bucket, gate, publish. [`super::run`] calls [`all`] and then audits whatever came of
//! it. Each stage enters its own module once; what a later stage needs
//! from an earlier one is passed on, not looked up again.

use std::time::Instant;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{EntityCounts, Held, RunOptions, RunReport};
use crate::bucket::manifest::{self, Manifest, ManifestFile};
use crate::bucket::publish;
use crate::config::Config;
use crate::error::{check_cancel, PipelineError};
use crate::files::{self as export, ExportedFile, StreamedExport};
use crate::ledger::{audit, claim};
use crate::names::{Entity, FileKind, PublishAction};
use crate::quality::samples::{self, RuleSample};
use crate::quality::{gates, rules, validate};
use crate::retry;
use crate::source::connect::Session;
use crate::source::pull as source;
use crate::state::StateCode;
use crate::workbench::{Transaction, Workbench};

/// What every stage of one run reads: passed whole from stage to stage.
#[derive(Clone, Copy)]
pub(super) struct RunCtx<'a> {
    pub config: &'a Config,
    pub state: &'a StateCode,
    pub opts: &'a RunOptions,
    pub cancel: &'a CancellationToken,
}

/// Every stage of a real or dry run, up to (not including) the audit.
pub(super) fn all(
    run: &RunCtx,
    report: &mut RunReport,
    held: &mut Held,
) -> Result<(), PipelineError> {
    let &RunCtx {
        config,
        state,
        opts,
        cancel,
    } = run;
    let session = connect(run, &mut held.session)?;
    if !opts.dry_run {
        let tables_ready = &mut held.tables_ready;
        held.lease = Some(claim(run, session, report, tables_ready)?);
    }
    check_cancel(cancel)?;

    let wb = held.workbench.insert(Workbench::open(&config.workbench)?);
    wb.run_started(
        &report.run_id,
        state.as_str(),
        opts.dry_run,
        report.started_at,
    )?;
    // The files are written while the rows load, unless a rule reads more
    // than its own row: the link rule reads the companies' verdicts from the
    // workbench, so its runs load the rows there first.
    if opts.link_rule {
        load(run, session, wb, report)?;
        check_cancel(cancel)?;
        report.files = export(run, wb, report)?;
    } else {
        pull_to_files(run, session, wb, report)?;
    }
    check_cancel(cancel)?;
    let t = Instant::now();
    held.samples = sample_failing_rows(run, wb, report);
    report.stages.report = Some(t.elapsed().as_secs_f64());

    let bucket = compare_with_bucket(run, wb, report)?;
    gate(
        run,
        session,
        held.tables_ready,
        bucket.previous.as_ref(),
        report,
    )?;
    if opts.dry_run {
        super::changes::count_dry(run, wb, report);
        return Ok(());
    }
    let changes = super::changes::prepare(run, wb, bucket.previous.as_ref(), report);
    publish(
        run,
        session,
        held.lease.as_ref(),
        wb,
        bucket,
        changes,
        report,
    )
}

/// Everything that can be refused is refused before any work is done: the
/// bucket (not for a dry run), the connection, and the rules against the
/// source's columns. The connection is the run's one for its own statements
/// and the pull (the lease's heartbeat has its own).
///
/// The bucket is checked while PostgreSQL is reached, on a thread of its
/// own: a new S3 client (its TLS roots) and a far database each take tens
/// of milliseconds. The bucket's verdict comes first, as when they ran one
/// after the other.
fn connect<'h>(
    run: &RunCtx,
    slot: &'h mut Option<Session>,
) -> Result<&'h mut Session, PipelineError> {
    let &RunCtx {
        config,
        opts,
        cancel,
        ..
    } = run;
    // A state of an all-states run: the batch checked the bucket and the
    // rules before its read, and has the rows; PostgreSQL is reached only
    // if the run needs it (its claim, gates, audit), not for a dry run.
    if opts.batch.is_some() {
        return Ok(slot.insert(Session::lazy(&config.source, &config.retry)));
    }
    let (bucket, opened, checked) = std::thread::scope(|scope| {
        let span = tracing::Span::current();
        let bucket = (!opts.dry_run).then(|| {
            scope.spawn(move || {
                let _entered = span.enter();
                retry::retry(&config.retry, cancel, "checking the bucket", || {
                    publish::check_bucket(&config.storage)
                })
            })
        });
        let mut opened = Session::open(&config.source, &config.retry, cancel);
        // A rule naming a column the source does not have fails here,
        // before any row is pulled, naming the rule.
        let checked = match &mut opened {
            Ok(s) => s.run("checking the rules against the source", cancel, |c| {
                rules::check_against_source(c, config)
            }),
            Err(_) => Ok(()),
        };
        let bucket = bucket.map(|b| crate::error::joined("the bucket check", b.join()));
        (bucket.transpose(), opened, checked)
    });
    // Kept even when something else failed: the audit writes on it.
    let session = match opened {
        Ok(s) => slot.insert(s),
        Err(e) => {
            bucket?;
            return Err(e);
        }
    };
    bucket?;
    checked?;
    Ok(session)
}

/// The audit, lease and fire-claim tables (`tables_ready` once checked, so
/// that a later failure's audit does not check them again), the schedule's
/// fire time, then the state's lease (see [`claim`](crate::ledger::claim)).
fn claim(
    run: &RunCtx,
    session: &mut Session,
    report: &mut RunReport,
    tables_ready: &mut bool,
) -> Result<claim::Lease, PipelineError> {
    let &RunCtx {
        config,
        state,
        cancel,
        ..
    } = run;
    audit::ensure_tables(session, config, cancel)?;
    *tables_ready = true;
    if let Some(fire) = report.fire_time {
        claim::claim_fire(session, config, state, fire, &report.run_id, cancel)?;
    }
    let lease = claim::Lease::acquire(session, config, state, &report.run_id, cancel)?;
    report.lease_acquired_at = Some(Utc::now());
    Ok(lease)
}

/// Pull straight into the four files: the export's writers take the rows
/// as they arrive (see [`StreamedExport`]), the files are put in place once
/// whole, and the workbench's views of the state then read them, made in
/// one DuckDB transaction with the counts. A failed or cancelled run leaves
/// the previous files, and so what the views show, as they were.
fn pull_to_files(
    run: &RunCtx,
    session: &mut Session,
    wb: &Workbench,
    report: &mut RunReport,
) -> Result<(), PipelineError> {
    let &RunCtx {
        config,
        state,
        cancel,
        ..
    } = run;
    let streamed = StreamedExport::new(
        wb,
        state,
        &config.export,
        Entity::ALL
            .map(|e| (e, config.source.key(e), config.rules.of(e)))
            .to_vec(),
    );
    let t = Instant::now();
    let db = wb.database();
    let read = read_from(run, session)?;
    let pulled = source::pull(read, config, &db, None, cancel, streamed.taps())?;
    note_pull(report, &pulled, t);
    check_cancel(cancel)?;

    let t = Instant::now();
    report.files = streamed.finish(&Entity::ALL)?;
    report.stages.export = Some(t.elapsed().as_secs_f64());

    let t = Instant::now();
    let schema = state.lower();
    let txn = begin_with_schema(wb, &schema)?;
    for (entity, pulled) in Entity::ALL
        .into_iter()
        .zip([pulled.companies, pulled.people])
    {
        let file = |kind| {
            report
                .files
                .iter()
                .find(|f| f.entity == entity && f.kind == kind)
        };
        let (Some(good), Some(bad)) = (file(FileKind::Good), file(FileKind::Bad)) else {
            return Err(PipelineError::Validate(format!(
                "{entity}: its files are missing"
            )));
        };
        let key = config.source.key(entity);
        let rules = config.rules.of(entity);
        let written = [good, bad].map(|f| validate::FileRows {
            path: &f.path,
            rows: f.rows,
        });
        let [good, bad] = written;
        let counts = validate::over_files(&txn, &schema, entity, key, rules, good, bad)?;
        // Every pulled row is in exactly one of the two files.
        if counts.good + counts.bad != pulled {
            return Err(PipelineError::Validate(format!(
                "{entity}: {pulled} rows pulled, but {} good and {} bad written",
                counts.good, counts.bad
            )));
        }
        let counts = Some(EntityCounts::new(pulled, counts));
        match entity {
            Entity::Companies => report.companies = counts,
            Entity::People => report.people = counts,
        }
    }
    txn.commit()?;
    report.stages.validate = Some(t.elapsed().as_secs_f64());
    Ok(())
}

/// A transaction on a workbench connection of its own, the state's schema
/// made if it is new.
fn begin_with_schema(wb: &Workbench, schema: &str) -> Result<Transaction, PipelineError> {
    let txn = wb.transaction()?;
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        crate::ident::quote_ident(schema)
    );
    txn.execute(&create)
        .map_err(|e| workbench_err(&create, e))?;
    Ok(txn)
}

/// The link rule's runs: pull and validate in one DuckDB transaction, so
/// that a failed or cancelled run leaves the state's previous tables
/// intact for analysts. It runs on a connection of its own, the one the
/// pull's inserts need.
fn load(
    run: &RunCtx,
    session: &mut Session,
    wb: &Workbench,
    report: &mut RunReport,
) -> Result<(), PipelineError> {
    let &RunCtx {
        config,
        state,
        opts,
        cancel,
    } = run;
    let schema = state.lower();
    let txn = begin_with_schema(wb, &schema)?;
    let t = Instant::now();
    let syncing = wb.background_sync();
    let into = source::LoadInto {
        duck: &txn,
        schema: &schema,
    };
    let db = wb.database();
    let pulled = read_from(run, session)
        .and_then(|read| source::pull(read, config, &db, Some(into), cancel, Vec::new()));
    drop(syncing);
    let pulled = pulled?;
    note_pull(report, &pulled, t);
    check_cancel(cancel)?;

    let t = Instant::now();
    let (companies, people) = validate::split_all(&txn, &schema, config, opts.link_rule)?;
    report.stages.validate = Some(t.elapsed().as_secs_f64());
    report.companies = Some(EntityCounts::new(pulled.companies, companies));
    report.people = Some(EntityCounts::new(pulled.people, people));
    txn.commit().map_err(PipelineError::from)
}

/// A few of the rows each rule caught, for the run's page, read from the
/// state's views; none when `[report]` is off or asks for none. A sample
/// that cannot be read costs the page its samples, not the run.
fn sample_failing_rows(run: &RunCtx, wb: &Workbench, report: &RunReport) -> Vec<RuleSample> {
    let &RunCtx {
        config,
        state,
        opts,
        ..
    } = run;
    let n = config.report.sample_rows;
    if !config.report.enabled || n == 0 {
        return Vec::new();
    }
    let schema = state.lower();
    let mut samples = Vec::new();
    for entity in Entity::ALL {
        let Some(counts) = report.counts(entity) else {
            continue;
        };
        let mut of_entity = config.rules.of(entity).to_vec();
        if entity == Entity::People && opts.link_rule {
            of_entity.push(rules::company_not_valid_rule(
                &schema,
                &config.source.people_company_column,
                config.source.key(Entity::Companies),
            ));
        }
        let caught = |code: &str| {
            counts
                .errors
                .get(code)
                .or(counts.warnings.get(code))
                .copied()
                .unwrap_or(0)
        };
        let key = config.source.key(entity);
        match samples::collect(wb.conn(), &schema, entity, key, &of_entity, caught, n) {
            Ok(s) => samples.extend(s),
            Err(e) => {
                tracing::warn!(%entity, error = %e, "could not read the failing rows for the report page")
            }
        }
    }
    samples
}

/// Where the run's rows come from: PostgreSQL, or the one read of the
/// all-states run it is part of.
fn read_from<'s>(
    run: &RunCtx<'s>,
    session: &'s mut Session,
) -> Result<source::Read<'s>, PipelineError> {
    Ok(match &run.opts.batch {
        Some(batch) => source::Read::Stored(&*batch.rows, run.state),
        None => source::Read::State(session.client(run.cancel)?, run.state),
    })
}

/// The pull's figures, in the report and the log.
fn note_pull(report: &mut RunReport, pulled: &source::PullStats, started: Instant) {
    report.stages.pull = Some(started.elapsed().as_secs_f64());
    report.text_fallbacks = pulled.text_fallbacks.clone();
    tracing::info!(
        companies = pulled.companies,
        people = pulled.people,
        "pulled"
    );
}

fn workbench_err(sql: &str, e: crate::workbench::DuckError) -> PipelineError {
    PipelineError::Workbench(format!("{sql}: {e}"))
}

/// The link rule's four files, written from the committed views.
fn export(
    run: &RunCtx,
    wb: &Workbench,
    report: &mut RunReport,
) -> Result<Vec<ExportedFile>, PipelineError> {
    let &RunCtx { config, state, .. } = run;
    let t = Instant::now();
    let files = export::export_all(
        wb,
        state,
        &config.export,
        &Entity::ALL,
        config.workbench.export_lanes(),
    )?;
    report.stages.export = Some(t.elapsed().as_secs_f64());
    Ok(files)
}

/// What the bucket holds now, as far as this run cares: the manifest it
/// compares its schema with, and replaces last.
struct BucketView {
    manifest_key: String,
    previous: Option<Manifest>,
    /// The manifest entries of this run's files.
    entries: Vec<ManifestFile>,
}

/// Reads the state's manifest and reports columns added, removed or
/// retyped since. A dry run does not look at the bucket.
fn compare_with_bucket(
    run: &RunCtx,
    wb: &Workbench,
    report: &mut RunReport,
) -> Result<BucketView, PipelineError> {
    let &RunCtx {
        config,
        state,
        opts,
        cancel,
    } = run;
    let manifest_key = manifest::key(&config.storage, state);
    if opts.dry_run {
        return Ok(BucketView {
            manifest_key,
            previous: None,
            entries: Vec::new(),
        });
    }
    let keyed: Vec<_> = report
        .files
        .iter()
        .map(|f| (f.clone(), publish::object_key(&config.storage, state, f)))
        .collect();
    let entries = manifest::entries(wb.conn(), &keyed)?;
    let previous = publish::read_manifest(&config.storage, &config.retry, &manifest_key, cancel)?;
    report.manifest_compared = Some(
        previous
            .as_ref()
            .map_or(String::new(), |m| m.run_id.clone()),
    );
    if let Some(p) = &previous {
        report.schema_changes = manifest::drift(p, &entries);
    }
    for c in &report.schema_changes {
        tracing::warn!(change = %c.describe(), "schema changed since the manifest in the bucket");
    }
    Ok(BucketView {
        manifest_key,
        previous,
        entries,
    })
}

/// The gates sit between export and publish: the files are on disk for
/// whoever investigates, the bucket keeps the last good ones.
fn gate(
    run: &RunCtx,
    session: &mut Session,
    tables_ready: bool,
    manifest: Option<&Manifest>,
    report: &mut RunReport,
) -> Result<(), PipelineError> {
    let &RunCtx { opts, .. } = run;
    if let (Some(c), Some(p)) = (&report.companies, &report.people) {
        // Without an audited success (a new audit table, another
        // database), the bucket's manifest still has the last published
        // counts: an emptied source is stopped on its first run here too.
        let previous = match opts.gates.max_row_delta {
            Some(_) => previous_success(run, session, tables_ready)?
                .or_else(|| manifest.map(manifest::published_rows)),
            None => None,
        };
        report.gates = gates::evaluate(&opts.gates, c, p, previous.as_ref());
    }
    report.gates.extend(gates::schema_gate(
        &opts.gates,
        &report
            .schema_changes
            .iter()
            .map(|c| c.describe())
            .collect::<Vec<_>>(),
    ));
    if let Some(reason) = gates::reason(&report.gates) {
        if !opts.force {
            return Err(PipelineError::Gated(reason));
        }
        tracing::warn!(%reason, "publishing anyway: --force");
    }
    Ok(())
}

/// The state's last successful run, for `max_row_delta`, from the audit
/// table; none before the table exists (a dry run on a new database).
/// `tables_ready`: this run has checked the table already (real runs do).
fn previous_success(
    run: &RunCtx,
    session: &mut Session,
    tables_ready: bool,
) -> Result<Option<gates::Previous>, PipelineError> {
    let &RunCtx {
        config,
        state,
        cancel,
        ..
    } = run;
    let table = config.audit_table();
    let usable = match tables_ready {
        true => Some(Vec::new()),
        false => session.run("checking the audit table", cancel, |c| {
            audit::inspect(c, &table)
        })?,
    };
    match usable {
        Some(problems) if problems.is_empty() => {
            audit::previous_success(session, &table, state.as_str(), cancel)
        }
        _ => Ok(None),
    }
}

/// A change file, for the uploader.
fn change_as_file(c: &crate::files::changes::ChangeFile) -> ExportedFile {
    ExportedFile {
        entity: c.entity,
        kind: crate::names::FileKind::Good,
        table_name: format!("{}_changes", c.entity.as_str()),
        path: c.path.clone(),
        rows: c.rows(),
        bytes: c.bytes,
        sha256: c.sha256.clone(),
    }
}

/// Uploads what changed, fenced by the lease, then the manifest that names
/// this run's files (left alone when it already names exactly these).
/// First the litter: uploads an earlier run could not abort, and any under
/// the state's prefix unfinished for more than a day.
fn publish(
    run: &RunCtx,
    session: &mut Session,
    lease: Option<&claim::Lease>,
    wb: &Workbench,
    bucket: BucketView,
    changes: super::changes::Plan,
    report: &mut RunReport,
) -> Result<(), PipelineError> {
    let &RunCtx {
        config,
        state,
        cancel,
        ..
    } = run;
    // A stop asked for before the first upload publishes nothing; once the
    // first object is replaced, the files and the manifest go up to the
    // end, stop or not: the state is whole or untouched, never half new
    // files under the old manifest. (Seen in the all-states SIGTERM test:
    // one file replaced, no manifest.) A lost lease still stops it.
    check_cancel(cancel)?;
    let stop_asked = cancel;
    let cancel = &CancellationToken::new();
    let t = Instant::now();
    let leftovers: Vec<publish::Unfinished> = wb
        .unfinished_uploads()?
        .into_iter()
        .map(|(key, upload_id)| publish::Unfinished { key, upload_id })
        .collect();
    for gone in publish::abort_leftovers(&config.storage, &leftovers) {
        wb.set_unfinished_upload(&gone.key, &gone.upload_id, false)?;
    }
    let state_prefix = config.storage.key(&format!("{}/", state.lower()));
    match publish::sweep_stale(&config.storage, &state_prefix) {
        Ok(lines) => report.stale_uploads_aborted = lines,
        Err(e) => tracing::warn!(error = %e, "could not look for stale multipart uploads"),
    }
    let mut fence =
        |key: &str| lease.map_or(Ok(()), |l| l.fence(session, &format!("uploading {key}")));
    let mut progress = publish::Progress::default();
    let published = publish::publish(
        &config.storage,
        &config.retry,
        state,
        &report.files,
        cancel,
        &mut fence,
        &mut progress,
    );
    report.objects = progress.objects;
    for u in &progress.unfinished {
        wb.set_unfinished_upload(&u.key, &u.upload_id, true)?;
    }
    report.stages.publish = Some(t.elapsed().as_secs_f64());
    for o in report
        .objects
        .iter()
        .filter(|o| o.action == PublishAction::Uploaded)
    {
        wb.record_upload(&o.key, &o.sha256, o.bytes, &report.run_id)?;
    }
    published?;
    let BucketView {
        manifest_key,
        previous,
        entries,
    } = bucket;
    let url = format!("s3://{}/{manifest_key}", config.storage.bucket);
    // The run whose snapshot the manifest in force names, after this.
    let unchanged = manifest::unchanged(previous.as_ref(), &entries);
    let manifest_run = match (unchanged, &previous) {
        (true, Some(p)) => p.run_id.clone(),
        _ => report.run_id.clone(),
    };
    if unchanged {
        report.manifest = Some(format!("unchanged {url}"));
    } else {
        // The change sets go up after the files, before the manifest that
        // lists them; one that the manifest then does not list is deleted.
        let keyed: Vec<(ExportedFile, String)> = changes
            .files
            .iter()
            .map(|(c, key)| (change_as_file(c), key.clone()))
            .collect();
        let mut sent = publish::Progress::default();
        let changes_up = publish::publish_keyed(
            &config.storage,
            &config.retry,
            state,
            &keyed,
            cancel,
            &mut fence,
            &mut sent,
        );
        let m = changes_up.and_then(|()| {
            fence(&manifest_key)?;
            let m = Manifest {
                format: manifest::FORMAT,
                run_id: report.run_id.clone(),
                state: state.to_string(),
                finished_at: Utc::now(),
                files: entries,
                base_run_id: report.changes_base_run_id.clone(),
                baseline: report.changes_baseline.clone(),
                retained_changes: super::changes::retained(run, previous.as_ref(), Utc::now()),
                changes: changes
                    .files
                    .iter()
                    .map(|(c, key)| manifest::ManifestChange {
                        run_id: report.run_id.clone(),
                        base_run_id: report.changes_base_run_id.clone().unwrap_or_default(),
                        entity: c.entity.as_str().to_string(),
                        key: key.clone(),
                        sha256: c.sha256.clone(),
                        bytes: c.bytes,
                        added: c.added,
                        changed: c.changed,
                        removed: c.removed,
                    })
                    .collect(),
            };
            publish::write_manifest(&config.storage, &config.retry, &manifest_key, &m, cancel)?;
            Ok(m)
        });
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                let keys: Vec<String> = sent.objects.iter().map(|o| o.key.clone()).collect();
                for key in publish::delete_all(&config.storage, &keys) {
                    tracing::warn!(
                        key,
                        "a change set the manifest does not list could not be deleted"
                    );
                }
                return Err(e);
            }
        };
        report.manifest = Some(format!("written {url}"));
        let listed: Vec<String> = m
            .changes
            .iter()
            .chain(&m.retained_changes)
            .map(|c| c.key.clone())
            .collect();
        super::changes::prune(run, &listed);
    }
    super::changes::keep_published(run, &report.files, &manifest_run);
    report.stages.publish = Some(t.elapsed().as_secs_f64());
    if stop_asked.is_cancelled() {
        tracing::warn!(
            "a stop came while publishing; the state's files and manifest went up whole first"
        );
    }
    Ok(())
}
