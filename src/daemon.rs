//! The long-running service: fire schedules, run states, handle signals.
//!
//! Shape (after mini-redis): one tokio runtime; one task per schedule that
//! sleeps until its next fire time; runs themselves on blocking threads,
//! because the pipeline blocks (DuckDB, the postgres client). The main task
//! waits for signals:
//! - SIGHUP reloads the config. A config that does not load is refused and
//!   the old schedules keep running.
//! - SIGTERM / SIGINT stop new runs, give running ones `shutdown_grace_secs`
//!   to finish, then cancel them. A cancelled run publishes nothing more and
//!   is audited as cancelled; the daemon then exits 0.
//!
//! A trigger that finds its state still running (or queued behind
//! `max_concurrent_runs`) is skipped with a log line: runs of one state never
//! overlap in this process. Across processes and hosts, each run claims its
//! fire time and its state's lease in PostgreSQL (`pipeline::claim`): one
//! fire time runs once, one state runs once at a time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::Schedule;
use crate::pipeline::{self, RunOptions, RunStatus};
use crate::state::StateCode;

/// Longest single sleep: wall-clock time is re-read at least this often, so
/// a suspended machine or a clock step does not delay a fire time by more.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// What every schedule task and run shares.
struct Shared {
    /// States with a run in progress or waiting for a permit.
    running: Mutex<HashSet<StateCode>>,
    /// Bounds concurrent runs of different states.
    permits: Arc<Semaphore>,
    /// Set on SIGTERM: no new run starts.
    stopping: CancellationToken,
    /// Set when the grace period is over: running runs cancel.
    cancel_runs: CancellationToken,
    /// systemd's `Status:` line: next fire times, last results.
    board: Mutex<crate::systemd::Board>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whether each state's last run here succeeded, for `recovered`.
    last_ok: Mutex<std::collections::HashMap<StateCode, bool>>,
    /// Every run's task, queued or going: shutdown waits on it.
    runs: tokio_util::task::TaskTracker,
}

/// A task that ends when its owner goes: the metrics server.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Shared {
    /// The next fire of `states`, for systemd's status line and the metrics.
    fn next_fire(&self, states: &[StateCode], at: chrono::DateTime<Utc>, tz: chrono_tz::Tz) {
        for state in states {
            self.metrics.next_fire(state.as_str(), at);
        }
        self.update_board(|b| {
            for state in states {
                b.next_fire(state.as_str(), at, tz);
            }
        });
    }

    fn update_board(&self, f: impl FnOnce(&mut crate::systemd::Board)) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut board);
        crate::systemd::status(&board.line());
    }

    /// Rewrites `[metrics] textfile` of the config in force, if set.
    fn write_metrics(&self, config: &Config) {
        if let Some(path) = &config.metrics.textfile {
            if let Err(e) = self.metrics.write_textfile(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not write the metrics textfile");
            }
        }
    }

    fn board_line(&self) -> String {
        self.board.lock().unwrap_or_else(|p| p.into_inner()).line()
    }
}

/// The daemon refused to start for a reason a restart cannot fix (the
/// config or its rules): the service stops instead of looping.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// glibc malloc arenas the daemon's threads share. Between fires the
/// daemon holds no more than it needs (see `release_run_memory`); what a
/// run's threads freed in arenas of their own would stay. Measured with
/// three states scheduled, after their runs: 11.5 MiB of heap and stacks
/// with one arena, 21.7 MiB with glibc's default.
const HEAP_ARENAS: i32 = 1;

/// Process settings the daemon needs before any thread starts (the
/// logger's included): `main` calls it first.
pub fn before_threads() {
    ow_duckdb::limit_heap_arenas(HEAP_ARENAS);
}

/// Runs until SIGTERM/SIGINT. Errors only for what prevents starting.
pub fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(config_path, config))
}

