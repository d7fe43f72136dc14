//! Schedules to runs: one task per schedule sleeps until its next fire
//! time and triggers a run of each of its states; a run goes on a blocking
//! thread (the pipeline blocks) and its report to the log, the metrics,
//! the webhooks and systemd's status line.

use std::sync::Arc;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{release_run_memory, Event, Shared, MAX_SLEEP};
use crate::config::{Config, Schedule};
use crate::pipeline::{self, RunOptions, RunStatus};
use crate::state::StateCode;

/// Arms every schedule of `config`: one task each, aborted on reload.
pub(super) fn start_schedules(config: &Config, shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let config = Arc::new(config.clone());
    let mut tasks = Vec::new();
    for schedule in config.schedules.iter().cloned() {
        let opts = RunOptions::for_schedule(&schedule);
        if let Some(next) = schedule.timing.next_after(shared.clock.now()) {
            shared.next_fire(&schedule.states, next, schedule.timing.tz);
            if schedule.all_states {
                shared.next_fire_all(next, schedule.timing.tz);
            }
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
    tasks
}

async fn fire_forever(
    schedule: Schedule,
    opts: RunOptions,
    config: Arc<Config>,
    shared: Arc<Shared>,
) {
    let mut after = shared.clock.now();
    while let Some(next) = schedule.timing.next_after(after) {
        loop {
            let now = shared.clock.now();
            if now >= next {
                break;
            }
            let wait = (next - now).to_std().unwrap_or_default().min(MAX_SLEEP);
            tokio::time::sleep(wait).await;
        }
        after = next;
        if let Some(then) = schedule.timing.next_after(next) {
            shared.next_fire(&schedule.states, then, schedule.timing.tz);
            if schedule.all_states {
                shared.next_fire_all(then, schedule.timing.tz);
            }
        }
        let mut fired = opts.clone();
        fired.fire_time = Some(next);
        if schedule.all_states {
            trigger_all_states(&fired, &config, &shared);
        }
        for state in &schedule.states {
            trigger(state.clone(), &fired, &config, &shared);
        }
    }
}

/// Starts a run of `state` unless one is already running or queued.
pub(super) fn trigger(
    state: StateCode,
    opts: &RunOptions,
    config: &Arc<Config>,
    shared: &Arc<Shared>,
) {
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
        let (c, st) = (config.clone(), state.clone());
        let work = move |cancel: CancellationToken| pipeline::run(&c, &st, &cancel, &opts);
        match run_blocking(&shared, &config, state.as_str(), work).await {
            None => {}
            Some(Ok(report)) => finished(&report, &state, &config, &shared),
            Some(Err(e)) => tracing::error!(state = %state, error = %e, "run panicked"),
        }
        shared.running.lock().unwrap().remove(&state);
    });
}

/// Waits for a permit, then runs `work` on a blocking thread (the pipeline
/// blocks) with a token that a shutdown's grace period or the run timeout
/// cancels. `None` when the daemon began stopping before it could start.
async fn run_blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    config: &Config,
    what: &str,
    work: impl FnOnce(CancellationToken) -> T + Send + 'static,
) -> Option<Result<T, tokio::task::JoinError>> {
    let permit = shared.permits.clone().acquire_owned().await;
    if shared.stopping.is_cancelled() {
        return None;
    }
    let cancel = shared.cancel_runs.child_token();
    let timer = start_timer(config, &cancel, what);
    let joined = tokio::task::spawn_blocking(move || {
        let done = work(cancel);
        release_run_memory();
        done
    })
    .await;
    if let Some(t) = timer {
        t.abort();
    }
    drop(permit);
    Some(joined)
}

