//! The command line: clap parses the arguments once into typed values,
//! `main` loads the config, and each command is one function below that
//! does one thing and turns the outcome into an exit code; the work itself
//! lives in the library.

// Every unsafe block is in the ow-duckdb crate, behind its safe API.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use outreach_workbench::config::{Config, DEFAULT_CONFIG_PATH};
use outreach_workbench::pipeline::{self, RunOptions, RunStatus};
use outreach_workbench::state::StateCode;

/// Exit codes beyond 0/1, so scripts can tell failures apart.
const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// A quality gate stopped the run: nothing was published.
const EXIT_GATED: u8 = 3;
/// The daemon lacks a secret every run needs; only the admin can add it.
const EXIT_SECRETS: u8 = 4;

#[derive(Parser)]
#[command(
    name = "outreach-workbench",
    version,
    about = "PostgreSQL → DuckDB → Parquet → S3 outreach pipeline"
)]
struct Cli {
    /// Config file [default: $OUTREACH_CONFIG or /etc/outreach-workbench/config.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline once for one state, or every state, now.
    Run {
        /// Two-letter state code, e.g. WV.
        #[arg(long, required_unless_present_any = ["all_states", "instance"])]
        state: Option<StateCode>,
        /// Every state in the source (and every state published before),
        /// from one read of each table.
        #[arg(long, conflicts_with = "state")]
        all_states: bool,
        /// Validate and export, but neither upload nor write the audit.
        #[arg(long)]
        dry_run: bool,
        /// Also mark people whose company is not good as bad (company_not_valid);
        /// on anyway when the state's [[schedule]] sets link_rule.
        #[arg(long)]
        link_rule: bool,
        /// Publish even if a quality gate trips (the audit records it).
        #[arg(long)]
        force: bool,
        /// What outreach-workbench-run@.service passes: `WV`, `all`, or
        /// either with `:force`.
        #[arg(long, hide = true, conflicts_with_all = ["state", "all_states"])]
        instance: Option<Instance>,
    },
    /// Every host's recent runs from the audit table, newest first (this
    /// host's workbench when PostgreSQL cannot be reached, saying so).
    History {
        /// Only this state.
        #[arg(long)]
        state: Option<StateCode>,
        /// Only runs of this host.
        #[arg(long)]
        host: Option<String>,
        /// Only runs started at or after this time (2026-12-01, or RFC 3339).
        #[arg(long)]
        since: Option<Since>,
        /// Only runs that ended so: success, failed, gated, cancelled, abandoned.
        #[arg(long)]
        status: Option<String>,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Each scheduled state's next fire, last run (any host's) and who runs
    /// it now; this host's daemon and unwritten audit records. Exits 1 when
    /// a state's last run failed, 3 when one was gated.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Render a run's report page from the workbench's history, without
    /// a database: the newest run of the state, or the one named.
    Report {
        /// Two-letter state code, e.g. WV.
        #[arg(long)]
        state: StateCode,
        /// The run's id (`history --state WV` lists them).
        #[arg(long)]
        run: Option<String>,
        /// Write the page here [default: standard output].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the schedules until SIGTERM (what the systemd unit starts).
    Daemon,
    /// Check the config, then tell the running daemon to reload it
    /// (the unit's ExecReload): exits 2, and leaves the daemon alone, when
    /// the config is refused.
    Reload {
        /// The daemon's PID [default: $MAINPID, which systemd sets].
        #[arg(long)]
        pid: Option<i32>,
    },
    /// List each schedule with its next five fire times.
    Schedule,
    /// Check the config, rules, secrets, PostgreSQL, the audit table and the bucket; one line per problem.
    Check {
        /// Only the config, rules (their SQL) and secrets, no network (the service's pre-start step).
        #[arg(long)]
        offline: bool,
    },
    /// Write the man page and the bash, zsh and fish completions into a
    /// folder (the package's build does).
    #[command(hide = true)]
    Docs {
        #[arg(long)]
        out: PathBuf,
    },
}

/// A one-off unit's instance name: a state or `all`, and `:force`.
#[derive(Clone, Debug)]
struct Instance {
    /// `None`: every state.
    state: Option<StateCode>,
    force: bool,
}

impl std::str::FromStr for Instance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (what, force) = match s.split_once(':') {
            Some((what, "force")) => (what, true),
            Some((_, other)) => {
                return Err(format!(
                    "`{other}` is not `force` (outreach-workbench-run@WV:force)"
                ))
            }
            None => (s, false),
        };
        let state = match what.eq_ignore_ascii_case("all") {
            true => None,
            false => Some(what.parse::<StateCode>().map_err(|e| e.to_string())?),
        };
        Ok(Instance { state, force })
    }
}