async fn serve(config_path: PathBuf, mut config: Config) -> anyhow::Result<()> {
    let mut signals = signal_stream()?;
    let shared = Arc::new(Shared {
        running: Mutex::new(HashSet::new()),
        permits: Arc::new(Semaphore::new(config.daemon.max_concurrent_runs.max(1))),
        stopping: CancellationToken::new(),
        cancel_runs: CancellationToken::new(),
        board: Mutex::new(crate::systemd::Board::default()),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        last_ok: Mutex::new(std::collections::HashMap::new()),
        runs: tokio_util::task::TaskTracker::new(),
    });
    // Bound before anything runs: a port in use stops the start, saying so.
    let _metrics_server = match &config.metrics.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("[metrics] listen = {addr:?}: {e}"))?;
            tracing::info!(address = %addr, "serving /metrics and /healthz");
            Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(
                listener,
                shared.metrics.clone(),
            ))))
        }
        None => None,
    };
    // Blocking work (DuckDB, the postgres client) stays off the async threads.
    let cfg = config.clone();
    let metrics = shared.metrics.clone();
    let missed = tokio::task::spawn_blocking(move || {
        check_rules_at_start(&cfg)?;
        // One opening of the workbench for every look at the run history;
        // closed again before the first run so analysts can open it.
        let wb = crate::workbench::Workbench::open(&cfg.workbench, cfg.lock_timeout());
        match wb {
            Ok(wb) => {
                audit_abandoned_runs(&cfg, &wb);
                // The last run and success per state survive a restart:
                // an alert on their age must not go blind when the
                // daemon starts again.
                match wb.last_finished() {
                    Ok(states) => {
                        for (state, run, success) in states {
                            metrics.seed(&state, run, success);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read the last runs for the metrics"),
                }
                let missed = missed_runs(&cfg, &wb);
                drop(wb);
                release_run_memory();
                anyhow::Ok(missed)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the run history (abandoned runs, catch_up)");
                release_run_memory();
                Ok(Vec::new())
            }
        }
    })
    .await??;
    let mut tasks = start_schedules(&config, &shared)?;
    let config_arc = Arc::new(config.clone());
    for (state, opts) in missed {
        tracing::info!(state = %state, "catching up a fire time missed while the daemon was down");
        trigger(state, &opts, &config_arc, &shared);
    }
    tracing::info!(
        config = %config_path.display(),
        schedules = tasks.len(),
        "daemon started"
    );
    crate::systemd::ready(&shared.board_line());
    shared.write_metrics(&config);

    // The scheduler loop: signals, and the watchdog's pings while it turns.
    let mut watchdog = crate::systemd::watchdog_every().map(tokio::time::interval);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    loop {
        shared.metrics.beat();
        let ping = async {
            match watchdog.as_mut() {
                Some(every) => {
                    every.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let sig = tokio::select! {
            sig = signals.recv() => sig,
            () = ping => {
                crate::systemd::watchdog();
                continue;
            }
            _ = heartbeat.tick() => continue,
        };
        let Some(sig) = sig else { break };
        match sig {
            // Loading parses the schedules and rules: a bad file is refused
            // before the old schedules are dropped.
            SIGHUP => {
                crate::systemd::reloading();
                match crate::pipeline::rules::load_config(&config_path) {
                    Ok(new) => {
                        for t in tasks.drain(..) {
                            t.abort();
                        }
                        if new.daemon.max_concurrent_runs != config.daemon.max_concurrent_runs {
                            tracing::warn!(
                                "max_concurrent_runs changes take effect at the next restart"
                            );
                        }
                        config = new;
                        shared.update_board(|b| b.clear_next());
                        tasks = start_schedules(&config, &shared)?;
                        tracing::info!(schedules = tasks.len(), "configuration reloaded");
                    }
                    Err(e) => {
                        tracing::error!(
                            error = format!("{e:#}"),
                            "new configuration refused; the old one keeps running"
                        );
                    }
                }
                crate::systemd::ready(&shared.board_line());
            }
            _ => {
                tracing::info!(signal = sig, "stopping: no new runs");
                crate::systemd::stopping();
                break;
            }
        }
    }

    shared.stopping.cancel();
    // No run starts after this; the tracker is done once the last ends.
    shared.runs.close();
    for t in tasks {
        t.abort();
    }
    let grace = Duration::from_secs(config.daemon.shutdown_grace_secs);
    if !wait_idle(&shared, grace).await {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; cancelling running runs"
        );
        shared.cancel_runs.cancel();
        // Cancelled runs stop at their next check (between batches or
        // files) and write their audit record; give them time for that.
        if !wait_idle(&shared, Duration::from_secs(30)).await {
            tracing::error!("runs did not stop after cancellation; exiting anyway");
        }
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// What a run (or the start-up's checks) held is let go before the daemon
/// idles: the rules' DuckDB, the heap glibc would keep for reuse, and the
/// pages of DuckDB's code the run read in (measured, idle between fires:
/// 59 MiB RSS and 14 threads before, 20 MiB and 6 now; see the README).
fn release_run_memory() {
    pipeline::rules::Checker::release();
    // The next run makes a new S3 client (~0.1 s): between fires its CA
    // store and idle connections are not worth keeping.
    pipeline::s3_api::forget_client();
    ow_duckdb::trim_heap();
    ow_duckdb::release_code_pages();
}

/// Rules naming a column the source does not have would fail every run:
/// refuse to start, naming the rule. A database that cannot be reached now
/// is no reason not to start; each run checks the rules again before it
/// pulls.
fn check_rules_at_start(config: &Config) -> anyhow::Result<()> {
    let checked = crate::pg::connect(&config.source)
        .and_then(|mut client| pipeline::rules::check_against_source(&mut client, config));
    match checked {
        Ok(()) => Ok(()),
        Err(e @ pipeline::PipelineError::Rule(_)) => {
            Err(Refused(format!("{e}; fix [rules] in the config")).into())
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check the rules against the source now; each run checks them before pulling");
            Ok(())
        }
    }
}

/// Runs a previous process left `running` (it died mid-run) are marked
/// abandoned in the workbench, their audit records pending; then every
/// pending record (these, and runs that could not reach PostgreSQL) is
/// written if PostgreSQL answers now. No run goes missing without a record.
/// Problems here are logged, never fatal: the schedules matter more, and
/// each run that reaches PostgreSQL sends what is still pending.
fn audit_abandoned_runs(config: &Config, wb: &crate::workbench::Workbench) {
    // One try: a database that is down now must not hold up the start.
    let mut session = crate::pg::Session::lazy(&config.source, &config.retry.single_try());
    let never = CancellationToken::new();
    match wb.take_abandoned() {
        Ok(runs) => {
            for run in &runs {
                let started =
                    chrono::DateTime::from_timestamp_micros(run.started_at_us).unwrap_or_default();
                tracing::warn!(state = %run.state, run_id = %run.run_id, started_at = %started, "run abandoned by a previous process");
            }
            // Told with the same details the audit gets (the pending record
            // `take_abandoned` made of each real run).
            if !runs.is_empty() && !config.notify.is_empty() {
                for p in wb.pending_audits().unwrap_or_default() {
                    if runs.iter().any(|r| r.run_id == p.run_id) {
                        crate::notify::send(&config.notify, "abandoned", p.details);
                    }
                }
            }
            // Their leases are known dead (this process holds the
            // workbench, so no other has them running): free the states
            // now instead of after the TTL.
            let ids: Vec<String> = runs.iter().map(|r| r.run_id.clone()).collect();
            if !ids.is_empty() {
                if let Err(e) = pipeline::claim::release_dead(&mut session, config, &ids, &never) {
                    tracing::warn!(error = %e, "could not release the abandoned runs' leases; they expire by themselves");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not look for abandoned runs"),
    }
    if let Err(e) = pipeline::audit::send_pending(&mut session, config, wb, &never) {
        tracing::warn!(error = %e, "could not write the pending audit records now; the next run that reaches PostgreSQL does");
    }
}

/// States of `catch_up` schedules whose last run started before a fire
/// time that has passed: the daemon was down then. A state with no run
/// history is not caught up (as systemd's `Persistent=` with no stamp).
fn missed_runs(config: &Config, wb: &crate::workbench::Workbench) -> Vec<(StateCode, RunOptions)> {
    let now = Utc::now();
    let mut missed: Vec<(StateCode, RunOptions)> = Vec::new();
    for schedule in &config.schedules {
        if !schedule.catch_up {
            continue;
        }
        for state in &schedule.states {
            let last = match wb.last_started(state.as_str()) {
                Ok(Some(us)) => chrono::DateTime::from_timestamp_micros(us),
                _ => None,
            };
            let due = last
                .and_then(|t| schedule.timing.next_after(t))
                .filter(|fire| *fire <= now);
            if let Some(fire) = due.filter(|_| !missed.iter().any(|(s, _)| s == state)) {
                // The first fire time missed is the one claimed: a host that
                // was up then has run it, and this one skips it.
                let mut opts = RunOptions::for_schedule(schedule);
                opts.fire_time = Some(fire);
                missed.push((state.clone(), opts));
            }
        }
    }
    missed
}

/// SIGHUP, SIGTERM and SIGINT as a channel. signal-hook's iterator runs on
/// its own thread; the registration happens before the first schedule
/// fires, so no signal is lost to the default handler.
fn signal_stream() -> anyhow::Result<mpsc::UnboundedReceiver<i32>> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

fn start_schedules(config: &Config, shared: &Arc<Shared>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = Arc::new(config.clone());
    let mut tasks = Vec::new();
    for schedule in config.schedules.iter().cloned() {
        let opts = RunOptions::for_schedule(&schedule);
        if let Some(next) = schedule.timing.next_after(Utc::now()) {
            shared.next_fire(&schedule.states, next, schedule.timing.tz);
            tracing::info!(
                schedule = schedule.index,
                spec = %schedule.timing.spec,
                timezone = %schedule.timing.tz,
                next = %next.with_timezone(&schedule.timing.tz),
                "schedule armed"
            );
        }
        tasks.push(tokio::spawn(fire_forever(
            schedule,
            opts,
            config.clone(),
            shared.clone(),
        )));
    }
    Ok(tasks)
}

async fn fire_forever(
    schedule: Schedule,
    opts: RunOptions,
    config: Arc<Config>,
    shared: Arc<Shared>,
) {
    let mut after = Utc::now();
    while let Some(next) = schedule.timing.next_after(after) {
        loop {
            let now = Utc::now();
            if now >= next {
                break;
            }
            let wait = (next - now).to_std().unwrap_or_default().min(MAX_SLEEP);
            tokio::time::sleep(wait).await;
        }
        after = next;
        if let Some(then) = schedule.timing.next_after(next) {
            shared.next_fire(&schedule.states, then, schedule.timing.tz);
        }
        let mut fired = opts.clone();
        fired.fire_time = Some(next);
        for state in &schedule.states {
            trigger(state.clone(), &fired, &config, &shared);
        }
    }
}

/// Starts a run of `state` unless one is already running or queued.
fn trigger(state: StateCode, opts: &RunOptions, config: &Arc<Config>, shared: &Arc<Shared>) {
    if shared.stopping.is_cancelled() {
        return;
    }
    if !shared.running.lock().unwrap().insert(state.clone()) {
        tracing::warn!(state = %state, "skipped: the previous run of this state is still going");
        return;
    }
    let (opts, config, shared) = (opts.clone(), config.clone(), shared.clone());
    let tracker = shared.runs.clone();
    tracker.spawn(async move {
        let permit = shared.permits.clone().acquire_owned().await;
        if shared.stopping.is_cancelled() {
            shared.running.lock().unwrap().remove(&state);
            return;
        }
        let cancel = shared.cancel_runs.child_token();
        // The overall timeout cancels the run the way a shutdown does.
        let timeout = config.daemon.run_timeout_secs;
        let timer = (timeout > 0).then(|| {
            let (cancel, state) = (cancel.clone(), state.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(timeout)).await;
                tracing::error!(state = %state, timeout_secs = timeout, "run timed out; cancelling it");
                cancel.cancel();
            })
        });
        let st = state.clone();
        let config_for_notify = config.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let report = pipeline::run(&config, &st, &cancel, &opts);
            release_run_memory();
            report
        })
        .await;
        if let Some(t) = timer {
            t.abort();
        }
        drop(permit);
        match joined {
            Ok(report) => {
                log_report(&report);
                shared.metrics.record(&report);
                if report.status != RunStatus::Skipped {
                    let previous = shared
                        .last_ok
                        .lock()
                        .unwrap()
                        .insert(state.clone(), report.succeeded());
                    if let Some(event) = crate::notify::event(&report, previous) {
                        let mut details = report.to_json();
                        details["audit_id"] = serde_json::json!(report.audit_id);
                        crate::notify::send(&config_for_notify.notify, event, details);
                    }
                }
                shared.write_metrics(&config_for_notify);
                if report.status != RunStatus::Skipped {
                    let result = format!(
                        "{} {} ({} uploaded)",
                        if report.succeeded() {
                            "success"
                        } else {
                            report.status.as_str()
                        },
                        report
                            .finished_at
                            .unwrap_or_else(Utc::now)
                            .format("%H:%M UTC"),
                        report.uploaded
                    );
                    shared.update_board(|b| b.last_result(state.as_str(), result));
                }
            }
            Err(e) => tracing::error!(state = %state, error = %e, "run panicked"),
        }
        shared.running.lock().unwrap().remove(&state);
    });
}

fn log_report(r: &pipeline::RunReport) {
    let counts = |c: &Option<pipeline::EntityCounts>| {
        c.as_ref()
            .map(|c| format!("{}/{}", c.good, c.bad))
            .unwrap_or_else(|| "-".into())
    };
    let audit_id = r
        .audit_id
        .map(|id| id.to_string())
        .unwrap_or_else(|| "-".into());
    match (r.status, &r.audit_error) {
        (RunStatus::Success, None) => tracing::info!(
            state = %r.state, run_id = %r.run_id,
            companies_good_bad = %counts(&r.companies), people_good_bad = %counts(&r.people),
            uploaded = r.uploaded, skipped = r.skipped, audit_id = %audit_id,
            secs = r.duration_secs.unwrap_or_default(), "run succeeded"
        ),
        (RunStatus::Skipped, _) => tracing::info!(
            state = %r.state, run_id = %r.run_id, reason = r.error.as_deref().unwrap_or(""),
            "run skipped"
        ),
        // A shutdown's (or the run timeout's) doing, not a fault of the run.
        (RunStatus::Cancelled, None) => tracing::warn!(
            state = %r.state, run_id = %r.run_id, audit_id = %audit_id,
            reason = r.error.as_deref().unwrap_or(""), "run cancelled"
        ),
        (RunStatus::Success, Some(audit_error)) => tracing::error!(
            state = %r.state, run_id = %r.run_id, uploaded = r.uploaded, skipped = r.skipped,
            error = %audit_error, "run published, but its audit record is not written yet"
        ),
        _ => tracing::error!(
            state = %r.state, run_id = %r.run_id, status = r.status.as_str(),
            error = r.error.as_deref().unwrap_or(""), audit_id = %audit_id, "run did not succeed"
        ),
    }
}

/// Waits until every run's task has ended, at most `limit`. True if idle.
async fn wait_idle(shared: &Shared, limit: Duration) -> bool {
    tokio::time::timeout(limit, shared.runs.wait())
        .await
        .is_ok()
}
