//! Validation rules: what they are, the production defaults, and how they
//! are checked before any run uses them.
//!
//! A rule is a code and a DuckDB boolean that is TRUE for a failing row
//! (`validate.rs` applies them). Rules come from `[rules]` in the config, so
//! a typo in one must be caught when the service starts, not at 06:00 in the
//! middle of a run. Two checks, both run by a [`Checker`], a private
//! in-memory DuckDB:
//! - [`Checker::syntax`] needs no database: it refuses what DuckDB cannot
//!   parse, and more than one statement (a rule is pasted into SQL).
//! - [`Checker::columns`] binds each rule against the source table's real
//!   columns and types, so an unknown column or a non-boolean condition is
//!   refused with the rule's name and the column's.

use std::sync::Mutex;

use duckdb::Connection;

use crate::config::quote_ident;
pub use crate::error::RuleError;
use crate::names::{Entity, FileKind};
use crate::source::pgtypes::{column_defs, ColType};
use crate::source::pull as source;

use crate::config::rule;
pub use crate::config::{
    default_company_rules, default_people_rules, Rule, RulesConfig, LINK_RULE_CODE,
};

/// [`Config::load`] for the commands that run or check rules (and the
/// daemon's SIGHUP): a rule DuckDB cannot parse refuses the file too.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<crate::config::Config> {
    let config = crate::config::Config::load(path)?;
    check_syntax(&config.rules).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(config)
}

/// Refuses `[rules]` DuckDB cannot parse, before anything runs them: the
/// commands that run or check rules call it when they load the config (and
/// the daemon on SIGHUP), while `schedule` and `history` start no DuckDB.
pub fn check_syntax(rules: &RulesConfig) -> Result<(), RuleError> {
    Checker::with(|checker| {
        Entity::ALL
            .into_iter()
            .try_for_each(|e| checker.syntax(e.as_str(), rules.of(e)))
    })
}

/// The optional link rule: a person whose company is not good is bad.
pub fn company_not_valid_rule(schema: &str, link_column: &str, company_key: &str) -> Rule {
    let link = rule(
        LINK_RULE_CODE,
        &format!(
            "NOT coalesce({link} IN (SELECT {key} FROM {s}.{good}), false)",
            link = quote_ident(link_column),
            key = quote_ident(company_key),
            s = quote_ident(schema),
            good = quote_ident(&Entity::Companies.table(FileKind::Good)),
        ),
    );
    Rule {
        description: Some(
            "The person's company is bad, or is not in the state's companies.".into(),
        ),
        fix: Some(
            "Fix the company's row first (see the companies' rules), or the person's company id."
                .into(),
        ),
        ..link
    }
}

const NO_AGGREGATE: &str = "an aggregate judges no single row; to compare a row with the rest of \
     the state use a window function, e.g. `count(*) OVER (PARTITION BY lower(email)) > 1`";

fn rule_error(entity: &str, index: usize, code: &str, message: impl Into<String>) -> RuleError {
    RuleError {
        entity: entity.into(),
        index,
        code: code.into(),
        message: message.into(),
    }
}

/// What serde cannot check: codes are unique lower-case words (they become
/// Parquet values and audit keys) and conditions are not empty.
pub fn check_shape(entity: &str, rules: &[Rule]) -> Result<(), RuleError> {
    for (i, r) in rules.iter().enumerate() {
        let word = !r.code.is_empty()
            && r.code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !word {
            return Err(rule_error(
                entity,
                i,
                &r.code,
                "code must be lower-case letters, digits and `_`",
            ));
        }
        if r.code == LINK_RULE_CODE {
            return Err(rule_error(
                entity,
                i,
                &r.code,
                "this code belongs to the link rule; switch it on with `link_rule = true` in a [[schedule]]",
            ));
        }
        if rules[..i].iter().any(|o| o.code == r.code) {
            return Err(rule_error(entity, i, &r.code, "code is used twice"));
        }
        if r.condition.trim().is_empty() {
            return Err(rule_error(entity, i, &r.code, "condition is empty"));
        }
    }
    Ok(())
}

