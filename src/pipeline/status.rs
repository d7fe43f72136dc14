//! `status`: each scheduled state's schedule, next fire, last run and
//! lease, for the operator and for monitoring. Runs and leases come from
//! PostgreSQL, which every host shares, so every host prints the same;
//! this host adds its own daemon and the audit records it has not written
//! yet. Without PostgreSQL, this host's workbench is all there is, and the
//! answer says so.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::history;
use super::report::{RunReport, RunStatus};
use crate::config::Config;
use crate::ledger::{audit, claim};
use crate::source::connect::Session;

/// The whole answer; `--json` prints it as it is.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `postgresql`, or `workbench` when PostgreSQL could not be reached.
    pub source: &'static str,
    /// Why PostgreSQL could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_error: Option<String>,
    pub host: String,
    /// Whether a daemon serves this host's workbench; `null`: unknown.
    pub daemon_running: Option<bool>,
    /// This host's runs whose audit record is not written yet.
    pub pending_audits: usize,
    pub states: Vec<StateStatus>,
}

#[derive(Debug, Serialize)]
pub struct StateStatus {
    pub state: String,
    /// `cron (time zone)`, or `all states …` for an all-states schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub next_fire: Option<DateTime<Utc>>,
    pub last_run: Option<LastRun>,
    /// Who runs the state now (host, pid, run), from the lease table.
    pub lease: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastRun {
    pub run_id: String,
    pub status: RunStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub host: Option<String>,
    /// Rows the source sent, companies and people.
    pub rows: Option<u64>,
    pub uploaded: usize,
    pub skipped: usize,
    pub audit_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LastRun {
    fn of(r: &RunReport, audit_id: Option<i64>) -> LastRun {
        LastRun {
            run_id: r.run_id.clone(),
            status: r.status,
            started_at: r.started_at,
            finished_at: r.finished_at,
            host: r.host.clone(),
            rows: match (&r.companies, &r.people) {
                (Some(c), Some(p)) => Some(c.raw + p.raw),
                _ => None,
            },
            uploaded: r.uploaded,
            skipped: r.skipped,
            audit_id,
            error: r.error.clone(),
        }
    }
}

impl Status {
    /// The worst last run: 1 when one failed or was abandoned, 3 when one
    /// was gated (and none failed), 0 otherwise.
    pub fn exit_code(&self) -> u8 {
        let statuses = || {
            self.states
                .iter()
                .filter_map(|s| s.last_run.as_ref())
                .map(|r| r.status)
        };
        if statuses().any(|s| matches!(s, RunStatus::Failed | RunStatus::Abandoned)) {
            1
        } else if statuses().any(|s| s == RunStatus::Gated) {
            3
        } else {
            0
        }
    }
}

/// Reads everything; never fails: what cannot be read is said in the answer.
pub fn read(config: &Config, now: DateTime<Utc>) -> Status {
    let never = CancellationToken::new();
    let mut session = Session::lazy(&config.source, &config.retry.single_try());
    let from_pg = audit::last_per_state(&mut session, &config.audit_table(), &never).map(|runs| {
        let leases = claim::lease_holders(&mut session, config, &never).unwrap_or_default();
        (runs, leases)
    });
    let local = history::read(config, None, usize::MAX >> 1).unwrap_or_default();
    let pending_audits = local.iter().filter(|e| e.audit_pending).count();
    let (source, postgres_error, last, leases) = match from_pg {
        Ok((runs, leases)) => {
            let last = runs
                .into_iter()
                .filter_map(|(id, details)| {
                    let r: RunReport = serde_json::from_value(details).ok()?;
                    Some((r.state.clone(), LastRun::of(&r, Some(id))))
                })
                .collect::<BTreeMap<_, _>>();
            ("postgresql", None, last, Some(leases))
        }
        Err(e) => {
            let mut last = BTreeMap::new();
            // Newest first: the first seen of a state is its last run.
            for e in local.iter().filter(|e| !e.report.dry_run) {
                last.entry(e.report.state.clone())
                    .or_insert_with(|| LastRun::of(&e.report, e.audit_id));
            }
            ("workbench", Some(e.to_string()), last, None)
        }
    };
    let mut states: BTreeMap<String, StateStatus> = BTreeMap::new();
    let mut all_states_schedule = None;
    for s in &config.schedules {
        let next = s.timing.upcoming(now, 1).first().copied();
        let spec = format!("`{}` ({})", s.timing.spec, s.timing.tz);
        if s.all_states {
            all_states_schedule = Some((format!("all states {spec}"), next));
            continue;
        }
        for state in &s.states {
            let entry = states
                .entry(state.to_string())
                .or_insert_with(|| StateStatus {
                    state: state.to_string(),
                    schedule: None,
                    next_fire: None,
                    last_run: None,
                    lease: None,
                });
            // A state in two schedules fires at the earlier of the two.
            if entry.next_fire.is_none() || next < entry.next_fire {
                entry.schedule = Some(spec.clone());
                entry.next_fire = next;
            }
        }
    }
    if let Some((spec, next)) = &all_states_schedule {
        for state in last.keys() {
            states.entry(state.clone()).or_insert_with(|| StateStatus {
                state: state.clone(),
                schedule: Some(spec.clone()),
                next_fire: *next,
                last_run: None,
                lease: None,
            });
        }
    }
    let mut last = last;
    for s in states.values_mut() {
        s.last_run = last.remove(&s.state);
        s.lease = leases
            .as_ref()
            .and_then(|l| l.iter().find(|(state, _)| *state == s.state))
            .map(|(_, holder)| holder.clone());
    }
    Status {
        source,
        postgres_error,
        host: claim::holder().0,
        daemon_running: crate::workbench::presence::daemon_running(&config.workbench.dir),
        pending_audits,
        states: states.into_values().collect(),
    }
}

/// The table `status` prints.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    if let Some(e) = &s.postgres_error {
        out.push_str(&format!(
            "PostgreSQL could not be read ({e}): this host's runs only, no leases\n"
        ));
    }
    let daemon = match s.daemon_running {
        Some(true) => "running",
        Some(false) => "not running",
        None => "unknown",
    };
    out.push_str(&format!(
        "host {}: daemon {daemon}, {} audit record(s) not written yet\n",
        s.host, s.pending_audits
    ));
    out.push_str(&format!(
        "{:<5} {:<20} {:<9} {:<19} {:<16} {:>9} {:>7}  {}\n",
        "STATE", "NEXT FIRE (UTC)", "LAST", "STARTED (UTC)", "HOST", "ROWS", "UP/SKIP", "NOW"
    ));
    let t = |d: &DateTime<Utc>| d.format("%Y-%m-%d %H:%M:%S").to_string();
    for st in &s.states {
        let r = st.last_run.as_ref();
        out.push_str(&format!(
            "{:<5} {:<20} {:<9} {:<19} {:<16} {:>9} {:>7}  {}\n",
            st.state,
            st.next_fire.as_ref().map(t).unwrap_or_else(|| "-".into()),
            r.map(|r| r.status.as_str()).unwrap_or("-"),
            r.map(|r| t(&r.started_at)).unwrap_or_else(|| "-".into()),
            r.and_then(|r| r.host.clone()).unwrap_or_else(|| "-".into()),
            r.and_then(|r| r.rows)
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            r.map(|r| format!("{}/{}", r.uploaded, r.skipped))
                .unwrap_or_else(|| "-".into()),
            st.lease
                .as_deref()
                .map(|l| format!("running: {l}"))
                .unwrap_or_default(),
        ));
        if let Some(e) = r.and_then(|r| r.error.as_deref()) {
            out.push_str(&format!("      {e}\n"));
        }
    }
    if s.states.is_empty() {
        out.push_str("no scheduled state and no run recorded\n");
    }
    out
}
