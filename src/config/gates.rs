//! `[gates]` and `[schedule.gates]`: the limits a run's data must keep to
//! before it is published (`quality::gates` judges them).

use serde::{Deserialize, Serialize};

/// `[gates]` or `[schedule.gates]`. Every key is optional; a missing key in
/// a schedule falls back to `[gates]`, and a missing key there is no gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// Largest share of bad rows, for companies and for people separately
    /// (0.15 = 15 %).
    pub max_bad_ratio: Option<f64>,
    /// Largest change of total rows (companies + people) against the
    /// state's previous successful run (0.30 = ±30 %).
    pub max_row_delta: Option<f64>,
    /// Trip when any pulled row has a NULL primary key.
    pub no_null_ids: Option<bool>,
    /// Trip when a file's columns differ from those in the state's manifest
    /// in the bucket (added, removed or retyped). Reported either way.
    pub schema_change: Option<bool>,
}

impl GatesConfig {
    /// `self` (a schedule's gates) with unset keys taken from `defaults`.
    pub fn over(self, defaults: GatesConfig) -> GatesConfig {
        GatesConfig {
            max_bad_ratio: self.max_bad_ratio.or(defaults.max_bad_ratio),
            max_row_delta: self.max_row_delta.or(defaults.max_row_delta),
            no_null_ids: self.no_null_ids.or(defaults.no_null_ids),
            schema_change: self.schema_change.or(defaults.schema_change),
        }
    }

    /// Range checks; the error is (key, message) for the config's error.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(r) = self.max_bad_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(("max_bad_ratio", format!("{r} must be between 0 and 1")));
            }
        }
        if let Some(d) = self.max_row_delta {
            if !(d >= 0.0 && d.is_finite()) {
                return Err(("max_row_delta", format!("{d} must be 0 or more")));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == GatesConfig::default()
    }
}
