//! The report pages: one self-contained HTML page per run, for the people
//! who fix the data, and one per all-states run over every state.
//!
//! Owns: `<workbench dir>/reports/<STATE>/<time>-<run id>.html`, each
//! state's `latest.html` beside them, and `reports/all-states/`. The run
//! writes its page after its audit, from its report, its samples and the
//! state's history in the workbench; `report` renders any run's page again
//! from the workbench alone. May call: the workbench, [`crate::pipeline::history`],
//! the run's report. Nothing here fails a run: a page that cannot be
//! written is a warning.

pub mod chart;
mod html;
pub mod overview;
pub mod state;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::pipeline::history;
use crate::pipeline::report::RunReport;
use crate::quality::samples::RuleSample;
use crate::state::StateCode;
use crate::workbench::WorkbenchError;
pub use overview::Overview;
pub use state::StatePage;

/// Why `report` cannot render a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Workbench(#[from] WorkbenchError),
    #[error("no workbench in {0} yet: no run has been made there")]
    NoWorkbench(PathBuf),
    #[error(
        "no run {run} of {state} in the workbench history (`history --state {state}` lists them)"
    )]
    NoRun { state: StateCode, run: String },
    #[error("no run of {0} in the workbench history")]
    NoRunOfState(StateCode),
}

/// The name every state's newest page also has.
pub const LATEST: &str = "latest.html";
/// Where an all-states run's overview pages go, beside the states'.
pub const OVERVIEW_DIR: &str = "all-states";
/// Pages kept per folder (besides `latest.html`); older ones are removed,
/// and `report --run` renders any of them again.
pub const KEEP: usize = 100;

pub fn reports_dir(config: &Config) -> PathBuf {
    config.workbench.dir.join("reports")
}

/// `20261207T060000Z-<run id>.html`: sorts by time.
fn file_name(started_at: chrono::DateTime<chrono::Utc>, id: &str) -> String {
    format!("{}-{id}.html", started_at.format("%Y%m%dT%H%M%SZ"))
}

/// The state's recent runs for the charts, oldest first, ending with
/// `report` (whose row in `history` may still say `running`).
fn chart_runs(entries: Vec<history::Entry>, report: &RunReport, n: usize) -> Vec<RunReport> {
    let mut runs: Vec<RunReport> = entries
        .into_iter()
        .map(|e| e.report)
        .filter(|r| r.run_id != report.run_id && r.started_at <= report.started_at)
        .take(n.saturating_sub(1))
        .collect();
    runs.reverse();
    runs.push(report.clone());
    runs
}

/// Renders the page of a run that has just ended, from its report and
/// samples and the state's history on `conn`, and writes it with the
/// state's `latest.html`. Returns the page's path, and that of the page
/// for the bucket (the same unless the rows are withheld from it).
pub fn write_run_page(
    config: &Config,
    state: &StateCode,
    conn: &duckdb::Connection,
    report: &RunReport,
    samples: &[RuleSample],
) -> Result<(PathBuf, PathBuf), String> {
    let entries = history::read_from(
        conn,
        &config.workbench.dir,
        Some(state),
        config.report.chart_runs + 1,
    )
    .map_err(|e| e.to_string())?;
    let runs = chart_runs(entries, report, config.report.chart_runs);
    let page = |withheld| StatePage {
        report,
        history: &runs,
        samples,
        sample_rows: config.report.sample_rows,
        withheld,
    };
    let dir = reports_dir(config).join(state.as_str());
    let name = file_name(report.started_at, &report.run_id);
    let host = write_with_latest(&dir, &name, &page(false).render())?;
    if config.report.publish_samples || samples.is_empty() {
        return Ok((host.clone(), host));
    }
    // Not `.html`: the pages' pruning and listing pass it by.
    let public = dir.join(BUCKET_PAGE);
    std::fs::write(&public, page(true).render())
        .map_err(|e| format!("could not write {}: {e}", public.display()))?;
    Ok((host, public))
}

/// The last run's page as the bucket gets it, beside the state's pages.
const BUCKET_PAGE: &str = "bucket-page.tmp";

/// The page of the run `run_id` of `state` (its newest without one), from
/// the workbench alone, as the run wrote it (with the samples it kept,
/// and the charts as of its time).
pub fn render_from_history(
    config: &Config,
    state: &StateCode,
    run_id: Option<&str>,
) -> Result<String, PageError> {
    let Some(conn) = crate::workbench::open_read_only(&config.workbench)? else {
        return Err(PageError::NoWorkbench(config.workbench.dir.clone()));
    };
    let dir = &config.workbench.dir;
    // Every run of the state: the one asked for may be old.
    let entries = history::read_from(&conn, dir, Some(state), usize::MAX >> 1)?;
    let at = match run_id {
        Some(id) => entries
            .iter()
            .position(|e| e.report.run_id == id)
            .ok_or_else(|| PageError::NoRun {
                state: state.clone(),
                run: id.to_string(),
            })?,
        None if entries.is_empty() => return Err(PageError::NoRunOfState(state.clone())),
        None => 0,
    };
    let report = entries[at].report.clone();
    let samples = history::samples(&conn, dir, &report.run_id)?;
    let runs = chart_runs(entries[at..].to_vec(), &report, config.report.chart_runs);
    Ok(StatePage {
        report: &report,
        history: &runs,
        samples: &samples,
        sample_rows: config.report.sample_rows,
        withheld: false,
    }
    .render())
}

/// Writes an all-states run's overview page and its `latest.html`.
pub fn write_overview(config: &Config, overview: &Overview) -> Result<PathBuf, String> {
    let dir = reports_dir(config).join(OVERVIEW_DIR);
    write_with_latest(
        &dir,
        &file_name(overview.started_at, overview.batch_id),
        &overview.render(),
    )
}

/// A link from the overview to a state's page, relative, so that the
/// folder can be copied or served elsewhere whole.
pub fn link_from_overview(report: &RunReport) -> Option<String> {
    let name = Path::new(report.page.as_deref()?).file_name()?.to_str()?;
    Some(format!("../{}/{name}", report.state))
}

/// `html` as `dir/name` and `dir/latest.html`, each replaced whole (a
/// reader never sees half a page), then all but the newest [`KEEP`]
/// pages removed.
fn write_with_latest(dir: &Path, name: &str, html: &str) -> Result<PathBuf, String> {
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        format!("could not {what} {}: {e}", path.display())
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, e))?;
    let path = dir.join(name);
    for target in [&path, &dir.join(LATEST)] {
        let tmp = target.with_extension("html.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| fail("write", &tmp, e))?;
        f.write_all(html.as_bytes())
            .map_err(|e| fail("write", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, target).map_err(|e| fail("write", target, e))?;
    }
    prune(dir);
    Ok(path)
}

fn prune(dir: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut pages: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "html") && p.file_name().is_some_and(|n| n != LATEST)
        })
        .collect();
    pages.sort();
    let extra = pages.len().saturating_sub(KEEP);
    for old in &pages[..extra] {
        let _ = std::fs::remove_file(old);
    }
}
