//! `[[schedule]]`: which states run when, with which gates and options.
//! Parsed once at load into [`Schedule`]; `crate::schedule` computes the
//! fire times.

use serde::Deserialize;

use super::GatesConfig;
use crate::schedule::Timing;
use crate::state::StateCode;

/// One `[[schedule]]` entry as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScheduleConfig {
    states: States,
    /// 5 fields, or 6 with seconds first.
    cron: Option<String>,
    /// `hourly`, `daily` or `weekly`, instead of `cron`.
    cadence: Option<String>,
    /// IANA name; UTC when absent.
    timezone: Option<String>,
    #[serde(default)]
    link_rule: bool,
    #[serde(default)]
    catch_up: bool,
    #[serde(default)]
    gates: GatesConfig,
}

/// `states = ["WV", "PA"]`, or `states = "all"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum States {
    List(Vec<String>),
    Word(String),
}

impl Default for States {
    fn default() -> Self {
        States::List(Vec::new())
    }
}

/// One `[[schedule]]` entry, parsed, with its gates merged over `[gates]`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its place in the file, as error messages and logs name it.
    pub index: usize,
    /// The states listed; none with `states = "all"`.
    pub states: Vec<StateCode>,
    /// `states = "all"`: each fire is one all-states run (see
    /// `pipeline::all_states`).
    pub all_states: bool,
    pub timing: Timing,
    /// Turn on the `company_not_valid` rule for people.
    pub link_rule: bool,
    /// At start-up, run once if a fire time was missed while the daemon was
    /// down (judged from the workbench's run history), like systemd's
    /// `Persistent=`.
    pub catch_up: bool,
    /// `[schedule.gates]` key by key over `[gates]`: the gates its runs use.
    pub gates: GatesConfig,
}

impl ScheduleConfig {
    /// The parsed entry; the error is (key within the entry, message).
    pub(super) fn parse(
        &self,
        index: usize,
        defaults: GatesConfig,
    ) -> Result<Schedule, (String, String)> {
        let (states, all_states) = match &self.states {
            States::Word(w) if w == "all" => (Vec::new(), true),
            States::Word(w) => {
                return Err((
                    "states".into(),
                    format!("{w:?}: a list of state codes, or \"all\""),
                ))
            }
            States::List(l) if l.is_empty() => {
                return Err(("states".into(), "lists no state".into()))
            }
            States::List(l) => (
                l.iter()
                    .map(|s| StateCode::parse(s).map_err(|e| ("states".into(), e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            ),
        };
        let timing = Timing::parse(
            self.cron.as_deref(),
            self.cadence.as_deref(),
            self.timezone.as_deref(),
        )
        .map_err(|e| (e.key.to_string(), e.message))?;
        self.gates
            .check()
            .map_err(|(k, m)| (format!("gates.{k}"), m))?;
        Ok(Schedule {
            index,
            states,
            all_states,
            timing,
            link_rule: self.link_rule,
            catch_up: self.catch_up,
            gates: self.gates.over(defaults),
        })
    }
}
