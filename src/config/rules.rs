//! `[rules]`: the validation rules a user sets, and the production
//! defaults. Their SQL is checked by `quality::rules`, which has DuckDB.

use serde::{Deserialize, Serialize};

use crate::names::Entity;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub code: String,
    pub condition: String,
    /// `error` (the default): a failing row is bad. `warn`: a failing row
    /// is counted and carries the code in `validation_warnings`, but a
    /// warning alone does not make it bad.
    #[serde(default, skip_serializing_if = "Severity::is_error")]
    pub severity: Severity,
    /// What a failing row means, in words for the data's owner (the report
    /// page shows it beside the code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How to fix a failing row at the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Error,
    Warn,
}

impl Rule {
    /// Whether the condition reads other rows than the one it judges: a
    /// window function, `… OVER (…)`, evaluated over every row of the
    /// state. (A literal that spells `over (` counts too: it only costs the
    /// rule the whole-state way of evaluating.)
    pub fn reads_the_state(&self) -> bool {
        let c = self.condition.to_ascii_lowercase();
        let b = c.as_bytes();
        c.match_indices("over").any(|(i, _)| {
            let word_starts = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
            word_starts && c[i + 4..].trim_start().starts_with('(')
        })
    }
}

impl Severity {
    pub fn is_error(&self) -> bool {
        *self == Severity::Error
    }
}

pub(crate) fn rule(code: &str, condition: &str) -> Rule {
    Rule {
        code: code.into(),
        condition: condition.into(),
        severity: Severity::Error,
        description: None,
        fix: None,
    }
}

/// A production rule, with its words for the report page.
fn explained(code: &str, condition: &str, description: &str, fix: &str) -> Rule {
    Rule {
        description: Some(description.into()),
        fix: Some(fix.into()),
        ..rule(code, condition)
    }
}

/// `[rules]`: one list per entity. A list left out gets the production
/// rules; a list given replaces them (an empty list validates nothing).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub companies: Vec<Rule>,
    pub people: Vec<Rule>,
}

impl RulesConfig {
    /// `entity`'s rules, in the order they are listed.
    pub fn of(&self, entity: Entity) -> &[Rule] {
        match entity {
            Entity::Companies => &self.companies,
            Entity::People => &self.people,
        }
    }
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            companies: default_company_rules(),
            people: default_people_rules(),
        }
    }
}

/// The code the optional link rule reports; not usable by a configured rule.
pub const LINK_RULE_CODE: &str = "company_not_valid";

/// The production rules for companies (SPEC step 3), in reporting order.
pub fn default_company_rules() -> Vec<Rule> {
    vec![
        explained(
            "company_name_missing",
            "company_name IS NULL",
            "The company has no name.",
            "Fill company_name at the source.",
        ),
        explained(
            "website_url_missing",
            "website_url IS NULL",
            "The company has no website.",
            "Fill website_url with the company's domain (example.com).",
        ),
        explained(
            "website_url_invalid",
            "website_url IS NOT NULL AND website_url NOT LIKE '%.%'",
            "The website has no dot, so it names no domain (placeholders such as 'n/a' or 'none').",
            "Set website_url to the company's domain, or to NULL when it is not known.",
        ),
    ]
}

/// The production rules for people. `regexp_matches` is a partial match, so
/// `^` anchors it at the start exactly as PostgreSQL's `~` did; DuckDB string
/// literals do not process backslashes, so `\.` is one backslash.
pub fn default_people_rules() -> Vec<Rule> {
    vec![
        explained(
            "email_invalid",
            r"email IS NULL OR NOT regexp_matches(email, '^[^@]+@[^@]+\.[^@]+')",
            "The e-mail address is missing, or not shaped like name@domain.tld.",
            "Correct or fill email at the source; outreach cannot reach this person.",
        ),
        explained(
            "title_missing",
            "title IS NULL",
            "The person has no job title.",
            "Fill title at the source.",
        ),
    ]
}
