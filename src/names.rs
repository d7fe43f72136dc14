//! The fixed vocabulary of a run: the two entities, the two kinds of file
//! each gets, and what publishing did with a file. Serialized as the
//! lower-case words the audit JSON, `history` and the metrics have always
//! used (`companies`, `good`, `uploaded`).

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    Companies,
    People,
}

impl Entity {
    /// In the order a run pulls, validates and exports them.
    pub const ALL: [Entity; 2] = [Entity::Companies, Entity::People];

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Companies => "companies",
            Entity::People => "people",
        }
    }

    /// Its workbench table of pulled rows.
    pub fn raw_table(self) -> &'static str {
        match self {
            Entity::Companies => "companies_raw",
            Entity::People => "people_raw",
        }
    }

    /// Its workbench table (and file stem) of `kind`, `companies_good`.
    pub fn table(self, kind: FileKind) -> String {
        format!("{self}_{kind}")
    }
}

/// Rows that passed every rule, or failed at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Good,
    Bad,
}

impl FileKind {
    pub const ALL: [FileKind; 2] = [FileKind::Good, FileKind::Bad];

    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Good => "good",
            FileKind::Bad => "bad",
        }
    }
}

/// What publishing did with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishAction {
    /// Sent, and read back.
    Uploaded,
    /// The bucket already held these bytes.
    Skipped,
}

impl PublishAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishAction::Uploaded => "uploaded",
            PublishAction::Skipped => "skipped",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Entity, FileKind, PublishAction);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialized_as_the_words_the_audit_always_had() {
        let v = serde_json::json!([Entity::People, FileKind::Bad, PublishAction::Uploaded]);
        assert_eq!(v, serde_json::json!(["people", "bad", "uploaded"]));
        assert_eq!(Entity::Companies.to_string(), "companies");
    }
}
