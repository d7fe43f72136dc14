//! Quality gates (SPEC step 7): the kill switches between export and
//! publish. Data that looks wrong (too many bad rows, a state that suddenly
//! shrank or grew, rows without a key) must not replace the good files in
//! the bucket. A tripped gate stops the run before publishing; the local
//! exports stay for someone to look at, and `run --force` publishes anyway.
//!
//! Gates are off unless configured: `[gates]` gives defaults, and a
//! `[schedule.gates]` table overrides them key by key for its states.

use serde::{Deserialize, Serialize};

pub use crate::config::GatesConfig;

use crate::names::Entity;
use crate::quality::validate::EntityCounts;

/// One gate's verdict, as the summary, the audit and `history` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// `max_bad_ratio.companies`, `max_row_delta`, `no_null_ids`, ...
    pub gate: String,
    /// The configured limit.
    pub limit: f64,
    /// What this run measured (a ratio, or a count of NULL keys).
    pub value: f64,
    pub tripped: bool,
    /// The figures behind `value`, in words.
    pub detail: String,
}

impl GateResult {
    /// `max_bad_ratio.people: 0.412 > 0.15 (61800 of 150000 rows bad)`.
    pub fn describe(&self) -> String {
        let cmp = if self.tripped { ">" } else { "<=" };
        format!(
            "{}: {} {cmp} {} ({})",
            self.gate,
            trim_float(self.value),
            trim_float(self.limit),
            self.detail
        )
    }
}

fn trim_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// The previous successful run of the state, for `max_row_delta`.
#[derive(Debug, Clone)]
pub struct Previous {
    pub run_id: String,
    pub rows: u64,
}

/// Evaluates every configured gate. `previous` is `None` for a state's
/// first run; `max_row_delta` then has nothing to compare with and passes,
/// saying so.
pub fn evaluate(
    gates: &GatesConfig,
    companies: &EntityCounts,
    people: &EntityCounts,
    previous: Option<&Previous>,
) -> Vec<GateResult> {
    let mut out = Vec::new();
    if let Some(limit) = gates.max_bad_ratio {
        for (name, c) in Entity::ALL.into_iter().zip([companies, people]) {
            let ratio = if c.raw == 0 {
                0.0
            } else {
                c.bad as f64 / c.raw as f64
            };
            out.push(GateResult {
                gate: format!("max_bad_ratio.{name}"),
                limit,
                value: ratio,
                tripped: ratio > limit,
                detail: format!("{} of {} rows bad", c.bad, c.raw),
            });
        }
    }
    if let Some(limit) = gates.max_row_delta {
        let now = companies.raw + people.raw;
        let (value, detail) = match previous {
            None => (
                0.0,
                format!("{now} rows; no previous successful run of this state to compare with"),
            ),
            Some(p) if p.rows == 0 => (
                0.0,
                format!(
                    "{now} rows; previous successful run {} had none, nothing to compare with",
                    p.run_id
                ),
            ),
            Some(p) => (
                (now as f64 - p.rows as f64).abs() / p.rows as f64,
                format!(
                    "{now} rows against {} in previous successful run {}",
                    p.rows, p.run_id
                ),
            ),
        };
        out.push(GateResult {
            gate: "max_row_delta".into(),
            limit,
            value,
            tripped: value > limit,
            detail,
        });
    }
    if gates.no_null_ids == Some(true) {
        let nulls = companies.null_keys + people.null_keys;
        out.push(GateResult {
            gate: "no_null_ids".into(),
            limit: 0.0,
            value: nulls as f64,
            tripped: nulls > 0,
            detail: format!(
                "{} companies and {} people without a primary key",
                companies.null_keys, people.null_keys
            ),
        });
    }
    out
}

/// The `schema_change` gate's verdict on `changes`, each described in
/// words (see `manifest::drift`), when the gate is on.
pub fn schema_gate(gates: &GatesConfig, changes: &[String]) -> Option<GateResult> {
    (gates.schema_change == Some(true)).then(|| GateResult {
        gate: "schema_change".into(),
        limit: 0.0,
        value: changes.len() as f64,
        tripped: !changes.is_empty(),
        detail: if changes.is_empty() {
            "same columns as the manifest in the bucket".into()
        } else {
            changes.join("; ")
        },
    })
}

/// The reason a run stops, or `None` when no gate tripped.
pub fn reason(results: &[GateResult]) -> Option<String> {
    let tripped: Vec<String> = results
        .iter()
        .filter(|g| g.tripped)
        .map(GateResult::describe)
        .collect();
    (!tripped.is_empty()).then(|| format!("quality gate tripped: {}", tripped.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(raw: u64, bad: u64, null_keys: u64) -> EntityCounts {
        EntityCounts {
            raw,
            good: raw - bad,
            bad,
            null_keys,
            errors: Default::default(),
            warnings: Default::default(),
        }
    }

    #[test]
    fn no_gate_unless_configured() {
        let r = evaluate(
            &GatesConfig::default(),
            &counts(10, 10, 10),
            &counts(10, 10, 10),
            None,
        );
        assert!(r.is_empty());
        assert_eq!(reason(&r), None);
    }

    #[test]
    fn bad_ratio_per_entity() {
        let g = GatesConfig {
            max_bad_ratio: Some(0.15),
            ..Default::default()
        };
        let r = evaluate(&g, &counts(100, 15, 0), &counts(100, 16, 0), None);
        assert!(!r[0].tripped, "15 % is allowed");
        assert!(r[1].tripped);
        let why = reason(&r).unwrap();
        assert!(
            why.contains("max_bad_ratio.people: 0.16 > 0.15 (16 of 100 rows bad)"),
            "{why}"
        );
        // An empty state has no bad rows.
        let r = evaluate(&g, &counts(0, 0, 0), &counts(0, 0, 0), None);
        assert!(r.iter().all(|g| !g.tripped));
    }

    #[test]
    fn row_delta_both_ways_and_first_run() {
        let g = GatesConfig {
            max_row_delta: Some(0.30),
            ..Default::default()
        };
        let prev = |rows| Previous {
            run_id: "r0".into(),
            rows,
        };
        let c = counts(50, 0, 0);
        let p = counts(150, 0, 0);
        assert!(!evaluate(&g, &c, &p, Some(&prev(200)))[0].tripped);
        assert!(evaluate(&g, &c, &p, Some(&prev(400)))[0].tripped, "halved");
        assert!(evaluate(&g, &c, &p, Some(&prev(100)))[0].tripped, "doubled");
        let first = &evaluate(&g, &c, &p, None)[0];
        assert!(!first.tripped && first.detail.contains("no previous"));
        assert!(!evaluate(&g, &c, &p, Some(&prev(0)))[0].tripped);
    }

    #[test]
    fn null_ids_and_override() {
        let defaults = GatesConfig {
            max_bad_ratio: Some(0.1),
            no_null_ids: Some(true),
            ..Default::default()
        };
        let sched = GatesConfig {
            no_null_ids: Some(false),
            max_row_delta: Some(0.5),
            ..Default::default()
        };
        let g = sched.over(defaults);
        assert_eq!(g.max_bad_ratio, Some(0.1));
        assert_eq!(g.no_null_ids, Some(false));
        assert_eq!(g.max_row_delta, Some(0.5));
        let r = evaluate(&defaults, &counts(5, 0, 1), &counts(5, 0, 0), None);
        assert!(r.iter().any(|g| g.gate == "no_null_ids" && g.tripped));
        assert!(GatesConfig {
            max_bad_ratio: Some(1.5),
            ..Default::default()
        }
        .check()
        .is_err());
    }
}
