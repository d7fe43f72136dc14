//! The long-running service: fire schedules, run states, obey reloads and
//! stops.
//!
//! Shape (after mini-redis): [`serve`] takes what it must obey (a
//! [`Control`] stream) and the time it fires by (a [`Clock`]); [`run`]
//! feeds it SIGHUP/SIGTERM/SIGINT and the system clock on a runtime of its
//! own. Tests call `serve` in-process with a channel and paused time.
//! In order of reading:
//! - `start.rs`: once, before the first fire: the rules against the
//!   source, runs a killed process left behind, fire times missed while
//!   the daemon was down;
//! - `fire.rs`: one task per schedule that sleeps until its next fire time,
//!   and each fire's run on a blocking thread (the pipeline blocks);
//! - here: the loop that reloads and stops.
//!
//! A reload whose config does not load is refused and the old schedules
//! keep running. A stop lets no new run start, gives running ones
//! `shutdown_grace_secs` to finish, then cancels them; a cancelled run
//! publishes nothing more and is audited as cancelled.
//!
//! A trigger that finds its state still running (or queued behind
//! `max_concurrent_runs`) is skipped with a log line: runs of one state never
//! overlap in this process. Across processes and hosts, each run claims its
//! fire time and its state's lease in PostgreSQL (`ledger::claim`): one
//! fire time runs once, one state runs once at a time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::RunReport;
use crate::state::StateCode;

mod fire;
mod start;

/// What the daemon is told from outside while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Load the config file again (SIGHUP).
    Reload,
    /// Stop after the grace period (SIGTERM, SIGINT).
    Stop,
}

/// The time schedules fire by.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock, re-read at every look: a suspended machine or
/// a clock step moves the next fire with it.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What the daemon tells an onlooker (a test) as it goes; the service
/// itself has the log, systemd's status line and the metrics.
#[derive(Debug)]
pub enum Event {
    /// The schedules are armed and any catch-up runs started.
    Started,
    /// A reload: the new config took over, or why it was refused.
    Reloaded(Result<(), String>),
    /// A run ended (skipped ones included), its report as the audit has it.
    RunFinished(Box<RunReport>),
}

/// Everything [`serve`] needs besides its controls.
pub struct Service {
    /// The file a reload reads again.
    pub config_path: PathBuf,
    /// The config in force at the start, loaded from `config_path`.
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    /// Where [`Event`]s go, if anyone listens.
    pub events: Option<mpsc::UnboundedSender<Event>>,
}

/// Longest single sleep: the clock is re-read at least this often, so a
/// suspended machine or a clock step does not delay a fire time by more.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// What every schedule task and run shares.
struct Shared {
    clock: Arc<dyn Clock>,
    events: Option<mpsc::UnboundedSender<Event>>,
    /// States with a run in progress or waiting for a permit.
    running: Mutex<HashSet<StateCode>>,
    /// An all-states run is in progress or waiting for a permit.
    all_states_running: std::sync::atomic::AtomicBool,
    /// Bounds concurrent runs of different states.
    permits: Arc<Semaphore>,
    /// Set on stop: no new run starts.
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

    /// The next fire of an all-states schedule, for the status line.
    fn next_fire_all(&self, at: chrono::DateTime<Utc>, tz: chrono_tz::Tz) {
        self.update_board(|b| b.next_fire("all states", at, tz));
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

    fn tell(&self, event: Event) {
        if let Some(events) = &self.events {
            // An onlooker that went away is no reason to stop.
            let _ = events.send(event);
        }
    }
}

/// The daemon refused to start for a reason a restart cannot fix (the
/// config or its rules): the service stops instead of looping.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A secret every run needs is set nowhere: the service stops instead of
/// looping until someone fills it in.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingSecrets(pub String);

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
    let service = Service {
        config_path,
        config,
        clock: Arc::new(SystemClock),
        events: None,
    };
    rt.block_on(async { serve(service, signal_controls()?).await })
}

/// SIGHUP, SIGTERM and SIGINT as [`Control`]s. signal-hook's iterator runs
/// on its own thread; the registration happens before the first schedule
/// fires, so no signal is lost to the default handler.
fn signal_controls() -> anyhow::Result<mpsc::UnboundedReceiver<Control>> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::debug!(signal = sig, "signal received");
                let control = match sig {
                    SIGHUP => Control::Reload,
                    _ => Control::Stop,
                };
                if tx.send(control).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