/// Starts an all-states run (see [`pipeline::all_states`]) unless one is
/// already running or queued. It takes one permit for all its states, which
/// run one after the other; the run timeout applies to it whole. Each
/// state's report goes to the log, metrics, webhooks and status line as it
/// finishes.
pub(super) fn trigger_all_states(opts: &RunOptions, config: &Arc<Config>, shared: &Arc<Shared>) {
    use std::sync::atomic::Ordering;
    if shared.stopping.is_cancelled() {
        return;
    }
    if shared.all_states_running.swap(true, Ordering::SeqCst) {
        tracing::warn!("skipped: the previous all-states run is still going");
        return;
    }
    let (opts, config, shared) = (opts.clone(), config.clone(), shared.clone());
    let tracker = shared.runs.clone();
    tracker.spawn(async move {
        let (c, s) = (config.clone(), shared.clone());
        let work = move |cancel: CancellationToken| {
            // Until the first state ends: no state runs before the whole
            // source is read.
            s.update_board(|b| b.progress(Some("all states: reading the source".into())));
            let mut each = |r: &pipeline::RunReport, p: pipeline::all_states::Progress| {
                s.update_board(|b| {
                    b.progress(Some(format!(
                        "all states: {}/{} done, {} rows/s",
                        p.done, p.total, p.rows_per_sec
                    )))
                });
                match StateCode::parse(&r.state) {
                    Ok(state) => finished(r, &state, &c, &s),
                    Err(_) => log_report(r),
                }
            };
            pipeline::all_states::run_all_states(&c, &cancel, &opts, &mut each)
        };
        let joined = run_blocking(&shared, &config, "all states", work).await;
        shared.update_board(|b| b.progress(None));
        match joined {
            None => {}
            Some(Ok(batch)) => {
                let (companies, people) = batch.without_state();
                shared.metrics.record_all_states(companies, people);
                shared.write_metrics(&config);
            }
            Some(Err(e)) => tracing::error!(error = %e, "all-states run panicked"),
        }
        shared.all_states_running.store(false, Ordering::SeqCst);
    });
}

/// The run timeout, if set: it cancels the run (`what`: its state, or
/// all states) the way a shutdown does.
fn start_timer(config: &Config, cancel: &CancellationToken, what: &str) -> Option<JoinHandle<()>> {
    let timeout = config.daemon.run_timeout;
    (!timeout.is_zero()).then(|| {
        let (cancel, what) = (cancel.clone(), what.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let timeout_secs = timeout.as_secs();
            tracing::error!(state = %what, timeout_secs, "run timed out; cancelling it");
            cancel.cancel();
        })
    })
}

/// A run's report to the log, the metrics, the webhooks, systemd's status
/// line and the onlooker.
fn finished(report: &pipeline::RunReport, state: &StateCode, config: &Config, shared: &Shared) {
    log_report(report);
    shared.metrics.record(report);
    if report.status != RunStatus::Skipped {
        let previous = shared
            .last_ok
            .lock()
            .unwrap()
            .insert(state.clone(), report.succeeded());
        if let Some(event) = crate::notify::event(report, previous) {
            let mut details = report.to_json();
            details["audit_id"] = serde_json::json!(report.audit_id);
            crate::notify::send(&config.notify, event, details);
        }
    }
    // Runs of dead processes (a one-shot run killed with -9) this run found
    // in the workbench, told as the daemon's start tells its own.
    for run in report.abandoned_found.iter().filter(|r| !r.dry_run) {
        let started = chrono::DateTime::from_timestamp_micros(run.started_at_us);
        let details = serde_json::json!({
            "state": run.state, "run_id": run.run_id, "status": "abandoned",
            "started_at": started, "error": crate::workbench::ABANDONED,
        });
        crate::notify::send(&config.notify, "abandoned", details);
    }
    if let Some(aside) = &report.state_file_set_aside {
        let details = serde_json::json!({
            "state": report.state, "run_id": report.run_id,
            "state_file": aside.path, "set_aside_as": aside.set_aside_as, "error": aside.error,
        });
        crate::notify::send(&config.notify, "workbench_corrupt", details);
    }
    shared.write_metrics(config);
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
    shared.tell(Event::RunFinished(Box::new(report.clone())));
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
