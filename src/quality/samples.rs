//! A few of the rows each rule caught, for the report page: the key and the
//! columns the rule reads, as text. They may hold personal data, so they
//! are kept in the workbench only (never in the audit record), and
//! `[report] sample_rows = 0` turns them off.

use serde::{Deserialize, Serialize};

use crate::config::quote_ident;
use crate::config::Severity;
use crate::ident::quote_literal;
use crate::names::{Entity, FileKind};
use crate::quality::rules::Rule;

/// The rows one rule caught, at most `sample_rows` of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSample {
    pub entity: Entity,
    pub code: String,
    pub severity: Severity,
    /// The key first, then the columns the condition names.
    pub columns: Vec<String>,
    /// One value per column; `None` for NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

/// The columns of `columns` that `condition` names, in the table's order.
/// String literals are skipped, so `email LIKE '%title%'` reads `email`
/// only. A name that only looks like a column (a function of the same
/// name) is shown too: one column more in a sample does no harm.
pub fn columns_read(condition: &str, columns: &[String]) -> Vec<String> {
    let mut named = Vec::new();
    let mut chars = condition.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // To the closing quote ('' inside is one quote: the loop
                // sees it as a closing and a new opening).
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                }
            }
            '"' => {
                let mut name = String::new();
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    name.push(c);
                }
                named.push(name);
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = c.to_string();
                while let Some(&n) = chars.peek() {
                    if !(n.is_alphanumeric() || n == '_') {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                named.push(word.to_lowercase());
            }
            _ => {}
        }
    }
    columns
        .iter()
        .filter(|col| named.iter().any(|n| n == *col || *n == col.to_lowercase()))
        .cloned()
        .collect()
}

/// Up to `limit` rows of each rule in `rules` that caught any, read from
/// the state's views (`<schema>.companies_good`/`_bad`), by key. Error
/// rules read the bad rows; warning rules both.
pub fn collect(
    duck: &duckdb::Connection,
    schema: &str,
    entity: Entity,
    key: &str,
    rules: &[Rule],
    caught: impl Fn(&str) -> u64,
    limit: usize,
) -> Result<Vec<RuleSample>, duckdb::Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let table = |kind| {
        format!(
            "{}.{}",
            quote_ident(schema),
            quote_ident(&entity.table(kind))
        )
    };
    let mut describe = duck.prepare(&format!("DESCRIBE {}", table(FileKind::Bad)))?;
    let all: Vec<String> = describe
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    let mut samples = Vec::new();
    for rule in rules.iter().filter(|r| caught(&r.code) > 0) {
        let mut columns = vec![key.to_string()];
        columns.extend(
            columns_read(&rule.condition, &all)
                .into_iter()
                .filter(|c| c != key),
        );
        let list = columns
            .iter()
            .map(|c| format!("CAST({} AS VARCHAR)", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let code = quote_literal(&rule.code);
        // The bad file is in key order already; a warning's rows come from
        // both files, sorted again.
        let from = match rule.severity {
            Severity::Error => format!(
                "{} WHERE list_contains(validation_errors, {code})",
                table(FileKind::Bad)
            ),
            Severity::Warn => format!(
                "(SELECT * EXCLUDE (validation_errors) FROM {bad} UNION ALL BY NAME
                  SELECT * FROM {good}) WHERE list_contains(validation_warnings, {code})
                 ORDER BY {}",
                quote_ident(key),
                bad = table(FileKind::Bad),
                good = table(FileKind::Good),
            ),
        };
        let mut stmt = duck.prepare(&format!("SELECT {list} FROM {from} LIMIT {limit}"))?;
        let n = columns.len();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect::<Result<Vec<_>, _>>()
            })?
            .collect::<Result<Vec<_>, _>>()?;
        samples.push(RuleSample {
            entity,
            code: rule.code.clone(),
            severity: rule.severity,
            columns,
            rows,
        });
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_columns_a_condition_names_not_its_literals() {
        let all = cols(&["company_id", "email", "title", "website_url", "Odd Name"]);
        assert_eq!(
            columns_read(
                r"email IS NULL OR NOT regexp_matches(email, '^title@')",
                &all
            ),
            cols(&["email"])
        );
        assert_eq!(
            columns_read(
                "split_part(WEBSITE_URL, '.', 2) <> split_part(email, '@', 2)",
                &all
            ),
            cols(&["email", "website_url"])
        );
        assert_eq!(
            columns_read(r#""Odd Name" = 'it''s title'"#, &all),
            cols(&["Odd Name"])
        );
        assert!(columns_read("count(*) OVER () > 1", &all).is_empty());
    }
}