/// The man pages and the completions, from the definitions above.
fn write_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    std::fs::create_dir_all(out)?;
    let cmd = Cli::command();
    outreach_workbench::manpages::write(cmd.clone(), out)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "outreach-workbench", out)?;
    }
    Ok(())
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("OUTREACH_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Docs { out } = &cli.command {
        return docs(out);
    }
    if matches!(cli.command, Command::Daemon) {
        outreach_workbench::daemon::before_threads();
    } else {
        // Before any thread. An all-states run starts three threads per
        // state; with glibc's default arenas (eight per core) the heap kept
        // 130-190 MiB more at 500k-2M companies than with two, in the same
        // time.
        ow_duckdb::limit_heap_arenas(2);
        outreach_workbench::logging::init_stderr();
    }
    let path = config_path(&cli);
    // Commands that run or check rules refuse one DuckDB cannot parse;
    // `schedule` and `history` start no DuckDB for that.
    let runs_rules = !matches!(
        cli.command,
        Command::History { .. }
            | Command::Status { .. }
            | Command::Report { .. }
            | Command::Schedule
    );
    let loaded = match cli.command {
        Command::Reload { .. } => Config::load_without_secrets(&path),
        _ => Config::load(&path),
    };
    let config = match loaded.with_context(|| format!("config {}", path.display())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The daemon's user is the unit's; `reload` signals, `schedule` and
    // `docs` touch nothing. Before DuckDB starts a thread (the rules'
    // check below), after the secrets were read as root.
    let writes_workbench = !matches!(
        cli.command,
        Command::Daemon | Command::Reload { .. } | Command::Schedule | Command::Docs { .. }
    );
    if writes_workbench {
        use outreach_workbench::service_user::{become_owner_of, Became};
        match become_owner_of(&config.workbench.dir) {
            Ok(Became::Same) => {}
            Ok(Became::Owner { name, .. }) => eprintln!(
                "note: running as {name}, the owner of {}",
                config.workbench.dir.display()
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    if runs_rules {
        if let Err(e) = outreach_workbench::quality::rules::check_syntax(&config.rules) {
            eprintln!(
                "error: config {}: invalid configuration: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    match cli.command {
        Command::Run {
            state,
            all_states: _,
            dry_run,
            link_rule,
            force,
            instance,
        } => {
            let (state, force) = match instance {
                Some(i) => (i.state, force || i.force),
                None => (state, force),
            };
            match state {
                Some(state) => run(&config, &state, dry_run, link_rule, force),
                None => run_all_states(&config, dry_run, link_rule, force),
            }
        }
        Command::History {
            state,
            host,
            since,
            status,
            limit,
            json,
        } => {
            let filter = HistoryFilter {
                state,
                host,
                since: since.map(|s| s.0),
                status,
                limit,
            };
            history(&config, &filter, json)
        }
        Command::Status { json } => status(&config, json),
        Command::Report { state, run, out } => report(&config, &state, run.as_deref(), out),
        Command::Daemon => daemon(path, config),
        Command::Reload { pid } => reload(&path, pid),
        Command::Schedule => schedule(&path, &config),
        Command::Check { offline } => check(&path, &config, offline),
        Command::Docs { .. } => unreachable!("written before the config is loaded"),
    }
}

/// `run`: one state, now; the report on stdout.
fn run(
    config: &Config,
    state: &StateCode,
    dry_run: bool,
    link_rule: bool,
    force: bool,
) -> ExitCode {
    let mut opts = RunOptions::for_state(config, state);
    opts.dry_run = dry_run;
    opts.link_rule |= link_rule;
    opts.force = force;
    let report = pipeline::run(config, state, &CancellationToken::new(), &opts);
    print!("{}", report.summary());
    if report.succeeded() {
        ExitCode::SUCCESS
    } else if report.status == RunStatus::Gated {
        ExitCode::from(EXIT_GATED)
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// `run --all-states`: every state from one read of the source; the batch
/// on stdout. Exits as `run` does for the worst state: failed, else gated.
fn run_all_states(config: &Config, dry_run: bool, link_rule: bool, force: bool) -> ExitCode {
    let mut opts = RunOptions::for_all_states(config);
    opts.dry_run = dry_run;
    opts.link_rule |= link_rule;
    opts.force = force;
    let report = pipeline::all_states::run_all_states(
        config,
        &CancellationToken::new(),
        &opts,
        &mut |_, _| {},
    );
    print!("{}", report.summary());
    if report.succeeded() {
        ExitCode::SUCCESS
    } else if report.failed() {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::from(EXIT_GATED)
    }
}

/// `--since`: a date (midnight UTC) or an RFC 3339 time.
#[derive(Clone, Debug)]
struct Since(chrono::DateTime<chrono::Utc>);

impl std::str::FromStr for Since {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(Since(t.with_timezone(&chrono::Utc)));
        }
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(|d| Since(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc()))
            .map_err(|_| format!("`{s}` is neither a date (2026-12-01) nor an RFC 3339 time"))
    }
}

struct HistoryFilter {
    state: Option<StateCode>,
    host: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    status: Option<String>,
    limit: usize,
}

/// `history`: every host's runs from the audit table; this host's
/// workbench when PostgreSQL cannot be read. A table or JSON.
fn history(config: &Config, f: &HistoryFilter, json: bool) -> ExitCode {
    if let Some(s) = f
        .status
        .as_deref()
        .filter(|s| RunStatus::from_name(s).is_none())
    {
        eprintln!("error: --status {s} is not one of success, failed, gated, cancelled, abandoned, skipped");
        return ExitCode::from(EXIT_CONFIG);
    }
    let filter = outreach_workbench::ledger::audit::RunFilter {
        state: f.state.as_ref().map(|s| s.to_string()),
        host: f.host.clone(),
        status: f.status.clone(),
        since: f.since,
        limit: f.limit as i64,
    };
    let read = match pipeline::history::read_audited(config, &filter) {
        Ok(entries) => Ok(entries),
        Err(e) => {
            eprintln!("note: PostgreSQL could not be read ({e}); this host's workbench only");
            pipeline::history::read(config, f.state.as_ref(), usize::MAX >> 1).map(|entries| {
                entries
                    .into_iter()
                    .filter(|e| f.host.is_none() || e.report.host == f.host)
                    .filter(|e| {
                        f.status.is_none() || Some(e.report.status.as_str()) == f.status.as_deref()
                    })
                    .filter(|e| f.since.is_none_or(|t| e.report.started_at >= t))
                    .take(f.limit)
                    .collect()
            })
        }
    };
    match read {
        Ok(entries) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&entries).expect("plain data")
            );
            ExitCode::SUCCESS
        }
        Ok(entries) if entries.is_empty() => {
            println!("no runs recorded");
            ExitCode::SUCCESS
        }
        Ok(entries) => {
            print!("{}", history_table(&entries));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `status`: a table, or JSON; the exit code says the worst last run.
fn status(config: &Config, json: bool) -> ExitCode {
    let s = pipeline::status::read(config, chrono::Utc::now());
    match json {
        true => println!("{}", serde_json::to_string_pretty(&s).expect("plain data")),
        false => print!("{}", pipeline::status::render(&s)),
    }
    ExitCode::from(s.exit_code())
}

/// One line per run, plus a line for a run's error.
fn history_table(entries: &[pipeline::history::Entry]) -> String {
    let mut s = format!(
        "{:<19}  {:<5} {:<9} {:>8}  {:>17}  {:>17}  {:>7}  {}\n",
        "STARTED (UTC)",
        "STATE",
        "STATUS",
        "TIME",
        "COMPANIES GOOD/BAD",
        "PEOPLE GOOD/BAD",
        "UP/SKIP",
        "GATES"
    );
    let counts = |c: &Option<pipeline::EntityCounts>| {
        c.as_ref()
            .map(|c| format!("{}/{}", c.good, c.bad))
            .unwrap_or_else(|| "-".into())
    };
    for pipeline::history::Entry {
        report: e,
        audit_pending,
        ..
    } in entries
    {
        let tripped: Vec<String> = e
            .gates
            .iter()
            .filter(|g| g.tripped)
            .map(|g| g.describe())
            .collect();
        let gates = match (e.gates.is_empty(), tripped.is_empty()) {
            (true, _) => "-".to_string(),
            (false, true) => "ok".to_string(),
            (false, false) if e.forced => format!("forced past {}", tripped.join("; ")),
            (false, false) => tripped.join("; "),
        };
        let status = match e.dry_run {
            true => format!("{}*", e.status.as_str()),
            false => e.status.as_str().to_string(),
        };
        // Runs that never finished have no counts of their own.
        let up_skip = match e.status {
            RunStatus::Running | RunStatus::Gated | RunStatus::Abandoned => "-".into(),
            _ if e.dry_run => "-".into(),
            _ => format!("{}/{}", e.uploaded, e.skipped),
        };
        s.push_str(&format!(
            "{:<19}  {:<5} {:<9} {:>8}  {:>17}  {:>17}  {:>7}  {}\n",
            e.started_at.format("%Y-%m-%d %H:%M:%S"),
            e.state,
            status,
            e.duration_secs
                .map(|d| format!("{d:.1}s"))
                .unwrap_or_else(|| "-".into()),
            counts(&e.companies),
            counts(&e.people),
            up_skip,
            gates
        ));
        // A gated run's reason is its GATES column already.
        let shown = matches!(e.status, RunStatus::Success | RunStatus::Gated);
        if let Some(err) = e.error.as_deref().filter(|_| !shown) {
            s.push_str(&format!("    {}: {err}\n", e.run_id));
        }
        if *audit_pending {
            s.push_str(&format!(
                "    {}: audit record not written yet; sent when PostgreSQL answers again\n",
                e.run_id
            ));
        }
    }
    if entries.iter().any(|e| e.report.dry_run) {
        s.push_str("* dry run: nothing published or audited\n");
    }
    s
}

/// `report`: a run's page, rendered again from the workbench.
fn report(config: &Config, state: &StateCode, run: Option<&str>, out: Option<PathBuf>) -> ExitCode {
    let html = match pipeline::page::render_from_history(config, state, run) {
        Ok(html) => html,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let written = match &out {
        Some(path) => std::fs::write(path, &html)
            .with_context(|| format!("could not write {}", path.display())),
        None => std::io::Write::write_all(&mut std::io::stdout(), html.as_bytes())
            .context("could not write to standard output"),
    };
    match written {
        Ok(()) => {
            if let Some(path) = out {
                eprintln!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `daemon`: the schedules until SIGTERM, logging to the journal and files.
fn daemon(path: PathBuf, config: Config) -> ExitCode {
    let logs = config.log_dir();
    let _guard =
        match outreach_workbench::logging::init_daemon(&logs, config.daemon.log_retention_days) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_FAILED);
            }
        };
    match outreach_workbench::daemon::run(path, config) {
        Ok(()) => ExitCode::SUCCESS,
        // The unit's RestartPreventExitStatus=2: no restart loop over a
        // config or rule only an edit can fix.
        Err(e) if e.is::<outreach_workbench::daemon::Refused>() => {
            tracing::error!("daemon refused to start: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        // RestartPreventExitStatus= too: a restart cannot fill it in.
        Err(e) if e.is::<outreach_workbench::daemon::MissingSecrets>() => {
            tracing::error!("daemon refused to start: {e:#}");
            ExitCode::from(EXIT_SECRETS)
        }
        Err(e) => {
            tracing::error!("daemon failed: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `reload`: the config loaded in `main` is valid (a refused one has
/// exited 2 already); tell the daemon to take it.
fn reload(path: &std::path::Path, pid: Option<i32>) -> ExitCode {
    let pid = pid.or_else(|| std::env::var("MAINPID").ok()?.parse().ok());
    let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) else {
        eprintln!("error: no daemon to reload: pass --pid (systemd sets MAINPID)");
        return ExitCode::from(EXIT_FAILED);
    };
    match rustix::process::kill_process(pid, rustix::process::Signal::HUP) {
        Ok(()) => {
            println!(
                "ok: {} is valid; daemon {} reloads it",
                path.display(),
                pid.as_raw_nonzero()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: signalling daemon {}: {e}", pid.as_raw_nonzero());
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `schedule`: each schedule's next five fire times, in UTC and local time.
fn schedule(path: &std::path::Path, config: &Config) -> ExitCode {
    let now = chrono::Utc::now();
    for s in &config.schedules {
        let states: Vec<&str> = match s.all_states {
            true => vec!["all states"],
            false => s.states.iter().map(|s| s.as_str()).collect(),
        };
        println!(
            "schedule[{}] {} `{}` ({})",
            s.index,
            states.join(","),
            s.timing.spec,
            s.timing.tz
        );
        for t in s.timing.upcoming(now, 5) {
            println!(
                "  {}  {}",
                t.format("%Y-%m-%d %H:%M:%S UTC"),
                t.with_timezone(&s.timing.tz).format("%Y-%m-%d %H:%M:%S %Z")
            );
        }
    }
    if config.schedules.is_empty() {
        println!("no [[schedule]] in {}", path.display());
    }
    ExitCode::SUCCESS
}

/// `check`: one line per problem; online, also who runs what right now.
fn check(path: &std::path::Path, config: &Config, offline: bool) -> ExitCode {
    let problems = if offline {
        outreach_workbench::check::offline(config)
    } else {
        outreach_workbench::check::online(config)
    };
    for line in outreach_workbench::check::secret_sources(config) {
        println!("secret: {line}");
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if !offline {
        // Not problems: who runs what right now, across hosts.
        for lease in outreach_workbench::check::leases(config) {
            println!("lease: {lease}");
        }
        for line in outreach_workbench::check::stale_uploads(config) {
            println!("uploads: {line}");
        }
    }
    if !problems.is_empty() {
        return ExitCode::from(EXIT_FAILED);
    }
    let what = match offline {
        true => "config and rules, no network",
        false => "config, rules, PostgreSQL, audit table, bucket",
    };
    println!("ok: {} ({what})", path.display());
    ExitCode::SUCCESS
}

/// `docs` (hidden): the man page and completions, for the package.
fn docs(out: &std::path::Path) -> ExitCode {
    match write_docs(out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the docs into {}: {e}", out.display());
            ExitCode::from(EXIT_FAILED)
        }
    }
}