/// DuckDB's messages end with a caret diagram over several lines; the first
/// line says it.
fn first_line(e: &duckdb::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

static SHARED: Mutex<Option<Checker>> = Mutex::new(None);

/// A private in-memory DuckDB that rules are parsed and bound in; one
/// serves every entity of a check.
pub struct Checker {
    db: Connection,
}

impl Checker {
    pub fn new() -> Result<Checker, RuleError> {
        let open = || -> duckdb::Result<Connection> {
            let db = Connection::open_in_memory()?;
            db.execute_batch("SET autoinstall_known_extensions = false; SET threads = 1;")?;
            Ok(db)
        };
        open().map(|db| Checker { db }).map_err(|e| {
            rule_error(
                "*",
                0,
                "",
                format!("cannot open DuckDB to check the rules: {e}"),
            )
        })
    }

    /// Runs `f` with this process's checker, opened on first use. Opening
    /// DuckDB costs ~40 ms, and a run used to pay it twice before its first
    /// row: at the config load and at the check against the source.
    pub fn with<T>(f: impl FnOnce(&Checker) -> Result<T, RuleError>) -> Result<T, RuleError> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if shared.is_none() {
            *shared = Some(Checker::new()?);
        }
        f(shared.as_ref().expect("opened above"))
    }

    /// Closes this process's checker: the daemon calls it when a run or
    /// its start-up is over, so that no DuckDB instance (its memory, its
    /// threads) stays open between fires.
    pub fn release() {
        SHARED.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Checks the shape and parses every condition, without knowing the
    /// columns (no database needed): at every config load.
    pub fn syntax(&self, entity: &str, rules: &[Rule]) -> Result<(), RuleError> {
        check_shape(entity, rules)?;
        for (i, r) in rules.iter().enumerate() {
            // Binding fails here for every column (there is no table); only
            // a parser error means the SQL itself is broken. `prepare` also
            // refuses a second statement smuggled in after a `;`.
            if let Err(e) = self
                .db
                .prepare(&format!("SELECT ({}) AS failing", r.condition))
            {
                let msg = e.to_string();
                if !msg.starts_with("Binder Error") && !msg.contains("not found in FROM clause") {
                    return Err(rule_error(entity, i, &r.code, first_line(&e)));
                }
            }
            // An aggregate without OVER judges no row: its value would be
            // the batch's or nothing. A window function reads the state.
            if !r.reads_the_state() {
                if let Err(e) = self
                    .db
                    .prepare(&format!("SELECT 1 WHERE ({})", r.condition))
                {
                    if e.to_string().contains("aggregate") {
                        return Err(rule_error(entity, i, &r.code, NO_AGGREGATE));
                    }
                }
            }
        }
        Ok(())
    }

    /// Binds every condition against a row of `table`'s `columns` (names
    /// and DuckDB types): unknown columns, wrong types and non-boolean
    /// conditions are refused here, naming the rule and the column. The
    /// rules' shape was checked when the config loaded.
    pub fn columns(
        &self,
        entity: &str,
        table: &str,
        columns: &[(String, ColType)],
        rules: &[Rule],
    ) -> Result<(), RuleError> {
        self.db
            .execute_batch(&format!(
                "CREATE OR REPLACE TABLE source_row ({});
                 INSERT INTO source_row DEFAULT VALUES;",
                column_defs(columns, true)
            ))
            .map_err(|e| rule_error(entity, 0, "", format!("describing {table}: {e}")))?;
        for (i, r) in rules.iter().enumerate() {
            // As at the load, now with the columns bound (`count(email)`).
            if !r.reads_the_state() {
                if let Err(e) = self.db.prepare(&format!(
                    "SELECT count(*) FROM source_row WHERE ({})",
                    r.condition
                )) {
                    if e.to_string().contains("aggregate") {
                        return Err(rule_error(entity, i, &r.code, NO_AGGREGATE));
                    }
                }
            }
            let typ: Result<String, duckdb::Error> = self.db.query_row(
                &format!("SELECT typeof(({})) FROM source_row", r.condition),
                [],
                |row| row.get(0),
            );
            match typ {
                Ok(t) if t == "BOOLEAN" || t == "\"NULL\"" || t == "NULL" => {}
                Ok(t) => {
                    return Err(rule_error(
                        entity,
                        i,
                        &r.code,
                        format!("condition is {t}, not a boolean (TRUE must mean the row fails)"),
                    ))
                }
                Err(e) => {
                    let line = first_line(&e);
                    let message = match unknown_column(&line) {
                        Some(col) => {
                            format!("unknown column \"{col}\": {table} has no such column ({line})")
                        }
                        None => format!("{line} (against the columns of {table})"),
                    };
                    return Err(rule_error(entity, i, &r.code, message));
                }
            }
        }
        Ok(())
    }
}

/// Checks both entities' rules against the source tables' columns, read
/// from PostgreSQL without reading a row, and that the `[source]` settings
/// naming columns name ones the tables have. A broken rule comes back as
/// [`PipelineError::Rule`]; a table that cannot be described as
/// [`PipelineError::Source`].
pub fn check_against_source(
    client: &mut postgres::Client,
    config: &crate::config::Config,
) -> Result<(), crate::error::PipelineError> {
    let s = &config.source;
    for entity in Entity::ALL {
        let (name, rules) = (s.table(entity), config.rules.of(entity));
        let table = &name.to_string();
        let columns = source::describe(client, name)?;
        if let Some(m) = source::missing_columns(s, entity, table, &columns)
            .into_iter()
            .next()
        {
            return Err(crate::error::PipelineError::Config(m));
        }
        Checker::with(|c| c.columns(entity.as_str(), table, &columns, rules))?;
    }
    Ok(())
}

/// The column in DuckDB's `Referenced column "x" not found` binder error.
fn unknown_column(message: &str) -> Option<&str> {
    let rest = message.split("Referenced column \"").nth(1)?;
    rest.split('"').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<(String, ColType)> {
        vec![
            ("company_name".into(), ColType::Text),
            ("website_url".into(), ColType::Text),
            ("employees".into(), ColType::Int4),
        ]
    }

    #[test]
    fn defaults_pass_both_checks() {
        let c = Checker::new().unwrap();
        c.syntax("companies", &default_company_rules()).unwrap();
        c.syntax("people", &default_people_rules()).unwrap();
        c.columns("companies", "t", &cols(), &default_company_rules())
            .unwrap();
    }

    /// A window function reads the whole state and passes; an aggregate
    /// without OVER is refused when the config loads, or, when it names a
    /// column, against the columns, naming the rule either way.
    #[test]
    fn whole_state_rules_need_a_window() {
        let c = Checker::new().unwrap();
        let window = vec![rule(
            "name_duplicate",
            "count(*) OVER (PARTITION BY lower(company_name)) > 1",
        )];
        assert!(window[0].reads_the_state());
        c.syntax("companies", &window).unwrap();
        c.columns("companies", "t", &cols(), &window).unwrap();
        for (i, rules) in [
            vec![rule("many", "count(*) > 1")],
            vec![
                rule("ok", "employees > 1"),
                rule("many_names", "count(company_name) > 1"),
            ],
        ]
        .into_iter()
        .enumerate()
        {
            let e = match c.syntax("companies", &rules) {
                Err(e) => e,
                Ok(()) => c.columns("companies", "t", &cols(), &rules).unwrap_err(),
            };
            assert_eq!(e.index, i, "{e}");
            assert!(e.message.contains("window function"), "{e}");
        }
        assert!(!rule("r", "takeover_date IS NULL").reads_the_state());
        assert!(rule("r", "rank() over(ORDER BY x) = 1").reads_the_state());
    }

    /// The examples in docs/rules.md load and bind against the production
    /// columns they name.
    #[test]
    fn the_documented_examples_check() {
        let doc = include_str!("../../docs/rules.md");
        let start = doc
            .find("[[rules.people]]            # duplicate email")
            .unwrap();
        let block = &doc[start..];
        let block = &block[..block.find("```").unwrap()];
        let parsed = crate::config::Config::from_toml_str(&format!(
            "[source]\nhost = \"h\"\ndatabase = \"d\"\nuser = \"u\"\n\
             [storage]\nendpoint = \"http://s\"\nbucket = \"b\"\n{block}"
        ))
        .unwrap();
        let text = |n: &str| (n.to_string(), ColType::Text);
        let c = Checker::new().unwrap();
        let companies = [text("company_unique_id"), text("industry")];
        let people = [text("email"), text("work_phone_e164")];
        for (entity, rules, columns) in [
            ("companies", &parsed.rules.companies, &companies[..]),
            ("people", &parsed.rules.people, &people[..]),
        ] {
            assert!(!rules.is_empty());
            c.syntax(entity, rules).unwrap();
            c.columns(entity, "t", columns, rules).unwrap();
        }
        assert_eq!(
            parsed.rules.people[2].severity,
            crate::config::Severity::Warn
        );
    }

    #[test]
    fn syntax_errors_name_the_rule() {
        let rules = vec![
            rule("ok", "employees > 1"),
            rule("broken", "employees >> AND"),
        ];
        let c = Checker::new().unwrap();
        let e = c.syntax("companies", &rules).unwrap_err();
        assert_eq!((e.index, e.code.as_str()), (1, "broken"));
        assert!(
            e.to_string()
                .starts_with("rules.companies[1] (code `broken`)"),
            "{e}"
        );
        let smuggled = vec![rule("x", "true); DROP TABLE t; SELECT (1")];
        assert!(c.syntax("companies", &smuggled).is_err());
    }

    #[test]
    fn unknown_column_and_non_boolean_are_named() {
        let rules = vec![rule("emp", "employee_count IS NULL")];
        let c = Checker::new().unwrap();
        let e = c
            .columns("companies", "marketing.company_master", &cols(), &rules)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules.companies[0] (code `emp`)"), "{e}");
        assert!(e.contains("unknown column \"employee_count\""), "{e}");
        let rules = vec![rule("num", "employees + 1")];
        let e = c.columns("companies", "t", &cols(), &rules).unwrap_err();
        assert!(e.message.contains("not a boolean"), "{e}");
    }

    #[test]
    fn shape_checks() {
        assert!(check_shape("people", &[rule("Bad Code", "true")]).is_err());
        assert!(check_shape("people", &[rule("a", "true"), rule("a", "false")]).is_err());
        assert!(check_shape("people", &[rule("company_not_valid", "true")]).is_err());
        assert!(check_shape("people", &[rule("a", " ")]).is_err());
        // check_syntax (what loading a config runs) names the config key.
        let rules = crate::config::RulesConfig {
            companies: vec![rule("x y", "true")],
            people: Vec::new(),
        };
        let e = check_syntax(&rules).unwrap_err().to_string();
        assert!(e.contains("rules.companies[0]"), "{e}");
    }
}
