//! What a run returns: counts, files, objects, timings, outcome. The same
//! value becomes the audit `details` JSON, the workbench `runs.report`, and
//! the CLI's summary, so the three never disagree.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::bucket::publish::PublishedObject;
use crate::error::PipelineError;
use crate::files::ExportedFile;
use crate::names::{Entity, PublishAction};
use crate::quality::gates::GateResult;
pub use crate::quality::validate::EntityCounts;
use crate::state::StateCode;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    #[default]
    Running,
    Success,
    Failed,
    Cancelled,
    /// Another run holds the state, or another host claimed the fire time;
    /// nothing was done or audited.
    Skipped,
    /// A quality gate tripped: exported locally, nothing published.
    Gated,
    /// The process running it died (kill -9, power loss); found at the
    /// next start, in the workbench.
    Abandoned,
}

impl RunStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Skipped => "skipped",
            RunStatus::Gated => "gated",
            RunStatus::Abandoned => "abandoned",
        }
    }

    /// The status named `name` (as `as_str` and serde spell it).
    pub fn from_name(name: &str) -> Option<RunStatus> {
        serde_json::from_value(serde_json::Value::from(name)).ok()
    }
}

/// Seconds spent in each stage; `None` for a stage that did not run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageTimes {
    pub pull: Option<f64>,
    pub validate: Option<f64>,
    pub export: Option<f64>,
    pub publish: Option<f64>,
    pub audit: Option<f64>,
    /// The report page: its failing-row samples and the page itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<f64>,
}

/// One run's record: what `run` prints, the audit `details`, the
/// workbench's `runs.report` and what `history` shows again. Read back,
/// keys a report of an older version lacks take their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunReport {
    pub run_id: String,
    pub state: String,
    pub status: RunStatus,
    pub dry_run: bool,
    /// The all-states run this run was part of: its runs share the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The host the run ran on (the audit is shared by every host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The schedule's fire time this run was for; none for a one-off run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fire_time: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    /// When the run took the state's lease, after its checks (which take
    /// none): from here to the audit no other run of the state works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_acquired_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<f64>,
    pub companies: Option<EntityCounts>,
    pub people: Option<EntityCounts>,
    pub text_fallbacks: Vec<String>,
    pub files: Vec<ExportedFile>,
    pub objects: Vec<PublishedObject>,
    pub uploaded: usize,
    pub skipped: usize,
    pub stages: StageTimes,
    /// Every configured gate's verdict, tripped or not.
    pub gates: Vec<GateResult>,
    /// `run --force`: published although a gate tripped.
    pub forced: bool,
    /// Columns added, removed or retyped since the bucket's manifest.
    pub schema_changes: Vec<crate::bucket::manifest::SchemaChange>,
    /// The run of the bucket's manifest the columns were compared with;
    /// `""` when the bucket had none; `None` when nothing was compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_compared: Option<String>,
    /// The rules the run judged by, with their words for the page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleNote>,
    /// This publish's change sets, one per entity that changed (none on a
    /// new baseline, or when nothing changed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<crate::files::changes::ChangeFile>,
    /// The run of the snapshot the change sets are relative to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes_base_run_id: Option<String>,
    /// Why this publish wrote no change set and starts a new baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes_baseline: Option<String>,
    /// Multipart uploads under the state's prefix left unfinished for more
    /// than a day (by a crash, another tool) and aborted by this run.
    #[serde(default)]
    pub stale_uploads_aborted: Vec<String>,
    /// `written s3://…/_manifest.json` or `unchanged …`; none when the run
    /// did not get that far.
    pub manifest: Option<String>,
    /// The run's report page in the workbench (`[report]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    pub error: Option<String>,
    /// Not part of the audit record (it is written before the id exists).
    #[serde(skip)]
    pub audit_id: Option<i64>,
    #[serde(skip)]
    pub audit_error: Option<String>,
    /// Runs of dead processes this run found still `running` in the
    /// workbench and marked abandoned (their records go to the audit with
    /// this run's): the daemon tells the webhooks.
    #[serde(skip)]
    pub abandoned_found: Vec<crate::workbench::AbandonedRun>,
    /// Where a corrupt state file this run found as it opened it was set
    /// aside: the daemon tells the webhooks.
    #[serde(skip)]
    pub state_file_set_aside: Option<crate::workbench::SetAside>,
}

/// A rule as the run's page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleNote {
    pub entity: Entity,
    pub code: String,
    pub condition: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl RuleNote {
    pub fn of(entity: Entity, r: &crate::config::Rule) -> RuleNote {
        RuleNote {
            entity,
            code: r.code.clone(),
            condition: r.condition.clone(),
            description: r.description.clone(),
            fix: r.fix.clone(),
        }
    }
}

impl RunReport {
    pub fn new(state: &StateCode, dry_run: bool) -> Self {
        RunReport {
            run_id: uuid::Uuid::new_v4().to_string(),
            state: state.to_string(),
            status: RunStatus::Running,
            dry_run,
            batch_id: None,
            host: Some(crate::ledger::claim::holder().0),
            fire_time: None,
            started_at: Utc::now(),
            lease_acquired_at: None,
            finished_at: None,
            duration_secs: None,
            companies: None,
            people: None,
            text_fallbacks: Vec::new(),
            files: Vec::new(),
            objects: Vec::new(),
            uploaded: 0,
            skipped: 0,
            stages: StageTimes::default(),
            gates: Vec::new(),
            forced: false,
            schema_changes: Vec::new(),
            manifest_compared: None,
            rules: Vec::new(),
            changes: Vec::new(),
            changes_base_run_id: None,
            changes_baseline: None,
            stale_uploads_aborted: Vec::new(),
            manifest: None,
            page: None,
            error: None,
            audit_id: None,
            audit_error: None,
            abandoned_found: Vec::new(),
            state_file_set_aside: None,
        }
    }