/// The daemon: starts, then obeys `controls` until a [`Control::Stop`] (or
/// the sender going away). Errors only for what prevents starting.
pub async fn serve(
    service: Service,
    mut controls: mpsc::UnboundedReceiver<Control>,
) -> anyhow::Result<()> {
    let Service {
        config_path,
        mut config,
        clock,
        events,
    } = service;
    if config.storage.bucket == crate::config::PLACEHOLDER_BUCKET {
        return Err(Refused(crate::check::placeholder_bucket()).into());
    }
    if let Some(missing) = crate::check::missing_secrets(&config).into_iter().next() {
        return Err(MissingSecrets(missing).into());
    }
    for name in crate::check::secrets_in_file(&config) {
        tracing::warn!(
            "{name} is written in {}: it works, but move it to a credential file (NEWS.Debian, docs/service.md)",
            config_path.display()
        );
    }
    // `status` tells from it that a daemon serves this workbench.
    let _presence = crate::workbench::presence::hold(&config.workbench.dir)
        .map_err(|e| tracing::warn!(error = %e, "`status` will not see this daemon"))
        .ok();
    let shared = Arc::new(Shared {
        clock,
        events,
        running: Mutex::new(HashSet::new()),
        all_states_running: Default::default(),
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
    let missed = start::before_first_fire(&config, &shared).await?;
    let mut tasks = fire::start_schedules(&config, &shared);
    let config_arc = Arc::new(config.clone());
    for (state, opts) in missed {
        match state {
            Some(state) => {
                tracing::info!(state = %state, "catching up a fire time missed while the daemon was down");
                fire::trigger(state, &opts, &config_arc, &shared);
            }
            None => {
                tracing::info!(
                    "catching up an all-states fire time missed while the daemon was down"
                );
                fire::trigger_all_states(&opts, &config_arc, &shared);
            }
        }
    }
    tracing::info!(
        config = %config_path.display(),
        schedules = tasks.len(),
        "daemon started"
    );
    crate::systemd::ready(&shared.board_line());
    shared.write_metrics(&config);
    shared.tell(Event::Started);

    // The control loop, and the watchdog's pings while it turns.
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
        let control = tokio::select! {
            control = controls.recv() => control,
            () = ping => {
                crate::systemd::watchdog();
                continue;
            }
            _ = heartbeat.tick() => continue,
        };
        match control {
            // Loading parses the schedules and rules: a bad file is refused
            // before the old schedules are dropped.
            Some(Control::Reload) => {
                crate::systemd::reloading();
                match crate::quality::rules::load_config(&config_path) {
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
                        tasks = fire::start_schedules(&config, &shared);
                        tracing::info!(schedules = tasks.len(), "configuration reloaded");
                        shared.tell(Event::Reloaded(Ok(())));
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        tracing::error!(
                            error,
                            "new configuration refused; the old one keeps running"
                        );
                        shared.tell(Event::Reloaded(Err(error)));
                    }
                }
                crate::systemd::ready(&shared.board_line());
            }
            Some(Control::Stop) | None => {
                tracing::info!("stopping: no new runs");
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
    let grace = config.daemon.shutdown_grace;
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

/// Waits until every run's task has ended, at most `limit`. True if idle.
async fn wait_idle(shared: &Shared, limit: Duration) -> bool {
    tokio::time::timeout(limit, shared.runs.wait())
        .await
        .is_ok()
}

/// What a run (or the start-up's checks) held is let go before the daemon
/// idles: the rules' DuckDB, the heap glibc would keep for reuse, and the
/// pages of DuckDB's code the run read in (measured, idle between fires:
/// 59 MiB RSS and 14 threads before, 20 MiB and 6 now; see docs/service.md).
fn release_run_memory() {
    crate::quality::rules::Checker::release();
    // The next run makes a new S3 client (~0.1 s): between fires its CA
    // store and idle connections are not worth keeping.
    crate::bucket::s3_api::forget_client();
    ow_duckdb::trim_heap();
    ow_duckdb::release_code_pages();
}
