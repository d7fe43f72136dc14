//! US state and territory codes.
//!
//! A state code ends up in file paths, object keys and DuckDB schema names, so
//! it is checked against this closed list before it reaches any of them. It is
//! still sent to PostgreSQL as a bind parameter; the list is about paths and
//! identifiers, not about SQL injection.

use std::fmt;

/// The 50 states, DC, and the inhabited territories plus military "states".
const CODES: &[&str] = &[
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS",
    "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY",
    "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV",
    "WI", "WY", "DC", "PR", "GU", "VI", "AS", "MP", "UM", "AA", "AE", "AP",
];

/// A validated, upper-case US state or territory code such as `WV`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateCode(String);

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a US state or territory code (expected two letters such as WV, PA or DC)")]
pub struct InvalidState(pub String);

impl StateCode {
    /// Accepts any case (`wv`, `Wv`), stores upper case.
    pub fn parse(s: &str) -> Result<Self, InvalidState> {
        let upper = s.trim().to_ascii_uppercase();
        if CODES.contains(&upper.as_str()) {
            Ok(StateCode(upper))
        } else {
            Err(InvalidState(s.to_string()))
        }
    }

    /// Upper case, as stored in the source table (`WV`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lower case, as used in paths, object keys and DuckDB schema names (`wv`).
    pub fn lower(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for StateCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for StateCode {
    type Err = InvalidState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StateCode::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_case_and_rejects_unknown() {
        assert_eq!(StateCode::parse("wv").unwrap().as_str(), "WV");
        assert_eq!(StateCode::parse("Pa").unwrap().lower(), "pa");
        assert!(StateCode::parse("XX").is_err());
        assert!(StateCode::parse("WV'; DROP TABLE x; --").is_err());
        assert!(StateCode::parse("").is_err());
    }
}