    pub(crate) fn finish(&mut self, error: Option<&PipelineError>) {
        let now = Utc::now();
        self.finished_at = Some(now);
        self.duration_secs = Some((now - self.started_at).num_milliseconds() as f64 / 1000.0);
        self.uploaded = self
            .objects
            .iter()
            .filter(|o| o.action == PublishAction::Uploaded)
            .count();
        self.skipped = self
            .objects
            .iter()
            .filter(|o| o.action == PublishAction::Skipped)
            .count();
        self.status = match error {
            None => RunStatus::Success,
            Some(PipelineError::Cancelled) => RunStatus::Cancelled,
            Some(PipelineError::StateBusy(_) | PipelineError::FireClaimed(_)) => RunStatus::Skipped,
            Some(PipelineError::Gated(_)) => RunStatus::Gated,
            Some(_) => RunStatus::Failed,
        };
        self.error = error.map(|e| e.to_string());
    }

    /// `entity`'s counts, once validated.
    pub fn counts(&self, entity: Entity) -> Option<&EntityCounts> {
        match entity {
            Entity::Companies => self.companies.as_ref(),
            Entity::People => self.people.as_ref(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("report is plain data")
    }

    /// A run counts as successful only if its audit record was written too
    /// (dry runs write none).
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Success && self.audit_error.is_none()
    }

    /// Rows the run pulled, companies and people.
    pub fn rows_pulled(&self) -> u64 {
        [&self.companies, &self.people]
            .iter()
            .filter_map(|c| c.as_ref().map(|c| c.raw))
            .sum()
    }

    /// The few lines a person reads after `run`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "run {} state {}: {}{}",
            self.run_id,
            self.state,
            self.status.as_str(),
            if self.dry_run { " (dry run)" } else { "" }
        );
        for entity in Entity::ALL {
            if let Some(c) = self.counts(entity) {
                let name = entity.as_str();
                let errs: Vec<String> = c
                    .errors
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k}={n}"))
                    .chain(
                        c.warnings
                            .iter()
                            .filter(|(_, n)| **n > 0)
                            .map(|(k, n)| format!("warn:{k}={n}")),
                    )
                    .collect();
                let _ = writeln!(
                    s,
                    "  {name:<9} {:>9} pulled {:>9} good {:>9} bad  {}",
                    c.raw,
                    c.good,
                    c.bad,
                    errs.join(" ")
                );
            }
        }
        for f in &self.files {
            let action = self
                .objects
                .iter()
                .find(|o| o.table_name == f.table_name)
                .map(|o| format!("{} {}", o.action, o.url))
                .unwrap_or_else(|| "not published".into());
            let _ = writeln!(
                s,
                "  {:<15} {:>10} bytes  sha256 {}…  {action}",
                f.table_name,
                f.bytes,
                &f.sha256[..12]
            );
        }
        if self.status == RunStatus::Gated {
            let _ = writeln!(s, "  nothing published: a quality gate tripped");
        } else if !self.objects.is_empty() || !self.dry_run {
            let _ = writeln!(s, "  uploaded {}, skipped {}", self.uploaded, self.skipped);
        }
        for c in &self.changes {
            let _ = writeln!(
                s,
                "  changes {:<9} {} added, {} changed, {} removed",
                c.entity.as_str(),
                c.added,
                c.changed,
                c.removed
            );
        }
        if let Some(why) = &self.changes_baseline {
            let _ = writeln!(s, "  no change set, a new baseline: {why}");
        }
        let st = &self.stages;
        let stages: Vec<String> = [
            ("pull", st.pull),
            ("validate", st.validate),
            ("export", st.export),
            ("publish", st.publish),
            ("audit", st.audit),
            ("report", st.report),
        ]
        .iter()
        .filter_map(|(n, t)| t.map(|t| format!("{n} {t:.2}s")))
        .collect();
        let _ = writeln!(
            s,
            "  time {:.2}s: {}",
            self.duration_secs.unwrap_or_default(),
            stages.join(", ")
        );
        for g in &self.gates {
            let verdict = match (g.tripped, self.forced) {
                (false, _) => "ok",
                (true, false) => "TRIPPED",
                (true, true) => "TRIPPED, published anyway (--force)",
            };
            let _ = writeln!(s, "  gate {}: {verdict}", g.describe());
        }
        for c in &self.schema_changes {
            let _ = writeln!(s, "  schema changed: {}", c.describe());
        }
        for line in &self.stale_uploads_aborted {
            let _ = writeln!(s, "  {line}");
        }
        if let Some(m) = &self.manifest {
            let _ = writeln!(s, "  manifest {m}");
        }
        if let Some(p) = &self.page {
            let _ = writeln!(s, "  report page {p}");
        }
        if !self.text_fallbacks.is_empty() {
            let _ = writeln!(s, "  carried as text: {}", self.text_fallbacks.join(", "));
        }
        match (self.audit_id, &self.audit_error) {
            (Some(id), _) => {
                let _ = writeln!(s, "  audit id {id}");
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "  audit NOT written: {e}");
            }
            _ => {}
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  error: {e}");
        }
        if let Some(aside) = &self.state_file_set_aside {
            let _ = writeln!(
                s,
                "  the workbench's state file was corrupt ({}): set aside as {}, a new one started",
                aside.error,
                aside.set_aside_as.display()
            );
        }
        for a in &self.abandoned_found {
            let _ = writeln!(
                s,
                "  found run {} of {} left running by a process that stopped: recorded as abandoned",
                a.run_id, a.state
            );
        }
        s
    }
}
